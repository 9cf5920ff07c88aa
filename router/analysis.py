"""Canary analysis: per-version request windows, and the verdict that moves a canary on (pure).

The data plane records every Predict it answers in ``VersionStats``: the
version that answered (or was chosen), whether it failed through the
server's fault, and how long it took.  Every ``interval_s`` the progressive
controller takes the window of each version and asks ``verdict`` to compare
the canary with the stable version:

    hold     too few canary requests to judge (fewer than min_requests)
    abort    canary error rate - stable's > max_error_rate_delta, or
             canary p99 > max_p99_ratio x stable's
    advance  healthy: the next step (or promote after the last)

Errors that are the client's fault (INVALID_ARGUMENT, NOT_FOUND,
FAILED_PRECONDITION, cancellations) never count against a version.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Status codes that count as a version's own failure.
SERVER_FAULTS = frozenset({"INTERNAL", "UNKNOWN", "UNAVAILABLE", "DEADLINE_EXCEEDED", "DATA_LOSS",
                           "UNIMPLEMENTED"})
MAX_SAMPLES = 20_000  # latencies kept per version and window (a uniform sample beyond that)

HOLD, ABORT, ADVANCE = "hold", "abort", "advance"


@dataclass
class Window:
    """One version's requests over one interval."""

    requests: int = 0
    errors: int = 0
    samples: list[float] = field(default_factory=list)  # latencies, seconds
    seen: int = 0  # latencies offered (the reservoir's count)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def p99(self) -> float:
        if not self.samples:
            return float("nan")
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]

    def summary(self, max_samples: int, rng: random.Random) -> dict[str, Any]:
        """This window for another replica to merge (router/fleet.py): counts, and a uniform sample of
        at most ``max_samples`` latencies (microseconds)."""
        kept = self.samples if len(self.samples) <= max_samples else rng.sample(self.samples, max_samples)
        return {"requests": self.requests, "errors": self.errors, "seen": self.seen,
                "samples_us": [round(s * 1e6) for s in kept]}

    def add(self, summary: Mapping[str, Any]) -> None:
        """Count another replica's window (a ``summary``) in this one."""
        self.requests += int(summary["requests"])
        self.errors += int(summary["errors"])
        self.seen += int(summary["seen"])
        self.samples.extend(us / 1e6 for us in summary["samples_us"])

    def to_json(self) -> dict[str, float | int | None]:
        p99 = self.p99()
        return {"requests": self.requests, "errors": self.errors, "error_rate": round(self.error_rate, 6),
                "p99_ms": None if math.isnan(p99) else round(p99 * 1000, 3)}


class VersionStats:
    """Windows per (model, version), filled by the data plane, taken by the analysis."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._windows: dict[tuple[str, int], Window] = {}
        self._rng = rng or random.Random()

    def record(self, model: str, version: int, code: str, seconds: float) -> None:
        key = (model, version)
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = Window()
        window.requests += 1
        if code in SERVER_FAULTS:
            window.errors += 1
        window.seen += 1
        if len(window.samples) < MAX_SAMPLES:
            window.samples.append(seconds)
        else:  # reservoir sampling: every latency equally likely to be kept
            slot = self._rng.randrange(window.seen)
            if slot < MAX_SAMPLES:
                window.samples[slot] = seconds

    def peek(self, model: str) -> dict[int, Window]:
        """The model's windows so far (not taken)."""
        return {v: w for (m, v), w in self._windows.items() if m == model}

    def take(self, model: str) -> dict[int, Window]:
        """The model's windows since the last take; the next ones start empty."""
        taken = {v: w for (m, v), w in self._windows.items() if m == model}
        for version in taken:
            del self._windows[(model, version)]
        return taken


@dataclass(frozen=True)
class Checks:
    min_requests: int
    max_error_rate_delta: float
    max_p99_ratio: float


@dataclass(frozen=True)
class Verdict:
    action: str  # HOLD, ABORT or ADVANCE
    reason: str
    stable: Mapping[str, float | int | None]
    canary: Mapping[str, float | int | None]


def verdict(stable: Window, canary: Window, checks: Checks) -> Verdict:
    """Compare one interval of the canary with the stable version."""
    s, c = stable.to_json(), canary.to_json()
    if canary.requests < checks.min_requests:
        return Verdict(HOLD, f"{canary.requests} canary requests, fewer than min_requests "
                       f"{checks.min_requests}", s, c)
    delta = canary.error_rate - stable.error_rate
    if delta > checks.max_error_rate_delta:
        return Verdict(ABORT, f"canary error rate {canary.error_rate:.2%} is {delta:.2%} above stable's "
                       f"{stable.error_rate:.2%} (max_error_rate_delta {checks.max_error_rate_delta:.2%})", s, c)
    stable_p99, canary_p99 = stable.p99(), canary.p99()
    if not math.isnan(stable_p99) and stable_p99 > 0 and canary_p99 > checks.max_p99_ratio * stable_p99:
        return Verdict(ABORT, f"canary p99 {canary_p99 * 1000:.1f} ms is {canary_p99 / stable_p99:.2f}x stable's "
                       f"{stable_p99 * 1000:.1f} ms (max_p99_ratio {checks.max_p99_ratio:g})", s, c)
    if math.isnan(stable_p99):
        return Verdict(ADVANCE, "healthy (no stable requests to compare latency with)", s, c)
    return Verdict(ADVANCE, f"healthy: error rate {canary.error_rate:.2%} (stable {stable.error_rate:.2%}), "
                   f"p99 {canary_p99 * 1000:.1f} ms (stable {stable_p99 * 1000:.1f} ms)", s, c)
