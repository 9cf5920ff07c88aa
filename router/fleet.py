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

Passive routers (``workers.control: passive``) in front of the same servers
also switch their default version together.  Only the leader's own choice
(``choose_default``) moves the fleet: it writes ``fleet/switch/MODEL`` with
the new version; every replica (watching ``fleet/switch/``) holds new
unversioned requests of the model, polls its servers until it sees the
version served, and acknowledges under ``fleet/acks/MODEL/``; once every
live replica (``fleet/replicas/``) has (or after ``SWITCH_WAIT_S``), the
leader writes the default into the model's state.  Each replica switches as
it applies that one write and lets the held requests go: after any client
saw the new version, no replica answers an unversioned request from the old.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from typing import Any

from router.analysis import Window
from router.state import FLEET_PREFIX, EtcdStore, StoreUnavailable

log = logging.getLogger("router.fleet")

LEADER_KEY = FLEET_PREFIX + "leader"
WINDOWS = FLEET_PREFIX + "windows/"
REPLICAS = FLEET_PREFIX + "replicas/"  # one key per live replica, with its lease
SWITCHES = FLEET_PREFIX + "switch/"  # a default version the leader is moving the fleet to, per model
ACKS = FLEET_PREFIX + "acks/"  # MODEL/REPLICA: that replica holds the model's unversioned requests
SWITCH_WAIT_S = 1.5  # the leader waits this long at most for every replica to hold
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
            await self._put((store.prefix + REPLICAS + self.name).encode(), b"1")
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

    # -- a fleet-wide switch of the default version (passive routers: app.py) ------------------------

    async def watch_switches(self, on_begin: Callable[[str, int, str], None]) -> None:
        """Follow the leader's switches until cancelled: ``on_begin(model, version, switch_id)`` for each."""
        store = self.store
        key = (store.prefix + SWITCHES).encode()
        while True:
            try:
                watch = await store.call(lambda client: client.watch_prefix(key))
                async for event in watch:
                    if str(event.kind).endswith("DELETE"):
                        continue
                    doc = json.loads(event.kv.value)
                    on_begin(event.kv.key.decode()[len(key):], int(doc["to"]), str(doc["id"]))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("switch watch: %s", exc)
            await asyncio.sleep(TICK_S)

    async def begin_switch(self, model: str, version: int) -> str:
        switch_id = f"{self.name}/{time.time_ns()}"
        await self._put((self.store.prefix + SWITCHES + model).encode(),
                        json.dumps({"to": version, "id": switch_id}).encode())
        return switch_id

    async def ack(self, model: str, switch_id: str) -> None:
        await self._put((self.store.prefix + ACKS + model + "/" + self.name).encode(), switch_id.encode())

    async def wait_acks(self, model: str, switch_id: str, timeout: float = SWITCH_WAIT_S) -> tuple[set[str], set[str]]:
        """(replicas that hold, replicas alive) once every live replica holds, or after ``timeout``."""
        prefix = self.store.prefix
        end = time.monotonic() + timeout
        while True:
            found = await self.store.call(lambda client: client.get_prefix((prefix + FLEET_PREFIX).encode()))
            alive, holding = set(), set()
            for kv in found:
                name = kv.key.decode()[len(prefix):]
                if name.startswith(REPLICAS):
                    alive.add(name[len(REPLICAS):])
                elif name.startswith(ACKS + model + "/") and kv.value.decode() == switch_id:
                    holding.add(name[len(ACKS + model + "/"):])
            if alive <= holding or time.monotonic() > end:
                return holding, alive
            await asyncio.sleep(0.01)

    async def end_switch(self, model: str) -> None:
        prefix = self.store.prefix
        await self.store.call(lambda client: client.delete((prefix + SWITCHES + model).encode()))
        await self.store.call(lambda client: client.delete_prefix((prefix + ACKS + model + "/").encode()))

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
