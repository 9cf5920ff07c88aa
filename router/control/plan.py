"""The rollout policy: given what the workers hold, what happens next (pure).

A rollout moves every model from its ``old`` versions to its ``new`` ones.
The plan is recomputed from the workers' observed state after every change
(a reconcile loop, like Kubernetes' deployment controller): nothing is kept
in the middle of a long coroutine, so a worker that dies or restarts half
way is simply planned for again from what it now holds.

Two modes.  In ``swap`` mode (the default) a worker, once drained, unloads
the old versions and then loads the new ones, so it holds one version at a
time and its load reuses the memory its unload just freed; the pool
switches the default once at least as many workers in rotation serve the
new default as the old, then converts the rest:

    load      each worker in turn: drain -> unload old -> load new -> warm -> rejoin
              (serving the new versions only when asked for, until the switch)
    switch    unversioned requests move to the new default at one instant
    load      the remaining workers, the same way
    rollback  (a failure before the switch) converted workers go back to old

In ``overlap`` mode every worker holds both until the switch:

    load      each worker in turn: drain -> load old+new -> warm new -> rejoin
    switch    once every worker holds both
    unload    each worker in turn: drain -> unload old -> rejoin
    rollback  (a failure before the switch) each worker: drain -> back to old

With ``strategy: in_place`` nothing is drained or warmed by the router:
each worker loads while it serves (TF Serving's way, kept for comparison).

Capacity rules for taking a worker out of rotation: at least
``min_serving`` workers keep serving the default version in force, and at
most ``max_unavailable`` regular workers are out at once (a surge worker in
rotation stands in for one more).  A pool that cannot spare a worker (a pool
of one) starts a *surge* worker for the rollout and retires it at the end.

``plan`` takes a ``RolloutView`` and ``WorkerView``s and returns actions;
the controller (``rollout.py``) carries them out and calls it again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

Versions = Mapping[str, frozenset[int]]  # model -> versions

STEADY, LOAD, UNLOAD, ROLLBACK = "steady", "load", "unload", "rollback"


@dataclass(frozen=True)
class WorkerView:
    name: str
    live: bool  # connected and alive: control calls can reach it
    in_rotation: bool
    busy: bool  # a step is running on it
    held: Versions
    warm: Versions
    cordoned: bool = False  # an operator drained it: it is updated, but stays out of rotation
    surge: bool = False
    waiting: bool = False  # backing off after a failed step


@dataclass(frozen=True)
class Limits:
    staged: bool = True  # False: in_place
    swap: bool = False
    surge: str = "auto"  # auto | always | never
    can_surge: bool = True  # a surge worker can be started (spawned workers)
    max_unavailable: int = 1
    min_serving: int = 1


@dataclass(frozen=True)
class RolloutView:
    old: Versions
    new: Versions
    phase: str  # STEADY, LOAD, UNLOAD or ROLLBACK
    switched: bool = False
    old_default: Mapping[str, int | None] = field(default_factory=dict)
    new_default: Mapping[str, int | None] = field(default_factory=dict)

    @property
    def defaults(self) -> Mapping[str, int | None]:
        """The default versions in force (what unversioned requests get now)."""
        return self.new_default if self.switched else self.old_default


# -- actions ---------------------------------------------------------------------


@dataclass(frozen=True)
class Prepare:
    """Bring a worker to ``hold``: drain it (if in rotation), load/unload, warm, rejoin."""

    worker: str
    hold: Versions
    drain: bool
    unload_first: bool = False  # swap mode: drop the old versions before loading the new


@dataclass(frozen=True)
class Switch:
    defaults: Mapping[str, int | None]
    then: str  # the phase that follows: UNLOAD when old versions remain to unload, else LOAD


@dataclass(frozen=True)
class AddSurge:
    pass


@dataclass(frozen=True)
class Retire:
    worker: str


@dataclass(frozen=True)
class Finish:
    result: str  # "done" or "rolled_back"


@dataclass(frozen=True)
class Blocked:
    reason: str


Action = Prepare | Switch | AddSurge | Retire | Finish | Blocked


# -- helpers ---------------------------------------------------------------------


def union(a: Versions, b: Versions) -> dict[str, frozenset[int]]:
    return {m: a.get(m, frozenset()) | b.get(m, frozenset()) for m in {*a, *b}}


def same(a: Versions, b: Versions) -> bool:
    return all(a.get(m, frozenset()) == b.get(m, frozenset()) for m in {*a, *b})


def covers(warm: Versions, wanted: Versions) -> bool:
    return all(wanted[m] <= warm.get(m, frozenset()) for m in wanted)


def default_of(versions: Versions) -> dict[str, int | None]:
    """The version unversioned requests get: the highest held (TF Serving's latest)."""
    return {m: max(vs) if vs else None for m, vs in versions.items()}


def _holds_defaults(w: WorkerView, defaults: Mapping[str, int | None]) -> bool:
    return all(d is None or d in w.held.get(m, frozenset()) for m, d in defaults.items())


# -- the plan --------------------------------------------------------------------


class _Planner:
    def __init__(self, r: RolloutView, workers: Sequence[WorkerView], limits: Limits) -> None:
        self.r = r
        self.workers = list(workers)
        self.limits = limits

    def target(self, w: WorkerView) -> Versions:
        r = self.r
        if r.phase == ROLLBACK:
            return r.old
        if r.phase == LOAD and not r.switched and not self.limits.swap:
            return union(r.old, r.new)
        return r.new

    def exempt(self, w: WorkerView) -> bool:
        """A surge worker in rotation is retired at the end, not unloaded or rolled back first."""
        return w.surge and w.in_rotation and self.r.phase in (UNLOAD, ROLLBACK)

    def done(self, w: WorkerView) -> bool:
        want = self.target(w)
        if not same(w.held, want) or not (w.in_rotation or w.cordoned):
            return False
        return not self.limits.staged or covers(w.warm, want)

    def serving(self, w: WorkerView) -> bool:
        return w.in_rotation and _holds_defaults(w, self.r.defaults)

    def plan(self) -> list[Action]:
        r, limits = self.r, self.limits
        live = [w for w in self.workers if w.live]
        busy = any(w.busy for w in self.workers)

        if r.phase == LOAD and not r.switched and self.ready_to_switch(live):
            leftover = any(_minus(r.old, r.new).values())
            return [Switch(dict(r.new_default), UNLOAD if leftover and not limits.swap else LOAD)]

        pending = [w for w in live if not w.busy and not w.waiting and not self.exempt(w) and not self.done(w)]
        actions: list[Action] = []
        # A worker that holds nothing serves nothing: it is loaded without a drain.
        needs_drain = [w for w in pending if w.in_rotation and limits.staged and _holds_any(w)]

        surges = [w for w in self.workers if w.surge]
        if needs_drain and not surges and r.phase != STEADY:
            too_small = self.too_small()
            if (too_small and limits.surge != "never" or limits.surge == "always") and limits.can_surge:
                return [AddSurge()]
            if too_small:
                why = ("rollout.surge is never" if limits.surge == "never"
                       else "a surge worker cannot be started (static workers)")
                actions.append(Blocked(f"the pool cannot spare a worker to drain (min_serving "
                                       f"{limits.min_serving}) and {why}"))

        regular_out = sum(1 for w in self.workers if not w.surge and not w.in_rotation)
        surge_in = sum(1 for w in self.workers if w.surge and w.in_rotation)
        allowance = surge_in if limits.surge == "always" else limits.max_unavailable + surge_in
        serving = sum(1 for w in live if self.serving(w))
        in_place_running = sum(1 for w in self.workers if w.busy)

        for w in sorted(pending, key=lambda w: (w.in_rotation, self.serving(w), w.surge, w.name)):
            hold = self.target(w)
            unload_first = limits.swap and bool(_minus(w.held, hold)) and bool(_minus(hold, w.held))
            if not w.in_rotation or not _holds_any(w):
                actions.append(Prepare(w.name, hold, drain=False, unload_first=unload_first))
                continue
            if not limits.staged:
                if in_place_running < limits.max_unavailable:
                    in_place_running += 1
                    actions.append(Prepare(w.name, hold, drain=False))
                continue
            serves = self.serving(w)
            if serving - serves < limits.min_serving:
                continue
            if not w.surge and regular_out + 1 > allowance:
                continue
            serving -= serves
            regular_out += 0 if w.surge else 1
            actions.append(Prepare(w.name, hold, drain=True, unload_first=unload_first))

        if actions or busy:
            return actions
        if pending:
            return [Blocked(f"cannot take another worker out of rotation now (min_serving {limits.min_serving}, "
                            f"max_unavailable {limits.max_unavailable})")]
        return self.finish(live, surges)

    def ready_to_switch(self, live: list[WorkerView]) -> bool:
        r = self.r
        holders_new = [w for w in live if w.in_rotation and _holds_defaults(w, r.new_default)
                       and (not self.limits.staged or covers(w.warm, _defaults_as_versions(r.new_default)))]
        if not holders_new:
            return False
        if all(d is None for d in r.old_default.values()):
            return True  # nothing served yet: the first ready worker sets the default
        if self.limits.swap:
            holders_old = [w for w in live if w.in_rotation and _holds_defaults(w, r.old_default)
                           and not _holds_defaults(w, r.new_default)]
            return len(holders_new) >= len(holders_old)
        if any(w.busy for w in self.workers):
            return False
        return all(self.done(w) for w in live) and all(w.in_rotation or w.cordoned for w in live)

    def too_small(self) -> bool:
        """The pool cannot drain any worker and keep min_serving (a pool of one)."""
        # The pool's size, not who is up right now: a worker that is restarting
        # is waited for, not replaced.
        regular = sum(1 for w in self.workers if not w.surge and not w.cordoned)
        return regular - 1 < max(self.limits.min_serving, 1)

    def finish(self, live: list[WorkerView], surges: list[WorkerView]) -> list[Action]:
        r = self.r
        if r.phase == STEADY:
            return []
        regular_live = [w for w in live if not w.surge]
        if not regular_live or not all(self.done(w) for w in regular_live):
            return []
        if r.phase == LOAD and not r.switched:
            return []
        for s in surges:
            serving = sum(1 for w in live if self.serving(w))
            if serving - self.serving(s) < self.limits.min_serving:
                return [Blocked("waiting for a worker to serve before the surge worker is retired")]
            return [Retire(s.name)]
        return [Finish("rolled_back" if r.phase == ROLLBACK else "done")]


def _holds_any(w: WorkerView) -> bool:
    return any(w.held.values())


def _minus(a: Versions, b: Versions) -> dict[str, frozenset[int]]:
    return {m: a.get(m, frozenset()) - b.get(m, frozenset()) for m in a}


def _defaults_as_versions(defaults: Mapping[str, int | None]) -> dict[str, frozenset[int]]:
    return {m: frozenset() if d is None else frozenset({d}) for m, d in defaults.items()}


def plan(r: RolloutView, workers: Sequence[WorkerView], limits: Limits) -> list[Action]:
    """The next actions; empty when there is nothing to do until something changes."""
    return _Planner(r, workers, limits).plan()
