"""REST predict JSON <-> numpy (router.wire.rest_json), against TF Serving's rules.

Expected texts are the ones in tensorflow_serving/util/json_tensor.cc; where
that text does not name the input, the router appends " (input: NAME)".
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shared.errors import FailedPrecondition, InvalidArgument, Unimplemented
from router.wire.rest_json import (
    PredictBody,
    error_body,
    format_predict_response,
    parse_predict_body,
)
from shared.tensor import (
    DT_BOOL,
    DT_DOUBLE,
    DT_FLOAT,
    DT_HALF,
    DT_INT8,
    DT_INT32,
    DT_INT64,
    DT_STRING,
    DT_UINT8,
    DT_UINT64,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def parse(body: Any, sig: Mapping[str, int], seen: list[str] | None = None) -> PredictBody:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)

    def dtypes(name: str) -> Mapping[str, int]:
        if seen is not None:
            seen.append(name)
        return sig

    return parse_predict_body(raw, dtypes)


def error_of(body: Any, sig: Mapping[str, int], exc: type[Exception] = InvalidArgument) -> str:
    with pytest.raises(exc) as info:
        parse(body, sig)
    return str(info.value)


def b64(raw: bytes) -> dict[str, str]:
    return {"b64": base64.b64encode(raw).decode()}


def objects(array: np.ndarray[Any, Any]) -> list[Any]:
    return array.tolist()  # type: ignore[no-any-return]


# --------------------------------------------------------------------------
# row format ("instances")
# --------------------------------------------------------------------------


def test_row_single_input_scalars() -> None:
    seen: list[str] = []
    got = parse({"instances": [1.0, 2, 3.5]}, {"x": DT_FLOAT}, seen)
    assert got.row_format is True
    assert got.signature_name == ""
    assert seen == [""]
    x = got.inputs["x"]
    assert x.dtype == np.float32 and x.shape == (3,)
    assert x.tolist() == [1.0, 2.0, 3.5]


def test_row_single_input_nested() -> None:
    # api_rest.md: 'List of 2 tensors each of [1, 2] shape'
    got = parse({"instances": [[[1, 2]], [[3, 4]]]}, {"x": DT_INT32})
    x = got.inputs["x"]
    assert x.dtype == np.int32 and x.shape == (2, 1, 2)
    assert x.tolist() == [[[1, 2]], [[3, 4]]]


def test_row_strings_and_signature_name() -> None:
    seen: list[str] = []
    got = parse({"signature_name": "sig", "instances": ["foo", "héllo", b64(b"\x00\xff")]},
                {"s": DT_STRING}, seen)
    assert seen == ["sig"]
    assert got.signature_name == "sig"
    s = got.inputs["s"]
    assert s.dtype == object and s.shape == (3,)
    assert s.tolist() == [b"foo", "héllo".encode(), b"\x00\xff"]


def test_row_multi_input_matches_columnar() -> None:
    # The api_rest.md example, in both formats.
    sig = {"tag": DT_STRING, "signal": DT_INT64, "sensor": DT_FLOAT}
    rows = parse({"instances": [
        {"tag": "foo", "signal": [1, 2, 3, 4, 5], "sensor": [[1, 2], [3, 4]]},
        {"tag": "bar", "signal": [3, 4, 1, 2, 5], "sensor": [[4, 5], [6, 8]]},
    ]}, sig)
    cols = parse({"inputs": {
        "tag": ["foo", "bar"],
        "signal": [[1, 2, 3, 4, 5], [3, 4, 1, 2, 5]],
        "sensor": [[[1, 2], [3, 4]], [[4, 5], [6, 8]]],
    }}, sig)
    assert rows.row_format and not cols.row_format
    for got in (rows, cols):
        assert list(got.inputs) == ["tag", "signal", "sensor"]
        assert got.inputs["tag"].tolist() == [b"foo", b"bar"]
        assert got.inputs["signal"].dtype == np.int64 and got.inputs["signal"].shape == (2, 5)
        assert got.inputs["sensor"].dtype == np.float32 and got.inputs["sensor"].shape == (2, 2, 2)
    np.testing.assert_array_equal(rows.inputs["sensor"], cols.inputs["sensor"])


def test_row_single_input_as_objects() -> None:
    got = parse({"instances": [{"x": [1.5]}, {"x": [2.5]}]}, {"x": DT_DOUBLE})
    assert got.inputs["x"].dtype == np.float64 and got.inputs["x"].tolist() == [[1.5], [2.5]]


def test_row_b64_first_element_is_a_value_not_an_object() -> None:
    got = parse({"instances": [b64(b"a"), "b"]}, {"img_bytes": DT_STRING})
    assert got.inputs["img_bytes"].tolist() == [b"a", b"b"]


def test_row_plain_list_with_multi_input_signature() -> None:
    msg = error_of({"instances": [1, 2]}, {"a": DT_INT64, "b": DT_INT64})
    assert msg == ("instances is a plain list, but expecting list of objects as multiple "
                   "input tensors required as per tensorinfo_map")


def test_row_keys_must_equal_inputs() -> None:
    sig = {"a": DT_INT64, "s": DT_STRING}
    msg = error_of({"instances": [{"a": 1, "s": "x"}, {"a": 2}]}, sig)
    assert msg == ("Failed to process element: 1 of 'instances' list. "
                   'JSON object: {"a":2} keys must be equal to: a,s')
    msg = error_of({"instances": [{"a": 1, "s": "x", "zz": 3}]}, sig)
    assert msg == ("Failed to process element: 0 key: zz of 'instances' list. "
                   "Error: INVALID_ARGUMENT: JSON object: does not have named input: zz")


def test_row_mixed_objects_and_values() -> None:
    sig = {"a": DT_INT64, "b": DT_INT64}
    assert error_of({"instances": [{"a": 1, "b": 2}, [1]]}, sig) == \
        "Expecting object but got list at item 1 of input list"
    assert error_of({"instances": [[1], {"x": 1}]}, {"x": DT_INT64}) == \
        "Expecting value/list but got object at item 1 of input list"


def test_row_instances_must_share_shape() -> None:
    msg = error_of({"instances": [[1.0, 2.0], [3.5]]}, {"x": DT_FLOAT})
    assert msg == ("Failed to process element: 1 of 'instances' list. Error: INVALID_ARGUMENT: "
                   "Expecting tensor size: 2 but got: 1 (input: x)")
    msg = error_of({"instances": [{"x": [[1, 2]]}, {"x": [[1], [2]]}]}, {"x": DT_INT64})
    assert msg == ("Failed to process element: 1 key: x of 'instances' list. Error: INVALID_ARGUMENT: "
                   "Expecting shape [1,2] but got: [2,1]")


def test_row_type_error_names_element_and_key() -> None:
    sig = {"a": DT_INT64, "s": DT_STRING}
    msg = error_of({"instances": [{"a": 1, "s": "x"}, {"a": 2.5, "s": "y"}]}, sig)
    assert msg == ("Failed to process element: 1 key: a of 'instances' list. Error: INVALID_ARGUMENT: "
                   "JSON Value: 2.5 Type: Number is not of expected type: int64")


def test_row_instances_not_a_list_or_empty() -> None:
    msg = error_of({"instances": {"x": 1}}, {"x": DT_INT64})
    assert msg == """JSON Value: {"instances":{"x":1}} Excepting 'instances' to be an list/array"""
    msg = error_of({"instances": []}, {"x": DT_INT64})
    assert msg == """JSON Value: {"instances":[]} No values in 'instances' array"""


# --------------------------------------------------------------------------
# columnar format ("inputs")
# --------------------------------------------------------------------------


def test_columnar_bare_value_and_scalar() -> None:
    got = parse({"inputs": [[1, 2, 3]]}, {"x": DT_INT64})
    assert got.row_format is False
    assert got.inputs["x"].shape == (1, 3) and got.inputs["x"].dtype == np.int64
    got = parse({"inputs": 3}, {"x": DT_FLOAT})
    assert got.inputs["x"].shape == () and got.inputs["x"].dtype == np.float32
    assert float(got.inputs["x"]) == 3.0
    got = parse({"inputs": b64(b"\x01")}, {"x": DT_STRING})
    assert got.inputs["x"].shape == () and got.inputs["x"][()] == b"\x01"


def test_columnar_inputs_may_differ_in_dim0() -> None:
    got = parse({"inputs": {"a": [1, 2, 3], "b": [[1.0]]}}, {"a": DT_INT64, "b": DT_FLOAT})
    assert got.inputs["a"].shape == (3,) and got.inputs["b"].shape == (1, 1)


def test_columnar_object_rules() -> None:
    sig = {"a": DT_INT64, "b": DT_INT64}
    assert error_of({"inputs": [1, 2]}, sig) == (
        "inputs is a plain value/list, but expecting an object as multiple "
        "input tensors required as per tensorinfo_map")
    assert error_of({"inputs": b64(b"x")}, sig).startswith("inputs is a plain value/list")
    assert error_of({"inputs": {"a": [1]}}, sig) == "Missing named input: b in 'inputs' object."
    # Keys that are not inputs are ignored, as TF Serving does.
    got = parse({"inputs": {"a": [1], "b": [2], "other": "x"}}, sig)
    assert list(got.inputs) == ["a", "b"]


def test_columnar_ragged_lists() -> None:
    sig = {"x": DT_FLOAT}
    assert error_of({"inputs": [[1.0, 2.0], [3.5]]}, sig) == \
        "Encountered list at unexpected size: 1 at level: 1 expected size: 2 (input: x)"
    assert error_of({"inputs": [[1.0], 2.0]}, sig) == \
        "JSON Value: 2.0 found at incorrect level: 2 in the JSON DOM. Expected at level: 2 (input: x)"
    assert error_of({"inputs": [1.0, [2.0]]}, sig) == \
        "Encountered list at unexpected level: 1 expected < 1 (input: x)"
    assert error_of({"inputs": [[], [1]]}, sig) == \
        "Encountered list at unexpected size: 1 at level: 1 expected size: 0 (input: x)"


def test_empty_lists_keep_their_shape() -> None:
    got = parse({"inputs": [[], []]}, {"x": DT_INT64})
    assert got.inputs["x"].shape == (2, 0) and got.inputs["x"].dtype == np.int64
    got = parse({"inputs": []}, {"s": DT_STRING})
    assert got.inputs["s"].shape == (0,) and got.inputs["s"].dtype == object


# --------------------------------------------------------------------------
# value types
# --------------------------------------------------------------------------


def test_bools() -> None:
    got = parse({"inputs": [[True, False]]}, {"x": DT_BOOL})
    assert got.inputs["x"].dtype == np.bool_ and got.inputs["x"].tolist() == [[True, False]]
    assert error_of({"inputs": [1]}, {"x": DT_BOOL}) == \
        "JSON Value: 1 Type: Number is not of expected type: bool (input: x)"
    assert error_of({"inputs": [1.0, True]}, {"x": DT_FLOAT}) == \
        "JSON Value: true Type: True is not of expected type: float (input: x)"
    assert error_of({"inputs": [1, False]}, {"x": DT_INT64}) == \
        "JSON Value: false Type: False is not of expected type: int64 (input: x)"


@pytest.mark.parametrize(("dtype", "value", "name"), [
    (DT_INT32, 2**31, "int32"),
    (DT_INT32, -(2**31) - 1, "int32"),
    (DT_INT64, 2**63, "int64"),
    (DT_UINT64, -1, "uint64"),
    (DT_UINT8, 256, "uint8"),
    (DT_INT8, -129, "int8"),
    (DT_INT64, 1.5, "int64"),
    (DT_INT64, 1.0, "int64"),  # a decimal token is not an integer (rapidjson IsInt64)
    (DT_INT64, "1", "int64"),
    (DT_INT64, None, "int64"),
])
def test_integer_type_and_range_errors(dtype: int, value: Any, name: str) -> None:
    msg = error_of({"inputs": {"ids": [0, value]}}, {"ids": dtype})
    rendered = orjson.dumps(value).decode()
    kind = {str: "String", type(None): "Null"}.get(type(value), "Number")
    assert msg == f"JSON Value: {rendered} Type: {kind} is not of expected type: {name} (input: ids)"


def test_integer_extremes_accepted() -> None:
    got = parse({"inputs": {"a": [-(2**63), 2**63 - 1], "b": [0, 2**64 - 1], "c": [-128, 127]}},
                {"a": DT_INT64, "b": DT_UINT64, "c": DT_INT8})
    assert got.inputs["a"].tolist() == [-(2**63), 2**63 - 1]
    assert got.inputs["b"].dtype == np.uint64 and got.inputs["b"].tolist() == [0, 2**64 - 1]
    assert got.inputs["c"].dtype == np.int8


def test_float_precision_rules() -> None:
    sig = {"x": DT_FLOAT}
    assert parse({"inputs": [16777215, -16777215]}, sig).inputs["x"].tolist() == [16777215, -16777215]
    assert error_of({"inputs": [1.5, 16777216]}, sig) == \
        "Cannot convert JSON value: 16777216 to float without loss of precision. (input: x)"
    # A decimal token is rounded, not refused, while it fits in a float.
    assert parse(b'{"inputs": [16777217.0, 1e30]}', sig).inputs["x"].tolist() == \
        [16777216.0, float(np.float32(1e30))]
    assert error_of(b'{"inputs": [1e39]}', sig) == \
        "Cannot convert JSON value: 1e+39 to float without loss of precision. (input: x)"
    assert parse({"inputs": [2**53 - 1]}, {"x": DT_DOUBLE}).inputs["x"].tolist() == [2**53 - 1]
    assert error_of({"inputs": [2**53]}, {"x": DT_DOUBLE}) == \
        "Cannot convert JSON value: 9007199254740992 to double without loss of precision. (input: x)"
    assert error_of({"inputs": ["1.5"]}, sig) == \
        'JSON Value: "1.5" Type: String is not of expected type: float (input: x)'


def test_float32_values_are_rounded_like_tf() -> None:
    got = parse(b'{"inputs": [0.1, 1e-45, 3.4028234663852886e38]}', {"x": DT_FLOAT})
    np.testing.assert_array_equal(
        got.inputs["x"], np.array([0.1, 1e-45, 3.4028234663852886e38]).astype(np.float32))


def test_nan_and_infinity_tokens() -> None:
    got = parse(b'{"inputs": [NaN, Infinity, -Infinity, 1.5]}', {"x": DT_FLOAT})
    x = got.inputs["x"]
    assert np.isnan(x[0]) and x[1] == np.inf and x[2] == -np.inf and x[3] == 1.5
    assert error_of(b'{"inputs": [NaN]}', {"x": DT_INT64}) == \
        "JSON Value: NaN Type: Number is not of expected type: int64 (input: x)"


def test_strings_b64_errors() -> None:
    sig = {"s": DT_STRING}
    assert error_of({"inputs": [{"b64": "!!!"}]}, sig) == "Unable to base64 decode (input: s)"
    assert error_of({"inputs": [{"b64": "YQ==", "x": 1}]}, sig) == (
        'JSON Value: {"b64":"YQ==","x":1} not formatted correctly for base64 data (input: s)')
    assert error_of({"inputs": [1]}, sig) == \
        "JSON Value: 1 Type: Number is not of expected type: string (input: s)"
    assert error_of({"inputs": [b64(b"a")]}, {"x": DT_INT64}) == \
        'JSON Value: {"b64":"YQ=="} Type: Object is not of expected type: int64 (input: x)'
    # Padding is optional, as with absl::Base64Unescape.
    assert parse({"inputs": [{"b64": "YQ"}]}, sig).inputs["s"].tolist() == [b"a"]


def test_unsupported_dtype_is_unimplemented() -> None:
    msg = error_of({"inputs": [1.0]}, {"h": DT_HALF}, Unimplemented)
    assert msg == "Conversion of JSON Value: 1.0 to type: half (input: h)"


# --------------------------------------------------------------------------
# document-level errors
# --------------------------------------------------------------------------


def test_both_or_neither_key() -> None:
    sig = {"x": DT_INT64}
    assert error_of({"inputs": [1], "instances": [1]}, sig) == (
        """JSON Value: {"inputs":[1],"instances":[1]} Not formatted correctly expecting only """
        "one of 'inputs' or 'instances' keys to exist ")
    assert error_of({"signature_name": "s"}, sig) == "Missing 'inputs' or 'instances' key"


def test_malformed_json() -> None:
    sig = {"x": DT_INT64}
    assert error_of(b"", sig) == "JSON Parse error: The document is empty"
    msg = error_of(b'{"instances": [1,', sig)
    assert msg.startswith("JSON Parse error: ") and msg.endswith("at offset: 17")
    assert error_of(b'{"inputs": [NaN', sig).startswith("JSON Parse error: ")
    assert error_of(b"[1]", sig) == "JSON Value: [1] Is not object"
    assert error_of({"signature_name": 7, "inputs": 1}, sig) == (
        """JSON Value: {"signature_name":7,"inputs":1} not formatted correctly. """
        "'signature_name' key must be a string value.")


def test_signature_lookup_errors() -> None:
    def unknown(name: str) -> Mapping[str, int]:
        raise FailedPrecondition(f"Serving signature name: \"{name}\" not found in signature def")

    with pytest.raises(FailedPrecondition):
        parse_predict_body(b'{"signature_name": "nope", "inputs": 1}', unknown)
    assert error_of({"inputs": 1}, {}) == "Failed to get input map for signature: DEFAULT"
    assert error_of({"signature_name": "s", "inputs": 1}, {}) == \
        "Failed to get input map for signature: s"


def test_nesting_deeper_than_numpy_allows() -> None:
    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    assert "not supported" in error_of({"inputs": deep}, {"x": DT_INT64})


# --------------------------------------------------------------------------
# responses
# --------------------------------------------------------------------------


def test_row_response_one_output_is_bare() -> None:
    out = format_predict_response({"y": np.array([[1, 2], [3, 4]], np.float32)}, row_format=True)
    assert out == b'{"predictions":[[1.0,2.0],[3.0,4.0]]}'
    out = format_predict_response({"y": np.array([0.5, 1.5], np.float32)}, row_format=True)
    assert orjson.loads(out) == {"predictions": [0.5, 1.5]}


def test_row_response_many_outputs_are_objects() -> None:
    out = format_predict_response(
        {"scores": np.array([[0.25, 0.75], [0.5, 0.5]], np.float32),
         "ids": np.array([3, 4], np.int64),
         "ok": np.array([True, False])},
        row_format=True)
    assert orjson.loads(out) == {"predictions": [
        {"scores": [0.25, 0.75], "ids": 3, "ok": True},
        {"scores": [0.5, 0.5], "ids": 4, "ok": False},
    ]}


def test_row_response_batch_rules() -> None:
    with pytest.raises(InvalidArgument) as info:
        format_predict_response({"a": np.zeros(2), "b": np.zeros(3)}, row_format=True)
    assert str(info.value) == "Tensor name: b has inconsistent batch size: 3 expecting: 2"
    with pytest.raises(InvalidArgument) as info:
        format_predict_response({"a": np.float32(1.0)}, row_format=True)  # type: ignore[dict-item]
    assert str(info.value) == "Tensor name: a has no shape information "
    # A batch of 0 is allowed (TF Serving #1615).
    assert format_predict_response({"a": np.zeros((0, 4)), "b": np.zeros(0)}, True) == \
        b'{"predictions":[]}'
    with pytest.raises(InvalidArgument, match="Cannot convert empty tensor map to JSON"):
        format_predict_response({}, row_format=True)


def test_columnar_response() -> None:
    assert format_predict_response({"y": np.array(0.1, np.float32)}, False) == b'{"outputs":0.1}'
    out = format_predict_response(
        {"a": np.array([1, 2, 3], np.int32), "b": np.array([[1.5]], np.float64)}, False)
    assert orjson.loads(out) == {"outputs": {"a": [1, 2, 3], "b": [[1.5]]}}


def test_string_outputs() -> None:
    strings = np.array([b"caf\xc3\xa9", b"\xff\xfe", b""], dtype=object)
    out = orjson.loads(format_predict_response(
        {"text": strings, "img_bytes": strings.copy()}, row_format=False))
    assert out["outputs"]["text"] == ["café", b64(b"\xff\xfe"), ""]
    assert out["outputs"]["img_bytes"] == [b64(b"caf\xc3\xa9"), b64(b"\xff\xfe"), b64(b"")]
    out = orjson.loads(format_predict_response({"s": np.array(b"x", dtype=object)}, False))
    assert out == {"outputs": "x"}


def test_non_finite_floats_written_as_tf_tokens() -> None:
    y = np.array([[np.nan, np.inf], [-np.inf, 0.1]], np.float32)
    out = format_predict_response({"y": y, "names": np.array([b"NaN", b"x"], object)}, True)
    assert out == (b'{"predictions":[{"y":[NaN,Infinity],"names":"NaN"},'
                   b'{"y":[-Infinity,0.1],"names":"x"}]}')
    assert format_predict_response({"y": np.array(np.nan)}, False) == b'{"outputs":NaN}'
    back = json.loads(out)  # the standard library reads these tokens
    assert back["predictions"][1]["y"][0] == -np.inf


def test_float32_output_round_trips() -> None:
    y = np.array([0.1, 1 / 3, 16777217, 3.4028235e38, 1e-45], np.float32)
    out = orjson.loads(format_predict_response({"y": y}, False))
    np.testing.assert_array_equal(np.array(out["outputs"], np.float64).astype(np.float32), y)
    assert out["outputs"][0] == 0.1  # shortest float32 text, not 0.10000000149011612


def test_odd_layouts_and_dtypes() -> None:
    strided = np.arange(12, dtype=np.int16).reshape(3, 4)[:, ::2]
    big_endian = np.array([1.5, 2.5], dtype=">f8")
    out = orjson.loads(format_predict_response({"s": strided}, True))
    assert out == {"predictions": strided.tolist()}
    out = orjson.loads(format_predict_response({"b": big_endian}, True))
    assert out == {"predictions": [1.5, 2.5]}
    half = np.array([0.5, 0.1], np.float16)
    out = orjson.loads(format_predict_response({"h": half}, True))
    assert np.array(out["predictions"]).astype(np.float16).tolist() == half.tolist()
    with pytest.raises(InvalidArgument, match="Failed to write JSON value for tensor type: complex64"):
        format_predict_response({"c": np.zeros(2, np.complex64)}, True)


def test_error_body() -> None:
    assert error_body('bad "thing"') == b'{"error":"bad \\"thing\\""}'


def test_module_does_not_import_tensorflow() -> None:
    code = ("import sys, router.wire.rest_json; "
            "sys.exit(1 if any(m.split('.')[0] == 'tensorflow' for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------

_DTYPES = {DT_FLOAT: np.float32, DT_INT64: np.int64, DT_STRING: object}


@st.composite
def tensors(draw: st.DrawFn, batch: int | None = None) -> tuple[int, np.ndarray[Any, Any]]:
    dtype = draw(st.sampled_from(sorted(_DTYPES)))
    inner = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3))
    if 0 in inner:  # JSON cannot say what lies inside an empty list
        inner = inner[: inner.index(0) + 1]
    shape = inner if batch is None else (batch, *inner)
    if dtype == DT_STRING:
        cells = draw(st.lists(st.binary(max_size=8), min_size=int(np.prod(shape)),
                              max_size=int(np.prod(shape))))
        array = np.empty(len(cells), dtype=object)
        array[:] = cells
        return dtype, array.reshape(shape)
    elements = (st.floats(width=32) if dtype == DT_FLOAT
                else st.integers(-(2**63), 2**63 - 1))
    return dtype, draw(hnp.arrays(_DTYPES[dtype], shape, elements=elements))


def as_tf_json(array: np.ndarray[Any, Any], dtype: int) -> Any:
    """The nested JSON value a TF Serving client writes for ``array``."""
    if dtype == DT_STRING:
        cells = np.empty(array.shape, dtype=object)
        cells.reshape(-1)[:] = [b64(v) for v in array.reshape(-1)]
        return cells.tolist()
    return array.tolist()


def dumps(doc: Any) -> bytes:
    # The standard library writes NaN/Infinity tokens, as TF Serving clients do.
    return json.dumps(doc).encode()


def assert_same(got: np.ndarray[Any, Any], want: np.ndarray[Any, Any]) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    if want.dtype == object:
        assert got.tolist() == want.tolist()
    else:
        np.testing.assert_array_equal(got, want)


@FAST
@given(st.dictionaries(st.sampled_from(["a", "b_bytes", "c"]), tensors(), min_size=1, max_size=3),
       st.booleans())
def test_round_trip_columnar(named: dict[str, tuple[int, np.ndarray[Any, Any]]], bare: bool) -> None:
    sig = {name: dtype for name, (dtype, _) in named.items()}
    if bare and len(named) == 1:
        ((dtype, array),) = named.values()
        doc: Any = {"inputs": as_tf_json(array, dtype)}
    else:
        doc = {"inputs": {name: as_tf_json(a, d) for name, (d, a) in named.items()}}
    got = parse_predict_body(dumps(doc), lambda _: sig)
    assert not got.row_format
    for name, (_, array) in named.items():
        assert_same(got.inputs[name], array)


@FAST
@given(st.integers(1, 4).flatmap(
    lambda n: st.dictionaries(st.sampled_from(["a", "b", "c"]), tensors(batch=n),
                              min_size=1, max_size=3)),
    st.booleans())
def test_round_trip_rows(named: dict[str, tuple[int, np.ndarray[Any, Any]]], bare: bool) -> None:
    sig = {name: dtype for name, (dtype, _) in named.items()}
    columns = {name: as_tf_json(a, d) for name, (d, a) in named.items()}
    batch = len(next(iter(columns.values())))
    if bare and len(named) == 1:
        (instances,) = columns.values()
    else:
        instances = [{name: col[i] for name, col in columns.items()} for i in range(batch)]
    got = parse_predict_body(dumps({"instances": instances}), lambda _: sig)
    assert got.row_format
    for name, (_, array) in named.items():
        assert_same(got.inputs[name], array)


def decode_output(value: Any, array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    if array.dtype == object:
        cells = np.empty(array.shape, dtype=object)
        flat = np.array(value, dtype=object).reshape(-1) if array.ndim else [value]
        cells.reshape(-1)[:] = [base64.b64decode(v["b64"]) for v in flat]
        return cells
    return np.array(value, dtype=np.float64 if array.dtype.kind == "f" else array.dtype) \
        .astype(array.dtype).reshape(array.shape)


@FAST
@given(st.integers(0, 3).flatmap(
    lambda n: st.dictionaries(st.sampled_from(["a_bytes", "b_bytes", "c_bytes"]),
                              tensors(batch=n), min_size=1, max_size=3)),
    st.booleans())
def test_round_trip_response(named: dict[str, tuple[int, np.ndarray[Any, Any]]], row: bool) -> None:
    outputs = {name: array for name, (_, array) in named.items()}
    body = json.loads(format_predict_response(outputs, row))
    if row:
        preds = body["predictions"]
        batch = next(iter(outputs.values())).shape[0]
        assert len(preds) == batch
        for name, array in outputs.items():
            rows = preds if len(outputs) == 1 else [p[name] for p in preds]
            for i in range(batch):
                cell = array[i, ...]  # a 0-d array, even for object dtype
                assert_same(decode_output(rows[i], cell), cell)
    else:
        got = body["outputs"] if len(outputs) > 1 else {next(iter(outputs)): body["outputs"]}
        for name, array in outputs.items():
            assert_same(decode_output(got[name], array), array)
