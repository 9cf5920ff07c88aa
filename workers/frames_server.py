"""The worker's end of the lean framed protocol (shared/frames.py): Predict over a Unix socket, no HTTP/2.

One ``FramesServer`` protocol per connection (the router keeps one open per
worker).  After the handshake, each PREDICT frame becomes a task that runs
the same Predict as the gRPC service (``WorkerServices.predict``: inline on
the loop by default), and its RESULT or ERROR frame goes back with the
request's id as soon as it is ready.  A CANCEL for a request not started yet
means it never runs; one whose deadline passed before it started is answered
DEADLINE_EXCEEDED without running.  Bytes that are not the protocol close
the connection (the router's requests on it fail over to another worker).
This module imports no TensorFlow itself.
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast
import time
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError

from protos import predict_pb2
from shared import frames
from shared.errors import CODE_NUMBER, ServingError

log = logging.getLogger("workers.frames")

Predict = Callable[[predict_pb2.PredictRequest], Awaitable[predict_pb2.PredictResponse]]
PredictNow = Callable[[predict_pb2.PredictRequest], predict_pb2.PredictResponse]


class FramesServer(asyncio.Protocol):
    def __init__(self, predict: Predict, *, inline: PredictNow | None = None, version: int = frames.VERSION,
                 clock: Callable[[], float] = time.monotonic, max_frame: int = frames.MAX_FRAME) -> None:
        self._predict = predict
        # A worker that runs TF on its loop anyway: each frame's Predict runs as it arrives, no task.
        self._inline = inline
        self._version = version
        self._clock = clock
        self._decoder = frames.Decoder(max_frame)
        self._transport: asyncio.Transport | None = None
        self._greeted = False
        self._tasks: dict[int, asyncio.Task[None]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio.Transport subclass

    def connection_lost(self, exc: Exception | None) -> None:
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()
        self._transport = None

    def _close(self, why: str) -> None:
        log.warning("frames connection closed: %s", why)
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        try:
            received = self._decoder.feed(data)
        except frames.FrameError as exc:
            self._close(str(exc))
            return
        now = self._clock()
        loop = asyncio.get_running_loop()
        for frame in received:
            if not self._greeted:
                self._greet(frame)
                if not self._greeted:
                    return
            elif frame.kind == frames.PREDICT:
                deadline = now + frame.deadline_us / 1e6 if frame.deadline_us else None
                if self._inline is not None:
                    self._run_now(frame.id, frame.payload, deadline, self._inline)
                    continue
                task = loop.create_task(self._run(frame.id, frame.payload, deadline))
                self._tasks[frame.id] = task
            elif frame.kind == frames.CANCEL:
                cancelled = self._tasks.pop(frame.id, None)
                if cancelled is not None:
                    cancelled.cancel()  # a task not started yet never runs its Predict
            else:
                self._close(f"unexpected {frames.KINDS[frame.kind]} frame from the router")
                return

    def _greet(self, frame: frames.Frame) -> None:
        assert self._transport is not None
        try:
            version = frames.check_hello(frame)
        except frames.FrameError as exc:
            self._close(str(exc))
            return
        if version != self._version:
            log.error("refused a router speaking frames version %d (this worker speaks %d): it uses gRPC",
                      version, self._version)
            self._transport.write(frames.encode(frames.REFUSED, code=self._version))
            self._transport.close()
            return
        self._greeted = True
        self._transport.write(frames.encode(frames.WELCOME, code=self._version))

    def _request(self, id_: int, payload: bytes, deadline: float | None) -> predict_pb2.PredictRequest | None:
        """The frame's request, or None once its ERROR is sent (deadline passed, not a PredictRequest)."""
        if deadline is not None and self._clock() >= deadline:
            self._error(id_, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the worker started")
            return None
        try:
            return predict_pb2.PredictRequest.FromString(payload)
        except DecodeError as exc:
            self._error(id_, grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a PredictRequest: {exc}")
            return None

    def _reply(self, id_: int, response: predict_pb2.PredictResponse | BaseException) -> None:
        if isinstance(response, ServingError):
            self._error(id_, response.code, response.message)
        elif isinstance(response, BaseException):  # never a crash: the router gets INTERNAL, as over gRPC
            log.error("unexpected error in a framed Predict", exc_info=response)
            self._error(id_, grpc.StatusCode.INTERNAL, f"{type(response).__name__}: {response}")
        elif self._transport is not None:
            self._transport.writelines(frames.encode_parts(frames.RESULT, response.SerializeToString(), id=id_))

    async def _run(self, id_: int, payload: bytes, deadline: float | None) -> None:
        try:
            request = self._request(id_, payload, deadline)
            if request is None:
                return
            try:
                response: predict_pb2.PredictResponse | BaseException = await self._predict(request)
            except Exception as exc:
                response = exc
            self._reply(id_, response)
        finally:
            self._tasks.pop(id_, None)

    def _run_now(self, id_: int, payload: bytes, deadline: float | None, predict: PredictNow) -> None:
        request = self._request(id_, payload, deadline)
        if request is None:
            return
        try:
            response: predict_pb2.PredictResponse | BaseException = predict(request)
        except Exception as exc:
            response = exc
        self._reply(id_, response)

    def _error(self, id_: int, code: grpc.StatusCode, message: str) -> None:
        if self._transport is not None:
            self._transport.write(frames.encode(frames.ERROR, message.encode("utf-8", "replace"), id=id_,
                                                code=CODE_NUMBER[code]))
