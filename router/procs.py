"""Several data-plane processes behind one control plane (``dataplane.processes`` > 1).

One router process is one event loop, and one loop is one core.  With
``dataplane.processes: N`` the process started by ``tfs-router serve`` keeps
the control plane (supervisor, version source, rollouts, canary, admin API,
discovery) and starts N data-plane processes (``python -m router dataplane``):
each binds the gRPC port itself with ``SO_REUSEPORT`` (the kernel spreads new
connections over them; one connection stays on one process), accepts REST
connections from one socket the control plane listens on, evenly by count
(router/frontends/balanced.py), and runs the frontends, the admission gates, the data plane, the batcher and its
own connections to every worker.  None imports TensorFlow.

State flows one way, in revisions.  The control plane sends each data plane
a snapshot of what it routes by (the workers, their states, versions and
warm-ups; default versions, labels, aspired and failed versions, routing
blocks, signatures) whenever it changes; a data plane applies a snapshot in
one step on its loop and acknowledges its revision, with its calls in flight
per worker.  Two guarantees of the staged rollout need more than "eventually":

* A drain: ``Pool.wait_idle`` in the control plane waits until every data
  plane has acknowledged the revision that took the worker out of rotation
  and reports nothing in flight on it (each reports a change of a count on a
  worker out of rotation at once).
* The switch of unversioned traffic: a snapshot that moves a model's default
  version goes in two steps.  First every data plane is told to hold new
  unversioned requests of that model (they wait, not resolved) and
  acknowledges; then the new state goes out and each releases them.  No data
  plane answers an unversioned request from the new version while another
  may still resolve one to the old: after any client saw the new version,
  no unversioned request is answered by the old one, whichever process it
  reached.

Data planes report back every answer (model, version, code, seconds; batched
every ``REPORT_S``) for the canary's verdicts and the control plane's
version metrics.

A data plane that dies is started again (its clients reconnect to the
others at once, through the same port); one that loses its control plane
drains and exits.  SIGTERM to the router drains every data plane, then stops
the workers.

The wire: newline-delimited JSON (orjson) on a Unix socket in the router's
private socket directory; messages are rare (a change of state, a report
every quarter second), never per request.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from protos import metadata_pb2, status_pb2
from router.admission import Ticket
from router.frontends.balanced import ConnectionShares
from router.pool import Backend, Pool
from router.registry import Registry, VersionMeta
from router.traffic import RoutingError, compile_routing
from shared.errors import ServingError
from shared.signature import Signature

if TYPE_CHECKING:
    from router.app import App

log = logging.getLogger("router.procs")

REPORT_S = 0.25  # answers and in-flight counts, batched
SHARES_FILE = "rest-connections"  # each data plane's open REST connections (frontends/balanced.py)
REPUBLISH_S = 0.05  # the control plane looks for changes it was not told of this often
RESTART_BACKOFF_S = (0.5, 10.0)
READY_TIMEOUT_S = 60.0
HOLD_MAX_S = 2.0  # a hold never released (the control plane died mid-switch) ends by itself


def resolve_count(processes: int) -> int:
    """``dataplane.processes``; 0 (auto): one per CPU this process may use, at most 8.  The workers
    are not subtracted: under load a data plane is busy ~0.65 of the time (it waits on its batches),
    and on 2 cores with 2 workers 2 data planes served 1.4x what 1 did (README: "How many")."""
    if processes > 0:
        return processes
    return max(1, min(8, len(os.sched_getaffinity(0))))


# -- the snapshot ---------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def snapshot(pool: Pool, registry: Registry) -> dict[str, Any]:
    """What the data planes route by, as JSON-able data."""
    workers = []
    for b in pool.backends:
        workers.append({
            "name": b.name, "address": b.address, "max_inflight": b.max_inflight, "index": b.index,
            "state": b.state, "generation": b.generation, "cordoned": b.cordoned, "surge": b.surge,
            "versions": {m: {str(v): _b64(s.SerializeToString()) for v, s in vs.items()}
                         for m, vs in b.versions.items()},
            "warm": {m: sorted(vs) for m, vs in b.warm.items()},
        })
    return {
        "workers": workers,
        "default": dict(registry.default),
        "aspired": {m: list(v) for m, v in registry.aspired.items()},
        "failed": [[m, v, code, msg] for (m, v), (code, msg) in sorted(registry.failed.items())],
        "switched_at": dict(registry.switched_at),
        "labels": {m: dict(ls) for m, ls in registry.labels.items()},
        "routing": {m: r.document for m, r in registry.routing.items()},
        "meta": {f"{m}/{v}": _b64(meta.signature_def_map.SerializeToString(deterministic=True))
                 for (m, v), meta in registry.metas().items()},
    }


def apply_snapshot(state: dict[str, Any], pool: Pool, registry: Registry,
                   connect: Callable[[Backend], None], disconnect: Callable[[Backend], None]) -> None:
    """Make this data plane's pool and registry what ``state`` says, in one step (no awaits)."""
    for key, data in state["meta"].items():
        model, _, version = key.rpartition("/")
        if not registry.known(model, int(version)):
            sigmap = metadata_pb2.SignatureDefMap.FromString(base64.b64decode(data))
            signatures = {n: Signature.from_def(n, s) for n, s in sigmap.signature_def.items() if s.method_name}
            registry.put_meta(VersionMeta(model, int(version), sigmap, signatures))
    seen = set()
    by_name = {b.name: b for b in pool.backends}
    for w in state["workers"]:
        seen.add(w["name"])
        b = by_name.get(w["name"])
        if b is None or b.address != w["address"]:
            if b is not None:
                disconnect(b)
                pool.remove(b)
            b = Backend(w["name"], w["address"], w["max_inflight"], index=w["index"], surge=w["surge"])
            b.generation = w["generation"]
            pool.add(b)
            connect(b)
        elif b.generation != w["generation"]:  # the worker restarted: a fresh connection
            b.generation = w["generation"]
            disconnect(b)
            connect(b)
        b.versions = {m: {int(v): status_pb2.ModelVersionStatus.FromString(base64.b64decode(s))
                          for v, s in vs.items()} for m, vs in w["versions"].items()}
        b.warm = {m: frozenset(vs) for m, vs in w["warm"].items()}
        b.cordoned = w["cordoned"]
        pool.set_state(b, w["state"])
    for b in [b for b in pool.backends if b.name not in seen]:
        disconnect(b)
        pool.remove(b)
    registry.aspired = {m: tuple(v) for m, v in state["aspired"].items()}
    registry.failed = {(m, v): (code, msg) for m, v, code, msg in state["failed"]}
    registry.switched_at = dict(state["switched_at"])
    registry.labels = {m: dict(ls) for m, ls in state["labels"].items()}
    routing = {}
    for model, document in state["routing"].items():
        try:
            compiled = compile_routing(document, registry.labels.get(model, {}))
        except RoutingError as exc:  # the control plane checked it; never expected
            log.error("model %s: routing not applied here: %s", model, exc)
            continue
        if not compiled.empty:
            routing[model] = compiled
    registry.routing = routing
    for model, version in state["default"].items():
        registry.default[model] = version


# -- one scrape for all processes ------------------------------------------------------------


def merge_expositions(texts: list[bytes]) -> bytes:
    """Prometheus text expositions of processes running the same code, summed sample by sample
    (counters, histogram buckets, and the additive gauges a data plane sets: in flight, queued).
    Families keep their first header lines and order; a sample keeps its exact label text."""
    from prometheus_client.utils import floatToGoString

    headers: dict[str, list[str]] = {}
    samples: dict[str, dict[str, float]] = {}
    for text in texts:
        family = ""
        for line in text.decode("utf-8").splitlines():
            if not line:
                continue
            if line.startswith("#"):
                parts = line.split(" ", 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    lines = headers.setdefault(family, [])
                    if line not in lines:
                        lines.append(line)
                    samples.setdefault(family, {})
                continue
            key, _, value = line.rpartition(" ")
            bucket = samples.setdefault(family, {})
            bucket[key] = bucket.get(key, 0.0) + float(value)
    out = []
    for family, lines in headers.items():
        out.extend(lines)
        out.extend(f"{key} {floatToGoString(v)}" for key, v in samples.get(family, {}).items())  # type: ignore[no-untyped-call]
    return ("\n".join(out) + "\n").encode("utf-8")


# -- the wire -------------------------------------------------------------------------------


def line(message: dict[str, Any]) -> bytes:
    """One message on the control socket: a line of JSON."""
    return orjson.dumps(message) + b"\n"


async def _send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    writer.write(line(message))
    await writer.drain()


async def _receive(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    line = await reader.readline()
    if not line:
        return None
    message: dict[str, Any] = orjson.loads(line)
    return message


def freeze_heap() -> None:
    """Everything start-up built (modules, config, protobuf descriptors, metric families) lives as long
    as the process: take it out of the collector's reach, so a full collection under load scans only
    what requests allocate (a full pass over it all stalled the loop for 12-19 ms, every few seconds,
    at 2k req/s).  The router's process and every data-plane process, once serving."""
    gc.collect()
    gc.freeze()


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound (not listening) with SO_REUSEPORT: it holds the port number, so that every data
    plane binds the same one (port 0 included), and takes no connection itself."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


# -- the control plane's side ------------------------------------------------------------------


class _Link:
    """One data plane, as the control plane sees it."""

    def __init__(self, index: int, writer: asyncio.StreamWriter) -> None:
        self.index = index
        self.writer = writer
        self.acked = 0
        self.inflight: dict[str, int] = {}
        self.changed = asyncio.Event()
        self.ready = asyncio.Event()
        self.pid: int | None = None
        self.answered = 0
        self.tickets: dict[int, Ticket] = {}  # admissions this process holds (its tenants' quotas)


class Hub:
    """The control plane's end: starts and restarts the data planes, publishes revisions, collects
    their acknowledgements and reports."""

    def __init__(self, app: App, count: int, socket_dir: Path, ports: tuple[int, int],
                 rest_socket: socket.socket) -> None:
        self.app = app
        self.count = count
        self.path = socket_dir / "control.sock"
        self.ports = ports
        self.rest_socket = rest_socket  # listening; the data planes accept from it (frontends/balanced.py)
        self.shares = ConnectionShares(socket_dir / SHARES_FILE, count, create=True)
        self.revision = 0
        self._sent_state: dict[str, Any] | None = None
        self._sent_config: dict[str, Any] | None = None
        self._links: dict[int, _Link] = {}
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._dirty = asyncio.Event()
        self._publish_lock = asyncio.Lock()
        self._stopping = False
        self.restarts = 0
        self._expositions: dict[int, asyncio.Future[bytes]] = {}
        self._next_id = 0

    def stopping(self) -> bool:
        return self._stopping

    # -- processes -------------------------------------------------------------

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._accept, path=str(self.path), limit=2**26)
        self._spawn(self._publisher(), "dataplane-publisher")
        for i in range(self.count):
            self._spawn(self._keep_running(i), f"dataplane-{i}")

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Every data plane connected, synced and listening."""
        end = time.monotonic() + timeout
        while len(self._links) < self.count or not all(link.ready.is_set() for link in self._links.values()):
            if time.monotonic() > end:
                raise RuntimeError(f"data-plane processes not up after {timeout:.0f}s")
            await asyncio.sleep(0.02)

    async def _keep_running(self, index: int) -> None:
        backoff = RESTART_BACKOFF_S[0]
        while not self.stopping():
            started = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "router", "dataplane", "--control", str(self.path), "--index", str(index),
                "--parent-pid", str(os.getpid()), "--rest-fd", str(self.rest_socket.fileno()),
                stdin=asyncio.subprocess.DEVNULL, pass_fds=(self.rest_socket.fileno(),))
            self._procs[index] = proc
            log.info("data plane %d: pid %d", index, proc.pid)
            code = await proc.wait()
            self._procs.pop(index, None)
            self.shares.gone(index)  # its connections died with it
            if self.stopping():
                return
            log.warning("data plane %d (pid %d) exited with %s; starting it again in %.1fs", index, proc.pid,
                        code, backoff)
            self.restarts += 1
            self.app.metrics.worker_restarted(f"dataplane-{index}")
            await asyncio.sleep(backoff)
            backoff = RESTART_BACKOFF_S[0] if time.monotonic() - started > 30 else \
                min(backoff * 2, RESTART_BACKOFF_S[1])

    def pids(self) -> dict[int, int]:
        return {i: p.pid for i, p in self._procs.items()}

    def status(self) -> dict[str, Any]:
        """The data-plane processes, for GET /v1/admin/status and ``tfs-router status``."""
        return {"dataplanes": [
            {"index": i, "pid": self._procs[i].pid if i in self._procs else None,
             "connected": i in self._links, "ready": i in self._links and self._links[i].ready.is_set(),
             "revision": self._links[i].acked if i in self._links else None, "revision_published": self.revision,
             "answered": self._links[i].answered if i in self._links else 0,
             "inflight": sum(self._links[i].inflight.values()) if i in self._links else 0}
            for i in range(self.count)], "dataplane_restarts": self.restarts}

    # -- the control channel ---------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = await _receive(reader)
        if hello is None or hello.get("kind") != "hello":
            writer.close()
            return
        from router.config import asdict_lists

        index = int(hello["index"])
        link = _Link(index, writer)
        old = self._links.get(index)
        if old is not None:
            old.writer.close()
        self._links[index] = link
        await _send(writer, {"kind": "config", "config": asdict_lists(self.app.config),
                             "grpc_port": self.ports[0], "rest_port": self.ports[1], "processes": self.count})
        state = snapshot(self.app.pool, self.app.registry)
        await _send(writer, {"kind": "state", "rev": self.revision, "state": state})
        try:
            while True:
                message = await _receive(reader)
                if message is None:
                    break
                self._on_message(link, message)
        except (ConnectionError, ValueError) as exc:
            log.warning("data plane %d: control channel broke: %s", index, exc)
        finally:
            if self._links.get(index) is link:
                del self._links[index]
            for ticket in link.tickets.values():  # what the process held is free again
                ticket.release()
            link.tickets.clear()
            link.changed.set()
            writer.close()

    def _on_message(self, link: _Link, message: dict[str, Any]) -> None:
        kind = message.get("kind")
        if "inflight" in message:
            link.inflight = message["inflight"]
            link.changed.set()
        if kind == "ack":
            link.acked = max(link.acked, int(message["rev"]))
            link.changed.set()
        elif kind == "ready":
            link.pid = message.get("pid")
            link.ready.set()
            log.info("data plane %d listening (pid %s)", link.index, link.pid)
        elif kind == "admit":
            self._spawn(self._admit(link, message), f"admit-{link.index}")
        elif kind == "release":
            ticket = link.tickets.pop(message["id"], None)
            if ticket is not None:
                ticket.release()
        elif kind == "scrape":
            self._spawn(self._scrape(link, message["id"]), f"scrape-{link.index}")
        elif kind == "missing":
            self._spawn(self._find_missing(link, message), f"missing-{link.index}")
        elif kind == "exposition":
            waiter = self._expositions.pop(message["id"], None)
            if waiter is not None and not waiter.done():
                waiter.set_result(message["text"].encode("utf-8"))
        elif kind == "report":
            answers = message.get("answers", ())
            link.answered += len(answers)
            for model, version, code, seconds in answers:
                self.app.record_answer(model, version, code, seconds)

    async def _find_missing(self, link: _Link, message: dict[str, Any]) -> None:
        """A worker answered a data plane NOT_FOUND for a version (passive control: it unloaded it):
        the workers read again (PassiveSync.version_missing), the new state published, then the answer,
        after that state on the same stream, so the data plane retries against it."""
        backend = next((b for b in self.app.pool.backends if b.name == message["worker"]), None)
        try:
            if backend is not None:
                await self.app.pool.version_missing(backend, message["model"], int(message["version"]))
            await self._publish_now()
        finally:
            if not link.writer.is_closing():
                link.writer.write(line({"kind": "found", "id": message["id"]}))

    async def _admit(self, link: _Link, message: dict[str, Any]) -> None:
        """A data plane's request of a tenant or model with a quota: decided here, for the whole router."""
        reply: dict[str, Any] = {"kind": "admitted", "id": message["id"]}
        try:
            ticket = await self.app.admission.admit(message["tenant"], message["model"], float(message["deadline"]))
        except ServingError as exc:
            reply = {"kind": "refused", "id": message["id"], "code": exc.code.name, "message": exc.message,
                     "retry_after": getattr(exc, "retry_after", None)}
        else:
            if self._links.get(link.index) is not link:  # the process is gone
                ticket.release()
                return
            link.tickets[message["id"]] = ticket
        try:
            await _send(link.writer, reply)
        except ConnectionError:
            pass

    async def metrics(self) -> bytes:
        """Every process's metrics in one exposition: the control plane's and each data plane's, summed."""
        loop = asyncio.get_running_loop()
        waiters = []
        for link in list(self._links.values()):
            self._next_id += 1
            waiter: asyncio.Future[bytes] = loop.create_future()
            self._expositions[self._next_id] = waiter
            waiters.append(waiter)
            try:
                await _send(link.writer, {"kind": "expose", "id": self._next_id})
            except ConnectionError:
                waiter.cancel()
        done, pending = await asyncio.wait(waiters, timeout=2.0) if waiters else (set(), set())
        for waiter in pending:
            waiter.cancel()
        texts = [self.app.metrics.render()[0]]
        texts += [w.result() for w in done if not w.cancelled() and w.exception() is None]
        return merge_expositions(texts)

    async def _scrape(self, link: _Link, request_id: int) -> None:
        text = await self.metrics()
        try:
            await _send(link.writer, {"kind": "scraped", "id": request_id, "text": text.decode("utf-8")})
        except ConnectionError:
            pass

    def publish(self) -> None:
        """Send the state again if it changed (soon, on the loop; coalesced)."""
        self._dirty.set()

    async def _publisher(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._dirty.wait(), REPUBLISH_S)
            except asyncio.TimeoutError:
                pass
            self._dirty.clear()
            try:
                await self._publish_now()
            except Exception:  # the publisher must outlive anything a data plane does
                log.exception("publishing the data planes' state failed")

    async def _publish_now(self) -> None:
        # One publication at a time (the publisher's and a drain's): a switch's two steps never interleave.
        async with self._publish_lock:
            await self._publish_locked()

    async def _publish_locked(self) -> None:
        from router.config import asdict_lists

        config = asdict_lists(self.app.config)
        if self._sent_config is not None and config != self._sent_config:
            # Models added or removed at run time (--model_config_file_poll_wait_seconds): first the list.
            self.revision += 1
            await self._broadcast({"kind": "models", "rev": self.revision, "config": config})
        self._sent_config = config
        state = snapshot(self.app.pool, self.app.registry)
        if state == self._sent_state:
            return
        previous = self._sent_state
        moved = sorted(m for m, v in state["default"].items()
                       if previous is not None and previous["default"].get(m) != v)
        if moved:
            # Step one of a switch: every data plane holds new unversioned requests of these models.
            self.revision += 1
            await self._broadcast({"kind": "hold", "rev": self.revision, "models": moved})
            await self._wait_acked(self.revision, timeout=5.0)
        self.revision += 1
        self._sent_state = state
        await self._broadcast({"kind": "state", "rev": self.revision, "state": state, "release": moved})

    async def hold(self, models: list[str]) -> None:
        """Every data plane holds new unversioned requests of ``models`` (a fleet-wide switch: app.py)
        until a state that releases them, or for HOLD_MAX_S."""
        async with self._publish_lock:
            self.revision += 1
            await self._broadcast({"kind": "hold", "rev": self.revision, "models": models})
            await self._wait_acked(self.revision, timeout=2.0)

    async def release(self, models: list[str]) -> None:
        async with self._publish_lock:
            if self._sent_state is None:
                return
            self.revision += 1
            await self._broadcast({"kind": "state", "rev": self.revision, "state": self._sent_state,
                                   "release": models})

    async def _broadcast(self, message: dict[str, Any]) -> None:
        data = line(message)
        for link in list(self._links.values()):
            try:
                link.writer.write(data)
                await link.writer.drain()
            except ConnectionError:
                continue

    async def _wait_acked(self, revision: int, timeout: float) -> bool:
        end = asyncio.get_running_loop().time() + timeout
        while True:
            links = list(self._links.values())
            if all(link.acked >= revision for link in links):
                return True
            left = end - asyncio.get_running_loop().time()
            if left <= 0:
                log.warning("data planes %s did not acknowledge revision %d in %.1fs",
                            [link.index for link in links if link.acked < revision], revision, timeout)
                return False
            await asyncio.sleep(0.002)

    async def synced(self, timeout: float = 5.0) -> bool:
        """The current state published and acknowledged by every data plane."""
        await self._publish_now()
        return await self._wait_acked(self.revision, timeout)

    def inflight(self, backend: Backend) -> int:
        return sum(link.inflight.get(backend.name, 0) for link in self._links.values())

    async def wait_idle(self, backend: Backend, timeout: float) -> bool:
        """``backend`` is out of rotation in every data plane, and none has a call in flight on it."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        if not await self.synced(timeout):
            return False
        while self.inflight(backend) > 0:
            if loop.time() >= end:
                return False
            await asyncio.sleep(0.005)
        return True

    async def stop(self, timeout: float) -> None:
        """SIGTERM every data plane (each drains its calls in flight) and wait for them."""
        self._stopping = True
        procs = list(self._procs.values())
        for p in procs:
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        if procs:
            _, pending = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in procs], timeout=timeout + 5)
            for p in procs:
                if p.returncode is None:
                    p.kill()
            for fut in pending:
                await fut
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
        self.path.unlink(missing_ok=True)
