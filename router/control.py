"""The control plane: which versions exist, which workers hold them, their signatures.

The router decides which versions every worker holds (decision 1): it scans
each model's base path, applies the version policy, and sends each worker a
ReloadConfig with a ``specific`` policy.  A sync is two-phase so no request
is ever routed to a version a worker is dropping: first the worker loads the
union of old and new versions, the router records what it now holds, then
the router stops routing the old versions there and only after that tells
the worker to unload them.

Signatures are fetched once per (model, version) with GetModelMetadata and
cached; the data plane validates requests against this cache.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from protos import config_pb2, metadata_pb2, model_pb2, status_pb2
from router.config import Config, ModelConfig
from common.errors import InvalidArgument, NotFound, ServingError, Unavailable
from router.pool import DEAD, LOADING, READY, Backend, Pool
from common.signature import Signature

log = logging.getLogger("router.control")

State = status_pb2.ModelVersionStatus
# Which state wins when workers disagree about a version.
_STATE_RANK = {State.AVAILABLE: 5, State.LOADING: 4, State.START: 3, State.UNLOADING: 2, State.END: 1, State.UNKNOWN: 0}


@dataclass(frozen=True)
class VersionMeta:
    model: str
    version: int
    signature_def_map: metadata_pb2.SignatureDefMap
    signatures: dict[str, Signature]


def list_versions(base_path: str) -> list[int]:
    try:
        return sorted(int(e.name) for e in os.scandir(base_path) if e.is_dir() and e.name.isdigit())
    except (FileNotFoundError, NotADirectoryError):
        return []


def aspired(model: ModelConfig, found: list[int]) -> tuple[int, ...]:
    """The versions a model's policy asks for, given the version dirs found (pure)."""
    kind, numbers = model.policy()
    if kind == "all":
        return tuple(found)
    if kind == "specific":
        return numbers
    return tuple(found[-numbers[0]:]) if found else ()


class Control:
    def __init__(self, config: Config, pool: Pool, *, rpc_timeout: float = 300.0,
                 on_change: Callable[[], None] | None = None) -> None:
        self.config = config
        self.pool = pool
        self.rpc_timeout = rpc_timeout
        self.aspired: dict[str, tuple[int, ...]] = {m.name: () for m in config.models}
        self._models = {m.name: m for m in config.models}
        self._meta: dict[tuple[str, int], VersionMeta] = {}
        self._sync_locks: dict[str, asyncio.Lock] = {}
        self._on_change = on_change or (lambda: None)

    # -- versions ----------------------------------------------------------------

    def scan(self) -> dict[str, tuple[int, ...]]:
        return {m.name: aspired(m, list_versions(m.base_path)) for m in self.config.models}

    def reload_request(self, versions: dict[str, tuple[int, ...]]) -> config_pb2.ReloadConfigRequest:
        req = config_pb2.ReloadConfigRequest()
        for m in self.config.models:
            cfg = req.config.model_config_list.config.add(name=m.name, base_path=os.path.abspath(m.base_path))
            cfg.model_platform = "tensorflow"
            cfg.model_version_policy.specific.versions.extend(versions.get(m.name, ()))
        return req

    def model(self, name: str) -> ModelConfig:
        m = self._models.get(name)
        if m is None:
            raise NotFound(f"Servable not found for request: Latest({name})")
        return m

    def resolve(self, spec: model_pb2.ModelSpec) -> int:
        """The version a request is served by (TF Serving's rules, over the whole pool)."""
        model = self.model(spec.name)
        available = self.pool.available_versions(model.name)
        choice = spec.WhichOneof("version_choice")
        if choice == "version":
            version = spec.version.value
        elif choice == "version_label":
            label = spec.version_label
            if label not in model.version_labels:
                raise InvalidArgument(f"Unrecognized servable version label: {label}")
            version = model.version_labels[label]
        else:
            if available:
                return max(available)
            if self.aspired.get(model.name):
                raise Unavailable(f"model {model.name} has no version available yet")
            raise NotFound(f"Servable not found for request: Latest({model.name})")
        if version in available:
            return version
        if version in self.aspired.get(model.name, ()):
            raise Unavailable(f"version {version} of model {model.name} is not available on any worker yet")
        raise NotFound(f"Servable not found for request: Specific({model.name}, {version})")

    def ready(self) -> bool:
        """Every configured model has an AVAILABLE version somewhere."""
        return all(self.pool.available_versions(m.name) for m in self.config.models)

    # -- metadata ----------------------------------------------------------------

    def metadata(self, model: str, version: int) -> VersionMeta:
        meta = self._meta.get((model, version))
        if meta is None:
            raise Unavailable(f"signatures of {model} version {version} are not known yet")
        return meta

    async def _fetch_metadata(self, backend: Backend, model: str, version: int) -> None:
        if (model, version) in self._meta or backend.transport is None:
            return
        req = metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        req.model_spec.name = model
        req.model_spec.version.value = version
        resp = await backend.transport.metadata(req, self.rpc_timeout)
        sigmap = metadata_pb2.SignatureDefMap.FromString(resp.metadata["signature_def"].value)
        signatures = {name: Signature.from_def(name, sig) for name, sig in sigmap.signature_def.items()
                      if sig.method_name}  # skip __saved_model_init_op and friends
        self._meta[(model, version)] = VersionMeta(model, version, sigmap, signatures)

    # -- status ------------------------------------------------------------------

    def status(self, spec: model_pb2.ModelSpec) -> status_pb2.GetModelStatusResponse:
        """One status per version, aggregated over the pool: AVAILABLE if any worker serves it."""
        model = self.config.model(spec.name)
        if model is None:
            raise NotFound(f"Could not find any versions of model {spec.name}")
        merged: dict[int, status_pb2.ModelVersionStatus] = {}
        for b in self.pool.backends:
            if b.state == DEAD:
                continue
            for version, st in b.versions.get(model.name, {}).items():
                have = merged.get(version)
                if have is None or _STATE_RANK[st.state] > _STATE_RANK[have.state]:
                    merged[version] = st
        choice = spec.WhichOneof("version_choice")
        if choice == "version_label":
            if spec.version_label not in model.version_labels:
                raise InvalidArgument(f"Unrecognized servable version label: {spec.version_label}")
            wanted: int | None = model.version_labels[spec.version_label]
        else:
            wanted = spec.version.value if choice == "version" else None
        versions = sorted(merged) if wanted is None else [v for v in merged if v == wanted]
        if not versions:
            if wanted is not None:
                raise NotFound(f"Could not find version {wanted} of model {model.name}")
            raise NotFound(f"Could not find any versions of model {model.name}")
        return status_pb2.GetModelStatusResponse(model_version_status=[merged[v] for v in versions])

    # -- syncing workers ---------------------------------------------------------

    def syncing(self, backend: Backend) -> bool:
        lock = self._sync_locks.get(backend.name)
        return lock is not None and lock.locked()

    async def sync(self, backend: Backend) -> bool:
        """Make ``backend`` hold the aspired versions; returns True when it is READY."""
        lock = self._sync_locks.setdefault(backend.name, asyncio.Lock())
        async with lock:
            generation = backend.generation
            try:
                await self._sync(backend, generation)
            except ServingError as exc:
                log.warning("sync of %s failed: %s", backend.name, exc.message)
                return False
            finally:
                self._on_change()
            return backend.state == READY

    async def _sync(self, backend: Backend, generation: int) -> None:
        transport = backend.transport
        if transport is None or backend.state == DEAD:
            return
        target = dict(self.aspired)
        held = {m: tuple(sorted(backend.available(m))) for m in target}
        union = {m: tuple(sorted(set(target[m]) | set(held[m]))) for m in target}
        if backend.state != READY:
            backend.state = LOADING
        # Phase 1: load what is new, keep what is held.
        await self._reload(backend, union, generation)
        if backend.state == READY:
            self.pool.wake(backend)  # waiters for a new version need not wait for phase 2
        if held != target:
            # Phase 2: stop routing the versions being dropped, then drop them.
            backend.versions = {
                m: {v: st for v, st in by_version.items() if v in target.get(m, ()) or v not in held.get(m, ())}
                for m, by_version in backend.versions.items()
            }
            self.pool.fail_waiters()
            await self._reload(backend, target, generation)
        if backend.generation == generation and backend.state != DEAD:
            backend.state = READY
            self.pool.wake(backend)
            log.info("%s ready: %s", backend.name,
                     {m: sorted(backend.available(m)) for m in target})

    async def _reload(self, backend: Backend, versions: dict[str, tuple[int, ...]], generation: int) -> None:
        assert backend.transport is not None
        resp = await backend.transport.reload(self.reload_request(versions), self.rpc_timeout)
        if resp.status.error_code:
            log.warning("%s reload: %s", backend.name, resp.status.error_message)
        await self._refresh(backend, generation)

    async def _refresh(self, backend: Backend, generation: int) -> None:
        """Read the worker's per-version status and fetch signatures of new versions."""
        assert backend.transport is not None
        statuses: dict[str, dict[int, status_pb2.ModelVersionStatus]] = {}
        for m in self.config.models:
            req = status_pb2.GetModelStatusRequest()
            req.model_spec.name = m.name
            try:
                resp = await backend.transport.status(req, self.rpc_timeout)
            except NotFound:
                statuses[m.name] = {}
                continue
            statuses[m.name] = {s.version: s for s in resp.model_version_status}
            for s in resp.model_version_status:
                if s.state == State.AVAILABLE:
                    await self._fetch_metadata(backend, m.name, s.version)
        if backend.generation == generation:
            backend.versions = statuses

    async def rescan(self) -> bool:
        """Scan base paths; when the aspired versions changed, sync every worker in turn."""
        found = await asyncio.to_thread(self.scan)
        if found == self.aspired:
            return False
        log.info("aspired versions changed: %s -> %s", self.aspired, found)
        self.aspired = found
        for backend in list(self.pool.backends):
            if backend.state in (READY, LOADING):
                await self.sync(backend)
        return True

    async def poll_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.rescan()
            except Exception:  # the poller must survive anything a filesystem does
                log.exception("version scan failed")

