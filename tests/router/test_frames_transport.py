"""The framed transport against the worker's frames server on a real Unix socket, the Predict behind it
scripted: pipelining with out-of-order replies, deadlines and cancellation, a server that dies mid-frame
or sends garbage (the call fails as a transport error, never hangs, and the next call reconnects), and a
version mismatch (Predict falls back to the gRPC transport beside it).  Real workers: test_router_frames."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import cast

import pytest
import uvloop

from protos import predict_pb2
from router.transport import TransportError
from router.transport.frames_transport import FramesTransport
from shared import frames
from shared.errors import DeadlineExceeded, InvalidArgument
from tests.router.fakes import FakeTransport
from workers.frames_server import FramesServer

Predict = Callable[[predict_pb2.PredictRequest], Awaitable[predict_pb2.PredictResponse]]


def request(i: int) -> predict_pb2.PredictRequest:
    r = predict_pb2.PredictRequest()
    r.model_spec.name = "m"
    r.model_spec.version.value = i  # the fake echoes it back: which answer went to which call
    return r


def answer(req: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
    resp = predict_pb2.PredictResponse()
    resp.model_spec.CopyFrom(req.model_spec)
    return resp


@asynccontextmanager
async def serving(path: Path, predict: Predict, **kwargs: object) -> AsyncIterator[asyncio.AbstractServer]:
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(lambda: FramesServer(predict, **kwargs), str(path))  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.close()
        await server.wait_closed()


def run(test: Callable[[], Awaitable[None]]) -> None:
    # On uvloop, as the router and the workers run (its transports are no asyncio.Transport subclasses).
    uvloop.run(asyncio.wait_for(test(), 20))


def test_pipelined_calls_get_their_own_answers_whatever_the_order(tmp_path: Path) -> None:
    rng = random.Random(7)
    finished: list[int] = []

    async def predict(req: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        await asyncio.sleep(rng.random() * 0.02)  # they finish, and are answered, out of order
        finished.append(req.model_spec.version.value)
        return answer(req)

    async def main() -> None:
        async with serving(tmp_path / "w.sock", predict):
            t = FramesTransport("w0", f"unix:{tmp_path / 'w.sock'}", FakeTransport())
            got = await asyncio.gather(*(t.predict(request(i), 5.0) for i in range(1, 101)))
            assert [r.model_spec.version.value for r in got] == list(range(1, 101))
            assert sorted(finished) == list(range(1, 101))
            assert finished != sorted(finished)  # really answered out of order
            assert t._connection is not None and not t._connection.calls  # nothing left behind
            await t.close()

    run(main)


def test_errors_come_back_as_the_worker_said(tmp_path: Path) -> None:
    async def predict(req: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        raise InvalidArgument("input x has the wrong dtype")

    async def main() -> None:
        async with serving(tmp_path / "w.sock", predict):
            t = FramesTransport("w0", f"unix:{tmp_path / 'w.sock'}", FakeTransport())
            with pytest.raises(InvalidArgument, match="wrong dtype"):
                await t.predict(request(1), 5.0)
            assert (await asyncio.gather(t.predict(request(2), 5.0), return_exceptions=True))[0].code \
                == InvalidArgument.code  # type: ignore[union-attr]
            await t.close()

    run(main)


def test_a_worker_predicting_inline_answers_each_frame_as_it_arrives(tmp_path: Path) -> None:
    ran: list[int] = []

    def now(req: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        ran.append(req.model_spec.version.value)
        if req.model_spec.version.value == 3:
            raise InvalidArgument("version 3 is refused")
        if req.model_spec.version.value == 4:
            raise RuntimeError("a bug")
        return answer(req)

    async def never(req: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        raise AssertionError("the inline path must be taken")

    async def main() -> None:
        async with serving(tmp_path / "w.sock", never, inline=now):
            t = FramesTransport("w0", f"unix:{tmp_path / 'w.sock'}", FakeTransport())
            results = await asyncio.gather(*(t.predict(request(i), 5.0) for i in (1, 2, 3, 4)),
                                           return_exceptions=True)
            assert [r.model_spec.version.value for r in results[:2]] == [1, 2]  # type: ignore[union-attr]
            assert isinstance(results[2], InvalidArgument)
            assert "RuntimeError: a bug" in str(results[3])  # INTERNAL, the worker still serving
            assert (await t.predict(request(5), 5.0)).model_spec.version.value == 5
            assert ran == [1, 2, 3, 4, 5]
            await t.close()

    run(main)


def test_a_call_given_up_on_is_cancelled_and_never_runs_if_not_started(tmp_path: Path) -> None:
    gate = asyncio.Event
    ran: list[int] = []

    async def main() -> None:
        release = gate()
        one_at_a_time = asyncio.Lock()  # as the worker runs TF: one call after the other

        async def predict(req: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
            async with one_at_a_time:
                ran.append(req.model_spec.version.value)
                await release.wait()
                return answer(req)

        async with serving(tmp_path / "w.sock", predict):
            t = FramesTransport("w0", f"unix:{tmp_path / 'w.sock'}", FakeTransport())
            first = asyncio.create_task(t.predict(request(1), 5.0))
            await asyncio.sleep(0.05)  # 1 is running and holds the worker
            second = asyncio.create_task(t.predict(request(2), 5.0))
            await asyncio.sleep(0.05)
            second.cancel()  # the client went away while 2 waited behind 1
            with pytest.raises(asyncio.CancelledError):
                await second
            with pytest.raises(DeadlineExceeded):  # and 3's deadline passes while it waits
                await t.predict(request(3), 0.05)
            release.set()
            assert (await first).model_spec.version.value == 1
            assert (await t.predict(request(4), 5.0)).model_spec.version.value == 4
            assert ran == [1, 4]  # neither 2 nor 3 ever ran
            await t.close()

    run(main)


def test_a_deadline_that_passed_before_the_worker_started_is_not_run(tmp_path: Path) -> None:
    ran: list[int] = []

    async def predict(req: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        ran.append(req.model_spec.version.value)
        return answer(req)

    async def main() -> None:
        # Ten seconds pass between a request's arrival and its start, on the server's clock.
        async with serving(tmp_path / "w.sock", predict, clock=itertools.count(step=10).__next__):
            t = FramesTransport("w0", f"unix:{tmp_path / 'w.sock'}", FakeTransport())
            assert (await t.predict(request(1), 100.0)).model_spec.version.value == 1
            with pytest.raises(DeadlineExceeded, match="before the worker started"):
                await t.predict(request(2), 5.0)
            assert ran == [1]
            await t.close()

    run(main)


class Hostile(asyncio.Protocol):
    """A 'worker' that greets properly, then answers the first Predict with ``reply`` and hangs up."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.decoder = frames.Decoder()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        for frame in self.decoder.feed(data):
            if frame.kind == frames.HELLO:
                self.transport.write(frames.encode(frames.WELCOME, code=frames.VERSION))
            elif frame.kind == frames.PREDICT:
                self.transport.write(self.reply)
                if self.reply.startswith(frames.HEADER.pack(10, frames.RESULT, 0, 0, frame.id, 0)):
                    self.transport.close()  # half a frame, then gone: a worker killed mid-reply


@pytest.mark.parametrize("reply", [
    frames.HEADER.pack(10, frames.RESULT, 0, 0, 1, 0) + b"abc",  # truncated: 3 of 10 bytes, then closed
    b"\xff" * 40,  # garbage
    frames.encode(frames.HELLO, frames.MAGIC, code=1),  # a frame that has no business there
], ids=["truncated", "garbage", "unexpected kind"])
def test_a_broken_connection_fails_the_call_as_a_transport_error_and_the_next_call_reconnects(
        tmp_path: Path, reply: bytes) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        hostile = await loop.create_unix_server(lambda: Hostile(reply), str(tmp_path / "bad.sock"))
        t = FramesTransport("w0", f"unix:{tmp_path / 'bad.sock'}", FakeTransport())
        with pytest.raises(TransportError):
            await t.predict(request(1), 5.0)
        first = t._connection
        hostile.close()
        await hostile.wait_closed()
        (tmp_path / "bad.sock").unlink()
        async with serving(tmp_path / "bad.sock", lambda req: asyncio.sleep(0, answer(req))):
            assert (await t.predict(request(2), 5.0)).model_spec.version.value == 2
        assert t._connection is not first  # a new connection
        await t.close()

    run(main)


def test_a_socket_nobody_answers_on_is_a_transport_error(tmp_path: Path) -> None:
    path = tmp_path / "dead.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # bound, never listening: what a dead worker leaves behind
    stale.close()

    async def main() -> None:
        t = FramesTransport("w0", f"unix:{path}", FakeTransport())
        with pytest.raises(TransportError, match="cannot reach worker w0"):
            await t.predict(request(1), 1.0)
        assert not t.refused  # tried again on the next call
        await t.close()

    run(main)


def test_a_worker_without_a_frames_socket_gets_predict_over_grpc(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        grpc_side = FakeTransport()
        t = FramesTransport("w0", f"unix:{tmp_path / 'none.sock'}", grpc_side)
        with caplog.at_level(logging.ERROR, logger="router.transport.frames"):
            for i in (1, 2):
                await t.predict(request(i), 1.0)
        assert t.refused and len(grpc_side.predicts) == 2
        assert [r.message for r in caplog.records] == [
            f"worker w0 has no frames socket at {tmp_path / 'none.sock'}; sending its Predict calls over gRPC"]
        await t.close()

    run(main)


def test_a_worker_of_another_version_is_refused_and_predict_goes_over_grpc(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def predict(req: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        raise AssertionError("a refused connection runs nothing")

    async def main() -> None:
        control = FakeTransport()
        async with serving(tmp_path / "w.sock", predict, version=frames.VERSION + 1):
            t = FramesTransport("w0", f"unix:{tmp_path / 'w.sock'}", control)
            with caplog.at_level(logging.ERROR):
                assert await t.predict(request(1), 5.0) is control.ok
                assert await t.predict(request(2), 5.0) is control.ok
            assert t.refused and len(control.predicts) == 2
            lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            # The worker's own line, then the router's, once: later calls go straight to gRPC.
            assert lines == [f"refused a router speaking frames version {frames.VERSION} (this worker speaks "
                             f"{frames.VERSION + 1}): it uses gRPC",
                             f"worker w0 speaks frames version {frames.VERSION + 1}, this router {frames.VERSION}; "
                             "sending its Predict calls over gRPC"], lines
            await t.close()

    run(main)


def test_a_call_on_a_connection_lost_after_its_handshake_fails_at_once() -> None:
    from router.transport.frames_transport import _Connection

    async def main() -> None:
        connection = _Connection("w0")
        connection.connection_lost(None)  # lost between the handshake and the call
        with pytest.raises(TransportError, match="lost"):
            connection.call(b"", 5.0)
        assert connection.calls == {}  # nothing left waiting for an answer that cannot come

    run(main)


class Silent(asyncio.Protocol):
    """A 'worker' that accepts connections and never answers the handshake (a wedged loop)."""

    opened = 0
    closed = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        Silent.opened += 1

    def connection_lost(self, exc: Exception | None) -> None:
        Silent.closed += 1


def test_calls_waiting_for_a_handshake_share_one_attempt_and_keep_their_deadlines(tmp_path: Path) -> None:
    Silent.opened = Silent.closed = 0

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(Silent, str(tmp_path / "w.sock"))
        t = FramesTransport("w0", f"unix:{tmp_path / 'w.sock'}", FakeTransport())
        results = await asyncio.gather(*(t.predict(request(i), 0.2) for i in range(3)), return_exceptions=True)
        # Each call gave up at its own deadline (none waited out the 5 s handshake limit,
        # nor another call's attempt), and the three shared one connection attempt.
        assert all(isinstance(r, DeadlineExceeded) for r in results), results
        assert Silent.opened == 1
        # Closing the transport mid-handshake abandons the attempt and closes its connection.
        waiting = asyncio.ensure_future(t.predict(request(4), 30.0))
        await asyncio.sleep(0.05)
        await t.close()
        with pytest.raises(TransportError, match="closed"):
            await waiting
        for _ in range(100):
            if Silent.closed == Silent.opened:
                break
            await asyncio.sleep(0.01)
        assert Silent.closed == Silent.opened == 1
        with pytest.raises(TransportError, match="closed"):
            await t.predict(request(5), 1.0)  # a closed transport stays closed
        server.close()
        await server.wait_closed()

    run(main)
