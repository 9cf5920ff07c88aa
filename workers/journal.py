"""The worker's own record of what it did to its models while clients called it.

The router stages hot updates so that no worker loads, warms or unloads a
version while it serves client traffic (DESIGN.md, decision 4).  Its tests
prove that from this journal rather than from the router's intentions: every
load, unload and warm-up call is an :class:`Operation` carrying how many
client calls were in flight at any moment during it.  A correct rollout shows
``client_requests == 0`` on every operation of a drained worker.

Times are ``time.monotonic()`` (CLOCK_MONOTONIC on Linux): one clock for
every process of a machine, so the router's tests can line a worker's
operations up against their own timestamps or another worker's.

Loop-only: every method runs on the worker's event loop (the request handlers
and the manager's coroutines), so nothing here locks.  The request path pays
one increment per call, plus a loop over the active operations only while
one is active.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

OperationKind = Literal["load", "unload", "warmup"]

MAX_OPERATIONS = 10_000


@dataclass(slots=True)
class Operation:
    """One load, unload or warm-up call; ``end`` is None while it runs."""

    kind: OperationKind
    model: str
    version: int
    start: float
    end: float | None = None
    client_requests: int = 0  # client calls in flight at its start or started before its end


class Journal:
    """The last ``maxlen`` operations and the client calls in flight right now."""

    def __init__(self, maxlen: int = MAX_OPERATIONS, clock: Callable[[], float] = time.monotonic) -> None:
        self.operations: deque[Operation] = deque(maxlen=maxlen)
        self._active: list[Operation] = []
        self._clock = clock
        self.in_flight = 0
        self.peak_in_flight = 0  # the most client calls in flight at once, ever

    def client_started(self) -> None:
        self.in_flight += 1
        if self.in_flight > self.peak_in_flight:
            self.peak_in_flight = self.in_flight
        for op in self._active:
            op.client_requests += 1

    def client_finished(self) -> None:
        self.in_flight -= 1

    @contextmanager
    def record(self, kind: OperationKind, model: str, version: int) -> Iterator[Operation]:
        """Journal the enclosed block (awaits included) as one operation, failures too."""
        op = Operation(kind, model, version, self._clock(), client_requests=self.in_flight)
        self.operations.append(op)
        self._active.append(op)
        try:
            yield op
        finally:
            op.end = self._clock()
            self._active.remove(op)
