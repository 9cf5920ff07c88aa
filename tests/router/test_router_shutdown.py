"""SIGTERM: the router stops accepting, lets in-flight requests finish, and stops its workers."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
from tensorflow_serving.apis import prediction_service_pb2_grpc

from tests.support import TEST_VOCAB, RouterProcess, outputs_of, predict_request
from workers.demo_model import example_inputs


def in_flight(router: RouterProcess) -> float:
    _, body, _ = router.get("/metrics")
    for line in body.decode().splitlines():
        if line.startswith('tfs_router_requests_in_flight{protocol="grpc"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_sigterm_drains_in_flight_requests(model_root: Path, logs_dir: Path) -> None:
    router = RouterProcess({"models": [{"name": "ctr", "base_path": str(model_root / "ctr")}],
                            "workers": {"count": 1}, "shutdown_timeout_s": 60}, log_dir=logs_dir)
    try:
        router.wait_ready()
        workers = router.worker_pids()
        stub = prediction_service_pb2_grpc.PredictionServiceStub(router.channel)
        big = example_inputs(200_000, vocab=TEST_VOCAB)  # long enough to be in flight at SIGTERM
        result: dict[str, Any] = {}

        def call() -> None:
            try:
                result["response"] = stub.Predict(predict_request("ctr", big), timeout=120)
            except grpc.RpcError as exc:
                result["error"] = exc

        thread = threading.Thread(target=call)
        thread.start()
        deadline = time.monotonic() + 60
        while in_flight(router) < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        router.proc.send_signal(signal.SIGTERM)
        thread.join(120)
        assert "error" not in result, result.get("error")
        assert outputs_of(result["response"])["probability"].shape == (200_000,)
        assert router.proc.wait(90) == 0, router.log()
        with_new = grpc.insecure_channel(f"127.0.0.1:{router.grpc_port}")
        try:
            prediction_service_pb2_grpc.PredictionServiceStub(with_new).Predict(
                predict_request("ctr", example_inputs(1, vocab=TEST_VOCAB)), timeout=5)
            raise AssertionError("a request after shutdown was answered")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            with_new.close()
        for pid in workers:
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert np.isfinite(outputs_of(result["response"])["logit"]).all()
    finally:
        router.terminate()
