"""router.control.rollout: the controller with real pool, registry and source, fake workers.

The workers are ``FakeTransport``s behind the transport seam; everything
else is the real code, driven by its own reconcile loop.  Each fake records
the router's view of it at every ReloadConfig and warm-up call, so the
invariants are checked at the moment they matter: a worker is never in
rotation while it loads, warms or unloads.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from shared.errors import NotFound
from shared.tensor import fill
from protos import model_pb2, predict_pb2, status_pb2
from router.config import Config, from_dict
from router.registry import Registry
from router.control.rollout import Controller, RolloutBusy
from router.control.source import Fingerprint, VersionSource
from router.metrics import Metrics
from router.pool import DEAD, READY, STARTING, Backend, Pool
from tests.router.fakes import FakeTransport

State = status_pb2.ModelVersionStatus
PB: Fingerprint = (("saved_model.pb", 10, 1),)


class Disk:
    """The model's base path as the version source sees it."""

    def __init__(self, *versions: int) -> None:
        self.versions: dict[int, Fingerprint | None] = {v: PB for v in versions}

    def scan(self, path: str) -> dict[int, Fingerprint | None]:
        return dict(self.versions)


class Fleet:
    """Surge workers for the controller: more fakes."""

    def __init__(self, pool: Pool, transports: dict[str, FakeTransport]) -> None:
        self.pool = pool
        self.transports = transports
        self.added: list[str] = []
        self.retired: list[str] = []

    @property
    def can_surge(self) -> bool:
        return True

    async def add_surge(self) -> Backend:
        name = f"s{len(self.added)}"
        t = self.transports[name] = Recording(name, self.pool)
        b = Backend(name, f"unix:/{name}", 4, transport=t, surge=True)
        self.pool.add(b)
        self.added.append(name)
        return b

    async def retire(self, backend: Backend) -> None:
        self.pool.remove(backend)
        self.retired.append(backend.name)


class Recording(FakeTransport):
    """A fake worker that notes, at each control call, whether the router had it in rotation."""

    def __init__(self, name: str, pool: Pool) -> None:
        super().__init__(name)
        self.pool = pool
        self.in_rotation_during: list[tuple[str, bool]] = []

    def _note(self, what: str) -> None:
        me = next((b for b in self.pool.backends if b.transport is self), None)
        self.in_rotation_during.append((what, me is not None and me.routable))

    async def reload(self, request: Any, timeout: float, pace: str | None = None) -> Any:
        self._note("reload")
        return await super().reload(request, timeout, pace)

    async def warmup(self, request: predict_pb2.PredictRequest, timeout: float,
                     pace: str | None = None) -> predict_pb2.PredictResponse:
        self._note("warmup")
        return await super().warmup(request, timeout, pace)


class World:
    def __init__(self, tmp: Path, n: int = 2, disk: Disk | None = None, **rollout: Any) -> None:
        self.disk = disk or Disk(1)
        cfg: Config = from_dict({
            "models": [{"name": "m", "base_path": str(tmp / "m"), "batching": {"max_batch_size": 4}}],
            "workers": {"mode": "static", "addresses": [f"w{i}:1" for i in range(n)]},
            "source": {"stable_polls": 1},
            "rollout": {"warmup_budget_s": 5, "drain_timeout_s": 2, "load_timeout_s": 5,
                        "retry_backoff_s": 0.05, **rollout},
        })
        self.config = cfg
        self.transports: dict[str, FakeTransport] = {}
        self.pool = Pool([], max_queued=16, rng=random.Random(0))
        for i in range(n):
            t = self.transports[f"w{i}"] = Recording(f"w{i}", self.pool)
            self.pool.add(Backend(f"w{i}", f"w{i}:1", 4, transport=t, state=STARTING))
        self.registry = Registry(cfg, self.pool)
        self.source = VersionSource(cfg.models, stable_polls=1, scan=self.disk.scan)
        self.source.poll()
        self.metrics = Metrics(CollectorRegistry())
        self.fleet = Fleet(self.pool, self.transports)
        self.controller = Controller(cfg, self.pool, self.registry, self.source, self.metrics, fleet=self.fleet)

    def fake(self, name: str) -> FakeTransport:
        return self.transports[name]

    def poll(self) -> None:
        self.source.poll()
        self.controller.wake()

    def held(self) -> dict[str, list[int]]:
        return {b.name: sorted(b.available("m")) for b in self.pool.backends}

    def resolve(self) -> int:
        return self.registry.resolve(model_pb2.ModelSpec(name="m"))

    async def until(self, check: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not check():
                await asyncio.sleep(0.005)

    async def idle(self) -> None:
        await self.until(lambda: self.controller.rollout is None and not self.controller._steps)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[World]:
        task = asyncio.ensure_future(self.controller.run())
        try:
            await self.until(lambda: bool(self.controller.history))  # the first rollout: from nothing
            await self.idle()
            yield self
        finally:
            await self.controller.stop()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 20))


def loaded_while_in_rotation(world: World) -> list[tuple[str, str]]:
    return [(name, what) for name, t in world.transports.items() if isinstance(t, Recording)
            for what, routable in t.in_rotation_during if routable]


# -- start-up and steady state ---------------------------------------------------------------------


def test_startup_loads_warms_and_switches(tmp_path: Path) -> None:
    world = World(tmp_path)

    async def main() -> None:
        async with world.running():
            assert world.held() == {"w0": [1], "w1": [1]}
            assert all(b.state == READY and b.warm == {"m": frozenset({1})} for b in world.pool.backends)
            assert world.registry.default == {"m": 1} and world.resolve() == 1
            # Warmed from the signature at the batch sizes the batcher sends (max_batch_size 4).
            rows = sorted({r.inputs["x"].tensor_shape.dim[0].size for r in world.fake("w0").warmups})
            assert rows == [1, 2, 4]
            assert all(r.model_spec.version.value == 1 for r in world.fake("w0").warmups)
            [first] = world.controller.history
            assert first.state == "done" and first.old == {"m": frozenset()}
        assert loaded_while_in_rotation(world) == []

    run(main)


def test_restarted_worker_is_loaded_and_warmed_before_it_rejoins(tmp_path: Path) -> None:
    world = World(tmp_path)

    async def main() -> None:
        async with world.running():
            b = world.pool.by_name("w1")
            world.controller.worker_lost(b, "exited")
            b.state, b.versions, b.warm = STARTING, {}, {}
            b.generation += 1
            world.fake("w1").states = {}
            world.fake("w1").warmups.clear()
            world.controller.wake()
            await world.until(lambda: b.state == READY)
            assert world.held() == {"w0": [1], "w1": [1]} and world.fake("w1").warmups
            assert not world.controller.history or len(world.controller.history) == 1  # no rollout for a restart
        assert loaded_while_in_rotation(world) == []

    run(main)


# -- a rollout ---------------------------------------------------------------------------------------


def test_overlap_mode_stages_worker_by_worker_then_switches_at_once(tmp_path: Path) -> None:
    world = World(tmp_path, n=3, mode="overlap")
    defaults_at_reload: list[tuple[str, dict[str, tuple[int, ...]], int | None]] = []

    async def main() -> None:
        async with world.running():
            for name in ("w0", "w1", "w2"):
                world.fake(name).on_reload = (lambda n: lambda wanted: defaults_at_reload.append(
                    (n, wanted, world.registry.default["m"])))(name)
            world.disk.versions[2] = PB
            world.poll()
            await world.until(lambda: world.controller.history[-1].id == 2 if world.controller.history else False)
            r = world.controller.history[-1]
            assert r.state == "done" and world.held() == {"w0": [2], "w1": [2], "w2": [2]}
        loads = [(n, w["m"], d) for n, w, d in defaults_at_reload]
        # Every worker loads both while the default stays 1; only then the switch; then each unloads 1.
        assert [x for x in loads if x[1] == (1, 2)] == [(n, (1, 2), 1) for n in ("w0", "w1", "w2")]
        assert [x for x in loads if x[1] == (2,)] == [(n, (2,), 2) for n in ("w0", "w1", "w2")]
        assert loads.index(("w2", (1, 2), 1)) < loads.index(("w0", (2,), 2))
        phases = [(e.worker, e.phase) for e in r.events]
        assert (None, "switch") in phases and phases[-1] == (None, "done")
        assert loaded_while_in_rotation(world) == []

    run(main)


def test_swap_mode_never_holds_two_versions_and_switches_at_half(tmp_path: Path) -> None:
    world = World(tmp_path, n=4)  # swap is the default
    held_at_switch: list[dict[str, list[int]]] = []

    async def main() -> None:
        async with world.running():
            original = world.registry.switch

            def switch(model: str, version: int | None) -> None:
                if version == 2:
                    held_at_switch.append(world.held())
                original(model, version)

            world.registry.switch = switch  # type: ignore[method-assign]
            world.disk.versions[2] = PB
            world.poll()
            await world.until(lambda: len(world.controller.history) == 2)
            assert world.controller.history[-1].state == "done"
            assert world.held() == {"w0": [2], "w1": [2], "w2": [2], "w3": [2]}
        for name in ("w0", "w1", "w2", "w3"):
            reloads = [w["m"] for w in world.fake(name).reloads]
            assert reloads[-2:] == [(), (2,)]  # unload first, then load
            assert all(len(r) <= 1 for r in reloads)
        # The switch came once two of the four served version 2 (and two still served 1).
        at_switch = held_at_switch[0]  # (the end of the rollout confirms the default once more)
        assert sorted(map(tuple, at_switch.values())) == [(1,), (1,), (2,), (2,)]
        assert loaded_while_in_rotation(world) == []

    run(main)


def test_a_drained_worker_is_asked_to_convert_paced_while_another_serves(tmp_path: Path) -> None:
    world = World(tmp_path)

    async def main() -> None:
        async with world.running():
            # The pool's start: nobody serves yet, so nobody is held back by going slowly.
            assert {pace for name in ("w0", "w1") for _, pace in world.fake(name).paces} == {None}
            for name in ("w0", "w1"):
                world.fake(name).paces.clear()
            world.disk.versions[2] = PB
            world.poll()
            await world.until(lambda: len(world.controller.history) == 2)
            assert world.held() == {"w0": [2], "w1": [2]}
        # Every reload and warm-up of the rollout ran while the other worker served: paced, as configured.
        for name in ("w0", "w1"):
            calls = world.fake(name).paces
            assert {call for call, _ in calls} == {"reload", "warmup"}
            assert {pace for _, pace in calls} == {"1/3"}, calls

    run(main)


@pytest.mark.parametrize("rollout", [{"strategy": "in_place"}, {"pace_run_ms": 0}], ids=["in_place", "pacing off"])
def test_no_pacing_for_a_worker_in_rotation_or_when_turned_off(tmp_path: Path, rollout: dict[str, Any]) -> None:
    world = World(tmp_path, **rollout)

    async def main() -> None:
        async with world.running():
            world.disk.versions[2] = PB
            world.poll()
            await world.until(lambda: len(world.controller.history) == 2)
        assert {pace for name in ("w0", "w1") for _, pace in world.fake(name).paces} == {None}

    run(main)


def test_in_place_loads_while_in_rotation(tmp_path: Path) -> None:
    world = World(tmp_path, strategy="in_place")

    async def main() -> None:
        async with world.running():
            world.disk.versions[2] = PB
            world.poll()
            await world.until(lambda: len(world.controller.history) == 2)
            assert world.held() == {"w0": [2], "w1": [2]}
        # The comparison strategy really is in place: reloads happen in rotation (the check can fail).
        assert ("w0", "reload") in loaded_while_in_rotation(world)

    run(main)


def test_pool_of_one_rolls_out_through_a_surge_worker(tmp_path: Path) -> None:
    world = World(tmp_path, n=1)

    async def main() -> None:
        async with world.running():
            served: list[int] = []

            async def client() -> None:
                while True:
                    served.append(world.resolve())  # never fails: someone always serves the default
                    await asyncio.sleep(0)

            task = asyncio.ensure_future(client())
            world.disk.versions[2] = PB
            world.poll()
            await world.until(lambda: len(world.controller.history) == 2)
            task.cancel()
            assert world.fleet.added == ["s0"] and world.fleet.retired == ["s0"]
            assert world.held() == {"w0": [2]} and world.controller.history[-1].surge
            assert served[0] == 1 and served[-1] == 2 and served == sorted(served)
        assert loaded_while_in_rotation(world) == []

    run(main)


# -- failures ------------------------------------------------------------------------------------------


def test_a_version_that_fails_to_load_rolls_back_and_is_not_retried(tmp_path: Path) -> None:
    world = World(tmp_path, mode="overlap")  # the second worker fails: before the switch only in overlap mode

    async def main() -> None:
        async with world.running():
            world.fake("w1").broken.add(("m", 2))
            world.disk.versions[2] = PB
            world.poll()
            await world.until(lambda: len(world.controller.history) == 2)
            r = world.controller.history[-1]
            assert r.state == "rolled_back" and not r.switched and r.failed_versions == [("m", 2)]
            assert "load of m version 2 on w1 failed: cannot load" in (r.error or "")
            assert world.held() == {"w0": [1], "w1": [1]} and world.resolve() == 1
            status = {s.version: s for s in world.registry.status(model_pb2.ModelSpec(name="m")).model_version_status}
            assert status[2].state == State.END and "cannot load" in status[2].status.error_message
            reloads = len(world.fake("w0").reloads)
            for _ in range(3):
                world.poll()
                await asyncio.sleep(0.02)
            assert len(world.fake("w0").reloads) == reloads and world.controller.rollout is None
            # An operator retries it: a new rollout, which fails the same way.
            world.fake("w1").broken.clear()
            r = world.controller.request("m", 2, "retry")
            assert r is not None and world.registry.failed == {}
            await world.idle()
            assert world.held() == {"w0": [2], "w1": [2]}
        assert loaded_while_in_rotation(world) == []

    run(main)


def test_a_warm_up_answering_nan_rolls_back(tmp_path: Path) -> None:
    world = World(tmp_path)

    async def main() -> None:
        async with world.running():
            bad = predict_pb2.PredictResponse()
            fill(bad.outputs["y"], np.array([[np.nan, 1.0]], np.float32))
            world.fake("w0").warm_answer = bad
            world.disk.versions[2] = PB
            world.poll()
            await world.until(lambda: len(world.controller.history) == 2)
            r = world.controller.history[-1]
            assert r.state == "rolled_back" and "non-finite value in output 'y'" in (r.error or "")
            assert world.held() == {"w0": [1], "w1": [1]} and world.registry.default == {"m": 1}
            assert world.source.failed("m").keys() == {2}
            text = world.metrics.render()[0].decode()
            assert 'tfs_router_rollouts_total{result="rolled_back"} 1.0' in text

    run(main)


def test_swap_mode_rolls_back_a_failure_before_its_switch(tmp_path: Path) -> None:
    world = World(tmp_path)

    async def main() -> None:
        async with world.running():
            world.fake("w0").broken.add(("m", 2))
            world.disk.versions[2] = PB
            world.poll()
            await world.until(lambda: len(world.controller.history) == 2)
            r = world.controller.history[-1]
            assert r.state == "rolled_back" and not r.switched
            assert world.held() == {"w0": [1], "w1": [1]} and world.registry.default == {"m": 1}
            assert [w["m"] for w in world.fake("w0").reloads][-3:] == [(), (2,), (1,)]  # unloaded, failed, back
        assert loaded_while_in_rotation(world) == []

    run(main)


def test_worker_lost_while_holding_the_new_version_rolls_back(tmp_path: Path) -> None:
    world = World(tmp_path, n=3, mode="overlap")

    async def main() -> None:
        async with world.running():
            world.fake("w1").reload_delay = 0.3  # w0 finishes first and rejoins holding 1 and 2
            world.disk.versions[2] = PB
            world.poll()
            w0 = world.pool.by_name("w0")
            await world.until(lambda: w0.available("m") == {1, 2} and w0.state == READY)
            world.controller.worker_lost(w0, "failed 3 health checks")
            w0.state, w0.versions, w0.warm = DEAD, {}, {}
            await world.until(lambda: world.controller.rollout is not None and world.controller.rollout.blocked)
            # A dead worker counts against max_unavailable: the rollback waits for it to come back.
            w0.generation += 1
            w0.state = STARTING
            world.fake("w0").states = {}
            world.controller.wake()
            await world.until(lambda: len(world.controller.history) == 2)
            r = world.controller.history[-1]
            assert r.state == "rolled_back" and "w0 failed 3 health checks" in (r.error or "")
            assert world.held() == {"w0": [1], "w1": [1], "w2": [1]}

    run(main)


def test_failure_after_the_switch_is_retried_not_rolled_back(tmp_path: Path) -> None:
    world = World(tmp_path, mode="overlap")

    async def main() -> None:
        async with world.running():
            failures = [RuntimeError("boom")]
            original = world.fake("w1").reload

            async def flaky(request: Any, timeout: float, pace: str | None = None) -> Any:
                # Only the unload step, after the switch, fails (once).
                if failures and [c.model_version_policy.specific.versions for c in
                                 request.config.model_config_list.config] == [[2]]:
                    assert world.controller.rollout is not None and world.controller.rollout.switched
                    raise failures.pop()
                return await original(request, timeout, pace)

            world.fake("w1").reload = flaky  # type: ignore[method-assign]
            world.disk.versions[2] = PB
            world.poll()
            await world.until(lambda: len(world.controller.history) == 2)
            assert world.controller.history[-1].state == "done" and not failures
            assert world.held() == {"w0": [2], "w1": [2]}

    run(main)


# -- operator commands -----------------------------------------------------------------------------------


def test_operator_rollout_rollback_abort_and_drain(tmp_path: Path) -> None:
    world = World(tmp_path, disk=Disk(1, 2))

    async def main() -> None:
        async with world.running():
            assert world.held() == {"w0": [2], "w1": [2]}
            with pytest.raises(ValueError, match="not a complete version directory"):
                world.controller.request("m", 7, "op")
            r = world.controller.rollback("m", 1)
            assert r is not None and r.new == {"m": frozenset({1})}
            with pytest.raises(RolloutBusy, match="is running"):
                world.controller.request("m", 2, "op")
            await world.idle()
            assert world.held() == {"w0": [1], "w1": [1]} and world.source.pinned("m") == (1,)
            assert world.controller.request("m", 1, "op") is None  # already served
            # Back to the policy (latest), then roll back without naming a version: the one before.
            assert world.controller.request("m", None, "op") is not None
            await world.idle()
            assert world.held() == {"w0": [2], "w1": [2]}
            assert world.controller.rollback("m", None) is not None
            await world.idle()
            assert world.held() == {"w0": [1], "w1": [1]}
            # Abort before the switch.
            world.fake("w0").reload_delay = 0.2
            r = world.controller.request("m", 2, "op")
            assert r is not None
            aborted = world.controller.abort()
            assert aborted.phase == "rollback"
            await world.idle()
            assert world.controller.history[-1].state == "rolled_back" and world.held() == {"w0": [1], "w1": [1]}
            with pytest.raises(RolloutBusy, match="no rollout"):
                world.controller.abort()
            # Drain and undrain.
            w1 = world.controller.drain("w1", True)
            assert not w1.routable and world.pool.holders("m", 1) == [world.pool.by_name("w0")]
            world.controller.drain("w1", False)
            assert w1.routable

    run(main)


def test_status_and_metrics_read_the_same_state(tmp_path: Path) -> None:
    world = World(tmp_path)

    async def main() -> None:
        async with world.running():
            status = world.controller.status()
            assert [w["name"] for w in status["workers"]] == ["w0", "w1"]
            assert status["workers"][0]["versions"] == {"m": {"1": "AVAILABLE"}}
            assert status["models"][0]["default_version"] == 1 and status["rollout"] is None
            assert status["history"][0]["state"] == "done"
            text = world.metrics.render()[0].decode()
            assert 'tfs_router_worker_versions{model="m",version="1",worker="w0"} 1.0' in text
            assert 'tfs_router_default_version{model="m"} 1.0' in text
            assert "tfs_router_seconds_since_last_switch" in text
            assert 'tfs_router_rollout_phase_seconds_count{phase="warm"}' in text

    run(main)
