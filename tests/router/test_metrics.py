"""router.metrics: TF Serving's series under their exact names, and the router's own.

The TF Serving lines expected here follow tensorflow_serving/servables/tensorflow/
util.cc (names, labels, Exponential(10, 1.8, 33) buckets) and util/
prometheus_exporter.cc (":" for "/", "# TYPE NAME counter" without "_total").
"""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from router.metrics import CONTENT_TYPE, STATES, TF_LATENCY_BOUNDS_US, Metrics


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


def text(m: Metrics) -> str:
    body, content_type = m.render()
    assert content_type == CONTENT_TYPE
    return body.decode()


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


# -- TF Serving's series --------------------------------------------------------


def test_tf_request_count_has_tf_serving_name_and_type(metrics: Metrics) -> None:
    metrics.observe_request("ctr", "Predict", "grpc", "OK", 0.001)
    metrics.observe_request("ctr", "Predict", "rest", "OK", 0.001)
    metrics.observe_request("ctr", "Predict", "grpc", "INVALID_ARGUMENT", 0.001)
    out = text(metrics)
    assert "# TYPE :tensorflow:serving:request_count counter\n" in out
    assert "# HELP :tensorflow:serving:request_count The total number of requests.\n" in out
    assert ':tensorflow:serving:request_count{model_name="ctr",status="OK"} 2.0\n' in out
    assert (
        ':tensorflow:serving:request_count{model_name="ctr",status="INVALID_ARGUMENT"} 1.0\n'
        in out
    )
    assert "request_count_total" not in out
    assert "request_count_created" not in out


def test_tf_request_latency_buckets_in_microseconds(metrics: Metrics) -> None:
    metrics.observe_request("ctr", "Predict", "grpc", "OK", 0.0012)  # 1200 us
    out = text(metrics)
    assert "# TYPE :tensorflow:serving:request_latency histogram\n" in out
    prefix = ':tensorflow:serving:request_latency_bucket{API="Predict",entrypoint="GRPC",'
    buckets = re.findall(re.escape(prefix) + r'le="([^"]+)",model_name="ctr"\} (\S+)\n', out)
    les = [le for le, _ in buckets]
    # 33 finite bounds as absl prints them (%g), then +Inf.
    assert len(les) == 34
    assert les[:5] == ["10", "18", "32.4", "58.32", "104.976"]
    assert les[8:10] == ["1102", "1983.59"]
    assert les[-2:] == ["1.47476e+09", "+Inf"]
    counts = [float(v) for _, v in buckets]
    assert counts[8] == 0.0 and counts[9] == 1.0 and counts[-1] == 1.0
    assert counts == sorted(counts)  # cumulative
    labels = {"model_name": "ctr", "API": "Predict", "entrypoint": "GRPC"}
    sum_us = metrics.registry.get_sample_value(":tensorflow:serving:request_latency_sum", labels)
    assert sum_us == pytest.approx(1200.0)
    count = metrics.registry.get_sample_value(":tensorflow:serving:request_latency_count", labels)
    assert count == 1.0


def test_tf_bounds_match_exponential_10_1_8_33() -> None:
    assert len(TF_LATENCY_BOUNDS_US) == 33
    assert TF_LATENCY_BOUNDS_US[0] == 10.0
    assert TF_LATENCY_BOUNDS_US[-1] == pytest.approx(10 * 1.8**32)


def test_tf_latency_rest_uses_url_verb_and_skips_errors(metrics: Metrics) -> None:
    metrics.observe_request("ctr", "Classify", "rest", "OK", 0.002)
    metrics.observe_request("ctr", "Regress", "rest", "NOT_FOUND", 0.002)
    out = text(metrics)
    assert 'API="classify",entrypoint="REST",le="+Inf",model_name="ctr"} 1.0\n' in out
    # TF Serving records latency only for OK, but counts every status.
    assert 'API="regress"' not in out and 'API="Regress"' not in out
    assert ':tensorflow:serving:request_count{model_name="ctr",status="NOT_FOUND"} 1.0\n' in out


def test_tf_series_only_for_inference_apis(metrics: Metrics) -> None:
    metrics.observe_request("ctr", "GetModelMetadata", "grpc", "OK", 0.0001)
    metrics.observe_request("ctr", "GetModelStatus", "rest", "OK", 0.0001)
    out = text(metrics)
    assert ":tensorflow:serving:request_count{" not in out
    assert ":tensorflow:serving:request_latency_bucket{" not in out
    # ...but the router's own series count them.
    labels = {"model": "ctr", "api": "GetModelMetadata", "protocol": "grpc", "code": "OK"}
    assert value(metrics, "tfs_router_requests_total", **labels) == 1.0


def test_tf_families_present_before_any_request(metrics: Metrics) -> None:
    out = text(metrics)
    assert "# TYPE :tensorflow:serving:request_count counter\n" in out
    assert "# TYPE :tensorflow:serving:request_latency histogram\n" in out


def test_exposition_parses(metrics: Metrics) -> None:
    metrics.observe_request("ctr", "Predict", "grpc", "OK", 0.003)
    metrics.set_worker_state("w0", "ready")
    metrics.observe_batch("ctr", 7, 3, 1, "timeout", [0.001, 0.002, 0.003])
    families = {f.name: f for f in text_string_to_metric_families(text(metrics))}
    assert families[":tensorflow:serving:request_count"].type == "counter"
    assert families[":tensorflow:serving:request_latency"].type == "histogram"
    assert families["tfs_router_requests"].type == "counter"
    assert families["tfs_router_worker_state"].type == "gauge"


# -- the router's own series ----------------------------------------------------


def test_router_request_series(metrics: Metrics) -> None:
    metrics.observe_request("ctr", "Predict", "rest", "OK", 0.0003)
    metrics.observe_request("ctr", "Predict", "rest", "OK", 0.0003)
    metrics.observe_request("ctr", "Predict", "rest", "UNAVAILABLE", 0.02)
    out = text(metrics)
    assert (
        'tfs_router_requests_total{api="Predict",code="OK",model="ctr",protocol="rest"} 2.0\n'
        in out
    )
    hist = "tfs_router_request_latency_seconds_bucket"
    common = {"model": "ctr", "api": "Predict", "protocol": "rest"}
    assert value(metrics, hist, le="0.0001", **common) == 0.0
    assert value(metrics, hist, le="0.00025", **common) == 0.0
    assert value(metrics, hist, le="0.0005", **common) == 2.0
    assert value(metrics, hist, le="0.025", **common) == 3.0
    assert value(metrics, hist, le="10.0", **common) == 3.0
    assert value(metrics, "tfs_router_request_latency_seconds_count", **common) == 3.0


def test_worker_state_switches(metrics: Metrics) -> None:
    def states(worker: str) -> dict[str, float | None]:
        return {
            s: value(metrics, "tfs_router_worker_state", worker=worker, state=s) for s in STATES
        }

    metrics.set_worker_state("w0", "starting")
    assert states("w0") == {s: float(s == "starting") for s in STATES}
    metrics.set_worker_state("w0", "ready")
    assert states("w0") == {s: float(s == "ready") for s in STATES}
    metrics.set_worker_state("w0", "ready")
    assert states("w0") == {s: float(s == "ready") for s in STATES}
    metrics.set_worker_state("w1", "loading")
    metrics.set_worker_state("w0", "draining")
    assert states("w0") == {s: float(s == "draining") for s in STATES}
    assert states("w1") == {s: float(s == "loading") for s in STATES}
    metrics.set_worker_state("w0", "dead")
    assert states("w0") == {s: float(s == "dead") for s in STATES}


def test_unknown_worker_state_is_refused_without_series(metrics: Metrics) -> None:
    with pytest.raises(ValueError, match="unknown worker state 'sleepy'"):
        metrics.set_worker_state("w9", "sleepy")
    assert 'worker="w9"' not in text(metrics)


def test_worker_counters_and_removal(metrics: Metrics) -> None:
    metrics.set_worker_inflight("w0", 3)
    metrics.set_worker_inflight("w0", 2)
    metrics.worker_restarted("w0")
    metrics.worker_restarted("w0")
    metrics.set_worker_state("w0", "ready")
    assert value(metrics, "tfs_router_worker_inflight", worker="w0") == 2.0
    assert value(metrics, "tfs_router_worker_restarts_total", worker="w0") == 2.0
    metrics.remove_worker("w0")
    assert 'worker="w0"' not in text(metrics)
    metrics.remove_worker("w0")  # twice is fine
    metrics.set_worker_state("w0", "starting")  # and the worker can come back
    assert value(metrics, "tfs_router_worker_state", worker="w0", state="starting") == 1.0


def test_retries_and_shedding(metrics: Metrics) -> None:
    metrics.retried("ctr", "worker_died")
    metrics.retried("ctr", "worker_died")
    metrics.shed("ctr", "queue_full")
    metrics.shed("ctr", "no_worker")
    assert value(metrics, "tfs_router_retries_total", model="ctr", reason="worker_died") == 2.0
    assert value(metrics, "tfs_router_shed_total", model="ctr", reason="queue_full") == 1.0
    assert value(metrics, "tfs_router_shed_total", model="ctr", reason="no_worker") == 1.0


def test_batch_series(metrics: Metrics) -> None:
    metrics.observe_batch("ctr", 6, 2, 2, "full", [0.0004, 0.003])
    metrics.observe_batch("ctr", 1, 1, 0, "timeout", [0.01])
    metrics.track_queue_depth("ctr", lambda: 17)
    assert value(metrics, "tfs_router_batch_size_rows_bucket", model="ctr", le="4.0") == 1.0
    assert value(metrics, "tfs_router_batch_size_rows_bucket", model="ctr", le="8.0") == 2.0
    assert value(metrics, "tfs_router_batch_size_rows_sum", model="ctr") == 7.0
    assert value(metrics, "tfs_router_batch_size_requests_sum", model="ctr") == 3.0
    assert value(metrics, "tfs_router_batch_queue_wait_seconds_count", model="ctr") == 3.0
    wait = "tfs_router_batch_queue_wait_seconds_bucket"
    assert value(metrics, wait, model="ctr", le="0.0005") == 1.0
    assert value(metrics, wait, model="ctr", le="0.005") == 2.0
    assert value(metrics, "tfs_router_batch_padding_rows_total", model="ctr") == 2.0
    assert value(metrics, "tfs_router_batches_total", model="ctr", trigger="full") == 1.0
    assert value(metrics, "tfs_router_batches_total", model="ctr", trigger="timeout") == 1.0
    assert value(metrics, "tfs_router_batch_queue_depth", model="ctr") == 17.0
    with pytest.raises(ValueError, match="unknown batch trigger 'whenever'"):
        metrics.observe_batch("ctr", 1, 1, 0, "whenever", [])


def test_registries_do_not_interfere() -> None:
    a = Metrics(CollectorRegistry())
    b = Metrics(CollectorRegistry())
    a.observe_request("ctr", "Predict", "grpc", "OK", 0.001)
    a.set_worker_state("w0", "ready")
    assert value(a, ":tensorflow:serving:request_count", model_name="ctr", status="OK") == 1.0
    assert value(b, ":tensorflow:serving:request_count", model_name="ctr", status="OK") is None
    out = b.render()[0].decode()
    assert 'model="ctr"' not in out and 'model_name="ctr"' not in out
    assert 'worker="w0"' not in out
