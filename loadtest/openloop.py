"""Open-loop load: requests sent on a fixed schedule, whatever the answers do.

A closed-loop client (``common.closed_loop``) sends its next request only
once the previous answer came back.  When the server stalls for S seconds,
such a client stalls with it: each of its C senders records one slow
request, and the requests that real users would have sent during the stall
are never sent (coordinated omission), so a p999 hides the stall.

``OpenLoop`` instead sends request ``i`` at ``start + i / rate``, each in
its own task, never waiting for earlier answers, and counts its latency
from that *scheduled* time to its answer.  A stall of S seconds then shows
in full: every request scheduled during it waits until it ends, with
latencies from S down to 0.

Counting from the schedule also charges the client's own delays to the
server: when this process cannot keep up (its event loop busy, its CPU
taken), requests go out late.  So every request also records when it was
actually handed to ``call`` (``sent``); ``lateness = sent - scheduled`` is
how far behind its schedule the client was.  A lateness that stays within a
timer tick means the numbers are the server's; one that grows means the
client was the bottleneck and the latencies are void (``LatenessStats.saturated``).

The scheduler wakes on the event loop's timers, which have millisecond
resolution under uvloop: it sleeps at least ``tick`` seconds and then sends
every request that fell due meanwhile, so lateness is typically up to one
tick (rather than a busy loop burning a core).

Nothing here imports TensorFlow or gRPC; ``error_code`` understands gRPC
errors by duck typing.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np
import numpy.typing as npt

T = TypeVar("T")
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

OK = "OK"
UNANSWERED = "CLIENT_UNANSWERED"  # still in flight when the drain timed out
# Lateness beyond which the client, not the server, set the pace: the typical
# request went out late (the sender is behind for good), or a backlog built up.
SATURATED_P50_S = 0.005
SATURATED_BACKLOG_S = 0.5


def error_code(exc: BaseException) -> tuple[str, str]:
    """``(code, message)`` of a failed call: the gRPC status name, or the exception type."""
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    if callable(code):
        try:
            name = str(getattr(code(), "name", code()))
            text = details() if callable(details) else str(exc)
            return name, f"{name}: {text}"
        except Exception:  # noqa: BLE001 - fall through to the type name
            pass
    return type(exc).__name__, f"{type(exc).__name__}: {exc}"


def pct(values: FloatArray, q: float) -> float:
    """The ``q``-th percentile (linear interpolation, like ``common.percentile``); NaN if empty."""
    return float(np.percentile(values, q)) if values.size else float("nan")


@dataclass(frozen=True)
class LatencyStats:
    """Latencies (seconds, from each request's scheduled time) of the requests of one window."""

    requests: int  # scheduled in the window
    answered: int  # got an answer, OK or error
    p50: float
    p99: float
    p999: float
    max: float
    codes: Counter[str]  # status code -> count, OK included

    @property
    def errors(self) -> int:
        return sum(n for code, n in self.codes.items() if code != OK)

    def error_codes(self) -> dict[str, int]:
        return {code: n for code, n in sorted(self.codes.items()) if code != OK}


@dataclass(frozen=True)
class LatenessStats:
    """How far behind its schedule the client sent the requests of one window (seconds)."""

    p50: float
    p99: float
    max: float

    @property
    def saturated(self) -> bool:
        """The client fell behind for good (p50) or piled up a backlog (max): latencies are void.

        Short delays of a few requests (the client's CPU taken for a moment)
        are not saturation; compare ``p99`` with the latencies to judge them.
        """
        return self.p50 > SATURATED_P50_S or self.max > SATURATED_BACKLOG_S


@dataclass
class OpenLoopResult(Generic[T]):
    """Every request of one open-loop run, indexed by its position in the schedule.

    Times are seconds on the run's ``clock``; ``wall_offset`` converts them to
    ``time.time()`` (``wall = t + wall_offset``), to line them up with events
    another process stamped.  ``done`` is NaN for a request never answered.
    """

    rate: float
    start: float  # when request 0 was due
    scheduled: FloatArray
    sent: FloatArray
    done: FloatArray
    codes: list[str]  # OK or the failure's code, per request
    values: list[T | None]  # what ``call`` returned, per request (None on failure)
    errors: Counter[str] = field(default_factory=Counter)  # message -> count
    max_inflight: int = 0  # the most requests awaiting an answer at once
    wall_offset: float = 0.0

    def __len__(self) -> int:
        return int(self.scheduled.size)

    @property
    def latency(self) -> FloatArray:
        """Answer time minus scheduled time (NaN if unanswered)."""
        return self.done - self.scheduled

    @property
    def lateness(self) -> FloatArray:
        """Time handed to ``call`` minus scheduled time: how far behind the client was."""
        return self.sent - self.scheduled

    @property
    def ok(self) -> BoolArray:
        return np.array([c == OK for c in self.codes], dtype=bool)

    def window(self, start: float = -math.inf, end: float = math.inf) -> BoolArray:
        """Requests scheduled in ``[start, end)``."""
        return (self.scheduled >= start) & (self.scheduled < end)

    def latency_stats(self, mask: BoolArray | None = None) -> LatencyStats:
        """Latency percentiles over the answered requests of ``mask`` (all by default).

        Error answers count at the time they came, as OK ones do: a request
        that timed out after S seconds adds S to the tail, where leaving it
        out would hide exactly the stalls this load exists to show.
        """
        mask = np.ones(len(self), dtype=bool) if mask is None else mask
        lat = self.latency[mask]
        answered = lat[~np.isnan(lat)]
        codes = Counter(c for c, m in zip(self.codes, mask) if m)
        return LatencyStats(
            requests=int(mask.sum()),
            answered=int(answered.size),
            p50=pct(answered, 50),
            p99=pct(answered, 99),
            p999=pct(answered, 99.9),
            max=float(answered.max()) if answered.size else float("nan"),
            codes=codes,
        )

    def lateness_stats(self, mask: BoolArray | None = None) -> LatenessStats:
        late = self.lateness if mask is None else self.lateness[mask]
        late = late[~np.isnan(late)]
        return LatenessStats(p50=pct(late, 50), p99=pct(late, 99),
                             max=float(late.max()) if late.size else float("nan"))


class OpenLoop(Generic[T]):
    """Calls ``call()`` ``rate`` times a second on a fixed schedule; see the module docstring.

    ``run()`` goes on until ``stop`` is set or ``duration`` seconds of
    schedule have passed, then waits up to ``drain_timeout`` for the answers
    still due (a ``call`` should carry its own deadline) and returns an
    ``OpenLoopResult``.  At most ``max_inflight`` requests await an answer at
    once; beyond that the scheduler waits for one, which shows as lateness
    (memory stays bounded even if the server never answers).  While running,
    ``sent_count`` and ``inflight`` can be read from outside.
    """

    def __init__(
        self,
        call: Callable[[], Awaitable[T]],
        rate: float,
        *,
        max_inflight: int = 50_000,
        tick: float = 0.001,
        clock: Callable[[], float] = time.perf_counter,
        classify: Callable[[BaseException], tuple[str, str]] = error_code,
    ) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        if max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")
        self.call = call
        self.rate = float(rate)
        self.max_inflight = max_inflight
        self.tick = tick
        self.clock = clock
        self.classify = classify
        self._sent: list[float] = []
        self._done: list[float] = []
        self._codes: list[str] = []
        self._values: list[T | None] = []
        self._errors: Counter[str] = Counter()
        self._inflight: set[asyncio.Task[None]] = set()
        self._peak = 0
        self._start = self._wall_offset = 0.0

    @property
    def sent_count(self) -> int:
        return len(self._sent)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    @property
    def error_count(self) -> int:
        return sum(self._errors.values())

    async def _one(self, i: int) -> None:
        self._sent[i] = self.clock()
        try:
            value = await self.call()
        except asyncio.CancelledError:
            self._done[i] = math.nan
            self._codes[i] = UNANSWERED
            self._errors[f"{UNANSWERED}: no answer before the drain timed out"] += 1
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is a counted result
            self._done[i] = self.clock()
            code, message = self.classify(exc)
            self._codes[i] = code
            self._errors[message] += 1
            return
        self._done[i] = self.clock()
        self._codes[i] = OK
        self._values[i] = value

    def _launch(self) -> None:
        i = len(self._sent)
        self._sent.append(math.nan)
        self._done.append(math.nan)
        self._codes.append(UNANSWERED)
        self._values.append(None)
        task = asyncio.create_task(self._one(i))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        self._peak = max(self._peak, len(self._inflight))

    async def run(
        self,
        *,
        stop: asyncio.Event | None = None,
        duration: float | None = None,
        drain_timeout: float = 60.0,
    ) -> OpenLoopResult[T]:
        if stop is None and duration is None:
            raise ValueError("give stop, duration or both")
        clock = self.clock
        interval = 1.0 / self.rate
        self._wall_offset = time.time() - clock()
        start = self._start = clock()
        n = 0
        while True:
            if stop is not None and stop.is_set():
                break
            due = start + n * interval
            if duration is not None and n * interval >= duration:
                break
            now = clock()
            if due > now:
                # Timers fire on the loop's ticks: sleep a tick at least, then
                # send all that fell due, rather than spin on sleep(0).
                await asyncio.sleep(max(due - now, self.tick))
                continue
            while due <= now and (duration is None or n * interval < duration):
                if len(self._inflight) >= self.max_inflight:
                    await asyncio.wait(set(self._inflight), return_when=asyncio.FIRST_COMPLETED)
                    now = clock()
                self._launch()
                n += 1
                due = start + n * interval
            # Let the new tasks start their calls before the next wake-up.
            await asyncio.sleep(0)
        if self._inflight:
            _, pending = await asyncio.wait(set(self._inflight), timeout=drain_timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        return self.partial()

    def partial(self) -> OpenLoopResult[T]:
        """The requests sent so far (``done`` NaN for those still in flight); the whole run once it returned."""
        n = len(self._sent)
        return OpenLoopResult(
            rate=self.rate,
            start=self._start,
            scheduled=self._start + np.arange(n, dtype=np.float64) / self.rate,
            sent=np.array(self._sent, dtype=np.float64),
            done=np.array(self._done, dtype=np.float64),
            codes=list(self._codes),
            values=list(self._values),
            errors=Counter(self._errors),
            max_inflight=self._peak,
            wall_offset=self._wall_offset,
        )


def fmt_ms(seconds: float) -> str:
    """Seconds as milliseconds with sensible precision (``-`` for NaN)."""
    if seconds != seconds:
        return "-"
    ms = seconds * 1000
    if ms >= 100:
        return f"{ms:,.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    return f"{ms:.2f}"


def codes_text(codes: dict[str, int] | Sequence[tuple[str, int]]) -> str:
    """``UNAVAILABLE 3, DEADLINE_EXCEEDED 1`` (``0`` when there are none)."""
    items = list(codes.items()) if isinstance(codes, dict) else list(codes)
    return ", ".join(f"{code} {n}" for code, n in items) if items else "0"
