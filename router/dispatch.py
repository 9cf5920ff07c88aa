"""Sending a call to a worker, and its one retry: the only code in the router that does.

The data plane (single requests, forwarded calls) and the batcher (batches,
and a rejected batch's members one by one) all send through ``Dispatcher``:
it takes a slot on a worker that holds the version (or uses the slot the
caller already took), runs the call with the caller's remaining deadline,
gives the slot back, and retries once on another worker when the first one
failed under the call:

* the worker died or could not be reached (``TransportError``);
* the worker answered NOT_FOUND for a version the router thought it held
  (it dropped the version between the router's view and the call): the
  control plane brings its view up to date first; with no other worker
  left, the caller gets ``VersionWithdrawn`` (the data plane then sends a
  request whose version the router chose to the version it would get now).

Every other error goes back as the worker said it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from protos import predict_pb2
from router.pool import ANY_VERSION, Backend, Pool
from router.registry import VersionWithdrawn
from router.transport import Transport, TransportError
from shared.errors import DeadlineExceeded, NotFound, Unavailable

log = logging.getLogger("router.dispatch")

T = TypeVar("T")
Call = Callable[[Transport, float], Awaitable[T]]
RetryHook = Callable[[str, str], None]  # model, reason


class Dispatcher:
    def __init__(self, pool: Pool, *, on_retry: RetryHook | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.on_retry: RetryHook = on_retry or (lambda model, reason: None)
        self._clock = clock

    async def send(self, model: str, version: int, call: Call[T], deadline: float, *,
                   backend: Backend | None = None, exclude: Backend | None = None) -> T:
        """Run ``call`` on a slot of a worker holding ``model`` ``version`` (``ANY_VERSION``:
        any worker in rotation); once more elsewhere if the worker fails under it.

        ``backend``: a slot the caller already took for this call (released here).
        ``exclude``: a worker that already failed this call.
        """
        pool = self.pool
        for attempt in (0, 1):
            if backend is None:
                backend = await pool.acquire(model, version, deadline, exclude)
            missing: NotFound | None = None
            try:
                timeout = deadline - self._clock()
                if timeout <= 0:
                    raise DeadlineExceeded("deadline exceeded before the request reached a worker")
                transport = backend.transport
                if transport is None:  # closed between the slot and the call: the worker is gone
                    raise TransportError(f"worker {backend.name} is gone")
                return await call(transport, timeout)
            except TransportError:
                if attempt or not self._others(model, version, backend):
                    raise
                self.on_retry(model, "worker_unavailable")
                log.warning("worker %s failed under a request; retrying elsewhere", backend.name)
            except NotFound as exc:
                if version == ANY_VERSION:
                    raise  # the call named its models itself: the answer is the worker's
                missing = exc
            finally:
                pool.release(backend, model)
            if missing is not None:
                await pool.version_missing(backend, model, version)  # the view brought up to date
                if attempt or not self._others(model, version, backend):
                    if isinstance(missing, VersionWithdrawn):
                        raise missing
                    # It left the pool (a worker that manages its own versions unloaded it):
                    # a request the router chose the version for goes to the version it would get now.
                    raise VersionWithdrawn(missing.message) from missing
                self.on_retry(model, "version_moved")
            exclude, backend = backend, None
        raise Unavailable("unreachable")  # pragma: no cover - the loop returns or raises

    def _others(self, model: str, version: int, backend: Backend) -> bool:
        return any(b is not backend for b in self.pool.holders(model, version))


def predict_call(request: predict_pb2.PredictRequest) -> Call[predict_pb2.PredictResponse]:
    async def call(transport: Transport, timeout: float) -> predict_pb2.PredictResponse:
        return await transport.predict(request, timeout)

    return call


def raw_call(method: str, body: bytes) -> Call[bytes]:
    async def call(transport: Transport, timeout: float) -> bytes:
        return await transport.raw(method, body, timeout)

    return call
