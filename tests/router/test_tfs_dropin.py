"""tfs-router as a drop-in for a ``tensorflow_model_server`` command line, end to end.

One router started by the ``tensorflow_model_server`` console script with TF
Serving's own flags and files (models.config naming two models, a batching
parameters file, a monitoring config): both models answer the official gRPC
client and REST, the file's batching settings are in force (seen through the
router's batch metrics), and the model list is re-read while serving.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import orjson
import pytest
from tensorflow_serving.apis import prediction_service_pb2_grpc

from tests.support import TEST_VOCAB, RouterProcess, SteadyLoad, outputs_of, predict_request
from workers.demo_model import example_inputs

MAX_BATCH = 4

MODELS_CONFIG = """\
model_config_list {{
  config {{
    name: 'ctr'
    base_path: '{ctr}'
    model_platform: 'tensorflow'
    model_version_policy {{
      specific {{
        versions: 1
        versions: 2
      }}
    }}
    version_labels {{
      key: 'stable'
      value: 1
    }}
    version_labels {{
      key: 'canary'
      value: 2
    }}
  }}
  config {{
    name: 'checked'
    base_path: '{checked}'
    model_platform: 'tensorflow'
  }}
}}
"""

BATCHING = f"""\
max_batch_size {{ value: {MAX_BATCH} }}
batch_timeout_micros {{ value: 2000 }}
max_enqueued_batches {{ value: 64 }}
num_batch_threads {{ value: 1 }}
allowed_batch_sizes: 2
allowed_batch_sizes: {MAX_BATCH}
"""

MONITORING = """\
prometheus_config {
  enable: true,
  path: "/monitoring/prometheus/metrics"
}
"""


def wait_until_idle(router: RouterProcess, timeout: float = 120.0) -> None:
    """Until no rollout runs and every worker is back in rotation."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = router.status()
        if status["rollout"] is None and all(w["in_rotation"] for w in status["workers"]):
            return
        time.sleep(0.1)
    raise AssertionError(f"still busy: {router.status()}")


def metric(router: RouterProcess, name: str, path: str = "/metrics", **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    status, body, _ = router.get(path)
    assert status == 200
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith((name + "{", name + " ")):
            head, value = line.rsplit(" ", 1)
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
    return total


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory, model_root: Path, checked_model: Path) -> Path:
    root = tmp_path_factory.mktemp("dropin")
    (root / "models.config").write_text(MODELS_CONFIG.format(ctr=model_root / "ctr", checked=checked_model))
    (root / "batching.config").write_text(BATCHING)
    (root / "monitoring.config").write_text(MONITORING)
    return root


@pytest.fixture(scope="module")
def router(config_dir: Path, logs_dir: Path) -> Iterator[RouterProcess]:
    script = Path(sys.executable).parent / "tensorflow_model_server"
    assert script.exists(), "the console script is missing: pip install -e . --no-deps"
    r = RouterProcess.command([
        str(script), "--port=0", "--rest_api_port=0",
        f"--model_config_file={config_dir / 'models.config'}", "--model_config_file_poll_wait_seconds=1",
        "--enable_batching", f"--batching_parameters_file={config_dir / 'batching.config'}",
        f"--monitoring_config_file={config_dir / 'monitoring.config'}",
        # tfs-router's own: one worker (a small machine), an admin port that cannot clash
        "--workers=1", "--admin_port=0",
    ], log_dir=logs_dir)
    try:
        r.wait_ready()
    except BaseException:
        r.terminate()
        raise
    yield r
    assert r.terminate() == 0, r.log()


def test_both_models_answer_the_official_grpc_client(router: RouterProcess) -> None:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(router.channel)
    x = example_inputs(3, vocab=TEST_VOCAB)
    latest = stub.Predict(predict_request("ctr", x), timeout=60)
    assert latest.model_spec.version.value == 2  # specific {1, 2}: unversioned requests get the newest
    assert outputs_of(latest)["probability"].shape[0] == 3
    for label, version in (("stable", 1), ("canary", 2)):
        resp = stub.Predict(predict_request("ctr", x, version_label=label), timeout=60)
        assert resp.model_spec.version.value == version
    v1 = stub.Predict(predict_request("ctr", x, version=1), timeout=60)
    assert v1.model_spec.version.value == 1
    x4 = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(outputs_of(stub.Predict(predict_request("checked", {"x": x4}), timeout=60))["y"],
                                  x4 * 2)


def test_both_models_answer_rest(router: RouterProcess) -> None:
    x = example_inputs(2, vocab=TEST_VOCAB)
    instances = [{k: v[i].tolist() for k, v in x.items()} for i in range(2)]
    for path, version in (("/v1/models/ctr:predict", "2"), ("/v1/models/ctr/labels/stable:predict", "1"),
                          ("/v1/models/ctr/versions/1:predict", "1")):
        status, body, headers = router.post(path, {"instances": instances})
        assert status == 200, body
        assert len(orjson.loads(body)["predictions"]) == 2
        assert headers["x-model-version"] == version
    status, body, _ = router.post("/v1/models/checked:predict", {"instances": [{"x": [1, 2, 3, 4]}]})
    assert status == 200, body
    assert orjson.loads(body)["predictions"] == [[2.0, 4.0, 6.0, 8.0]]
    for name, versions in (("ctr", {"1", "2"}), ("checked", {"1"})):
        status, body, _ = router.get(f"/v1/models/{name}")
        assert status == 200, body
        states = {s["version"]: s["state"] for s in orjson.loads(body)["model_version_status"]}
        assert states == dict.fromkeys(versions, "AVAILABLE")


def test_the_batching_file_is_in_force(router: RouterProcess) -> None:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(router.channel)
    model = "checked"
    before = {key: metric(router, f"tfs_router_batch_size_rows_{key}", model=model) for key in ("count", "sum")}
    at_most_max = metric(router, "tfs_router_batch_size_rows_bucket", model=model, le=f"{MAX_BATCH}.0")
    single = metric(router, "tfs_router_batch_size_rows_bucket", model=model, le="1.0")
    barrier = threading.Barrier(16)

    def call(i: int) -> None:
        if i < 16:
            barrier.wait(30)
        x = np.full((1, 4), float(i), np.float32)
        y = outputs_of(stub.Predict(predict_request(model, {"x": x}), timeout=60))["y"]
        np.testing.assert_array_equal(y, x * 2)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(call, range(320)))
    batches = metric(router, "tfs_router_batch_size_rows_count", model=model) - before["count"]
    rows = metric(router, "tfs_router_batch_size_rows_sum", model=model) - before["sum"]
    assert rows == 320
    # max_batch_size 4: no batch was larger, though 16 clients kept the queue full ...
    assert metric(router, "tfs_router_batch_size_rows_bucket", model=model, le=f"{MAX_BATCH}.0") - at_most_max \
        == batches
    # ... and requests were coalesced (batching is on: without --enable_batching every batch is one row)
    assert metric(router, "tfs_router_batch_size_rows_bucket", model=model, le="1.0") - single < batches
    assert batches < rows

    # allowed_batch_sizes 2, 4: a lone 3-row request is padded to 4
    padding = metric(router, "tfs_router_batch_padding_rows_total", model=model)
    x3 = np.ones((3, 4), np.float32)
    np.testing.assert_array_equal(outputs_of(stub.Predict(predict_request(model, {"x": x3}), timeout=60))["y"],
                                  x3 * 2)
    assert metric(router, "tfs_router_batch_padding_rows_total", model=model) - padding == 1


def test_metrics_at_the_monitoring_config_path(router: RouterProcess) -> None:
    assert metric(router, ":tensorflow:serving:request_count", path="/monitoring/prometheus/metrics",
                  model_name="ctr", status="OK") >= 1


def test_the_model_config_file_is_reread_while_serving(router: RouterProcess, config_dir: Path,
                                                       model_root: Path, checked_model: Path) -> None:
    path = config_dir / "models.config"
    x = example_inputs(1, vocab=TEST_VOCAB)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(router.channel)
    # Under load on "ctr" (its one worker is drained and reloaded for each change, staged):
    # "checked" leaves, "ctr2" (the ctr model under another name) arrives.
    with SteadyLoad(router.channel, predict_request("ctr", x), clients=2) as load:
        load.wait(0.3)
        path.write_text(path.read_text().replace(f"name: 'checked'\n    base_path: '{checked_model}'",
                                                 f"name: 'ctr2'\n    base_path: '{model_root / 'ctr'}'"))
        assert "ctr2" in path.read_text()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status, _, _ = router.get("/v1/models/ctr2")
            gone, _, _ = router.get("/v1/models/checked")
            if status == 200 and gone == 404:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"models.config was not re-read: ctr2 {status}, checked {gone}\n{router.log()}")
        deadline = time.monotonic() + 120
        while True:
            status, body, _ = router.post("/v1/models/ctr2:predict",
                                          {"instances": [{k: v[0].tolist() for k, v in x.items()}]})
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert status == 200, body
        with pytest.raises(grpc.RpcError) as removed:
            stub.Predict(predict_request("checked", {"x": np.ones((1, 4), np.float32)}), timeout=30)
        assert removed.value.code() == grpc.StatusCode.NOT_FOUND
        wait_until_idle(router)  # the retired model is unloaded from the worker, still under load
        load.wait(0.3)
    assert not load.failures, load.failures[:5]
    assert len(load.served) > 10
    for w in router.status()["workers"]:  # what each worker process itself holds
        with grpc.insecure_channel(w["address"]) as channel:
            held = orjson.loads(channel.unary_unary("/tfsrouter.Worker/Stats")(b"", timeout=10))["executors"]
        assert "checked" not in held and "ctr2" in held, held
    # a broken file is logged and the last good list kept
    path.write_text("model_config_list {\n  config { nme: 'x' }\n}\n")
    time.sleep(2.5)
    status, _, _ = router.get("/v1/models/ctr2")
    assert status == 200
    assert f"{path}:2:12:" in router.log()
