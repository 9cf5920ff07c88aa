"""shared.frames: the wire format, without sockets (property-tested: any split of a stream of frames
decodes to the same frames; anything that is not the protocol is a FrameError, never a hang)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import frames

frame_st = st.builds(
    frames.Frame,
    kind=st.sampled_from(sorted(frames.KINDS)),
    id=st.integers(0, 2**32 - 1),
    payload=st.binary(max_size=300),
    code=st.integers(0, 2**16 - 1),
    deadline_us=st.integers(0, 2**32 - 1),
    flags=st.integers(0, 255),
)


def encoded(frame: frames.Frame) -> bytes:
    return frames.encode(frame.kind, frame.payload, id=frame.id, code=frame.code, deadline_us=frame.deadline_us,
                         flags=frame.flags)


@settings(max_examples=200, deadline=None)
@given(st.lists(frame_st, max_size=8), st.lists(st.integers(1, 64), min_size=1, max_size=20))
def test_any_split_of_a_stream_decodes_to_the_frames_sent(sent: list[frames.Frame], cuts: list[int]) -> None:
    stream = b"".join(encoded(f) for f in sent)
    decoder = frames.Decoder()
    got: list[frames.Frame] = []
    offset, i = 0, 0
    while offset < len(stream):
        size = cuts[i % len(cuts)]
        got += decoder.feed(stream[offset:offset + size])
        offset += size
        i += 1
    assert got == sent and decoder.pending == 0


def test_header_and_payload_apart_are_the_same_bytes() -> None:
    header, payload = frames.encode_parts(frames.PREDICT, b"abc", id=7, deadline_us=1500)
    assert header + payload == frames.encode(frames.PREDICT, b"abc", id=7, deadline_us=1500)
    assert len(header) == frames.HEADER.size == 16


def test_deadlines_are_clamped_to_the_field() -> None:
    (frame,) = frames.Decoder().feed(frames.encode(frames.PREDICT, deadline_us=10**12))
    assert frame.deadline_us == 2**32 - 1
    (frame,) = frames.Decoder().feed(frames.encode(frames.PREDICT, deadline_us=-5))
    assert frame.deadline_us == 0


@pytest.mark.parametrize("data, why", [
    (frames.HEADER.pack(3, 99, 0, 0, 1, 0) + b"abc", "unknown frame kind 99"),
    (frames.HEADER.pack(2**31, frames.PREDICT, 0, 0, 1, 0), "past the limit"),
])
def test_what_is_not_the_protocol_is_refused_at_once(data: bytes, why: str) -> None:
    with pytest.raises(frames.FrameError, match=why):
        frames.Decoder().feed(data)


def test_a_smaller_limit_refuses_a_frame_before_its_payload_arrives() -> None:
    decoder = frames.Decoder(max_frame=1024)
    with pytest.raises(frames.FrameError, match="past the limit of 1024"):
        decoder.feed(frames.HEADER.pack(4096, frames.PREDICT, 0, 0, 1, 0))


def test_hello_carries_the_magic_and_the_version() -> None:
    (frame,) = frames.Decoder().feed(frames.hello())
    assert frames.check_hello(frame) == frames.VERSION
    for bad in (frames.encode(frames.HELLO, b"HTTP/1.1", code=1), frames.encode(frames.PREDICT, frames.MAGIC)):
        (frame,) = frames.Decoder().feed(bad)
        with pytest.raises(frames.FrameError, match="expected a HELLO"):
            frames.check_hello(frame)
