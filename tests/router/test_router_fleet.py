"""In front of a fleet the router did not start: passive control, and workers found by DNS."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from prometheus_client import CollectorRegistry

from router.app import App
from router.config import from_dict
from router.pool import READY
from tests.support import TEST_VOCAB, RouterProcess, SteadyLoad, WorkerProcess, copy_in, predict_request, wait_for
from workers.demo_model import example_inputs

INPUTS = example_inputs(2, vocab=TEST_VOCAB)
T = TypeVar("T")



@pytest.mark.parametrize("processes", [1, 2], ids=["one-process", "two-dataplanes"])
def test_passive_router_follows_workers_that_load_versions_themselves(processes: int, model_root: Path,
                                                                       tmp_path: Path, logs_dir: Path) -> None:
    """With two data planes, a worker's NOT_FOUND for the version it just unloaded reaches the control
    plane, which reads the workers again before the data plane retries (router/procs.py)."""
    base = tmp_path / "ctr"
    base.mkdir()
    shutil.copytree(model_root / "ctr" / "1", base / "1")
    # Servers that poll their own storage, as tensorflow_model_server does.
    servers = [WorkerProcess("--model", f"ctr={base}", "--file-system-poll-wait-seconds", "0.3", log_dir=logs_dir)
               for _ in range(2)]
    router = None
    try:
        router = RouterProcess({
            "models": [{"name": "ctr", "base_path": str(base)}],
            "workers": {"mode": "static", "control": "passive", "status_poll_s": 0.2,
                        "addresses": [s.address for s in servers]},
            "dataplane": {"processes": processes},
        }, log_dir=logs_dir)
        router.wait_ready()
        with SteadyLoad(router.channel, predict_request("ctr", INPUTS), clients=3) as load:
            wait_for(lambda: len(load.served) > 20, "requests to be answered")
            copy_in(model_root / "ctr" / "2", base, 2, tmp_path)
            wait_for(lambda: load.served[-20:] == [2] * 20, "unversioned requests to reach version 2")
            switched = time.monotonic()
            load.wait(0.5)
        assert not load.failures, load.failures[:5]
        assert {v for sent, _, v, _ in load.records if sent > switched} == {2}  # and never back to 1
        for s in servers:
            stats = s.stats()
            assert stats["reload_requests"] == 0  # the router never told them anything
            assert stats["executors"]["ctr"].get("2", 0) >= 1
        status = router.status()
        assert [m["default_version"] for m in status["models"]] == [2]
        code, body = router.admin("POST", "/v1/admin/models/ctr/rollout", {"version": 1})
        assert code == 409 and "passive" in body["error"], body
    finally:
        if router is not None:
            assert router.terminate() == 0, router.log()
        for s in servers:
            assert s.terminate() == 0, s.log()


class FakeDns:
    """Answers every name with ``addresses``; raises while ``failing``."""

    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.failing = False
        self.lookups = 0

    async def __call__(self, host: str, port: int) -> list[str]:
        self.lookups += 1
        if self.failing:
            raise OSError(f"{host}: temporary failure in name resolution")
        return list(self.addresses)


class InProcessRouter:
    """The router's App on an event loop thread of the test process (to inject a resolver)."""

    def __init__(self, config: dict[str, Any], resolver: FakeDns) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def build() -> App:
            # no runtime state file: this router lives in the test process (its working directory is the repo)
            return App(from_dict({"state": {"backend": "none"}, **config}), registry=CollectorRegistry(),
                       resolver=resolver)

        self.app = self.run(build())
        self.run(self.app.start())
        self.run(self.app.wait_dataplanes())  # with dataplane.processes > 1 they serve the ports
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.app.grpc_port}")

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def workers(self) -> dict[str, str]:
        async def read() -> dict[str, str]:
            return {b.address: b.state for b in self.app.pool.backends}
        return self.run(read())

    def close(self) -> None:
        self.channel.close()
        self.run(self.app.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()  # else its self-pipe sockets are found unclosed by a later test's garbage collection


@pytest.mark.parametrize("control", ["active", "passive"])
def test_dns_discovery_adds_and_drops_workers_under_load(control: str, model_root: Path, logs_dir: Path) -> None:
    if control == "active":  # started empty: the router tells them what to hold
        servers = [WorkerProcess(log_dir=logs_dir) for _ in range(2)]
    else:  # they load their models themselves (the Kubernetes "fleet" topology)
        servers = [WorkerProcess("--model", f"ctr={model_root / 'ctr'}", "--version-policy", "specific:1",
                                 log_dir=logs_dir) for _ in range(2)]
    dns = FakeDns()
    dns.addresses = [servers[0].address]
    router = None
    try:
        router = InProcessRouter({
            "models": [{"name": "ctr", "base_path": str(model_root / "ctr"), "version_policy": "specific:1"}],
            "workers": {"mode": "static", "addresses": ["dns:workers.models.svc:8500"], "control": control,
                        "dns_refresh_s": 0.2, "dns_drop_after": 2, "status_poll_s": 0.2},
            "grpc": {"host": "127.0.0.1", "port": 0}, "rest": {"host": "127.0.0.1", "port": 0},
            "admin": {"port": -1}, "poll_interval_s": 0.2,
        }, dns)
        assert router.run(router.app.wait_ready(120))
        first, second = servers
        with SteadyLoad(router.channel, predict_request("ctr", INPUTS), clients=3) as load:
            wait_for(lambda: len(load.served) > 20, "requests to be answered")
            dns.addresses = [first.address, second.address]
            wait_for(lambda: router.workers().get(second.address) == READY, "the new worker to join")
            wait_for(lambda: second.stats()["requests"] > 10, "the new worker to serve")
            # A resolver that fails for a while changes nothing.
            dns.failing = True
            looked = dns.lookups
            wait_for(lambda: dns.lookups >= looked + 5, "five failed lookups")
            assert router.workers() == {first.address: READY, second.address: READY}
            dns.failing = False
            # The first worker leaves DNS: drained and dropped after two lookups without it.
            dns.addresses = [second.address]
            wait_for(lambda: first.address not in router.workers(), "the vanished worker to be dropped")
            dropped_at = first.stats()["requests"]
            load.wait(0.5)
        assert not load.failures, load.failures[:5]
        assert first.stats()["requests"] == dropped_at  # nothing reached it once dropped
        assert set(load.served) == {1}
        for s in servers:  # passive: the router never told them anything
            assert (s.stats()["reload_requests"] == 0) == (control == "passive")
    finally:
        if router is not None:
            router.close()
        for s in servers:
            assert s.terminate() == 0, s.log()
