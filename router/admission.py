"""Admission: who may send how much, decided before a request costs anything.

Every data-plane request belongs to a tenant (the ``quotas.tenant_header``
header or gRPC metadata key; none: ``default``) and a model, and passes
three gates in order, each refusing with RESOURCE_EXHAUSTED / HTTP 429, a
``Retry-After`` computed from the gate (not a constant) and a message naming
the tenant or model and the quota:

1. the tenant's token bucket (``rate_per_s``, ``burst``), then its
   concurrency (``max_inflight`` admitted and not yet answered, with
   ``max_queued`` more allowed to wait);
2. the model's concurrency (``models[].quota``);
3. the router's own (``limits.max_inflight``, ``limits.max_waiting``): when
   the pool is saturated requests wait here, served high before normal
   before low.  A full waiting line sheds its lowest-priority newest
   request to make room for a higher one, and every ``limits.priority_aging_s``
   a request waits moves it up one class, so no class starves.

``Gate`` and ``TokenBucket`` are the policy, with the clock passed in;
``Admission.admit`` is what the frontends call.  Tenants not named in the
config get the ``default`` quota each, tracked in a bounded table.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from router.config import Config, QuotaConfig
from shared.errors import DeadlineExceeded, ResourceExhausted

PRIORITIES = {"low": 0, "normal": 1, "high": 2}
DEFAULT_TENANT = "default"
OTHER_TENANTS = "_other"  # the metrics label of tenants the config does not name
MAX_TRACKED_TENANTS = 4096


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up (pure: the clock is passed in)."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.tokens = self.burst
        self.stamp = now

    def wait(self, now: float) -> float:
        """0 when a token is there; else the seconds until one will be."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate

    def spend(self) -> None:
        self.tokens -= 1.0

    def take(self, now: float) -> float:
        """0 when a token was taken; else the seconds until one will be there."""
        wait = self.wait(now)
        if wait == 0.0:
            self.spend()
        return wait


@dataclass(eq=False)
class _Waiter:
    rank: int
    since: float
    future: asyncio.Future[None]


class Gate:
    """At most ``capacity`` holders (0: no limit); up to ``max_queued`` more wait, by priority.

    ``enter`` returns once a slot is held (release it with ``leave``), or
    raises ResourceExhausted when it may not wait.  ``aging_s`` > 0: a waiter
    moves up one priority class per ``aging_s`` waited.
    """

    def __init__(self, name: str, capacity: int, max_queued: int, clock: Callable[[], float],
                 aging_s: float = 0.0) -> None:
        self.name = name
        self.capacity = capacity
        self.max_queued = max_queued
        self.aging_s = aging_s
        self._clock = clock
        self.inflight = 0
        self._lines: list[deque[_Waiter]] = [deque() for _ in PRIORITIES]
        self._done = 0  # completions, for the Retry-After estimate
        self._done_since = clock()

    @property
    def queued(self) -> int:
        return sum(len(line) for line in self._lines)

    def _free(self) -> bool:
        return self.capacity <= 0 or self.inflight < self.capacity

    def try_enter(self) -> bool:
        if self._free() and not self.queued:
            self.inflight += 1
            return True
        return False

    async def enter(self, rank: int, deadline: float, what: str) -> None:
        if self.try_enter():
            return
        if self.queued >= self.max_queued and not self._shed_lower(rank):
            raise ResourceExhausted(f"{what}: {self.inflight} in flight (max {self.capacity}) and "
                                    f"{self.queued} waiting (max {self.max_queued})", self.retry_after())
        waiter = _Waiter(rank, self._clock(), asyncio.get_running_loop().create_future())
        self._lines[rank].append(waiter)
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await asyncio.shield(waiter.future)
        except BaseException as exc:
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                self.leave()  # the slot came just as the caller gave up: pass it on
            else:
                waiter.future.cancel()
                try:
                    self._lines[rank].remove(waiter)
                except ValueError:
                    pass
            if isinstance(exc, TimeoutError):
                raise DeadlineExceeded(f"deadline exceeded while waiting for admission ({what})") from None
            raise

    def _shed_lower(self, rank: int) -> bool:
        """Make room by refusing the newest waiter of a lower class; False when there is none."""
        for lower in range(rank):
            line = self._lines[lower]
            while line:
                victim = line.pop()
                if not victim.future.done():
                    victim.future.set_exception(ResourceExhausted(
                        f"{self.name}: shed to make room for a higher-priority request", self.retry_after()))
                    return True
        return False

    def leave(self) -> None:
        self.inflight -= 1
        self._done += 1
        while self._free():
            waiter = self._next()
            if waiter is None:
                return
            self.inflight += 1
            waiter.future.set_result(None)

    def _next(self) -> _Waiter | None:
        """The waiter to serve next: highest class after aging, the oldest on ties."""
        now = self._clock()
        best: _Waiter | None = None
        best_key: tuple[float, float] | None = None
        for line in self._lines:
            while line and line[0].future.done():
                line.popleft()  # gave up, or was shed
            if not line:
                continue
            head = line[0]
            aged = head.rank + (math.floor((now - head.since) / self.aging_s) if self.aging_s > 0 else 0)
            key = (aged, -head.since)
            if best_key is None or key > best_key:
                best, best_key = head, key
        if best is not None:
            self._lines[best.rank].popleft()
        return best

    def retry_after(self) -> float:
        """Seconds until the line ahead would be through, at the rate slots have been freeing."""
        now = self._clock()
        elapsed = max(now - self._done_since, 1e-3)
        rate = self._done / elapsed
        if elapsed > 10.0:  # a rolling estimate: the last ~10 s
            self._done, self._done_since = 0, now
        if rate <= 0:
            return 1.0
        return max(0.001, (self.queued + 1) / rate)


@dataclass
class _Tenant:
    name: str
    label: str
    quota: QuotaConfig
    gate: Gate
    bucket: TokenBucket | None
    rank: int
    held: int = 0  # its refusals being held right now


@dataclass
class Ticket:
    """What a request holds while it is served; ``release`` once answered."""

    gates: list[Gate] = field(default_factory=list)
    tenant: str = DEFAULT_TENANT

    def release(self) -> None:
        for gate in reversed(self.gates):
            gate.leave()
        self.gates.clear()


Shed = Callable[[str, str, str], None]  # tenant label, model, reason


class Admission:
    def __init__(self, config: Config, *, clock: Callable[[], float] = time.monotonic,
                 on_shed: Shed | None = None, on_admit: Callable[[str, str, bool], None] | None = None,
                 rng: random.Random | None = None) -> None:
        self._clock = clock
        self.quotas = config.quotas
        self.header = config.quotas.tenant_header.lower()
        limits = config.limits
        self.router = Gate("router", limits.max_inflight, limits.max_waiting, clock, limits.priority_aging_s)
        self.models = {m.name: Gate(f"model {m.name}", m.quota.max_inflight, m.quota.max_queued, clock,
                                    limits.priority_aging_s) for m in config.models}
        self._config_models = config.models
        self._tenants: OrderedDict[str, _Tenant] = OrderedDict()
        self.refusal_delay_s = limits.refusal_delay_s
        self.max_delayed = limits.max_delayed_refusals
        self.delayed = 0  # refusals being held right now
        self._rng = rng or random.Random()
        self._on_shed = on_shed or (lambda tenant, model, reason: None)
        self._on_admit = on_admit or (lambda tenant, model, waited: None)

    def set_models(self, config: Config) -> None:
        """Gates for a new model list: a kept model keeps its gate (and who waits at it)
        unless its quota changed; a removed model's gate goes."""
        old = {m.name: m for m in self._config_models}
        limits = config.limits
        gates = {}
        for m in config.models:
            gate = self.models.get(m.name)
            if gate is None or old[m.name].quota != m.quota:
                gate = Gate(f"model {m.name}", m.quota.max_inflight, m.quota.max_queued, self._clock,
                            limits.priority_aging_s)
            gates[m.name] = gate
        self.models = gates
        self._config_models = config.models

    def tenant(self, name: str | None) -> _Tenant:
        name = name or DEFAULT_TENANT
        t = self._tenants.get(name)
        if t is not None:
            self._tenants.move_to_end(name)
            return t
        named = self.quotas.tenants.get(name)
        quota = named if named is not None else self.quotas.default
        label = name if named is not None or name == DEFAULT_TENANT else OTHER_TENANTS
        now = self._clock()
        t = _Tenant(name, label, quota,
                    Gate(f"tenant {name}", quota.max_inflight, quota.max_queued, self._clock),
                    TokenBucket(quota.rate_per_s, quota.burst, now) if quota.rate_per_s > 0 else None,
                    PRIORITIES[quota.priority])
        self._tenants[name] = t
        while len(self._tenants) > MAX_TRACKED_TENANTS:  # forget an idle one (a flood of made-up names)
            oldest, entry = next(iter(self._tenants.items()))
            if entry.gate.inflight or entry.gate.queued or entry.held:
                self._tenants.move_to_end(oldest)
                break
            del self._tenants[oldest]
        return t

    def inflight(self) -> dict[str, int]:
        """In-flight requests per tenant label, for the metrics."""
        out: dict[str, int] = {}
        for t in self._tenants.values():
            out[t.label] = out.get(t.label, 0) + t.gate.inflight
        return out

    async def admit(self, tenant_name: str | None, model: str, deadline: float) -> Ticket:
        """Hold every gate for one request, or raise ResourceExhausted / DeadlineExceeded."""
        try:
            return await self._admit(tenant_name, model, deadline)
        except ResourceExhausted:
            # Decided now, answered later: a flood that retries at once then
            # spends its own time waiting, not the router's CPU refusing it.  The
            # more of a tenant's refusals are already held, the longer the next
            # one waits (a client hitting its quota now and then: about the base
            # delay; one with hundreds of calls open: many times it, up to 10x).
            # Jittered (0.5x to 1.5x), so that refusals answered together do not
            # bring their clients' retries back in one burst.
            t = self.tenant(tenant_name)
            scale = min(10.0, 1.0 + t.held / 32)
            delay = min(self.refusal_delay_s * scale * (0.5 + self._rng.random()),
                        max(0.0, deadline - time.monotonic()))
            if delay > 0 and self.delayed < self.max_delayed:
                self.delayed += 1
                t.held += 1
                try:
                    await asyncio.sleep(delay)
                finally:
                    self.delayed -= 1
                    t.held -= 1
            raise

    async def _admit(self, tenant_name: str | None, model: str, deadline: float) -> Ticket:
        t = self.tenant(tenant_name)
        ticket = Ticket(tenant=t.label)
        waited = False
        try:
            if t.bucket is not None:
                wait = t.bucket.wait(self._clock())
                if wait > 0:
                    self._on_shed(t.label, model, "tenant_rate")
                    raise ResourceExhausted(f"tenant {t.name} is over its quota rate_per_s {t.quota.rate_per_s:g} "
                                            f"(burst {t.quota.burst})", wait)
            for gate, what, reason in ((t.gate, f"tenant {t.name} quota max_inflight", "tenant_inflight"),
                                       (self.models.get(model), f"model {model} quota max_inflight",
                                        "model_inflight"),
                                       (self.router, "router limits.max_inflight", "router_full")):
                if gate is None:
                    continue
                if not gate.try_enter():
                    waited = True
                    try:
                        await gate.enter(t.rank, deadline, what)
                    except ResourceExhausted:
                        self._on_shed(t.label, model, reason)
                        raise
                ticket.gates.append(gate)
        except BaseException:
            ticket.release()
            raise
        if t.bucket is not None:
            t.bucket.spend()  # only admitted requests spend tokens: a refusal costs the tenant nothing
        self._on_admit(t.label, model, waited)
        return ticket


# -- quotas over several data-plane processes (router/procs.py) -----------------------------------


@dataclass
class _SharedTicket(Ticket):
    """A ticket whose tenant and model quotas the control plane holds: released there too."""

    remote: Callable[[], None] = lambda: None

    def release(self) -> None:
        super().release()
        remote, self.remote = self.remote, lambda: None
        remote()


class SharedAdmission(Admission):
    """Admission in one of N data-plane processes, with quotas that hold for the whole router.

    A tenant's quotas (``rate_per_s``, ``max_inflight``, ``max_queued``) and a
    model's are decided in one place, the control plane (its ``Admission``):
    a request of a tenant or model that has one asks it (``ask``: one message
    there and back on the control socket, another to release) before it is
    served here.  Requests of tenants and models without quotas never leave the
    process.  The router-wide gate (``limits.max_inflight``, ``max_waiting``)
    is split evenly: each process holds 1/N of it, with every tenant's priority.
    """

    def __init__(self, config: Config, processes: int, ask: Callable[[str | None, str, float], Any],
                 **kwargs: Any) -> None:
        import dataclasses as dc

        q = config.quotas
        # Here: priorities only (the order of the router gate), no limits; the router gate's share.
        local = dc.replace(
            config,
            quotas=dc.replace(q, default=QuotaConfig(priority=q.default.priority),
                              tenants={n: QuotaConfig(priority=t.priority) for n, t in q.tenants.items()}),
            models=tuple(dc.replace(m, quota=QuotaConfig()) for m in config.models),
            limits=dc.replace(config.limits, max_inflight=max(1, math.ceil(config.limits.max_inflight / processes)),
                              max_waiting=math.ceil(config.limits.max_waiting / processes)))
        on_admit = kwargs.pop("on_admit", None) or (lambda tenant, model, waited: None)
        super().__init__(local, on_admit=lambda tenant, model, waited: None
                         if self._limited_label(tenant, model) else on_admit(tenant, model, waited), **kwargs)
        self._shared_quotas = q
        self._model_limited = {m.name: m.quota.max_inflight > 0 for m in config.models}
        self._ask = ask

    @staticmethod
    def _has_limit(quota: QuotaConfig) -> bool:
        return quota.max_inflight > 0 or quota.rate_per_s > 0

    def limited(self, tenant_name: str | None, model: str) -> bool:
        """The control plane decides this request (its tenant or its model has a quota)."""
        quota = self._shared_quotas.tenants.get(tenant_name or DEFAULT_TENANT, self._shared_quotas.default)
        return self._has_limit(quota) or self._model_limited.get(model, False)

    def _limited_label(self, label: str, model: str) -> bool:
        name = DEFAULT_TENANT if label == OTHER_TENANTS else label
        return self.limited(name, model)

    def set_models(self, config: Config) -> None:
        import dataclasses as dc

        super().set_models(dc.replace(config, models=tuple(dc.replace(m, quota=QuotaConfig())
                                                           for m in config.models)))
        self._model_limited = {m.name: m.quota.max_inflight > 0 for m in config.models}

    async def admit(self, tenant_name: str | None, model: str, deadline: float) -> Ticket:
        if not self.limited(tenant_name, model):
            return await super().admit(tenant_name, model, deadline)
        release: Callable[[], None] = await self._ask(tenant_name, model, deadline)
        try:
            ticket = await super().admit(tenant_name, model, deadline)
        except BaseException:
            release()
            raise
        return _SharedTicket(ticket.gates, ticket.tenant, release)
