"""The package layering of DESIGN.md, checked on the source: who may import whom.

* ``shared`` imports neither ``router`` nor ``workers``;
* ``workers`` imports nothing from ``router``;
* ``router`` reaches ``workers`` only through the supervisor's spawn API
  (``workers.supervisor``, which itself needs only ``workers.numa``);
* the router process never loads TensorFlow (checked by importing it).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imports_of(package: str) -> dict[str, set[str]]:
    """module path -> the top-level-qualified names it imports (absolute imports only)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        found[str(path.relative_to(ROOT))] = names
    return found


def offenders(package: str, forbidden: tuple[str, ...], allowed: tuple[str, ...] = ()) -> list[str]:
    bad = []
    for module, names in imports_of(package).items():
        for name in sorted(names):
            top = name.split(".")[0]
            if top in forbidden and not any(name == a or name.startswith(a + ".") for a in allowed):
                bad.append(f"{module}: {name}")
    return bad


def test_shared_imports_neither_router_nor_workers() -> None:
    assert offenders("shared", ("router", "workers", "tensorflow")) == []


def test_workers_import_nothing_from_router() -> None:
    assert offenders("workers", ("router",)) == []


def test_router_reaches_workers_only_through_the_supervisor() -> None:
    assert offenders("router", ("workers",), allowed=("workers.supervisor",)) == []
    assert offenders("router", ("tensorflow", "tensorflow_serving")) == []


def test_the_supervisor_needs_only_numa() -> None:
    names = imports_of("workers")["workers/supervisor.py"]
    assert {n for n in names if n.split(".")[0] == "workers"} <= {"workers", "workers.numa"}


def test_checker_sees_a_forbidden_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The checks above must be able to fail: a planted import is reported.
    pkg = tmp_path / "fake"
    pkg.mkdir()
    (pkg / "mod.py").write_text("from router.pool import Pool\nimport os\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert offenders("fake", ("router",)) == ["fake/mod.py: router.pool.Pool"]


@pytest.mark.parametrize("module", ["router.app", "router.__main__", "shared.signature", "shared.tfrecord"])
def test_router_side_modules_do_not_load_tensorflow(module: str) -> None:
    code = (f"import sys, {module}; "
            "sys.exit(1 if any(m.split('.')[0] == 'tensorflow' for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False).returncode == 0
