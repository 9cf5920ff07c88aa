"""Version changes on a live worker: reload under load, and a corrupt version."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import grpc
import pytest
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    prediction_service_pb2_grpc,
)

from tests.support import TEST_VOCAB, SteadyLoad, WorkerProcess, predict_request
from workers.demo_model import example_inputs

State = get_model_status_pb2.ModelVersionStatus


def reload_request(base_path: Path, versions: list[int]) -> model_management_pb2.ReloadConfigRequest:
    req = model_management_pb2.ReloadConfigRequest()
    cfg = req.config.model_config_list.config.add(name="ctr", base_path=str(base_path))
    cfg.model_platform = "tensorflow"
    cfg.model_version_policy.specific.versions.extend(versions)
    return req


def statuses(channel: grpc.Channel) -> dict[int, Any]:
    req = get_model_status_pb2.GetModelStatusRequest()
    req.model_spec.name = "ctr"
    resp = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(req)
    return {s.version: s for s in resp.model_version_status}


def test_reload_moves_versions_while_predicting(model_root: Path, logs_dir: Path) -> None:
    base = model_root / "ctr"
    worker = WorkerProcess("--model", f"ctr={base}", "--version-policy", "specific:1", log_dir=logs_dir)
    try:
        worker.wait_serving()
        models = model_service_pb2_grpc.ModelServiceStub(worker.channel)
        request = predict_request("ctr", example_inputs(4, vocab=TEST_VOCAB))
        with SteadyLoad(worker.channel, request) as load:
            for versions in ([1, 2], [2]):
                resp = models.HandleReloadConfigRequest(reload_request(base, versions), timeout=120)
                assert resp.status.error_code == 0, resp.status.error_message
        assert not load.failures, load.failures[:5]
        assert load.served[0] == 1 and load.served[-1] == 2 and len(load.served) > 10
        status = statuses(worker.channel)
        assert status[1].state == State.END and status[1].status.error_code == 0
        assert status[2].state == State.AVAILABLE
    finally:
        assert worker.terminate() == 0, worker.log()


def test_corrupt_version_reports_error_while_other_serves(model_root: Path, tmp_path: Path,
                                                         logs_dir: Path) -> None:
    base = tmp_path / "ctr"
    shutil.copytree(model_root / "ctr" / "1", base / "1")
    (base / "3").mkdir()
    (base / "3" / "saved_model.pb").write_bytes(b"this is not a SavedModel")
    worker = WorkerProcess("--model", f"ctr={base}", "--version-policy", "all", log_dir=logs_dir)
    try:
        worker.wait_serving()
        status = statuses(worker.channel)
        assert status[3].state == State.END
        assert status[3].status.error_code != 0 and status[3].status.error_message
        assert status[1].state == State.AVAILABLE
        stub = prediction_service_pb2_grpc.PredictionServiceStub(worker.channel)
        resp = stub.Predict(predict_request("ctr", example_inputs(2, vocab=TEST_VOCAB)))
        assert resp.model_spec.version.value == 1
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(predict_request("ctr", example_inputs(2, vocab=TEST_VOCAB), version=3))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # Asking for the corrupt version again reports its load error.
        models = model_service_pb2_grpc.ModelServiceStub(worker.channel)
        resp = models.HandleReloadConfigRequest(reload_request(base, [1, 3]), timeout=120)
        assert resp.status.error_code != 0 and resp.status.error_message
        assert statuses(worker.channel)[1].state == State.AVAILABLE
    finally:
        assert worker.terminate() == 0, worker.log()


def test_broken_warmup_fails_the_load(model_root: Path, tmp_path: Path, logs_dir: Path) -> None:
    base = tmp_path / "ctr"
    shutil.copytree(model_root / "ctr" / "1", base / "1")
    shutil.copytree(model_root / "ctr" / "2", base / "2")
    (base / "2" / "assets.extra" / "tf_serving_warmup_requests").write_bytes(b"\x01garbage")
    worker = WorkerProcess("--model", f"ctr={base}", "--version-policy", "all", log_dir=logs_dir)
    try:
        worker.wait_serving()
        status = statuses(worker.channel)
        assert status[2].state == State.END and "warm-up" in status[2].status.error_message
        assert status[1].state == State.AVAILABLE
    finally:
        assert worker.terminate() == 0, worker.log()
