"""The lean transport with real processes: a router's Predict calls reach its spawned workers over
frames (``workers.transport: auto``) or over gRPC (``grpc``), with the same answers, and a worker
killed with frames in flight costs no request (each is retried once on the other worker)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tensorflow_serving.apis import prediction_service_pb2_grpc

from tests.support import TEST_VOCAB, RouterProcess, SteadyLoad, outputs_of, predict_request
from workers.demo_model import example_inputs


def start(model_root: Path, logs_dir: Path, transport: str, **workers: Any) -> RouterProcess:
    config = {"models": [{"name": "ctr", "base_path": str(model_root / "ctr"),
                          "batching": {"enabled": False}}],
              "workers": {"count": 2, "transport": transport, "restart_backoff_s": 0.2,
                          "health_interval_s": 0.5, **workers}}
    router = RouterProcess(config, log_dir=logs_dir)
    router.wait_ready()
    return router


@pytest.fixture(scope="module")
def frames_router(model_root: Path, logs_dir: Path) -> Iterator[RouterProcess]:
    router = start(model_root, logs_dir, "auto")
    yield router
    assert router.terminate() == 0, router.log()


def by_transport(router: RouterProcess) -> dict[str, int]:
    total: dict[str, int] = {}
    for stats in router.worker_stats().values():
        for via, n in stats["requests_by_transport"].items():
            total[via] = total.get(via, 0) + n
    return total


def test_spawned_workers_get_predict_over_frames_with_the_answers_grpc_gives(frames_router: RouterProcess,
                                                                               model_root: Path,
                                                                               logs_dir: Path) -> None:
    before = by_transport(frames_router)
    inputs = example_inputs(3, vocab=TEST_VOCAB)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(frames_router.channel)
    via_frames = [outputs_of(stub.Predict(predict_request("ctr", inputs), timeout=30)) for _ in range(20)]
    after = by_transport(frames_router)
    assert after.get("frames", 0) - before.get("frames", 0) == 20
    assert after.get("grpc", 0) == before.get("grpc", 0)
    # Every worker's frames socket sits beside its gRPC socket, in the router's private directory.
    for w in frames_router.status()["workers"]:
        path = Path(w["address"].removeprefix("unix:"))
        assert path.with_name(path.stem + ".frames.sock").exists()
        assert (path.parent.stat().st_mode & 0o077) == 0, oct(path.parent.stat().st_mode)

    grpc_router = start(model_root, logs_dir, "grpc")
    try:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc_router.channel)
        via_grpc = outputs_of(stub.Predict(predict_request("ctr", inputs), timeout=30))
        assert by_transport(grpc_router).get("frames", 0) == 0
        assert by_transport(grpc_router)["grpc"] >= 1
    finally:
        assert grpc_router.terminate() == 0, grpc_router.log()
    for answer in via_frames:
        assert sorted(answer) == sorted(via_grpc)
        for name in answer:
            np.testing.assert_allclose(answer[name], via_grpc[name], rtol=1e-6)


def test_a_worker_killed_with_frames_in_flight_fails_no_request(frames_router: RouterProcess) -> None:
    request = predict_request("ctr", example_inputs(2, vocab=TEST_VOCAB))
    _, body, _ = frames_router.get("/metrics")
    retried_before = _retries(body.decode())
    with SteadyLoad(frames_router.channel, request, clients=8) as load:
        load.wait(1.0)
        before = frames_router.worker_pids()
        os.kill(before[0], signal.SIGKILL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            pids = frames_router.worker_pids()
            if len(pids) == 2 and before[0] not in pids:
                break
            load.wait(0.2)
        load.wait(1.0)
    assert not load.failures, load.failures[:5]
    _, body, _ = frames_router.get("/metrics")
    # With 8 clients and one slot per call, the killed worker had calls on its connection:
    # each was sent once more, to the other worker.
    assert _retries(body.decode()) > retried_before


def _retries(metrics: str) -> float:
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("tfs_router_retries_total{") and 'reason="worker_unavailable"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total
