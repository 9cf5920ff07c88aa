"""Request logs in TF Serving's format (router/reqlog.py): real routers, read back with TensorFlow."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tensorflow_serving.apis import prediction_service_pb2_grpc

from tests.support import TEST_VOCAB, RouterProcess, SteadyLoad, outputs_of, predict_request
from workers.demo_model import example_inputs


def start(model_root: Path, logs_dir: Path, logging: dict[str, Any], processes: int = 1,
          env: dict[str, str] | None = None) -> RouterProcess:
    router = RouterProcess({"models": [{"name": "ctr", "base_path": str(model_root / "ctr"), "logging": logging}],
                            "workers": {"count": 1}, "dataplane": {"processes": processes}}, log_dir=logs_dir,
                           env=env)
    router.wait_ready()
    return router


def read_logs(prefix: Path) -> list[Any]:
    """Every record under ``prefix``, read the way a TF user would: TFRecordDataset + the official proto."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    files = sorted(str(p) for p in prefix.parent.glob(f"{prefix.name}.*.tfrecord"))
    if not files:
        return []
    return [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(files)]


def metric(router: RouterProcess, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    body = router.get("/monitoring/prometheus/metrics")[1].decode()
    return sum(s.value for family in text_string_to_metric_families(body) for s in family.samples
               if s.name == name and all(s.labels.get(k) == x for k, x in labels.items()))


@pytest.mark.parametrize("processes", [1, 2], ids=["one-process", "two-dataplanes"])
def test_logged_records_are_the_requests_and_responses(processes: int, model_root: Path, tmp_path: Path,
                                                       logs_dir: Path) -> None:
    import tensorflow as tf

    prefix = tmp_path / "logs" / "ctr"
    router = start(model_root, logs_dir, {"sampling_rate": 1.0, "filename_prefix": str(prefix)}, processes)
    sent: list[tuple[Any, Any]] = []
    try:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(router.channel)
        for i in range(12):
            request = predict_request("ctr", example_inputs(1 + i % 3, vocab=TEST_VOCAB, seed=i))
            sent.append((request, stub.Predict(request, timeout=30)))
        row = {k: v[0].tolist() for k, v in example_inputs(1, vocab=TEST_VOCAB, seed=99).items()}
        for _ in range(3):
            assert router.post("/v1/models/ctr:predict", {"instances": [row]})[0] == 200
    finally:
        assert router.terminate() == 0, router.log()  # the queue is written before it exits
    records = read_logs(prefix)
    assert len(records) == 15
    by_inputs = {r.predict_log.request.SerializeToString(deterministic=True): r for r in records}
    for request, response in sent:
        key = request.__class__()
        key.CopyFrom(request)
        key.model_spec.version.value = response.model_spec.version.value  # logged: the version that answered
        key.model_spec.signature_name = "serving_default"
        record = by_inputs.get(key.SerializeToString(deterministic=True))
        assert record is not None, "a request is missing from the log, or differs from what was sent"
        assert record.log_metadata.model_spec.name == "ctr"
        assert record.log_metadata.model_spec.version.value == response.model_spec.version.value
        assert record.log_metadata.sampling_config.sampling_rate == 1.0
        for name, tensor in response.outputs.items():
            np.testing.assert_array_equal(tf.make_ndarray(record.predict_log.response.outputs[name]),
                                          tf.make_ndarray(tensor))
    rest = [r for r in records if tf.make_ndarray(r.predict_log.request.inputs["user_id"]).tolist() == [row["user_id"]]]
    assert len(rest) == 3  # REST requests are logged as the PredictRequest they became


def test_the_sampling_rate_holds(model_root: Path, tmp_path: Path, logs_dir: Path) -> None:
    prefix = tmp_path / "logs" / "ctr"
    router = start(model_root, logs_dir, {"sampling_rate": 0.25, "filename_prefix": str(prefix)})
    n = 400
    try:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(router.channel)
        request = predict_request("ctr", example_inputs(1, vocab=TEST_VOCAB))
        for _ in range(n):
            stub.Predict(request, timeout=30)
    finally:
        assert router.terminate() == 0, router.log()
    logged = len(read_logs(prefix))
    mean, sd = n * 0.25, (n * 0.25 * 0.75) ** 0.5
    assert abs(logged - mean) < 5 * sd, (logged, mean)  # a binomial draw: wrong by 5 sd once in ~3.5 million


def test_a_stalled_writer_drops_records_and_fails_no_request(model_root: Path, tmp_path: Path,
                                                             logs_dir: Path) -> None:
    prefix = tmp_path / "logs" / "ctr"
    router = start(model_root, logs_dir, {"sampling_rate": 1.0, "filename_prefix": str(prefix), "max_queued": 4},
                   env={"TFS_ROUTER_TEST_LOG_STALL": "0.2"})  # a disk that takes 0.2 s a record
    try:
        with SteadyLoad(router.channel, predict_request("ctr", example_inputs(1, vocab=TEST_VOCAB)),
                        clients=2) as load:
            load.wait(2.0)
        assert load.served and not load.failures, load.failures[:5]
        dropped = metric(router, "tfs_router_request_log_dropped_total", model="ctr", reason="queue_full")
        written = metric(router, "tfs_router_request_log_records_total", model="ctr")
        assert dropped > 0 and written < len(load.served), (dropped, written, len(load.served))
        assert dropped + written <= len(load.served)
    finally:
        assert router.terminate() == 0, router.log()


def test_a_log_that_cannot_be_written_fails_no_request(model_root: Path, tmp_path: Path, logs_dir: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the log directory should be")
    router = start(model_root, logs_dir, {"sampling_rate": 1.0, "filename_prefix": str(blocker / "ctr")})
    try:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(router.channel)
        request = predict_request("ctr", example_inputs(1, vocab=TEST_VOCAB))
        for _ in range(10):
            assert outputs_of(stub.Predict(request, timeout=30))["probability"].shape == (1,)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and metric(router, "tfs_router_request_log_dropped_total",
                                                     reason="write_error") < 10:
            time.sleep(0.1)
        assert metric(router, "tfs_router_request_log_dropped_total", model="ctr", reason="write_error") == 10
        assert "request log not written" in router.log()
    finally:
        assert router.terminate() == 0, router.log()


def test_files_rotate_and_the_oldest_go(model_root: Path, tmp_path: Path, logs_dir: Path) -> None:
    prefix = tmp_path / "logs" / "ctr"
    router = start(model_root, logs_dir, {"sampling_rate": 1.0, "filename_prefix": str(prefix),
                                          "max_file_bytes": 2000, "max_total_bytes": 6000})
    try:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(router.channel)
        request = predict_request("ctr", example_inputs(1, vocab=TEST_VOCAB))
        for _ in range(60):
            stub.Predict(request, timeout=30)
    finally:
        assert router.terminate() == 0, router.log()
    files = sorted(prefix.parent.glob("ctr.*.tfrecord"))
    sizes = [p.stat().st_size for p in files]
    assert len(files) >= 3 and all(s <= 2000 + 1000 for s in sizes), sizes  # one record past the limit at most
    assert sum(sizes) <= 6000 + 3000, sizes  # the oldest went (the newest file is kept whole)
    assert 0 < len(read_logs(prefix)) < 60  # every file left reads back whole


def test_models_config_logging_config(tmp_path: Path) -> None:
    """TF Serving's LoggingConfig in models.config becomes models[].logging; other collectors are refused."""
    from router import tfs_flags
    from router.config import BatchingConfig
    from router.tfs_flags import FileError

    def models(logging: str) -> Any:
        path = tmp_path / "models.config"
        path.write_text('model_config_list { config { name: "ctr" base_path: "/m/ctr" model_platform: '
                        f'"tensorflow" logging_config {{ {logging} }} }} }}')
        return tfs_flags.read_models(str(path), BatchingConfig())

    [m] = models('log_collector_config { type: "" filename_prefix: "/logs/ctr" } '
                 'sampling_config { sampling_rate: 0.01 }')
    assert (m.logging.sampling_rate, m.logging.filename_prefix) == (0.01, "/logs/ctr")
    with pytest.raises(FileError, match="type 'bigquery': not supported"):
        models('log_collector_config { type: "bigquery" filename_prefix: "x" } sampling_config { sampling_rate: 1 }')
    with pytest.raises(FileError, match="filename_prefix: missing"):
        models('sampling_config { sampling_rate: 0.5 }')


def test_replay_of_a_log_reproduces_the_request_mix(model_root: Path, tmp_path: Path, logs_dir: Path) -> None:
    """``tfs-router replay``: what a router logged, sent again to a router; the same requests, the same mix."""
    import json
    import subprocess
    import sys

    from tests.support import ROOT, child_env

    prefix = tmp_path / "logs" / "ctr"
    router = start(model_root, logs_dir, {"sampling_rate": 1.0, "filename_prefix": str(prefix)})
    try:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(router.channel)
        for i in range(30):
            stub.Predict(predict_request("ctr", example_inputs(1 + i % 3, vocab=TEST_VOCAB, seed=i)), timeout=30)
        target = f"127.0.0.1:{router.grpc_port}"

        def written(n: int) -> None:  # the writer is a thread of its own: wait until the log holds n records
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and metric(router, "tfs_router_request_log_records_total") < n:
                time.sleep(0.05)
            assert metric(router, "tfs_router_request_log_records_total") == n

        written(30)
        files = sorted(str(p) for p in prefix.parent.glob("ctr.*.tfrecord"))
        assert files
        done = subprocess.run([sys.executable, "-m", "router", "replay", *files, "--target", target, "--json"],
                              cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["sent"] == 30 and report["codes"] == {"OK": 30}, report
        assert report["batch_sizes"] == {"1": 10, "2": 10, "3": 10}  # the mix the clients sent
        assert report["versions"] == {"2": 30}  # unversioned again: the default answered
        # open loop at a fixed rate for a while: the log sent over and over (the router logged the replay too)
        written(60)
        files = sorted(str(p) for p in prefix.parent.glob("ctr.*.tfrecord"))
        done = subprocess.run([sys.executable, "-m", "router", "replay", *files, "--target", target, "--json",
                               "--rate", "100", "--duration", "1"], cwd=ROOT, env=child_env(), capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert 90 <= report["sent"] <= 100 and report["codes"] == {"OK": report["sent"]}, report
        # not a log: a clear error
        bad = tmp_path / "bad.tfrecord"
        bad.write_bytes(b"\x05\x00")
        done = subprocess.run([sys.executable, "-m", "router", "replay", str(bad), "--target", target], cwd=ROOT,
                              env=child_env(), capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "truncated" in done.stderr, done.stderr
    finally:
        assert router.terminate() == 0, router.log()
