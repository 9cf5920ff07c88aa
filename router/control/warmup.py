"""Warm a freshly loaded version on a worker before it rejoins the rotation.

The requests come from the version's own warm-up file
(``assets.extra/tf_serving_warmup_requests``, TF Serving's convention: a
TFRecord of PredictionLog), or, where it has none, are synthesized from its
signatures at the batch sizes the batcher actually sends: 1, 2, 4, ... up to
``max_batch_size`` (or exactly ``allowed_batch_sizes`` when batches are
padded to those).  They go straight to the worker, which is out of rotation,
marked as warm-up (the project's worker runs them on its idle-priority load
thread), in rounds until the time a round takes stops falling, or the budget
runs out.  An error, or a non-finite value in a floating-point output, fails
the warm-up: a version that cannot answer its own warm-up never serves.

``warmup_requests`` and ``Settling`` are pure; ``warm`` does the calls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from shared.errors import FailedPrecondition, ServingError
from shared.signature import PREDICT_METHOD, Signature
from shared.tensor import DT_STRING, NUMPY_DTYPE, dtype_name, fill, to_numpy
from shared.marks import WARMUP_FILE
from shared.tfrecord import split_records
from protos import predict_pb2, prediction_log_pb2
from router.config import BatchingConfig
from router.transport import Transport

log = logging.getLogger("router.control.warmup")

MAX_RECORDS = 1000  # TF Serving's limit
SETTLED_RATIO = 1.15  # a round within this factor of the best one so far counts as settled
MIN_ROUNDS = 2


class WarmupFailed(ServingError):
    """The version answered its warm-up with an error or a non-finite value."""

    code = FailedPrecondition.code


def batch_sizes(settings: BatchingConfig) -> tuple[int, ...]:
    """The row counts batches of this model reach a worker with."""
    if not settings.enabled:
        return (1,)
    if settings.allowed_batch_sizes:
        return tuple(settings.allowed_batch_sizes)
    sizes = []
    size = 1
    while size < settings.max_batch_size:
        sizes.append(size)
        size *= 2
    sizes.append(settings.max_batch_size)
    return tuple(sizes)


def read_warmup_file(version_dir: Path) -> list[predict_pb2.PredictRequest] | None:
    """The Predict requests of the version's warm-up file; None when it has none."""
    path = version_dir / WARMUP_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise FailedPrecondition(f"cannot read warm-up file {path}: {exc}") from exc
    requests = []
    for i, record in enumerate(split_records(data, path, MAX_RECORDS)):
        try:
            entry = prediction_log_pb2.PredictionLog.FromString(record)
        except DecodeError as exc:
            raise FailedPrecondition(f"warm-up record {i} of {path} is not a PredictionLog") from exc
        if entry.WhichOneof("log_type") != "predict_log":
            raise FailedPrecondition(f"warm-up record {i} of {path} is not a PredictLog")
        requests.append(entry.predict_log.request)
    return requests


def synthesized(signatures: dict[str, Signature], sizes: Sequence[int]) -> list[predict_pb2.PredictRequest]:
    """Zero-valued requests for every Predict signature, one per batch size (batchable ones)."""
    requests = []
    for name, sig in sorted(signatures.items()):
        if sig.method_name != PREDICT_METHOD or not sig.inputs:
            continue
        for rows in sizes if sig.batchable else (1,):
            request = predict_pb2.PredictRequest()
            request.model_spec.signature_name = name
            for input_name, spec in sig.inputs.items():
                if spec.shape is None:
                    shape: tuple[int, ...] = (rows,)
                else:
                    shape = tuple(rows if i == 0 and d is None else (1 if d is None else d)
                                  for i, d in enumerate(spec.shape))
                fill(request.inputs[input_name], _zeros(spec.dtype, shape), spec.dtype)
            requests.append(request)
    return requests


def _zeros(dtype: int, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    if dtype == DT_STRING:
        return np.full(shape, b"", dtype=object)
    np_dtype = NUMPY_DTYPE.get(dtype)
    if np_dtype is None:
        raise FailedPrecondition(f"cannot synthesize a warm-up input of dtype {dtype_name(dtype)}")
    return np.zeros(shape, dtype=np_dtype)


def warmup_requests(model: str, version: int, version_dir: Path, signatures: dict[str, Signature],
                    settings: BatchingConfig) -> tuple[str, list[predict_pb2.PredictRequest]]:
    """(where they came from, the requests), each aimed at exactly ``model`` ``version``."""
    requests = read_warmup_file(version_dir)
    source = "warm-up file"
    if not requests:
        requests = synthesized(signatures, batch_sizes(settings))
        source = "signatures"
    for request in requests:
        request.model_spec.name = model
        request.model_spec.version.value = version
    return source, requests


def check_finite(response: predict_pb2.PredictResponse, what: str) -> None:
    for name, tensor in response.outputs.items():
        values = to_numpy(tensor)
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            raise WarmupFailed(f"{what} answered a non-finite value in output '{name}'")


@dataclass
class Settling:
    """When to stop: the time a round takes has stopped falling (pure)."""

    max_rounds: int
    rounds: list[float] = field(default_factory=list)

    def add(self, seconds: float) -> None:
        self.rounds.append(seconds)

    @property
    def settled(self) -> bool:
        if len(self.rounds) < MIN_ROUNDS:
            return False
        return self.rounds[-1] <= SETTLED_RATIO * min(self.rounds[:-1])

    @property
    def done(self) -> bool:
        return self.settled or len(self.rounds) >= self.max_rounds


@dataclass(frozen=True)
class WarmReport:
    source: str
    requests: int
    rounds: tuple[float, ...]  # seconds per round
    settled: bool


async def warm(transport: Transport, requests: Iterable[predict_pb2.PredictRequest], *, source: str,
               budget_s: float, max_rounds: int, rpc_timeout: float = 60.0, pace: str | None = None,
               clock: Callable[[], float] = time.monotonic) -> WarmReport:
    """Send the requests in rounds until round times settle or ``budget_s`` is spent (``pace``: see sync.hold)."""
    batch = list(requests)
    settling = Settling(max_rounds)
    end = clock() + budget_s
    sent = 0
    while batch and not settling.done and clock() < end:
        start = clock()
        for request in batch:
            spec = request.model_spec
            what = f"version {spec.version.value} of {spec.name} (warm-up request {sent % len(batch)}"
            what += f" from its {source})"
            try:
                response = await transport.warmup(request, rpc_timeout, pace=pace)
            except ServingError as exc:
                raise WarmupFailed(f"{what} failed: {exc.message}") from exc
            check_finite(response, what)
            sent += 1
        settling.add(clock() - start)
    return WarmReport(source, sent, tuple(settling.rounds), settling.settled)
