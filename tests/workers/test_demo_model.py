"""Tests of workers.demo_model: the exported SavedModels as TF Serving sees them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2 as tf_tensor_pb2
from tensorflow.core.framework import types_pb2 as tf_types_pb2
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

from protos import prediction_log_pb2
from workers import demo_model
from workers.demo_model import (
    ID_FEATURES,
    INPUT_NAMES,
    CtrWeights,
    build_tf1_model,
    build_version,
    ctr_weights,
    example_inputs,
    tf1_weights,
)

VOCAB = 1000  # small tables keep the module fixture fast
WARMUP_RECORDS = 5
MODEL_NAME = "ctr_test"
VERSIONS = (1, 2)

FLOAT = tf_types_pb2.DT_FLOAT
INT64 = tf_types_pb2.DT_INT64

# signature -> (inputs, outputs), each name -> (dtype, shape with -1 for unknown)
EXPECTED_SIGNATURES: dict[str, tuple[dict[str, tuple[int, list[int]]], dict[str, tuple[int, list[int]]]]] = {
    "serving_default": (
        {**{name: (INT64, [-1]) for name in ID_FEATURES}, "dense": (FLOAT, [-1, 20])},
        {"logit": (FLOAT, [-1]), "probability": (FLOAT, [-1])},
    ),
    "user_embedding": (
        {"user_id": (INT64, [-1])},
        {"embedding": (FLOAT, [-1, 16])},
    ),
    "score_pairs": (
        {"user_id": (INT64, [-1]), "item_id": (INT64, [-1])},
        {"scores": (FLOAT, [-1, -1]), "total": (FLOAT, [])},
    ),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "ctr"
    for version in VERSIONS:
        build_version(out, version, model_name=MODEL_NAME, vocab=VOCAB, warmup_records=WARMUP_RECORDS)
    return out


@pytest.fixture(scope="module")
def loaded(model_dir: Path) -> dict[int, Any]:
    return {version: tf.saved_model.load(str(model_dir / str(version))) for version in VERSIONS}


def _signature_defs(version_dir: Path) -> dict[str, meta_graph_pb2.SignatureDef]:
    # Read saved_model.pb directly: that is what TF Serving reports as metadata.
    saved_model = saved_model_pb2.SavedModel.FromString((version_dir / "saved_model.pb").read_bytes())
    (meta_graph,) = saved_model.meta_graphs
    assert list(meta_graph.meta_info_def.tags) == ["serve"]
    return dict(meta_graph.signature_def)


def _shape(info: meta_graph_pb2.TensorInfo) -> list[int]:
    assert not info.tensor_shape.unknown_rank
    return [dim.size for dim in info.tensor_shape.dim]


def _call(fn: Any, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    outputs = fn(**{name: tf.constant(value) for name, value in inputs.items()})
    return {name: tensor.numpy() for name, tensor in outputs.items()}


def _reference(weights: CtrWeights, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The CTR logit computed in numpy, independently of the TF graph."""
    vocab = weights.tables["user_id"].shape[0]
    # np.mod floors like tf.math.floormod, so negative ids wrap the same way.
    parts = [weights.tables[name][np.mod(inputs[name], vocab)] for name in ID_FEATURES]
    h = np.concatenate([*parts, inputs["dense"]], axis=1).astype(np.float64)
    for k, (kernel, bias) in enumerate(weights.layers):
        h = h @ kernel + bias
        if k < len(weights.layers) - 1:
            h = np.maximum(h, 0.0)
    return h[:, 0]


def _warmup_logs(version_dir: Path) -> list[prediction_log_pb2.PredictionLog]:
    path = version_dir / "assets.extra" / "tf_serving_warmup_requests"
    return [
        prediction_log_pb2.PredictionLog.FromString(record.numpy())
        for record in tf.data.TFRecordDataset(str(path))
    ]


# --- layout and metadata ---------------------------------------------------------


def test_version_dirs_are_the_only_entries(model_dir: Path) -> None:
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2"]
    for version in VERSIONS:
        assert (model_dir / str(version) / "saved_model.pb").is_file()
        assert (model_dir / str(version) / "variables" / "variables.index").is_file()


@pytest.mark.parametrize("version", VERSIONS)
def test_signature_defs(model_dir: Path, version: int) -> None:
    defs = _signature_defs(model_dir / str(version))
    # TF2 exports always add the init-op pseudo-signature; TF Serving lists it too.
    assert set(defs) == {*EXPECTED_SIGNATURES, "__saved_model_init_op"}
    for name, (inputs, outputs) in EXPECTED_SIGNATURES.items():
        sig = defs[name]
        assert sig.method_name == "tensorflow/serving/predict"
        assert {k: (v.dtype, _shape(v)) for k, v in sig.inputs.items()} == inputs, name
        assert {k: (v.dtype, _shape(v)) for k, v in sig.outputs.items()} == outputs, name


def test_serving_default_input_names_are_exact(model_dir: Path) -> None:
    sig = _signature_defs(model_dir / "1")["serving_default"]
    assert set(sig.inputs) == set(INPUT_NAMES) == {*ID_FEATURES, "dense"}
    assert set(sig.outputs) == {"logit", "probability"}


def test_loaded_signatures(loaded: dict[int, Any]) -> None:
    signatures = loaded[1].signatures
    assert set(signatures) == set(EXPECTED_SIGNATURES)
    for name, (inputs, outputs) in EXPECTED_SIGNATURES.items():
        fn = signatures[name]
        args, kwargs = fn.structured_input_signature
        assert args == ()
        assert set(kwargs) == set(inputs)
        for key, spec in kwargs.items():
            assert spec.dtype.as_datatype_enum == inputs[key][0]
            assert [-1 if d is None else d for d in spec.shape.as_list()] == inputs[key][1]
        assert set(fn.structured_outputs) == set(outputs)


# --- numerics ---------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_serving_default_matches_numpy_reference(loaded: dict[int, Any], version: int) -> None:
    inputs = example_inputs(16, seed=3, vocab=VOCAB)
    assert (inputs["user_id"] < 0).any() and (inputs["user_id"] >= VOCAB).any()
    out = _call(loaded[version].signatures["serving_default"], inputs)
    assert out["logit"].dtype == np.float32 and out["logit"].shape == (16,)
    assert out["probability"].dtype == np.float32 and out["probability"].shape == (16,)
    expected = _reference(ctr_weights(version, VOCAB), inputs)
    np.testing.assert_allclose(out["logit"], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["probability"], 1.0 / (1.0 + np.exp(-expected)), rtol=1e-4, atol=1e-6)


def test_rows_are_independent_of_batch_composition(loaded: dict[int, Any]) -> None:
    # The router will split coalesced batches by row; that is only valid if a
    # row's answer does not depend on its neighbours.
    fn = loaded[1].signatures["serving_default"]
    inputs = example_inputs(6, seed=11, vocab=VOCAB)
    whole = _call(fn, inputs)
    for row in range(6):
        single = _call(fn, {name: value[row : row + 1] for name, value in inputs.items()})
        np.testing.assert_allclose(single["probability"], whole["probability"][row : row + 1], rtol=1e-5)


def test_empty_batch(loaded: dict[int, Any]) -> None:
    out = _call(loaded[1].signatures["serving_default"], example_inputs(0, vocab=VOCAB))
    assert out["logit"].shape == (0,) and out["probability"].shape == (0,)


def test_versions_give_different_probabilities(loaded: dict[int, Any]) -> None:
    inputs = example_inputs(64, seed=0, vocab=VOCAB)
    p1 = _call(loaded[1].signatures["serving_default"], inputs)["probability"]
    p2 = _call(loaded[2].signatures["serving_default"], inputs)["probability"]
    assert np.all(np.abs(p2 - p1) > 1e-3)
    # Stronger and documented: a later version answers higher on every row.
    assert np.all(p2 > p1)


def test_versions_differ_at_default_vocab() -> None:
    # The served demo model uses the default vocab; check the property there
    # too, in numpy, without exporting a 100k-row model.
    inputs = example_inputs(512, seed=0)
    logit_1 = _reference(ctr_weights(1), inputs)
    logit_2 = _reference(ctr_weights(2), inputs)
    p1, p2 = 1 / (1 + np.exp(-logit_1)), 1 / (1 + np.exp(-logit_2))
    assert np.all(p2 - p1 > 1e-3)


def test_weights_are_deterministic() -> None:
    a, b = ctr_weights(3, vocab=50), ctr_weights(3, vocab=50)
    for name in ID_FEATURES:
        np.testing.assert_array_equal(a.tables[name], b.tables[name])
    for (ka, ba), (kb, bb) in zip(a.layers, b.layers):
        np.testing.assert_array_equal(ka, kb)
        np.testing.assert_array_equal(ba, bb)
    assert a.layers[-1][1].tolist() == pytest.approx([0.3])
    assert not np.array_equal(a.tables["user_id"], ctr_weights(4, vocab=50).tables["user_id"])


def test_user_embedding(loaded: dict[int, Any]) -> None:
    ids = np.array([0, 1, -1, VOCAB, 5 * VOCAB + 7, -(10**12)], dtype=np.int64)
    out = _call(loaded[2].signatures["user_embedding"], {"user_id": ids})
    table = ctr_weights(2, VOCAB).tables["user_id"]
    assert out["embedding"].dtype == np.float32 and out["embedding"].shape == (6, 16)
    np.testing.assert_array_equal(out["embedding"], table[np.mod(ids, VOCAB)])
    np.testing.assert_array_equal(out["embedding"][2], table[VOCAB - 1])


def test_user_embedding_differs_between_versions(loaded: dict[int, Any]) -> None:
    ids = {"user_id": np.arange(8, dtype=np.int64)}
    e1 = _call(loaded[1].signatures["user_embedding"], ids)["embedding"]
    e2 = _call(loaded[2].signatures["user_embedding"], ids)["embedding"]
    assert np.abs(e1 - e2).max() > 1e-3


def test_score_pairs(loaded: dict[int, Any]) -> None:
    users = np.array([3, -4, 2000], dtype=np.int64)
    items = np.array([1, 2, 3, 4, 99999], dtype=np.int64)
    out = _call(loaded[1].signatures["score_pairs"], {"user_id": users, "item_id": items})
    weights = ctr_weights(1, VOCAB)
    expected = weights.tables["user_id"][np.mod(users, VOCAB)] @ weights.tables["item_id"][np.mod(items, VOCAB)].T
    assert out["scores"].dtype == np.float32 and out["scores"].shape == (3, 5)
    assert out["total"].dtype == np.float32 and out["total"].shape == ()
    np.testing.assert_allclose(out["scores"], expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out["total"], expected.sum(), rtol=1e-4, atol=1e-6)


# --- warm-up file -------------------------------------------------------------------


def test_warmup_records(model_dir: Path) -> None:
    logs = _warmup_logs(model_dir / "1")
    assert len(logs) == WARMUP_RECORDS
    batch_sizes = []
    for log in logs:
        assert log.WhichOneof("log_type") == "predict_log"
        request = log.predict_log.request
        assert request.model_spec.name == MODEL_NAME
        assert request.model_spec.signature_name == "serving_default"
        assert set(request.inputs) == set(INPUT_NAMES)
        batch_sizes.append(request.inputs["user_id"].tensor_shape.dim[0].size)
    assert batch_sizes == list(range(1, WARMUP_RECORDS + 1))


@pytest.mark.parametrize("version", VERSIONS)
def test_warmup_requests_are_accepted(model_dir: Path, loaded: dict[int, Any], version: int) -> None:
    fn = loaded[version].signatures["serving_default"]
    for log in _warmup_logs(model_dir / str(version)):
        inputs = {
            # Our TensorProto is wire-compatible with TF's: re-parse and decode.
            name: tf.make_ndarray(tf_tensor_pb2.TensorProto.FromString(proto.SerializeToString()))
            for name, proto in log.predict_log.request.inputs.items()
        }
        batch = inputs["user_id"].shape[0]
        for name in ID_FEATURES:
            assert inputs[name].dtype == np.int64 and inputs[name].shape == (batch,)
        assert inputs["dense"].dtype == np.float32 and inputs["dense"].shape == (batch, 20)
        out = _call(fn, inputs)
        assert out["probability"].shape == (batch,)
        assert np.all((out["probability"] > 0) & (out["probability"] < 1))


def test_warmup_parses_with_official_tf_serving_protos(model_dir: Path) -> None:
    official = pytest.importorskip("tensorflow_serving.apis.prediction_log_pb2")
    path = model_dir / "1" / "assets.extra" / "tf_serving_warmup_requests"
    records = [record.numpy() for record in tf.data.TFRecordDataset(str(path))]
    assert len(records) == WARMUP_RECORDS
    for i, raw in enumerate(records):
        log = official.PredictionLog.FromString(raw)
        assert log.WhichOneof("log_type") == "predict_log"
        request = log.predict_log.request
        assert request.model_spec.name == MODEL_NAME
        assert request.model_spec.signature_name == "serving_default"
        assert set(request.inputs) == set(INPUT_NAMES)
        dense = tf.make_ndarray(request.inputs["dense"])
        assert dense.shape == (i + 1, 20) and dense.dtype == np.float32


def test_no_warmup_file_when_zero_records(tmp_path: Path) -> None:
    path = build_version(tmp_path, 1, vocab=10, warmup_records=0)
    assert not (path / "assets.extra").exists()


def test_warmup_records_bounds(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        build_version(tmp_path, 1, vocab=10, warmup_records=-1)
    with pytest.raises(ValueError):
        build_version(tmp_path, 1, vocab=10, warmup_records=1001)
    assert list(tmp_path.iterdir()) == []


# --- building ---------------------------------------------------------------------


def test_build_is_idempotent_unless_forced(tmp_path: Path) -> None:
    path = build_version(tmp_path, 7, vocab=10, warmup_records=1)
    pb = path / "saved_model.pb"
    first = pb.stat().st_ino
    assert build_version(tmp_path, 7, vocab=10, warmup_records=1) == path
    assert pb.stat().st_ino == first
    assert build_version(tmp_path, 7, vocab=10, warmup_records=1, force=True) == path
    assert pb.stat().st_ino != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["7"]


def test_incomplete_version_dir_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "junk").write_text("half-written")
    path = build_version(tmp_path, 3, vocab=10, warmup_records=0)
    assert (path / "saved_model.pb").is_file()
    assert not (path / "junk").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3"]


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = tf.saved_model.save

    def save_then_fail(obj: Any, export_dir: str, **kwargs: Any) -> None:
        real_save(obj, export_dir, **kwargs)
        raise RuntimeError("disk full")

    monkeypatch.setattr(tf.saved_model, "save", save_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        build_version(tmp_path, 1, vocab=10, warmup_records=0)
    assert list(tmp_path.iterdir()) == []


def test_negative_version_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        build_version(tmp_path, -1, vocab=10)


def test_example_inputs() -> None:
    a = example_inputs(200, seed=5, vocab=100)
    assert set(a) == set(INPUT_NAMES)
    for name in ID_FEATURES:
        assert a[name].dtype == np.int64 and a[name].shape == (200,)
        assert a[name].min() < 0 and a[name].max() >= 100
    assert a["dense"].dtype == np.float32 and a["dense"].shape == (200, 20)
    b = example_inputs(200, seed=5, vocab=100)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["user_id"], example_inputs(200, seed=6, vocab=100)["user_id"])


# --- TF1 model ----------------------------------------------------------------------


def test_tf1_model(tmp_path: Path) -> None:
    path = build_tf1_model(tmp_path / "tf1", 2)
    assert path == tmp_path / "tf1" / "2"
    assert tf.executing_eagerly(), "building the TF1 graph must not leave graph mode on"
    sig = _signature_defs(path)["serving_default"]
    assert {k: (v.dtype, _shape(v)) for k, v in sig.inputs.items()} == {"x": (FLOAT, [-1, 4])}
    assert {k: (v.dtype, _shape(v)) for k, v in sig.outputs.items()} == {"y": (FLOAT, [-1, 1])}

    loaded = tf.saved_model.load(str(path))
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    y = loaded.signatures["serving_default"](x=tf.constant(x))["y"].numpy()
    w, b = tf1_weights(2)
    assert y.shape == (5, 1) and y.dtype == np.float32
    np.testing.assert_allclose(y, x @ w + b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(tf1_weights(1)[0], w)


def test_tf1_model_is_idempotent(tmp_path: Path) -> None:
    path = build_tf1_model(tmp_path, 1)
    first = (path / "saved_model.pb").stat().st_ino
    assert build_tf1_model(tmp_path, 1) == path
    assert (path / "saved_model.pb").stat().st_ino == first
    assert sorted(os.listdir(tmp_path)) == ["1"]


# --- CLI ----------------------------------------------------------------------------


def test_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--out", str(tmp_path), "--versions", "1", "2", "--vocab", "10", "--warmup-records", "2"]
    assert demo_model.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "v1" in lines[0] and "v2" in lines[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]
    assert len(_warmup_logs(tmp_path / "1")) == 2

    assert demo_model.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("skipped" in line for line in lines)


def test_main_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        demo_model.main(["--out", str(tmp_path), "--versions", "1", "--vocab", "0"])
    with pytest.raises(SystemExit):
        demo_model.main(["--out", str(tmp_path), "--versions", "-1"])
