"""Staged hot updates with real routers, real workers and the official client.

Each invariant is checked from what the workers recorded themselves (their
journal of loads, unloads and warm-up calls, with the client calls in flight
during each) and from the versions that answered the clients:

(a) no worker loads, warms or unloads a version while it serves client traffic;
(b) unversioned requests move to the new version at one instant for the whole
    pool: a request sent after any client got an answer from the new version
    is answered by the new version;
(c) explicitly requested versions keep working wherever they are loaded;
(d) a pool of one worker rolls out through a surge worker.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.support import ROOT, TEST_VOCAB, RouterProcess, SteadyLoad, child_env, copy_in, predict_request
from workers.demo_model import example_inputs

INPUTS = example_inputs(2, vocab=TEST_VOCAB)


def start(base: Path, logs_dir: Path, *, workers: int = 2, env: dict[str, str] | None = None,
          **extra: Any) -> RouterProcess:
    config = {"models": [{"name": "ctr", "base_path": str(base)}], "workers": {"count": workers},
              "poll_interval_s": 0.2, **extra}
    router = RouterProcess(config, log_dir=logs_dir, env=env)
    router.wait_ready()
    return router


def operations_under_traffic(stats: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(name, op) for name, s in stats.items() for op in s["operations"] if op["client_requests"]]


def first_answer_of(records: list[tuple[float, float, int | None, str]], version: int) -> float:
    return min(answered for _, answered, v, _ in records if v == version)


@pytest.mark.parametrize("mode", ["swap", "overlap"])
def test_rollout_under_load_keeps_every_invariant(mode: str, model_root: Path, tmp_path: Path,
                                                  logs_dir: Path) -> None:
    base = tmp_path / "ctr"
    base.mkdir()
    copy_in(model_root / "ctr" / "1", base, 1, tmp_path)
    router = start(base, logs_dir, rollout={"mode": mode})
    try:
        unversioned = predict_request("ctr", INPUTS)
        with SteadyLoad(router.channel, unversioned, clients=3) as load, \
                SteadyLoad(router.channel, predict_request("ctr", INPUTS, version=1)) as old, \
                SteadyLoad(router.channel, predict_request("ctr", INPUTS, version=2)) as new:
            load.wait(0.5)
            copy_in(model_root / "ctr" / "2", base, 2, tmp_path)
            [_, rollout] = router.wait_rollouts(2)
            load.wait(0.5)
        assert rollout["state"] == "done" and rollout["to"] == {"ctr": [2]}, rollout
        assert not load.failures, load.failures[:5]
        assert load.served[0] == 1 and load.served[-1] == 2

        # (b) one instant for the whole pool, across clients.
        switch = first_answer_of(load.records, 2)
        late_old = [r for r in load.records if r[0] > switch and r[2] != 2]
        assert late_old == [], late_old[:5]

        # (c) explicit versions: 1 answers until it is unloaded from the last worker, then
        # NOT_FOUND; 2 answers from the moment a worker in rotation holds it, never fails after.
        assert old.records[0][3] == "OK" and new.records[-1][3] == "OK"
        v1_codes = [code for _, _, _, code in old.records]
        first_gone = v1_codes.index("NOT_FOUND") if "NOT_FOUND" in v1_codes else len(v1_codes)
        assert set(v1_codes[:first_gone]) == {"OK"} and set(v1_codes[first_gone:]) <= {"NOT_FOUND"}
        if mode == "overlap":  # every worker kept version 1 until the switch, and unloads it after
            assert max(answered for _, answered, v, _ in old.records if v == 1) > switch
        v2_codes = [code for _, _, _, code in new.records]
        first_ok = v2_codes.index("OK")
        assert set(v2_codes[:first_ok]) <= {"UNAVAILABLE", "NOT_FOUND"} and set(v2_codes[first_ok:]) == {"OK"}
        assert all(v == 2 for v in new.served) and all(v == 1 for v in old.served)

        # (a) from the workers' own journals: their loads, warm-ups and unloads saw no client call.
        stats = router.worker_stats()
        kinds = {(op["kind"], op["version"]) for s in stats.values() for op in s["operations"]}
        assert {("load", 2), ("warmup", 2), ("unload", 1)} <= kinds, kinds
        assert operations_under_traffic(stats) == []
        if mode == "swap":  # each worker unloaded 1 before it loaded 2: never both
            for s in stats.values():
                ops = [(op["kind"], op["version"]) for op in s["operations"] if op["kind"] != "warmup"]
                assert ops.index(("unload", 1)) < ops.index(("load", 2)), ops
        assert all(s["requests"] > 0 for s in stats.values())  # and both served clients
        phases = [(e["worker"], e["phase"]) for e in rollout["events"]]
        assert phases.index(("w0", "drain")) < phases.index(("w0", "load")) < phases.index(("w0", "warm")) \
            < phases.index(("w0", "join")) < phases.index((None, "switch"))
        assert rollout["mode"] == mode
    finally:
        assert router.terminate() == 0, router.log()


def test_broken_versions_roll_back_with_no_failed_request(model_root: Path, nan_model: Path, tmp_path: Path,
                                                          logs_dir: Path) -> None:
    base = tmp_path / "ctr"
    base.mkdir()
    copy_in(model_root / "ctr" / "2", base, 2, tmp_path)
    router = start(base, logs_dir)
    try:
        with SteadyLoad(router.channel, predict_request("ctr", INPUTS), clients=2) as load:
            # A corrupt version 3: its variables are cut short.
            staging = tmp_path / "corrupt"
            shutil.copytree(model_root / "ctr" / "2", staging)
            data = next((staging / "variables").glob("variables.data-*"))
            data.write_bytes(data.read_bytes()[:1000])
            os.rename(staging, base / "3")
            [*_, corrupt] = router.wait_rollouts(2)
            # The same version number again, now a model whose warm-up answers NaN:
            # the directory changed, so it is tried again, and rolled back again.
            shutil.rmtree(base / "3")
            copy_in(nan_model, base, 3, tmp_path)
            [*_, nan] = router.wait_rollouts(3)
            load.wait(0.3)
        assert not load.failures, load.failures[:5]
        assert set(load.served) == {2}
        for rollout, why in ((corrupt, "load of ctr version 3"), (nan, "non-finite value")):
            assert rollout["state"] == "rolled_back" and not rollout["switched"], rollout
            assert why in rollout["error"], rollout["error"]
        status = orjson.loads(router.get("/v1/models/ctr")[1])["model_version_status"]
        by_version = {s["version"]: s for s in status}
        assert by_version["2"]["state"] == "AVAILABLE"
        assert by_version["3"]["state"] == "END" and "non-finite" in by_version["3"]["status"]["error_message"]
        workers = router.status()["workers"]
        assert all(w["in_rotation"] and [v for v, st in w["versions"]["ctr"].items() if st == "AVAILABLE"] == ["2"]
                   for w in workers), workers
        metrics = router.get("/metrics")[1].decode()
        assert 'tfs_router_rollouts_total{result="rolled_back"} 2.0' in metrics
        # Not retried while its directory stays the same.
        time.sleep(1.0)
        assert len(router.status()["history"]) == 3
    finally:
        assert router.terminate() == 0, router.log()


def test_kill_9_mid_rollout_ends_consistent(model_root: Path, tmp_path: Path, logs_dir: Path) -> None:
    base = tmp_path / "ctr"
    base.mkdir()
    copy_in(model_root / "ctr" / "1", base, 1, tmp_path)
    router = start(base, logs_dir)
    try:
        copy_in(model_root / "ctr" / "2", base, 2, tmp_path)
        deadline = time.monotonic() + 60
        victim = None
        while victim is None and time.monotonic() < deadline:
            status = router.status()
            busy = [w for w in status["workers"] if w["state"] in ("loading", "warming", "unloading")]
            if busy and busy[0]["pid"]:
                victim = busy[0]
            time.sleep(0.005)
        assert victim is not None, "no worker was seen mid-step"
        os.kill(victim["pid"], 9)
        history = router.wait_rollouts(2)
        while len(router.status()["history"]) < 3 and router.status()["rollout"] is not None:
            time.sleep(0.1)  # a rollback is followed by nothing; a restart may need the pool to settle
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = router.status()
            workers = status["workers"]
            held = {w["name"]: sorted(v for v, st in w["versions"].get("ctr", {}).items() if st == "AVAILABLE")
                    for w in workers}
            if status["rollout"] is None and all(w["in_rotation"] for w in workers) and len(set(map(tuple, held.values()))) == 1:
                break
            time.sleep(0.1)
        assert status["rollout"] is None and all(w["in_rotation"] for w in workers), status
        assert len(set(map(tuple, held.values()))) == 1, held  # every worker holds the same versions
        serving = status["models"][0]["serving"]
        assert [int(v) for v in next(iter(held.values()))] == serving
        assert history[1]["state"] in ("done", "rolled_back")
        resp = router.channel.unary_unary("/tensorflow.serving.PredictionService/Predict")(
            predict_request("ctr", INPUTS).SerializeToString(), timeout=30)
        assert resp
    finally:
        assert router.terminate() == 0, router.log()


def test_half_copied_version_is_not_loaded_until_complete(model_root: Path, tmp_path: Path, logs_dir: Path) -> None:
    base = tmp_path / "ctr"
    base.mkdir()
    copy_in(model_root / "ctr" / "1", base, 1, tmp_path)
    router = start(base, logs_dir)
    try:
        source = model_root / "ctr" / "2"
        target = base / "2"
        files = sorted(p for p in source.rglob("*") if p.is_file())
        # Copied in place, file by file and slowly, the way a plain `cp -r` or rsync would.
        for path in files:
            dest = target / path.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            data = path.read_bytes()
            for i in range(0, max(len(data), 1), max(len(data) // 3, 1)):
                with open(dest, "ab") as f:
                    f.write(data[i:i + max(len(data) // 3, 1)])
                time.sleep(0.12)
                status = router.status()
                assert 2 not in status["models"][0]["complete_on_disk"], status["models"]
                assert status["rollout"] is None or status["rollout"]["to"] == {"ctr": [1]}
        history = router.wait_rollouts(2)
        assert history[-1]["to"] == {"ctr": [2]} and history[-1]["state"] == "done"
    finally:
        assert router.terminate() == 0, router.log()


def test_pool_of_one_rolls_out_through_a_surge_worker(model_root: Path, tmp_path: Path, logs_dir: Path) -> None:
    base = tmp_path / "ctr"
    base.mkdir()
    copy_in(model_root / "ctr" / "1", base, 1, tmp_path)
    router = start(base, logs_dir, workers=1)
    try:
        seen_pids: set[int] = set()
        stop = threading.Event()

        def watch_pids() -> None:
            while not stop.is_set():
                seen_pids.update(router.worker_pids())
                time.sleep(0.05)

        watcher = threading.Thread(target=watch_pids)
        watcher.start()
        with SteadyLoad(router.channel, predict_request("ctr", INPUTS), clients=2) as load:
            copy_in(model_root / "ctr" / "2", base, 2, tmp_path)
            [_, rollout] = router.wait_rollouts(2)
            load.wait(0.3)
        stop.set()
        watcher.join()
        assert rollout["state"] == "done" and rollout["surge"], rollout
        assert not load.failures, load.failures[:5]
        assert load.served[0] == 1 and load.served[-1] == 2
        phases = [(e["worker"], e["phase"]) for e in rollout["events"]]
        assert ("w1", "surge") in phases and ("w1", "retired") in phases
        assert phases.index(("w1", "join")) < phases.index(("w0", "drain"))  # the surge stood in first
        assert len(seen_pids) >= 2 and len(router.worker_pids()) == 1
        assert [w["name"] for w in router.status()["workers"]] == ["w0"]
        assert operations_under_traffic(router.worker_stats()) == []
    finally:
        assert router.terminate() == 0, router.log()


def test_admin_token_and_bind_rules(model_root: Path, tmp_path: Path, logs_dir: Path) -> None:
    env = {"TFS_ROUTER_ADMIN_TOKEN": "s3cret"}
    router = start(model_root / "ctr", logs_dir, workers=1, env=env)
    try:
        assert router.admin("GET", "/v1/admin/status")[0] == 401
        assert router.admin("GET", "/v1/admin/status", token="wrong")[0] == 401
        code, body = router.admin("POST", "/v1/admin/rollout/abort", token="wrong")
        assert code == 401 and "token" in body["error"]
        assert router.status(token="s3cret")["models"][0]["name"] == "ctr"
        assert router.admin("POST", "/v1/admin/models/nope/rollout", {}, token="s3cret")[0] == 404
        code, body = router.admin("POST", "/v1/admin/models/ctr/rollout", {"version": "2"}, token="s3cret")
        assert code == 400 and "non-negative integer" in body["error"]
        code, body = router.admin("POST", "/v1/admin/rollout/abort", token="s3cret")
        assert code == 409 and "no rollout" in body["error"]
    finally:
        assert router.terminate() == 0, router.log()
    config = tmp_path / "open.yaml"
    config.write_text(f"models: [{{name: ctr, base_path: {model_root / 'ctr'}}}]\nadmin: {{host: 0.0.0.0, port: 0}}\n")
    env_no_token = {k: v for k, v in child_env().items() if k != "TFS_ROUTER_ADMIN_TOKEN"}
    proc = subprocess.run([sys.executable, "-m", "router", "serve", "--config", str(config), "--grpc-port", "0",
                           "--rest-port", "0"], cwd=ROOT, env=env_no_token, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert ("admin.host: 0.0.0.0 is not a loopback address: the admin API there needs TLS (admin.tls or tls: "
            "cert_file, key_file) and a secret token in TFS_ROUTER_ADMIN_TOKEN") in proc.stderr


def test_cli_rollout_watch_shows_phases_and_exit_status(model_root: Path, tmp_path: Path, logs_dir: Path) -> None:
    base = tmp_path / "ctr"
    base.mkdir()
    for v in (1, 2):
        copy_in(model_root / "ctr" / str(v), base, v, tmp_path)
    router = start(base, logs_dir)
    try:
        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "router", *args, "--admin", router.admin_url], cwd=ROOT,
                                  env=child_env(), capture_output=True, text=True, timeout=120)

        router.wait_rollouts(1)  # the start-up load is a rollout too: a command during it is refused (409)
        done = cli("rollout", "ctr", "--version", "1", "--watch")
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        for worker in ("w0", "w1"):
            for phase in ("drain", "load", "warm", "join", "unload"):
                assert any(f" {worker} " in line and f" {phase} " in line for line in lines), (worker, phase, lines)
        assert any("switch" in line for line in lines) and "[done]" in lines[-1]
        status = cli("status")
        assert status.returncode == 0 and "rollout" in status.stdout and "w0" in status.stdout
        # A version whose warm-up fails: rolled back, and the command says so in its exit status.
        staging = tmp_path / "broken"
        shutil.copytree(model_root / "ctr" / "2", staging)
        data = next((staging / "variables").glob("variables.data-*"))
        data.write_bytes(b"\0" * 16)
        os.rename(staging, base / "3")
        time.sleep(1.0)  # complete on disk (two polls); the latest policy is pinned to 1, so nothing starts
        assert router.status()["rollout"] is None
        failed = cli("rollout", "ctr", "--version", "3", "--watch")
        assert failed.returncode == 1, (failed.stdout, failed.stderr)
        assert "rolled_back" in failed.stdout and "rollback" in failed.stdout
        gone = cli("rollout", "ctr", "--version", "9")
        assert gone.returncode == 2 and "not a complete version directory" in gone.stderr
    finally:
        assert router.terminate() == 0, router.log()


@pytest.fixture(autouse=True)
def _no_admin_token_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TFS_ROUTER_ADMIN_TOKEN", raising=False)
