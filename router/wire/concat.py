"""Batch assembly and disassembly on TensorProtos, without TensorFlow.

Requests that share a batch key are concatenated along dimension 0, input by
input; the batch's outputs are cut back into each request's rows.  Numeric
tensors in ``tensor_content`` form (what every TF client and the project's
own codec send) are joined and sliced as raw bytes, which is exactly
concatenation along dimension 0 in row-major layout; anything else (typed
``*_val`` fields, one-value broadcasts) goes through numpy.  Padding to an
allowed batch size repeats the batch's first row, so a padded batch holds
only values some client really sent.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from protos import tensor_pb2
from router.errors import Internal, InvalidArgument
from router.wire.tensor import DT_STRING, NUMPY_DTYPE, fill, from_numpy, num_elements, shape_of, to_numpy

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


def _raw_parts(tensors: Sequence[TensorProto], dtype: int, inner: tuple[int, ...]) -> list[bytes] | None:
    """Each tensor's ``tensor_content`` when all can be joined as bytes, else None.

    Hot path: the inner dimensions are already known equal (they are part of
    the batch key), so only dimension 0 and the content length are read.
    """
    np_dtype = NUMPY_DTYPE.get(dtype)
    if np_dtype is None or dtype == DT_STRING:
        return None
    row_bytes = np_dtype.itemsize * num_elements(inner)
    parts = []
    for t in tensors:
        content = t.tensor_content
        expected = t.tensor_shape.dim[0].size * row_bytes
        if len(content) != expected:
            if content:
                raise InvalidArgument(
                    f"tensor_content has {len(content)} bytes but its shape needs {expected}")
            return None  # typed *_val fields: the numpy path decodes them
        parts.append(content)
    return parts


def concat(tensors: Sequence[TensorProto], pad_rows: int = 0) -> TensorProto:
    """Concatenate tensors of one dtype and inner shape along dimension 0.

    ``pad_rows`` extra copies of the first row are appended.
    """
    first = tensors[0]
    dtype = first.dtype
    inner = tuple(d.size for d in first.tensor_shape.dim[1:])
    total = sum(t.tensor_shape.dim[0].size for t in tensors)
    if pad_rows == 0 and len(tensors) == 1:
        return first
    parts = _raw_parts(tensors, dtype, inner)
    if parts is not None:
        row_bytes = NUMPY_DTYPE[dtype].itemsize * num_elements(inner)
        if pad_rows:
            parts.append(first.tensor_content[:row_bytes] * pad_rows)
        out = TensorProto(dtype=dtype, tensor_content=b"".join(parts))
        out.tensor_shape.dim.add(size=total + pad_rows)
        for d in inner:
            out.tensor_shape.dim.add(size=d)
        return out
    arrays = [to_numpy(t) for t in tensors]
    if pad_rows:
        arrays.append(np.repeat(arrays[0][:1], pad_rows, axis=0))
    return from_numpy(np.concatenate(arrays, axis=0), dtype)


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
            piece.dtype = dtype  # type: ignore[assignment]
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
            piece.dtype = DT_STRING  # type: ignore[assignment]
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
