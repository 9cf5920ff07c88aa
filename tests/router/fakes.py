"""A scripted TF Serving worker behind the transport seam (``router.transport.Transport``).

The only fake the router's tests use: everything above the transport (pool,
registry, rollout controller, data plane, batcher) is the real code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

import numpy as np

from shared.errors import NotFound
from shared.tensor import fill
from protos import config_pb2, metadata_pb2, predict_pb2, status_pb2, types_pb2
from router.transport import Transport

State = status_pb2.ModelVersionStatus
AVAILABLE, END = State.AVAILABLE, State.END
Outcome = BaseException | predict_pb2.PredictResponse


def signature_map(cols: int = 2) -> metadata_pb2.SignatureDefMap:
    sigmap = metadata_pb2.SignatureDefMap()
    sig = sigmap.signature_def["serving_default"]
    sig.method_name = "tensorflow/serving/predict"
    for alias, table in ((sig.inputs["x"], "x:0"), (sig.outputs["y"], "y:0")):
        alias.name = table
        alias.dtype = types_pb2.DT_FLOAT
        alias.tensor_shape.dim.add(size=-1)
        alias.tensor_shape.dim.add(size=cols)
    sigmap.signature_def["__saved_model_init_op"].outputs["op"].name = "init"
    return sigmap


class FakeTransport:
    """A scripted TF Serving worker: loads what ReloadConfig asks, answers status and metadata.

    ``predict_script`` is a list of outcomes consumed one per Predict call (an
    exception is raised, a response returned); several fakes may share one
    list, so "the first call anywhere fails" is easy to say.  When it is empty
    Predict answers ``ok``.
    """

    def __init__(self, name: str = "", *, predict_script: list[Outcome] | None = None,
                 broken: Iterable[tuple[str, int]] = ()) -> None:
        self.name = name
        self.states: dict[str, dict[int, status_pb2.ModelVersionStatus]] = {}
        self.reloads: list[dict[str, tuple[int, ...]]] = []
        self.metadata_calls: list[tuple[str, int]] = []
        self.status_calls: list[str] = []
        self.predicts: list[predict_pb2.PredictRequest] = []
        self.timeouts: list[float] = []
        self.predict_script = [] if predict_script is None else predict_script
        self.broken = set(broken)  # (model, version) pairs that fail to load
        self.on_reload: Callable[[dict[str, tuple[int, ...]]], None] | None = None
        self.reload_error: BaseException | None = None
        self.closed = False
        self.ok = predict_pb2.PredictResponse()
        self.ok.outputs["y"].dtype = types_pb2.DT_FLOAT
        self.warmups: list[predict_pb2.PredictRequest] = []
        self.warmup_error: BaseException | None = None
        self.warm_answer = predict_pb2.PredictResponse()
        fill(self.warm_answer.outputs["y"], np.zeros((1, 2), np.float32))
        self.reload_delay = 0.0
        self.paces: list[tuple[str, str | None]] = []  # (call, the pacing it asked for)
        self.raws: list[str] = []
        self.raw_script: list[Outcome] = []
        self.raw_gate: asyncio.Event | None = None

    async def warmup(self, request: predict_pb2.PredictRequest, timeout: float,
                     pace: str | None = None) -> predict_pb2.PredictResponse:
        self.warmups.append(request)
        self.paces.append(("warmup", pace))
        await asyncio.sleep(0)
        if self.warmup_error is not None:
            raise self.warmup_error
        spec = request.model_spec
        if not self.holds(spec.name, spec.version.value):
            raise NotFound(f"Servable not found for request: Specific({spec.name}, {spec.version.value})")
        return self.warm_answer

    async def predict(self, request: predict_pb2.PredictRequest, timeout: float) -> predict_pb2.PredictResponse:
        self.predicts.append(request)
        self.timeouts.append(timeout)
        await asyncio.sleep(0)
        if self.predict_script:
            outcome = self.predict_script.pop(0)
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome
        return self.ok

    async def metadata(self, request: metadata_pb2.GetModelMetadataRequest,
                       timeout: float) -> metadata_pb2.GetModelMetadataResponse:
        spec = request.model_spec
        self.metadata_calls.append((spec.name, spec.version.value))
        assert list(request.metadata_field) == ["signature_def"]
        if not self.holds(spec.name, spec.version.value):
            raise NotFound(f"Servable not found for request: Specific({spec.name}, {spec.version.value})")
        resp = metadata_pb2.GetModelMetadataResponse()
        resp.model_spec.CopyFrom(spec)
        resp.metadata["signature_def"].Pack(signature_map())
        return resp

    async def status(self, request: status_pb2.GetModelStatusRequest,
                     timeout: float) -> status_pb2.GetModelStatusResponse:
        name = request.model_spec.name
        self.status_calls.append(name)
        versions = self.states.get(name)
        if not versions:
            raise NotFound(f"Could not find any versions of model {name}")
        return status_pb2.GetModelStatusResponse(model_version_status=[versions[v] for v in sorted(versions)])

    async def reload(self, request: config_pb2.ReloadConfigRequest, timeout: float,
                     pace: str | None = None) -> config_pb2.ReloadConfigResponse:
        wanted = {c.name: tuple(c.model_version_policy.specific.versions)
                  for c in request.config.model_config_list.config}
        self.paces.append(("reload", pace))
        self.reloads.append(wanted)
        if self.on_reload is not None:
            self.on_reload(wanted)
        await asyncio.sleep(self.reload_delay)
        if self.reload_error is not None:
            raise self.reload_error
        for model, versions in wanted.items():
            states = self.states.setdefault(model, {})
            for v in list(states):
                if v not in versions and states[v].state == AVAILABLE:
                    states[v] = State(version=v, state=END)
            for v in versions:
                if (model, v) in self.broken:
                    states[v] = State(version=v, state=END, status=status_pb2.StatusProto(
                        error_code=status_pb2.INVALID_ARGUMENT, error_message="cannot load"))
                else:
                    states[v] = State(version=v, state=AVAILABLE)
        return config_pb2.ReloadConfigResponse()

    async def raw(self, method: str, body: bytes, timeout: float) -> bytes:
        """Forwarded calls echo their body; ``raw_script`` fails them like ``predict_script``,
        ``raw_gate`` holds them until it is set."""
        self.raws.append(method)
        if self.raw_gate is not None:
            await self.raw_gate.wait()
        if self.raw_script:
            outcome = self.raw_script.pop(0)
            if isinstance(outcome, BaseException):
                raise outcome
        return body

    async def healthy(self, timeout: float) -> bool:
        return True

    async def close(self) -> None:
        self.closed = True

    def holds(self, model: str, version: int) -> bool:
        st_ = self.states.get(model, {}).get(version)
        return st_ is not None and st_.state == AVAILABLE


def _conforms(t: FakeTransport) -> Transport:
    return t  # never called: lets mypy check FakeTransport against the Transport protocol
