"""A real worker process called with the official tensorflow-serving-api client."""

from __future__ import annotations

import random
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from tests.support import TEST_VOCAB, WorkerProcess, outputs_of, predict_request
from workers.demo_model import example_inputs


@pytest.fixture(scope="module")
def worker(model_root: Path, logs_dir: Path) -> Iterator[WorkerProcess]:
    w = WorkerProcess("--model", f"ctr={model_root / 'ctr'}", "--model", f"tf1={model_root / 'tf1'}",
                      "--version-policy", "all", log_dir=logs_dir)
    w.wait_serving()
    yield w
    assert w.terminate() == 0, w.log()


@pytest.fixture(scope="module")
def stub(worker: WorkerProcess) -> prediction_service_pb2_grpc.PredictionServiceStub:
    return prediction_service_pb2_grpc.PredictionServiceStub(worker.channel)


@pytest.fixture(scope="module")
def in_process(model_root: Path) -> dict[int, Any]:
    return {v: tf.saved_model.load(str(model_root / "ctr" / str(v))) for v in (1, 2)}


def inputs(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    return example_inputs(batch, seed=seed, vocab=TEST_VOCAB)


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("version", [None, 1, 2])
def test_predict_equals_in_process_call(stub: Any, in_process: dict[int, Any], batch: int,
                                        version: int | None) -> None:
    x = inputs(batch, seed=batch)
    spec = {} if version is None else {"version": version}
    resp = stub.Predict(predict_request("ctr", x, **spec), timeout=30)
    served = version or 2  # latest
    assert resp.model_spec.name == "ctr" and resp.model_spec.version.value == served
    assert resp.model_spec.signature_name == "serving_default"
    expected = in_process[served].signatures["serving_default"](**{k: tf.constant(v) for k, v in x.items()})
    got = outputs_of(resp)
    assert sorted(got) == ["logit", "probability"]
    for name in got:
        np.testing.assert_allclose(got[name], expected[name].numpy(), rtol=1e-5, atol=1e-6)


def test_versions_answer_differently(stub: Any) -> None:
    x = inputs(8)
    p1 = outputs_of(stub.Predict(predict_request("ctr", x, version=1)))["probability"]
    p2 = outputs_of(stub.Predict(predict_request("ctr", x, version=2)))["probability"]
    assert np.all(np.abs(p1 - p2) > 1e-3)


def test_named_signature_and_output_filter(stub: Any, in_process: dict[int, Any]) -> None:
    ids = np.array([3, 5, 7], dtype=np.int64)
    resp = stub.Predict(predict_request("ctr", {"user_id": ids}, signature_name="user_embedding"))
    expected = in_process[2].signatures["user_embedding"](user_id=tf.constant(ids))["embedding"]
    np.testing.assert_allclose(outputs_of(resp)["embedding"], expected.numpy(), rtol=1e-6)
    resp = stub.Predict(predict_request("ctr", inputs(2), output_filter=["logit"]))
    assert list(resp.outputs) == ["logit"]


def test_tf1_style_saved_model(stub: Any, model_root: Path) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    resp = stub.Predict(predict_request("tf1", {"x": x}))
    loaded = tf.saved_model.load(str(model_root / "tf1" / "1"))
    expected = loaded.signatures["serving_default"](x=tf.constant(x))["y"].numpy()
    np.testing.assert_allclose(outputs_of(resp)["y"], expected, rtol=1e-6)


def test_metadata_unpacks_with_official_classes(stub: Any) -> None:
    req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    req.model_spec.name = "ctr"
    resp = stub.GetModelMetadata(req)
    assert resp.model_spec.version.value == 2
    sigmap = get_model_metadata_pb2.SignatureDefMap()
    assert resp.metadata["signature_def"].Unpack(sigmap)
    sig = sigmap.signature_def["serving_default"]
    assert sorted(sig.inputs) == ["category", "city", "dense", "device", "item_id", "user_id"]
    assert sig.inputs["dense"].dtype == tf.float32.as_datatype_enum
    assert [d.size for d in sig.inputs["dense"].tensor_shape.dim] == [-1, 20]
    assert sig.method_name == "tensorflow/serving/predict"
    bad = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["nope"])
    bad.model_spec.name = "ctr"
    with pytest.raises(grpc.RpcError) as err:
        stub.GetModelMetadata(bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_model_status_reports_available(worker: WorkerProcess) -> None:
    ms = model_service_pb2_grpc.ModelServiceStub(worker.channel)
    req = get_model_status_pb2.GetModelStatusRequest()
    req.model_spec.name = "ctr"
    resp = ms.GetModelStatus(req)
    assert [(s.version, s.state) for s in resp.model_version_status] == [
        (1, get_model_status_pb2.ModelVersionStatus.AVAILABLE),
        (2, get_model_status_pb2.ModelVersionStatus.AVAILABLE),
    ]
    req.model_spec.name = "nope"
    with pytest.raises(grpc.RpcError) as err:
        ms.GetModelStatus(req)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def _with(req: Any, mutate: Any) -> Any:
    mutate(req)
    return req


ERRORS = {
    "unknown model": (lambda r: setattr(r.model_spec, "name", "nope"), grpc.StatusCode.NOT_FOUND, "nope"),
    "unknown version": (lambda r: r.model_spec.version.__setattr__("value", 9), grpc.StatusCode.NOT_FOUND, "9"),
    "unknown label": (lambda r: setattr(r.model_spec, "version_label", "zz"), grpc.StatusCode.INVALID_ARGUMENT, "zz"),
    "unknown signature": (lambda r: setattr(r.model_spec, "signature_name", "zz"),
                          grpc.StatusCode.FAILED_PRECONDITION, "zz"),
    "missing input": (lambda r: r.inputs.pop("city"), grpc.StatusCode.INVALID_ARGUMENT, "Missing but required: {city}"),
    "extra input": (lambda r: r.inputs["zzz"].CopyFrom(tf.make_tensor_proto([1])),
                    grpc.StatusCode.INVALID_ARGUMENT, "Sent extra: {zzz}"),
    "wrong dtype": (lambda r: r.inputs["user_id"].CopyFrom(tf.make_tensor_proto([1.5], dtype=tf.float32)),
                    grpc.StatusCode.INVALID_ARGUMENT, "'user_id' expects dtype int64 but float"),
    "wrong shape": (lambda r: r.inputs["dense"].CopyFrom(tf.make_tensor_proto(np.zeros((1, 3), np.float32))),
                    grpc.StatusCode.INVALID_ARGUMENT, "'dense' has shape"),
    "bad output filter": (lambda r: r.output_filter.append("zz"), grpc.StatusCode.INVALID_ARGUMENT,
                          "output tensor alias not found"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_requests_get_tf_serving_codes(stub: Any, case: str) -> None:
    mutate, code, needle = ERRORS[case]
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(_with(predict_request("ctr", inputs(1)), mutate))
    assert err.value.code() == code
    assert needle in err.value.details()
    stub.Predict(predict_request("ctr", inputs(1)))  # still serving


def _raw_tensor(dtype: int, dims: list[int], **fields: Any) -> Any:
    t = tf.make_tensor_proto(0).__class__(dtype=dtype, **fields)
    for d in dims:
        t.tensor_shape.dim.add(size=d)
    return t


MALFORMED = {
    "unknown dtype": _raw_tensor(999, [1], int64_val=[1]),
    "negative dim": _raw_tensor(9, [-3], int64_val=[1]),
    "overflowing dims": _raw_tensor(9, [1 << 40, 1 << 40], int64_val=[1]),
    "content length mismatch": _raw_tensor(9, [2], tensor_content=b"\0" * 9),
    "typed count mismatch": _raw_tensor(9, [3], int64_val=[1, 2]),
    "unknown rank": _raw_tensor(9, [], int64_val=[1]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_tensor_is_invalid_argument(stub: Any, case: str) -> None:
    req = predict_request("ctr", inputs(1))
    tensor = MALFORMED[case]
    if case == "unknown rank":
        tensor.tensor_shape.unknown_rank = True
    req.inputs["user_id"].CopyFrom(tensor)
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    stub.Predict(predict_request("ctr", inputs(1)))


def test_unimplemented_apis(worker: WorkerProcess) -> None:
    call = worker.channel.unary_unary("/tensorflow.serving.PredictionService/Classify")
    with pytest.raises(grpc.RpcError) as err:
        call(b"")
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_input_order_never_creates_executors(stub: Any, worker: WorkerProcess) -> None:
    """1,000 requests with the inputs map in random orders: one executor (seed 001)."""
    x = inputs(2)
    rng = random.Random(1)
    names = list(x)
    before = worker.stats()["executors"]["ctr"]["1"]
    for _ in range(1000):
        rng.shuffle(names)
        req = predict_pb2.PredictRequest()
        req.model_spec.name = "ctr"
        req.model_spec.version.value = 1
        for n in names:  # insertion order of the map follows the shuffle
            req.inputs[n].CopyFrom(tf.make_tensor_proto(x[n]))
        stub.Predict(req)
    assert worker.stats()["executors"]["ctr"]["1"] == before == 1


def test_sigterm_stops_cleanly(model_root: Path, logs_dir: Path) -> None:
    w = WorkerProcess("--model", f"ctr={model_root / 'ctr'}", log_dir=logs_dir)
    w.wait_serving()
    w.proc.send_signal(signal.SIGTERM)
    assert w.proc.wait(30) == 0, w.log()
    assert "shutting down" in w.log()
    w.terminate()
