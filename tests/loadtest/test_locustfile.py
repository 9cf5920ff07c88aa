"""The locust scenarios run headless against a real router and count no failure."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT, RouterProcess, child_env


def test_locust_rest_and_grpc_users(model_root: Path, logs_dir: Path, tmp_path: Path) -> None:
    router = RouterProcess({"models": [{"name": "ctr", "base_path": str(model_root / "ctr")}],
                            "workers": {"count": 1}}, log_dir=logs_dir)
    try:
        router.wait_ready()
        env = {**child_env(), "TFS_GRPC_TARGET": f"127.0.0.1:{router.grpc_port}", "TFS_ROWS": "2"}
        run = subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless",
             "-u", "4", "-r", "4", "-t", "4s", "--host", router.url, "--only-summary",
             "--csv", str(tmp_path / "run")],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        with open(tmp_path / "run_stats.csv", newline="") as f:
            stats = {row["Name"]: row for row in csv.DictReader(f)}
        for name in ("REST predict", "gRPC Predict"):
            assert int(stats[name]["Request Count"]) > 0, stats
            assert int(stats[name]["Failure Count"]) == 0, stats
    finally:
        assert router.terminate() == 0, router.log()
