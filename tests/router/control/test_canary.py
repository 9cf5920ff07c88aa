"""router.control.canary: routing changes, operator verbs and progressive delivery, on a fake clock."""

from __future__ import annotations

import random
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from protos import model_pb2, status_pb2
from router.analysis import VersionStats
from router.config import from_dict
from router.control.canary import ABORTED, PROMOTED, RUNNING, CanaryController
from router.control.rollout import RolloutBusy
from router.registry import Registry
from router.metrics import Metrics
from router.pool import READY, Backend, Pool
from router.traffic import RoutingError
from tests.router.fakes import FakeTransport

State = status_pb2.ModelVersionStatus


class Rollouts:
    """The rollout controller as the canary controller uses it: records promotions."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, int | None]] = []
        self.rollout: Any = None
        self.passive = False  # workers.control: active (the router retires promoted-over versions)

    def request(self, model: str, version: int | None, reason: str) -> None:
        if self.rollout is not None:
            raise RolloutBusy("a rollout is running")
        self.requests.append((model, version))


class World:
    def __init__(self, routing: dict[str, Any] | None = None) -> None:
        cfg = from_dict({"models": [{"name": "m", "base_path": "/m", "version_policy": "specific:1,2",
                                     "version_labels": {"stable": 1, "canary": 2},
                                     "routing": routing or {}}]})
        b = Backend("w0", "unix:/w0", 4, transport=FakeTransport("w0"), state=READY,
                    versions={"m": {1: State(version=1, state=State.AVAILABLE),
                                    2: State(version=2, state=State.AVAILABLE)}})
        self.pool = Pool([b], max_queued=4, rng=random.Random(0))
        self.registry = Registry(cfg, self.pool)
        self.registry.aspired = {"m": (1, 2)}
        self.registry.switch("m", 1)
        self.now = [0.0]
        self.stats = VersionStats(random.Random(0))
        self.metrics = Metrics(CollectorRegistry())
        self.rollouts = Rollouts()
        self.canary = CanaryController(cfg, self.registry, self.rollouts, self.stats, self.metrics,  # type: ignore[arg-type]
                                       clock=lambda: self.now[0], wall=lambda: 1000 + self.now[0])

    def resolve(self, user: str) -> int:
        return self.registry.resolve(model_pb2.ModelSpec(name="m"), {"x-user": user}.get)

    def traffic(self, stable_ms: float, canary_ms: float, n: int = 400) -> None:
        for i in range(n):
            version = self.resolve(f"u{self.now[0]}-{i}")
            self.stats.record("m", version, "OK", (canary_ms if version == 2 else stable_ms) / 1000)

    def advance(self, seconds: float) -> None:
        self.now[0] += seconds
        self.canary.tick()


PROGRESSIVE = {"split": {"stable": 95, "canary": 5}, "sticky_header": "x-user",
               "progressive": {"steps": [10, 50, 100], "interval_s": 10, "min_requests": 20, "max_p99_ratio": 2}}


def test_put_validates_and_applies_atomically() -> None:
    w = World()
    assert w.canary.get("m") == {}
    assert w.resolve("anyone") == 1
    w.canary.apply("m", {"split": {"stable": 0, "canary": 100}})
    assert w.resolve("anyone") == 2
    with pytest.raises(RoutingError, match="sum to 90"):
        w.canary.apply("m", {"split": {"stable": 80, "canary": 10}})
    with pytest.raises(RoutingError, match="version 9 is not served"):
        w.canary.apply("m", {"split": {"stable": 90, "9": 10}})
    assert w.canary.get("m") == {"split": {"stable": 0, "canary": 100}} and w.resolve("anyone") == 2


def test_unavailable_split_target_falls_back_to_the_default_and_is_counted() -> None:
    w = World()
    w.canary.apply("m", {"split": {"stable": 0, "canary": 100}})
    b = w.pool.backends[0]
    b.versions = {"m": {1: State(version=1, state=State.AVAILABLE)}}
    assert w.resolve("anyone") == 1
    assert 'tfs_router_routing_fallbacks_total{model="m",reason="split_unavailable"}' not in w.metrics.render()[0].decode()
    w.registry.on_route = w.metrics.routing_fallback
    w.resolve("anyone")
    assert 'tfs_router_routing_fallbacks_total{model="m",reason="split_unavailable"} 1.0' in w.metrics.render()[0].decode()


def test_operator_weight_abort_and_promote() -> None:
    w = World()
    w.canary.set_weight("m", 30)
    assert w.canary.get("m")["split"] == {"stable": 70, "canary": 30}
    w.canary.abort("m")
    assert w.canary.get("m")["split"] == {"stable": 100, "canary": 0}
    with pytest.raises(RoutingError, match="whole percent"):
        w.canary.set_weight("m", 101)
    w.canary.promote("m")
    assert w.resolve("anyone") == 2  # all traffic at once
    assert w.registry.labels["m"]["stable"] == 2 and w.rollouts.requests == [("m", 2)]
    w.registry.switch("m", 2)  # the promotion's rollout switched the default
    w.advance(0.1)
    assert "split" not in w.canary.get("m")  # the split has done its job


def test_a_promotion_during_a_rollout_that_already_switched_still_retires_the_old_version() -> None:
    w = World()
    w.rollouts.rollout = object()  # a rollout is running (the one that loaded both versions) ...
    w.registry.switch("m", 2)  # ... and its switch already made the canary the default
    w.canary.promote("m")
    w.advance(0.1)
    assert w.rollouts.requests == []  # busy: the retirement waits
    w.rollouts.rollout = None  # that rollout ends
    w.advance(0.1)
    assert w.rollouts.requests == [("m", 2)]  # version 1 retires now
    w.advance(0.1)
    assert w.rollouts.requests == [("m", 2)] and "split" not in w.canary.get("m")


def test_promotion_under_passive_control_moves_traffic_and_retires_nothing() -> None:
    w = World()
    w.rollouts.passive = True  # the workers choose what they hold
    w.canary.promote("m")
    assert w.resolve("anyone") == 2 and w.registry.labels["m"]["stable"] == 2
    w.advance(0.1)
    assert w.rollouts.requests == []  # no rollout asked for, none retried later


def test_progressive_promotes_a_healthy_canary_step_by_step() -> None:
    w = World(PROGRESSIVE)
    progress = w.canary.progress["m"]
    weights = [progress.weight]
    for _ in range(3):
        w.traffic(stable_ms=2, canary_ms=2.2)
        w.advance(10)
        weights.append(progress.weight)
    assert weights == [10, 50, 100, 100] and progress.state == PROMOTED
    assert [v["verdict"] for v in progress.verdicts] == ["advance", "advance", "advance"]
    assert w.rollouts.requests == [("m", 2)]
    text = w.metrics.render()[0].decode()
    assert 'tfs_router_canary_verdicts_total{model="m",verdict="advance"} 3.0' in text
    assert 'tfs_router_canary_state{model="m",state="promoted"} 1.0' in text


def test_progressive_holds_without_enough_requests_then_judges() -> None:
    w = World(PROGRESSIVE)
    w.advance(10)
    progress = w.canary.progress["m"]
    assert progress.weight == 10 and progress.verdicts[-1]["verdict"] == "hold"
    w.traffic(stable_ms=2, canary_ms=2)
    w.advance(5)
    assert len(progress.verdicts) == 1  # a held step waits a whole interval again
    w.advance(5)
    assert progress.weight == 50


def test_progressive_aborts_a_slow_canary_with_its_reason() -> None:
    w = World(PROGRESSIVE)
    w.traffic(stable_ms=2, canary_ms=9)
    w.advance(10)
    progress = w.canary.progress["m"]
    assert progress.state == ABORTED and "p99" in progress.reason
    assert w.canary.get("m")["split"] == {"stable": 100, "canary": 0}
    assert all(w.resolve(f"u{i}") == 1 for i in range(200))
    status = w.canary.status("m")
    assert status["progressive"]["verdicts"][-1]["canary"]["p99_ms"] > 8
    text = w.metrics.render()[0].decode()
    assert 'tfs_router_split_weight{model="m",version="2"} 0.0' in text


def test_an_operator_change_stops_a_progression() -> None:
    w = World(PROGRESSIVE)
    assert w.canary.progress["m"].state == RUNNING
    w.canary.set_weight("m", 20)
    assert w.canary.progress["m"].state == "stopped"
    w.traffic(stable_ms=2, canary_ms=90)
    w.advance(10)
    assert w.canary.get("m")["split"] == {"stable": 80, "canary": 20}  # no verdict acts on it any more
