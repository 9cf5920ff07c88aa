"""router.control.plan: the rollout policy, pure.

Unit cases for each rule, then a simulated pool driven by the planner in
random interleavings (hypothesis): whatever the pool size, mode, strategy,
surge setting and completion order, and wherever a step fails, the rollout
ends with every worker on one side (new, or old after a rollback), a worker
in rotation is never loaded, the default version moves once, and enough
workers keep serving it throughout.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.control.plan import (
    LOAD,
    ROLLBACK,
    STEADY,
    UNLOAD,
    Action,
    AddSurge,
    Blocked,
    Finish,
    Limits,
    Prepare,
    Retire,
    RolloutView,
    Switch,
    Versions,
    WorkerView,
    default_of,
    plan,
)


def vs(*versions: int) -> frozenset[int]:
    return frozenset(versions)


OLD: Versions = {"m": vs(1)}
NEW: Versions = {"m": vs(2)}


def worker(name: str, held: Versions = OLD, *, in_rotation: bool = True, warm: Versions | None = None,
           **kw: object) -> WorkerView:
    return WorkerView(name=name, live=kw.pop("live", True), in_rotation=in_rotation,  # type: ignore[arg-type]
                      busy=kw.pop("busy", False), held=held,  # type: ignore[arg-type]
                      warm=held if warm is None else warm, **kw)  # type: ignore[arg-type]


def rollout(phase: str = LOAD, switched: bool = False, old: Versions = OLD, new: Versions = NEW) -> RolloutView:
    return RolloutView(old, new, phase, switched, default_of(old), default_of(new))


# -- unit cases ----------------------------------------------------------------------------


def test_steady_pool_with_nothing_to_do_plans_nothing() -> None:
    r = RolloutView(OLD, OLD, STEADY, True, {"m": 1}, {"m": 1})
    assert plan(r, [worker("a"), worker("b")], Limits()) == []


def test_fresh_workers_load_at_once_without_a_drain() -> None:
    r = RolloutView(OLD, OLD, STEADY, True, {"m": 1}, {"m": 1})
    fresh = worker("b", {}, in_rotation=False)
    assert plan(r, [worker("a"), fresh], Limits()) == [Prepare("b", OLD, drain=False)]


def test_load_phase_drains_one_worker_at_a_time_and_loads_both_versions() -> None:
    actions = plan(rollout(), [worker("a"), worker("b"), worker("c")], Limits())
    assert actions == [Prepare("a", {"m": vs(1, 2)}, drain=True)]
    actions = plan(rollout(), [worker("a"), worker("b"), worker("c")], Limits(max_unavailable=2))
    assert [a.worker for a in actions if isinstance(a, Prepare)] == ["a", "b"]


def test_a_busy_worker_counts_as_unavailable() -> None:
    busy = worker("a", in_rotation=False, busy=True)
    assert plan(rollout(), [busy, worker("b"), worker("c")], Limits()) == []


def test_min_serving_keeps_the_last_server() -> None:
    out = worker("a", in_rotation=False, busy=True)
    assert plan(rollout(), [out, worker("b")], Limits(max_unavailable=5)) == []


def test_switch_waits_for_every_worker_to_hold_and_warm_both() -> None:
    both = {"m": vs(1, 2)}
    cold = worker("b", both, warm=OLD)
    assert not any(isinstance(a, Switch) for a in plan(rollout(), [worker("a", both), cold], Limits()))
    actions = plan(rollout(), [worker("a", both), worker("b", both)], Limits())
    assert actions == [Switch({"m": 2}, UNLOAD)]


def test_after_the_switch_the_old_version_is_unloaded_one_worker_at_a_time() -> None:
    both = {"m": vs(1, 2)}
    actions = plan(rollout(UNLOAD, True), [worker("a", both), worker("b", both)], Limits())
    assert actions == [Prepare("a", NEW, drain=True)]
    assert plan(rollout(UNLOAD, True), [worker("a", NEW), worker("b", NEW)], Limits()) == [Finish("done")]


def test_swap_mode_unloads_first_and_switches_when_half_the_pool_serves_the_new() -> None:
    limits = Limits(swap=True)
    assert plan(rollout(), [worker("a"), worker("b")], limits) == [
        Prepare("a", NEW, drain=True, unload_first=True)]
    assert plan(rollout(), [worker("a", NEW), worker("b")], limits) == [Switch({"m": 2}, LOAD)]
    # After the switch the old holder is no longer serving: draining it costs nothing.
    assert plan(rollout(LOAD, True), [worker("a", NEW), worker("b")], limits) == [
        Prepare("b", NEW, drain=True, unload_first=True)]
    assert plan(rollout(LOAD, True), [worker("a", NEW), worker("b", NEW)], limits) == [Finish("done")]


def test_pool_of_one_starts_a_surge_worker() -> None:
    assert plan(rollout(), [worker("a")], Limits()) == [AddSurge()]
    surge = worker("s", {}, in_rotation=False, surge=True)
    assert plan(rollout(), [worker("a"), surge], Limits()) == [Prepare("s", {"m": vs(1, 2)}, drain=False)]
    both = {"m": vs(1, 2)}
    ready = worker("s", both, surge=True)
    assert plan(rollout(), [worker("a"), ready], Limits()) == [Prepare("a", both, drain=True)]


def test_surge_worker_is_retired_last_not_unloaded() -> None:
    surge = worker("s", {"m": vs(1, 2)}, surge=True)
    assert plan(rollout(UNLOAD, True), [worker("a", {"m": vs(1, 2)}), surge], Limits()) == [
        Prepare("a", NEW, drain=True)]
    assert plan(rollout(UNLOAD, True), [worker("a", NEW), surge], Limits()) == [Retire("s")]
    assert plan(rollout(UNLOAD, True), [worker("a", NEW)], Limits()) == [Finish("done")]


def test_pool_of_one_without_surge_is_blocked_with_a_reason() -> None:
    for limits in (Limits(can_surge=False), Limits(surge="never")):
        [blocked] = plan(rollout(), [worker("a")], limits)
        assert isinstance(blocked, Blocked) and "surge" in blocked.reason


def test_surge_always_keeps_capacity() -> None:
    limits = Limits(surge="always", max_unavailable=3)
    assert plan(rollout(), [worker("a"), worker("b"), worker("c")], limits) == [AddSurge()]
    both = {"m": vs(1, 2)}
    surge = worker("s", both, surge=True)
    actions = plan(rollout(), [worker("a"), worker("b"), worker("c"), surge], limits)
    assert actions == [Prepare("a", both, drain=True)]  # one surge worker stands in for one worker


def test_in_place_loads_in_rotation_without_drain_or_warm() -> None:
    limits = Limits(staged=False)
    assert plan(rollout(), [worker("a"), worker("b")], limits) == [Prepare("a", {"m": vs(1, 2)}, drain=False)]
    both = {"m": vs(1, 2)}
    assert plan(rollout(), [worker("a", both, warm=OLD), worker("b", both, warm=OLD)], limits) == [
        Switch({"m": 2}, UNLOAD)]


def test_rollback_returns_workers_holding_new_versions_to_the_old() -> None:
    both = {"m": vs(1, 2)}
    failed = worker("b", both, in_rotation=False)
    actions = plan(rollout(ROLLBACK), [worker("a", both), failed, worker("c")], Limits())
    assert actions == [Prepare("b", OLD, drain=False)]  # b is out already: a waits its turn
    actions = plan(rollout(ROLLBACK), [worker("a", both), worker("b"), worker("c")], Limits())
    assert actions == [Prepare("a", OLD, drain=True)]
    assert plan(rollout(ROLLBACK), [worker("a"), worker("b"), worker("c")], Limits()) == [Finish("rolled_back")]


def test_first_rollout_switches_as_soon_as_one_worker_serves() -> None:
    r = RolloutView({"m": vs()}, NEW, LOAD, False, {"m": None}, {"m": 2})
    loading = worker("b", {}, in_rotation=False, busy=True)
    assert plan(r, [worker("a", NEW), loading], Limits()) == [Switch({"m": 2}, LOAD)]


def test_dead_and_cordoned_workers() -> None:
    dead = worker("b", {}, in_rotation=False, live=False)
    # A restarting worker is waited for, not replaced by a surge worker, and not drained around.
    assert plan(rollout(), [worker("a"), dead], Limits()) == [
        Blocked("cannot take another worker out of rotation now (min_serving 1, max_unavailable 1)")]
    cordoned = worker("c", OLD, in_rotation=False, cordoned=True)
    # A cordoned worker is out already: it is updated first, and stays out.
    assert plan(rollout(), [worker("a"), worker("b"), cordoned], Limits()) == [
        Prepare("c", {"m": vs(1, 2)}, drain=False)]


def test_waiting_workers_are_left_alone() -> None:
    waiting = worker("a", {}, in_rotation=False, waiting=True)
    r = RolloutView(OLD, OLD, STEADY, True, {"m": 1}, {"m": 1})
    assert plan(r, [waiting, worker("b")], Limits()) == []


# -- simulation ----------------------------------------------------------------------------------


@dataclass
class SimWorker:
    name: str
    held: dict[str, frozenset[int]]
    warm: dict[str, frozenset[int]]
    in_rotation: bool = True
    busy: Prepare | Retire | None = None
    surge: bool = False
    cordoned: bool = False

    def view(self) -> WorkerView:
        return WorkerView(self.name, True, self.in_rotation, self.busy is not None, dict(self.held),
                          dict(self.warm), cordoned=self.cordoned, surge=self.surge)


@dataclass
class Sim:
    r: RolloutView
    limits: Limits
    workers: list[SimWorker]
    rng: random.Random
    fail_step: int | None  # the n-th Prepare that loads a new version fails
    deaths: int = 0  # workers killed (and restarted empty) at random moments
    prepares: int = 0
    result: str | None = None
    switches: int = 0
    log: list[str] = field(default_factory=list)

    def serving(self) -> int:
        defaults = self.r.defaults
        return sum(1 for w in self.workers if w.in_rotation
                   and all(d is None or d in w.held.get(m, frozenset()) for m, d in defaults.items()))

    def apply(self, action: Action) -> None:
        self.log.append(repr(action))
        if isinstance(action, Prepare):
            w = self.by_name(action.worker)
            assert w.busy is None
            if self.limits.staged and w.in_rotation:
                assert action.drain, "a worker in rotation must be drained before it loads"
            if action.drain:
                w.in_rotation = False
            w.busy = action
        elif isinstance(action, Switch):
            assert not self.r.switched
            self.switches += 1
            self.r = replace(self.r, switched=True, phase=action.then)
        elif isinstance(action, AddSurge):
            assert not any(w.surge for w in self.workers)
            self.workers.append(SimWorker("s", {}, {}, in_rotation=False, surge=True))
        elif isinstance(action, Retire):
            w = self.by_name(action.worker)
            assert w.surge
            w.in_rotation = False
            w.busy = action
        elif isinstance(action, Finish):
            self.result = action.result
        elif isinstance(action, Blocked):
            pass

    def complete_one(self) -> None:
        busy = [w for w in self.workers if w.busy is not None]
        if not busy:
            return
        w = self.rng.choice(busy)
        op = w.busy
        w.busy = None
        if isinstance(op, Retire):
            self.workers.remove(w)
            return
        assert isinstance(op, Prepare)
        new = {m: op.hold.get(m, frozenset()) - self.r.old.get(m, frozenset()) for m in op.hold}
        loads_new = any(v - w.held.get(m, frozenset()) for m, v in new.items())
        if loads_new:
            self.prepares += 1
            if self.prepares == self.fail_step and self.r.phase == LOAD and not self.r.switched:
                w.in_rotation = False  # the step failed: out of rotation, holding what it held
                self.r = replace(self.r, phase=ROLLBACK)
                return
        w.held = {m: frozenset(v) for m, v in op.hold.items()}
        if self.limits.staged:
            w.warm = dict(w.held)
        w.in_rotation = not w.cordoned

    def by_name(self, name: str) -> SimWorker:
        return next(w for w in self.workers if w.name == name)

    def kill_one(self) -> None:
        """A worker dies and comes back empty; the controller's rule: if it held or was loading
        a new version before the switch, the rollout rolls back."""
        w = self.rng.choice(self.workers)
        new = {m: v - self.r.old.get(m, frozenset()) for m, v in self.r.new.items()}
        holds_new = any(v & w.held.get(m, frozenset()) for m, v in new.items())
        if self.r.phase == LOAD and not self.r.switched and (holds_new or isinstance(w.busy, Prepare)):
            self.r = replace(self.r, phase=ROLLBACK)
        if isinstance(w.busy, Retire):
            return  # being stopped anyway
        self.log.append(f"kill {w.name}")
        w.held, w.warm, w.in_rotation, w.busy = {}, {}, False, None

    def run(self, max_steps: int = 400) -> None:
        for step in range(max_steps):
            before = self.serving()
            for action in plan(self.r, [w.view() for w in self.workers], self.limits):
                self.apply(action)
                if self.result:
                    return
            if self.r.old_default and all(d is not None for d in self.r.old_default.values()):
                assert self.serving() >= min(self.limits.min_serving, before), self.log[-5:]
            if self.deaths and self.rng.random() < 0.1:
                self.deaths -= 1
                self.kill_one()
            self.complete_one()
        raise AssertionError(f"no end after {max_steps} steps: {self.log[-10:]}")


@settings(max_examples=int(__import__('os').environ.get('SIM_EXAMPLES', 300)), deadline=None)
@given(
    n=st.integers(1, 4),
    swap=st.booleans(),
    staged=st.booleans(),
    surge=st.sampled_from(["auto", "always"]),
    max_unavailable=st.integers(1, 3),
    min_serving=st.integers(0, 1),
    old=st.sets(st.integers(1, 4), min_size=1, max_size=2),
    new=st.sets(st.integers(1, 6), min_size=1, max_size=2),
    fail_step=st.none() | st.integers(1, 6),
    deaths=st.integers(0, 2),
    seed=st.integers(0, 2**32),
)
def test_simulated_rollouts_end_consistent(n: int, swap: bool, staged: bool, surge: str, max_unavailable: int,
                                           min_serving: int, old: set[int], new: set[int],
                                           fail_step: int | None, deaths: int, seed: int) -> None:
    old_v, new_v = {"m": frozenset(old)}, {"m": frozenset(new)}
    r = RolloutView(old_v, new_v, LOAD, False, default_of(old_v), default_of(new_v))
    limits = Limits(staged=staged, swap=swap, surge=surge, max_unavailable=max_unavailable,
                    min_serving=min_serving)
    workers = [SimWorker(f"w{i}", dict(old_v), dict(old_v)) for i in range(n)]
    sim = Sim(r, limits, workers, random.Random(seed), fail_step, deaths)
    sim.run()
    assert sim.switches <= 1
    final = old_v if sim.result == "rolled_back" else new_v
    if sim.result == "rolled_back":
        assert not sim.r.switched  # a rollback never undoes a switch
    else:
        assert sim.result == "done" and sim.r.switched
    assert not any(w.surge for w in sim.workers)
    for w in sim.workers:
        assert w.held == final and w.in_rotation and w.busy is None, (w, sim.log[-8:])
        if staged:
            assert w.warm == final


def test_simulation_catches_a_planner_that_loads_in_rotation(monkeypatch: pytest.MonkeyPatch) -> None:
    # The property above must be able to fail: a planner that forgets to drain is caught.
    import router.control.plan as planmod

    original = planmod._Planner.plan

    def careless(self: planmod._Planner) -> list[Action]:
        return [replace(a, drain=False) if isinstance(a, Prepare) else a for a in original(self)]

    monkeypatch.setattr(planmod._Planner, "plan", careless)
    sim = Sim(rollout(), Limits(), [SimWorker("a", dict(OLD), dict(OLD)), SimWorker("b", dict(OLD), dict(OLD))],
              random.Random(0), None)
    with pytest.raises(AssertionError, match="must be drained"):
        sim.run()
