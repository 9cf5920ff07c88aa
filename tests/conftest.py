"""Session fixtures: demo SavedModels built once per test run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import TEST_VOCAB

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<root>/ctr/{1,2}`` (demo CTR model) and ``<root>/tf1/1`` (a TF1-style export)."""
    from workers.demo_model import build_tf1_model, build_version

    root = tmp_path_factory.mktemp("models")
    for version in (1, 2):
        build_version(root / "ctr", version, vocab=TEST_VOCAB)
    build_tf1_model(root / "tf1", 1)
    return root


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("logs")


def build_strings_model(path: Path) -> None:
    """A tiny model with a string input and a ``*_bytes`` output, for REST b64 tests."""
    import tensorflow as tf

    class Strings(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
        def serve(self, text: tf.Tensor) -> dict[str, tf.Tensor]:
            return {
                "length": tf.cast(tf.strings.length(text), tf.int64),
                "upper_bytes": tf.strings.upper(text),
            }

    module = Strings()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})


@pytest.fixture(scope="session")
def strings_model(model_root: Path) -> Path:
    base = model_root / "strings"
    build_strings_model(base / "1")
    return base


def build_checked_model(path: Path) -> None:
    """y = 2x, but any NaN in x fails the call with INVALID_ARGUMENT (one bad request)."""
    import tensorflow as tf

    class Checked(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def serve(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"y": tf.debugging.check_numerics(x, "x holds NaN or Inf") * 2.0}

    module = Checked()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})


@pytest.fixture(scope="session")
def checked_model(model_root: Path) -> Path:
    base = model_root / "checked"
    build_checked_model(base / "1")
    return base


def build_nan_version(out_dir: Path, version: int) -> Path:
    """A CTR version with the demo model's signatures whose every answer is NaN (its warm-up must fail)."""
    import dataclasses

    import numpy as np
    import tensorflow as tf

    from workers import demo_model as dm

    weights = dm.ctr_weights(version, TEST_VOCAB)
    *hidden, (kernel, bias) = weights.layers
    poisoned = dataclasses.replace(weights, layers=[*hidden, (kernel, np.full_like(bias, np.nan))])
    module = dm.CtrModule(poisoned)
    target = out_dir / str(version)
    tf.saved_model.save(module, str(target), signatures={
        dm.SERVING_DEFAULT: module.serve.get_concrete_function(),
        dm.USER_EMBEDDING: module.user_embedding.get_concrete_function(),
        dm.SCORE_PAIRS: module.score_pairs.get_concrete_function(),
    })
    return target


@pytest.fixture(scope="session")
def nan_model(model_root: Path) -> Path:
    """``<root>/nan/3``: answers NaN for every request."""
    build_nan_version(model_root / "nan", 3)
    return model_root / "nan" / "3"


def build_slow_version(out_dir: Path, version: int, matmuls: int = 60) -> Path:
    """A CTR version with the demo model's signatures and answers, several times slower per call:
    each call also multiplies a 384x384 matrix ``matmuls`` times (made from its input, so nothing folds it)."""
    import tensorflow as tf

    from workers import demo_model as dm

    inner = dm.CtrModule(dm.ctr_weights(version, TEST_VOCAB))

    class Slow(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="slow")
            self.inner = inner

        @tf.function(input_signature=inner.serve.input_signature)
        def serve(self, user_id: tf.Tensor, item_id: tf.Tensor, category: tf.Tensor, city: tf.Tensor,
                  device: tf.Tensor, dense: tf.Tensor) -> dict[str, tf.Tensor]:
            out = self.inner.serve(user_id, item_id, category, city, device, dense)
            m = tf.fill([384, 384], 1e-3 + 0.0 * tf.reduce_sum(dense))
            m = tf.while_loop(lambda i, x: i < matmuls, lambda i, x: (i + 1, tf.tanh(tf.matmul(x, x))),
                              [tf.constant(0), m])[1]
            tiny = 1e-30 * tf.reduce_sum(m)
            return {"logit": out["logit"] + tiny, "probability": out["probability"] + tiny}

    module = Slow()
    target = out_dir / str(version)
    tf.saved_model.save(module, str(target), signatures={
        dm.SERVING_DEFAULT: module.serve.get_concrete_function(),
        dm.USER_EMBEDDING: inner.user_embedding.get_concrete_function(),
        dm.SCORE_PAIRS: inner.score_pairs.get_concrete_function(),
    })
    return target


@pytest.fixture(scope="session")
def slow_model(model_root: Path) -> Path:
    """``<root>/slow/2``: version 2's answers, several times slower."""
    build_slow_version(model_root / "slow", 2)
    return model_root / "slow" / "2"
