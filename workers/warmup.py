"""Replay a version's warm-up requests before it serves.

TF Serving's convention: ``<version>/assets.extra/tf_serving_warmup_requests``
is a TFRecord file of PredictionLog records, at most 1000 of them.  Each
PredictLog request is run against the version being loaded (its model name
and version are ignored); any failure fails the load, so a version that
cannot answer its own warm-up never becomes AVAILABLE.  Warm-up runs the
executors real traffic will use, so the first real request pays no tracing.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf.message import DecodeError

from protos import prediction_log_pb2
from shared.errors import FailedPrecondition, InvalidArgument
from shared.tensor import to_numpy
from shared.marks import WARMUP_FILE
from shared.tfrecord import split_records
from workers.runtime import LoadedVersion

MAX_RECORDS = 1000


def read_records(path: Path) -> list[prediction_log_pb2.PredictionLog]:
    import tensorflow as tf

    # The framing first (TF's reader takes a short tail for the end of the file), then TF's
    # reader for the CRCs.
    split_records(path.read_bytes(), path, MAX_RECORDS)
    logs = []
    try:
        for raw in tf.data.TFRecordDataset(str(path)):
            logs.append(prediction_log_pb2.PredictionLog.FromString(raw.numpy()))
    except DecodeError as exc:
        raise FailedPrecondition(f"warm-up file {path} holds a record that is not a PredictionLog") from exc
    except tf.errors.OpError as exc:
        raise FailedPrecondition(f"warm-up file {path} is not a valid TFRecord file: {exc.message}") from exc
    return logs


def replay(loaded: LoadedVersion) -> int:
    """Run every warm-up record against ``loaded``; returns how many ran."""
    path = loaded.path / WARMUP_FILE
    if not path.exists():
        return 0
    logs = read_records(path)
    for i, log in enumerate(logs):
        if log.WhichOneof("log_type") != "predict_log":
            raise FailedPrecondition(
                f"warm-up record {i} of {path} is not a PredictLog; only Predict warm-up is supported"
            )
        request = log.predict_log.request
        try:
            sig = loaded.signature(request.model_spec.signature_name)
            names, outputs = sig.validate(request.inputs, request.output_filter)
            loaded.execute(sig, names, outputs, {n: to_numpy(request.inputs[n]) for n in names})
        except InvalidArgument as exc:
            raise FailedPrecondition(f"warm-up record {i} failed: {exc.message}") from exc
    return len(logs)
