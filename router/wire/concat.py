"""Batch assembly and disassembly on TensorProtos, without TensorFlow.

Requests that share a batch key are concatenated along dimension 0, input by
input; the batch's outputs are cut back into each request's rows.  Numeric
tensors in ``tensor_content`` form (what TF clients send for more than one
element, and the project's own codec always) or in a plain typed field with
one value per element (TF clients' one-element tensors) are joined as raw
bytes, which is exactly concatenation along dimension 0 in row-major
layout; anything else (one-value broadcasts, half, int8/16, complex) goes
through numpy.  Padding to an
allowed batch size repeats the batch's first row, so a padded batch holds
only values some client really sent.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from protos import tensor_pb2
from shared.errors import Internal, InvalidArgument
from shared.tensor import (
    DT_BOOL,
    DT_DOUBLE,
    DT_FLOAT,
    DT_INT32,
    DT_INT64,
    DT_STRING,
    DT_UINT32,
    DT_UINT64,
    NUMPY_DTYPE,
    fill,
    num_elements,
    shape_of,
    to_numpy,
)

TensorProto = tensor_pb2.TensorProto


def batch_rows(names: Sequence[str], shapes: Sequence[tuple[int, ...]]) -> int:
    """Dimension 0 shared by every input; INVALID_ARGUMENT when they disagree."""
    rows = -1
    first = ""
    for name, shape in zip(names, shapes):
        if not shape:
            raise InvalidArgument(f"input '{name}' is a scalar; a batched signature needs a batch dimension")
        n = shape[0]
        if rows < 0:
            rows, first = n, name
        elif n != rows:
            raise InvalidArgument(
                f"inputs disagree on dimension 0 (the batch size): '{first}' has {rows} rows, '{name}' has {n}"
            )
    return max(rows, 0)


def _raw(tensor: TensorProto) -> bool:
    """True when the tensor's rows can be joined/sliced as bytes (length checked)."""
    np_dtype = NUMPY_DTYPE.get(tensor.dtype)
    if np_dtype is None or tensor.dtype == DT_STRING:
        return False
    shape = shape_of(tensor)
    count = num_elements(shape)
    if not tensor.tensor_content:
        return count == 0
    if len(tensor.tensor_content) != count * np_dtype.itemsize:
        raise InvalidArgument(
            f"tensor_content has {len(tensor.tensor_content)} bytes but shape {list(shape)} "
            f"needs {count * np_dtype.itemsize}"
        )
    return True


#: Typed fields holding exactly one value per element, in the dtype's own type.
_PLAIN_FIELD: dict[int, str] = {
    DT_FLOAT: "float_val", DT_DOUBLE: "double_val", DT_INT32: "int_val", DT_INT64: "int64_val",
    DT_BOOL: "bool_val", DT_UINT32: "uint32_val", DT_UINT64: "uint64_val",
}


def _raw_parts(tensors: Sequence[TensorProto], rows: Sequence[int], dtype: int,
               inner: tuple[int, ...]) -> list[bytes] | None:
    """The tensors' rows as little-endian bytes when all can be joined that way, else None.

    Hot path: dimension 0 of each tensor (``rows``) and the shared inner
    dimensions come from the caller, already validated, so no shape is read
    here.  Tensors in a plain typed field with one value per element (what
    ``tf.make_tensor_proto`` sends for a one-element tensor) are gathered
    into one list and packed with a single numpy call per run of them;
    broadcasts and the narrow or paired encodings (half, int8/16, complex)
    go through the numpy path, which also owns their error messages.
    """
    np_dtype = NUMPY_DTYPE.get(dtype)
    if np_dtype is None or dtype == DT_STRING:
        return None
    per_row = num_elements(inner)
    row_bytes = np_dtype.itemsize * per_row
    field = _PLAIN_FIELD.get(dtype)
    parts: list[bytes] = []
    typed: list[object] = []  # values of consecutive typed tensors, not packed yet
    for t, n in zip(tensors, rows):
        content = t.tensor_content
        if content:
            if len(content) != n * row_bytes:
                raise InvalidArgument(
                    f"tensor_content has {len(content)} bytes but its shape needs {n * row_bytes}")
            if typed:
                parts.append(np.array(typed, dtype=np_dtype).tobytes())
                typed = []
            parts.append(content)
            continue
        if field is None:
            return None
        values = getattr(t, field)
        if len(values) != n * per_row:
            return None  # a broadcast, or malformed: the numpy path decides
        typed.extend(values)
    if typed:
        parts.append(np.array(typed, dtype=np_dtype).tobytes())
    return parts


def concat_into(out: TensorProto, tensors: Sequence[TensorProto], rows: Sequence[int], dtype: int,
                inner: tuple[int, ...], pad_rows: int = 0) -> None:
    """Concatenate tensors of one dtype and inner shape along dimension 0, into
    an existing empty message (a batch request's map entry).

    ``rows`` (each tensor's dimension 0), ``dtype`` and ``inner`` come from
    the caller's already validated view (the batch key); ``pad_rows`` extra
    copies of the first row are appended.
    """
    total = sum(rows) + pad_rows
    parts = _raw_parts(tensors, rows, dtype, inner)
    if parts is not None:
        if pad_rows and parts:  # no parts: rows of zero elements, nothing to repeat
            row_bytes = NUMPY_DTYPE[dtype].itemsize * num_elements(inner)
            parts.append(parts[0][:row_bytes] * pad_rows)
        out.dtype = dtype  # type: ignore[assignment]
        out.tensor_content = b"".join(parts)
        dims = out.tensor_shape.dim
        dims.add(size=total)
        for d in inner:
            dims.add(size=d)
        return
    arrays = [to_numpy(t) for t in tensors]
    if pad_rows:
        arrays.append(np.repeat(arrays[0][:1], pad_rows, axis=0))
    fill(out, np.concatenate(arrays, axis=0), dtype)


def split(tensor: TensorProto, rows: Sequence[int]) -> list[TensorProto]:
    """Cut a batch output into consecutive pieces of ``rows`` rows (padding rows dropped).

    A malformed output is the worker's fault, so every problem here is INTERNAL.
    """
    if len(rows) == 1 and tensor.tensor_shape.dim and tensor.tensor_shape.dim[0].size == rows[0]:
        return [tensor]
    pieces = [TensorProto() for _ in rows]
    split_into(tensor, rows, pieces)
    return pieces


def split_into(tensor: TensorProto, rows: Sequence[int], targets: Sequence[TensorProto]) -> None:
    """``split``, writing each piece into an existing empty message (a response's map entry)."""
    try:
        _split_into(tensor, rows, targets)
    except InvalidArgument as exc:
        raise Internal(f"cannot split the worker's batch output: {exc.message}") from exc


def _split_into(tensor: TensorProto, rows: Sequence[int], targets: Sequence[TensorProto]) -> None:
    shape = shape_of(tensor)
    if not shape or shape[0] < sum(rows):
        raise Internal(
            f"the worker returned an output of shape {list(shape)} for a batch of {sum(rows)} rows; "
            "the signature is not batchable"
        )
    dtype = tensor.dtype
    inner = shape[1:]
    per_row = num_elements(inner)
    if _raw(tensor):
        row_bytes = NUMPY_DTYPE[dtype].itemsize * per_row
        content = tensor.tensor_content
        offset = 0
        for n, piece in zip(rows, targets):
            piece.dtype = dtype
            piece.tensor_content = content[offset:offset + n * row_bytes]
            dims = piece.tensor_shape.dim
            dims.add(size=n)
            for d in inner:
                dims.add(size=d)
            offset += n * row_bytes
        return
    if dtype == DT_STRING and len(tensor.string_val) == num_elements(shape):
        values = tensor.string_val
        offset = 0
        for n, piece in zip(rows, targets):
            piece.dtype = DT_STRING
            piece.string_val.extend(values[offset * per_row:(offset + n) * per_row])
            dims = piece.tensor_shape.dim
            dims.add(size=n)
            for d in inner:
                dims.add(size=d)
            offset += n
        return
    array = to_numpy(tensor)
    offset = 0
    for n, piece in zip(rows, targets):
        fill(piece, array[offset:offset + n], dtype)
        offset += n


def pad_to(rows: int, allowed: Sequence[int]) -> int:
    """The smallest allowed batch size holding ``rows`` (``rows`` itself when none is set)."""
    for size in allowed:
        if size >= rows:
            return size
    return rows
