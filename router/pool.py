"""Worker membership and state as the router sees it, and the transport seam.

A ``Backend`` is one worker: its address, its state, which model versions it
holds (and has warmed) and how many requests it has in flight.  Only a
``ready`` worker is in rotation; every other state keeps it out:

    starting   connected (or connecting), holds nothing the router knows of
    draining   taken out of rotation, waiting for its in-flight calls
    loading / warming / unloading   a control-plane step runs on it
    drained    out of rotation on an operator's request, idle
    dead       exited or failed its health checks

``Pool.set_state`` is the one way a worker's state changes.  All calls to a
worker go through its ``Transport`` (``router.transport``).

The ``Pool`` hands out worker slots: a request takes a slot on a ready worker
that holds its version (power of two choices among those with a free slot) or
waits, in a bounded FIFO, until one frees.  A freed slot goes straight to the
oldest waiter that can use it, so waiting is fair and costs no polling.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from protos import status_pb2
from router.balancer import pick_two
from router.transport import Transport
from shared.errors import DeadlineExceeded, ResourceExhausted, ServingError, Unavailable

log = logging.getLogger("router.pool")

STARTING, LOADING, WARMING, READY = "starting", "loading", "warming", "ready"
DRAINING, UNLOADING, DRAINED, DEAD = "draining", "unloading", "drained", "dead"
STATES = (STARTING, LOADING, WARMING, READY, DRAINING, UNLOADING, DRAINED, DEAD)
# As a version: any worker in rotation takes the call (MultiInference names its models itself).
ANY_VERSION = -1

# Bumped whenever any backend's state, versions or transport changes, so the
# per-request view of "which versions are available" is cached between changes.
_topology_epoch = [0]
_TOPOLOGY_FIELDS = frozenset({"state", "versions", "transport", "surge"})


@dataclass(eq=False)
class Backend:
    """One worker, as the router sees it.

    ``versions`` is replaced, never mutated in place, so every change is seen.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name in _TOPOLOGY_FIELDS:
            _topology_epoch[0] += 1

    name: str
    address: str
    max_inflight: int
    transport: Transport | None = None
    state: str = STARTING
    inflight: int = 0
    model_inflight: dict[str, int] = field(default_factory=dict)  # per model, for batch slot limits
    # model -> version -> that version's status on this worker
    versions: dict[str, dict[int, status_pb2.ModelVersionStatus]] = field(default_factory=dict)
    generation: int = 0  # bumps on every (re)start, so stale syncs can tell
    # model -> versions warmed on this process (cleared when it restarts)
    warm: dict[str, frozenset[int]] = field(default_factory=dict)
    cordoned: bool = False  # drained by an operator: stays out of rotation until undrained
    surge: bool = False  # an extra worker started for a rollout, retired after it
    index: int = -1  # the supervisor's index (spawned workers)
    pid: int | None = None

    def holds(self, model: str, version: int) -> bool:
        if version == ANY_VERSION:
            return True
        status = self.versions.get(model, {}).get(version)
        return status is not None and status.state == status_pb2.ModelVersionStatus.AVAILABLE

    def available(self, model: str) -> set[int]:
        return {v for v, s in self.versions.get(model, {}).items() if s.state == status_pb2.ModelVersionStatus.AVAILABLE}

    def held(self) -> dict[str, frozenset[int]]:
        """Every model's AVAILABLE versions on this worker."""
        return {m: frozenset(self.available(m)) for m in self.versions}

    @property
    def routable(self) -> bool:
        return self.state == READY and self.transport is not None


@dataclass(eq=False)
class _Waiter:
    model: str
    version: int
    future: asyncio.Future[Backend]
    exclude: Backend | None
    limit: int  # at most this many slots of one worker for this model (0: no limit)

    def fits(self, backend: Backend) -> bool:
        return (
            backend is not self.exclude
            and backend.holds(self.model, self.version)
            and (not self.limit or backend.model_inflight.get(self.model, 0) < self.limit)
        )


async def _nothing_missing(backend: Backend, model: str, version: int) -> None:
    return None


class Pool:
    def __init__(
        self,
        backends: Iterable[Backend],
        *,
        max_queued: int,
        rng: random.Random | None = None,
        on_inflight: Callable[[Backend], None] | None = None,
        unservable: Callable[[str, int], ServingError] | None = None,
    ) -> None:
        self.backends = list(backends)
        self.max_queued = max_queued
        self._rng = rng or random.Random()
        self._waiters: deque[_Waiter] = deque()
        self._queued: dict[str, int] = {}  # waiters per model, for the max_queued bound
        self._available: dict[str, set[int]] = {}
        self._cache_epoch = -1
        self._on_inflight = on_inflight or (lambda b: None)
        # The error for a request whose version no worker in rotation holds: the
        # control plane knows whether it is coming (UNAVAILABLE) or gone (NOT_FOUND).
        self.unservable = unservable or (
            lambda model, version: Unavailable(f"no ready worker serves {model} version {version}"))
        # A worker answered NOT_FOUND for a version the router thought it held: the
        # control plane may bring its view up to date before the request is retried
        # (passive control reads the workers again).
        self.version_missing: Callable[[Backend, str, int], Awaitable[None]] = _nothing_missing
        # With data-plane processes (router/procs.py): the calls they have in flight count too.
        self.remote_idle: Callable[[Backend, float], Awaitable[bool]] | None = None

    # -- queries ---------------------------------------------------------------

    def by_name(self, name: str) -> Backend:
        for b in self.backends:
            if b.name == name:
                return b
        raise KeyError(name)

    def add(self, backend: Backend) -> None:
        self.backends.append(backend)
        _topology_epoch[0] += 1

    def remove(self, backend: Backend) -> None:
        self.backends.remove(backend)
        self.set_state(backend, DEAD)

    async def close_transports(self) -> None:
        """Close every worker's transport (at shutdown)."""
        for b in self.backends:
            if b.transport is not None:
                await b.transport.close()
                b.transport = None

    def set_state(self, backend: Backend, state: str) -> None:
        """The one way a worker's state changes, and what follows from it: a worker in
        rotation afterwards takes the waiters it can serve at once; when one leaves it,
        waiters that no other worker can serve get UNAVAILABLE instead of waiting out
        their deadline."""
        was = backend.routable
        backend.state = state
        if backend.routable:
            # Also when it stayed in rotation: it may hold versions now that waiters want.
            self.wake(backend)
        elif was or state == DEAD:
            self.fail_waiters()

    async def wait_idle(self, backend: Backend, timeout: float) -> bool:
        """Wait until ``backend`` (already out of rotation) has nothing in flight; False on timeout."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while backend.inflight > 0:
            if loop.time() >= end:
                return False
            await asyncio.sleep(0.005)  # a control-plane wait: polling keeps the hot path free of it
        if self.remote_idle is not None:
            return await self.remote_idle(backend, max(0.0, end - loop.time()))
        return True

    def available_versions(self, model: str) -> set[int]:
        """Versions of ``model`` some routable worker holds (cached until a backend changes)."""
        if self._cache_epoch != _topology_epoch[0]:
            self._available.clear()
            self._cache_epoch = _topology_epoch[0]
        out = self._available.get(model)
        if out is None:
            out = set()
            for b in self.backends:
                if b.routable:
                    out |= b.available(model)
            self._available[model] = out
        return out

    def holders(self, model: str, version: int) -> list[Backend]:
        """Workers in rotation that hold ``model`` ``version`` (every one for ``ANY_VERSION``)."""
        return [b for b in self.backends if b.routable and b.holds(model, version)]

    @property
    def queued(self) -> int:
        return len(self._waiters)

    # -- slots -----------------------------------------------------------------

    def try_acquire(self, model: str, version: int, exclude: Backend | None = None, limit: int = 0) -> Backend | None:
        free = [b for b in self.holders(model, version)
                if b.inflight < b.max_inflight and b is not exclude
                and (not limit or b.model_inflight.get(model, 0) < limit)]
        backend = pick_two(free, lambda b: b.inflight, self._rng)
        if backend is not None:
            self._take(backend, model)
        return backend

    async def acquire(self, model: str, version: int, deadline: float, exclude: Backend | None = None,
                      limit: int = 0) -> Backend:
        """A slot on a worker holding ``model`` ``version``; waits (bounded) for one.

        ``limit`` caps the slots one worker gives this model (the batcher's
        max_inflight_batches); release with the same ``model``.
        """
        backend = self.try_acquire(model, version, exclude, limit)
        if backend is not None:
            return backend
        if not self.holders(model, version) or (exclude is not None and self.holders(model, version) == [exclude]):
            raise self._unservable(model, version)
        if self._queued.get(model, 0) >= self.max_queued:
            raise ResourceExhausted(
                f"router queue for {model} is full ({self.max_queued} requests waiting for a worker)",
                retry_after=1.0,
            )
        waiter = _Waiter(model, version, asyncio.get_running_loop().create_future(), exclude, limit)
        self._waiters.append(waiter)
        self._queued[model] = self._queued.get(model, 0) + 1
        waiter.future.add_done_callback(lambda _: self._dequeued(model))
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a
            # cancellation that arrives just after the slot was handed over.
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                return await asyncio.shield(waiter.future)
        except BaseException as exc:  # deadline, cancellation by the client, or UNAVAILABLE
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                # A slot was handed over just as the waiter gave up: give it back.
                self.release(future.result(), model)
            else:
                future.cancel()
                self._remove(waiter)
            if isinstance(exc, asyncio.TimeoutError):
                raise DeadlineExceeded("deadline exceeded while waiting for a worker") from None
            raise

    def _unservable(self, model: str, version: int) -> ServingError:
        if version == ANY_VERSION:
            return Unavailable("no worker in rotation")
        return self.unservable(model, version)

    def _dequeued(self, model: str) -> None:
        self._queued[model] -= 1

    def _remove(self, waiter: _Waiter) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass

    def _take(self, backend: Backend, model: str) -> None:
        backend.inflight += 1
        backend.model_inflight[model] = backend.model_inflight.get(model, 0) + 1
        self._on_inflight(backend)

    def release(self, backend: Backend, model: str) -> None:
        backend.inflight -= 1
        backend.model_inflight[model] -= 1
        self._on_inflight(backend)
        self.wake(backend)

    def wake(self, backend: Backend | None = None) -> None:
        """Hand free slots to the oldest waiters that can use them."""
        candidates = [backend] if backend is not None else list(self.backends)
        for b in candidates:
            while b.routable and b.inflight < b.max_inflight and self._waiters:
                waiter = self._first_waiter_for(b)
                if waiter is None:
                    break
                self._take(b, waiter.model)
                waiter.future.set_result(b)

    def _first_waiter_for(self, backend: Backend) -> _Waiter | None:
        for waiter in self._waiters:
            if waiter.future.done():
                continue
            if waiter.fits(backend):
                self._waiters.remove(waiter)
                return waiter
        return None

    def fail_waiters(self, model: str | None = None) -> None:
        """Waiters no worker can serve any more get UNAVAILABLE instead of waiting out their deadline."""
        for waiter in list(self._waiters):
            if waiter.future.done():
                continue
            if model is not None and waiter.model != model:
                continue
            if not any(b is not waiter.exclude for b in self.holders(waiter.model, waiter.version)):
                self._waiters.remove(waiter)
                waiter.future.set_exception(self._unservable(waiter.model, waiter.version))
