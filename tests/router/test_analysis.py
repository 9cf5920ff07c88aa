"""router.analysis: per-version windows and the canary verdict (pure)."""

from __future__ import annotations

import random

import pytest

from router.analysis import ABORT, ADVANCE, HOLD, MAX_SAMPLES, Checks, VersionStats, Window, verdict

CHECKS = Checks(min_requests=50, max_error_rate_delta=0.01, max_p99_ratio=1.5)


def window(n: int, latency: float, errors: int = 0) -> Window:
    stats = VersionStats(random.Random(0))
    for i in range(n):
        stats.record("m", 1, "INTERNAL" if i < errors else "OK", latency * (1 + (i % 10) / 100))
    return stats.take("m")[1]


def test_too_few_canary_requests_hold() -> None:
    assert verdict(window(500, 0.002), window(49, 0.002), CHECKS).action == HOLD


def test_healthy_canary_advances() -> None:
    v = verdict(window(500, 0.002), window(60, 0.0021), CHECKS)
    assert v.action == ADVANCE and "healthy" in v.reason


def test_slow_canary_aborts_with_the_comparison() -> None:
    v = verdict(window(500, 0.002), window(60, 0.010), CHECKS)
    assert v.action == ABORT and "p99" in v.reason and "max_p99_ratio 1.5" in v.reason
    assert v.canary["p99_ms"] > 9 and v.stable["p99_ms"] < 3


def test_failing_canary_aborts_on_server_faults_only() -> None:
    assert verdict(window(500, 0.002), window(100, 0.002, errors=5), CHECKS).action == ABORT
    stats = VersionStats()
    for _ in range(100):
        stats.record("m", 2, "INVALID_ARGUMENT", 0.002)  # the client's fault: not the version's
    assert verdict(window(500, 0.002), stats.take("m")[2], CHECKS).action == ADVANCE


def test_no_stable_traffic_judges_errors_only() -> None:
    assert verdict(Window(), window(60, 0.5), CHECKS).action == ADVANCE


def test_take_resets_and_samples_are_bounded() -> None:
    stats = VersionStats(random.Random(1))
    for i in range(MAX_SAMPLES + 500):
        stats.record("m", 1, "OK", float(i))
    stats.record("n", 1, "OK", 1.0)
    w = stats.take("m")[1]
    assert w.requests == MAX_SAMPLES + 500 and len(w.samples) == MAX_SAMPLES
    assert any(s >= MAX_SAMPLES for s in w.samples)  # later latencies do get in
    assert stats.take("m") == {} and stats.take("n")[1].requests == 1


@pytest.mark.parametrize("n", [1, 99, 100, 1000])
def test_p99_is_an_observed_latency(n: int) -> None:
    w = Window(requests=n, samples=[float(i) for i in range(n)])
    assert w.p99() in w.samples and w.p99() >= 0.98 * (n - 1)


def test_windows_of_several_replicas_merge_into_the_fleets() -> None:
    """router/fleet.py: each replica publishes a summary; the leader adds them to its own window."""
    rng = random.Random(1)
    slow, fast = window(300, 0.010, errors=3), window(700, 0.001)
    merged = Window()
    for part in (slow, fast):
        merged.add(part.summary(10_000, rng))
    assert (merged.requests, merged.errors, merged.seen) == (1000, 3, 1000)
    # every sample kept (under the cap): the p99 is the fleet's, between the replicas' own
    every = sorted(slow.samples + fast.samples)
    assert merged.p99() == pytest.approx(every[989], rel=1e-5)
    assert fast.p99() < merged.p99() <= slow.p99()
    # over the cap, a uniform sample of it
    capped = slow.summary(50, rng)
    assert len(capped["samples_us"]) == 50 and capped["requests"] == 300
    assert set(capped["samples_us"]) <= {round(s * 1e6) for s in slow.samples}
