"""Regenerate the Python modules for the .proto files in this folder.

    python -m protos.build            # writes protos/*_pb2.py(i) in place
    python -m protos.build --out DIR  # writes DIR/protos/*_pb2.py(i) (the staleness test)

Uses the protoc bundled with grpcio-tools, so no system protoc is needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def proto_files() -> list[str]:
    return sorted(f"protos/{p.name}" for p in (ROOT / "protos").glob("*.proto"))


def generate(out: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    (out / "protos").mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        *proto_files(),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: in place)")
    args = parser.parse_args(argv)
    generate(args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
