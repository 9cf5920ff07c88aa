"""Byte compatibility of the project's messages with the official TF Serving classes.

The router never imports TensorFlow, so it speaks TF Serving's wire format with
its own message definitions; these tests prove both directions, importing the
official `tensorflow_serving.apis` modules in the same process.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import any_pb2
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    predict_pb2,
    prediction_log_pb2,
)

from protos import (
    config_pb2,
    metadata_pb2,
    predict_pb2 as my_predict_pb2,
    prediction_log_pb2 as my_log_pb2,
    status_pb2,
    tensor_pb2,
)
from shared import tensor as codec
from tests.support import fill_typed

# numpy dtypes the codec handles, as hypothesis generates them.
NUMERIC = [
    np.float32, np.float64, np.float16, np.int8, np.int16, np.int32, np.int64,
    np.uint8, np.uint16, np.uint32, np.uint64, np.bool_, np.complex64, np.complex128,
]


def roundtrip(message: Any, target: type) -> Any:
    return target.FromString(message.SerializeToString())


def arrays() -> st.SearchStrategy[np.ndarray]:
    shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)
    return st.sampled_from(NUMERIC).flatmap(
        lambda dt: hnp.arrays(dtype=dt, shape=shapes, elements={"allow_nan": False}
                              if np.dtype(dt).kind in "fc" else None)
    )


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)


@settings(max_examples=150, deadline=None)
@given(arrays())
def test_codec_encoding_reads_back_in_tensorflow(arr: np.ndarray) -> None:
    official = roundtrip(codec.from_numpy(arr), tf.make_tensor_proto(0).__class__)
    assert same(tf.make_ndarray(official), arr)


@settings(max_examples=150, deadline=None)
@given(arrays())
def test_tensorflow_encoding_decodes_in_codec(arr: np.ndarray) -> None:
    mine = roundtrip(tf.make_tensor_proto(arr), tensor_pb2.TensorProto)
    assert same(codec.to_numpy(mine), arr)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=20), min_size=0, max_size=6))
def test_strings_both_directions(values: list[bytes]) -> None:
    arr = np.array(values, dtype=object)
    official = roundtrip(codec.from_numpy(arr), tf.make_tensor_proto(0).__class__)
    assert list(tf.make_ndarray(official).reshape(-1)) == values
    mine = roundtrip(tf.make_tensor_proto(values, dtype=tf.string, shape=[len(values)]),
                     tensor_pb2.TensorProto)
    assert list(codec.to_numpy(mine)) == values


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(NUMERIC), hnp.array_shapes(min_dims=1, max_dims=3, max_side=4), st.data())
def test_typed_fields_decode_like_tensorflow(dtype: Any, shape: tuple[int, ...], data: Any) -> None:
    """Typed *_val fields (what non-Python clients send), full and broadcast."""
    count = int(np.prod(shape))
    arr = data.draw(hnp.arrays(dtype=dtype, shape=(count,), elements={"allow_nan": False}
                               if np.dtype(dtype).kind in "fc" else None))
    for values in (arr, arr[:1]):
        official = tf.make_tensor_proto(0).__class__()
        official.dtype = tf.as_dtype(np.dtype(dtype)).as_datatype_enum
        official.tensor_shape.CopyFrom(tf.TensorShape(shape).as_proto())
        fill_typed(official, values)
        expected = tf.make_ndarray(official)
        assert same(codec.to_numpy(roundtrip(official, tensor_pb2.TensorProto)), expected)


def official_predict_request() -> predict_pb2.PredictRequest:
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "ctr"
    req.model_spec.version.value = 7
    req.model_spec.signature_name = "serving_default"
    req.inputs["user_id"].CopyFrom(tf.make_tensor_proto(np.array([1, 2], dtype=np.int64)))
    req.inputs["dense"].CopyFrom(tf.make_tensor_proto(np.ones((2, 3), dtype=np.float32)))
    req.output_filter.append("probability")
    return req


def test_predict_request_both_directions() -> None:
    official = official_predict_request()
    mine = roundtrip(official, my_predict_pb2.PredictRequest)
    assert mine.model_spec.version.value == 7
    assert sorted(mine.inputs) == ["dense", "user_id"]
    assert list(codec.to_numpy(mine.inputs["user_id"])) == [1, 2]
    assert roundtrip(mine, predict_pb2.PredictRequest) == official


def test_version_label_and_unknown_fields_survive() -> None:
    official = predict_pb2.PredictRequest()
    official.model_spec.name = "ctr"
    official.model_spec.version_label = "canary"
    official.client_id = b"abc"  # a field the project does not model
    mine = roundtrip(official, my_predict_pb2.PredictRequest)
    assert mine.model_spec.WhichOneof("version_choice") == "version_label"
    assert roundtrip(mine, predict_pb2.PredictRequest) == official


def test_predict_response_both_directions() -> None:
    mine = my_predict_pb2.PredictResponse()
    mine.model_spec.name = "ctr"
    mine.model_spec.version.value = 2
    mine.outputs["probability"].CopyFrom(codec.from_numpy(np.array([0.25, 0.5], np.float32)))
    official = roundtrip(mine, predict_pb2.PredictResponse)
    assert official.model_spec.version.value == 2
    assert list(tf.make_ndarray(official.outputs["probability"])) == [0.25, 0.5]
    assert roundtrip(official, my_predict_pb2.PredictResponse) == mine


def test_metadata_any_unpacks_with_official_classes() -> None:
    sig = metadata_pb2.SignatureDef(method_name="tensorflow/serving/predict")
    sig.inputs["x"].name = "serving_default_x:0"
    sig.inputs["x"].dtype = codec.DT_FLOAT
    sig.inputs["x"].tensor_shape.dim.add(size=-1)
    sigmap = metadata_pb2.SignatureDefMap()
    sigmap.signature_def["serving_default"].CopyFrom(sig)
    mine = metadata_pb2.GetModelMetadataResponse()
    mine.model_spec.name = "m"
    packed = any_pb2.Any(
        type_url="type.googleapis.com/tensorflow.serving.SignatureDefMap",
        value=sigmap.SerializeToString(),
    )
    mine.metadata["signature_def"].CopyFrom(packed)
    official = roundtrip(mine, get_model_metadata_pb2.GetModelMetadataResponse)
    unpacked = get_model_metadata_pb2.SignatureDefMap()
    assert official.metadata["signature_def"].Unpack(unpacked)
    info = unpacked.signature_def["serving_default"].inputs["x"]
    assert info.name == "serving_default_x:0" and info.dtype == tf.float32.as_datatype_enum
    assert roundtrip(official, metadata_pb2.GetModelMetadataResponse) == mine


def test_model_status_both_directions() -> None:
    official = get_model_status_pb2.GetModelStatusResponse()
    v = official.model_version_status.add(version=3)
    v.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
    v.status.error_code = 5
    v.status.error_message = "not found"
    mine = roundtrip(official, status_pb2.GetModelStatusResponse)
    assert mine.model_version_status[0].state == status_pb2.ModelVersionStatus.AVAILABLE
    assert mine.model_version_status[0].status.error_code == status_pb2.NOT_FOUND
    assert roundtrip(mine, get_model_status_pb2.GetModelStatusResponse) == official


@pytest.mark.parametrize("policy", ["latest", "all", "specific"])
def test_reload_config_both_directions(policy: str) -> None:
    official = model_management_pb2.ReloadConfigRequest()
    cfg = official.config.model_config_list.config.add(name="ctr", base_path="/models/ctr")
    cfg.model_platform = "tensorflow"
    if policy == "latest":
        cfg.model_version_policy.latest.num_versions = 2
    elif policy == "all":
        cfg.model_version_policy.all.SetInParent()
    else:
        cfg.model_version_policy.specific.versions.extend([1, 2])
    cfg.version_labels["stable"] = 1
    mine = roundtrip(official, config_pb2.ReloadConfigRequest)
    got = mine.config.model_config_list.config[0]
    assert got.model_version_policy.WhichOneof("policy_choice") == policy
    assert got.version_labels["stable"] == 1
    assert roundtrip(mine, model_management_pb2.ReloadConfigRequest) == official
    resp = config_pb2.ReloadConfigResponse()
    resp.status.error_code = status_pb2.INVALID_ARGUMENT
    resp.status.error_message = "bad"
    back = roundtrip(resp, model_management_pb2.ReloadConfigResponse)
    assert back.status.error_code == 3 and back.status.error_message == "bad"


def test_prediction_log_reads_official_warmup_record() -> None:
    official = prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=official_predict_request())
    )
    mine = roundtrip(official, my_log_pb2.PredictionLog)
    assert mine.WhichOneof("log_type") == "predict_log"
    assert mine.predict_log.request.model_spec.name == "ctr"
    classify = prediction_log_pb2.PredictionLog()
    classify.classify_log.request.model_spec.name = "ctr"
    assert roundtrip(classify, my_log_pb2.PredictionLog).WhichOneof("log_type") is None
