"""Routers sharing one etcd (``state.backend: etcd``) as a fleet: one of them judges progressive delivery.

Each replica sees only its own traffic, so with every replica judging its own
windows two of them could promote, or one promote while another aborts.
Instead one replica leads: it holds ``fleet/leader`` under the state prefix,
bound to an etcd lease it keeps alive every ``TICK_S``.  A replica that
loses etcd stops leading at once (it cannot know whether it still holds the
key); one that dies (kill -9) lets its lease lapse after ``TTL_S`` and
another takes the key.

Every replica publishes, every ``TICK_S``, its window of requests per
version for each running progression (counts and a sample of latencies),
under ``fleet/windows/MODEL/REPLICA`` with its lease, so a dead replica's
windows go with it.  Each window is tagged with the moment its step started
(``step_started_at``, the leader's, from the stored progression), and the
leader judges a step from its own window plus every other replica's window
of that same step: the fleet's traffic.  The leader alone writes where the
progression is (step, when it started, verdicts, outcome) into the model's
state; the others follow it (router/control/canary.py ``follow``), so a new
leader continues at the step the old one had reached, with the time already
spent in it counted, and an outcome is decided once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import socket
from collections.abc import Callable
from typing import Any

from router.analysis import Window
from router.state import FLEET_PREFIX, EtcdStore, StoreUnavailable

log = logging.getLogger("router.fleet")

LEADER_KEY = FLEET_PREFIX + "leader"
WINDOWS = FLEET_PREFIX + "windows/"
TTL_S = 3  # a dead leader's lease lapses after this; another takes over
TICK_S = 0.5  # lease kept alive, leadership sought, windows published and read
PUBLISHED_SAMPLES = 1000  # latencies per version and window a replica publishes


def identity() -> str:
    """This replica's name in the fleet: host and process (a restarted router is a new replica)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Fleet:
    def __init__(self, store: EtcdStore, name: str, windows: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self.store = store
        self.name = name
        self.windows = windows  # what this replica publishes: {model: {"step_started_at": t, "versions": ...}}
        self.leading = False
        self.leader: str | None = None
        self.others: dict[str, dict[str, dict[str, Any]]] = {}  # model -> replica -> published window
        self.on_leading: Callable[[bool], None] = lambda leading: None
        self._lease: Any = None
        self._rng = random.Random()

    def _set_leading(self, leading: bool, why: str) -> None:
        if leading == self.leading:
            return
        self.leading = leading
        if leading:
            log.info("this router (%s) leads the fleet: it judges progressive delivery", self.name)
        else:
            log.warning("this router (%s) no longer leads the fleet: %s", self.name, why)
        self.on_leading(leading)

    async def run(self) -> None:
        while True:
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except StoreUnavailable as exc:
                self._lease = None
                self._set_leading(False, f"the state store is unreachable ({exc})")
            except Exception:  # the loop must outlive its own bugs
                log.exception("fleet pass failed")
            await asyncio.sleep(TICK_S)

    async def _tick(self) -> None:
        store = self.store
        if self._lease is None:
            self._lease = await store.call(lambda client: client.lease(TTL_S))
        else:
            lease_id = self._lease.id
            reply = await store.call(lambda client: client.refresh_lease(lease_id))
            if reply.TTL <= 0:
                self._lease = None
                self._set_leading(False, "its lease lapsed")
                return
        key = (store.prefix + LEADER_KEY).encode()
        if not self.leading:
            lease = self._lease

            def campaign(client: Any) -> Any:
                tx = client.transactions
                return client.transaction(compare=[tx.create(key) == 0],
                                          success=[tx.put(key, self.name.encode(), lease)], failure=[])

            won, _ = await store.call(campaign)
            if won:
                self._set_leading(True, "")
        for model, doc in self.windows().items():
            await self._put((store.prefix + WINDOWS + model + "/" + self.name).encode(), json.dumps(doc).encode())
        found = await store.call(lambda client: client.get_prefix((store.prefix + FLEET_PREFIX).encode()))
        leader: str | None = None
        others: dict[str, dict[str, dict[str, Any]]] = {}
        for kv in found:
            name = kv.key.decode()[len(store.prefix):]
            if name == LEADER_KEY:
                leader = kv.value.decode()
            elif name.startswith(WINDOWS):
                model, _, replica = name[len(WINDOWS):].rpartition("/")
                others.setdefault(model, {})[replica] = json.loads(kv.value)
        self.leader, self.others = leader, others
        if self.leading and leader != self.name:
            self._set_leading(False, f"{leader or 'nobody'} holds the lead")

    async def _put(self, key: bytes, value: bytes) -> None:
        lease = self._lease
        await self.store.call(lambda client: client.put(key, value, lease=lease))

    def merged(self, model: str, step_started_at: float, own: dict[int, Window]) -> dict[int, Window]:
        """The fleet's windows of a step: this replica's ``own`` plus every other replica's of the same step."""
        for replica, doc in self.others.get(model, {}).items():
            if replica == self.name or doc.get("step_started_at") != step_started_at:
                continue
            for version, summary in doc.get("versions", {}).items():
                own.setdefault(int(version), Window()).add(summary)
        return own

    def summary(self, windows: dict[int, Window]) -> dict[str, Any]:
        return {str(v): w.summary(PUBLISHED_SAMPLES, self._rng) for v, w in windows.items()}

    def status(self) -> dict[str, Any]:
        return {"replica": self.name, "leader": self.leader, "leading": self.leading,
                "replicas_publishing": sorted({r for by in self.others.values() for r in by})}

    async def close(self) -> None:
        """Give the lead up at once (the lease revoked: its keys go), rather than after TTL_S."""
        lease, self._lease = self._lease, None
        if lease is not None:
            try:
                await self.store.call(lambda client: client.revoke_lease(lease.id))
            except StoreUnavailable:
                pass
        self.leading = False
