"""Builder for the demo models served behind tfs-router.

The main product is a small click-through-rate (CTR) model exported as TF2
SavedModels in TF Serving's layout, ``<out>/<version>/saved_model.pb``::

    python -m workers.demo_model --out models/ctr --versions 1 2

Each version has three signatures:

``serving_default`` (batchable)
    inputs  ``user_id``, ``item_id``, ``category``, ``city``, ``device``
            int64 ``[batch]`` and ``dense`` float32 ``[batch, 20]``;
    outputs ``logit`` and ``probability`` float32 ``[batch]``.
``user_embedding`` (batchable)
    input ``user_id`` int64 ``[batch]``; output ``embedding`` float32
    ``[batch, 16]``.
``score_pairs`` (not batchable)
    inputs ``user_id`` int64 ``[n]`` and ``item_id`` int64 ``[m]``; outputs
    ``scores`` float32 ``[n, m]`` and ``total`` float32 ``[]``.

Ids are mapped into each embedding table with ``floormod(id, vocab)``, so any
int64 id (negative ones included) is valid.  Weights are a pure function of
the version number (shared base weights plus a small version-seeded
perturbation, and an output bias of ``0.1 * version``), so tests can tell
which version answered: each row's probability is about 0.03 higher in
version ``v + 1`` than in version ``v``.  Every version carries a warm-up file,
``assets.extra/tf_serving_warmup_requests``, written with tfs-router's own
wire-compatible protos.

``build_tf1_model`` additionally exports a tiny TF1-style (graph + Builder)
SavedModel, ``y = x @ W + b``, to exercise workers with legacy exports.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import tensorflow as tf

from protos import prediction_log_pb2, tensor_pb2, types_pb2
from shared.marks import WARMUP_FILE

ID_FEATURES: tuple[str, ...] = ("user_id", "item_id", "category", "city", "device")
DENSE_FEATURE = "dense"
INPUT_NAMES: tuple[str, ...] = (*ID_FEATURES, DENSE_FEATURE)
DENSE_DIM = 20
EMBED_DIM = 16
HIDDEN_UNITS: tuple[int, ...] = (256, 128)
DEFAULT_VOCAB = 100_000
DEFAULT_MODEL_NAME = "ctr"
DEFAULT_WARMUP_RECORDS = 8
# TF Serving refuses warm-up files with more records than this.
MAX_WARMUP_RECORDS = 1000
TF1_INPUT_DIM = 4

SERVING_DEFAULT = "serving_default"
USER_EMBEDDING = "user_embedding"
SCORE_PAIRS = "score_pairs"

# A version's own streams are seeded with version * 7919.  SeedSequence
# already decorrelates adjacent seeds; the multiplier keeps version seeds
# visibly apart from _BASE_SEED.
_SEED_MULTIPLIER = 7919
# Seed of the weights all versions share; not a multiple of _SEED_MULTIPLIER,
# so it is never a version's own seed.
_BASE_SEED = 1
# Relative size of a version's own perturbation of the shared weights.  With
# fully independent weights per version, 0.4% of random rows had
# |p_v1 - p_v2| < 1e-3 (the random differences cancel the bias step); at 2%
# the 0.1 logit step per version dominates: over 200k random rows v2 was
# always above v1, by 0.013 at least (0.028 on average).
_VERSION_PERTURBATION = 0.02

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class CtrWeights:
    """All parameters of one CTR model version, as numpy arrays."""

    tables: Mapping[str, FloatArray]  # id feature -> [vocab, EMBED_DIM]
    layers: Sequence[tuple[FloatArray, FloatArray]]  # (kernel, bias), input to output


def _rngs(seed: int, count: int) -> list[np.random.Generator]:
    # One independent stream per tensor, so changing the vocab size (the shape
    # of the tables) leaves every other tensor unchanged.
    seq = np.random.SeedSequence(seed)
    return [np.random.default_rng(child) for child in seq.spawn(count)]


def _glorot(rng: np.random.Generator, fan_in: int, fan_out: int) -> np.ndarray:
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=(fan_in, fan_out))


def _check_version(version: int) -> None:
    # TF Serving only treats non-negative integer directory names as versions.
    if version < 0:
        raise ValueError(f"version must be >= 0, got {version}")


def ctr_weights(version: int, vocab: int = DEFAULT_VOCAB) -> CtrWeights:
    """The deterministic weights of CTR model ``version``.

    Every tensor is a shared base plus a small perturbation seeded by the
    version, and the output bias is ``0.1 * version``: versions are like
    successive retrainings of one model, and every row's probability rises
    by roughly 0.03 from one version to the next.
    """
    _check_version(version)
    if vocab < 1:
        raise ValueError(f"vocab must be >= 1, got {vocab}")
    widths = [len(ID_FEATURES) * EMBED_DIM + DENSE_DIM, *HIDDEN_UNITS, 1]
    n_layers = len(widths) - 1
    n_tensors = len(ID_FEATURES) + 2 * n_layers
    base_rngs = _rngs(_BASE_SEED, n_tensors)
    own_rngs = _rngs(version * _SEED_MULTIPLIER, n_tensors)

    def mix(base: np.ndarray, own: np.ndarray) -> FloatArray:
        return (base + _VERSION_PERTURBATION * own).astype(np.float32)

    table_shape = (vocab, EMBED_DIM)
    tables = {
        name: mix(
            base_rngs[i].standard_normal(table_shape) * 0.05,
            own_rngs[i].standard_normal(table_shape) * 0.05,
        )
        for i, name in enumerate(ID_FEATURES)
    }
    layers: list[tuple[FloatArray, FloatArray]] = []
    for k, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        i = len(ID_FEATURES) + 2 * k
        kernel = mix(_glorot(base_rngs[i], fan_in, fan_out), _glorot(own_rngs[i], fan_in, fan_out))
        if k == n_layers - 1:
            bias = np.full((fan_out,), 0.1 * version, dtype=np.float32)
        else:
            bias = mix(
                base_rngs[i + 1].standard_normal(fan_out) * 0.01,
                own_rngs[i + 1].standard_normal(fan_out) * 0.01,
            )
        layers.append((kernel, bias))
    return CtrWeights(tables=tables, layers=layers)


def tf1_weights(version: int) -> tuple[FloatArray, FloatArray]:
    """``(W [4, 1], b [1])`` of the TF1 demo model ``version``."""
    _check_version(version)
    w_rng, b_rng = _rngs(version * _SEED_MULTIPLIER, 2)
    w = w_rng.standard_normal((TF1_INPUT_DIM, 1)).astype(np.float32)
    b = (b_rng.standard_normal(1) + version).astype(np.float32)
    return w, b


def example_inputs(batch: int, seed: int = 0, vocab: int = DEFAULT_VOCAB) -> dict[str, np.ndarray]:
    """Random ``serving_default`` inputs for ``batch`` rows.

    Ids are drawn from ``[-vocab, 4 * vocab)`` so that both negative ids and
    ids beyond the table size (i.e. the ``floormod`` wrap-around) are exercised.
    """
    if batch < 0:
        raise ValueError(f"batch must be >= 0, got {batch}")
    rng = np.random.default_rng(seed)
    inputs: dict[str, np.ndarray] = {
        name: rng.integers(-vocab, 4 * vocab, size=batch, dtype=np.int64) for name in ID_FEATURES
    }
    inputs[DENSE_FEATURE] = rng.standard_normal((batch, DENSE_DIM)).astype(np.float32)
    return inputs


def _id_spec(name: str) -> tf.TensorSpec:
    return tf.TensorSpec(shape=[None], dtype=tf.int64, name=name)


class CtrModule(tf.Module):
    """The CTR model as a plain ``tf.Module`` (no Keras: faster to build and save)."""

    def __init__(self, weights: CtrWeights) -> None:
        super().__init__(name="ctr")
        self.vocab = int(next(iter(weights.tables.values())).shape[0])
        self.tables = {
            name: tf.Variable(weights.tables[name], trainable=False, name=f"{name}_embedding")
            for name in ID_FEATURES
        }
        self.kernels = [
            tf.Variable(kernel, trainable=False, name=f"dense_{k}_kernel")
            for k, (kernel, _) in enumerate(weights.layers)
        ]
        self.biases = [
            tf.Variable(bias, trainable=False, name=f"dense_{k}_bias")
            for k, (_, bias) in enumerate(weights.layers)
        ]

    def _lookup(self, feature: str, ids: tf.Tensor) -> tf.Tensor:
        rows = tf.math.floormod(ids, tf.constant(self.vocab, dtype=tf.int64))
        return tf.gather(self.tables[feature], rows)

    @tf.function(
        input_signature=[
            *(_id_spec(name) for name in ID_FEATURES),
            tf.TensorSpec(shape=[None, DENSE_DIM], dtype=tf.float32, name=DENSE_FEATURE),
        ]
    )
    def serve(
        self,
        user_id: tf.Tensor,
        item_id: tf.Tensor,
        category: tf.Tensor,
        city: tf.Tensor,
        device: tf.Tensor,
        dense: tf.Tensor,
    ) -> dict[str, tf.Tensor]:
        """``serving_default``: the click logit and probability of each row."""
        ids = (user_id, item_id, category, city, device)
        parts = [self._lookup(name, t) for name, t in zip(ID_FEATURES, ids)]
        h = tf.concat([*parts, dense], axis=1)
        last = len(self.kernels) - 1
        for k, (kernel, bias) in enumerate(zip(self.kernels, self.biases)):
            h = tf.matmul(h, kernel) + bias
            if k < last:
                h = tf.nn.relu(h)
        # squeeze (not reshape) keeps the static shape [None] in the signature.
        logit = tf.squeeze(h, axis=1)
        return {"logit": logit, "probability": tf.sigmoid(logit)}

    @tf.function(input_signature=[_id_spec("user_id")])
    def user_embedding(self, user_id: tf.Tensor) -> dict[str, tf.Tensor]:
        """``user_embedding``: the user table row of each id."""
        return {"embedding": self._lookup("user_id", user_id)}

    @tf.function(input_signature=[_id_spec("user_id"), _id_spec("item_id")])
    def score_pairs(self, user_id: tf.Tensor, item_id: tf.Tensor) -> dict[str, tf.Tensor]:
        """``score_pairs``: dot products of every user with every item.

        Deliberately NOT batchable: ``scores`` is ``[n_users, n_items]``, its two
        dimensions driven by different inputs, so concatenating two requests
        along dim 0 would not give the concatenation of their answers; and
        ``total`` is a scalar with no batch dimension at all, which is what
        marks the signature as non-batchable from its metadata alone.
        """
        users = self._lookup("user_id", user_id)
        items = self._lookup("item_id", item_id)
        scores = tf.matmul(users, items, transpose_b=True)
        return {"scores": scores, "total": tf.reduce_sum(scores)}


def _tensor_proto(array: np.ndarray) -> tensor_pb2.TensorProto:
    dtypes = {
        np.dtype(np.float32): types_pb2.DT_FLOAT,
        np.dtype(np.int64): types_pb2.DT_INT64,
    }
    proto = tensor_pb2.TensorProto(dtype=dtypes[array.dtype])
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    # tensor_content is little-endian raw bytes on every platform TF supports.
    proto.tensor_content = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return proto


def warmup_logs(
    n_records: int, *, model_name: str = DEFAULT_MODEL_NAME, vocab: int = DEFAULT_VOCAB
) -> list[prediction_log_pb2.PredictionLog]:
    """The warm-up ``PredictionLog``s: record ``i`` has batch size ``i + 1``.

    Varying the batch size makes TF Serving exercise (and cache) more than one
    shape of the graph before the version takes traffic.
    """
    logs: list[prediction_log_pb2.PredictionLog] = []
    for i in range(n_records):
        log = prediction_log_pb2.PredictionLog()
        request = log.predict_log.request
        request.model_spec.name = model_name
        request.model_spec.signature_name = SERVING_DEFAULT
        for name, array in example_inputs(i + 1, seed=i, vocab=vocab).items():
            request.inputs[name].CopyFrom(_tensor_proto(array))
        logs.append(log)
    return logs


def _write_warmup(version_dir: Path, logs: Sequence[prediction_log_pb2.PredictionLog]) -> None:
    path = version_dir / WARMUP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for log in logs:
            writer.write(log.SerializeToString())


def _is_built(version_dir: Path) -> bool:
    return (version_dir / "saved_model.pb").is_file()


def _build_atomically(
    out_dir: Path, version: int, force: bool, write: Callable[[Path], None]
) -> Path:
    """Run ``write(staging_dir)`` and rename the result to ``out_dir/<version>``.

    TF Serving polls the base directory and loads any integer-named child as
    soon as it appears, so a version must never be visible half-written.  The
    staging name starts with a dot and is not an integer, so it is ignored.
    """
    _check_version(version)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / str(version)
    if _is_built(final) and not force:
        return final
    staging = out_dir / f".{version}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write(staging)
        try:
            staging.rename(final)
            return final
        except OSError:
            if not final.exists():
                raise
        # The target exists: a leftover without saved_model.pb, a forced
        # rebuild, or a concurrent builder that won the race.
        if _is_built(final) and not force:
            shutil.rmtree(staging)
            return final
        # rename() cannot replace a non-empty directory: move the old one aside.
        old = out_dir / f".{version}.old-{uuid.uuid4().hex[:8]}"
        final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        return final
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def build_version(
    out_dir: Path,
    version: int,
    *,
    model_name: str = DEFAULT_MODEL_NAME,
    vocab: int = DEFAULT_VOCAB,
    warmup_records: int = DEFAULT_WARMUP_RECORDS,
    force: bool = False,
) -> Path:
    """Export CTR model ``version`` to ``out_dir/<version>`` and return that path.

    Does nothing if the version already has a ``saved_model.pb``, unless
    ``force``.  ``warmup_records=0`` writes no warm-up file.
    """
    if not 0 <= warmup_records <= MAX_WARMUP_RECORDS:
        raise ValueError(f"warmup_records must be in [0, {MAX_WARMUP_RECORDS}], got {warmup_records}")
    out_dir = Path(out_dir)

    def write(staging: Path) -> None:
        module = CtrModule(ctr_weights(version, vocab))
        signatures = {
            SERVING_DEFAULT: module.serve.get_concrete_function(),
            USER_EMBEDDING: module.user_embedding.get_concrete_function(),
            SCORE_PAIRS: module.score_pairs.get_concrete_function(),
        }
        tf.saved_model.save(module, str(staging), signatures=signatures)
        if warmup_records:
            _write_warmup(staging, warmup_logs(warmup_records, model_name=model_name, vocab=vocab))

    return _build_atomically(out_dir, version, force, write)


def build_tf1_model(out_dir: Path, version: int, *, force: bool = False) -> Path:
    """Export the TF1-style model ``y = x @ W + b`` to ``out_dir/<version>``.

    ``x`` is float32 ``[None, 4]`` and ``y`` float32 ``[None, 1]``; ``W`` and
    ``b`` are ``tf1_weights(version)``.  Same skip/``force`` rule as
    ``build_version``.
    """
    w, b = tf1_weights(version)

    def write(staging: Path) -> None:
        # A private graph keeps the caller's eager context untouched.
        graph = tf.Graph()
        with graph.as_default():
            x = tf.compat.v1.placeholder(tf.float32, shape=[None, TF1_INPUT_DIM], name="x")
            w_var = tf.compat.v1.Variable(w, name="W")
            b_var = tf.compat.v1.Variable(b, name="b")
            y = tf.identity(tf.matmul(x, w_var) + b_var, name="y")
            signature = tf.compat.v1.saved_model.predict_signature_def(inputs={"x": x}, outputs={"y": y})
            with tf.compat.v1.Session(graph=graph) as session:
                session.run(tf.compat.v1.global_variables_initializer())
                # Builder refuses an existing directory, so it creates staging itself.
                builder = tf.compat.v1.saved_model.Builder(str(staging))
                builder.add_meta_graph_and_variables(
                    session,
                    [tf.saved_model.SERVING],
                    signature_def_map={SERVING_DEFAULT: signature},
                    strip_default_attrs=True,
                )
                builder.save()

    return _build_atomically(Path(out_dir), version, force, write)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m workers.demo_model",
        description="Build the demo CTR model as TF Serving SavedModel versions.",
    )
    parser.add_argument("--out", type=Path, required=True, help="model base directory, e.g. models/ctr")
    parser.add_argument("--versions", type=int, nargs="+", default=[1], help="versions to build (default: 1)")
    parser.add_argument("--vocab", type=int, default=DEFAULT_VOCAB, help="rows per embedding table")
    parser.add_argument(
        "--warmup-records",
        type=int,
        default=DEFAULT_WARMUP_RECORDS,
        help="warm-up requests per version (0: no warm-up file)",
    )
    parser.add_argument("--model-name", default=DEFAULT_MODEL_NAME, help="model name in the warm-up requests")
    parser.add_argument("--force", action="store_true", help="rebuild versions that already exist")
    args = parser.parse_args(argv)
    if args.vocab < 1:
        parser.error("--vocab must be >= 1")
    if any(v < 0 for v in args.versions):
        parser.error("--versions must be >= 0")
    if not 0 <= args.warmup_records <= MAX_WARMUP_RECORDS:
        parser.error(f"--warmup-records must be in [0, {MAX_WARMUP_RECORDS}]")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; prints one line per version."""
    args = _parse_args(argv)
    for version in args.versions:
        started = time.monotonic()
        existed = _is_built(args.out / str(version)) and not args.force
        path = build_version(
            args.out,
            version,
            model_name=args.model_name,
            vocab=args.vocab,
            warmup_records=args.warmup_records,
            force=args.force,
        )
        if existed:
            print(f"{args.model_name} v{version}: exists, skipped ({path})", flush=True)
        else:
            elapsed = time.monotonic() - started
            print(f"{args.model_name} v{version}: built {path} in {elapsed:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
