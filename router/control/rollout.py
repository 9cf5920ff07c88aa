"""The rollout controller: carries out the plan, one step per worker at a time.

A reconcile loop: on every change (a new version complete on disk, a worker
that started, died or finished a step, an operator's command) it compares
what should be held with what the workers report, asks ``plan.plan`` what
to do next, and starts those steps.  The per-worker step is the protocol of
DESIGN decision 4:

    drain    out of rotation (the balancer and the batcher skip it), wait
             for its in-flight calls (``rollout.drain_timeout_s``)
    load     ReloadConfig with the versions it must hold, GetModelStatus
             until each is AVAILABLE, signatures fetched
    warm     the version's warm-up requests, or requests synthesized from
             its signatures at the batch sizes the batcher sends
    join     back into rotation

Before the switch, any failure of a step that loads or warms a new version
(a load error, a warm-up error, the worker dying under it, a timeout), or
the death of a worker holding a new version, rolls the rollout back: every
worker returns to the old versions, the version is marked failed (END with
its error in GetModelStatus; not retried until its directory changes or an
operator retries it) and the old default never stopped serving.  After the
switch the rollout is committed: a failing worker stays out of rotation and
its step is retried with backoff.

``Rollout`` is the value the admin API, ``tfs-router status`` and the metrics
all read; every phase change is logged and kept in its ``events``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from shared.errors import CODE_NUMBER, FailedPrecondition, ServingError
from protos import status_pb2
from router.config import Config
from router.control import plan as planmod
from router.control import sync
from router.control.plan import LOAD, ROLLBACK, STEADY, UNLOAD, Versions
from router.registry import Registry
from router.control.source import VersionSource
from router.control.warmup import WarmupFailed, warm, warmup_requests
from router.metrics import Metrics
from router.pool import DEAD, DRAINED, DRAINING, LOADING, READY, STARTING, UNLOADING, WARMING, Backend, Pool
from router.transport import TransportError

log = logging.getLogger("router.control.rollout")

RUNNING, DONE, ROLLED_BACK = "running", "done", "rolled_back"
HISTORY = 20
MAX_EVENTS = 500
MAX_BACKOFF_S = 30.0


class Fleet(Protocol):
    """Starting and stopping extra workers (the composition root owns processes)."""

    @property
    def can_surge(self) -> bool: ...

    async def add_surge(self) -> Backend: ...

    async def retire(self, backend: Backend) -> None: ...


@dataclass
class Event:
    time: float  # unix time
    worker: str | None
    phase: str
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"time": self.time, "worker": self.worker, "phase": self.phase, "message": self.message}


@dataclass
class Rollout:
    id: int
    old: dict[str, frozenset[int]]
    new: dict[str, frozenset[int]]
    old_default: dict[str, int | None]
    new_default: dict[str, int | None]
    strategy: str
    mode: str
    reason: str
    started: float
    phase: str = LOAD
    switched: bool = False
    state: str = RUNNING
    ended: float | None = None
    error: str | None = None
    blocked: str | None = None
    surge: bool = False
    failed_versions: list[tuple[str, int]] = field(default_factory=list)
    # An operator's rollout pins versions; a rollback puts the pins back as they were.
    pins_before: dict[str, tuple[int, ...] | None] = field(default_factory=dict)
    workers: dict[str, str] = field(default_factory=dict)  # worker -> its current phase
    events: list[Event] = field(default_factory=list)

    def view(self) -> planmod.RolloutView:
        return planmod.RolloutView(self.old, self.new, self.phase, self.switched, self.old_default, self.new_default)

    def changes(self) -> str:
        parts = []
        for m in sorted({*self.old, *self.new}):
            before, after = sorted(self.old.get(m, ())), sorted(self.new.get(m, ()))
            if before != after:
                parts.append(f"{m} {before or '[]'} -> {after or '[]'}")
        return ", ".join(parts) or "no change"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "phase": self.phase,
            "switched": self.switched,
            "strategy": self.strategy,
            "mode": self.mode,
            "surge": self.surge,
            "reason": self.reason,
            "from": {m: sorted(v) for m, v in self.old.items()},
            "to": {m: sorted(v) for m, v in self.new.items()},
            "default_from": self.old_default,
            "default_to": self.new_default,
            "started": self.started,
            "ended": self.ended,
            "error": self.error,
            "blocked": self.blocked,
            "failed_versions": [{"model": m, "version": v} for m, v in self.failed_versions],
            "workers": dict(self.workers),
            "events": [e.to_json() for e in self.events],
        }


@dataclass
class _Step:
    task: asyncio.Task[None]
    kind: str


class Controller:
    def __init__(self, config: Config, pool: Pool, registry: Registry, source: VersionSource, metrics: Metrics,
                 fleet: Fleet | None = None, *, on_change: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.time, rpc_timeout: float = 60.0) -> None:
        self.config = config
        self.pool = pool
        self.registry = registry
        self.source = source
        self.metrics = metrics
        self.fleet = fleet
        self.settings = config.rollout
        self._on_change = on_change or (lambda: None)
        self._clock = clock
        self.rpc_timeout = rpc_timeout
        self.current: dict[str, frozenset[int]] = {m.name: frozenset() for m in config.models}
        self.rollout: Rollout | None = None
        self.history: deque[Rollout] = deque(maxlen=HISTORY)
        self._next_id = 1
        self._steps: dict[str, _Step] = {}
        self._retry_at: dict[str, float] = {}
        self._backoff: dict[str, float] = {}
        self._phase_started: dict[str, tuple[str, float]] = {}
        self._wake = asyncio.Event()
        self._blocked_logged: str | None = None
        self._stopping = False
        self.passive = False  # workers.control: passive (router/control/passive.py) runs instead
        metrics.track_control(self.metric_families)

    # -- the loop ------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def set_models(self, config: Config) -> None:
        """Follow a new model list.  A new model is loaded by the next rollout; a removed
        one stays in ``current`` so that rollout also unloads it from the workers."""
        self.config = config
        names = {m.name for m in config.models}
        for name in names:
            self.current.setdefault(name, frozenset())
        r = self.rollout
        if r is not None:  # it cannot load or restore a model that is no longer configured
            for table in (r.old, r.new, r.old_default, r.new_default):
                for name in [n for n in table if n not in names]:
                    del table[name]

    async def run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                self.reconcile()
            except Exception:  # the control loop must survive its own bugs: log, go on
                log.exception("rollout controller pass failed")
            pause = 1.0
            if self._retry_at:
                pause = max(0.01, min(pause, min(self._retry_at.values()) - time.monotonic()))
            try:
                async with asyncio.timeout(pause):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def stop(self) -> None:
        self._stopping = True
        self.wake()
        tasks = [s.task for s in self._steps.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def limits(self) -> planmod.Limits:
        s = self.settings
        return planmod.Limits(staged=s.strategy == "staged", swap=s.mode == "swap", surge=s.surge,
                              can_surge=self.fleet is not None and self.fleet.can_surge,
                              max_unavailable=s.max_unavailable, min_serving=s.min_serving)

    def desired(self) -> dict[str, frozenset[int]]:
        return {m.name: frozenset(self.source.wanted(m.name, self.current[m.name])) for m in self.config.models}

    def reconcile(self) -> None:
        """One pass: start a rollout if the versions to serve changed, then act on the plan."""
        if self._stopping:
            return
        now = time.monotonic()
        for name, at in list(self._retry_at.items()):
            if at <= now:
                del self._retry_at[name]
        desired = self.desired()
        if self.rollout is None and desired != self.current:
            self._begin(desired, "versions changed on disk")
        r = self.rollout
        for m in self.config.models:
            # What will be served: explicit requests for one of these not loaded yet are UNAVAILABLE,
            # for any other NOT_FOUND (a version on its way out, after the switch, is gone).
            if r is None:
                coming = desired[m.name] | self.current[m.name]
            elif r.phase == ROLLBACK:
                coming = r.old.get(m.name, frozenset())
            else:
                coming = r.new.get(m.name, frozenset()) | (frozenset() if r.switched else r.old.get(m.name, frozenset()))
            self.registry.aspired[m.name] = tuple(sorted(coming))
        view = r.view() if r is not None else planmod.RolloutView(self.current, self.current, STEADY, True,
                                                                  self.registry.default, self.registry.default)
        workers = [self._worker_view(b) for b in self.pool.backends]
        for action in planmod.plan(view, workers, self.limits()):
            self._apply(action)

    def _worker_view(self, b: Backend) -> planmod.WorkerView:
        return planmod.WorkerView(
            name=b.name,
            live=b.transport is not None and b.state != DEAD,
            in_rotation=b.state == READY,
            busy=b.name in self._steps,
            held=b.held(),
            warm=dict(b.warm),
            cordoned=b.cordoned,
            surge=b.surge,
            waiting=b.name in self._retry_at,
        )

    def _apply(self, action: planmod.Action) -> None:
        r = self.rollout
        if isinstance(action, planmod.Prepare):
            backend = self.pool.by_name(action.worker)
            self._start_step(backend, "prepare", self._prepare(backend, action))
        elif isinstance(action, planmod.Switch):
            assert r is not None
            for model, version in action.defaults.items():
                self.registry.switch(model, version)
            r.switched = True
            r.phase = action.then
            self._event(None, "switch", "unversioned requests now go to "
                        + ", ".join(f"{m} {v}" for m, v in sorted(action.defaults.items())))
            self._on_change()
            self.wake()
        elif isinstance(action, planmod.AddSurge):
            assert r is not None and self.fleet is not None
            r.surge = True
            self._start_step(None, "surge", self._add_surge())
        elif isinstance(action, planmod.Retire):
            backend = self.pool.by_name(action.worker)
            self._start_step(backend, "retire", self._retire(backend))
        elif isinstance(action, planmod.Finish):
            self._finish(action.result)
        elif isinstance(action, planmod.Blocked):
            if r is not None:
                r.blocked = action.reason
            if self._blocked_logged != action.reason:
                self._blocked_logged = action.reason
                log.warning("rollout waits: %s", action.reason)

    def _start_step(self, backend: Backend | None, kind: str, coro: Any) -> None:
        key = backend.name if backend is not None else f"_{kind}"
        if key in self._steps:
            coro.close()
            return
        task = asyncio.get_running_loop().create_task(coro, name=f"rollout-{kind}-{key}")
        self._steps[key] = _Step(task, kind)

        def done(_: asyncio.Task[None]) -> None:
            self._steps.pop(key, None)
            self._on_change()
            self.wake()

        task.add_done_callback(done)

    # -- rollouts ------------------------------------------------------------------

    def _begin(self, desired: dict[str, frozenset[int]], reason: str) -> Rollout:
        old = dict(self.current)
        r = Rollout(
            id=self._next_id, old=old, new=desired,
            old_default={m: self.registry.default[m] for m in desired},
            new_default=planmod.default_of(desired),
            strategy=self.settings.strategy, mode=self.settings.mode, reason=reason, started=self._clock(),
        )
        self._next_id += 1
        self.rollout = r
        self._blocked_logged = None
        self.metrics.rollout_started()
        self._event(None, LOAD, f"rollout {r.id}: {r.changes()} ({reason}; {r.strategy}, {r.mode})")
        return r

    def _finish(self, result: str) -> None:
        r = self.rollout
        assert r is not None
        r.state = ROLLED_BACK if result == "rolled_back" else DONE
        r.phase = "done"
        r.ended = self._clock()
        r.blocked = None
        self.current = dict(r.old if r.state == ROLLED_BACK else r.new)
        if r.state == ROLLED_BACK:
            for model, pin in r.pins_before.items():
                self.source.pin(model, pin)
        for m, v in (r.old_default if r.state == ROLLED_BACK else r.new_default).items():
            self.registry.switch(m, v)
        self._event(None, "done", f"rollout {r.id} {r.state.replace('_', ' ')} after "
                    f"{r.ended - r.started:.1f}s: serving {self._serving_text()}")
        self.metrics.rollout_finished(r.state, r.ended - r.started)
        self.history.append(r)
        self.rollout = None
        self._on_change()
        self.wake()

    def _serving_text(self) -> str:
        return ", ".join(f"{m} {sorted(v)}" for m, v in sorted(self.current.items()))

    def _roll_back(self, reason: str, versions: Iterable[tuple[str, int]], code: object = None) -> None:
        """Fail the running rollout before its switch: every worker goes back to the old versions."""
        r = self.rollout
        if r is None or r.phase != LOAD or r.switched:
            return
        r.phase = ROLLBACK
        r.error = reason
        number = CODE_NUMBER.get(code if isinstance(code, grpc.StatusCode) else FailedPrecondition.code, 9)
        for model, version in versions:
            if (model, version) in r.failed_versions:
                continue
            r.failed_versions.append((model, version))
            self.source.mark_failed(model, version, reason)
            self.registry.failed[(model, version)] = (number, reason)
        self.metrics.version_failed()
        self._event(None, ROLLBACK, f"rolling back: {reason}")
        self.wake()

    # -- operator commands -----------------------------------------------------------

    def request(self, model: str, version: int | None, reason: str) -> Rollout | None:
        """Roll ``model`` out to ``version`` (None: what its policy says); the rollout, or None if nothing changes.

        Retries the version if it had failed.  Raises ValueError when a
        rollout is running or the version is not complete on disk.
        """
        if self.passive:
            raise RolloutBusy(PASSIVE)
        if self.rollout is not None:
            raise RolloutBusy(f"rollout {self.rollout.id} is running ({self.rollout.changes()}); "
                              "abort it or wait for it to end")
        if version is not None and not self.source.complete(model, version):
            raise ValueError(f"version {version} of model {model} is not a complete version directory "
                             f"under {self.registry.model(model).base_path}")
        pin_before = self.source.pinned(model)
        if version is None:
            for v in list(self.source.failed(model)):
                self._forget_failure(model, v)
            self.source.pin(model, None)
        else:
            self._forget_failure(model, version)
            self.source.pin(model, [version])
        desired = self.desired()
        if desired == self.current:
            return None
        r = self._begin(desired, reason)
        r.pins_before[model] = pin_before
        self.wake()
        return r

    def _forget_failure(self, model: str, version: int) -> None:
        self.source.retry(model, version)
        self.registry.failed.pop((model, version), None)

    def abort(self, reason: str = "aborted by an operator") -> Rollout:
        if self.passive:
            raise RolloutBusy(PASSIVE)
        r = self.rollout
        if r is None:
            raise RolloutBusy("no rollout is running")
        if r.switched or r.phase != LOAD:
            raise RolloutBusy(f"rollout {r.id} is past its switch ({r.phase}); roll back with a new rollout instead")
        new_versions = [(m, v) for m in r.new for v in sorted(r.new[m] - r.old.get(m, frozenset()))]
        self._roll_back(reason, new_versions)
        return r

    def rollback(self, model: str, version: int | None) -> Rollout | None:
        """Back to ``version``, or to the version served before the last completed rollout of ``model``."""
        if version is None:
            for past in reversed(self.history):
                if past.state == DONE and past.old.get(model) and past.old[model] != past.new.get(model):
                    version = max(past.old[model])
                    break
            else:
                raise ValueError(f"no earlier version of {model} to roll back to; name one")
        return self.request(model, version, f"rollback to version {version} requested by an operator")

    def drain(self, name: str, cordon: bool) -> Backend:
        backend = self.pool.by_name(name)
        backend.cordoned = cordon
        if cordon and backend.state == READY:
            self.pool.set_state(backend, DRAINED)
            self._event(backend, "drained", "drained by an operator")
        elif not cordon and backend.state == DRAINED and backend.name not in self._steps:
            self.pool.set_state(backend, READY)
            self._event(backend, "join", "undrained by an operator")
        self._on_change()
        self.wake()
        return backend

    # -- worker events ---------------------------------------------------------------

    def worker_lost(self, backend: Backend, why: str) -> None:
        """A worker exited or failed its health checks (called before its state is cleared)."""
        r = self.rollout
        self._retry_at.pop(backend.name, None)
        self._backoff.pop(backend.name, None)
        if r is not None and r.phase == LOAD and not r.switched:
            held = backend.held()
            new = [(m, v) for m in r.new for v in sorted(r.new[m] - r.old.get(m, frozenset()))
                   if v in held.get(m, frozenset())]
            step = self._steps.get(backend.name)
            if new or (step is not None and step.kind == "prepare"):
                self._roll_back(f"worker {backend.name} {why} while holding or loading a new version",
                                new or [(m, v) for m in r.new for v in sorted(r.new[m] - r.old.get(m, frozenset()))])
        self.wake()

    # -- steps -----------------------------------------------------------------------

    def _event(self, backend: Backend | None, phase: str, message: str) -> None:
        now = self._clock()
        name = backend.name if backend is not None else None
        if name is not None:
            previous = self._phase_started.get(name)
            if previous is not None:
                self.metrics.rollout_phase(previous[0], now - previous[1])
            if phase in ("join", "retired", "failed", "drained"):
                self._phase_started.pop(name, None)
            else:
                self._phase_started[name] = (phase, now)
        r = self.rollout
        if r is not None:
            if name is not None:
                r.workers[name] = phase
            r.events.append(Event(now, name, phase, message))
            del r.events[:-MAX_EVENTS]
            log.info("rollout %d: %s%s: %s", r.id, f"{name} " if name else "", phase, message)
        else:
            log.info("%s%s: %s", f"{name} " if name else "", phase, message)

    async def _prepare(self, b: Backend, action: planmod.Prepare) -> None:
        generation = b.generation
        staged = self.settings.strategy == "staged"
        models = self.config.models
        try:
            if action.drain:
                self.pool.set_state(b, DRAINING)
                self._on_change()
                self._event(b, "drain", f"out of rotation, {b.inflight} in flight")
                if not await self.pool.wait_idle(b, self.settings.drain_timeout_s):
                    log.warning("%s still had %d requests in flight after %.0fs; going on",
                                b.name, b.inflight, self.settings.drain_timeout_s)
            held = b.held()
            adding = _minus(action.hold, held)
            removing = _minus(held, action.hold)
            out_of_rotation = b.state != READY
            pace = self._pace(b) if out_of_rotation else None
            if removing and not out_of_rotation:
                # In place: stop routing what goes away before the worker drops it.
                b.versions = {m: {v: s for v, s in vs.items() if v not in removing.get(m, frozenset())}
                              for m, vs in b.versions.items()}
                self.pool.fail_waiters()
            timeout = self.settings.load_timeout_s
            if action.unload_first and removing and adding:
                keep = {m: held.get(m, frozenset()) & action.hold.get(m, frozenset()) for m in action.hold}
                self.pool.set_state(b, UNLOADING)
                self._event(b, "unload", f"unloading {_text(removing)} first (swap mode)")
                await sync.hold(b, models, keep, self.registry, generation, timeout, pace)
                removing = {}
            if adding or b.state == STARTING or not b.versions:
                if out_of_rotation:
                    self.pool.set_state(b, LOADING)
                self._event(b, "load", f"loading {_text(adding) or 'the configured versions'}")
                await sync.hold(b, models, action.hold, self.registry, generation, timeout, pace)
            elif removing:
                if out_of_rotation:
                    self.pool.set_state(b, UNLOADING)
                self._event(b, "unload", f"unloading {_text(removing)}")
                await sync.hold(b, models, action.hold, self.registry, generation, timeout, pace)
            if staged:
                cold = _minus(action.hold, b.warm)
                if cold:
                    self.pool.set_state(b, WARMING)
                    self._event(b, "warm", f"warming {_text(cold)}")
                    await self._warm(b, cold, generation, pace)
            if b.generation != generation:
                raise sync.WorkerRestarted(f"worker {b.name} restarted")
            b.warm = {m: frozenset(vs) for m, vs in action.hold.items()}
            self._backoff.pop(b.name, None)
            self.pool.set_state(b, DRAINED if b.cordoned else READY)
            self._event(b, "join", f"holds {_text(b.held()) or 'nothing'}"
                        + (" (stays drained)" if b.cordoned else "; in rotation"))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._step_failed(b, action, exc, generation)

    def _pace(self, b: Backend) -> str | None:
        """How a worker out of rotation converts (``rollout.pace_*``): in bursts while other
        workers serve, so that it never holds them back; at full speed when none does (a
        pool starting, or one that lost every worker), where nobody waits on anything else."""
        s = self.settings
        if s.pace_run_ms <= 0 or not any(o.routable for o in self.pool.backends if o is not b):
            return None
        return f"{s.pace_run_ms:g}/{s.pace_pause_ms:g}"

    async def _warm(self, b: Backend, cold: Versions, generation: int, pace: str | None) -> None:
        assert b.transport is not None
        for model, versions in sorted(cold.items()):
            settings = self.registry.model(model).batching
            for version in sorted(versions):
                meta = self.registry.metadata(model, version)
                version_dir = Path(self.registry.model(model).base_path) / str(version)
                source, requests = await asyncio.to_thread(warmup_requests, model, version, version_dir,
                                                           meta.signatures, settings)
                try:
                    report = await warm(b.transport, requests, source=source,
                                        budget_s=self.settings.warmup_budget_s,
                                        max_rounds=self.settings.warmup_max_rounds, rpc_timeout=self.rpc_timeout,
                                        pace=pace)
                except WarmupFailed as exc:
                    exc.model, exc.version = model, version  # type: ignore[attr-defined]
                    raise
                if b.generation != generation:
                    raise sync.WorkerRestarted(f"worker {b.name} restarted")
                self._event(b, "warm", f"{model} version {version}: {report.requests} requests from its "
                            f"{report.source} in {len(report.rounds)} rounds "
                            f"({'settled' if report.settled else 'budget spent'}, last round "
                            f"{report.rounds[-1] * 1000 if report.rounds else 0:.1f} ms)")

    def _step_failed(self, b: Backend, action: planmod.Prepare, exc: Exception, generation: int) -> None:
        message = exc.message if isinstance(exc, ServingError) else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, TimeoutError):
            message = f"no answer within rollout.load_timeout_s ({self.settings.load_timeout_s:.0f}s)"
        restarted = b.generation != generation or isinstance(exc, (TransportError, sync.WorkerRestarted))
        if not restarted:
            self.pool.set_state(b, DRAINED)  # out of rotation until a step succeeds
        self._event(b, "failed", message)
        if not isinstance(exc, (ServingError, TimeoutError)):
            log.error("step on %s failed unexpectedly", b.name, exc_info=exc)
        r = self.rollout
        new = {m: vs - (r.old.get(m, frozenset()) if r else frozenset()) for m, vs in action.hold.items()}
        loading_new = r is not None and any(new.values())
        if r is not None and r.phase == LOAD and not r.switched and loading_new:
            model = getattr(exc, "model", None)
            version = getattr(exc, "version", None)
            versions = [(model, version)] if model is not None and version is not None else [
                (m, v) for m, vs in sorted(new.items()) for v in sorted(vs)]
            what = "warm-up" if isinstance(exc, WarmupFailed) else "load" if isinstance(exc, sync.LoadFailed) else "step"
            self._roll_back(f"{what} of {_pairs(versions)} on {b.name} failed: {message}", versions,
                            getattr(exc, "code", None) if isinstance(exc, ServingError) else None)
            return
        delay = self._backoff.get(b.name, self.settings.retry_backoff_s)
        self._backoff[b.name] = min(delay * 2, MAX_BACKOFF_S)
        self._retry_at[b.name] = time.monotonic() + delay
        log.warning("%s: step failed (%s); retrying in %.1fs", b.name, message, delay)

    async def _add_surge(self) -> None:
        assert self.fleet is not None
        try:
            backend = await self.fleet.add_surge()
        except Exception as exc:
            log.exception("could not start a surge worker")
            if self.rollout is not None:
                self.rollout.blocked = f"could not start a surge worker: {exc}"
            return
        self._event(backend, "surge", "extra worker started for the rollout")

    async def _retire(self, b: Backend) -> None:
        assert self.fleet is not None
        self.pool.set_state(b, DRAINING)
        self._event(b, "retire", "draining the surge worker")
        await self.pool.wait_idle(b, self.settings.drain_timeout_s)
        await self.fleet.retire(b)
        self._event(b, "retired", "surge worker stopped")

    # -- status ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        workers = []
        for b in self.pool.backends:
            workers.append({
                "name": b.name,
                "state": b.state,
                "in_rotation": b.routable,
                "pid": b.pid,
                "address": b.address,
                "inflight": b.inflight,
                "surge": b.surge,
                "cordoned": b.cordoned,
                "step": self._steps[b.name].kind if b.name in self._steps else None,
                "versions": {m: {str(v): _state_name(s.state) for v, s in sorted(vs.items())}
                             for m, vs in sorted(b.versions.items())},
                "warm": {m: sorted(vs) for m, vs in sorted(b.warm.items())},
            })
        models = []
        for m in self.config.models:
            models.append({
                "name": m.name,
                "base_path": m.base_path,
                "default_version": self.registry.default.get(m.name),
                "serving": sorted(self.pool.available_versions(m.name) if self.passive else self.current[m.name]),
                "available": sorted(self.pool.available_versions(m.name)),
                "complete_on_disk": list(self.source.candidates(m.name)),
                "pinned": self.source.pinned(m.name),
                "failed": {str(v): reason for v, reason in sorted(self.source.failed(m.name).items())},
                "switched_at": self.registry.switched_at.get(m.name),
            })
        return {
            "workers": workers,
            "models": models,
            "rollout": self.rollout.to_json() if self.rollout else None,
            "history": [r.to_json() for r in self.history],
            "settings": {"strategy": self.settings.strategy, "mode": self.settings.mode,
                         "surge": self.settings.surge, "max_unavailable": self.settings.max_unavailable,
                         "min_serving": self.settings.min_serving},
        }


    def metric_families(self) -> list[Metric]:
        """Gauges read from the control plane's state at scrape time."""
        held = GaugeMetricFamily("tfs_router_worker_versions", "1 for every version AVAILABLE on a worker.",
                                 labels=("worker", "model", "version"))
        for b in self.pool.backends:
            for model, versions in sorted(b.held().items()):
                for version in sorted(versions):
                    held.add_metric((b.name, model, str(version)), 1)
        default = GaugeMetricFamily("tfs_router_default_version",
                                    "The version unversioned requests of a model go to.", labels=("model",))
        since = GaugeMetricFamily("tfs_router_seconds_since_last_switch",
                                  "Seconds since unversioned requests of a model last moved to another version.",
                                  labels=("model",))
        now = self._clock()
        for m in self.config.models:
            serving = self.registry.default.get(m.name)
            if serving is not None:
                default.add_metric((m.name,), serving)
            at = self.registry.switched_at.get(m.name)
            if at is not None:
                since.add_metric((m.name,), now - at)
        phase = GaugeMetricFamily("tfs_router_rollout_phase", "1 for the running rollout's phase.",
                                  labels=("phase",))
        for name in (LOAD, UNLOAD, ROLLBACK):
            phase.add_metric((name,), 1 if self.rollout is not None and self.rollout.phase == name else 0)
        return [held, default, since, phase]


PASSIVE = ("workers.control is passive: the workers choose their versions; roll out by putting the version "
           "where they poll, or run the router with active control")


class RolloutBusy(Exception):
    """An operator command that does not fit the rollout state (HTTP 409)."""


def _minus(a: Mapping[str, frozenset[int]], b: Mapping[str, frozenset[int]]) -> dict[str, frozenset[int]]:
    out = {m: a.get(m, frozenset()) - b.get(m, frozenset()) for m in a}
    return {m: vs for m, vs in out.items() if vs}


def _text(versions: Mapping[str, frozenset[int]]) -> str:
    return ", ".join(f"{m} {sorted(vs)}" for m, vs in sorted(versions.items()) if vs)


def _pairs(pairs: Iterable[tuple[str, int]]) -> str:
    return ", ".join(f"{m} version {v}" for m, v in pairs)


def _state_name(state: int) -> str:
    return str(status_pb2.ModelVersionStatus.State.Name(state))
