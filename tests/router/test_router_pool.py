"""The spawned pool: placement on this machine, and surviving a worker's death under load."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import TEST_VOCAB, RouterProcess, SteadyLoad, predict_request
from workers import numa
from workers.demo_model import example_inputs


@pytest.fixture(scope="module")
def router(model_root: Path, logs_dir: Path) -> Iterator[RouterProcess]:
    config = {
        "models": [{"name": "ctr", "base_path": str(model_root / "ctr")}],
        "workers": {"count": 2, "cpus_per_worker": 1, "restart_backoff_s": 0.2, "health_interval_s": 0.5},
    }
    r = RouterProcess(config, log_dir=logs_dir)
    r.wait_ready()
    yield r
    assert r.terminate() == 0, r.log()


def worker_states(router: RouterProcess) -> dict[str, str]:
    _, body, _ = router.get("/metrics")
    states = {}
    for line in body.decode().splitlines():
        if line.startswith("tfs_router_worker_state{") and line.endswith(" 1.0"):
            labels = dict(part.split("=") for part in line[line.index("{") + 1:line.index("}")].split(","))
            states[labels["worker"].strip('"')] = labels["state"].strip('"')
    return states


def test_worker_affinity_is_what_the_config_asked(router: RouterProcess) -> None:
    plan = numa.plan(numa.read_topology(), 2, cpus_per_worker=1)
    pids = router.worker_pids()
    assert len(pids) == 2
    got = sorted(tuple(sorted(os.sched_getaffinity(pid))) for pid in pids)
    assert got == sorted(p.cpus for p in plan)
    for pid in pids:  # memory bound to the worker's node (no numactl here: the worker did it)
        lines = Path(f"/proc/{pid}/numa_maps").read_text().splitlines()
        heap = [line.split()[1] for line in lines if line.endswith("heap") or " heap " in line]
        assert heap == ["bind:0"], heap
        bound = sum(line.split()[1] == "bind:0" for line in lines)
        assert bound > len(lines) // 2, f"{bound} of {len(lines)} mappings bound"


def test_kill_9_under_load_fails_no_request(router: RouterProcess) -> None:
    request = predict_request("ctr", example_inputs(4, vocab=TEST_VOCAB))
    with SteadyLoad(router.channel, request, clients=4) as load:
        load.wait(1.0)
        before = router.worker_pids()
        os.kill(before[0], signal.SIGKILL)
        # Load keeps flowing while the worker is restarted and re-synced.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            pids = router.worker_pids()
            if len(pids) == 2 and before[0] not in pids and set(worker_states(router).values()) == {"ready"}:
                break
            load.wait(0.2)
        served_after_restart = len(load.served)
        load.wait(1.0)
    assert not load.failures, load.failures[:5]
    assert set(worker_states(router).values()) == {"ready"}, worker_states(router)
    assert before[0] not in router.worker_pids()
    assert len(load.served) > served_after_restart
    _, body, _ = router.get("/metrics")
    assert 'tfs_router_worker_restarts_total{worker="w' in body.decode()
