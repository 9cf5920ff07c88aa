"""The open-loop generator's bookkeeping, against fake async calls (no server, no absolute times).

A stall must show as latency for every request scheduled during it (counted
from the scheduled time, not from when the request went out), the schedule
must not slow down while answers wait, and a client that cannot keep up must
show as lateness.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from loadtest.openloop import OK, UNANSWERED, OpenLoop, OpenLoopResult

RATE = 500.0  # req/s
STALL_S = 0.4


class Stall:
    """A fake call that answers at once, except while ``closed``: then it waits for the reopening."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.closed_at = self.opened_at = float("nan")

    async def call(self) -> str:
        await self.gate.wait()
        await asyncio.sleep(0)
        return "answer"

    async def stall(self, after: float, seconds: float) -> None:
        await asyncio.sleep(after)
        self.gate.clear()
        self.closed_at = time.perf_counter()
        await asyncio.sleep(seconds)
        self.opened_at = time.perf_counter()
        self.gate.set()


def run_with_stall(duration: float, after: float) -> tuple[OpenLoopResult[str], Stall]:
    async def main() -> tuple[OpenLoopResult[str], Stall]:
        fake = Stall()
        stalling = asyncio.create_task(fake.stall(after, STALL_S))
        result = await OpenLoop(fake.call, RATE).run(duration=duration)
        await stalling
        return result, fake

    return asyncio.run(main())


def test_a_stall_shows_as_latency_for_every_request_scheduled_during_it() -> None:
    result, fake = run_with_stall(duration=1.2, after=0.4)
    assert all(code == OK for code in result.codes)
    assert all(value == "answer" for value in result.values)
    latency = result.latency
    during = result.window(fake.closed_at, fake.opened_at)
    before = result.window(end=fake.closed_at - 0.05)
    after = result.window(fake.opened_at + 0.05)
    assert during.sum() > 0.5 * RATE * STALL_S  # the schedule went on through the stall
    # Every request scheduled while the gate was closed was answered only after it opened,
    # and its latency counts from its scheduled time: at least the rest of the stall.
    assert np.all(result.done[during] >= fake.opened_at)
    assert np.all(latency[during] >= fake.opened_at - result.scheduled[during])
    # Relative: requests of the stall's first half waited longer than any request before it
    # and than the typical one after it; the latency falls as the scheduled time nears the end.
    first_half = result.window(fake.closed_at, fake.closed_at + STALL_S / 2)
    assert latency[first_half].min() > latency[before].max()
    assert latency[first_half].min() > np.median(latency[after])
    assert latency[first_half].mean() > latency[during & ~first_half].mean()
    stats = result.latency_stats(during)
    assert stats.p50 > 10 * result.latency_stats(before).p50
    assert result.latency_stats().max == pytest.approx(float(np.nanmax(latency)))
    assert stats.errors == 0 and stats.answered == stats.requests == during.sum()
    # The client itself kept its schedule: its lateness is far below the stall.
    assert result.lateness_stats().max < latency[first_half].min()
    assert result.max_inflight >= during.sum()


def test_the_schedule_does_not_depend_on_the_answers() -> None:
    result, _ = run_with_stall(duration=0.8, after=0.2)
    # Request i is due at start + i / rate, and exactly duration * rate were scheduled.
    assert len(result) == pytest.approx(0.8 * RATE, abs=1)
    assert np.allclose(np.diff(result.scheduled), 1 / RATE)
    assert result.scheduled[0] == result.start
    # Nothing went out before its time.
    assert np.all(result.lateness >= 0)
    # Windows split requests by scheduled time without loss or overlap.
    mid = result.start + 0.3
    assert result.window(end=mid).sum() + result.window(mid).sum() == len(result)


def test_a_client_that_cannot_keep_up_shows_as_growing_lateness() -> None:
    interval = 1 / RATE

    async def hog() -> None:
        # Blocks the event loop for twice the schedule's interval: the client
        # can send only half the rate, so it falls further behind every call.
        end = time.perf_counter() + 2 * interval
        while time.perf_counter() < end:
            pass

    duration = 0.3

    async def main() -> OpenLoopResult[None]:
        return await OpenLoop(hog, RATE).run(duration=duration)

    result = asyncio.run(main())
    late = result.lateness
    n = len(result)
    # Each call takes two intervals, so by the end the client is behind by about the
    # whole schedule; a pause of this process (a busy machine) delays both ends alike.
    assert late[-n // 10:].mean() - late[: n // 10].mean() > 0.5 * duration
    assert late[-1] >= np.percentile(late, 90)  # it never catches up
    assert result.lateness_stats().saturated


def test_errors_are_counted_by_code_and_unanswered_requests_by_the_drain() -> None:
    class Refused(Exception):
        def code(self) -> object:
            class Code:
                name = "RESOURCE_EXHAUSTED"
            return Code()

        def details(self) -> str:
            return "queue full"

    calls = 0
    never = None

    async def flaky() -> int:
        nonlocal calls, never
        calls += 1
        if calls % 3 == 0:
            raise Refused()
        if calls == 5:
            never = asyncio.Event()
            await never.wait()  # never answered: the drain gives up on it
        return calls

    async def main() -> OpenLoopResult[int]:
        return await OpenLoop(flaky, 200.0).run(duration=0.1, drain_timeout=0.2)

    result = asyncio.run(main())
    stats = result.latency_stats()
    n = len(result)
    assert stats.codes["RESOURCE_EXHAUSTED"] == n // 3
    assert stats.codes[UNANSWERED] == 1
    assert stats.codes[OK] == n - n // 3 - 1
    assert stats.errors == n // 3 + 1
    assert stats.answered == n - 1  # the unanswered one has no latency
    assert result.errors["RESOURCE_EXHAUSTED: queue full"] == n // 3
    assert np.isnan(result.latency[4])
    assert [v for v in result.values if v is not None] == [
        i + 1 for i in range(n) if (i + 1) % 3 and i + 1 != 5]


def test_a_bounded_client_waits_instead_of_piling_up() -> None:
    async def main() -> OpenLoopResult[None]:
        gate = asyncio.Event()

        async def slow() -> None:
            await gate.wait()

        async def reopen() -> None:
            await asyncio.sleep(0.2)
            gate.set()

        opener = asyncio.create_task(reopen())
        result = await OpenLoop(slow, RATE, max_inflight=10).run(duration=0.3)
        await opener
        return result

    result = asyncio.run(main())
    assert result.max_inflight == 10
    # The 11th request could go out only when the gate opened and freed a slot:
    # it went out late by most of the time the gate stayed shut, the first 10 did not.
    assert result.lateness[10] > 5 * result.lateness[:10].max()
    assert result.done[10] >= result.done[:10].min()
