"""What the data plane asks the control plane: which version answers a request.

The registry holds, per model, the version that unversioned requests get
(``default``), the versions the control plane means to serve (``aspired``,
so a request for one not loaded yet is UNAVAILABLE rather than NOT_FOUND),
the versions that failed (reported as END with their error, as TF Serving
does), and the signatures of every loaded version (fetched once per
version, so requests are validated before they cost a worker anything).

The default version moves only by ``switch``, one assignment on the event
loop: unversioned traffic moves from one version to the next at a single
instant for the whole pool, so no client sees the new version and then the
old one.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from shared.errors import InvalidArgument, NotFound, ServingError, Unavailable
from shared.signature import Signature
from protos import metadata_pb2, model_pb2, status_pb2
from router.config import Config, ModelConfig
from router.pool import DEAD, Pool
from router.transport import Transport
from router.traffic import Headers, Routing

log = logging.getLogger("router.registry")

State = status_pb2.ModelVersionStatus
# Which state wins when workers disagree about a version.
_STATE_RANK = {State.AVAILABLE: 5, State.LOADING: 4, State.START: 3, State.UNLOADING: 2, State.END: 1, State.UNKNOWN: 0}


class VersionWithdrawn(NotFound):
    """The version a request was resolved to left the pool before a worker took the request."""


@dataclass(frozen=True)
class VersionMeta:
    model: str
    version: int
    signature_def_map: metadata_pb2.SignatureDefMap
    signatures: dict[str, Signature]


class Registry:
    def __init__(self, config: Config, pool: Pool, *, rpc_timeout: float = 300.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.pool = pool
        self.rpc_timeout = rpc_timeout
        self._models = {m.name: m for m in config.models}
        self.default: dict[str, int | None] = {m.name: None for m in config.models}
        self.aspired: dict[str, tuple[int, ...]] = {m.name: () for m in config.models}
        # (model, version) -> (canonical error code number, message)
        self.failed: dict[tuple[str, int], tuple[int, str]] = {}
        self.switched_at: dict[str, float] = {}
        self._meta: dict[tuple[str, int], VersionMeta] = {}
        self._clock = clock
        # Labels may move at run time (a promoted canary becomes "stable").
        self.labels: dict[str, dict[str, int]] = {m.name: dict(m.version_labels) for m in config.models}
        # Per model: header rules and the weighted split (router/traffic.py); set by the canary controller.
        self.routing: dict[str, Routing] = {}
        self.draw: Callable[[], float] = random.random
        self.on_route: Callable[[str, str], None] = lambda model, why: None
        self.on_switch: Callable[[], None] = lambda: None
        # Models whose unversioned requests wait (router/procs.py: a switch across processes).
        self.held: dict[str, asyncio.Event] = {}
        pool.unservable = self.unservable

    def set_models(self, config: Config) -> None:
        """Follow a new model list: new models start with no version, removed ones are forgotten
        (NOT_FOUND from now on); a model whose configured labels changed takes them."""
        old = self._models
        self.config = config
        self._models = {m.name: m for m in config.models}
        for name in old.keys() - self._models.keys():
            for table in (self.default, self.aspired, self.labels, self.routing, self.switched_at):
                table.pop(name, None)
            self.failed = {k: v for k, v in self.failed.items() if k[0] != name}
            self._meta = {k: v for k, v in self._meta.items() if k[0] != name}
        for name, m in self._models.items():
            self.default.setdefault(name, None)
            self.aspired.setdefault(name, ())
            if name not in old or old[name].version_labels != m.version_labels:
                self.labels[name] = dict(m.version_labels)

    def model(self, name: str) -> ModelConfig:
        m = self._models.get(name)
        if m is None:
            raise NotFound(f"Servable not found for request: Latest({name})")
        return m

    # -- the default version ---------------------------------------------------

    def switch(self, model: str, version: int | None) -> None:
        """Make ``version`` the one unversioned requests of ``model`` get, from now on."""
        old = self.default.get(model)
        if old == version or model not in self._models:
            return
        self.default[model] = version
        self.switched_at[model] = self._clock()
        self.on_switch()
        log.info("model %s: unversioned requests now go to version %s (was %s)", model, version, old)

    # -- resolution --------------------------------------------------------------

    def resolve(self, spec: model_pb2.ModelSpec, headers: Headers | None = None) -> int:
        """The version a request is served by.

        A version or label the request names; else the model's routing (the
        first header rule that matches, then the weighted split); else the
        default version.  A version routing picks that no worker in rotation
        holds falls back to the default (counted, never an error).
        """
        model = self.model(spec.name)
        available = self.pool.available_versions(model.name)
        choice = spec.WhichOneof("version_choice")
        if choice == "version":
            version = spec.version.value
        elif choice == "version_label":
            label = spec.version_label
            labels = self.labels[model.name]
            if label not in labels:
                raise InvalidArgument(f"Unrecognized servable version label: {label}")
            version = labels[label]
        else:
            routing = self.routing.get(model.name)
            if routing is not None:
                routed, why = routing.choose(headers, self.draw)
                if routed is not None:
                    if routed in available:
                        return routed
                    self.on_route(model.name, f"{why}_unavailable")
            default = self.default.get(model.name)
            if default is not None and default in available:
                return default
            if default is not None or self.aspired.get(model.name):
                raise Unavailable(f"model {model.name} has no version available right now")
            raise NotFound(f"Servable not found for request: Latest({model.name})")
        if version in available:
            return int(version)
        if version in self.aspired.get(model.name, ()):
            raise Unavailable(f"version {version} of model {model.name} is not available on any worker yet")
        raise NotFound(f"Servable not found for request: Specific({model.name}, {version})")

    def served(self, model: str) -> set[int]:
        """Versions a routing block may name: those served or about to be."""
        return set(self.aspired.get(model, ())) | self.pool.available_versions(model)

    def unservable(self, model: str, version: int) -> ServingError:
        """The error for a request whose version no worker in rotation holds right now."""
        if version in self.aspired.get(model, ()):
            return Unavailable(f"no ready worker serves {model} version {version} right now")
        return VersionWithdrawn(f"Servable not found for request: Specific({model}, {version}) (it was unloaded)")

    def ready(self) -> bool:
        """Every configured model has its default version AVAILABLE on a worker in rotation."""
        for m in self.config.models:
            default = self.default.get(m.name)
            if default is None or default not in self.pool.available_versions(m.name):
                return False
        return True

    # -- metadata ----------------------------------------------------------------

    def metadata(self, model: str, version: int) -> VersionMeta:
        meta = self._meta.get((model, version))
        if meta is None:
            raise Unavailable(f"signatures of {model} version {version} are not known yet")
        return meta

    def known(self, model: str, version: int) -> bool:
        return (model, version) in self._meta

    def metas(self) -> dict[tuple[str, int], VersionMeta]:
        """Every version's signatures known here (a data-plane process gets them from the control plane)."""
        return dict(self._meta)

    def put_meta(self, meta: VersionMeta) -> None:
        self._meta[(meta.model, meta.version)] = meta

    async def settled(self, model: str) -> None:
        """Wait while unversioned requests of ``model`` are held (a data-plane process, during the
        first step of a switch: router/procs.py)."""
        held = self.held.get(model)
        if held is not None:
            await held.wait()

    async def fetch_metadata(self, transport: Transport, model: str, version: int) -> VersionMeta:
        meta = self._meta.get((model, version))
        if meta is not None:
            return meta
        req = metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        req.model_spec.name = model
        req.model_spec.version.value = version
        resp = await transport.metadata(req, self.rpc_timeout)
        sigmap = metadata_pb2.SignatureDefMap.FromString(resp.metadata["signature_def"].value)
        signatures = {name: Signature.from_def(name, sig) for name, sig in sigmap.signature_def.items()
                      if sig.method_name}  # skip __saved_model_init_op and friends
        meta = self._meta[(model, version)] = VersionMeta(model, version, sigmap, signatures)
        return meta

    # -- status ------------------------------------------------------------------

    def status(self, spec: model_pb2.ModelSpec) -> status_pb2.GetModelStatusResponse:
        """One status per version, aggregated over the pool: AVAILABLE if any worker serves it.

        A version the control plane gave up on (its load or warm-up failed and
        the pool went back) is END with that error, unless a worker serves it.
        """
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
        for (name, version), (code, message) in self.failed.items():
            if name == model.name and (version not in merged or merged[version].state != State.AVAILABLE):
                failed = State(version=version, state=State.END)
                failed.status.error_code = code  # type: ignore[assignment]
                failed.status.error_message = message
                merged[version] = failed
        choice = spec.WhichOneof("version_choice")
        if choice == "version_label":
            labels = self.labels[model.name]
            if spec.version_label not in labels:
                raise InvalidArgument(f"Unrecognized servable version label: {spec.version_label}")
            wanted: int | None = labels[spec.version_label]
        else:
            wanted = spec.version.value if choice == "version" else None
        versions = sorted(merged) if wanted is None else [v for v in merged if v == wanted]
        if not versions:
            if wanted is not None:
                raise NotFound(f"Could not find version {wanted} of model {model.name}")
            raise NotFound(f"Could not find any versions of model {model.name}")
        return status_pb2.GetModelStatusResponse(model_version_status=[merged[v] for v in versions])
