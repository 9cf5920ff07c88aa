"""Malformed tensors are refused with INVALID_ARGUMENT and a message saying why."""

from __future__ import annotations

import numpy as np
import pytest

from protos import tensor_pb2
from shared.errors import InvalidArgument
from shared import tensor as codec


def make(dtype: int, dims: list[int], **fields: object) -> tensor_pb2.TensorProto:
    t = tensor_pb2.TensorProto(dtype=dtype, **fields)  # type: ignore[arg-type]
    for d in dims:
        t.tensor_shape.dim.add(size=d)
    return t


MALFORMED = {
    "unknown dtype": (make(999, [1], float_val=[1.0]), "not supported"),
    "invalid dtype": (make(codec.DT_INVALID, [1]), "not supported"),
    "resource dtype": (make(20, [1]), "not supported"),
    "negative dim": (make(codec.DT_FLOAT, [-1, 2], float_val=[1.0]), "negative"),
    "overflowing dims": (make(codec.DT_FLOAT, [1 << 40, 1 << 40], float_val=[1.0]), "int64"),
    "content too short": (make(codec.DT_FLOAT, [3], tensor_content=b"\0" * 8), "needs 12"),
    "content too long": (make(codec.DT_INT64, [1], tensor_content=b"\0" * 9), "needs 8"),
    "typed count mismatch": (make(codec.DT_FLOAT, [3], float_val=[1.0, 2.0]), "needs 3"),
    "no values": (make(codec.DT_INT64, [2]), "needs 2"),
    "string content": (make(codec.DT_STRING, [1], tensor_content=b"a"), "string_val"),
    "odd complex": (make(codec.DT_COMPLEX64, [1], scomplex_val=[1.0]), "odd"),
    "int8 out of range": (make(codec.DT_INT8, [1], int_val=[300]), "out of range"),
    "half bit pattern": (make(codec.DT_HALF, [1], half_val=[70000]), "16-bit"),
    "huge broadcast": (make(codec.DT_FLOAT, [1 << 30], float_val=[1.0]), "broadcast"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_tensor_is_invalid_argument(name: str) -> None:
    tensor, needle = MALFORMED[name]
    with pytest.raises(InvalidArgument, match=needle):
        codec.to_numpy(tensor)


def test_unknown_rank_is_refused() -> None:
    t = make(codec.DT_FLOAT, [], float_val=[1.0])
    t.tensor_shape.unknown_rank = True
    with pytest.raises(InvalidArgument, match="unknown rank"):
        codec.to_numpy(t)


def test_empty_tensor_decodes() -> None:
    assert codec.to_numpy(make(codec.DT_FLOAT, [0, 4])).shape == (0, 4)


def test_content_view_is_zero_copy() -> None:
    t = codec.from_numpy(np.arange(4, dtype=np.int64))
    out = codec.to_numpy(t)
    assert not out.flags.writeable and list(out) == [0, 1, 2, 3]
