"""router.wire.concat: batch assembly and disassembly on TensorProtos (no TensorFlow).

Property tests over every dtype the codec knows, every encoding a client may
send (``tensor_content``, typed ``*_val`` fields, a one-value broadcast) and
small inner shapes, including empty ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protos import tensor_pb2, types_pb2
from shared.errors import Internal, InvalidArgument, ServingError
from router.wire.concat import batch_rows, concat_into, pad_to, split
from shared.tensor import DT_FLOAT, DT_STRING, dtype_of_array, from_numpy, shape_of, to_numpy
from tests.support import fill_typed

TensorProto = tensor_pb2.TensorProto

NUMERIC: tuple[Any, ...] = (
    np.float32, np.float64, np.float16,
    np.int8, np.int16, np.int32, np.int64,
    np.uint8, np.uint16, np.uint32, np.uint64,
    np.bool_, np.complex64,
)
KINDS: tuple[Any, ...] = (*NUMERIC, "string")
ENCODINGS = ("content", "typed", "broadcast")


def enum_of(kind: Any) -> int:
    return DT_STRING if kind == "string" else dtype_of_array(np.empty(0, dtype=kind))


def typed(values: np.ndarray, dtype: int, shape: tuple[int, ...] | None = None) -> TensorProto:
    """A TensorProto with ``values`` in its typed field (no tensor_content) and ``shape``."""
    out = TensorProto(dtype=dtype)
    for d in values.shape if shape is None else shape:
        out.tensor_shape.dim.add(size=d)
    fill_typed(out, np.ascontiguousarray(values).reshape(-1))
    return out


def values(kind: Any, shape: tuple[int, ...]) -> st.SearchStrategy[np.ndarray]:
    if kind == "string":
        count = int(np.prod(shape, dtype=np.int64))

        def build(items: list[bytes]) -> np.ndarray:
            out = np.empty(count, dtype=object)
            out[:] = items
            return out.reshape(shape)

        return st.lists(st.binary(max_size=4), min_size=count, max_size=count).map(build)
    return hnp.arrays(np.dtype(kind), shape)


def encode(draw: Any, kind: Any, shape: tuple[int, ...], encoding: str) -> tuple[TensorProto, np.ndarray]:
    """One tensor of ``shape`` in ``encoding``, and the array it stands for."""
    dtype = enum_of(kind)
    if encoding == "broadcast":
        one = draw(values(kind, (1,)))
        array = np.empty(shape, dtype=one.dtype)
        array.fill(one[0])
        return typed(one, dtype, shape), array
    array = draw(values(kind, shape))
    if encoding == "content":
        return from_numpy(array, dtype), array  # strings: string_val, as TF does
    return typed(array, dtype), array


def same(got: np.ndarray, want: np.ndarray) -> bool:
    """Equal shape, dtype and values; numeric values compared bit for bit (NaN payloads, -0.0)."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return False
    if got.dtype == object:
        return bool(got.tolist() == want.tolist())
    return np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes()


def close_enough(got: np.ndarray, want: np.ndarray) -> None:
    """For checking the test's own encoder: NaNs may be quieted on the way through float_val."""
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


@st.composite
def requests(draw: Any) -> tuple[int, list[int], list[TensorProto], list[np.ndarray]]:
    """1-6 request tensors of one dtype and inner shape, 1-5 rows each, each in its own encoding."""
    kind = draw(st.sampled_from(KINDS))
    inner = tuple(draw(st.lists(st.integers(0, 3), max_size=2)))
    rows = draw(st.lists(st.integers(1, 5), min_size=1, max_size=6))
    tensors, arrays = [], []
    for n in rows:
        tensor, array = encode(draw, kind, (n, *inner), draw(st.sampled_from(ENCODINGS)))
        tensors.append(tensor)
        arrays.append(array)
    decoded = [to_numpy(t) for t in tensors]
    for got, want in zip(decoded, arrays):
        close_enough(got, want)
    return enum_of(kind), rows, tensors, decoded


def padded(decoded: list[np.ndarray], pad_rows: int) -> np.ndarray:
    return np.concatenate([*decoded, np.repeat(decoded[0][:1], pad_rows, axis=0)], axis=0)


# -- concat -------------------------------------------------------------------


def concat(tensors: list[TensorProto], pad_rows: int = 0) -> TensorProto:
    """``concat_into`` a fresh message, with rows, dtype and inner dims read off the
    tensors (the batcher takes them from its batch key)."""
    first = tensors[0]
    out = TensorProto()
    concat_into(out, tensors, [t.tensor_shape.dim[0].size for t in tensors], first.dtype,
                tuple(d.size for d in first.tensor_shape.dim[1:]), pad_rows)
    return out


@settings(max_examples=150, deadline=None)
@given(requests(), st.integers(0, 4))
def test_concat_is_numpy_concatenate_plus_first_row_padding(
    batch: tuple[int, list[int], list[TensorProto], list[np.ndarray]], pad_rows: int
) -> None:
    dtype, rows, tensors, decoded = batch
    out = concat(tensors, pad_rows=pad_rows)
    assert out.dtype == dtype
    want = padded(decoded, pad_rows)
    assert [d.size for d in out.tensor_shape.dim] == list(want.shape)
    assert same(to_numpy(out), want)
    assert want.shape[0] == sum(rows) + pad_rows


@settings(max_examples=150, deadline=None)
@given(requests(), st.integers(0, 4))
def test_split_of_concat_gives_back_each_request_and_drops_padding(
    batch: tuple[int, list[int], list[TensorProto], list[np.ndarray]], pad_rows: int
) -> None:
    dtype, rows, tensors, decoded = batch
    pieces = split(concat(tensors, pad_rows=pad_rows), rows)
    assert len(pieces) == len(rows)
    for piece, want in zip(pieces, decoded):
        assert piece.dtype == dtype
        assert same(to_numpy(piece), want)


@settings(max_examples=150, deadline=None)
@given(requests(), st.integers(0, 4), st.sampled_from(ENCODINGS), st.data())
def test_split_reads_every_encoding_a_worker_may_answer_with(
    batch: tuple[int, list[int], list[TensorProto], list[np.ndarray]], pad_rows: int, encoding: str,
    data: st.DataObject,
) -> None:
    # Outputs need not share the inputs' encoding: a worker (TF Serving included)
    # may answer with typed fields, or one broadcast value.
    dtype, rows, _, _ = batch
    kind = next(k for k in KINDS if enum_of(k) == dtype)
    inner = tuple(d.size for d in batch[2][0].tensor_shape.dim[1:])
    whole, array = encode(data.draw, kind, (sum(rows) + pad_rows, *inner), encoding)
    want = to_numpy(whole)
    close_enough(want, array)
    pieces = split(whole, rows)
    offset = 0
    for piece, n in zip(pieces, rows, strict=True):
        assert piece.dtype == dtype
        assert same(to_numpy(piece), want[offset:offset + n])
        offset += n


def test_split_of_one_exact_piece_is_the_tensor() -> None:
    t = from_numpy(np.arange(6, dtype=np.float32).reshape(3, 2))
    assert split(t, [3]) == [t]


def test_padding_repeats_the_first_row_of_the_first_request() -> None:
    a = from_numpy(np.array([[1, 2], [3, 4]], dtype=np.int32))
    b = typed(np.array([[5, 6]], dtype=np.int32), types_pb2.DT_INT32)
    out = to_numpy(concat([a, b], pad_rows=2))
    assert out.tolist() == [[1, 2], [3, 4], [5, 6], [1, 2], [1, 2]]


# -- split errors --------------------------------------------------------------


@given(st.lists(st.integers(1, 5), min_size=1, max_size=6), st.integers(1, 5), st.booleans())
def test_split_refuses_an_output_with_fewer_rows_than_the_batch(
    rows: list[int], short_by: int, raw: bool
) -> None:
    have = max(0, sum(rows) - short_by)
    array = np.zeros((have, 2), dtype=np.float32)
    tensor = from_numpy(array) if raw else typed(array, DT_FLOAT)
    with pytest.raises(Internal):
        split(tensor, rows)


def test_split_refuses_a_scalar_output() -> None:
    with pytest.raises(Internal):
        split(from_numpy(np.float32(1.0)), [1])


# -- batch_rows ----------------------------------------------------------------


def _shaped(shape: tuple[int, ...]) -> TensorProto:
    return from_numpy(np.zeros(shape, dtype=np.float32))


def rows_of(inputs: dict[str, TensorProto], names: list[str]) -> int:
    return batch_rows(names, [shape_of(inputs[n]) for n in names])


@given(st.integers(0, 6), st.dictionaries(st.sampled_from("abcdef"), st.lists(st.integers(0, 3), max_size=2),
                                          min_size=1, max_size=6))
def test_batch_rows_is_the_shared_first_dimension(rows: int, inners: dict[str, list[int]]) -> None:
    inputs = {name: _shaped((rows, *inner)) for name, inner in inners.items()}
    assert rows_of(inputs, sorted(inputs)) == rows


def test_batch_rows_of_no_inputs_is_zero() -> None:
    assert rows_of({}, []) == 0


@given(st.integers(0, 6), st.integers(0, 6))
def test_batch_rows_refuses_inputs_that_disagree(a: int, b: int) -> None:
    inputs = {"a": _shaped((a, 2)), "b": _shaped((b,))}
    if a == b:
        assert rows_of(inputs, ["a", "b"]) == a
    else:
        with pytest.raises(InvalidArgument, match="dimension 0"):
            rows_of(inputs, ["a", "b"])


@pytest.mark.parametrize("order", [["a", "s"], ["s", "a"]])
def test_batch_rows_refuses_a_scalar_input(order: list[str]) -> None:
    inputs = {"a": _shaped((2, 3)), "s": _shaped(())}
    with pytest.raises(InvalidArgument, match="scalar"):
        rows_of(inputs, order)


def test_batch_rows_only_looks_at_the_named_inputs() -> None:
    inputs = {"a": _shaped((2, 3)), "other": _shaped((5,))}
    assert rows_of(inputs, ["a"]) == 2


# -- pad_to --------------------------------------------------------------------


@given(st.integers(1, 80), st.lists(st.integers(1, 64), unique=True, max_size=6).map(sorted))
def test_pad_to_is_the_smallest_allowed_size_that_holds_the_rows(rows: int, allowed: list[int]) -> None:
    fitting = [s for s in allowed if s >= rows]
    assert pad_to(rows, allowed) == (min(fitting) if fitting else rows)


def test_pad_to_examples() -> None:
    assert pad_to(3, [4, 8]) == 4
    assert pad_to(4, [4, 8]) == 4
    assert pad_to(5, [4, 8]) == 8
    assert pad_to(9, [4, 8]) == 9
    assert pad_to(3, []) == 3


# -- known bugs ----------------------------------------------------------------


def test_concat_refuses_tensor_content_that_disagrees_with_its_shape() -> None:
    short = TensorProto(dtype=DT_FLOAT, tensor_content=np.array([1], dtype="<f4").tobytes())
    short.tensor_shape.dim.add(size=1)
    short.tensor_shape.dim.add(size=2)  # needs 8 bytes, has 4
    long = TensorProto(dtype=DT_FLOAT, tensor_content=np.array([2, 3, 4], dtype="<f4").tobytes())
    long.tensor_shape.dim.add(size=1)
    long.tensor_shape.dim.add(size=2)  # needs 8 bytes, has 12
    with pytest.raises(InvalidArgument):
        concat([short, long])


def test_split_of_an_unknown_dtype_output_is_a_serving_error_not_a_crash() -> None:
    bf16 = TensorProto(dtype=types_pb2.DT_BFLOAT16, tensor_content=bytes(range(8)))
    bf16.tensor_shape.dim.add(size=4)
    try:
        pieces = split(bf16, [1, 3])
    except ServingError:
        return
    assert [p.tensor_content for p in pieces] == [bytes(range(2)), bytes(range(2, 8))]
