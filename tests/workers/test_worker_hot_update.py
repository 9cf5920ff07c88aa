"""The worker's side of staged hot updates, on one real worker process: idle-class
load threads, the router's warm-up calls, the activity journal in Stats, and
``specific {}`` (hold no versions)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import numpy as np
import pytest
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    prediction_service_pb2_grpc,
)

from tests.support import TEST_VOCAB, SteadyLoad, WorkerProcess, outputs_of, predict_request
from shared.marks import PACE_KEY
from workers import pacer, server
from workers.demo_model import example_inputs

State = get_model_status_pb2.ModelVersionStatus
WARMUP = (server.WARMUP_METADATA,)
INTRA_OP, INTER_OP = 3, 2
NOT_FOUND = 5  # tensorflow.error.Code


@pytest.fixture(scope="module")
def worker(model_root: Path, logs_dir: Path) -> Iterator[WorkerProcess]:
    w = WorkerProcess("--model", f"ctr={model_root / 'ctr'}", "--model", f"tf1={model_root / 'tf1'}",
                      "--version-policy", "specific:1", "--intra-op-threads", str(INTRA_OP),
                      "--inter-op-threads", str(INTER_OP), log_dir=logs_dir)
    w.wait_serving()
    yield w
    assert w.terminate() == 0, w.log()


class Task(NamedTuple):
    tid: int
    comm: str
    policy: int
    run_ns: int  # time spent on a CPU


def tasks(pid: int) -> list[Task]:
    found = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        base = Path(f"/proc/{pid}/task/{tid}")
        try:
            comm = (base / "comm").read_text().strip()
            stat = (base / "stat").read_text()
            run_ns = int((base / "schedstat").read_text().split()[0])
        except OSError:  # the thread ended while we looked
            continue
        # proc(5): field 41 is the policy; fields 3.. follow the comm's closing paren.
        policy = int(stat[stat.rindex(")") + 2:].split()[41 - 3])
        found.append(Task(int(tid), comm, policy, run_ns))
    return found


def load_thread(pid: int) -> Task:
    (load,) = [t for t in tasks(pid) if t.comm.startswith("load")]
    return load


def settled_run_ns(pid: int) -> int:
    """The load thread's CPU time once it stopped running: an executor thread
    still does its bookkeeping after the loop got its result."""
    last = load_thread(pid).run_ns
    for _ in range(200):
        time.sleep(0.02)
        now = load_thread(pid).run_ns
        if now == last:
            return now
        last = now
    raise AssertionError("the load thread never went idle")


def assert_only_the_load_thread_is_idle(pid: int) -> None:
    threads = tasks(pid)
    # One load thread (the default). A thread it created would carry its name
    # too (Linux names a thread after its creator until it is renamed, and
    # TF's intra-op threads' own name is too long to be set), so a TF pool
    # born on it would show here as a second "load_0".
    loads = [t for t in threads if t.comm.startswith("load")]
    assert [(t.comm, t.policy) for t in loads] == [("load_0", os.SCHED_IDLE)], threads
    others = [t for t in threads if not t.comm.startswith("load")]
    assert all(t.policy != os.SCHED_IDLE for t in others), others
    comms = [t.comm for t in others]
    assert comms.count("tf_Compute") == INTER_OP, comms  # TF's inter-op pool
    assert "tf_graph_runner" in comms, comms
    assert comms.count("python") >= 1 + INTRA_OP, comms  # the main thread and TF's unnamed intra-op pool


def reload(worker: WorkerProcess, base: Path, versions: list[int]) -> Any:
    req = model_management_pb2.ReloadConfigRequest()
    cfg = req.config.model_config_list.config.add(name="ctr", base_path=str(base), model_platform="tensorflow")
    cfg.model_version_policy.specific.SetInParent()  # said outright: an empty list is still `specific {}`
    cfg.model_version_policy.specific.versions.extend(versions)
    return model_service_pb2_grpc.ModelServiceStub(worker.channel).HandleReloadConfigRequest(req, timeout=120)


def statuses(worker: WorkerProcess) -> dict[int, Any]:
    req = get_model_status_pb2.GetModelStatusRequest()
    req.model_spec.name = "ctr"
    resp = model_service_pb2_grpc.ModelServiceStub(worker.channel).GetModelStatus(req, timeout=10)
    return {s.version: s for s in resp.model_version_status}


def new_operations(worker: WorkerProcess, since: float) -> list[dict[str, Any]]:
    return [op for op in worker.stats()["operations"] if op["start"] >= since]


def test_only_the_load_thread_runs_idle_class(worker: WorkerProcess) -> None:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(worker.channel)
    request = predict_request("ctr", example_inputs(8, vocab=TEST_VOCAB), version=1)
    stub.Predict(request, timeout=30)
    stub.Predict(request, metadata=WARMUP, timeout=30)
    # After two loads (TF2 and TF1-style SavedModels), a warm-up file replay and both kinds of Predict.
    assert_only_the_load_thread_is_idle(worker.proc.pid)


def test_warmup_calls_run_on_the_load_thread_and_are_not_client_traffic(worker: WorkerProcess,
                                                                          model_root: Path) -> None:
    assert reload(worker, model_root / "ctr", [1]).status.error_code == 0
    stub = prediction_service_pb2_grpc.PredictionServiceStub(worker.channel)
    request = predict_request("ctr", example_inputs(16, vocab=TEST_VOCAB), version=1)
    pid, calls = worker.proc.pid, 20
    before = worker.stats()
    t0 = time.monotonic()
    run0 = settled_run_ns(pid)
    client = [stub.Predict(request, timeout=30) for _ in range(calls)]
    run1 = load_thread(pid).run_ns
    warm = [stub.Predict(request, metadata=WARMUP, timeout=30) for _ in range(calls)]
    run2 = settled_run_ns(pid)
    after = worker.stats()
    assert run1 == run0  # client calls run on the loop: the load thread never woke
    assert run2 > run1  # the warm-up calls ran on it
    assert warm[0].model_spec.version.value == 1
    for name, value in outputs_of(client[0]).items():
        np.testing.assert_array_equal(outputs_of(warm[-1])[name], value)
    assert after["requests"] - before["requests"] == calls
    by_version = after["client_requests_by_version"]
    assert by_version["ctr"]["1"] - before["client_requests_by_version"]["ctr"]["1"] == calls
    assert after["requests"] == sum(n for versions in by_version.values() for n in versions.values())
    ops = [op for op in after["operations"] if op["start"] >= t0]
    assert [(op["kind"], op["model"], op["version"], op["client_requests"]) for op in ops] == [
        ("warmup", "ctr", 1, 0)
    ] * calls
    assert all(op["start"] <= op["end"] <= after["now"] for op in ops)
    with pytest.raises(grpc.RpcError) as err:  # a version it does not hold, as for a client
        stub.Predict(predict_request("ctr", example_inputs(1, vocab=TEST_VOCAB), version=7), metadata=WARMUP)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert_only_the_load_thread_is_idle(pid)


def test_journal_shows_client_traffic_during_loads_unloads_and_warmups(worker: WorkerProcess,
                                                                        model_root: Path) -> None:
    base = model_root / "ctr"
    assert reload(worker, base, [1]).status.error_code == 0
    stub = prediction_service_pb2_grpc.PredictionServiceStub(worker.channel)
    warmup_request = predict_request("ctr", example_inputs(16, vocab=TEST_VOCAB), version=2)
    t0 = time.monotonic()  # this process's CLOCK_MONOTONIC bounds the worker's records
    with SteadyLoad(worker.channel, predict_request("ctr", example_inputs(4, vocab=TEST_VOCAB))) as load:
        assert reload(worker, base, [1, 2]).status.error_code == 0
        for _ in range(20):
            stub.Predict(warmup_request, metadata=WARMUP, timeout=60)
        assert reload(worker, base, [2]).status.error_code == 0
    t1 = time.monotonic()
    assert not load.failures, load.failures[:5]
    busy = new_operations(worker, t0)
    # What a staged rollout must never do, and the journal catches it.
    (load_v2,) = [op for op in busy if op["kind"] == "load"]
    (unload_v1,) = [op for op in busy if op["kind"] == "unload"]
    warmups = [op for op in busy if op["kind"] == "warmup"]
    assert (load_v2["version"], unload_v1["version"], len(warmups)) == (2, 1, 20)
    assert load_v2["client_requests"] > 0 and unload_v1["client_requests"] > 0
    assert sum(op["client_requests"] for op in warmups) > 0
    assert all(t0 <= op["start"] <= op["end"] <= t1 for op in busy)
    assert load_v2["end"] <= warmups[0]["start"] and warmups[-1]["end"] <= unload_v1["start"]

    t2 = time.monotonic()  # and a quiet one: the same steps with no client traffic
    assert reload(worker, base, [1, 2]).status.error_code == 0
    stub.Predict(predict_request("ctr", example_inputs(4, vocab=TEST_VOCAB), version=1), metadata=WARMUP)
    assert reload(worker, base, [1]).status.error_code == 0
    quiet = new_operations(worker, t2)
    assert [(op["kind"], op["version"], op["client_requests"]) for op in quiet] == [
        ("load", 1, 0), ("warmup", 1, 0), ("unload", 2, 0)
    ]
    stats = worker.stats()
    assert set(stats["client_requests_by_version"]["ctr"]) >= {"1", "2"}
    assert stats["requests"] == sum(stats["client_requests_by_version"]["ctr"].values())
    assert_only_the_load_thread_is_idle(worker.proc.pid)


def test_empty_specific_list_unloads_every_version(worker: WorkerProcess, model_root: Path,
                                                   tmp_path: Path) -> None:
    base = model_root / "ctr"
    stub = prediction_service_pb2_grpc.PredictionServiceStub(worker.channel)
    request = predict_request("ctr", example_inputs(2, vocab=TEST_VOCAB))
    assert reload(worker, base, [1]).status.error_code == 0
    t0 = time.monotonic()
    resp = reload(worker, base, [])
    assert resp.status.error_code == 0, resp.status.error_message
    status = statuses(worker)
    assert status[1].state == State.END and status[1].status.error_code == 0
    assert all(s.state == State.END for s in status.values())
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    resp = reload(worker, base, [2])
    assert resp.status.error_code == 0, resp.status.error_message
    assert stub.Predict(request, timeout=30).model_spec.version.value == 2
    assert statuses(worker)[2].state == State.AVAILABLE
    # Low-memory order: version 1 was gone before version 2 began to load.
    ops = new_operations(worker, t0)
    assert [(op["kind"], op["version"]) for op in ops] == [("unload", 1), ("load", 2)]
    assert ops[0]["end"] <= ops[1]["start"]

    # A latest policy that finds no version directory is still an error.
    empty = tmp_path / "empty"
    empty.mkdir()
    req = model_management_pb2.ReloadConfigRequest()
    models = req.config.model_config_list
    kept = models.config.add(name="ctr", base_path=str(base), model_platform="tensorflow")
    kept.model_version_policy.specific.versions.append(2)
    models.config.add(name="empty", base_path=str(empty), model_platform="tensorflow")
    resp = model_service_pb2_grpc.ModelServiceStub(worker.channel).HandleReloadConfigRequest(req, timeout=60)
    assert resp.status.error_code == NOT_FOUND and "empty" in resp.status.error_message
    assert stub.Predict(request, timeout=30).model_spec.version.value == 2
    assert reload(worker, base, [2]).status.error_code == 0  # forget "empty" again
    assert_only_the_load_thread_is_idle(worker.proc.pid)


def reload_watching_holds(worker: WorkerProcess, base: Path, versions: list[int],
                          metadata: tuple[tuple[str, str], ...] = ()) -> tuple[Any, set[str]]:
    """A reload, and the names of the worker's threads seen held by its pacer while it ran
    (a held thread that was not idle-class is named ``NOT-IDLE:<name>``)."""
    seen: set[str] = set()
    done = threading.Event()
    pid = worker.proc.pid

    def watch() -> None:
        while not done.is_set():
            for task in tasks(pid):
                if pacer.held(pid, task.tid):
                    try:
                        idle = os.sched_getscheduler(task.tid) == os.SCHED_IDLE
                    except OSError:  # it ended meanwhile
                        continue
                    seen.add(task.comm if idle else f"NOT-IDLE:{task.comm}")
            time.sleep(0.0002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        req = model_management_pb2.ReloadConfigRequest()
        cfg = req.config.model_config_list.config.add(name="ctr", base_path=str(base), model_platform="tensorflow")
        cfg.model_version_policy.specific.versions.extend(versions)
        stub = model_service_pb2_grpc.ModelServiceStub(worker.channel)
        response = stub.HandleReloadConfigRequest(req, metadata=metadata, timeout=120)
    finally:
        done.set()
        watcher.join()
    return response, seen


def test_a_reload_the_router_asks_to_pace_holds_only_the_load_threads_and_none_after(
        worker: WorkerProcess, model_root: Path) -> None:
    base = model_root / "ctr"
    assert reload(worker, base, [1]).status.error_code == 0
    # Unpaced: no thread is ever held.
    response, seen = reload_watching_holds(worker, base, [2])
    assert response.status.error_code == 0 and not seen, seen
    # Paced (the router took it out of rotation): the load thread runs in bursts (with any thread TF
    # starts from it, idle-class like it, e.g. an llvm-worker); no serving thread is ever touched.
    response, seen = reload_watching_holds(worker, base, [1], ((PACE_KEY, "1/3"),))
    assert response.status.error_code == 0 and any(name.startswith("load") for name in seen), seen
    assert not [name for name in seen if name.startswith("NOT-IDLE")], seen
    assert statuses(worker)[1].state == State.AVAILABLE
    pid = worker.proc.pid
    assert not [t for t in tasks(pid) if pacer.held(pid, t.tid)]  # pacing ended with the call
    stub = prediction_service_pb2_grpc.PredictionServiceStub(worker.channel)
    request = predict_request("ctr", example_inputs(4, vocab=TEST_VOCAB))
    assert stub.Predict(request, timeout=30).model_spec.version.value == 1
    # A malformed request to pace is ignored: the reload runs unpaced.
    response, seen = reload_watching_holds(worker, base, [2], ((PACE_KEY, "fast"),))
    assert response.status.error_code == 0 and not seen
    assert reload(worker, base, [1]).status.error_code == 0
    assert_only_the_load_thread_is_idle(worker.proc.pid)


def test_a_refused_sched_idle_warns_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def refuse(pid: int, policy: int, param: os.sched_param) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    monkeypatch.setattr(server, "_idle_refused", False)
    barrier = threading.Barrier(3)
    with caplog.at_level(logging.WARNING, logger="workers.server"):
        with ThreadPoolExecutor(3, thread_name_prefix="load", initializer=server.enter_idle_class) as pool:
            list(pool.map(lambda _: barrier.wait(10), range(3)))  # three threads, each initialized
    warnings = [r.getMessage() for r in caplog.records if "SCHED_IDLE" in r.getMessage()]
    assert len(warnings) == 1 and "not permitted" in warnings[0]
