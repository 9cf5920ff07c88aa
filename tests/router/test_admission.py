"""router.admission: token buckets, gates with priorities and aging, tenants and their quotas."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from router.admission import OTHER_TENANTS, PRIORITIES, Admission, Gate, TokenBucket
from router.config import from_dict
from shared.errors import DeadlineExceeded, ResourceExhausted

T = TypeVar("T")
HIGH, NORMAL, LOW = PRIORITIES["high"], PRIORITIES["normal"], PRIORITIES["low"]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 5))


def soon(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


def test_token_bucket_allows_the_burst_then_the_rate() -> None:
    b = TokenBucket(rate=10, burst=3, now=0.0)
    assert [b.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take(0.0) == pytest.approx(0.1)  # one token is 0.1 s away
    assert b.take(0.05) == pytest.approx(0.05)
    assert b.take(0.1) == 0.0
    assert b.take(10.0) == 0.0 and b.tokens == pytest.approx(2.0)  # saved up to the burst only


def test_gate_admits_up_to_capacity_then_queues_then_refuses() -> None:
    async def main() -> None:
        g = Gate("g", capacity=2, max_queued=1, clock=time.monotonic)
        await g.enter(NORMAL, soon(), "g")
        await g.enter(NORMAL, soon(), "g")
        waiter = asyncio.ensure_future(g.enter(NORMAL, soon(), "g"))
        await asyncio.sleep(0)
        assert g.inflight == 2 and g.queued == 1
        with pytest.raises(ResourceExhausted, match=r"2 in flight \(max 2\) and 1 waiting \(max 1\)") as info:
            await g.enter(NORMAL, soon(), "g")
        assert info.value.retry_after > 0
        g.leave()
        await waiter
        assert g.inflight == 2 and g.queued == 0

    run(main())


def test_gate_serves_high_before_normal_before_low() -> None:
    async def main() -> None:
        g = Gate("g", capacity=1, max_queued=10, clock=time.monotonic)
        await g.enter(NORMAL, soon(), "g")
        order: list[str] = []

        async def one(name: str, rank: int) -> None:
            await g.enter(rank, soon(), "g")
            order.append(name)

        tasks = [asyncio.ensure_future(one(n, r)) for n, r in
                 (("low1", LOW), ("normal1", NORMAL), ("high1", HIGH), ("low2", LOW), ("high2", HIGH))]
        await asyncio.sleep(0)
        for _ in tasks:
            g.leave()
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        assert order == ["high1", "high2", "normal1", "low1", "low2"]

    run(main())


def test_a_full_line_sheds_its_lowest_newest_for_a_higher_request() -> None:
    async def main() -> None:
        g = Gate("g", capacity=1, max_queued=2, clock=time.monotonic)
        await g.enter(NORMAL, soon(), "g")
        low1 = asyncio.ensure_future(g.enter(LOW, soon(), "g"))
        low2 = asyncio.ensure_future(g.enter(LOW, soon(), "g"))
        await asyncio.sleep(0)
        high = asyncio.ensure_future(g.enter(HIGH, soon(), "g"))
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhausted, match="shed to make room for a higher-priority request"):
            await low2
        with pytest.raises(ResourceExhausted):
            await g.enter(LOW, soon(), "g")  # nothing lower to shed: refused itself
        g.leave()
        await high
        g.leave()
        await low1

    run(main())


def test_aging_keeps_low_from_starving() -> None:
    now = [0.0]

    async def main() -> None:
        g = Gate("g", capacity=1, max_queued=10, clock=lambda: now[0], aging_s=1.0)
        await g.enter(NORMAL, soon(), "g")
        low = asyncio.ensure_future(g.enter(LOW, soon(), "g"))
        await asyncio.sleep(0)
        now[0] = 2.5  # waited 2.5 s: two classes up, as high as a high one that comes now
        high = asyncio.ensure_future(g.enter(HIGH, soon(), "g"))
        await asyncio.sleep(0)
        g.leave()
        await asyncio.wait_for(low, 1)  # the older of equals goes first
        assert not high.done()
        g.leave()
        await high

    run(main())


def test_waiting_past_the_deadline_is_deadline_exceeded_and_frees_nothing() -> None:
    async def main() -> None:
        g = Gate("g", capacity=1, max_queued=5, clock=time.monotonic)
        await g.enter(NORMAL, soon(), "g")
        with pytest.raises(DeadlineExceeded, match="waiting for admission"):
            await g.enter(NORMAL, time.monotonic() + 0.01, "g")
        assert g.inflight == 1 and g.queued == 0

    run(main())


def admission(refusal_delay_s: float = 0.0, **quotas: Any) -> Admission:
    cfg = from_dict({"models": [{"name": "m", "base_path": "/m", "quota": {"max_inflight": 3}}],
                     "limits": {"max_inflight": 100, "max_waiting": 100, "refusal_delay_s": refusal_delay_s},
                     "quotas": quotas})
    return Admission(cfg)


def test_tenant_quotas_name_the_tenant_and_the_quota() -> None:
    shed: list[tuple[str, str, str]] = []

    async def main() -> None:
        a = admission(tenants={"batch": {"max_inflight": 2, "rate_per_s": 1000, "burst": 3, "priority": "low"}})
        a._on_shed = lambda *args: shed.append(args)
        tickets = [await a.admit("batch", "m", soon()) for _ in range(2)]
        with pytest.raises(ResourceExhausted, match="tenant batch quota max_inflight: 2 in flight"):
            await a.admit("batch", "m", soon())
        assert shed[-1] == ("batch", "m", "tenant_inflight")
        tickets[0].release()
        tickets.append(await a.admit("batch", "m", soon()))
        with pytest.raises(ResourceExhausted, match="tenant batch is over its quota rate_per_s 1000") as info:
            await a.admit("batch", "m", soon())  # the burst of 3 is spent
        assert 0 < info.value.retry_after <= 0.001 + 1e-9
        # Another tenant is not touched by batch's quota, only by the model's (3).
        other = await a.admit("checkout", "m", soon())
        with pytest.raises(ResourceExhausted, match="model m quota max_inflight"):
            await a.admit("checkout", "m", soon())
        for t in [*tickets, other]:
            t.release()
        assert a.models["m"].inflight == 0 and a.router.inflight == 0

    run(main())


def test_unnamed_tenants_get_the_default_quota_each_and_one_metrics_label() -> None:
    async def main() -> None:
        a = admission(default={"max_inflight": 1})
        t1 = await a.admit("alice", "m", soon())
        t2 = await a.admit("bob", "m", soon())  # each tenant its own default quota
        t3 = await a.admit(None, "m", soon())
        assert a.inflight() == {OTHER_TENANTS: 2, "default": 1}
        with pytest.raises(ResourceExhausted, match="tenant alice"):
            await a.admit("alice", "m", soon())
        for t in (t1, t2, t3):
            t.release()

    run(main())


def test_refusals_are_answered_after_a_short_delay_bounded_in_number() -> None:
    async def main() -> None:
        a = admission(refusal_delay_s=0.05, tenants={"t": {"max_inflight": 1}})
        held = await a.admit("t", "m", soon())
        seen: list[int] = []

        async def watch() -> None:
            for _ in range(20):
                seen.append(a.delayed)
                await asyncio.sleep(0.005)

        refusals = await asyncio.gather(*(a.admit("t", "m", soon()) for _ in range(5)), watch(),
                                        return_exceptions=True)
        assert all(isinstance(r, ResourceExhausted) for r in refusals[:5])
        assert max(seen) == 5 and a.delayed == 0  # all five were held, then answered
        a.max_delayed = 2
        seen.clear()
        refusals = await asyncio.gather(*(a.admit("t", "m", soon()) for _ in range(5)), watch(),
                                        return_exceptions=True)
        assert max(seen) == 2  # past the cap, answered at once
        held.release()

    run(main())
