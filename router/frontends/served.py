"""What both frontends do around every request, in one place.

``Frontend`` holds a protocol's in-flight count and the label its model
names get in metrics (unknown names share ``_unknown``: a URL must not mint
new series).  ``with front.request(api) as r:`` binds a request id for the
logs, counts the request in flight, and on the way out releases its quota
ticket and records its metric and access-log line, with whatever the
handler set on ``r`` (model, code, ticket).
"""

from __future__ import annotations

import time
from contextvars import Token
from types import TracebackType
from typing import Protocol

from router import log as rlog
from router.metrics import Metrics


class Ticket(Protocol):
    def release(self) -> None: ...


class Frontend:
    def __init__(self, protocol: str, metrics: Metrics, model_names: frozenset[str]) -> None:
        self.protocol = protocol
        self.metrics = metrics
        self.model_names = model_names
        self.active = 0  # requests being handled
        metrics.track_in_flight(protocol, lambda: self.active)

    def label(self, model: str) -> str:
        return model if model in self.model_names else "_unknown"

    def request(self, api: str) -> Served:
        return Served(self, api)


class Served:
    __slots__ = ("front", "api", "model", "code", "ticket", "_start", "_token")

    def __init__(self, front: Frontend, api: str) -> None:
        self.front = front
        self.api = api
        self.model = ""
        self.code = "OK"
        self.ticket: Ticket | None = None
        self._start = 0.0
        self._token: Token[str] | None = None

    def __enter__(self) -> Served:
        self._start = time.perf_counter()
        self.front.active += 1
        self._token = rlog.bind_request_id(rlog.new_request_id())
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        front = self.front
        if self.ticket is not None:
            self.ticket.release()
        elapsed = time.perf_counter() - self._start
        front.active -= 1
        front.metrics.observe_request(front.label(self.model), self.api, front.protocol, self.code, elapsed)
        rlog.access(self.api, self.model, self.code, elapsed, front.protocol)
        if self._token is not None:
            rlog.request_id.reset(self._token)
