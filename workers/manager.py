"""Which model versions a worker holds, and their TF Serving states.

Each version moves START -> LOADING -> AVAILABLE -> UNLOADING -> END; a
failed load ends in END with the error kept in its status, while the model's
other versions keep serving.  Loads run on a dedicated load thread, never on
the event loop or the request threads, and replay the version's warm-up
requests before it becomes AVAILABLE.  A reload loads what is new before it
unloads what is no longer wanted, and an unload waits for the version's
in-flight requests, so moving {1} -> {1,2} -> {2} fails no request.
An explicit empty ``specific`` list holds no versions at all: the router
unloads the old version before loading the new one when memory is short.
Every load and unload is journaled (workers.journal) with the client calls
that overlapped it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from protos import config_pb2, model_pb2, status_pb2
from shared.errors import CODE_BY_NUMBER, CODE_NUMBER, InvalidArgument, NotFound, ServingError
from workers import warmup
from workers.journal import Journal
from workers.runtime import LoadedVersion

log = logging.getLogger("workers.manager")

State = status_pb2.ModelVersionStatus
START, LOADING, AVAILABLE, UNLOADING, END = State.START, State.LOADING, State.AVAILABLE, State.UNLOADING, State.END


@dataclass
class VersionSlot:
    version: int
    state: int = START
    error: ServingError | None = None
    loaded: LoadedVersion | None = None
    inflight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def status(self) -> status_pb2.ModelVersionStatus:
        out = status_pb2.ModelVersionStatus(version=self.version, state=self.state)  # type: ignore[arg-type]
        out.status.SetInParent()  # TF Serving always sends status, OK included
        if self.error is not None:
            out.status.error_code = CODE_NUMBER[self.error.code]  # type: ignore[assignment]
            out.status.error_message = self.error.message
        return out


@dataclass
class ModelEntry:
    config: config_pb2.ModelConfig
    versions: dict[int, VersionSlot] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.name

    def available(self) -> list[int]:
        return sorted(v for v, s in self.versions.items() if s.state == AVAILABLE)


def list_versions(base_path: Path) -> list[int]:
    """Numeric subdirectories of a model's base path (TF Serving's version dirs)."""
    try:
        return sorted(int(p.name) for p in base_path.iterdir() if p.is_dir() and p.name.isdigit())
    except FileNotFoundError:
        return []


def wants_no_versions(config: config_pb2.ModelConfig) -> bool:
    """``specific {}``: the config asks to hold nothing (unlike an empty base path, not an error)."""
    policy = config.model_version_policy
    return policy.WhichOneof("policy_choice") == "specific" and not policy.specific.versions


def aspired_versions(config: config_pb2.ModelConfig) -> list[int]:
    """The versions a model config asks for, by its version policy."""
    found = list_versions(Path(config.base_path))
    policy = config.model_version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return found
    if choice == "specific":
        return sorted(set(policy.specific.versions))
    latest = policy.latest.num_versions if choice == "latest" else 0
    return found[-(latest or 1):]


def _as_serving_error(exc: BaseException) -> ServingError:
    if isinstance(exc, ServingError):
        return exc
    code = CODE_BY_NUMBER.get(getattr(exc, "error_code", -1), grpc.StatusCode.INTERNAL)
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    err = ServingError(message)
    err.code = code
    return err


class ModelManager:
    def __init__(self, load_executor: Executor, journal: Journal) -> None:
        self._models: dict[str, ModelEntry] = {}
        self._load_executor = load_executor
        self._journal = journal
        self._reload_lock = asyncio.Lock()

    # -- queries -----------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Every configured model that should hold a version has an AVAILABLE one."""
        return all(m.available() or wants_no_versions(m.config) for m in self._models.values())

    def executor_counts(self) -> dict[str, dict[int, int]]:
        return {
            m.name: {v: s.loaded.executor_count for v, s in m.versions.items() if s.loaded}
            for m in self._models.values()
        }

    def _entry(self, name: str) -> ModelEntry:
        entry = self._models.get(name)
        if entry is None:
            raise NotFound(f"Could not find any versions of model {name}")
        return entry

    def resolve(self, spec: model_pb2.ModelSpec) -> VersionSlot:
        """The AVAILABLE version a request's ModelSpec names (latest when none)."""
        entry = self._models.get(spec.name)
        choice = spec.WhichOneof("version_choice")
        if choice == "version":
            version = spec.version.value
            slot = entry.versions.get(version) if entry else None
            if slot is None or slot.state != AVAILABLE:
                raise NotFound(f"Servable not found for request: Specific({spec.name}, {version})")
            return slot
        if choice == "version_label":
            label = spec.version_label
            if entry is None:
                raise NotFound(f"Servable not found for request: Latest({spec.name})")
            if label not in entry.config.version_labels:
                raise InvalidArgument(f"Unrecognized servable version label: {label}")
            version = entry.config.version_labels[label]
            slot = entry.versions.get(version)
            if slot is None or slot.state != AVAILABLE:
                raise NotFound(f"Servable not found for request: Specific({spec.name}, {version})")
            return slot
        available = entry.available() if entry else []
        if not available or entry is None:
            raise NotFound(f"Servable not found for request: Latest({spec.name})")
        return entry.versions[available[-1]]

    @contextmanager
    def acquire(self, spec: model_pb2.ModelSpec) -> Iterator[VersionSlot]:
        """Hold a version for one request so an unload waits for it."""
        slot = self.resolve(spec)
        slot.inflight += 1
        slot.idle.clear()
        try:
            yield slot
        finally:
            slot.inflight -= 1
            if slot.inflight == 0:
                slot.idle.set()

    def status(self, spec: model_pb2.ModelSpec) -> status_pb2.GetModelStatusResponse:
        entry = self._entry(spec.name)
        slots = sorted(entry.versions.values(), key=lambda s: s.version)
        if spec.WhichOneof("version_choice") == "version":
            slots = [s for s in slots if s.version == spec.version.value]
            if not slots:
                raise NotFound(f"Could not find version {spec.version.value} of model {spec.name}")
        elif spec.WhichOneof("version_choice") == "version_label":
            label = spec.version_label
            if label not in entry.config.version_labels:
                raise InvalidArgument(f"Unrecognized servable version label: {label}")
            slots = [s for s in slots if s.version == entry.config.version_labels[label]]
        if not slots:
            raise NotFound(f"Could not find any versions of model {spec.name}")
        return status_pb2.GetModelStatusResponse(model_version_status=[s.status() for s in slots])

    # -- changes -----------------------------------------------------------

    async def reload(self, config: config_pb2.ModelServerConfig) -> None:
        """Make the held versions match ``config`` (TF Serving's ReloadConfig).

        Raises the first load error after every change has been attempted.
        """
        configs = list(config.model_config_list.config)
        names = [c.name for c in configs]
        if len(set(names)) != len(names) or not all(names):
            raise InvalidArgument("model names in a config must be unique and non-empty")
        async with self._reload_lock:
            errors: list[ServingError] = []
            for cfg in configs:
                entry = self._models.get(cfg.name)
                if entry is None:
                    entry = self._models[cfg.name] = ModelEntry(config=cfg)
                entry.config = cfg
                for version in cfg.version_labels.values():
                    if version not in aspired_versions(cfg):
                        errors.append(InvalidArgument(
                            f"version label of {cfg.name} points at version {version}, "
                            "which the version policy does not load"))
                errors.extend(await self._converge(entry))
            for name in [n for n in self._models if n not in names]:
                await self._converge(self._models[name], drop=True)
                del self._models[name]
            if errors:
                raise errors[0]

    async def _converge(self, entry: ModelEntry, drop: bool = False) -> list[ServingError]:
        drop = drop or wants_no_versions(entry.config)
        wanted = [] if drop else aspired_versions(entry.config)
        if not drop and not wanted:
            return [NotFound(f"No versions of servable {entry.name} found under base path {entry.config.base_path}")]
        errors = []
        for version in wanted:
            slot = entry.versions.get(version)
            if slot is None or (slot.state == END):
                slot = entry.versions[version] = VersionSlot(version)
                await self._load(entry, slot)
            if slot.error is not None:
                errors.append(slot.error)
        # Availability first: keep the old versions unless a wanted one serves.
        if drop or any(entry.versions[v].state == AVAILABLE for v in wanted):
            for version, slot in list(entry.versions.items()):
                if version not in wanted and slot.state == AVAILABLE:
                    await self._unload(entry, slot)
        return errors

    async def _load(self, entry: ModelEntry, slot: VersionSlot) -> None:
        path = Path(entry.config.base_path) / str(slot.version)
        loop = asyncio.get_running_loop()
        with self._journal.record("load", entry.name, slot.version):
            slot.state = LOADING
            log.info("loading %s version %d from %s", entry.name, slot.version, path)
            try:
                if not path.is_dir():
                    raise NotFound(f"version directory {path} does not exist")
                slot.loaded = await loop.run_in_executor(self._load_executor, _load_and_warm, entry.name,
                                                         slot.version, path)
            except Exception as exc:  # a bad version must never take the worker down
                slot.error = _as_serving_error(exc)
                slot.state = END
                slot.loaded = None
                log.error("loading %s version %d failed: %s", entry.name, slot.version, slot.error.message)
                return
            slot.state = AVAILABLE
            slot.idle.set()
        log.info("%s version %d is AVAILABLE", entry.name, slot.version)

    async def _unload(self, entry: ModelEntry, slot: VersionSlot) -> None:
        with self._journal.record("unload", entry.name, slot.version):
            slot.state = UNLOADING
            log.info("unloading %s version %d (%d in flight)", entry.name, slot.version, slot.inflight)
            if slot.inflight:
                await slot.idle.wait()
            slot.loaded = None
            slot.state = END
            # The version's objects were frozen after its load; thaw, collect the
            # cycles TF leaves behind and freeze the survivors again.  Off the loop:
            # a full collection with TF loaded takes ~0.2 s.
            await asyncio.get_running_loop().run_in_executor(self._load_executor, _refreeze)


def _refreeze() -> None:
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _load_and_warm(name: str, version: int, path: Path) -> LoadedVersion:
    loaded = LoadedVersion(name, version, path)
    count = warmup.replay(loaded)
    if count:
        log.info("%s version %d: replayed %d warm-up requests", name, version, count)
    # A worker with TF loaded holds ~350k objects; freezing them keeps full
    # collections (measured ~177 ms) off the request path.
    gc.collect()
    gc.freeze()
    return loaded
