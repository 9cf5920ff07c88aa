"""The protocol-agnostic data plane: both frontends call this and nothing below it.

A Predict is resolved to a version (TF Serving's rules, over the pool),
validated against that version's cached signature (so bad input never costs
a worker anything), normalized (explicit version, resolved signature name,
inputs serialized in sorted order by the transport) and handed to the
batcher, or sent alone (``router.dispatch``: a worker slot, the caller's
remaining deadline, one retry elsewhere if the worker fails under it).  A
request whose version the router chose and which then left the pool goes
to the version it would get now, once.  Calls only go down: frontends ->
dataplane -> batcher -> dispatch -> pool -> transport.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import NamedTuple

from google.protobuf import any_pb2

from protos import metadata_pb2, model_pb2, predict_pb2, status_pb2
from router.batcher import BatchKey, Batcher
from router.registry import Registry, VersionWithdrawn
from router.traffic import Headers
from shared.errors import InvalidArgument, ServingError, Unavailable
from router.dispatch import Dispatcher, predict_call, raw_call
from router.pool import ANY_VERSION
from router.transport import TransportError
from router.wire.concat import batch_rows
from shared.tensor import num_elements
from shared.signature import Signature, find_signature

log = logging.getLogger("router.dataplane")

SIGNATURE_DEF_MAP_URL = "type.googleapis.com/tensorflow.serving.SignatureDefMap"

# The pool's slots of MultiInference calls (which name their models in their tasks) count under this name.
MULTI_INFERENCE = ""

AnswerHook = Callable[[str, int, str, float], None]  # model, version, code, seconds


class Resolved(NamedTuple):
    version: int
    signature: Signature
    chosen_by_router: bool  # the client named no version: the router chose it


class DataPlane:
    def __init__(self, control: Registry, dispatcher: Dispatcher, *, batcher: Batcher | None = None,
                 on_answer: AnswerHook | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.control = control
        self.dispatcher = dispatcher
        self.batcher = batcher
        # Every Predict answered, with the version that answered (or was chosen):
        # per-version metrics and the canary analysis read these.
        self.on_answer = on_answer or (lambda model, version, code, seconds: None)
        # Answered requests, for the request logs (router/reqlog.py): (request, response, version)
        self.tap: Callable[[predict_pb2.PredictRequest, predict_pb2.PredictResponse, int], None] | None = None
        self._clock = clock
        self.max_tensor_elements = control.config.limits.max_tensor_elements if control is not None else 1 << 62

    def signature(self, spec: model_pb2.ModelSpec, headers: Headers | None = None) -> tuple[int, Signature]:
        """Resolve a ModelSpec to (version, signature) from the cache."""
        version = self.control.resolve(spec, headers)
        meta = self.control.metadata(spec.name, version)
        return version, find_signature(meta.signatures, spec.signature_name)

    def resolve(self, spec: model_pb2.ModelSpec, headers: Headers | None = None) -> Resolved:
        """The version and signature a request for ``spec`` gets now (from the caches, no I/O)."""
        version, sig = self.signature(spec, headers)
        return Resolved(version, sig, spec.WhichOneof("version_choice") is None)

    async def predict(self, request: predict_pb2.PredictRequest, deadline: float, headers: Headers | None = None,
                      resolved: Resolved | None = None) -> predict_pb2.PredictResponse:
        """Answer a Predict.

        ``headers``: the request's headers or gRPC metadata, for the model's
        routing rules and sticky split.  ``resolved``: what ``resolve`` gave
        for this request already (the REST front needs the signature to parse
        the body), so it is not resolved twice.
        """
        spec = request.model_spec
        start = self._clock()
        version: int | None = None
        try:
            if resolved is None:
                if self.control.held and spec.WhichOneof("version_choice") is None:
                    await self.control.settled(spec.name)
                resolved = self.resolve(spec, headers)
            version, sig, chosen_by_router = resolved
            try:
                response = await self._predict(request, version, sig, deadline)
            except (VersionWithdrawn, Unavailable) as exc:
                if not chosen_by_router or isinstance(exc, TransportError):
                    raise  # a worker lost under the call was retried elsewhere already (dispatch)
                # Resolved to a version that left the pool, or that no worker can
                # take any more, while the request waited (the default, just
                # before a switch): the client named no version, so the version
                # it would get now answers (once, and only if it is another one).
                spec.ClearField("version")
                first = version
                version, sig = self.signature(spec, headers)
                if version == first:
                    raise
                self.dispatcher.on_retry(spec.name, "version_withdrawn")
                response = await self._predict(request, version, sig, deadline)
        except ServingError as exc:
            if version is not None:
                self.on_answer(spec.name, version, exc.code.name, self._clock() - start)
            raise
        assert version is not None
        self.on_answer(spec.name, version, "OK", self._clock() - start)
        if self.tap is not None:
            self.tap(request, response, version)
        return response

    async def _predict(self, request: predict_pb2.PredictRequest, version: int, sig: Signature,
                       deadline: float) -> predict_pb2.PredictResponse:
        spec = request.model_spec
        inputs = request.inputs
        plan = sig.plan(inputs, request.output_filter)
        elements = plan.extra.get("elements")
        if elements is None:
            elements = plan.extra["elements"] = max((num_elements(shape) for shape in plan.shapes), default=0)
        if elements > self.max_tensor_elements:
            raise InvalidArgument(f"a request tensor has {elements} elements, more than this router accepts "
                                  f"(limits.max_tensor_elements {self.max_tensor_elements})")
        spec.version.value = version  # explicit from here on (clears a label)
        spec.signature_name = sig.name
        settings = self.control.model(spec.name).batching
        if self.batcher is not None and settings.enabled and sig.batchable:
            rows = batch_rows(plan.names, plan.shapes)
            if 0 < rows <= settings.max_batch_size:
                key = plan.extra.get((spec.name, version))
                if key is None:
                    key = plan.extra[(spec.name, version)] = BatchKey(spec.name, version, sig.name, tuple(
                        [(n, inputs[n].dtype, shape[1:]) for n, shape in zip(plan.names, plan.shapes)]
                    ), plan.outputs)
                return await self.batcher.submit(key, settings, request, rows, deadline)

        return await self.dispatcher.send(spec.name, version, predict_call(request), deadline)

    def metadata(self, request: metadata_pb2.GetModelMetadataRequest) -> metadata_pb2.GetModelMetadataResponse:
        fields = list(request.metadata_field)
        if fields != ["signature_def"]:
            bad = [f for f in fields if f != "signature_def"]
            raise InvalidArgument(f"Metadata field {bad[0]} is not supported" if bad
                                  else "GetModelMetadataRequest must specify at least one metadata_field")
        spec = request.model_spec
        version = self.control.resolve(spec)
        meta = self.control.metadata(spec.name, version)
        response = metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = spec.name
        response.model_spec.version.value = version
        response.metadata["signature_def"].CopyFrom(
            any_pb2.Any(type_url=SIGNATURE_DEF_MAP_URL,
                        value=meta.signature_def_map.SerializeToString(deterministic=True)))
        return response

    def status(self, request: status_pb2.GetModelStatusRequest) -> status_pb2.GetModelStatusResponse:
        return self.control.status(request.model_spec)

    async def forward(self, method: str, body: bytes, deadline: float) -> bytes:
        """Classify / Regress: forwarded unchanged to a worker holding the version.

        Their ModelSpec is field 1, like GetModelStatusRequest's, which is how
        it is read here without modelling the rest of the message.
        """
        try:
            spec = status_pb2.GetModelStatusRequest.FromString(body).model_spec
        except Exception as exc:
            raise InvalidArgument(f"cannot parse request: {exc}") from exc
        version = self.control.resolve(spec)
        return await self.dispatcher.send(spec.name, version, raw_call(method, body), deadline)

    async def forward_any(self, method: str, body: bytes, deadline: float) -> bytes:
        """MultiInference: its tasks may name several models; any worker in rotation answers,
        through a pool slot like every other call (counted, drained, retried once)."""
        return await self.dispatcher.send(MULTI_INFERENCE, ANY_VERSION, raw_call(method, body), deadline)

