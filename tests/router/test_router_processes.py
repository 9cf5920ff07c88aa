"""The data plane on several processes behind one control plane (``dataplane.processes``, router/procs.py).

Real router, real data-plane processes sharing the ports (gRPC: SO_REUSEPORT;
REST: one socket, accepted from by count), real workers; the load goes over
many gRPC channels, each its own connection, so that every process gets some
of it.
"""

from __future__ import annotations

import http.client
import os
import signal
import time
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from tensorflow_serving.apis import prediction_service_pb2_grpc

from tests.support import TEST_VOCAB, RouterProcess, SteadyLoad, copy_in, predict_request, wait_for
from workers.demo_model import example_inputs

INPUTS = example_inputs(1, vocab=TEST_VOCAB)


def channels(router: RouterProcess, n: int) -> list[grpc.Channel]:
    """``n`` channels, each on its own connection (the kernel spreads connections over the processes)."""
    return [grpc.insecure_channel(f"127.0.0.1:{router.grpc_port}", options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(n)]



def start(base: Path, logs_dir: Path, processes: int, env: dict[str, str] | None = None,
          **extra: Any) -> RouterProcess:
    config = {"models": [{"name": "ctr", "base_path": str(base)}], "workers": {"count": 2},
              "poll_interval_s": 0.2, "dataplane": {"processes": processes}, **extra}
    router = RouterProcess(config, log_dir=logs_dir, env=env)
    router.wait_ready()
    wait_for(lambda: all(d["ready"] for d in router.status()["dataplanes"]), "every data plane to be ready")
    return router


def dataplane_pids(router: RouterProcess) -> list[int]:
    return [d["pid"] for d in router.status()["dataplanes"]]


@pytest.mark.parametrize(("processes", "lagging"), [(2, False), (3, False), (2, True)],
                         ids=["2", "3", "2-one-lagging"])
def test_rollout_across_processes_keeps_the_switch_and_fails_nothing(processes: int, lagging: bool, model_root: Path,
                                                                     tmp_path: Path, logs_dir: Path) -> None:
    base = tmp_path / "ctr"
    base.mkdir()
    copy_in(model_root / "ctr" / "1", base, 1, tmp_path)
    # lagging: process 1 applies every revision 0.3 s late; without the switch's first step (hold new
    # unversioned requests everywhere, then switch) its clients would get version 1 after others got 2
    env = {"TFS_ROUTER_TEST_APPLY_DELAY": "1:0.3"} if lagging else None
    router = start(base, logs_dir, processes, env=env)
    chans = channels(router, 6 * processes)
    try:
        loads = [SteadyLoad(c, predict_request("ctr", INPUTS)) for c in chans]
        # explicit versions, over connections of their own
        old, new = (SteadyLoad(c, predict_request("ctr", INPUTS, version=v)) for c, v in zip(chans, (1, 2)))
        for load in (*loads, old, new):
            load.__enter__()
        try:
            loads[0].wait(0.5)
            copy_in(model_root / "ctr" / "2", base, 2, tmp_path)
            [_, rollout] = router.wait_rollouts(2)
            loads[0].wait(0.5)
        finally:
            for load in (*loads, old, new):
                load.__exit__()
        assert rollout["state"] == "done" and rollout["to"] == {"ctr": [2]}, rollout
        # explicit versions: 1 answers until it is unloaded from the last worker, then NOT_FOUND;
        # 2 answers from the moment a worker in rotation holds it, in every process, never fails after.
        # (A process made to apply every revision 0.3 s late may answer an explicit request for the
        # outgoing version UNAVAILABLE for that long first: not checked there.)
        v1_codes = [code for *_, code in old.records]
        first_gone = v1_codes.index("NOT_FOUND") if "NOT_FOUND" in v1_codes else len(v1_codes)
        v2_codes = [code for *_, code in new.records]
        first_ok = v2_codes.index("OK")
        assert set(v2_codes[:first_ok]) <= {"UNAVAILABLE", "NOT_FOUND"} and set(v2_codes[first_ok:]) == {"OK"}
        if not lagging:
            assert v1_codes[0] == "OK" and set(v1_codes[:first_gone]) == {"OK"}, v1_codes
            assert set(v1_codes[first_gone:]) <= {"NOT_FOUND"}, v1_codes
        records = [r for load in loads for r in load.records]
        assert not [r for r in records if r[3] != "OK"], [r for r in records if r[3] != "OK"][:5]
        # one instant for the whole machine: once any client saw version 2, every request sent
        # after it, to whichever process, got version 2
        switch = min(answered for _, answered, v, _ in records if v == 2)
        late_old = [r for r in records if r[0] > switch and r[2] != 2]
        assert late_old == [], late_old[:5]
        status = router.status()
        # several processes took traffic (the kernel picks one per connection: with 6 per process, all on
        # one is a few in ten thousand; every one of 3 is not guaranteed)
        assert sum(d["answered"] > 0 for d in status["dataplanes"]) >= 2, status["dataplanes"]
        # the drain waited for every process: no client call reached a worker while it converted
        stats = router.worker_stats()
        assert not [(n, op) for n, s in stats.items() for op in s["operations"] if op["client_requests"]]
    finally:
        for c in chans:
            c.close()
        assert router.terminate() == 0, router.log()


def test_canary_weight_applies_in_every_process_at_once(model_root: Path, logs_dir: Path) -> None:
    config = {"models": [{"name": "ctr", "base_path": str(model_root / "ctr"), "version_policy": "specific:1,2",
                          "version_labels": {"stable": 1, "canary": 2},
                          "routing": {"split": {"stable": 90, "canary": 10}, "sticky_header": "x-user"}}],
              "workers": {"count": 2}, "dataplane": {"processes": 2}}
    router = RouterProcess(config, log_dir=logs_dir)
    chans = channels(router, 6)
    try:
        router.wait_ready()
        wait_for(lambda: router.status()["models"][0]["available"] == [1, 2], "both versions")
        code, body = router.admin("POST", "/v1/admin/models/ctr/canary", {"weight": 50})
        assert code == 200, body
        request = predict_request("ctr", INPUTS)
        stubs = [prediction_service_pb2_grpc.PredictionServiceStub(c) for c in chans]
        seen: dict[str, set[int]] = {}
        for i in range(60):  # the same key over every connection, right after the command returned
            key = f"user-{i}"
            futures = [s.Predict.future(request, metadata=(("x-user", key),), timeout=30) for s in stubs]
            seen[key] = {f.result().model_spec.version.value for f in futures}
        assert all(len(v) == 1 for v in seen.values()), {k: v for k, v in seen.items() if len(v) > 1}
        on_canary = sum(v == {2} for v in seen.values())
        assert 15 <= on_canary <= 45, on_canary  # about half, where 10% would give ~6
        assert len({d["revision"] for d in router.status()["dataplanes"]}) == 1
    finally:
        for c in chans:
            c.close()
        assert router.terminate() == 0, router.log()


def test_a_killed_dataplane_comes_back_and_others_see_nothing(model_root: Path, logs_dir: Path) -> None:
    router = start(model_root / "ctr", logs_dir, 2)
    chans = channels(router, 16)
    pids: list[int] = []
    try:
        before = dataplane_pids(router)
        pids = list(before)
        loads = [SteadyLoad(c, predict_request("ctr", INPUTS)) for c in chans]
        for load in loads:
            load.__enter__()
        try:
            # both processes have clients (so some connections are on the one that survives)
            wait_for(lambda: all(d["answered"] > 0 for d in router.status()["dataplanes"]), "traffic on both")
            os.kill(before[0], signal.SIGKILL)
            wait_for(lambda: dataplane_pids(router)[0] not in (None, before[0])
                     and all(d["ready"] for d in router.status()["dataplanes"]), "the data plane to come back")
            pids = dataplane_pids(router)
            # the killed process's clients reconnect (gRPC's reconnect backoff) and succeed again
            wait_for(lambda: all(load.records and load.records[-1][3] == "OK" for load in loads),
                     "every client to succeed again", timeout=60)
            loads[0].wait(0.5)
        finally:
            for load in loads:
                load.__exit__()
        hit = [load for load in loads if load.failures]
        assert len(hit) < len(loads), "every connection was on the killed process"
        # the others saw nothing; the killed one's clients only UNAVAILABLE (their connection was reset)
        assert all(code in ("OK", "UNAVAILABLE") for load in hit for *_, code in load.records)
        assert router.status()["dataplane_restarts"] == 1
    finally:
        for c in chans:
            c.close()
        assert router.terminate() == 0, router.log()
        for pid in pids:  # SIGTERM took every data plane down
            if pid is not None:
                with pytest.raises(ProcessLookupError):
                    os.kill(pid, 0)


def test_rest_connections_are_spread_evenly(model_root: Path, logs_dir: Path) -> None:
    """REST: every data plane accepts from one socket, by how many connections it holds (with
    SO_REUSEPORT's hash, 64 connections came out 38/26)."""
    router = start(model_root / "ctr", logs_dir, 2)
    conns: list[http.client.HTTPConnection] = []
    body = orjson.dumps({"instances": [{k: v[0].tolist() for k, v in INPUTS.items()}]})
    try:
        before = [d["answered"] for d in router.status()["dataplanes"]]
        for _ in range(24):  # one after the other, each kept open (keep-alive)
            conn = http.client.HTTPConnection("127.0.0.1", router.rest_port, timeout=30)
            conn.request("POST", "/v1/models/ctr:predict", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            assert response.status == 200, response.read()
            response.read()
            conns.append(conn)

        def per_process() -> list[int]:
            return [d["answered"] - b for d, b in zip(router.status()["dataplanes"], before)]

        wait_for(lambda: sum(per_process()) == 24, "the reports")
        counts = per_process()
        assert max(counts) - min(counts) <= 2, counts
    finally:
        for conn in conns:
            conn.close()
        assert router.terminate() == 0, router.log()


def test_metrics_totals_equal_the_requests_sent(model_root: Path, logs_dir: Path) -> None:
    router = start(model_root / "ctr", logs_dir, 2)
    chans = channels(router, 12)
    try:
        request = predict_request("ctr", INPUTS)
        stubs = [prediction_service_pb2_grpc.PredictionServiceStub(c) for c in chans]
        sent = 0
        for _ in range(20):
            for f in [s.Predict.future(request, timeout=30) for s in stubs]:
                f.result()
                sent += 1

        def count(name: str, *parts: str) -> float:
            body = router.get("/monitoring/prometheus/metrics")[1].decode()
            return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
                       if line.startswith(name + "{") and all(p in line for p in parts))

        wait_for(lambda: count("tfs_router_version_requests_total", 'code="OK"') == sent, "the reports", timeout=10)
        assert count(":tensorflow:serving:request_count", 'model_name="ctr"', 'status="OK"') == sent
        assert count("tfs_router_requests_total", 'api="Predict"', 'code="OK"', 'protocol="grpc"') == sent
        # each process took some: the kernel spread the connections
        assert all(d["answered"] > 0 for d in router.status()["dataplanes"]), router.status()["dataplanes"]
    finally:
        for c in chans:
            c.close()
        assert router.terminate() == 0, router.log()


def test_a_tenants_quota_holds_over_all_processes(model_root: Path, slow_model: Path, tmp_path: Path,
                                                  logs_dir: Path) -> None:
    import threading

    base = tmp_path / "slow"
    base.mkdir()
    copy_in(slow_model, base, 2, tmp_path)
    # One worker running up to 16 calls at once, each data plane allowed 16 calls on it: only the
    # tenant's quota (8 in flight, for the whole router) keeps the worker at 8.
    router = start(base, logs_dir, 2, workers={"count": 1, "predict_threads": 16, "max_inflight": 16},
                   models=[{"name": "ctr", "base_path": str(base), "batching": {"enabled": False}}],
                   quotas={"tenants": {"t": {"max_inflight": 8, "max_queued": 1000}}})
    chans = channels(router, 16)
    try:
        request = predict_request("ctr", INPUTS)
        stubs = [prediction_service_pb2_grpc.PredictionServiceStub(c) for c in chans]
        failures: list[str] = []
        stop = threading.Event()

        def client(i: int) -> None:
            while not stop.is_set():
                try:
                    stubs[i % len(stubs)].Predict(request, metadata=(("x-tenant", "t"),), timeout=60)
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code()}: {exc.details()}")

        threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        time.sleep(3.0)
        stop.set()
        for t in threads:
            t.join(60)
        assert not failures, failures[:5]
        [stats] = router.worker_stats().values()
        assert 6 <= stats["peak_in_flight"] <= 8, stats["peak_in_flight"]
        assert all(d["answered"] > 0 for d in router.status()["dataplanes"])  # both processes served t
    finally:
        for c in chans:
            c.close()
        assert router.terminate() == 0, router.log()


def test_models_added_and_removed_at_run_time_reach_every_process(model_root: Path, tmp_path: Path,
                                                                  logs_dir: Path) -> None:
    import sys

    config = tmp_path / "models.config"
    config.write_text(f"model_config_list {{\n  config {{ name: 'ctr' base_path: '{model_root / 'ctr'}' "
                      "model_platform: 'tensorflow' }\n}\n")
    router = RouterProcess.command(
        [str(Path(sys.executable).parent / "tensorflow_model_server"), "--port=0", "--rest_api_port=0",
         f"--model_config_file={config}", "--model_config_file_poll_wait_seconds=1", "--workers=1",
         "--processes=2", "--admin_port=0"], log_dir=logs_dir)
    chans = channels(router, 6)
    try:
        router.wait_ready()
        config.write_text(config.read_text().replace("name: 'ctr'", "name: 'ctr2'"))
        stubs = [prediction_service_pb2_grpc.PredictionServiceStub(c) for c in chans]

        def everywhere(model: str) -> set[str]:
            codes = set()
            for s in stubs:
                try:
                    s.Predict(predict_request(model, INPUTS), timeout=30)
                    codes.add("OK")
                except grpc.RpcError as exc:
                    codes.add(exc.code().name)
            return codes

        wait_for(lambda: everywhere("ctr2") == {"OK"}, "ctr2 served by every process", timeout=120)
        assert everywhere("ctr") == {"NOT_FOUND"}
    finally:
        for c in chans:
            c.close()
        assert router.terminate() == 0, router.log()


def test_killing_the_control_plane_takes_every_process_down(model_root: Path, logs_dir: Path) -> None:
    """The choice for a lost control plane: its data planes drain and exit (and the workers, which watch
    the router too), so nothing is left serving a state nobody updates."""
    import psutil

    router = start(model_root / "ctr", logs_dir, 2)
    try:
        children = psutil.Process(router.proc.pid).children(recursive=True)
        assert len([p for p in children if "dataplane" in " ".join(p.cmdline())]) == 2
        router.proc.kill()
        router.proc.wait()
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, [(p.pid, p.cmdline()) for p in alive]
    finally:
        router.terminate()  # closes what the test held (the process is gone)
