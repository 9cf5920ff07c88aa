"""Prometheus metrics of the router: its own series and TF Serving's.

Two families of series live in one injected ``CollectorRegistry`` (no module
level metric, so tests and embedders never share state):

* TF Serving's own request series, with the exact names, labels and buckets
  that ``tensorflow_serving/servables/tensorflow/util.cc`` defines and that
  ``tensorflow_serving/util/prometheus_exporter.cc`` writes, so dashboards
  built against a plain TF Serving keep working behind the router:

  - ``:tensorflow:serving:request_count{model_name,status}`` counter, no
    ``_total`` suffix; ``status`` is the canonical code name (``OK``,
    ``INVALID_ARGUMENT``, ...), counted for every Predict/Classify/Regress.
  - ``:tensorflow:serving:request_latency{model_name,API,entrypoint}``
    histogram in microseconds, buckets ``10 * 1.8**i`` for i < 33, observed
    only for successful requests, as TF Serving does.  ``API`` is the gRPC
    method name (``Predict``) on ``GRPC`` and the URL verb (``predict``) on
    ``REST``.

  prometheus_client always writes counters as ``NAME_total``; these two are
  therefore produced by a small custom collector, and ``render`` puts the
  exact counter name back on its ``# HELP``/``# TYPE`` lines.

* The router's own ``tfs_router_*`` series (requests, latency, workers,
  retries, load shedding, batching).

The ``observe_*``/``set_*`` methods sit on the data plane's hot path: each
caches the labelled children in a dict keyed by the label tuple, so a call is
one dict lookup plus the metric updates.  Label values must come from bounded
sets (configured model names, not whatever a client sent), or the number of
series grows without bound.

This module must never import TensorFlow and does no I/O.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from router.pool import STATES

__all__ = [
    "CONTENT_TYPE",
    "STATES",
    "TF_LATENCY_BOUNDS_US",
    "TF_REQUEST_COUNT",
    "TF_REQUEST_LATENCY",
    "TRIGGERS",
    "Metrics",
]

# generate_latest's default body (legacy names, underscore escaping) is the
# 0.0.4 text format, the one Prometheus 2 asks for; prometheus_client 0.26's
# CONTENT_TYPE_LATEST announces version=1.0.0 instead.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TF_REQUEST_COUNT = ":tensorflow:serving:request_count"
TF_REQUEST_LATENCY = ":tensorflow:serving:request_latency"


def _exponential(scale: float, growth: float, count: int) -> tuple[float, ...]:
    # monitoring::Buckets::Exponential multiplies the bound step by step; doing
    # the same gives the same floats, hence the same printed le values.
    bounds: list[float] = []
    bound = scale
    for _ in range(count):
        bounds.append(bound)
        bound *= growth
    return tuple(bounds)


# monitoring::Buckets::Exponential(10, 1.8, 33): 10 us up to ~25 minutes.
TF_LATENCY_BOUNDS_US: tuple[float, ...] = _exponential(10.0, 1.8, 33)
# absl::StrCat prints doubles like printf("%g"): le="10", "18", "32.4", ...
_TF_LE: tuple[str, ...] = tuple(f"{b:g}" for b in TF_LATENCY_BOUNDS_US) + ("+Inf",)

# Only these reach RecordRequestLatency/RecordModelRequestCount in TF Serving.
_TF_APIS = frozenset({"Predict", "Classify", "Regress"})
_ENTRYPOINT = {"grpc": "GRPC", "rest": "REST"}

TRIGGERS: tuple[str, ...] = ("full", "slot_freed", "timeout")
_STATE_SET = frozenset(STATES)

# 100 us .. 10 s, roughly 1-2.5-5 per decade.
_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
_QUEUE_WAIT_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0,
)
_PHASE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_BATCH_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_BATCH_REQUESTS_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)

# generate_latest writes a counter's HELP/TYPE lines as NAME_total; only those
# two lines have the name followed by a space (samples have "{").
_MUNGED_HEADER = (TF_REQUEST_COUNT + "_total ").encode()
_EXACT_HEADER = (TF_REQUEST_COUNT + " ").encode()


class _Callback(Collector):
    """Families built by a function at scrape time."""

    def __init__(self, read: Callable[[], Iterable[Metric]]) -> None:
        self._read = read

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterable[Metric]:
        return self._read()


class _TfHistogram:
    __slots__ = ("buckets", "total")

    def __init__(self) -> None:
        self.buckets = [0] * (len(TF_LATENCY_BOUNDS_US) + 1)  # per bucket, not cumulative
        self.total = 0.0


class _TfServingCollector(Collector):
    """TF Serving's two request series, written under their exact names."""

    def __init__(self) -> None:
        # Scrapes may run on another thread than the event loop.
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}
        self._latency: dict[tuple[str, str, str], _TfHistogram] = {}

    def count(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1

    def observe(self, key: tuple[str, str, str], micros: float) -> None:
        # bisect_left: a value equal to a bound is counted in that bound's le.
        i = bisect.bisect_left(TF_LATENCY_BOUNDS_US, micros)
        with self._lock:
            hist = self._latency.get(key)
            if hist is None:
                hist = self._latency[key] = _TfHistogram()
            hist.buckets[i] += 1
            hist.total += micros

    def describe(self) -> Iterable[Metric]:
        return self._families([], [])

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            counts = list(self._counts.items())
            latency = [(k, list(h.buckets), h.total) for k, h in self._latency.items()]
        return self._families(counts, latency)

    @staticmethod
    def _families(
        counts: list[tuple[tuple[str, str], int]],
        latency: list[tuple[tuple[str, str, str], list[int], float]],
    ) -> list[Metric]:
        count = Metric(TF_REQUEST_COUNT, "The total number of requests.", "counter")
        for (model, status), n in counts:
            count.add_sample(TF_REQUEST_COUNT, {"model_name": model, "status": status}, n)
        hist = Metric(
            TF_REQUEST_LATENCY,
            "Distribution of wall time (in microseconds) for Tensorflow Serving request.",
            "histogram",
        )
        bucket_name = TF_REQUEST_LATENCY + "_bucket"
        for (model, api, entrypoint), buckets, total in latency:
            labels = {"model_name": model, "API": api, "entrypoint": entrypoint}
            cumulative = 0
            for le, n in zip(_TF_LE, buckets):
                cumulative += n
                hist.add_sample(bucket_name, {**labels, "le": le}, cumulative)
            hist.add_sample(TF_REQUEST_LATENCY + "_sum", labels, total)
            hist.add_sample(TF_REQUEST_LATENCY + "_count", labels, cumulative)
        return [count, hist]


class _RequestSlot:
    """Everything one (model, api, protocol, code) request updates."""

    __slots__ = ("count", "latency", "tf_count", "tf_latency")

    def __init__(
        self,
        count: Counter,
        latency: Histogram,
        tf_count: tuple[str, str] | None,
        tf_latency: tuple[str, str, str] | None,
    ) -> None:
        self.count = count
        self.latency = latency
        self.tf_count = tf_count
        self.tf_latency = tf_latency


class Metrics:
    """All router metrics, registered on ``registry``.

    Label conventions the callers share:

    * ``api``: the gRPC method name (``Predict``, ``Classify``, ``Regress``,
      ``GetModelMetadata``, ``GetModelStatus``, ...), for REST too.
    * ``protocol``: ``grpc`` or ``rest``.
    * ``code``: the canonical status name, ``grpc.StatusCode.X.name``
      (``OK``, ``INVALID_ARGUMENT``, ...), for REST too.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        self._requests = Counter(
            "tfs_router_requests", "Requests answered by the router.",
            ("model", "api", "protocol", "code"), registry=r,
        )
        self._latency = Histogram(
            "tfs_router_request_latency_seconds",
            "Wall time from request received to response sent.",
            ("model", "api", "protocol"), buckets=_LATENCY_BUCKETS, registry=r,
        )
        self._inflight = Gauge(
            "tfs_router_worker_inflight", "Requests in flight on a worker.",
            ("worker",), registry=r,
        )
        self._active = Gauge(
            "tfs_router_requests_in_flight", "Requests being handled by the router (received, not yet answered).",
            ("protocol",), registry=r,
        )
        self._active_children = {p: self._active.labels(p) for p in ("grpc", "rest")}
        self._state = Gauge(
            "tfs_router_worker_state", "1 for the worker's current state, 0 for the others.",
            ("worker", "state"), registry=r,
        )
        self._restarts = Counter(
            "tfs_router_worker_restarts", "Worker processes restarted.",
            ("worker",), registry=r,
        )
        self._tls_reload_failures = Counter(
            "tfs_router_tls_reload_failures", "Changed certificate files that could not be used "
            "(the last good ones stayed).", ("listener",), registry=r,
        )
        self._worker_tls_errors = Counter(
            "tfs_router_worker_tls_errors", "Calls to a worker that failed its TLS handshake "
            "(a certificate that does not verify: the worker stays out of rotation).", ("worker",), registry=r,
        )
        self._log_records = Counter(
            "tfs_router_request_log_records", "Requests and responses written to a model's request log "
            "(router/reqlog.py).", ("model",), registry=r,
        )
        self._log_dropped = Counter(
            "tfs_router_request_log_dropped", "Sampled requests not logged: the writer's queue was full "
            "(a slow disk) or the write failed; the request itself was answered.", ("model", "reason"), registry=r,
        )
        self._retries = Counter(
            "tfs_router_retries", "Requests sent again to another worker.",
            ("model", "reason"), registry=r,
        )
        self._shed = Counter(
            "tfs_router_shed", "Requests refused early (queue full, no worker).",
            ("model", "reason"), registry=r,
        )
        self._batch_rows = Histogram(
            "tfs_router_batch_size_rows", "Rows per dispatched batch, padding excluded.",
            ("model",), buckets=_BATCH_ROWS_BUCKETS, registry=r,
        )
        self._batch_requests = Histogram(
            "tfs_router_batch_size_requests", "Requests merged into one batch.",
            ("model",), buckets=_BATCH_REQUESTS_BUCKETS, registry=r,
        )
        self._queue_wait = Histogram(
            "tfs_router_batch_queue_wait_seconds",
            "Time a request waited in the batch queue before its batch was sent.",
            ("model",), buckets=_QUEUE_WAIT_BUCKETS, registry=r,
        )
        self._queue_depth = Gauge(
            "tfs_router_batch_queue_depth", "Rows waiting in the batch queue.",
            ("model",), registry=r,
        )
        self._padding = Counter(
            "tfs_router_batch_padding_rows", "Padding rows added to reach a batch size.",
            ("model",), registry=r,
        )
        self._batches = Counter(
            "tfs_router_batches", "Batches dispatched, by what closed them.",
            ("model", "trigger"), registry=r,
        )
        self._rollout_phase = Histogram(
            "tfs_router_rollout_phase_seconds",
            "Time a worker spent in one phase of a rollout step (drain, load, warm, unload, retire), "
            "and whole rollouts (phase=rollout).",
            ("phase",), buckets=_PHASE_BUCKETS, registry=r,
        )
        self._rollouts = Counter(
            "tfs_router_rollouts", "Rollouts finished, by result (done, rolled_back).",
            ("result",), registry=r,
        )
        for result in ("done", "rolled_back"):
            self._rollouts.labels(result)
        self._rollout_active = Gauge(
            "tfs_router_rollout_in_progress", "1 while a rollout runs.", registry=r,
        )
        self._versions_failed = Counter(
            "tfs_router_versions_failed", "Versions given up on (failed load or warm-up; the pool rolled back).",
            registry=r,
        )
        self._tf = _TfServingCollector()
        r.register(self._tf)
        self._version_requests = Counter(
            "tfs_router_version_requests", "Predict requests by the version that answered them (or was chosen).",
            ("model", "version", "code"), registry=r,
        )
        self._version_latency = Histogram(
            "tfs_router_version_latency_seconds", "Predict latency in the router by the version that answered.",
            ("model", "version"), buckets=_LATENCY_BUCKETS, registry=r,
        )
        self._routing_fallbacks = Counter(
            "tfs_router_routing_fallbacks", "Requests a routing rule or split sent to a version no worker in "
            "rotation held, answered by the default version instead.", ("model", "reason"), registry=r,
        )
        self._canary_verdicts = Counter(
            "tfs_router_canary_verdicts", "Progressive delivery verdicts (hold, advance, abort).",
            ("model", "verdict"), registry=r,
        )
        self._admitted = Counter(
            "tfs_router_admitted", "Requests admitted past every quota (waited: after waiting for a slot).",
            ("tenant", "model", "waited"), registry=r,
        )
        self._quota_shed = Counter(
            "tfs_router_quota_shed", "Requests refused by a quota (RESOURCE_EXHAUSTED / 429), by the quota.",
            ("tenant", "model", "reason"), registry=r,
        )
        self._version_children: dict[tuple[str, int, str], tuple[Counter, Histogram]] = {}
        self._callbacks: list[Callable[[], Iterable[Metric]]] = []
        r.register(_Callback(lambda: [f for read in self._callbacks for f in read()]))

        self._request_slots: dict[tuple[str, str, str, str], _RequestSlot] = {}
        self._inflight_children: dict[str, Gauge] = {}
        self._state_children: dict[str, dict[str, Gauge]] = {}
        self._current_state: dict[str, str] = {}
        self._restart_children: dict[str, Counter] = {}
        self._retry_children: dict[tuple[str, str], Counter] = {}
        self._admitted_children: dict[tuple[str, str, bool], Counter] = {}
        self._shed_children: dict[tuple[str, str], Counter] = {}
        self._batch_children: dict[str, tuple[Histogram, Histogram, Histogram, Counter]] = {}
        self._batches_children: dict[tuple[str, str], Counter] = {}

    # -- requests -------------------------------------------------------------

    def observe_request(
        self, model: str, api: str, protocol: str, code: str, seconds: float
    ) -> None:
        """One answered request, in the router's series and in TF Serving's."""
        key = (model, api, protocol, code)
        slot = self._request_slots.get(key)
        if slot is None:
            slot = self._request_slots[key] = self._new_slot(model, api, protocol, code)
        slot.count.inc()
        slot.latency.observe(seconds)
        if slot.tf_count is not None:
            self._tf.count(slot.tf_count)
        if slot.tf_latency is not None:
            self._tf.observe(slot.tf_latency, seconds * 1e6)

    def _new_slot(self, model: str, api: str, protocol: str, code: str) -> _RequestSlot:
        tf_count: tuple[str, str] | None = None
        tf_latency: tuple[str, str, str] | None = None
        if api in _TF_APIS:
            entrypoint = _ENTRYPOINT.get(protocol, protocol.upper())
            tf_count = (model, code)
            if code == "OK":
                # TF Serving's REST handler labels with the URL verb.
                tf_api = api.lower() if entrypoint == "REST" else api
                tf_latency = (model, tf_api, entrypoint)
        return _RequestSlot(
            self._requests.labels(model, api, protocol, code),
            self._latency.labels(model, api, protocol),
            tf_count,
            tf_latency,
        )

    # -- workers --------------------------------------------------------------

    def set_worker_state(self, worker: str, state: str) -> None:
        """Sets ``state`` to 1 and every other state of ``worker`` to 0."""
        if state not in _STATE_SET:
            known = ", ".join(STATES)
            raise ValueError(f"unknown worker state {state!r} (one of {known})")
        children = self._state_children.get(worker)
        if children is None:
            children = {s: self._state.labels(worker, s) for s in STATES}
            for child in children.values():
                child.set(0)
            self._state_children[worker] = children
        previous = self._current_state.get(worker)
        if previous == state:
            return
        if previous is not None:
            children[previous].set(0)
        children[state].set(1)
        self._current_state[worker] = state

    def track_in_flight(self, protocol: str, read: Callable[[], float]) -> None:
        """Requests being handled, read at scrape time (nothing on the hot path)."""
        self._active_children[protocol].set_function(read)

    def track_queue_depth(self, model: str, read: Callable[[], float]) -> None:
        """Rows waiting in ``model``'s batch queues, read at scrape time."""
        self._queue_depth.labels(model).set_function(read)

    def set_worker_inflight(self, worker: str, n: int) -> None:
        child = self._inflight_children.get(worker)
        if child is None:
            child = self._inflight_children[worker] = self._inflight.labels(worker)
        child.set(n)

    def worker_restarted(self, worker: str) -> None:
        child = self._restart_children.get(worker)
        if child is None:
            child = self._restart_children[worker] = self._restarts.labels(worker)
        child.inc()

    def tls_reload_failed(self, listener: str) -> None:
        self._tls_reload_failures.labels(listener).inc()

    def worker_tls_error(self, worker: str) -> None:
        self._worker_tls_errors.labels(worker).inc()

    def remove_worker(self, worker: str) -> None:
        """Drops every series of a worker that left the pool for good."""
        if self._inflight_children.pop(worker, None) is not None:
            self._inflight.remove(worker)
        if self._state_children.pop(worker, None) is not None:
            for s in STATES:
                self._state.remove(worker, s)
        self._current_state.pop(worker, None)
        if self._restart_children.pop(worker, None) is not None:
            self._restarts.remove(worker)

    # -- retries and load shedding -------------------------------------------

    def request_logged(self, model: str) -> None:  # from the log's writer thread (prometheus-client locks)
        self._log_records.labels(model).inc()

    def request_log_dropped(self, model: str, reason: str) -> None:
        self._log_dropped.labels(model, reason).inc()

    def retried(self, model: str, reason: str) -> None:
        key = (model, reason)
        child = self._retry_children.get(key)
        if child is None:
            child = self._retry_children[key] = self._retries.labels(model, reason)
        child.inc()

    def shed(self, model: str, reason: str) -> None:
        """A request refused before reaching a worker (``queue_full``, ``no_worker``)."""
        key = (model, reason)
        child = self._shed_children.get(key)
        if child is None:
            child = self._shed_children[key] = self._shed.labels(model, reason)
        child.inc()

    # -- batching -------------------------------------------------------------

    def observe_batch(
        self,
        model: str,
        rows: int,
        requests: int,
        padding_rows: int,
        trigger: str,
        queue_waits: Sequence[float],
    ) -> None:
        """One dispatched batch: ``rows`` real rows plus ``padding_rows`` of padding,
        merged from ``requests`` requests that waited ``queue_waits`` seconds each."""
        children = self._batch_children.get(model)
        if children is None:
            children = self._batch_children[model] = (
                self._batch_rows.labels(model),
                self._batch_requests.labels(model),
                self._queue_wait.labels(model),
                self._padding.labels(model),
            )
        batch_rows, batch_requests, queue_wait, padding = children
        key = (model, trigger)
        batches = self._batches_children.get(key)
        if batches is None:
            if trigger not in TRIGGERS:
                known = ", ".join(TRIGGERS)
                raise ValueError(f"unknown batch trigger {trigger!r} (one of {known})")
            batches = self._batches_children[key] = self._batches.labels(model, trigger)
        batches.inc()
        batch_rows.observe(rows)
        batch_requests.observe(requests)
        if padding_rows:
            padding.inc(padding_rows)
        for wait in queue_waits:
            queue_wait.observe(wait)

    # -- rollouts -------------------------------------------------------------

    def rollout_started(self) -> None:
        self._rollout_active.set(1)

    def rollout_finished(self, result: str, seconds: float) -> None:
        self._rollout_active.set(0)
        self._rollouts.labels(result).inc()
        self._rollout_phase.labels("rollout").observe(seconds)

    def rollout_phase(self, phase: str, seconds: float) -> None:
        self._rollout_phase.labels(phase).observe(seconds)

    def version_failed(self) -> None:
        self._versions_failed.inc()

    def track_control(self, read: Callable[[], Iterable[Metric]]) -> None:
        """Series computed from the control plane's state at scrape time (versions held, defaults)."""
        self._callbacks.append(read)

    track_routing = track_control  # the split weights and canary progressions, the same way

    # -- versions and routing --------------------------------------------------

    def version_answered(self, model: str, version: int, code: str, seconds: float) -> None:
        key = (model, version, code)
        children = self._version_children.get(key)
        if children is None:
            children = self._version_children[key] = (
                self._version_requests.labels(model, str(version), code),
                self._version_latency.labels(model, str(version)),
            )
        count, latency = children
        count.inc()
        latency.observe(seconds)

    def admitted(self, tenant: str, model: str, waited: bool) -> None:
        key = (tenant, model, waited)
        child = self._admitted_children.get(key)
        if child is None:
            child = self._admitted_children[key] = self._admitted.labels(tenant, model, "yes" if waited else "no")
        child.inc()

    def quota_shed(self, tenant: str, model: str, reason: str) -> None:
        self._quota_shed.labels(tenant, model, reason).inc()

    def routing_fallback(self, model: str, reason: str) -> None:
        self._routing_fallbacks.labels(model, reason).inc()

    def canary_verdict(self, model: str, verdict: str) -> None:
        self._canary_verdicts.labels(model, verdict).inc()

    # -- exposition -----------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The registry in Prometheus text format, and its content type."""
        body = generate_latest(self.registry)
        return body.replace(_MUNGED_HEADER, _EXACT_HEADER, 2), CONTENT_TYPE
