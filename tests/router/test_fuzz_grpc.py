"""The gRPC front under hypothesis: hostile messages and hostile bytes against a real router.

Requests are built with the project's own messages (``protos``) and sent over
a real channel under TF Serving's method paths: TensorProtos of every dtype
(unsupported and unknown enum values too), shapes negative, huge, of unknown
or very high rank, ``tensor_content`` of any length, typed ``*_val`` fields of
mismatched lengths, any input names and output filters, and model specs naming
unknown models, versions, labels and signatures.  Part of them are shaped like
the served model's signatures so that they pass the router's checks and reach
a worker.  Every answer must be OK or a client error (INVALID_ARGUMENT,
NOT_FOUND, FAILED_PRECONDITION, RESOURCE_EXHAUSTED), never INTERNAL, UNKNOWN
or UNAVAILABLE.

Bytes that are not a valid request message (garbage, truncated or corrupted
serialized requests), sent raw, must get INVALID_ARGUMENT with a message that
names the message type; bytes that happen to parse are answered like any
request.  Afterwards the router and its worker are the same processes and a
normal Predict still succeeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos import metadata_pb2, predict_pb2, status_pb2, tensor_pb2, types_pb2
from shared.tensor import NUMPY_DTYPE, fill, to_numpy
from tests.support import RouterProcess
from tests.router.fuzz_router import LABEL, MODEL, SERVED_VERSION, router, workers_at_start  # noqa: F401 (fixtures)

PREDICT = "/tensorflow.serving.PredictionService/Predict"
METADATA = "/tensorflow.serving.PredictionService/GetModelMetadata"
STATUS = "/tensorflow.serving.ModelService/GetModelStatus"
REQUEST_TYPES: dict[str, type[Message]] = {
    PREDICT: predict_pb2.PredictRequest,
    METADATA: metadata_pb2.GetModelMetadataRequest,
    STATUS: status_pb2.GetModelStatusRequest,
}
RESPONSE_TYPES: dict[str, type[Message]] = {
    PREDICT: predict_pb2.PredictResponse,
    METADATA: metadata_pb2.GetModelMetadataResponse,
    STATUS: status_pb2.GetModelStatusResponse,
}

# What a client's mistake may get; anything else (INTERNAL, UNKNOWN, UNAVAILABLE,
# DEADLINE_EXCEEDED ...) is the router's or the worker's failure.
CLIENT_ERRORS = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
})
ANSWERS = CLIENT_ERRORS | {grpc.StatusCode.OK}

ID_INPUTS = ("user_id", "item_id", "category", "city", "device")
DENSE_DIM = 20
DT_INT64, DT_FLOAT = int(types_pb2.DT_INT64), int(types_pb2.DT_FLOAT)
# The demo model's signatures: input -> (dtype, shape of one example).
SIGNATURES: dict[str, dict[str, tuple[int, tuple[int, ...]]]] = {
    "serving_default": {**{name: (DT_INT64, ()) for name in ID_INPUTS}, "dense": (DT_FLOAT, (DENSE_DIM,))},
    "user_embedding": {"user_id": (DT_INT64, ())},
    "score_pairs": {"user_id": (DT_INT64, ()), "item_id": (DT_INT64, ())},
}
OUTPUTS = ("probability", "logit", "embedding", "scores", "total")

TIMEOUT = 30.0


def _call(router: RouterProcess, method: str, raw: bool = False) -> Any:
    """A unary-unary callable for ``method``: the project's messages, or raw bytes both ways."""
    if raw:
        return router.channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    return router.channel.unary_unary(method, request_serializer=REQUEST_TYPES[method].SerializeToString,
                                      response_deserializer=RESPONSE_TYPES[method].FromString)


def _answer(call: Callable[..., Any], request: Any) -> tuple[grpc.StatusCode, str, Any]:
    try:
        return grpc.StatusCode.OK, "", call(request, timeout=TIMEOUT)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", None


def _shown(request: Any) -> str:
    if isinstance(request, bytes):
        return f"raw bytes {request!r}"
    return f"{type(request).__name__} {request!r:.3000}"


# -- strategies -----------------------------------------------------------------------

_INT32 = st.integers(-(2**31), 2**31 - 1)
_INT64 = st.integers(-(2**63), 2**63 - 1)
_FLOAT32 = st.floats(width=32)
_TEXT = st.text(max_size=8)

# Every dtype TF defines, and enum numbers it does not (proto3 enums are open).
_DTYPES: st.SearchStrategy[Any] = st.one_of(st.sampled_from(sorted(types_pb2.DataType.values())), _INT32)
# Dimensions: small, negative, and too large for any tensor (past the worker's
# broadcast limit too, so nothing hostile is ever materialised).
_DIM = st.one_of(st.integers(0, 4), st.integers(0, 4),
                 st.sampled_from([-1, -2, -(2**63), 2**29, 2**31, 2**32 + 1, 2**62, 2**63 - 1]))
_TYPED_VALUES: dict[str, st.SearchStrategy[list[Any]]] = {
    "half_val": st.lists(_INT32, max_size=6),
    "float_val": st.lists(_FLOAT32, max_size=6),
    "double_val": st.lists(st.floats(), max_size=6),
    "int_val": st.lists(_INT32, max_size=6),
    "string_val": st.lists(st.binary(max_size=8), max_size=6),
    "scomplex_val": st.lists(_FLOAT32, max_size=6),
    "int64_val": st.lists(_INT64, max_size=6),
    "bool_val": st.lists(st.booleans(), max_size=6),
    "dcomplex_val": st.lists(st.floats(), max_size=6),
    "uint32_val": st.lists(st.integers(0, 2**32 - 1), max_size=6),
    "uint64_val": st.lists(st.integers(0, 2**64 - 1), max_size=6),
}
# The typed field a tensor of each dtype of the demo model uses.
_FIELD_OF: dict[int, str] = {DT_INT64: "int64_val", DT_FLOAT: "float_val"}
_VALUE_OF: dict[int, st.SearchStrategy[Any]] = {DT_INT64: _INT64, DT_FLOAT: _FLOAT32}


@st.composite
def shapes(draw: st.DrawFn, out: tensor_pb2.TensorShapeProto) -> None:
    if draw(st.integers(0, 7)) == 0:
        out.unknown_rank = True
    if draw(st.integers(0, 9)) == 0:
        dims = [1] * draw(st.integers(33, 70))  # deeper than any tensor may be
    else:
        dims = draw(st.lists(_DIM, max_size=5))
    for size in dims:
        out.dim.add(size=size, name=draw(st.sampled_from(["", "batch"]) | _TEXT))


@st.composite
def random_tensors(draw: st.DrawFn) -> tensor_pb2.TensorProto:
    """Any TensorProto: dtype, shape and contents drawn independently."""
    t = tensor_pb2.TensorProto()
    t.dtype = draw(_DTYPES)
    draw(shapes(t.tensor_shape))
    if draw(st.booleans()):
        t.tensor_content = draw(st.binary(max_size=64))
    for name in draw(st.sets(st.sampled_from(sorted(_TYPED_VALUES)), max_size=2)):
        getattr(t, name).extend(draw(_TYPED_VALUES[name]))
    if draw(st.integers(0, 9)) == 0:
        t.float8_val = draw(st.binary(max_size=8))
    if draw(st.integers(0, 9)) == 0:
        t.version_number = draw(_INT32)
    return t


@st.composite
def fitting_tensors(draw: st.DrawFn, dtype: int, shape: tuple[int, ...]) -> tensor_pb2.TensorProto:
    """A tensor of the signature's dtype and shape, any bits, encoded as clients do, sometimes a little off."""
    t = tensor_pb2.TensorProto()
    t.dtype = dtype  # type: ignore[assignment]
    for size in shape:
        t.tensor_shape.dim.add(size=size)
    count = math.prod(shape)
    encoding = draw(st.sampled_from(["content", "content", "typed", "broadcast", "short", "long", "empty"]))
    if encoding == "content":
        size = count * NUMPY_DTYPE[dtype].itemsize
        t.tensor_content = draw(st.binary(min_size=size, max_size=size))
    else:
        n = {"typed": count, "broadcast": 1, "short": max(count - 1, 0), "long": count + 1, "empty": 0}[encoding]
        getattr(t, _FIELD_OF[dtype]).extend(draw(st.lists(_VALUE_OF[dtype], min_size=n, max_size=n)))
    return t


def _usually(draw: st.DrawFn, likely: Any, otherwise: st.SearchStrategy[Any], percent: int = 80) -> Any:
    """``likely`` in ``percent`` of the draws, else a draw from ``otherwise`` (which shrinks to ``likely``)."""
    return likely if draw(st.integers(0, 99)) < percent else draw(otherwise)


@st.composite
def model_specs(draw: st.DrawFn, out: Any, signature: str | None = None) -> None:
    out.name = _usually(draw, MODEL, st.sampled_from(["", "nope", "CTR"]) | _TEXT)
    choice = draw(st.sampled_from(["none", "none", "none", "version", "version", "label"]))
    if choice == "version":
        out.version.SetInParent()
        out.version.value = _usually(draw, SERVED_VERSION,
                                     st.sampled_from([1, 0, -1, 3, 2**63 - 1, -(2**63)]) | _INT64, 70)
    elif choice == "label":
        out.version_label = _usually(draw, LABEL, st.sampled_from(["", "canary"]) | _TEXT, 70)
    if signature is not None and draw(st.integers(0, 9)):
        out.signature_name = "" if signature == "serving_default" and draw(st.booleans()) else signature
    else:
        out.signature_name = draw(st.sampled_from(["", *SIGNATURES, "__saved_model_init_op", "nope"]) | _TEXT)


@st.composite
def predict_requests(draw: st.DrawFn) -> predict_pb2.PredictRequest:
    req = predict_pb2.PredictRequest()
    if draw(st.integers(0, 3)):
        # Shaped like a signature: passes the router's checks unless a mutation below breaks it.
        signature = draw(st.sampled_from(sorted(SIGNATURES)))
        draw(model_specs(req.model_spec, signature))
        rows = draw(st.integers(0, 4))
        for name, (dtype, tail) in SIGNATURES[signature].items():
            own_rows = _usually(draw, rows, st.integers(0, 5), 90)
            req.inputs[name].CopyFrom(draw(fitting_tensors(dtype, (own_rows, *tail))))
        mutation = _usually(draw, "none", st.sampled_from(["random", "drop", "extra", "dtype"]), 60)
        victim = draw(st.sampled_from(sorted(req.inputs)))
        if mutation == "random":
            req.inputs[victim].CopyFrom(draw(random_tensors()))
        elif mutation == "drop":
            del req.inputs[victim]
        elif mutation == "extra":
            req.inputs[draw(_TEXT)].CopyFrom(draw(random_tensors()))
        elif mutation == "dtype":
            req.inputs[victim].dtype = draw(_DTYPES)
    else:
        draw(model_specs(req.model_spec))
        names = st.sampled_from([*ID_INPUTS, "dense"]) | _TEXT
        for name in draw(st.lists(names, max_size=4, unique=True)):
            req.inputs[name].CopyFrom(draw(random_tensors()))
    req.output_filter.extend(_usually(draw, [], st.lists(st.sampled_from(OUTPUTS) | _TEXT, max_size=3), 70))
    return req


@st.composite
def metadata_requests(draw: st.DrawFn) -> metadata_pb2.GetModelMetadataRequest:
    req = metadata_pb2.GetModelMetadataRequest()
    draw(model_specs(req.model_spec))
    req.metadata_field.extend(_usually(draw, ["signature_def"], st.lists(st.sampled_from(["signature_def", ""])
                                                                         | _TEXT, max_size=3), 60))
    return req


@st.composite
def status_requests(draw: st.DrawFn) -> status_pb2.GetModelStatusRequest:
    req = status_pb2.GetModelStatusRequest()
    draw(model_specs(req.model_spec))
    return req


REQUESTS: dict[str, Callable[[], st.SearchStrategy[Any]]] = {
    PREDICT: predict_requests, METADATA: metadata_requests, STATUS: status_requests,
}


@st.composite
def malformed_bytes(draw: st.DrawFn, method: str) -> bytes:
    """Garbage, or a real serialized request cut short or with a byte overwritten."""
    kind = draw(st.sampled_from(["garbage", "truncated", "truncated", "corrupted"]))
    if kind == "garbage":
        garbage: bytes = draw(st.binary(min_size=1, max_size=64))
        return garbage
    raw: bytes = draw(REQUESTS[method]()).SerializeToString()
    if len(raw) < 2:
        return raw + b"\xff"
    if kind == "truncated":
        return raw[: draw(st.integers(1, len(raw) - 1))]
    at = draw(st.integers(0, len(raw) - 1))
    return raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1:]


FUZZ = settings(deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


# -- well-formed messages ---------------------------------------------------------------


def _assert_answered(router: RouterProcess, method: str, request: Any) -> None:
    code, details, response = _answer(_call(router, method), request)
    assert code in ANSWERS, f"{method} answered {code.name}: {details}\nfor {_shown(request)}"
    if code in CLIENT_ERRORS:
        assert details, f"{code.name} without a message for {_shown(request)}"
    if method == PREDICT and code == grpc.StatusCode.OK:
        assert response.outputs and response.model_spec.version.value == SERVED_VERSION, response


@settings(FUZZ, max_examples=400)
@given(request=predict_requests())
def test_predict_answers_ok_or_a_client_error(router: RouterProcess, request: predict_pb2.PredictRequest) -> None:
    _assert_answered(router, PREDICT, request)


@settings(FUZZ, max_examples=60)
@given(request=metadata_requests())
def test_metadata_answers_ok_or_a_client_error(router: RouterProcess,
                                               request: metadata_pb2.GetModelMetadataRequest) -> None:
    _assert_answered(router, METADATA, request)


@settings(FUZZ, max_examples=60)
@given(request=status_requests())
def test_status_answers_ok_or_a_client_error(router: RouterProcess,
                                             request: status_pb2.GetModelStatusRequest) -> None:
    _assert_answered(router, STATUS, request)


def _good_request(rows: int, seed: int = 0) -> predict_pb2.PredictRequest:
    rng = np.random.default_rng(seed)
    req = predict_pb2.PredictRequest()
    req.model_spec.name = MODEL
    for name in ID_INPUTS:
        fill(req.inputs[name], rng.integers(0, 1000, size=rows, dtype=np.int64))
    fill(req.inputs["dense"], rng.standard_normal((rows, DENSE_DIM)).astype(np.float32))
    return req


@settings(FUZZ, max_examples=30)
@given(requests=st.lists(predict_requests(), min_size=4, max_size=8))
def test_bad_requests_fail_alone_when_batched(router: RouterProcess, requests: list[predict_pb2.PredictRequest]) -> None:
    """Sent at once with good requests (so coalesced into the same batches): each bad one fails alone."""
    call = _call(router, PREDICT)
    sent = []
    for i, request in enumerate(requests):
        sent.append((False, request, call.future(request, timeout=TIMEOUT)))
        good = _good_request(1 + i % 3, seed=i)
        sent.append((True, good, call.future(good, timeout=TIMEOUT)))
    for is_good, request, future in sent:
        try:
            future.result()
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
        allowed = {grpc.StatusCode.OK} if is_good else ANSWERS
        assert code in allowed, f"{code.name}: {details}\nfor {_shown(request)}"


# -- malformed bytes --------------------------------------------------------------------


def _parses(method: str, raw: bytes) -> bool:
    try:
        REQUEST_TYPES[method].FromString(raw)
    except DecodeError:
        return False
    return True


def _assert_refused_clearly(method: str, raw: bytes, code: grpc.StatusCode, details: str) -> None:
    message = REQUEST_TYPES[method].DESCRIPTOR.name  # e.g. "PredictRequest"
    assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{method} answered {code.name}: {details}\nfor {_shown(raw)}"
    assert message in details, f"the message does not say which message failed to parse: {details!r}"


def _truncated_predict() -> bytes:
    req = predict_pb2.PredictRequest()
    req.model_spec.name = MODEL
    fill(req.inputs["user_id"], np.array([1, 2, 3], dtype=np.int64))
    whole: bytes = req.SerializeToString()
    return whole[:-5]


FIXED_MALFORMED = {
    "garbage": b"\xff\xff\xff\xff\xff",
    "truncated length-delimited field": b"\x0a\x05ab",
    "truncated varint": b"\x08\xff",
    "end-group tag": b"\x0c",
    "invalid utf-8 in a string field": b"\x0a\x04\x0a\x02\xff\xfe",
    "truncated predict request": _truncated_predict(),
}


@pytest.mark.parametrize("method", sorted(REQUEST_TYPES))
@pytest.mark.parametrize("case", sorted(FIXED_MALFORMED))
def test_malformed_bytes_are_invalid_argument(router: RouterProcess, method: str, case: str) -> None:
    raw = FIXED_MALFORMED[case]
    assert not _parses(method, raw), "the fixed case must really be malformed"
    code, details, _ = _answer(_call(router, method, raw=True), raw)
    _assert_refused_clearly(method, raw, code, details)


@pytest.mark.parametrize("method", sorted(REQUEST_TYPES))
def test_random_bytes_are_refused_or_answered(router: RouterProcess, method: str) -> None:
    call = _call(router, method, raw=True)

    @settings(FUZZ, max_examples=80)
    @given(raw=malformed_bytes(method))
    def run(raw: bytes) -> None:
        code, details, _ = _answer(call, raw)
        if _parses(method, raw):  # a cut at a field boundary is still a message
            assert code in ANSWERS, f"{method} answered {code.name}: {details}\nfor {_shown(raw)}"
        else:
            _assert_refused_clearly(method, raw, code, details)

    run()


# -- afterwards -------------------------------------------------------------------------


def test_router_and_worker_survive(router: RouterProcess, workers_at_start: list[int]) -> None:
    """Runs last in this file: the same processes, still serving."""
    assert router.proc.poll() is None, router.log()
    assert router.worker_pids() == workers_at_start, router.log()
    response = _call(router, PREDICT)(_good_request(4), timeout=TIMEOUT)
    assert response.model_spec.version.value == SERVED_VERSION
    probability = to_numpy(response.outputs["probability"])
    assert probability.shape == (4,) and np.all((probability >= 0) & (probability <= 1))
