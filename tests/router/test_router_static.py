"""Static mode: the router in front of servers it did not start, found by address."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tensorflow_serving.apis import prediction_service_pb2_grpc

from tests.support import TEST_VOCAB, RouterProcess, WorkerProcess, outputs_of, predict_request
from workers.demo_model import example_inputs


def test_static_workers_are_synced_and_served(model_root: Path, logs_dir: Path) -> None:
    # Two servers started empty, as a TF Serving fleet would be; the router
    # tells them which versions to hold.
    servers = [WorkerProcess(log_dir=logs_dir), WorkerProcess(log_dir=logs_dir)]
    router = None
    try:
        router = RouterProcess({
            "models": [{"name": "ctr", "base_path": str(model_root / "ctr"), "version_policy": "specific:1"}],
            "workers": {"mode": "static", "addresses": [s.address for s in servers]},
        }, log_dir=logs_dir)
        router.wait_ready()  # ready once one server serves; the other may still be loading
        for s in servers:
            s.wait_serving()
        stub = prediction_service_pb2_grpc.PredictionServiceStub(router.channel)
        x = example_inputs(3, vocab=TEST_VOCAB)
        resp = stub.Predict(predict_request("ctr", x), timeout=30)
        assert resp.model_spec.version.value == 1
        direct = prediction_service_pb2_grpc.PredictionServiceStub(servers[1].channel)
        want = outputs_of(direct.Predict(predict_request("ctr", x, version=1), timeout=30))
        np.testing.assert_allclose(outputs_of(resp)["probability"], want["probability"], rtol=1e-6)
        for s in servers:  # every server was told to load version 1
            assert s.stats()["executors"]["ctr"]["1"] >= 1
    finally:
        if router is not None:
            assert router.terminate() == 0, router.log()
        for s in servers:
            assert s.terminate() == 0, s.log()
