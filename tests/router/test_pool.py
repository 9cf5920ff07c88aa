"""router.pool.Pool: bounded worker slots, FIFO waiters, deadlines and cancellation, without sockets.

Backends are real ``Backend`` objects; the only fake is the transport behind
them, which these tests never call (the pool hands out slots, it does not
talk to workers).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

import pytest

from protos import config_pb2, metadata_pb2, predict_pb2, status_pb2
from shared.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from router.pool import DEAD, DRAINING, LOADING, READY, STARTING, Backend, Pool

T = TypeVar("T")
AVAILABLE = status_pb2.ModelVersionStatus.AVAILABLE


class FakeTransport:
    """The transport seam; the pool must never call through it."""

    def __init__(self) -> None:
        self.closed = False

    def _unexpected(self, what: str) -> AssertionError:
        return AssertionError(f"the pool called the transport: {what}")

    async def predict(self, request: predict_pb2.PredictRequest, timeout: float) -> predict_pb2.PredictResponse:
        raise self._unexpected("predict")

    async def metadata(self, request: metadata_pb2.GetModelMetadataRequest,
                       timeout: float) -> metadata_pb2.GetModelMetadataResponse:
        raise self._unexpected("metadata")

    async def status(self, request: status_pb2.GetModelStatusRequest,
                     timeout: float) -> status_pb2.GetModelStatusResponse:
        raise self._unexpected("status")

    async def reload(self, request: config_pb2.ReloadConfigRequest, timeout: float,
                     pace: str | None = None) -> config_pb2.ReloadConfigResponse:
        raise self._unexpected("reload")

    async def raw(self, method: str, body: bytes, timeout: float) -> bytes:
        raise self._unexpected("raw")

    async def healthy(self, timeout: float) -> bool:
        return True

    async def close(self) -> None:
        self.closed = True


def vstatus(version: int, state: int = AVAILABLE) -> status_pb2.ModelVersionStatus:
    return status_pb2.ModelVersionStatus(version=version, state=state)


def backend(name: str, *, versions: dict[str, list[int]] | None = None, max_inflight: int = 1,
            state: str = READY) -> Backend:
    held = {"m": [1]} if versions is None else versions
    return Backend(
        name, f"unix:/tmp/{name}.sock", max_inflight, transport=FakeTransport(), state=state,
        versions={m: {v: vstatus(v) for v in vs} for m, vs in held.items()},
    )


def pool(*backends: Backend, max_queued: int = 16, seed: int = 0) -> Pool:
    return Pool(backends, max_queued=max_queued, rng=random.Random(seed))


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 5))


def soon(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


async def settle() -> None:
    """Let every ready task run until it blocks again."""
    for _ in range(5):
        await asyncio.sleep(0)


def start(coro: Awaitable[T]) -> asyncio.Task[T]:
    return asyncio.ensure_future(coro)


def inflight(p: Pool) -> list[int]:
    return [b.inflight for b in p.backends]


# -- try_acquire ----------------------------------------------------------------------


def test_try_acquire_respects_max_inflight() -> None:
    a, b = backend("a", max_inflight=2), backend("b", max_inflight=1)
    p = pool(a, b)
    got = [p.try_acquire("m", 1) for _ in range(3)]
    assert None not in got
    assert inflight(p) == [2, 1]
    assert p.try_acquire("m", 1) is None
    assert inflight(p) == [2, 1]
    p.release(a, "m")
    assert p.try_acquire("m", 1) is a


def test_try_acquire_prefers_the_less_loaded() -> None:
    a, b = backend("a", max_inflight=10), backend("b", max_inflight=10)
    a.inflight = 5
    p = pool(a, b)
    assert all(p.try_acquire("m", 1) is b for _ in range(5))  # b catches up to a first
    assert inflight(p) == [5, 5]


def test_try_acquire_only_on_workers_holding_the_version() -> None:
    a = backend("a", versions={"m": [1]}, max_inflight=5)
    b = backend("b", versions={"m": [2]}, max_inflight=5)
    c = backend("c", versions={"other": [2]}, max_inflight=5)
    p = pool(a, b, c)
    assert all(p.try_acquire("m", 2) is b for _ in range(5))
    assert p.try_acquire("m", 2) is None
    assert p.try_acquire("m", 3) is None
    assert p.try_acquire("nope", 1) is None
    assert p.try_acquire("m", 1) is a


def test_versions_not_available_are_not_held() -> None:
    a = backend("a", versions={})
    a.versions = {"m": {1: vstatus(1, status_pb2.ModelVersionStatus.LOADING),
                        2: vstatus(2, status_pb2.ModelVersionStatus.END)}}
    p = pool(a)
    assert p.try_acquire("m", 1) is None and p.try_acquire("m", 2) is None
    assert p.holders("m", 1) == [] and p.available_versions("m") == set()


@pytest.mark.parametrize("state", [STARTING, LOADING, DRAINING, DEAD])
def test_only_ready_workers_take_requests(state: str) -> None:
    p = pool(backend("a", state=state))
    assert p.try_acquire("m", 1) is None
    assert p.holders("m", 1) == []


def test_worker_without_transport_is_not_routable() -> None:
    a = backend("a")
    a.transport = None
    assert pool(a).try_acquire("m", 1) is None


def test_try_acquire_exclude() -> None:
    a, b = backend("a", max_inflight=5), backend("b", max_inflight=5)
    p = pool(a, b)
    assert all(p.try_acquire("m", 1, exclude=a) is b for _ in range(5))
    assert p.try_acquire("m", 1, exclude=a) is None
    assert p.try_acquire("m", 1, exclude=b) is a


def test_on_inflight_sees_every_change() -> None:
    seen: list[tuple[str, int]] = []
    a = backend("a", max_inflight=2)
    p = Pool([a], max_queued=1, on_inflight=lambda b: seen.append((b.name, b.inflight)))
    p.try_acquire("m", 1)
    p.try_acquire("m", 1)
    p.release(a, "m")
    assert seen == [("a", 1), ("a", 2), ("a", 1)]


def test_queries() -> None:
    a = backend("a", versions={"m": [1, 2]})
    b = backend("b", versions={"m": [3]}, state=DEAD)
    p = pool(a, b)
    assert p.by_name("b") is b
    with pytest.raises(KeyError):
        p.by_name("c")
    assert p.available_versions("m") == {1, 2}  # dead workers do not count
    assert p.holders("m", 2) == [a]


# -- acquire: waiting ----------------------------------------------------------------------


def test_acquire_returns_at_once_when_a_slot_is_free() -> None:
    p = pool(backend("a"))

    async def main() -> None:
        assert await p.acquire("m", 1, soon()) is p.backends[0]
        assert p.queued == 0

    run(main())


def test_acquire_waits_and_is_handed_the_released_slot_fifo() -> None:
    a = backend("a")
    p = pool(a)

    async def main() -> None:
        assert p.try_acquire("m", 1) is a
        order: list[int] = []

        async def request(i: int) -> None:
            got = await p.acquire("m", 1, soon())
            assert got is a
            order.append(i)

        tasks = []
        for i in range(4):
            tasks.append(start(request(i)))
            await settle()  # each is queued before the next arrives
        assert p.queued == 4 and order == []
        for expected in range(4):
            p.release(a, "m")  # the slot goes straight to the oldest waiter
            assert a.inflight == 1
            await settle()
            assert order == list(range(expected + 1))
        assert p.queued == 0
        p.release(a, "m")
        assert a.inflight == 0
        await asyncio.gather(*tasks)

    run(main())


def test_released_slot_skips_waiters_that_cannot_use_it() -> None:
    a = backend("a", versions={"m": [1]})
    b = backend("b", versions={"m": [2]})
    p = pool(a, b)

    async def main() -> None:
        p.try_acquire("m", 1)
        p.try_acquire("m", 2)
        first_v2 = start(p.acquire("m", 2, soon()))
        await settle()
        first_v1 = start(p.acquire("m", 1, soon()))
        await settle()
        p.release(a, "m")  # a holds only version 1: the younger v1 waiter gets it
        await settle()
        assert first_v1.done() and await first_v1 is a
        assert not first_v2.done()
        p.release(b, "m")
        await settle()
        assert await first_v2 is b
        p.release(a, "m")
        p.release(b, "m")
        assert inflight(p) == [0, 0] and p.queued == 0

    run(main())


def test_wake_hands_a_newly_ready_worker_to_waiters() -> None:
    a = backend("a")
    b = backend("b", state=LOADING, max_inflight=2)
    p = pool(a, b)

    async def main() -> None:
        p.try_acquire("m", 1)
        waiters = [start(p.acquire("m", 1, soon())) for _ in range(3)]
        await settle()
        assert p.queued == 3
        b.state = READY
        p.wake(b)
        await settle()
        assert [w.done() for w in waiters] == [True, True, False]
        assert b.inflight == 2
        p.wake()  # nothing more is free: nothing changes
        assert p.queued == 1
        p.release(a, "m")
        assert await waiters[2] is a
        for w in waiters:
            p.release(await w, "m")
        assert inflight(p) == [0, 0]

    run(main())


def test_a_worker_that_stays_in_rotation_and_gains_a_version_takes_its_waiters() -> None:
    a = backend("a")  # holds version 1, its one slot busy
    b = backend("b", versions={"m": [2]}, max_inflight=2)  # in rotation, idle, loading 1 in place
    p = pool(a, b)

    async def main() -> None:
        assert p.try_acquire("m", 1) is a
        waiter = start(p.acquire("m", 1, soon()))
        await settle()
        assert p.queued == 1
        b.versions = {"m": {1: vstatus(1), 2: vstatus(2)}}  # the in-place load finished
        p.set_state(b, READY)  # the step ends: still in rotation, now holding version 1
        await settle()
        assert waiter.done() and await waiter is b  # not left waiting for a's slot
        p.release(b, "m")
        p.release(a, "m")
        assert inflight(p) == [0, 0]

    run(main())


def test_waiter_past_its_deadline_leaks_nothing() -> None:
    a = backend("a")
    p = pool(a)

    async def main() -> None:
        p.try_acquire("m", 1)
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="waiting for a worker"):
            await p.acquire("m", 1, time.monotonic() + 0.05)
        assert 0.04 <= time.monotonic() - t0 < 1.0
        assert p.queued == 0
        p.release(a, "m")  # nobody to hand it to: the slot is free again
        assert a.inflight == 0
        assert p.try_acquire("m", 1) is a

    run(main())


def test_deadline_already_past_while_full() -> None:
    a = backend("a")
    p = pool(a)

    async def main() -> None:
        p.try_acquire("m", 1)
        with pytest.raises(DeadlineExceeded):
            await p.acquire("m", 1, time.monotonic() - 1)
        assert p.queued == 0
        p.release(a, "m")
        assert a.inflight == 0

    run(main())


def test_deadlines_expire_independently_in_queue() -> None:
    a = backend("a")
    p = pool(a)

    async def main() -> None:
        p.try_acquire("m", 1)
        short = start(p.acquire("m", 1, time.monotonic() + 0.03))
        await settle()
        long = start(p.acquire("m", 1, soon()))
        await settle()
        with pytest.raises(DeadlineExceeded):
            await short
        assert p.queued == 1
        p.release(a, "m")
        assert await long is a
        p.release(a, "m")
        assert a.inflight == 0 and p.queued == 0

    run(main())


def test_queue_beyond_max_queued_is_resource_exhausted() -> None:
    a = backend("a")
    p = pool(a, max_queued=2)

    async def main() -> None:
        p.try_acquire("m", 1)
        waiting = [start(p.acquire("m", 1, soon())) for _ in range(2)]
        await settle()
        with pytest.raises(ResourceExhausted) as info:
            await p.acquire("m", 1, soon())
        assert info.value.headers() == {"Retry-After": "1"}
        assert p.queued == 2 and a.inflight == 1
        for _ in waiting:
            p.release(a, "m")
            await settle()
        p.release(a, "m")
        await asyncio.gather(*waiting)
        assert a.inflight == 0 and p.queued == 0

    run(main())


def test_max_queued_is_per_model() -> None:
    a = backend("a", versions={"m": [1], "n": [1]})
    p = pool(a, max_queued=1)

    async def main() -> None:
        p.try_acquire("m", 1)
        m_waiter = start(p.acquire("m", 1, soon()))
        await settle()
        n_waiter = start(p.acquire("n", 1, soon()))
        await settle()
        try:
            assert not n_waiter.done(), "model n was refused because model m's queue is full"
        finally:
            for t in (m_waiter, n_waiter):
                t.cancel()
            await asyncio.gather(m_waiter, n_waiter, return_exceptions=True)

    run(main())


def test_cancelled_waiter_is_removed_and_leaks_nothing() -> None:
    a = backend("a")
    p = pool(a)

    async def main() -> None:
        p.try_acquire("m", 1)
        first = start(p.acquire("m", 1, soon()))
        await settle()
        second = start(p.acquire("m", 1, soon()))
        await settle()
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert p.queued == 1
        p.release(a, "m")  # goes to the second waiter, not the cancelled one
        assert await second is a
        p.release(a, "m")
        assert a.inflight == 0 and p.queued == 0

    run(main())


def test_waiter_cancelled_as_the_slot_is_handed_over_gives_it_back() -> None:
    a = backend("a")
    p = pool(a)

    async def main() -> None:
        p.try_acquire("m", 1)
        first = start(p.acquire("m", 1, soon()))
        await settle()
        second = start(p.acquire("m", 1, soon()))
        await settle()
        # Cancelled, then handed the slot before it runs again: it must pass it on.
        first.cancel()
        p.release(a, "m")
        assert a.inflight == 1
        with pytest.raises(asyncio.CancelledError):
            await first
        assert await second is a
        assert a.inflight == 1
        p.release(a, "m")
        assert a.inflight == 0 and p.queued == 0

    run(main())


def test_waiter_cancelled_as_the_last_slot_is_handed_over_frees_it() -> None:
    a = backend("a")
    p = pool(a)

    async def main() -> None:
        p.try_acquire("m", 1)
        waiter = start(p.acquire("m", 1, soon()))
        await settle()
        waiter.cancel()
        p.release(a, "m")
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert a.inflight == 0 and p.queued == 0

    run(main())


def test_waiter_cancelled_just_after_the_slot_is_handed_over_is_cancelled() -> None:
    a = backend("a")
    p = pool(a)

    async def main() -> None:
        p.try_acquire("m", 1)
        waiter = start(p.acquire("m", 1, soon()))
        await settle()
        p.release(a, "m")  # handed to the waiter...
        waiter.cancel()  # ...and then its client goes away, before it ran again
        try:
            with pytest.raises(asyncio.CancelledError):
                await waiter
        finally:
            if not waiter.cancelled():
                p.release(a, "m")
        assert a.inflight == 0 and p.queued == 0

    run(main())


# -- no worker / failing waiters ---------------------------------------------------------------


def test_no_holder_is_unavailable_at_once() -> None:
    p = pool(backend("a", versions={"m": [1]}))

    async def main() -> None:
        with pytest.raises(Unavailable, match="no ready worker serves m version 2"):
            await p.acquire("m", 2, soon())
        assert p.queued == 0

    run(main())


def test_acquire_exclude_only_holder_is_unavailable() -> None:
    a = backend("a", max_inflight=2)
    p = pool(a)

    async def main() -> None:
        with pytest.raises(Unavailable):
            await p.acquire("m", 1, soon(), exclude=a)
        assert a.inflight == 0 and p.queued == 0

    run(main())


def test_excluded_worker_never_hands_its_slot_to_the_waiter() -> None:
    a, b = backend("a"), backend("b")
    p = pool(a, b)

    async def main() -> None:
        p.try_acquire("m", 1)
        p.try_acquire("m", 1)
        retry = start(p.acquire("m", 1, soon(), exclude=a))
        await settle()
        p.release(a, "m")
        await settle()
        assert not retry.done() and a.inflight == 0
        p.release(b, "m")
        assert await retry is b
        p.release(b, "m")
        assert inflight(p) == [0, 0]

    run(main())


def test_fail_waiters_when_no_holder_remains() -> None:
    a = backend("a")
    p = pool(a)

    async def main() -> None:
        p.try_acquire("m", 1)
        waiters = [start(p.acquire("m", 1, soon())) for _ in range(3)]
        await settle()
        a.state = DEAD
        p.fail_waiters()
        results = await asyncio.gather(*waiters, return_exceptions=True)
        assert all(isinstance(r, Unavailable) for r in results), results
        assert p.queued == 0
        p.release(a, "m")  # the dead worker's request finishes late: no one to wake
        assert a.inflight == 0

    run(main())


def test_fail_waiters_keeps_waiters_someone_can_still_serve() -> None:
    a = backend("a", versions={"m": [1], "n": [1]})
    b = backend("b", versions={"m": [1]})
    p = pool(a, b)

    async def main() -> None:
        p.try_acquire("m", 1)
        p.try_acquire("m", 1)
        m_waiter = start(p.acquire("m", 1, soon()))
        n_waiter = start(p.acquire("n", 1, soon()))
        await settle()
        a.state = DEAD
        p.fail_waiters(model="m")  # another model's waiters are left alone
        await settle()
        assert not m_waiter.done() and not n_waiter.done()
        p.fail_waiters()
        with pytest.raises(Unavailable):
            await n_waiter
        assert not m_waiter.done()  # b still holds m
        p.release(b, "m")
        assert await m_waiter is b
        p.release(b, "m")
        p.release(a, "m")
        assert inflight(p) == [0, 0] and p.queued == 0

    run(main())


def test_fail_waiters_counts_the_excluded_worker_as_gone() -> None:
    a, b = backend("a"), backend("b")
    p = pool(a, b)

    async def main() -> None:
        p.try_acquire("m", 1)
        p.try_acquire("m", 1)
        retry = start(p.acquire("m", 1, soon(), exclude=a))
        await settle()
        b.state = DEAD  # a still holds the version, but the retry must not go back to it
        p.fail_waiters()
        with pytest.raises(Unavailable):
            await retry
        p.release(a, "m")
        p.release(b, "m")
        assert inflight(p) == [0, 0] and p.queued == 0

    run(main())


def test_many_waiters_and_releases_balance_out() -> None:
    backends = [backend(f"w{i}", max_inflight=2) for i in range(3)]
    p = pool(*backends, max_queued=100)

    async def main() -> None:
        async def request(i: int) -> None:
            b = await p.acquire("m", 1, soon())
            try:
                assert b.inflight <= b.max_inflight
                await asyncio.sleep(0.001 * (i % 3))
            finally:
                p.release(b, "m")

        await asyncio.gather(*(request(i) for i in range(60)))
        assert inflight(p) == [0, 0, 0] and p.queued == 0

    run(main())



# -- per-model slot limits (the batcher's max_inflight_batches) -------------------------------


def test_try_acquire_limit_caps_one_models_slots_per_worker() -> None:
    a = backend("a", versions={"m": [1], "n": [1]}, max_inflight=4)
    p = pool(a)
    assert p.try_acquire("m", 1, limit=2) is a
    assert p.try_acquire("m", 1, limit=2) is a
    assert p.try_acquire("m", 1, limit=2) is None  # m has its two; the worker has room for others
    assert p.try_acquire("n", 1, limit=2) is a
    assert p.try_acquire("m", 1) is a  # no limit: only max_inflight counts
    assert a.inflight == 4 and a.model_inflight == {"m": 3, "n": 1}
    for model in ("m", "m", "m", "n"):
        p.release(a, model)
    assert a.inflight == 0 and a.model_inflight == {"m": 0, "n": 0}


def test_limited_waiter_waits_for_its_own_models_slot() -> None:
    a = backend("a", versions={"m": [1], "n": [1]}, max_inflight=3)
    p = pool(a)

    async def main() -> None:
        assert p.try_acquire("m", 1, limit=1) is a
        assert p.try_acquire("n", 1) is a
        waiter = start(p.acquire("m", 1, soon(), limit=1))
        await settle()
        assert not waiter.done() and a.inflight == 2  # a free slot, but not for m
        p.release(a, "n")
        await settle()
        assert not waiter.done()
        p.release(a, "m")
        assert await waiter is a
        assert a.model_inflight == {"m": 1, "n": 0}
        p.release(a, "m")
        assert a.inflight == 0 and p.queued == 0

    run(main())


def test_limited_waiter_timing_out_leaks_nothing() -> None:
    a = backend("a", max_inflight=3)
    p = pool(a)

    async def main() -> None:
        p.try_acquire("m", 1, limit=1)
        with pytest.raises(DeadlineExceeded):
            await p.acquire("m", 1, time.monotonic() + 0.02, limit=1)
        p.release(a, "m")
        assert a.inflight == 0 and a.model_inflight == {"m": 0} and p.queued == 0

    run(main())
