"""Request logging in TF Serving's own format (tensorflow/serving#408: "No request-logger-creator provided").

A model's ``logging_config`` in ``models.config`` (TF Serving's
``LoggingConfig``: ``sampling_config.sampling_rate``,
``log_collector_config.filename_prefix``; ``type`` empty or ``tfrecord``) or
``models[].logging`` in YAML turns it on.  A sampled request and its
response become one ``PredictionLog`` record (``log_metadata``: the model, the
version that answered, the signature, the sampling rate; ``predict_log``: the
request as sent, with the version it got, and the response) in TFRecord files
named ``PREFIX.UNIXMS.PID.tfrecord`` (the same framing as warm-up files:
``tf.data.TFRecordDataset`` and the official ``prediction_log_pb2`` read
them).  A file is closed and the next one opened past ``max_file_bytes`` or
``max_file_age_s``; the oldest files of the prefix are deleted while they
hold more than ``max_total_bytes`` together.

Nothing here is on the request's path but a random draw and a ``put_nowait``:
a background thread serializes and writes.  A full queue (a slow disk) or a
failed write drops the record, counted in
``tfs_router_request_log_dropped_total{model,reason}``; a request is never
delayed or failed by its log.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from protos import predict_pb2, prediction_log_pb2
from router.config import ModelConfig, RequestLogConfig
from shared.tfrecord import frame

if TYPE_CHECKING:
    from router.dataplane import DataPlane
    from router.metrics import Metrics

log = logging.getLogger("router.reqlog")

SUFFIX = ".tfrecord"
STALL_ENV = "TFS_ROUTER_TEST_LOG_STALL"  # tests: seconds the writer sleeps before each record (a slow disk)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (a message or bytes): its key, its length, the payload."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


class RequestLog:
    """One model's collector."""

    def __init__(self, model: str, cfg: RequestLogConfig, *, on_dropped: Callable[[str, str], None],
                 on_written: Callable[[str], None], rng: random.Random | None = None) -> None:
        self.model = model
        self.cfg = cfg
        self.prefix = Path(cfg.filename_prefix)
        self._on_dropped = on_dropped
        self._on_written = on_written
        self._rng = rng or random.Random()
        self._queue: queue.Queue[tuple[predict_pb2.PredictRequest, predict_pb2.PredictResponse, int] | None] = \
            queue.Queue(maxsize=cfg.max_queued)
        self._file: BinaryIO | None = None
        self._path: Path | None = None
        self._opened = 0.0
        self._written = 0
        self._last_error = 0.0
        self._stall = float(os.environ.get(STALL_ENV, "0") or 0)
        self._meta: dict[tuple[int, str], bytes] = {}  # (version, signature) -> log_metadata, encoded
        self._thread = threading.Thread(target=self._run, name=f"request-log-{model}", daemon=True)
        self._thread.start()

    def offer(self, request: predict_pb2.PredictRequest, response: predict_pb2.PredictResponse,
              version: int) -> None:
        """On the event loop, after the answer: sample, and hand over (never blocks)."""
        if self._rng.random() >= self.cfg.sampling_rate:
            return
        try:
            self._queue.put_nowait((request, response, version))
        except queue.Full:
            self._on_dropped(self.model, "queue_full")

    # -- the writer thread -----------------------------------------------------------------

    def _record(self, request: predict_pb2.PredictRequest, response: predict_pb2.PredictResponse,
                version: int) -> bytes:
        """A serialized PredictionLog, put together from the request's and the response's own bytes
        (a message is its fields' bytes one after the other: no copy of either into a new message)."""
        key = (version, request.model_spec.signature_name)
        meta = self._meta.get(key)
        if meta is None:
            m = prediction_log_pb2.LogMetadata()
            m.model_spec.name = self.model
            m.model_spec.version.value = version
            m.model_spec.signature_name = key[1]
            m.sampling_config.sampling_rate = self.cfg.sampling_rate
            meta = self._meta[key] = _field(1, m.SerializeToString())  # PredictionLog.log_metadata
        predict_log = _field(1, request.SerializeToString()) + _field(2, response.SerializeToString())
        return meta + _field(6, predict_log)  # PredictionLog.predict_log

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                break
            if self._stall:
                time.sleep(self._stall)
            try:
                self._write(frame(self._record(*item)))
                self._on_written(self.model)
            except OSError as exc:
                self._on_dropped(self.model, "write_error")
                now = time.monotonic()
                if now - self._last_error > 60:  # once a minute, not once a record
                    self._last_error = now
                    log.error("model %s: request log not written to %s: %s", self.model, self._path or self.prefix,
                              exc)
                self._close_file()
        self._close_file()

    def _write(self, record: bytes) -> None:
        now = time.monotonic()
        if self._file is not None and (self._written + len(record) > self.cfg.max_file_bytes
                                       or now - self._opened > self.cfg.max_file_age_s):
            self._close_file()
        if self._file is None:
            self.prefix.parent.mkdir(parents=True, exist_ok=True)
            self._path = self.prefix.with_name(f"{self.prefix.name}.{time.time_ns() // 1_000_000}.{os.getpid()}"
                                               f"{SUFFIX}")
            self._file = open(self._path, "ab")
            self._opened, self._written = now, 0
            self._prune()
        self._file.write(record)
        self._file.flush()
        self._written += len(record)

    def _close_file(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None

    def files(self) -> list[Path]:
        """This prefix's log files, oldest first (every process's)."""
        return sorted(self.prefix.parent.glob(f"{self.prefix.name}.*{SUFFIX}"),
                      key=lambda p: (int(p.name[len(self.prefix.name) + 1:].split(".")[0]), p.name))

    def _prune(self) -> None:
        files = self.files()
        sizes = {p: p.stat().st_size for p in files if p.exists()}
        total = sum(sizes.values())
        for p in files:
            if total <= self.cfg.max_total_bytes or p == self._path:
                break
            try:
                p.unlink()
            except FileNotFoundError:
                pass
            total -= sizes.get(p, 0)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (for up to ``timeout``), then stop."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)


class RequestLogs:
    """Every model's collector, by name; ``tap`` is the data plane's hook (router/dataplane.py)."""

    def __init__(self, dataplane: DataPlane, metrics: Metrics) -> None:
        self.dataplane = dataplane
        self._on_dropped = metrics.request_log_dropped
        self._on_written = metrics.request_logged
        self.logs: dict[str, RequestLog] = {}

    def follow(self, models: Sequence[ModelConfig]) -> None:
        """Log what ``models`` say from now on; the data plane taps answers only while a model logs."""
        self.configure({m.name: m.logging for m in models})
        self.dataplane.tap = self.tap if self.logs else None

    def configure(self, models: dict[str, RequestLogConfig]) -> None:
        """Start, keep or stop each model's collector (models with a sampling rate above 0)."""
        for name in [n for n in self.logs if n not in models or models[n] != self.logs[n].cfg]:
            # its queue is written out on a thread of its own: this runs on the event loop
            threading.Thread(target=self.logs.pop(name).close, name=f"request-log-close-{name}", daemon=True).start()
        for name, cfg in models.items():
            if cfg.sampling_rate > 0 and name not in self.logs:
                self.logs[name] = RequestLog(name, cfg, on_dropped=self._on_dropped, on_written=self._on_written)
                log.info("model %s: logging %.4g of its requests to %s*%s", name, cfg.sampling_rate,
                         cfg.filename_prefix, SUFFIX)

    def tap(self, request: predict_pb2.PredictRequest, response: predict_pb2.PredictResponse, version: int) -> None:
        collector = self.logs.get(request.model_spec.name)
        if collector is not None:
            collector.offer(request, response, version)

    def close(self) -> None:
        for collector in self.logs.values():
            collector.close()
        self.logs.clear()



def attach(dataplane: DataPlane, metrics: Metrics, models: Sequence[ModelConfig]) -> RequestLogs:
    """The request logs of ``models``, fed by ``dataplane`` (the router's, or a data-plane process's)."""
    logs = RequestLogs(dataplane, metrics)
    logs.follow(models)
    return logs
