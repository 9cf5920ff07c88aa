"""The router both fuzzers run against (REST: test_fuzz_rest.py, gRPC: test_fuzz_grpc.py).

One router per test module, one worker, the demo model with a label; and the
worker processes as the first test found them, which none of the fuzzing may
kill or restart.  Import the fixtures into the test module to use them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import RouterProcess

MODEL = "ctr"
SERVED_VERSION = 2  # version_policy latest over the fixture's versions 1 and 2
LABEL = "stable"


@pytest.fixture(scope="module")
def router(model_root: Path, logs_dir: Path) -> Iterator[RouterProcess]:
    config = {
        "models": [{"name": MODEL, "base_path": str(model_root / MODEL), "version_labels": {LABEL: SERVED_VERSION}}],
        "workers": {"count": 1},
    }
    r = RouterProcess(config, log_dir=logs_dir)
    try:
        r.wait_ready()
        yield r
    finally:
        assert r.terminate() == 0, r.log()


@pytest.fixture(scope="module", autouse=True)
def workers_at_start(router: RouterProcess) -> list[int]:
    """The worker processes as the first test found them: none may die or restart under the fuzzing."""
    pids = router.worker_pids()
    assert pids, router.log()
    return pids
