"""Operator decisions that survive a restart: the runtime state in a file (``state.backend: file``).

The config file stays the base.  What changes at run time and is not in it
is kept here, each entry with who changed it and when:

* a model's routing block (a canary weight, a split, rules) set through the
  admin API, when it differs from the config's;
* pins (``rollout --version``, rollbacks): the versions a model serves
  whatever its policy says;
* failed-version marks (a version that failed to load or warm stays out until
  its directory changes), with the directory's fingerprint;
* drains of named workers.

The file (``state.json`` under ``state.dir``) is written whole, atomically
(a temporary file, fsync, rename, fsync of the directory), whenever what it
holds changed; read back at start and applied before the first rollout.  A
file that cannot be read or parsed refuses the start with its path and the
reason; ``--ignore-state`` starts from the config alone (the file is then
replaced at the first change).  ``tfs-router state reset MODEL`` drops a
model's entries (the config's routing, the policy, failed versions retried).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router.config import ConfigError, WorkerTlsConfig

log = logging.getLogger("router.state")

STATE_FILE = "state.json"
FORMAT = 1
STATE_DIR_ENV = "TFS_ROUTER_STATE_DIR"  # overrides state.dir (tests give every router its own)
FLEET_PREFIX = "fleet/"  # under the etcd prefix: the leader and the replicas' windows (router/fleet.py), not state
WATCH_LAG_ENV = "TFS_ROUTER_TEST_WATCH_LAG"  # tests: seconds a replica waits before applying a watched change


class StateError(ConfigError):
    """A state file that cannot be used; the message names the file and why."""


@dataclass(frozen=True)
class Entry:
    value: Any
    by: str
    at: float

    def document(self) -> dict[str, Any]:
        return {"value": self.value, "by": self.by, "at": self.at}


State = dict[str, Any]  # {"models": {model: {key: Entry | {version: Entry}}}, "workers": {name: Entry}}


def empty() -> State:
    return {"models": {}, "workers": {}}


class FileStore:
    """The runtime state as one JSON document in a directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE

    def load(self) -> State:
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return empty()
        except OSError as exc:
            raise StateError(f"state file {self.path}: cannot read it ({exc.strerror}); "
                             "start with --ignore-state to begin from the config") from None
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError(f"not a tfs-router state file of format {FORMAT}")
            state = empty()
            state["models"] = {model: _entries_from(entries) for model, entries in data["models"].items()}
            state["workers"] = {name: _entry(e) for name, e in data["workers"].items()}
            return state
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StateError(f"state file {self.path}: {exc}; start with --ignore-state to begin from the "
                             "config (the file is replaced at the next change)") from None

    def save(self, state: State) -> None:
        doc = {"format": FORMAT, "saved_at": time.time(),
               "models": {m: _entries_doc(entries) for m, entries in state["models"].items() if entries},
               "workers": {name: e.document() for name, e in state["workers"].items()}}
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_name(STATE_FILE + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _entries_doc(entries: dict[str, Any]) -> dict[str, Any]:
    """A model's entries as JSON data (failed marks keyed by version)."""
    return {k: ({str(v): x.document() for v, x in e.items()} if k == "failed" else e.document())
            for k, e in entries.items()}


def _entries_from(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: ({int(v): _entry(x) for v, x in e.items()} if k == "failed" else _entry(e)) for k, e in doc.items()}


def _entry(raw: Any) -> Entry:
    if not isinstance(raw, dict) or "value" not in raw:
        raise ValueError(f"an entry must be {{value, by, at}}, got {raw!r}")
    return Entry(raw["value"], str(raw.get("by", "")), float(raw.get("at", 0.0)))


def merge(old: State, values: dict[str, Any], by: str, now: float) -> State:
    """The state for ``values`` (the same shape, plain values): an entry whose value did not change
    keeps who set it and when; a changed one is ``by`` at ``now``."""
    def keep(prev: Entry | None, value: Any) -> Entry:
        return prev if prev is not None and prev.value == value else Entry(value, by, now)

    state = empty()
    for model, entries in values["models"].items():
        prev = old["models"].get(model, {})
        out: dict[str, Any] = {}
        for key, value in entries.items():
            if key == "failed":
                out[key] = {v: keep(prev.get("failed", {}).get(v), x) for v, x in value.items()}
            else:
                out[key] = keep(prev.get(key), value)
        if out:
            state["models"][model] = out
    state["workers"] = {name: keep(old["workers"].get(name), value) for name, value in values["workers"].items()}
    return state


def directory(configured: str, config_path: str | None) -> Path:
    """Where the state lives: ``TFS_ROUTER_STATE_DIR``, else ``state.dir``, else ``.tfs-router-state``
    beside the config file (or in the working directory without one)."""
    override = os.environ.get(STATE_DIR_ENV)
    if override:
        return Path(override)
    if configured:
        return Path(configured)
    base = Path(config_path).resolve().parent if config_path else Path.cwd()
    return base / ".tfs-router-state"


# -- etcd: one state for every replica (state.backend: etcd) ------------------------------------------


class StateConflict(Exception):
    """Another replica changed the same entry since this one last saw it (HTTP 409)."""


class StoreUnavailable(Exception):
    """The store cannot be reached (HTTP 503); the router serves on with the last state it had."""


def _key_docs(state: State) -> dict[str, Any]:
    """The state as etcd keys (relative to the prefix): one per model, one for the workers' drains."""
    docs: dict[str, Any] = {}
    for model, entries in state["models"].items():
        if entries:
            docs[f"models/{model}"] = _entries_doc(entries)
    if state["workers"]:
        docs["workers"] = {name: e.document() for name, e in state["workers"].items()}
    return docs


def _from_key_docs(docs: dict[str, Any]) -> State:
    state = empty()
    for key, doc in docs.items():
        if key == "workers":
            state["workers"] = {name: _entry(e) for name, e in doc.items()}
        elif key.startswith("models/"):
            state["models"][key[len("models/"):]] = _entries_from(doc)
    return state


def _tls_client(cfg: WorkerTlsConfig) -> Any:
    """An aetcd client class whose channel is TLS (aetcd itself opens plaintext channels only)."""
    import aetcd  # type: ignore[import-untyped]
    import grpc
    from aetcd import rpc, watcher

    def read(path: str) -> bytes | None:
        return Path(path).read_bytes() if path else None

    class TlsClient(aetcd.Client):  # type: ignore[misc]
        async def connect(self) -> None:
            if self._connected.is_set():
                return
            credentials = grpc.ssl_channel_credentials(root_certificates=read(cfg.ca_file),
                                                       private_key=read(cfg.key_file),
                                                       certificate_chain=read(cfg.cert_file))
            options = [*self._options.items(), *([("grpc.ssl_target_name_override", cfg.server_name)]
                                                 if cfg.server_name else [])]
            self.channel = rpc.secure_channel(f"{self._host}:{self._port}", credentials, options=options)
            if self._username is not None:
                reply = await rpc.AuthStub(self.channel).Authenticate(
                    rpc.AuthenticateRequest(name=self._username, password=self._password), timeout=self._timeout)
                self.metadata = (("token", reply.token),)
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout,
                                            metadata=self.metadata)
            self._connected.set()

    return TlsClient


class EtcdStore:
    """The runtime state in etcd under ``prefix``, one key per model and one for drains.

    Writes are transactions that compare each key's revision with the one
    this replica last saw (``StateConflict`` when another replica got there
    first); ``watch`` follows the prefix and hands every change made
    elsewhere to ``on_change``.  While etcd cannot be reached, ``stale`` is
    set, writes raise ``StoreUnavailable``, and the watcher retries, catching
    up from the whole prefix when it is back.
    """

    def __init__(self, endpoints: tuple[str, ...], prefix: str, tls: WorkerTlsConfig | None = None,
                 username: str = "", password_file: str = "") -> None:
        self.tls = tls if tls is not None and tls.enabled else None
        self.username, self.password_file = username, password_file
        host, _, port = endpoints[0].rpartition(":")
        self.host, self.port = host or "127.0.0.1", int(port or 2379)
        self.prefix = prefix.rstrip("/") + "/"
        self.path = f"{'etcds' if self.tls else 'etcd'}://{self.host}:{self.port}{self.prefix}"
        self.revisions: dict[str, int] = {}  # key -> mod revision last seen (0: absent)
        self.docs: dict[str, Any] = {}
        self.stale = True
        self._client: Any = None
        self._lag = float(os.environ.get(WATCH_LAG_ENV, "0") or 0)

    async def _connected(self) -> Any:
        import aetcd

        if self._client is None:
            try:
                # read at each connection: rotated certificates and passwords are picked up
                password = Path(self.password_file).read_text().strip() if self.password_file else None
                kwargs = {"username": self.username or None, "password": password, "timeout": 2,
                          "connect_wait_timeout": 2}
                client = (aetcd.Client(self.host, self.port, **kwargs) if self.tls is None
                          else _tls_client(self.tls)(self.host, self.port, **kwargs))
                await client.connect()
            except Exception as exc:
                raise StoreUnavailable(f"etcd at {self.host}:{self.port}: {exc}") from None
            self._client = client
        return self._client

    async def _reset(self) -> None:
        client, self._client = self._client, None
        self.stale = True
        if client is not None:
            try:
                await client.close()
            except Exception:
                pass

    async def call(self, op: Callable[[Any], Awaitable[Any]]) -> Any:
        """``op(client)``; any failure to reach etcd is StoreUnavailable (and the next call reconnects)."""
        try:
            return await op(await self._connected())
        except StoreUnavailable:
            await self._reset()
            raise
        except Exception as exc:
            await self._reset()
            raise StoreUnavailable(f"etcd at {self.host}:{self.port}: {exc}") from None

    async def load(self) -> State:
        """Every key under the prefix (revisions remembered)."""
        found = await self.call(lambda client: client.get_prefix(self.prefix.encode()))
        docs, revisions = {}, {}
        for kv in found:
            key = kv.key.decode()[len(self.prefix):]
            if key.startswith(FLEET_PREFIX):
                continue
            docs[key] = json.loads(kv.value)
            revisions[key] = kv.mod_revision
        self.docs, self.revisions, self.stale = docs, revisions, False
        return _from_key_docs(docs)

    async def save(self, state: State) -> None:
        """Write the keys that changed, each only if nobody else changed it since this replica saw it."""
        wanted = _key_docs(state)
        changed = {k: v for k, v in wanted.items() if self.docs.get(k) != v}
        removed = [k for k in self.docs if k not in wanted]
        if not changed and not removed:
            return
        def transaction(client: Any) -> Any:
            tx = client.transactions
            compare = [tx.mod((self.prefix + k).encode()) == self.revisions.get(k, 0) for k in [*changed, *removed]]
            success = [tx.put((self.prefix + k).encode(), json.dumps(v, sort_keys=True).encode())
                       for k, v in changed.items()]
            success += [tx.delete((self.prefix + k).encode()) for k in removed]
            return client.transaction(compare=compare, success=success, failure=[])

        ok, response = await self.call(transaction)
        if not ok:
            raise StateConflict(f"changed by another router meanwhile ({', '.join(sorted([*changed, *removed]))}); "
                                "read the status again and retry")
        first = response[0]  # every op of one transaction carries its revision
        revision = int(getattr(first, first.WhichOneof("response")).header.revision)
        for k, v in changed.items():
            self.docs[k], self.revisions[k] = v, revision
        for k in removed:
            self.docs.pop(k, None)
            self.revisions.pop(k, None)

    async def watch(self, on_change: Callable[[State], None]) -> None:
        """Follow the prefix until cancelled: ``on_change`` gets the whole state after every change made
        elsewhere (and after a reconnection)."""
        backoff = 0.2
        while True:
            try:
                before = dict(self.docs)
                state = await self.load()
                if self.docs != before:
                    on_change(state)
                client = await self._connected()
                watch = await client.watch_prefix(self.prefix.encode(),
                                                  start_revision=max(self.revisions.values(), default=0) + 1)
                backoff = 0.2
                async for event in watch:
                    if self._lag:  # tests: a replica that sees other replicas' writes late
                        await asyncio.sleep(self._lag)
                    key = event.kv.key.decode()[len(self.prefix):]
                    if key.startswith(FLEET_PREFIX) or self.revisions.get(key, 0) >= event.kv.mod_revision:
                        continue  # the fleet's own keys; this replica's own write, or older
                    if str(event.kind).endswith("DELETE"):
                        self.docs.pop(key, None)
                        self.revisions.pop(key, None)
                    else:
                        self.docs[key] = json.loads(event.kv.value)
                        self.revisions[key] = event.kv.mod_revision
                    on_change(_from_key_docs(self.docs))
                await self._reset()  # the stream ended: etcd went away
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self.stale:
                    log.warning("state store %s unreachable (%s); serving on with the last state", self.path, exc)
                await self._reset()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def close(self) -> None:
        await self._reset()
