"""The committed *_pb2 modules are what `make protos` generates from the .proto files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from protos import build


def test_generated_modules_are_fresh(tmp_path: Path) -> None:
    # protoc runs in its own process: grpc_tools' compiler and an already
    # loaded protobuf runtime do not mix in one interpreter.
    subprocess.run([sys.executable, "-m", "protos.build", "--out", str(tmp_path)],
                   check=True, cwd=build.ROOT)
    fresh = sorted((tmp_path / "protos").glob("*_pb2.py*"))
    assert fresh, "protoc generated nothing"
    stale = []
    for path in fresh:
        committed = build.ROOT / "protos" / path.name
        if not committed.exists() or committed.read_bytes() != path.read_bytes():
            stale.append(path.name)
    assert not stale, f"stale generated modules (run `make protos`): {stale}"
    extra = {p.name for p in (build.ROOT / "protos").glob("*_pb2.py*")} - {p.name for p in fresh}
    assert not extra, f"generated modules without a .proto: {sorted(extra)}"
