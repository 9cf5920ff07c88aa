"""A new version directory is picked up by polling and served without a failed request."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import grpc
import orjson
from tensorflow_serving.apis import prediction_service_pb2_grpc

from tests.support import TEST_VOCAB, RouterProcess, predict_request
from workers.demo_model import example_inputs


def test_new_version_is_served_without_failures(model_root: Path, tmp_path: Path, logs_dir: Path) -> None:
    base = tmp_path / "ctr"
    shutil.copytree(model_root / "ctr" / "1", base / "1")
    router = RouterProcess({"models": [{"name": "ctr", "base_path": str(base)}],
                            "workers": {"count": 2}, "poll_interval_s": 0.2}, log_dir=logs_dir)
    try:
        router.wait_ready()
        stub = prediction_service_pb2_grpc.PredictionServiceStub(router.channel)
        request = predict_request("ctr", example_inputs(2, vocab=TEST_VOCAB))
        served: list[int] = []
        failures: list[str] = []
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                try:
                    served.append(stub.Predict(request, timeout=30).model_spec.version.value)
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code()}: {exc.details()}")

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            # Written beside, renamed in: a half-copied version is never seen.
            shutil.copytree(model_root / "ctr" / "2", tmp_path / "staging")
            os.rename(tmp_path / "staging", base / "2")
            deadline = 120.0
            waited = 0.0
            while waited < deadline and (not served or served[-1] != 2):
                stop.wait(0.2)
                waited += 0.2
            count = len(served)
            stop.wait(1.0)  # keep serving after the switch
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert not failures, failures[:5]
        assert served[0] == 1 and served[-1] == 2 and len(served) > count
        # latest:1 policy: version 1 is unloaded (END, as TF Serving reports it) once 2 serves.
        status, body, _ = router.get("/v1/models/ctr")
        states = {s["version"]: s["state"] for s in orjson.loads(body)["model_version_status"]}
        assert status == 200 and states == {"1": "END", "2": "AVAILABLE"}
    finally:
        assert router.terminate() == 0, router.log()
