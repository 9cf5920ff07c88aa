"""TF Serving's REST predict JSON <-> numpy arrays, with no HTTP and no TensorFlow.

Request side (``parse_predict_body``) follows ``FillPredictRequestFromJson`` in
``tensorflow_serving/util/json_tensor.cc``:

* the body is a JSON object with an optional string ``signature_name`` and
  exactly one of ``instances`` (row format) or ``inputs`` (columnar format);
* row format: a non-empty list; when the first element is an object (and not a
  ``{"b64": ...}`` value) every element is an object whose keys are exactly the
  signature's inputs, otherwise (single-input signatures only) every element is
  the bare value.  Every element of one input must have the same shape; the
  tensor is the elements stacked on a new 0-th dimension;
* columnar format: an object keyed by input name (keys that are not inputs are
  ignored, as TF Serving does; a missing input is an error) or, for a
  single-input signature, the bare value; any shape, scalars included;
* a tensor's shape is read off the first element at each nesting level, and
  every list must then match it ("ragged" lists are refused);
* values: JSON numbers for numeric dtypes (an integer dtype takes only integer
  tokens in range, a float dtype takes any number that fits it; integer tokens
  above 2**24-1 (float) or 2**53-1 (double) are refused as lossy, as TF Serving
  does), ``true``/``false`` for DT_BOOL, strings (UTF-8 encoded) or
  ``{"b64": ...}`` objects for DT_STRING.  DT_HALF, complex and other dtypes
  are UNIMPLEMENTED, as in TF Serving;
* ``NaN``, ``Infinity`` and ``-Infinity`` tokens are accepted (TF Serving
  parses with rapidjson's kParseNanAndInfFlag).  orjson refuses them, so a body
  that fails orjson and contains one of these tokens is re-parsed with the
  standard library, which accepts exactly those three spellings (rapidjson's
  ``Inf``/``-Inf`` are not accepted).

Error texts are TF Serving's.  Two deliberate differences: where TF Serving's
text does not say which input is wrong (columnar format and bare-value rows) we
append `` (input: NAME)``, and JSON values quoted in messages are rendered
compactly (TF Serving pretty-prints them) and cut at ``_MAX_RENDER`` chars.
Integer dtypes narrower than int32 are range-checked against their own range
(TF Serving checks int32 range and lets the tensor conversion wrap).

Fast path: for numeric inputs the parsed list is handed to ``np.asarray``
once, and the inferred dtype and a few vectorised checks decide whether the
values are valid; anything unusual (strings, objects, ragged lists, values
near a limit, a body containing ``true``/``false`` tokens) goes through the
exact per-element walk, which is also what produces every error message.

Response side (``format_predict_response``) follows ``MakeJsonFromTensors``:
``{"predictions": [...]}`` for row format (bare per-row values with one
output, otherwise one object per row; every output needs rank >= 1 and the same
0-th dimension, which may be 0), ``{"outputs": value}`` or
``{"outputs": {name: value}}`` for columnar format.  DT_STRING outputs whose
name ends in ``_bytes`` are written as ``{"b64": ...}``; other strings as JSON
strings, except invalid UTF-8, which is written as ``{"b64": ...}`` too (TF
Serving would emit the raw bytes and so produce invalid JSON).  Floats that are
not finite are written as the tokens ``NaN``, ``Infinity`` and ``-Infinity``,
as TF Serving writes them.  The body is compact JSON (TF Serving
pretty-prints); output order is the mapping's order.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from shared.errors import InvalidArgument, ServingError, Unimplemented
from shared.tensor import (
    DT_BOOL,
    DT_DOUBLE,
    DT_FLOAT,
    DT_INT8,
    DT_INT16,
    DT_INT32,
    DT_INT64,
    DT_STRING,
    DT_UINT8,
    DT_UINT32,
    DT_UINT64,
    NUMPY_DTYPE,
    dtype_name,
)

__all__ = ["PredictBody", "error_body", "format_predict_response", "parse_predict_body"]

_SIGNATURE_KEY = "signature_name"
_INSTANCES_KEY = "instances"
_INPUTS_KEY = "inputs"
_PREDICTIONS_KEY = "predictions"
_OUTPUTS_KEY = "outputs"
_ERROR_KEY = "error"
_B64_KEY = "b64"
_BYTES_SUFFIX = "_bytes"

# numpy 1.x refuses arrays of more than 32 dimensions; refuse deeper nesting
# up front (it also bounds the recursion of the element walk).
_MAX_RANK = 32
# JSON values quoted in error messages are cut to this many characters.
_MAX_RENDER = 4096

# Largest integer a float type holds exactly, as TF Serving's IsLosslessDecimal.
_FLOAT_MAX_INT = (1 << 24) - 1
_DOUBLE_MAX_INT = (1 << 53) - 1
_FLOAT32_MAX = float(np.finfo(np.float32).max)

# Inclusive integer ranges of the integer dtypes.
_INT_RANGE: dict[int, tuple[int, int]] = {
    DT_INT8: (-(1 << 7), (1 << 7) - 1),
    DT_UINT8: (0, (1 << 8) - 1),
    DT_INT16: (-(1 << 15), (1 << 15) - 1),
    DT_INT32: (-(1 << 31), (1 << 31) - 1),
    DT_INT64: (-(1 << 63), (1 << 63) - 1),
    DT_UINT32: (0, (1 << 32) - 1),
    DT_UINT64: (0, (1 << 64) - 1),
}
_FLOAT_LIMIT: dict[int, int] = {DT_FLOAT: _FLOAT_MAX_INT, DT_DOUBLE: _DOUBLE_MAX_INT}
# The dtypes TF Serving converts from JSON (json_tensor.cc AddValueToTensor).
_SUPPORTED = frozenset((*_INT_RANGE, DT_FLOAT, DT_DOUBLE, DT_BOOL, DT_STRING))

_DUMPS_OPTIONS = orjson.OPT_SERIALIZE_NUMPY

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class PredictBody:
    """A parsed REST predict request."""

    signature_name: str  # "" when absent (means serving_default)
    inputs: dict[str, Array]  # decoded with the signature's dtypes
    row_format: bool  # True for "instances", False for "inputs"


def error_body(message: str) -> bytes:
    """The JSON body of an error response: ``{"error": message}``."""
    return orjson.dumps({_ERROR_KEY: message})


# --------------------------------------------------------------------------
# Request
# --------------------------------------------------------------------------


def parse_predict_body(
    body: bytes, input_dtypes: Callable[[str], Mapping[str, int]]
) -> PredictBody:
    """Decode a REST predict body into named numpy arrays.

    ``input_dtypes(signature_name)`` returns the signature's inputs as
    ``{name: DataType}``; its own errors (unknown signature) propagate.
    Everything malformed raises ``InvalidArgument`` (``Unimplemented`` for an
    input dtype that has no JSON mapping) with TF Serving's message.
    """
    doc = _parse_json(body)
    if not isinstance(doc, dict):
        raise InvalidArgument(f"JSON Value: {_render(doc)} Is not object")

    signature_name = doc.get(_SIGNATURE_KEY, "")
    if not isinstance(signature_name, str):
        raise InvalidArgument(
            f"JSON Value: {_render(doc)} not formatted correctly. "
            "'signature_name' key must be a string value."
        )

    dtypes = dict(input_dtypes(signature_name))
    if not dtypes:
        raise InvalidArgument(
            f"Failed to get input map for signature: {signature_name or 'DEFAULT'}"
        )

    has_instances = _INSTANCES_KEY in doc
    has_inputs = _INPUTS_KEY in doc
    if has_instances and has_inputs:
        raise InvalidArgument(
            f"JSON Value: {_render(doc)} Not formatted correctly expecting only one of "
            f"'{_INPUTS_KEY}' or '{_INSTANCES_KEY}' keys to exist "
        )
    # Only then may a bool-typed JSON token hide in a numeric list.
    maybe_bools = b"true" in body or b"false" in body
    if has_instances:
        instances = doc[_INSTANCES_KEY]
        if not isinstance(instances, list):
            raise InvalidArgument(
                f"JSON Value: {_render(doc)} Excepting '{_INSTANCES_KEY}' to be an list/array"
            )
        if not instances:
            raise InvalidArgument(f"JSON Value: {_render(doc)} No values in '{_INSTANCES_KEY}' array")
        inputs = _from_instances(instances, dtypes, maybe_bools)
        return PredictBody(signature_name, inputs, True)
    if has_inputs:
        inputs = _from_columns(doc[_INPUTS_KEY], dtypes, maybe_bools)
        return PredictBody(signature_name, inputs, False)
    raise InvalidArgument("Missing 'inputs' or 'instances' key")


def _parse_json(body: bytes) -> Any:
    if not body:
        raise InvalidArgument("JSON Parse error: The document is empty")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if b"NaN" in body or b"Infinity" in body:
            # TF Serving accepts these tokens; the standard library does too.
            try:
                return json.loads(body)
            except (ValueError, RecursionError):
                pass
        raise InvalidArgument(f"JSON Parse error: {exc.msg} at offset: {exc.pos}") from exc


# -- columnar ("inputs") ---------------------------------------------------


def _from_columns(value: Any, dtypes: dict[str, int], maybe_bools: bool) -> dict[str, Array]:
    if not isinstance(value, dict) or _is_b64(value):
        if len(dtypes) > 1:
            raise InvalidArgument(
                "inputs is a plain value/list, but expecting an object as multiple "
                "input tensors required as per tensorinfo_map"
            )
        ((name, dtype),) = dtypes.items()
        return {name: _named(name, _to_array, value, dtype, maybe_bools)}
    out: dict[str, Array] = {}
    for name, dtype in dtypes.items():
        if name not in value:
            raise InvalidArgument(f"Missing named input: {name} in 'inputs' object.")
        out[name] = _named(name, _to_array, value[name], dtype, maybe_bools)
    return out


# -- row ("instances") -----------------------------------------------------


def _from_instances(
    instances: list[Any], dtypes: dict[str, int], maybe_bools: bool
) -> dict[str, Array]:
    first = instances[0]
    if len(dtypes) > 1 and not _is_element_object(first):
        # TF Serving only tests IsObject() here; a {"b64": ...} first element
        # would then be read as the value of an arbitrary input.  Refuse it.
        raise InvalidArgument(
            "instances is a plain list, but expecting list of objects as multiple "
            "input tensors required as per tensorinfo_map"
        )
    fast = _instances_fast(instances, dtypes, maybe_bools)
    if fast is not None:
        return fast
    # The exact walk, in TF Serving's order; it raises the error it finds first.
    return _instances_exact(instances, dtypes)


def _instances_fast(
    instances: list[Any], dtypes: dict[str, int], maybe_bools: bool
) -> dict[str, Array] | None:
    """Stack each input's column with numpy; None when the exact walk must decide."""
    if not _is_element_object(instances[0]):
        ((name, dtype),) = dtypes.items()
        columns = {name: instances}
    else:
        names = dtypes.keys()
        for inst in instances:
            if not isinstance(inst, dict) or inst.keys() != names or _is_b64(inst):
                return None
        columns = {name: [inst[name] for inst in instances] for name in dtypes}
    out: dict[str, Array] = {}
    for name, column in columns.items():
        dtype = dtypes[name]
        if dtype == DT_STRING:
            try:
                out[name] = _exact_array(column, dtype)
            except ServingError:
                return None
            continue
        array = _fast_numeric(column, dtype, maybe_bools)
        if array is None:
            return None
        out[name] = array
    return out


def _instances_exact(instances: list[Any], dtypes: dict[str, int]) -> dict[str, Array]:
    objects = _is_element_object(instances[0])
    names = set(dtypes)
    parts: dict[str, list[Array]] = {}

    def add(item: Any, name: str) -> None:
        if name not in dtypes:
            raise InvalidArgument(f"JSON object: does not have named input: {name}")
        array = _exact_array(item, dtypes[name])
        seen = parts.setdefault(name, [])
        if seen:
            want = seen[0].shape
            if seen[0].size != array.size:
                raise InvalidArgument(f"Expecting tensor size: {seen[0].size} but got: {array.size}")
            if want != array.shape:
                raise InvalidArgument(
                    f"Expecting shape {_shape_str(want)} but got: {_shape_str(array.shape)}"
                )
        seen.append(array)

    for index, elem in enumerate(instances):
        if objects:
            if not _is_element_object(elem):
                raise InvalidArgument(f"Expecting object but got list at item {index} of input list")
            for key, item in elem.items():
                try:
                    add(item, key)
                except ServingError as exc:
                    raise InvalidArgument(
                        f"Failed to process element: {index} key: {key} of 'instances' list. "
                        f"Error: {_status_str(exc)}"
                    ) from exc
            if elem.keys() != names:
                raise InvalidArgument(
                    f"Failed to process element: {index} of 'instances' list. "
                    f"JSON object: {_render(elem)} keys must be equal to: {','.join(sorted(names))}"
                )
        else:
            if _is_element_object(elem):
                raise InvalidArgument(
                    f"Expecting value/list but got object at item {index} of input list"
                )
            (name,) = dtypes
            try:
                add(elem, name)
            except ServingError as exc:
                raise InvalidArgument(
                    _with_input(
                        f"Failed to process element: {index} of 'instances' list. "
                        f"Error: {_status_str(exc)}",
                        name,
                    )
                ) from exc
    return {name: np.stack(parts[name]) for name in dtypes}


# -- one tensor ------------------------------------------------------------


def _to_array(value: Any, dtype: int, maybe_bools: bool) -> Array:
    if dtype != DT_STRING and dtype in _SUPPORTED:
        array = _fast_numeric(value, dtype, maybe_bools)
        if array is not None:
            return array
    return _exact_array(value, dtype)


def _dense_shape(value: Any) -> tuple[int, ...]:
    """The shape read off the first element at each level (GetDenseTensorShape)."""
    shape: list[int] = []
    while isinstance(value, list):
        shape.append(len(value))
        if len(shape) > _MAX_RANK:
            raise InvalidArgument(
                f"JSON Value nested more than {_MAX_RANK} levels deep; "
                f"tensors of rank > {_MAX_RANK} are not supported"
            )
        if not value:
            break
        value = value[0]
    return tuple(shape)


def _fast_numeric(value: Any, dtype: int, maybe_bools: bool) -> Array | None:
    """One ``np.asarray`` plus vectorised checks; None when unsure or invalid."""
    shape = _dense_shape(value)
    target = NUMPY_DTYPE[dtype]
    try:
        array = np.asarray(value)
    except (ValueError, TypeError, OverflowError):
        return None  # ragged, or values numpy cannot hold
    if array.shape != shape:
        return None
    if array.size == 0:
        return np.zeros(shape, dtype=target)
    kind = array.dtype.kind
    if dtype == DT_BOOL:
        return array if kind == "b" else None
    if kind not in "iuf" or maybe_bools:
        return None
    if dtype in _FLOAT_LIMIT:
        limit = _FLOAT_LIMIT[dtype]
        # Beyond the limit an integer token is lossy but a decimal one may not
        # be; only the exact walk can tell them apart.  NaN fails this test too.
        if kind == "f":
            if not np.all(np.abs(array) <= limit):
                return None
        elif array.min() < -limit or array.max() > limit:
            return None
        return array.astype(target)
    if kind == "f":
        return None  # a decimal token for an integer dtype
    lo, hi = _INT_RANGE[dtype]
    if array.min() < lo or array.max() > hi:
        return None
    return array.astype(target, copy=False)


def _exact_array(value: Any, dtype: int) -> Array:
    """TF Serving's FillTensorProto: walk every element, checking shape and type."""
    shape = _dense_shape(value)
    rank = len(shape)
    convert = _converter(dtype)
    flat: list[Any] = []
    append = flat.append

    def walk(item: Any, level: int) -> None:
        if not isinstance(item, list):
            if level != rank:
                raise InvalidArgument(
                    f"JSON Value: {_render(item)} found at incorrect level: {level + 1} "
                    f"in the JSON DOM. Expected at level: {rank}"
                )
            append(convert(item))
            return
        if level >= rank:
            raise InvalidArgument(f"Encountered list at unexpected level: {level} expected < {rank}")
        if len(item) != shape[level]:
            raise InvalidArgument(
                f"Encountered list at unexpected size: {len(item)} at level: {level} "
                f"expected size: {shape[level]}"
            )
        for sub in item:
            walk(sub, level + 1)

    walk(value, 0)
    if dtype == DT_STRING:
        array = np.empty(len(flat), dtype=object)
        array[:] = flat
        return array.reshape(shape)
    if dtype not in NUMPY_DTYPE:  # no value to refuse, and no numpy type either
        raise Unimplemented(f"Conversion of JSON Value: {_render(value)} to type: {dtype_name(dtype)}")
    return np.array(flat, dtype=NUMPY_DTYPE[dtype]).reshape(shape)


def _converter(dtype: int) -> Callable[[Any], Any]:
    """The per-value check of AddValueToTensor for one dtype."""
    if dtype in _FLOAT_LIMIT:
        limit = _FLOAT_LIMIT[dtype]
        target = dtype_name(dtype)

        def to_float(v: Any) -> Any:
            kind = type(v)
            if kind is float:
                if dtype == DT_FLOAT and math.isfinite(v) and abs(v) > _FLOAT32_MAX:
                    raise _lossy(v, target)
                return v
            if kind is int:
                if abs(v) > limit:
                    raise _lossy(v, target)
                return v
            raise _type_error(v, dtype)

        return to_float

    if dtype in _INT_RANGE:
        lo, hi = _INT_RANGE[dtype]

        def to_int(v: Any) -> Any:
            if type(v) is int and lo <= v <= hi:
                return v
            raise _type_error(v, dtype)

        return to_int

    if dtype == DT_BOOL:

        def to_bool(v: Any) -> Any:
            if type(v) is bool:
                return v
            raise _type_error(v, dtype)

        return to_bool

    if dtype == DT_STRING:

        def to_bytes(v: Any) -> bytes:
            if isinstance(v, str):
                return v.encode("utf-8", "surrogatepass")
            if isinstance(v, dict):
                return _decode_b64(v)
            raise _type_error(v, dtype)

        return to_bytes

    def unsupported(v: Any) -> Any:
        raise Unimplemented(f"Conversion of JSON Value: {_render(v)} to type: {dtype_name(dtype)}")

    return unsupported


def _is_b64(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and len(value) == 1
        and isinstance(value.get(_B64_KEY), str)
    )


def _is_element_object(value: Any) -> bool:
    return isinstance(value, dict) and not _is_b64(value)


def _decode_b64(value: dict[str, Any]) -> bytes:
    if not _is_b64(value):
        raise InvalidArgument(
            f"JSON Value: {_render(value)} not formatted correctly for base64 data"
        )
    text: str = value[_B64_KEY]
    # Like absl::Base64Unescape: standard alphabet, padding optional.
    missing = -len(text) % 4
    if missing == 3:
        raise InvalidArgument("Unable to base64 decode")
    try:
        return base64.b64decode(text + "=" * missing, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidArgument("Unable to base64 decode") from exc


# -- messages --------------------------------------------------------------


def _type_error(value: Any, dtype: int) -> InvalidArgument:
    return InvalidArgument(
        f"JSON Value: {_render(value)} Type: {_json_type(value)} "
        f"is not of expected type: {dtype_name(dtype)}"
    )


def _lossy(value: Any, target: str) -> InvalidArgument:
    return InvalidArgument(
        f"Cannot convert JSON value: {_render(value)} to {target} without loss of precision."
    )


def _named(name: str, fn: Callable[..., Array], *args: Any) -> Array:
    """Run ``fn``; add the input's name to an error whose text lacks it."""
    try:
        return fn(*args)
    except (InvalidArgument, Unimplemented) as exc:
        raise type(exc)(_with_input(exc.message, name)) from exc


def _with_input(message: str, name: str) -> str:
    return f"{message} (input: {name})"


def _status_str(exc: ServingError) -> str:
    """absl::Status::ToString() of a nested error: "INVALID_ARGUMENT: msg"."""
    return f"{exc.code.name}: {exc.message}"


def _json_type(value: Any) -> str:
    if value is None:
        return "Null"
    if value is True:
        return "True"
    if value is False:
        return "False"
    if isinstance(value, dict):
        return "Object"
    if isinstance(value, list):
        return "Array"
    if isinstance(value, str):
        return "String"
    return "Number"


def _render(value: Any) -> str:
    """A JSON value as TF Serving quotes it in messages (compact here)."""
    if type(value) is float:
        text = _format_decimal(value)
    else:
        try:
            text = orjson.dumps(value).decode()
        except (TypeError, orjson.JSONEncodeError):
            # Deeper than orjson writes (255 levels): describe it, never recurse into it.
            text = f"<{_json_type(value)} nested too deep to show>"
    if len(text) > _MAX_RENDER:
        text = text[:_MAX_RENDER] + "..."
    return text


def _format_decimal(value: float) -> str:
    """TF Serving's WriteDecimal: 6 significant digits unless that loses the value."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "-Infinity" if value < 0 else "Infinity"
    as_float32 = abs(value) <= _FLOAT32_MAX and float(np.float32(value)) == value
    text = f"{value:g}"
    if as_float32:
        if np.float32(text) != np.float32(value):
            text = f"{value:.9g}"
    elif float(text) != value:
        text = f"{value:.17g}"
    if "." not in text and "e" not in text:
        text += ".0"
    return text


def _shape_str(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


# --------------------------------------------------------------------------
# Response
# --------------------------------------------------------------------------


def format_predict_response(outputs: Mapping[str, Array], row_format: bool) -> bytes:
    """Encode output tensors as TF Serving's predict response body.

    Row format: ``{"predictions": [...]}``; every output needs rank >= 1 and
    the same 0-th dimension.  Columnar format: ``{"outputs": ...}``.
    """
    if not outputs:
        raise InvalidArgument("Cannot convert empty tensor map to JSON")
    batch = -1
    if row_format:
        for name, array in outputs.items():
            shape = np.shape(array)
            if not shape:
                raise InvalidArgument(f"Tensor name: {name} has no shape information ")
            if batch >= 0 and shape[0] != batch:
                raise InvalidArgument(
                    f"Tensor name: {name} has inconsistent batch size: {shape[0]} expecting: {batch}"
                )
            batch = shape[0]
    markers = _Markers()
    values = {name: _prepare(name, np.asarray(array), markers) for name, array in outputs.items()}

    doc: dict[str, Any]
    if row_format:
        if len(values) == 1:
            (only,) = values.values()
            doc = {_PREDICTIONS_KEY: only}
        else:
            doc = {
                _PREDICTIONS_KEY: [
                    {name: value[row] for name, value in values.items()} for row in range(batch)
                ]
            }
    elif len(values) == 1:
        (only,) = values.values()
        doc = {_OUTPUTS_KEY: only}
    else:
        doc = {_OUTPUTS_KEY: values}
    return markers.dumps(doc)


class _Markers:
    """Stand-ins for NaN/Infinity/-Infinity, which orjson cannot write.

    Non-finite floats are replaced by unique strings before encoding and the
    quoted strings by the bare tokens after; a random nonce (re-drawn if an
    output string happens to contain it) keeps them from matching real data.
    """

    def __init__(self) -> None:
        self.count = 0
        self._nonce = secrets.token_hex(8)

    def token(self, kind: str) -> str:
        return f"\x00{kind}:{self._nonce}"

    def dumps(self, doc: Any) -> bytes:
        body = orjson.dumps(doc, option=_DUMPS_OPTIONS)
        if not self.count:
            return body
        quoted = {
            kind: orjson.dumps(self.token(kind)) for kind in ("NaN", "Infinity", "-Infinity")
        }
        if sum(body.count(q) for q in quoted.values()) != self.count:
            # An output string contains the nonce: astronomically unlikely.
            raise InvalidArgument("Failed to write JSON value for non-finite floats")
        for kind, q in quoted.items():
            body = body.replace(q, kind.encode())
        return body


def _prepare(name: str, array: Array, markers: _Markers) -> Any:
    """An output tensor as something orjson encodes the way TF Serving writes it."""
    kind = array.dtype.kind
    if kind in "OSU":
        return _strings(array, name.endswith(_BYTES_SUFFIX))
    if kind not in "biuf":
        raise InvalidArgument(f"Failed to write JSON value for tensor type: {_numpy_type_name(array)}")
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if kind == "f":
        finite = np.isfinite(array)
        if not finite.all():
            return _with_markers(array, finite, markers)
    if array.ndim == 0:
        return array[()]
    return np.ascontiguousarray(array)


def _with_markers(array: Array, finite: Array, markers: _Markers) -> Any:
    # Keep the numpy scalars (orjson writes float32 ones with float32 precision).
    cells = np.empty(array.shape, dtype=object)
    cells.reshape(-1)[:] = list(array.reshape(-1))
    nan = np.isnan(array)
    cells[nan] = markers.token("NaN")
    cells[~finite & ~nan & (array > 0)] = markers.token("Infinity")
    cells[~finite & ~nan & (array < 0)] = markers.token("-Infinity")
    markers.count += int(array.size - np.count_nonzero(finite))
    return cells.tolist()


def _strings(array: Array, as_bytes: bool) -> Any:
    def b64(raw: bytes) -> dict[str, str]:
        return {_B64_KEY: base64.b64encode(raw).decode("ascii")}

    def convert(value: Any) -> Any:
        if isinstance(value, str):  # tolerated: a str is its UTF-8 bytes
            if as_bytes:
                return b64(value.encode("utf-8", "surrogatepass"))
            return str(value)
        if isinstance(value, (bytes, bytearray, memoryview)):
            raw = bytes(value)
            if as_bytes:
                return b64(raw)
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                return b64(raw)  # TF Serving would write the raw bytes
        raise InvalidArgument(
            f"Failed to write JSON value for tensor type: string (element of type {type(value).__name__})"
        )

    cells = np.empty(array.shape, dtype=object)
    cells.reshape(-1)[:] = [convert(v) for v in array.reshape(-1)]
    return cells.tolist()


def _numpy_type_name(array: Array) -> str:
    return str(array.dtype)
