"""Operator decisions that survive a restart (state.backend: file, router/state.py), with real routers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import ROOT, RouterProcess, child_env, copy_in


def wait_for(check: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def canary_config(model_root: Path, state_dir: Path) -> dict[str, Any]:
    return {"models": [{"name": "ctr", "base_path": str(model_root / "ctr"), "version_policy": "specific:1,2",
                        "version_labels": {"stable": 1, "canary": 2},
                        "routing": {"split": {"stable": 90, "canary": 10}, "sticky_header": "x-user"}}],
            "workers": {"count": 2}, "state": {"dir": str(state_dir)}}


def weights(router: RouterProcess) -> dict[str, int]:
    return router.status()["models"][0]["routing"]["weights"]


def test_a_canary_weight_and_a_drain_survive_a_restart(model_root: Path, tmp_path: Path, logs_dir: Path) -> None:
    state_dir = tmp_path / "state"
    config = canary_config(model_root, state_dir)
    router = RouterProcess(config, log_dir=logs_dir)
    try:
        router.wait_ready()
        before = weights(router)
        assert router.admin("POST", "/v1/admin/models/ctr/canary", {"weight": 30})[0] == 200
        assert router.admin("POST", "/v1/admin/workers/w1/drain")[0] == 200
        saved = json.loads((state_dir / "state.json").read_text())
        assert saved["models"]["ctr"]["routing"]["by"].startswith("admin ")
        assert saved["workers"]["w1"]["value"] is True
        raised = weights(router)
    finally:
        assert router.terminate() == 0, router.log()
    assert raised != before

    router = RouterProcess(config, log_dir=logs_dir)
    try:
        router.wait_ready()
        assert weights(router) == raised  # the operator's 30%, not the config's 10%
        wait_for(lambda: {w["name"]: w["state"] for w in router.status()["workers"]}.get("w1") == "drained",
                 "w1 to come back drained")
        status = router.status()
        assert status["state"]["models"]["ctr"]["routing"]["by"].startswith("admin ")
        cli = subprocess.run([sys.executable, "-m", "router", "status", "--admin", router.admin_url], cwd=ROOT,
                             env=child_env(), capture_output=True, text=True, timeout=60)
        assert "set at run time" in cli.stdout and "routing" in cli.stdout and "drained" in cli.stdout, cli.stdout

        # tfs-router state reset: back to the config
        reset = subprocess.run([sys.executable, "-m", "router", "state", "reset", "ctr", "--admin",
                                router.admin_url], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                               timeout=60)
        assert reset.returncode == 0, reset.stderr
        assert weights(router) == before
        saved = json.loads((state_dir / "state.json").read_text())
        assert "ctr" not in saved["models"] and "w1" in saved["workers"]  # the drain is the worker's, not the model's
    finally:
        assert router.terminate() == 0, router.log()


def test_a_pin_and_a_failed_version_survive_a_restart(model_root: Path, tmp_path: Path, logs_dir: Path) -> None:
    base = tmp_path / "ctr"
    base.mkdir()
    for v in (1, 2):
        copy_in(model_root / "ctr" / str(v), base, v, tmp_path)
    state_dir = tmp_path / "state"
    config = {"models": [{"name": "ctr", "base_path": str(base)}], "workers": {"count": 1},
              "poll_interval_s": 0.2, "state": {"dir": str(state_dir)}}
    router = RouterProcess(config, log_dir=logs_dir)
    try:
        router.wait_ready()
        router.wait_rollouts(1)
        staging = tmp_path / "corrupt"  # a version 3 whose variables are cut short: it fails to load
        shutil.copytree(model_root / "ctr" / "2", staging)
        data = next((staging / "variables").glob("variables.data-*"))
        data.write_bytes(data.read_bytes()[:1000])
        os.rename(staging, base / "3")
        wait_for(lambda: 3 in router.status()["models"][0]["complete_on_disk"], "version 3 on disk")
        wait_for(lambda: "3" in router.status()["models"][0]["failed"], "version 3 to fail", timeout=120)
        wait_for(lambda: router.status()["rollout"] is None, "the rollback to end", timeout=120)
        code, body = router.admin("POST", "/v1/admin/models/ctr/rollout", {"version": 1})  # pins version 1
        assert code in (200, 202), body
        wait_for(lambda: router.status()["models"][0]["pinned"] == [1] and router.status()["rollout"] is None,
                 "the pin on 1", timeout=120)
        time.sleep(1.5)  # the router's own changes (the failed mark) are written within a second
        saved = json.loads((state_dir / "state.json").read_text())["models"]["ctr"]
        assert saved["pinned"]["value"] == [1] and "3" in saved["failed"], saved
    finally:
        assert router.terminate() == 0, router.log()

    router = RouterProcess(config, log_dir=logs_dir)
    try:
        router.wait_ready()
        [first] = router.wait_rollouts(1)
        model = router.status()["models"][0]
        assert model["pinned"] == [1], model  # not the policy's latest
        assert "3" in model["failed"], model  # not tried again: its directory did not change
        assert first["to"] == {"ctr": [1]}, first
    finally:
        assert router.terminate() == 0, router.log()


def test_an_unreadable_state_file_refuses_the_start_unless_ignored(model_root: Path, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "state.json").write_text("{not json")
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump({"models": [{"name": "ctr", "base_path": str(model_root / "ctr")}],
                                    "grpc": {"port": 0}, "rest": {"port": 0}, "admin": {"port": 0},
                                    "state": {"dir": str(state_dir)}}))
    env = {k: v for k, v in child_env().items() if k != "TFS_ROUTER_STATE_DIR"}
    done = subprocess.run([sys.executable, "-m", "router", "serve", "--config", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"state file {state_dir / 'state.json'}" in done.stderr and "--ignore-state" in done.stderr, done.stderr


@pytest.mark.parametrize("backend", ["etcd", "memory"])
def test_unknown_backends_are_refused(backend: str) -> None:
    from router.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="state.backend"):
        from_dict({"models": [{"name": "m", "base_path": "/m"}], "state": {"backend": backend}})
