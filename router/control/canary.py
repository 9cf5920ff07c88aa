"""Canary routing at run time, and progressive delivery with automatic rollback.

Holds each model's routing block (header rules, weighted split, sticky
header; ``router/traffic.py`` is the policy), validates a new one against the
model's labels and served versions and swaps it in with one assignment, so a
change is atomic for every request.  The operator's verbs:

    set_weight   the canary's share of the split (the rest goes to stable)
    promote      the canary gets all traffic at once and becomes the default;
                 the old version is retired through a staged rollout
    abort        the canary's weight goes to 0

A routing block with ``progressive.steps`` starts a progression: the canary
gets the first step's weight; every ``interval_s`` its window of requests
(``router/analysis.py``) is compared with stable's, and the verdict alone
decides: hold (too few requests), advance (the next step; promote after the
last), or abort (weight 0, the reason logged, exported and kept in the
status).  When a step leaves stable with too few requests to compare (the
last steps), the last stable window that had enough stands in.

In a two-version split the canary is the newer version and stable the
older.  Without a split, ``stable`` and ``canary`` labels name them, else
the default version and the newest other version served.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from router.analysis import ABORT, ADVANCE, HOLD, Checks, VersionStats, Window, verdict
from router.config import Config, RoutingConfig
from router.registry import Registry
from router.control.rollout import Controller, RolloutBusy
from router.metrics import Metrics
from router.traffic import Routing, RoutingError, compile_routing, stable_and_canary

log = logging.getLogger("router.control.canary")

RUNNING, PROMOTED, ABORTED, STOPPED = "running", "promoted", "aborted", "stopped"
TICK_S = 0.1
MAX_VERDICTS = 100


@dataclass
class Progress:
    """One model's progression through its steps; the status shows it as it is."""

    stable: int
    canary: int
    steps: tuple[int, ...]
    interval_s: float
    checks: Checks
    started: float  # unix time
    step: int = 0
    state: str = RUNNING
    step_started: float = 0.0  # monotonic
    step_started_at: float = 0.0  # unix time, the same moment (kept across restarts: router/state.py)
    reason: str = ""
    baseline: Window | None = None
    verdicts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def weight(self) -> int:
        return self.steps[self.step]

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "stable": self.stable, "canary": self.canary, "steps": list(self.steps),
                "step": self.step, "weight": self.weight, "interval_s": self.interval_s,
                "started": self.started, "reason": self.reason, "verdicts": list(self.verdicts)}


class CanaryController:
    def __init__(self, config: Config, registry: Registry, rollouts: Controller, stats: VersionStats,
                 metrics: Metrics, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.config = config
        self.registry = registry
        self.rollouts = rollouts
        self.stats = stats
        self.metrics = metrics
        self._clock = clock
        self._wall = wall
        self.documents: dict[str, dict[str, Any]] = {}
        self.progress: dict[str, Progress] = {}
        self._promoted: dict[str, int] = {}  # model -> promoted version, until the default is it
        self._retry_retire: set[str] = set()  # promotions whose rollout waits for another to end
        self._stopping = False
        # A fleet on etcd (router/fleet.py): only its leader judges, from the fleet's windows, and is
        # told when it did (to write where the progression is at once); the others follow it.
        self.judge: Callable[[], bool] = lambda: True
        self.windows: Callable[[str, Progress], dict[int, Window]] = lambda model, progress: self.stats.take(model)
        self.on_judged: Callable[[str], None] = lambda model: None
        for m in config.models:
            doc = m.routing.document()
            if doc:
                self.apply(m.name, doc, check_versions=False)
        metrics.track_routing(self.metric_families)

    def set_models(self, config: Config) -> None:
        """Follow a new model list: a new model, or one whose configured routing changed,
        takes its routing block; a removed model's routing and progression are dropped
        (the registry has already been told, so call this after it)."""
        old = {m.name: m for m in self.config.models}
        self.config = config
        names = {m.name for m in config.models}
        for name in [n for n in self.documents if n not in names]:
            self.documents.pop(name, None)
        for name in [n for n in self.progress if n not in names]:
            self._stop(name)
            self.progress.pop(name, None)
        for name in [n for n in self._promoted if n not in names]:
            self._promoted.pop(name, None)
        for m in config.models:
            if m.name not in old or old[m.name].routing != m.routing or old[m.name].version_labels != m.version_labels:
                self.apply(m.name, m.routing.document(), check_versions=False)

    # -- the routing block -----------------------------------------------------

    def get(self, model: str) -> dict[str, Any]:
        self.registry.model(model)
        return copy.deepcopy(self.documents.get(model, {}))

    def apply(self, model: str, document: Mapping[str, Any], *, check_versions: bool = True,
              keep_progress: bool = False) -> dict[str, Any]:
        """Validate and swap in a model's routing block; RoutingError (HTTP 400) says why not."""
        self.registry.model(model)
        known = self.registry.served(model) if check_versions else None
        routing = compile_routing(document, self.registry.labels[model], known)
        if not keep_progress:
            self._stop(model)
        self.documents[model] = routing.document
        if routing.empty:
            self.registry.routing.pop(model, None)
        else:
            self.registry.routing[model] = routing
        steps = (routing.document.get("progressive") or {}).get("steps")
        if steps and not keep_progress:
            self._start(model, routing)
        log.info("model %s: routing %s", model, routing.document or "none (default version)")
        return self.get(model)

    def roles(self, model: str) -> tuple[int, int]:
        """(stable, canary) versions of a model."""
        routing = self.registry.routing.get(model)
        if routing is not None and routing.split is not None and len(routing.split.weights) == 2:
            return stable_and_canary(routing.split)
        labels = self.registry.labels[model]
        served = self.registry.served(model)
        stable = labels.get("stable", self.registry.default.get(model))
        if stable is None:
            raise RoutingError(f"model {model} serves no version yet")
        canary = labels.get("canary")
        if canary is None:
            others = sorted(served - {stable})
            if not others:
                raise RoutingError(f"model {model} serves no version besides {stable}: nothing to canary")
            canary = others[-1]
        return stable, canary

    def _ref(self, model: str, version: int) -> str:
        """How a version is named in a split: its label when it has one."""
        for label in ("stable", "canary"):
            if self.registry.labels[model].get(label) == version:
                return label
        return str(version)

    def _with_weight(self, model: str, stable: int, canary: int, weight: int) -> dict[str, Any]:
        doc = self.get(model)
        doc["split"] = {self._ref(model, stable): 100 - weight, self._ref(model, canary): weight}
        if self._ref(model, stable) == self._ref(model, canary):
            doc["split"] = {str(stable): 100 - weight, str(canary): weight}
        return doc

    # -- operator verbs --------------------------------------------------------

    def set_weight(self, model: str, weight: int) -> dict[str, Any]:
        if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= 100:
            raise RoutingError(f"weight must be a whole percent from 0 to 100, got {weight!r}")
        stable, canary = self.roles(model)
        doc = self._with_weight(model, stable, canary, weight)
        doc.pop("progressive", None)  # an operator's weight ends any progression
        return self.apply(model, doc)

    def abort(self, model: str, reason: str = "aborted by an operator") -> dict[str, Any]:
        stable, canary = self.roles(model)
        progress = self.progress.get(model)
        doc = self._with_weight(model, stable, canary, 0)
        if progress is not None and progress.state == RUNNING:
            progress.state, progress.reason = ABORTED, reason
        doc.pop("progressive", None)
        result = self.apply(model, doc, keep_progress=True)
        log.warning("model %s: canary version %d aborted (weight 0): %s", model, canary, reason)
        return result

    def promote(self, model: str, reason: str = "promoted by an operator") -> dict[str, Any]:
        """The canary answers all unversioned traffic now, becomes the default, and the old is retired."""
        stable, canary = self.roles(model)
        progress = self.progress.get(model)
        if progress is not None and progress.state == RUNNING:
            progress.state, progress.reason = PROMOTED, reason
        labels = self.registry.labels[model]
        if "stable" in labels:
            labels["stable"] = canary  # the promoted version is the stable one from now on
        doc = self.get(model)
        doc["split"] = {str(canary): 100}
        doc.pop("progressive", None)
        result = self.apply(model, doc, keep_progress=True)
        self._promoted[model] = canary
        self._retire_old(model, canary)
        log.info("model %s: canary version %d promoted (%s); version %d retires", model, canary, reason, stable)
        return result

    def _retire_old(self, model: str, canary: int) -> None:
        self._retry_retire.discard(model)
        if self.rollouts.passive:  # the workers choose what they hold: nothing to retire from here
            log.info("model %s: version %d promoted; passive control, so the old version stays where the "
                     "workers keep it", model, canary)
            self._promoted.pop(model, None)
            return
        try:
            self.rollouts.request(model, canary, f"canary version {canary} promoted")
        except RolloutBusy:
            self._retry_retire.add(model)  # tried again once the running rollout ends
        except ValueError as exc:
            log.warning("model %s: promoted version %d stays beside the old one: %s", model, canary, exc)
            self._promoted.pop(model, None)

    # -- progressive delivery --------------------------------------------------

    def _start(self, model: str, routing: Routing) -> None:
        p = routing.document["progressive"]
        assert routing.split is not None
        stable, canary = stable_and_canary(routing.split)
        defaults = RoutingConfig().progressive
        progress = Progress(
            stable=stable, canary=canary, steps=tuple(p["steps"]),
            interval_s=float(p.get("interval_s", defaults.interval_s)),
            checks=Checks(int(p.get("min_requests", defaults.min_requests)),
                          float(p.get("max_error_rate_delta", defaults.max_error_rate_delta)),
                          float(p.get("max_p99_ratio", defaults.max_p99_ratio))),
            started=self._wall(),
        )
        self.progress[model] = progress
        self._enter_step(model, progress, 0)

    def resumable(self, model: str, ended: bool = False) -> dict[str, Any] | None:
        """Where a progression is (router/state.py keeps it): step, when it started, the verdicts; with
        ``ended``, also one that ended, with its outcome (a fleet's other replicas follow it)."""
        progress = self.progress.get(model)
        if progress is None or (progress.state != RUNNING and not (ended and progress.state in (PROMOTED, ABORTED))):
            return None
        return {"step": progress.step, "step_started_at": progress.step_started_at, "started": progress.started,
                "verdicts": list(progress.verdicts), "state": progress.state, "reason": progress.reason}

    def follow(self, model: str, where: dict[str, Any]) -> None:
        """A replica that does not judge takes the judge's place in the progression (its step, when the
        step started, its verdicts, its outcome); its own window starts again with each new step."""
        progress = self.progress.get(model)
        step = int(where.get("step", 0))
        if progress is None or not 0 <= step < len(progress.steps):
            return
        at = float(where.get("step_started_at", progress.step_started_at))
        if (step, at) != (progress.step, progress.step_started_at):
            self.stats.take(model)  # the judge's new step (or a hold): a new window
        progress.step, progress.step_started_at = step, at
        progress.step_started = self._clock() - max(0.0, self._wall() - at)
        progress.started = float(where.get("started", progress.started))
        progress.verdicts = list(where.get("verdicts", []))[-MAX_VERDICTS:]
        state = where.get("state", RUNNING)
        if state in (PROMOTED, ABORTED) and progress.state != state:
            progress.state, progress.reason = state, str(where.get("reason", ""))
            log.info("model %s: the fleet's leader %s the canary version %d: %s", model, state, progress.canary,
                     progress.reason)
            if state == PROMOTED:  # decided by the leader; carried out here too (the old version retires)
                if "stable" in self.registry.labels[model]:
                    self.registry.labels[model]["stable"] = progress.canary
                self._promoted[model] = progress.canary
                self._retire_old(model, progress.canary)

    def resume(self, model: str, where: dict[str, Any]) -> None:
        """Continue a progression kept from before a restart at the step it was at, the time it had
        spent in that step counted (the routing block, with its progressive steps, applied first)."""
        progress = self.progress.get(model)
        step = int(where.get("step", 0))
        if (progress is None or progress.state != RUNNING or where.get("state", RUNNING) != RUNNING
                or not 0 <= step < len(progress.steps)):
            return
        progress.started = float(where.get("started", progress.started))
        progress.verdicts = list(where.get("verdicts", []))[-MAX_VERDICTS:]
        if step != progress.step:
            self._enter_step(model, progress, step)
        at = float(where.get("step_started_at", self._wall()))
        progress.step_started_at = at
        progress.step_started = self._clock() - max(0.0, self._wall() - at)
        log.info("model %s: progression resumed at step %d of %d (%d%%)", model, step + 1, len(progress.steps),
                 progress.weight)

    def _stop(self, model: str) -> None:
        progress = self.progress.get(model)
        if progress is not None and progress.state == RUNNING:
            progress.state, progress.reason = STOPPED, "routing replaced"

    def _enter_step(self, model: str, progress: Progress, step: int) -> None:
        progress.step = step
        progress.step_started = self._clock()
        progress.step_started_at = self._wall()
        doc = self._with_weight(model, progress.stable, progress.canary, progress.weight)
        self.apply(model, doc, keep_progress=True)
        self.stats.take(model)  # each window covers one step
        log.info("model %s: canary version %d at %d%% (step %d of %d)", model, progress.canary, progress.weight,
                 step + 1, len(progress.steps))

    def evaluate(self, model: str) -> str:
        """Judge the step that just ended; returns the verdict's action."""
        progress = self.progress[model]
        windows = self.windows(model, progress)
        stable = windows.get(progress.stable, Window())
        canary = windows.get(progress.canary, Window())
        if stable.requests >= progress.checks.min_requests:
            progress.baseline = stable
        elif progress.baseline is not None:
            stable = progress.baseline
        result = verdict(stable, canary, progress.checks)
        progress.reason = result.reason
        progress.verdicts.append({"time": self._wall(), "step": progress.step, "weight": progress.weight,
                                  "verdict": result.action, "reason": result.reason,
                                  "stable": dict(result.stable), "canary": dict(result.canary)})
        del progress.verdicts[:-MAX_VERDICTS]
        self.metrics.canary_verdict(model, result.action)
        log.info("model %s: canary at %d%%: %s (%s)", model, progress.weight, result.action, result.reason)
        if result.action == ABORT:
            self.abort(model, result.reason)
        elif result.action == ADVANCE:
            if progress.step + 1 < len(progress.steps):
                self._enter_step(model, progress, progress.step + 1)
            else:
                self.promote(model, f"every step healthy ({result.reason})")
        else:
            progress.step_started = self._clock()  # hold: judge the same step again after another interval
            progress.step_started_at = self._wall()
        return result.action if result.action != HOLD else HOLD

    async def run(self) -> None:
        while not self._stopping:
            await asyncio.sleep(TICK_S)
            try:
                self.tick()
            except Exception:  # the loop must survive its own bugs: log, go on
                log.exception("canary controller pass failed")

    def tick(self) -> None:
        now = self._clock()
        for model, progress in list(self.progress.items()):
            if progress.state == RUNNING and now - progress.step_started >= progress.interval_s and self.judge():
                self.evaluate(model)
                self.on_judged(model)
        for model, version in list(self._promoted.items()):
            if model in self._retry_retire:
                # Promoted while another rollout ran: the old version still has to be retired, even
                # when that rollout already moved the default to the promoted version.
                if self.rollouts.rollout is None:
                    self._retire_old(model, version)
                continue
            if self.registry.default.get(model) == version:
                # The rollout switched: the default is the promoted version, the split has done its job.
                del self._promoted[model]
                doc = self.get(model)
                if doc.get("split") == {str(version): 100}:
                    doc.pop("split")
                    self.apply(model, doc, keep_progress=True)

    def stop(self) -> None:
        self._stopping = True

    # -- status and metrics ----------------------------------------------------

    def status(self, model: str) -> dict[str, Any]:
        routing = self.registry.routing.get(model)
        weights = {str(v): w for v, w in sorted(routing.split.weights.items())} if routing and routing.split else {}
        progress = self.progress.get(model)
        return {"routing": self.get(model), "weights": weights,
                "labels": dict(self.registry.labels[model]),
                "progressive": progress.to_json() if progress is not None else None}

    def metric_families(self) -> list[Metric]:
        weight = GaugeMetricFamily("tfs_router_split_weight", "Percent of a model's unversioned traffic a version "
                                   "gets from the split in force (rules aside).", labels=("model", "version"))
        step = GaugeMetricFamily("tfs_router_canary_progress_weight",
                                 "The canary weight of a running progression; -1 once it ended.", labels=("model",))
        state = GaugeMetricFamily("tfs_router_canary_state", "1 for the state of a model's progression.",
                                  labels=("model", "state"))
        for model, routing in sorted(self.registry.routing.items()):
            if routing.split is not None:
                for version, w in sorted(routing.split.weights.items()):
                    weight.add_metric((model, str(version)), w)
        for model, progress in sorted(self.progress.items()):
            step.add_metric((model,), progress.weight if progress.state == RUNNING else -1)
            for name in (RUNNING, PROMOTED, ABORTED, STOPPED):
                state.add_metric((model, name), 1 if progress.state == name else 0)
        return [weight, step, state]
