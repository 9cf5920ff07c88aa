"""Passive control: route by what the workers report, never tell them what to hold.

With ``workers.control: passive`` the router sits in front of servers that
manage their own versions (``tensorflow_model_server`` polling its storage,
possibly shared by several routers), so it sends no ReloadConfig.  Every
``workers.status_poll_s`` it reads each live worker's ``GetModelStatus`` for
every configured model (and the signatures of versions it has not seen),
and from that:

- a worker joins the rotation once it reports an AVAILABLE version of a
  configured model, and leaves it when it reports none (a cordon by an
  operator still holds);
- a version any worker reports LOADING or AVAILABLE is *aspired*: a request
  naming it while it is not yet AVAILABLE anywhere is UNAVAILABLE, not
  NOT_FOUND;
- the default version (unversioned requests) moves to a newer version once
  at least as many workers in rotation serve it as serve the current one,
  the same rule as a staged rollout's switch, so unversioned traffic does not
  pile onto the first worker that loads a new version.  A ``specific``
  version policy limits which versions may become the default.

What needs active control (the router deciding versions) is refused here:
staged rollouts, rollbacks, pins (``README``: passive mode).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from shared.errors import ServingError
from protos import status_pb2
from router.config import Config
from router.control import sync
from router.registry import Registry
from router.pool import DEAD, DRAINED, READY, STARTING, Backend, Pool

log = logging.getLogger("router.control.passive")

State = status_pb2.ModelVersionStatus
_COMING = (State.START, State.LOADING, State.AVAILABLE)


def choose_default(current: int | None, counts: dict[int, int], allowed: tuple[int, ...] | None) -> int | None:
    """The default version given how many workers in rotation serve each version (pure).

    Keeps ``current`` while it is served, unless a newer version is served by
    at least as many workers; with ``current`` gone, the newest served version.
    ``allowed`` (a specific policy) limits the choice.
    """
    served = {v: n for v, n in counts.items() if n > 0 and (allowed is None or v in allowed)}
    if not served:
        return None
    if current not in served:
        return max(served)
    newer = [v for v in served if v > current and served[v] >= served[current]]
    return max(newer) if newer else current


class PassiveSync:
    def __init__(self, config: Config, pool: Pool, registry: Registry, *,
                 on_change: Callable[[], None] | None = None, rpc_timeout: float = 10.0) -> None:
        self.config = config
        self.pool = pool
        self.registry = registry
        self.interval = config.workers.status_poll_s
        self.rpc_timeout = rpc_timeout
        self._on_change = on_change or (lambda: None)
        # What the default becomes, given (model, current, the version choose_default picked, the versions
        # served): that choice alone, or, in a fleet on etcd, the one its leader decided (app.py).
        self.decide: Callable[[str, int | None, int | None, set[int]], int | None] = \
            lambda model, current, proposed, served: proposed
        self._wake = asyncio.Event()
        self._stopping = False
        self._started = 0  # polls begun, and polls applied (version_missing waits on these)
        self._finished = 0
        self._polled = asyncio.Condition()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            self._started += 1
            try:
                await self.poll()
            except Exception:  # the loop must outlive its own bugs
                log.exception("passive status poll failed")
            self._finished = self._started
            async with self._polled:
                self._polled.notify_all()
            try:
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def stop(self) -> None:
        self._stopping = True
        self.wake()

    async def poll(self) -> None:
        """Read every live worker's versions, then apply them all at once with rotation,
        aspired and default versions (no await in between: requests never see a pool
        whose versions moved but whose default did not)."""
        live = [(b, b.generation) for b in self.pool.backends if b.transport is not None and b.state != DEAD]
        read = await asyncio.gather(*(self._read(b, gen) for b, gen in live))
        for (b, gen), versions in zip(live, read):
            if versions is not None and b.generation == gen and b.state != DEAD:
                b.versions = versions
        self.settle()

    async def _read(self, b: Backend, generation: int) -> dict[str, dict[int, State]] | None:
        try:
            return await sync.read_status(b, self.config.models, self.registry, generation, self.rpc_timeout)
        except (ServingError, asyncio.TimeoutError) as exc:
            # Health checks decide whether it is dead; its last known versions stand until then.
            log.debug("worker %s: status not read: %s", b.name, exc)
            return None

    async def version_missing(self, b: Backend, model: str, version: int) -> None:
        """A worker answered NOT_FOUND for ``version``: it changed its versions since the
        last poll.  Returns once a poll that started after now has been applied (one poll
        serves every request that waits for it), so a retry resolves against what the
        workers hold now, not what they held."""
        log.debug("worker %s answered NOT_FOUND for %s version %d: reading the workers again",
                  b.name, model, version)
        target = self._started + 1
        self.wake()
        try:
            async with asyncio.timeout(self.rpc_timeout):
                async with self._polled:
                    await self._polled.wait_for(lambda: self._finished >= target)
        except TimeoutError:
            pass

    def settle(self) -> None:
        """Rotation, aspired versions and defaults from the versions last read (no I/O)."""
        names = [m.name for m in self.config.models]
        for b in self.pool.backends:
            if b.state == DEAD or b.transport is None:
                continue
            serves = any(b.available(n) for n in names)
            if serves and b.state == STARTING:
                log.info("worker %s joins: %s", b.name, {n: sorted(b.available(n)) for n in names if b.available(n)})
                self.pool.set_state(b, DRAINED if b.cordoned else READY)
            elif not serves and b.state in (READY, DRAINED):
                log.warning("worker %s reports no available version; out of rotation", b.name)
                self.pool.set_state(b, STARTING)
        for m in self.config.models:
            coming: set[int] = set()
            counts: dict[int, int] = {}
            for b in self.pool.backends:
                if b.state == DEAD:
                    continue
                for version, st in b.versions.get(m.name, {}).items():
                    if st.state in _COMING:
                        coming.add(version)
                if b.state == READY:
                    for version in b.available(m.name):
                        counts[version] = counts.get(version, 0) + 1
            self.registry.aspired[m.name] = tuple(sorted(coming))
            kind, numbers = m.policy()
            allowed = numbers if kind == "specific" else None
            current = self.registry.default.get(m.name)
            proposed = choose_default(current, counts, allowed)
            self.registry.switch(m.name, self.decide(m.name, current, proposed, {v for v, n in counts.items() if n}))
        self.pool.fail_waiters()  # requests waiting for a version no worker reports any more
        self.pool.wake()  # and those waiting for one a worker in rotation reports now
        self._on_change()
