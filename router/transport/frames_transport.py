"""The router's end of the lean framed protocol (shared/frames.py), behind the transport seam.

``FramesTransport`` sends Predict calls (single requests and batches) to a
spawned worker over one persistent Unix-socket connection, pipelined and
matched by id, and everything else (warm-up, metadata, status, reload,
health, forwarded calls) over the worker's gRPC API, through the
``GrpcTransport`` it wraps.

The connection is opened on first use and after it is lost, with a
handshake: a worker that refuses the protocol version (or has no frames
socket at all) makes this transport send Predict over gRPC from then on,
said once in the log.  Every call carries the caller's remaining deadline; a call given
up on (deadline passed, or the client went away) sends CANCEL, so a request
the worker has not started never runs.  A lost connection, or bytes that are
not the protocol, fail every call in flight on it with ``TransportError``:
the dispatcher retries each once on another worker.
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

from google.protobuf.message import DecodeError

from protos import config_pb2, metadata_pb2, predict_pb2, status_pb2
from shared import frames
from shared.errors import CODE_BY_NUMBER, DeadlineExceeded, Internal, InvalidArgument, from_code
from router.transport import Transport, TransportError

log = logging.getLogger("router.transport.frames")

HANDSHAKE_TIMEOUT_S = 5.0


class _Expired(Exception):
    """A call's deadline passed before its answer came."""


def _expire(future: asyncio.Future[bytes]) -> None:
    if not future.done():
        future.set_exception(_Expired())


def _retrieve(attempt: asyncio.Future[_Connection]) -> None:
    """Mark a failed attempt's error as seen (its callers may all have given up already)."""
    if not attempt.cancelled():
        attempt.exception()


class ProtocolRefused(Exception):
    """The worker speaks another version of the protocol (or none)."""


class _Connection(asyncio.Protocol):
    """One connection to a worker: the calls in flight on it, by id."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.decoder = frames.Decoder()
        self.calls: dict[int, asyncio.Future[bytes]] = {}
        self.welcome: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.closed = False
        self._next = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio.Transport subclass
        self.transport.write(frames.hello())

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"connection to worker {self.name} lost" + (f": {exc}" if exc else ""))

    def _fail(self, why: str) -> None:
        self.closed = True
        if not self.welcome.done():
            self.welcome.set_exception(TransportError(why))
        for future in self.calls.values():
            if not future.done():
                future.set_exception(TransportError(why))
        self.calls.clear()
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        try:
            received = self.decoder.feed(data)
        except frames.FrameError as exc:
            log.warning("worker %s sent bytes that are not the frames protocol (%s); reconnecting", self.name, exc)
            self._fail(f"protocol error from worker {self.name}: {exc}")
            return
        for frame in received:
            kind = frame.kind
            if kind == frames.RESULT or kind == frames.ERROR:
                future = self.calls.pop(frame.id, None)
                if future is None or future.done():
                    continue  # a call given up on: its answer is dropped
                if kind == frames.RESULT:
                    future.set_result(frame.payload)
                else:
                    code = CODE_BY_NUMBER.get(frame.code)
                    message = frame.payload.decode("utf-8", "replace")
                    future.set_exception(from_code(code, message) if code is not None else Internal(message))
            elif kind == frames.WELCOME and not self.welcome.done():
                self.welcome.set_result(frame.code)
            elif kind == frames.REFUSED and not self.welcome.done():
                self.welcome.set_exception(ProtocolRefused(
                    f"worker {self.name} speaks frames version {frame.code}, this router {frames.VERSION}"))
            else:
                self._fail(f"unexpected {frames.KINDS[kind]} frame from worker {self.name}")
                return

    def call(self, payload: bytes, timeout: float) -> tuple[int, asyncio.Future[bytes]]:
        """Send one PREDICT; its id and the future of its answer's payload."""
        if self.closed or self.transport is None:
            # Lost between the handshake and this call: nothing would ever answer it.
            raise TransportError(f"connection to worker {self.name} lost")
        self._next = (self._next + 1) & 0xFFFFFFFF
        id_ = self._next
        try:
            parts = frames.encode_parts(frames.PREDICT, payload, id=id_, deadline_us=int(timeout * 1e6))
        except frames.FrameError as exc:
            raise InvalidArgument(f"the request is too large for the worker transport: {exc}") from None
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.calls[id_] = future
        self.transport.writelines(parts)
        return id_, future

    def cancel(self, id_: int) -> None:
        if self.calls.pop(id_, None) is not None and self.transport is not None and not self.closed:
            self.transport.write(frames.encode(frames.CANCEL, id=id_))


class FramesTransport:
    """Predict over frames, the rest over gRPC (``control``)."""

    def __init__(self, name: str, address: str, control: Transport) -> None:
        if not address.startswith("unix:"):
            raise ValueError(f"frames need a Unix socket address, not {address!r}")
        self.name = name
        self.path = address[len("unix:"):]
        self.control = control
        self.refused = False  # the worker does not speak our version: Predict goes over gRPC
        self._connection: _Connection | None = None
        # One connection attempt at a time, shared by every call that needs it.
        self._connecting: asyncio.Future[_Connection] | None = None
        self._closed = False

    async def _connect(self, timeout: float) -> _Connection:
        """The open connection, or one opened now (waited for at most ``timeout``)."""
        connection = self._connection
        if connection is not None and not connection.closed:
            return connection
        if self._closed:
            raise TransportError(f"transport to worker {self.name} closed")
        attempt = self._connecting
        if attempt is None or attempt.done():
            attempt = self._connecting = asyncio.ensure_future(self._open())
            attempt.add_done_callback(_retrieve)
        try:
            async with asyncio.timeout(timeout):
                # Shielded: a caller that gives up does not abort the attempt the others wait for.
                return await asyncio.shield(attempt)
        except TimeoutError:
            raise DeadlineExceeded(f"deadline exceeded connecting to worker {self.name}") from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if attempt.cancelled() and task is not None and not task.cancelling():
                # The attempt was abandoned (this transport closed), not this call.
                raise TransportError(f"transport to worker {self.name} closed") from None
            raise

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await loop.create_unix_connection(lambda: _Connection(self.name), self.path)
        except FileNotFoundError as exc:
            # No frames socket at all (a worker started without --frames-listen), unlike a
            # socket nobody answers on (a worker that died): this worker speaks gRPC only.
            raise ProtocolRefused(f"worker {self.name} has no frames socket at {self.path}") from exc
        except OSError as exc:
            raise TransportError(f"cannot reach worker {self.name} at {self.path}: {exc}") from exc
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                await connection.welcome
        except TimeoutError:
            connection._fail("no answer to the handshake")
            raise TransportError(f"worker {self.name} did not answer the frames handshake") from None
        except BaseException:  # refused, lost, or this transport closed meanwhile
            connection._fail("handshake abandoned")
            raise
        if self._closed:
            connection._fail(f"transport to worker {self.name} closed")
            raise TransportError(f"transport to worker {self.name} closed")
        self._connection = connection
        return connection

    async def predict(self, request: predict_pb2.PredictRequest, timeout: float) -> predict_pb2.PredictResponse:
        if self.refused:
            return await self.control.predict(request, timeout)
        try:
            connection = await self._connect(timeout)
        except ProtocolRefused as exc:
            self.refused = True
            log.error("%s; sending its Predict calls over gRPC", exc)
            return await self.control.predict(request, timeout)
        # Sorted map keys: the inputs map reaches the worker in one canonical order.
        id_, future = connection.call(request.SerializeToString(deterministic=True), timeout)
        # A timer on the call's own future (cheaper than a timeout scope per call).
        timer = asyncio.get_running_loop().call_later(timeout, _expire, future)
        try:
            payload = await future
        except _Expired:
            connection.cancel(id_)
            raise DeadlineExceeded(f"deadline exceeded waiting for worker {self.name}") from None
        except asyncio.CancelledError:
            connection.cancel(id_)
            raise
        finally:
            timer.cancel()
        try:
            return predict_pb2.PredictResponse.FromString(payload)
        except DecodeError as exc:
            raise TransportError(f"worker {self.name} answered with a malformed PredictResponse: {exc}") from exc

    # Everything else goes over the worker's gRPC API.

    async def warmup(self, request: predict_pb2.PredictRequest, timeout: float,
                     pace: str | None = None) -> predict_pb2.PredictResponse:
        return await self.control.warmup(request, timeout, pace)

    async def metadata(self, request: metadata_pb2.GetModelMetadataRequest,
                       timeout: float) -> metadata_pb2.GetModelMetadataResponse:
        return await self.control.metadata(request, timeout)

    async def status(self, request: status_pb2.GetModelStatusRequest,
                     timeout: float) -> status_pb2.GetModelStatusResponse:
        return await self.control.status(request, timeout)

    async def reload(self, request: config_pb2.ReloadConfigRequest, timeout: float,
                     pace: str | None = None) -> config_pb2.ReloadConfigResponse:
        return await self.control.reload(request, timeout, pace)

    async def raw(self, method: str, body: bytes, timeout: float) -> bytes:
        return await self.control.raw(method, body, timeout)

    async def healthy(self, timeout: float) -> bool:
        return await self.control.healthy(timeout)

    async def close(self) -> None:
        self._closed = True
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        connection, self._connection = self._connection, None
        if connection is not None:
            connection._fail(f"transport to worker {self.name} closed")
        await self.control.close()

