"""shared.signature: request validation, and the per-layout plan cache in front of it."""

from __future__ import annotations

import numpy as np
import pytest

from protos import metadata_pb2, predict_pb2, types_pb2
from shared.errors import InvalidArgument
from shared import signature as sigmod
from shared.signature import Signature
from shared.tensor import from_numpy


def signature() -> Signature:
    sig = metadata_pb2.SignatureDef(method_name="tensorflow/serving/predict")
    for name, dtype, dims in (("ids", types_pb2.DT_INT64, (-1,)), ("dense", types_pb2.DT_FLOAT, (-1, 3))):
        info = sig.inputs[name]
        info.dtype = dtype
        for d in dims:
            info.tensor_shape.dim.add(size=d)
    out = sig.outputs["y"]
    out.dtype = types_pb2.DT_FLOAT
    out.tensor_shape.dim.add(size=-1)
    return Signature.from_def("serving_default", sig)


def request(rows: int, dense_cols: int = 3, reverse: bool = False) -> predict_pb2.PredictRequest:
    req = predict_pb2.PredictRequest()
    tensors = [("ids", np.arange(rows, dtype=np.int64)), ("dense", np.ones((rows, dense_cols), np.float32))]
    for name, value in reversed(tensors) if reverse else tensors:
        req.inputs[name].CopyFrom(from_numpy(value))
    return req


def test_plan_equals_validate_shapes() -> None:
    sig = signature()
    req = request(4)
    plan = sig.plan(req.inputs, [])
    assert (plan.names, plan.outputs, plan.shapes) == sig.validate_shapes(req.inputs, [])
    assert plan.names == ("dense", "ids") and plan.shapes == ((4, 3), (4,))
    shuffled = sig.plan(request(4, reverse=True).inputs, [])  # inputs listed in another order
    assert (shuffled.names, shuffled.shapes) == (plan.names, plan.shapes)


def test_a_repeated_layout_reuses_its_plan_and_a_new_one_gets_its_own() -> None:
    sig = signature()
    first = sig.plan(request(4).inputs, [])
    assert sig.plan(request(4).inputs, []) is first  # same names, dtypes, shapes: cached
    other = sig.plan(request(5).inputs, [])  # another batch size: another layout
    assert other is not first and other.shapes == ((5, 3), (5,))
    filtered = sig.plan(request(4).inputs, ["y"])
    assert filtered is not first and filtered.outputs == ("y",)


def test_a_bad_layout_is_refused_every_time_and_never_cached() -> None:
    sig = signature()
    bad = request(2, dense_cols=4)
    for _ in range(2):
        with pytest.raises(InvalidArgument, match="'dense' has shape \\[2,4\\]"):
            sig.plan(bad.inputs, [])
    assert not sig._plans


def test_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sigmod, "PLAN_CACHE_SIZE", 3)
    sig = signature()
    for rows in range(1, 10):
        assert sig.plan(request(rows).inputs, []).shapes[1] == (rows,)
        assert len(sig._plans) <= 3
