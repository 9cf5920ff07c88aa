"""Replay a version's warm-up requests before it serves.

TF Serving's convention: ``<version>/assets.extra/tf_serving_warmup_requests``
is a TFRecord file of PredictionLog records, at most 1000 of them.  Each
PredictLog request is run against the version being loaded (its model name
and version are ignored); any failure fails the load, so a version that
cannot answer its own warm-up never becomes AVAILABLE.  Warm-up runs the
executors real traffic will use, so the first real request pays no tracing.
"""

from __future__ import annotations

import struct
from pathlib import Path

from google.protobuf.message import DecodeError

from protos import prediction_log_pb2
from router.errors import FailedPrecondition, InvalidArgument
from router.wire.tensor import to_numpy
from workers.runtime import LoadedVersion

WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"
MAX_RECORDS = 1000


def check_framing(data: bytes, path: Path) -> int:
    """Count the records of a TFRecord file, refusing a truncated or garbled one.

    TF's reader verifies each record's CRC but treats a short tail as the end
    of the file; a warm-up file must be whole, so the framing is checked here.
    """
    offset = count = 0
    while offset < len(data):
        if len(data) - offset < 12:
            raise FailedPrecondition(f"warm-up file {path} ends in a truncated record header")
        length = struct.unpack_from("<Q", data, offset)[0]
        end = offset + 12 + length + 4
        if end > len(data):
            raise FailedPrecondition(f"warm-up file {path}: record {count} is truncated")
        offset = end
        count += 1
    return count


def read_records(path: Path) -> list[prediction_log_pb2.PredictionLog]:
    import tensorflow as tf

    if check_framing(path.read_bytes(), path) > MAX_RECORDS:
        raise FailedPrecondition(f"warm-up file {path} has more than {MAX_RECORDS} records")
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
