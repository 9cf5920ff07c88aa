"""The router as a TF Serving stand-in: official gRPC client and REST, against real workers."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import orjson
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    prediction_service_pb2_grpc,
)

from tests.support import TEST_VOCAB, RouterProcess, WorkerProcess, outputs_of, predict_request
from workers.demo_model import example_inputs


@pytest.fixture(scope="module")
def router(model_root: Path, strings_model: Path, logs_dir: Path) -> Iterator[RouterProcess]:
    config = {
        "models": [
            {"name": "ctr", "base_path": str(model_root / "ctr"), "version_policy": "all",
             "version_labels": {"stable": 1, "canary": 2}},
            {"name": "strings", "base_path": str(strings_model)},
        ],
        "workers": {"count": 2},
    }
    r = RouterProcess(config, log_dir=logs_dir)
    r.wait_ready()
    yield r
    assert r.terminate() == 0, r.log()


@pytest.fixture(scope="module")
def direct(model_root: Path, logs_dir: Path) -> Iterator[WorkerProcess]:
    w = WorkerProcess("--model", f"ctr={model_root / 'ctr'}", "--version-policy", "all", log_dir=logs_dir)
    w.wait_serving()
    yield w
    w.terminate()


def inputs(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    return example_inputs(batch, seed=seed, vocab=TEST_VOCAB)


@pytest.mark.parametrize("spec", [{}, {"version": 1}, {"version": 2}, {"version_label": "stable"},
                                  {"signature_name": "serving_default"}])
def test_grpc_predict_equals_worker(router: RouterProcess, direct: WorkerProcess, spec: dict[str, Any]) -> None:
    via_router = prediction_service_pb2_grpc.PredictionServiceStub(router.channel)
    via_worker = prediction_service_pb2_grpc.PredictionServiceStub(direct.channel)
    x = inputs(16, seed=3)
    a = via_router.Predict(predict_request("ctr", x, **spec), timeout=30)
    # The direct worker has no labels configured; "stable" is version 1.
    direct_spec = {"version": 1} if spec.get("version_label") == "stable" else spec
    b = via_worker.Predict(predict_request("ctr", x, **direct_spec), timeout=30)
    assert a.model_spec.version.value == b.model_spec.version.value
    assert a.model_spec.signature_name == "serving_default"
    got, want = outputs_of(a), outputs_of(b)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6)


def test_grpc_named_signature(router: RouterProcess, direct: WorkerProcess) -> None:
    ids = {"user_id": np.array([1, 2, 3], dtype=np.int64)}
    a = prediction_service_pb2_grpc.PredictionServiceStub(router.channel).Predict(
        predict_request("ctr", ids, signature_name="user_embedding"))
    b = prediction_service_pb2_grpc.PredictionServiceStub(direct.channel).Predict(
        predict_request("ctr", ids, signature_name="user_embedding"))
    np.testing.assert_allclose(outputs_of(a)["embedding"], outputs_of(b)["embedding"])


def test_grpc_metadata_and_status_equal_worker(router: RouterProcess, direct: WorkerProcess) -> None:
    req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    req.model_spec.name = "ctr"
    a = prediction_service_pb2_grpc.PredictionServiceStub(router.channel).GetModelMetadata(req)
    b = prediction_service_pb2_grpc.PredictionServiceStub(direct.channel).GetModelMetadata(req)
    sa, sb = get_model_metadata_pb2.SignatureDefMap(), get_model_metadata_pb2.SignatureDefMap()
    assert a.metadata["signature_def"].Unpack(sa) and b.metadata["signature_def"].Unpack(sb)
    assert sa == sb and a.model_spec == b.model_spec
    sreq = get_model_status_pb2.GetModelStatusRequest()
    sreq.model_spec.name = "ctr"
    ra = model_service_pb2_grpc.ModelServiceStub(router.channel).GetModelStatus(sreq)
    rb = model_service_pb2_grpc.ModelServiceStub(direct.channel).GetModelStatus(sreq)
    assert ra == rb


@pytest.mark.parametrize("mutate,code", [
    (lambda r: setattr(r.model_spec, "name", "nope"), grpc.StatusCode.NOT_FOUND),
    (lambda r: r.model_spec.version.__setattr__("value", 7), grpc.StatusCode.NOT_FOUND),
    (lambda r: setattr(r.model_spec, "signature_name", "nope"), grpc.StatusCode.FAILED_PRECONDITION),
    (lambda r: r.inputs.pop("dense"), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda r: r.inputs["item_id"].CopyFrom(tf.make_tensor_proto([0.5])), grpc.StatusCode.INVALID_ARGUMENT),
])
def test_grpc_errors_have_tf_serving_codes(router: RouterProcess, mutate: Any, code: grpc.StatusCode) -> None:
    req = predict_request("ctr", inputs(1))
    mutate(req)
    with pytest.raises(grpc.RpcError) as err:
        prediction_service_pb2_grpc.PredictionServiceStub(router.channel).Predict(req, timeout=30)
    assert err.value.code() == code


# -- REST --------------------------------------------------------------------------


def rows(x: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    return [{k: v[i].tolist() for k, v in x.items()} for i in range(len(x["user_id"]))]


def test_rest_row_and_columnar_formats(router: RouterProcess, direct: WorkerProcess) -> None:
    x = inputs(5, seed=9)
    want = outputs_of(prediction_service_pb2_grpc.PredictionServiceStub(direct.channel).Predict(
        predict_request("ctr", x, version=2)))
    status, body, headers = router.post("/v1/models/ctr:predict", {"instances": rows(x)})
    assert status == 200, body
    assert headers["x-model-version"] == "2"
    preds = orjson.loads(body)["predictions"]
    np.testing.assert_allclose([p["probability"] for p in preds], want["probability"], rtol=1e-6)
    np.testing.assert_allclose([p["logit"] for p in preds], want["logit"], rtol=1e-6)
    status, body, _ = router.post("/v1/models/ctr:predict",
                                  {"inputs": {k: v.tolist() for k, v in x.items()}})
    assert status == 200, body
    out = orjson.loads(body)["outputs"]
    np.testing.assert_allclose(out["probability"], want["probability"], rtol=1e-6)


def test_rest_version_and_label_urls(router: RouterProcess) -> None:
    x = {"instances": rows(inputs(2))}
    for path, version in [("/v1/models/ctr/versions/1:predict", "1"),
                          ("/v1/models/ctr/labels/canary:predict", "2"),
                          ("/v1/models/ctr/labels/stable:predict", "1")]:
        status, body, headers = router.post(path, x)
        assert status == 200, body
        assert headers["x-model-version"] == version


def test_rest_signature_name_and_filter(router: RouterProcess) -> None:
    status, body, _ = router.post("/v1/models/ctr:predict",
                                  {"signature_name": "user_embedding", "instances": [1, 2]})
    assert status == 200, body
    preds = orjson.loads(body)["predictions"]
    assert len(preds) == 2 and len(preds[0]) == 16


def test_rest_b64_strings(router: RouterProcess) -> None:
    status, body, _ = router.post("/v1/models/strings:predict", {
        "instances": [{"b64": base64.b64encode(b"abc").decode()}, "hello"]})
    assert status == 200, body
    preds = orjson.loads(body)["predictions"]
    assert [p["length"] for p in preds] == [3, 5]
    assert [base64.b64decode(p["upper_bytes"]["b64"]) for p in preds] == [b"ABC", b"HELLO"]


def test_rest_status_and_metadata(router: RouterProcess, direct: WorkerProcess) -> None:
    status, body, _ = router.get("/v1/models/ctr")
    assert status == 200
    assert orjson.loads(body) == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}},
        {"version": "2", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}},
    ]}
    status, body, _ = router.get("/v1/models/ctr/versions/1")
    assert status == 200 and [s["version"] for s in orjson.loads(body)["model_version_status"]] == ["1"]
    status, body, _ = router.get("/v1/models/ctr/metadata")
    assert status == 200
    meta = orjson.loads(body)
    assert meta["model_spec"] == {"name": "ctr", "signature_name": "", "version": "2"}
    sig = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sig["inputs"]["dense"]["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in sig["inputs"]["dense"]["tensor_shape"]["dim"]] == ["-1", "20"]
    status, body, _ = router.get("/v1/models/ctr/labels/canary/metadata")
    assert status == 200 and orjson.loads(body)["model_spec"]["version"] == "2"


def test_rest_lists_every_model(router: RouterProcess) -> None:
    """GET /v1/models (TF Serving answers it as malformed: tensorflow/serving#795)."""
    ok = {"error_code": "OK", "error_message": ""}
    for path in ("/v1/models", "/v1/models/"):
        status, body, _ = router.get(path)
        assert status == 200, body
        models = orjson.loads(body)["models"]
        assert [m["name"] for m in models] == ["ctr", "strings"]
        ctr = models[0]
        assert ctr["model_version_status"] == [{"version": "1", "state": "AVAILABLE", "status": ok},
                                               {"version": "2", "state": "AVAILABLE", "status": ok}]
        assert ctr["default_version"] == "2" and ctr["labels"] == {"canary": "2", "stable": "1"}
        # each entry is what the model's own status answers
        assert {"model_version_status": models[1]["model_version_status"]} == orjson.loads(
            router.get("/v1/models/strings")[1])


REST_ERRORS = [
    ("unknown model", "/v1/models/nope:predict", {"instances": [1]}, 404),
    ("unknown version", "/v1/models/ctr/versions/9:predict", {"instances": [1]}, 404),
    ("unknown label", "/v1/models/ctr/labels/zz:predict", {"instances": [1]}, 400),
    ("unknown signature", "/v1/models/ctr:predict", {"signature_name": "zz", "instances": [1]}, 400),
    ("missing input", "/v1/models/ctr:predict", {"inputs": {"user_id": [1]}}, 400),
    ("wrong dtype", "/v1/models/ctr:predict", {"signature_name": "user_embedding", "instances": ["x"]}, 400),
    ("malformed JSON", "/v1/models/ctr:predict", b'{"instances": [', 400),
    ("both keys", "/v1/models/ctr:predict", {"instances": [1], "inputs": [1]}, 400),
    ("neither key", "/v1/models/ctr:predict", {"signature_name": "user_embedding"}, 400),
    ("unknown model status", None, None, 404),
]


@pytest.mark.parametrize("case", [c[0] for c in REST_ERRORS])
def test_rest_errors(router: RouterProcess, case: str) -> None:
    _, path, body, code = next(c for c in REST_ERRORS if c[0] == case)
    if path is None:
        status, raw, _ = router.get("/v1/models/nope")
    else:
        status, raw, _ = router.post(path, body)
    assert status == code, raw
    error = orjson.loads(raw)
    assert set(error) == {"error"} and error["error"]


def test_health_ready_and_metrics(router: RouterProcess) -> None:
    assert router.get("/healthz")[0] == 200
    assert router.get("/readyz")[0] == 200
    router.post("/v1/models/ctr:predict", {"instances": rows(inputs(1))})
    for path in ("/metrics", "/monitoring/prometheus/metrics"):
        status, body, _ = router.get(path)
        text = body.decode()
        assert status == 200
        assert ':tensorflow:serving:request_count{model_name="ctr",status="OK"}' in text
        assert "tfs_router_requests_total" in text
        assert 'tfs_router_worker_state{state="ready",worker="w0"} 1.0' in text


def test_router_never_imports_tensorflow_and_stays_small(router: RouterProcess) -> None:
    maps = Path(f"/proc/{router.proc.pid}/maps").read_text()
    assert "tensorflow" not in maps
    stub = prediction_service_pb2_grpc.PredictionServiceStub(router.channel)
    req = predict_request("ctr", inputs(8))
    for _ in range(200):
        stub.Predict(req, timeout=30)
    rss_kb = int(next(line for line in Path(f"/proc/{router.proc.pid}/status").read_text().splitlines()
                      if line.startswith("VmRSS")).split()[1])
    assert rss_kb < 150 * 1024, f"router RSS {rss_kb} kB"
