"""The lean framed protocol between the router and its own workers: the wire format, without I/O.

DESIGN decision 1's exception: over the Unix socket of a spawned worker, a
Predict (a single request or a batch) need not pay for HTTP/2 and grpc.aio
on both sides (measured here: a grpc.aio unary round trip of 300 bytes,
466 us p50; a length-prefixed frame on a uvloop Protocol, 90 us).  Health,
status, reload, metadata and warm-up stay on TF Serving's gRPC API, which
the worker keeps serving for anyone.

One persistent connection per worker; requests are pipelined and matched
to replies by id (a reply may come in any order).  Every frame is a fixed
header and a payload:

    u32 payload length | u8 kind | u8 flags | u16 code | u32 request id | u32 deadline (us)

little-endian, 16 bytes.  Kinds:

    HELLO     client -> worker, first: payload MAGIC, code = protocol VERSION
    WELCOME   worker -> client: code = VERSION (the worker speaks it); a worker
              that does not answers REFUSED (code = the version it speaks) and closes
    PREDICT   payload: a serialized PredictRequest; deadline: microseconds the
              caller still waits (0: none); id: chosen by the client
    RESULT    payload: the serialized PredictResponse for request ``id``
    ERROR     code: the gRPC status code number, payload: the message (UTF-8)
    CANCEL    the client gave up on request ``id``: not started, it never runs

Tensors travel as the serialized messages carry them: ``tensor_content``
raw bytes, which the codec (shared/tensor.py) writes and reads without
conversion.  Anything that does not parse (an unknown kind, a frame past
``MAX_FRAME``, a HELLO without the magic) is a ``FrameError``: the receiver
closes the connection, and the caller's request fails as a transport error
(retried once on another worker, or UNAVAILABLE), never hangs.

``Decoder`` is a sans-I/O parser: bytes in, frames out; both ends use it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = b"tfs-router-frames"
VERSION = 1
HEADER = struct.Struct("<IBBHII")
MAX_FRAME = 2**31 - 1  # TF Serving's message limit

HELLO, WELCOME, REFUSED, PREDICT, RESULT, ERROR, CANCEL = 1, 2, 3, 4, 5, 6, 7
KINDS = {HELLO: "HELLO", WELCOME: "WELCOME", REFUSED: "REFUSED", PREDICT: "PREDICT", RESULT: "RESULT",
         ERROR: "ERROR", CANCEL: "CANCEL"}


class FrameError(Exception):
    """Bytes that are not this protocol: the connection cannot be trusted any more."""


@dataclass(frozen=True)
class Frame:
    kind: int
    id: int = 0
    payload: bytes = b""
    code: int = 0
    deadline_us: int = 0
    flags: int = 0


def encode(kind: int, payload: bytes = b"", *, id: int = 0, code: int = 0, deadline_us: int = 0,
           flags: int = 0) -> bytes:
    """One frame, header and payload."""
    if len(payload) > MAX_FRAME:
        raise FrameError(f"a frame of {len(payload)} bytes is past the limit of {MAX_FRAME}")
    return HEADER.pack(len(payload), kind, flags, code, id & 0xFFFFFFFF, min(max(deadline_us, 0), 0xFFFFFFFF)) \
        + payload


def encode_parts(kind: int, payload: bytes, *, id: int = 0, code: int = 0, deadline_us: int = 0,
                 flags: int = 0) -> tuple[bytes, bytes]:
    """The header and the payload apart (written one after the other, the payload is never copied)."""
    if len(payload) > MAX_FRAME:
        raise FrameError(f"a frame of {len(payload)} bytes is past the limit of {MAX_FRAME}")
    return HEADER.pack(len(payload), kind, flags, code, id & 0xFFFFFFFF,
                       min(max(deadline_us, 0), 0xFFFFFFFF)), payload


def socket_for(address: str) -> str | None:
    """The frames socket beside a spawned worker's gRPC socket (``unix:DIR/w0.sock`` ->
    ``unix:DIR/w0.frames.sock``); None for an address that is not a Unix socket."""
    if not address.startswith("unix:"):
        return None
    path = address[len("unix:"):]
    if path.startswith("//"):
        path = path[1:]
    stem = path[:-len(".sock")] if path.endswith(".sock") else path
    return f"unix:{stem}.frames.sock"


def hello() -> bytes:
    return encode(HELLO, MAGIC, code=VERSION)


class Decoder:
    """Frames out of a byte stream, fed in pieces as they arrive."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        """Every frame completed by ``data`` (possibly none); FrameError on anything malformed."""
        buffer = self._buffer
        buffer += data
        frames = []
        offset = 0
        size = HEADER.size
        while len(buffer) - offset >= size:
            length, kind, flags, code, id_, deadline = HEADER.unpack_from(buffer, offset)
            if kind not in KINDS:
                raise FrameError(f"unknown frame kind {kind}")
            if length > self.max_frame:
                raise FrameError(f"a frame of {length} bytes is past the limit of {self.max_frame}")
            end = offset + size + length
            if len(buffer) < end:
                break
            frames.append(Frame(kind, id_, bytes(buffer[offset + size:end]), code, deadline, flags))
            offset = end
        if offset:
            del buffer[:offset]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of a frame not complete yet."""
        return len(self._buffer)


def check_hello(frame: Frame) -> int:
    """The protocol version a HELLO asks for; FrameError if it is no HELLO of this protocol."""
    if frame.kind != HELLO or frame.payload != MAGIC:
        raise FrameError(f"expected a HELLO, got {KINDS.get(frame.kind, frame.kind)} "
                         f"({frame.payload[:32]!r})")
    return frame.code
