"""``tfs-router serve`` refuses bad start-up conditions with a clear message, not a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT, child_env


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "router", "serve", *args], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=120)


def test_busy_grpc_port_is_a_clear_error(model_root: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = serve("--model-name", "ctr", "--model-base-path", str(model_root / "ctr"),
                     "--grpc-port", str(port), "--rest-port", "0")
    assert done.returncode == 2
    assert f"cannot listen for gRPC on 0.0.0.0:{port}" in done.stderr
    assert "Traceback" not in done.stderr


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: ctr\n    base_path: /m\n    batching: {max_batch_sise: 8}\n")
    done = serve("--config", str(bad))
    assert done.returncode == 2
    assert "models[0].batching.max_batch_sise: unknown key" in done.stderr
