"""The dashboard and the alert rules against real data: a router with two workers under
locust load, scraped every second by Debian's Prometheus using deploy/prometheus's config
(its targets pointed here) and rules; then every panel query must return data.

Besides the locust users (REST and gRPC, unversioned: the 90/10 split answers with both
versions) the run makes the rarer series exist, the way production would: a tenant
over its rate quota (429s), a model whose tiny batch queue overflows (shed), a worker
killed and restarted, and a canary progression holding at its first step.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.promstack import (
    DASHBOARD,
    PrometheusServer,
    PromQLError,
    Query,
    alert_rules,
    binary,
    check_queries,
    dashboard_queries,
    metric_names,
    scrape_config,
    substitute,
    variable_queries,
    variable_values,
)
from tests.support import ROOT, RouterProcess, child_env

LOAD_SECONDS = 10
ROW = {"user_id": 1, "item_id": 2, "category": 3, "city": 4, "device": 5, "dense": [0.5] * 20}


def router_config(model_root: Path) -> dict[str, Any]:
    return {
        "models": [
            {"name": "ctr", "base_path": str(model_root / "ctr"), "version_policy": "specific:1,2",
             "version_labels": {"stable": 1, "canary": 2},
             "routing": {"split": {"stable": 90, "canary": 10}, "sticky_header": "x-user-id",
                         # a progression that holds at 10% (never enough canary requests to judge):
                         # the canary state, step weight and verdict series exist, nothing moves
                         "progressive": {"steps": [10, 50], "interval_s": 1.0, "min_requests": 10**9}}},
            # a second model with a batch queue of 2 rows: bursts overflow it (tfs_router_shed_total)
            {"name": "small", "base_path": str(model_root / "ctr"), "version_policy": "specific:1",
             "batching": {"max_batch_size": 2, "max_enqueued": 2}},
        ],
        "workers": {"count": 2},
        "quotas": {"tenants": {"flood": {"rate_per_s": 1, "burst": 1}}},
        "limits": {"refusal_delay_s": 0.01},
    }


@dataclass
class Stack:
    router: RouterProcess
    prometheus: PrometheusServer
    locust_stats: dict[str, dict[str, str]]
    side_traffic: dict[str, int]
    load_started: float  # time.monotonic()

    def rate_interval(self) -> str:
        """$__rate_interval for the checks: a window reaching back to the start of the load."""
        return f"{max(60, int(time.monotonic() - self.load_started) + 5)}s"


def rest_predict(router: RouterProcess, model: str, rows: int, headers: dict[str, str] | None = None) -> int:
    body = json.dumps({"instances": [ROW] * rows}).encode()
    req = urllib.request.Request(f"{router.url}/v1/models/{model}:predict", data=body, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def side_traffic(router: RouterProcess, load_ends: float) -> dict[str, int]:
    """What locust does not do: quota refusals, batch queue overflows, a worker restart."""
    counts = {"flood_429": 0, "small_429": 0}
    stop = threading.Event()

    def flood() -> None:  # tenant "flood" may send 1 request/s: most of 4/s are refused
        while not stop.wait(0.25):
            counts["flood_429"] += rest_predict(router, "ctr", 1, {"x-tenant": "flood"}) == 429

    flooder = threading.Thread(target=flood)
    flooder.start()
    try:
        with ThreadPoolExecutor(32) as pool:
            codes = list(pool.map(lambda _: rest_predict(router, "small", 2), range(160)))
        assert set(codes) <= {200, 429}, codes
        counts["small_429"] = codes.count(429)

        before = {w["name"]: w["pid"] for w in router.status()["workers"]}
        victim = min(before)
        os.kill(before[victim], signal.SIGKILL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            workers = router.status()["workers"]
            if all(w["state"] == "ready" for w in workers) and \
                    {w["name"]: w["pid"] for w in workers}[victim] != before[victim]:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"worker {victim} did not come back: {router.status()['workers']}\n{router.log()}")
        stop.wait(max(0.0, load_ends - time.monotonic()))
    finally:
        stop.set()
        flooder.join(30)
    return counts


def wait_for_series(prometheus: PrometheusServer, expr: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if prometheus.query(expr):
            return
        time.sleep(0.5)
    raise AssertionError(f"Prometheus never saw {expr}:\n{prometheus.log()}")


@pytest.fixture(scope="module")
def stack(model_root: Path, logs_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    binary("prometheus")  # before anything starts: a missing binary fails with the fix in the message
    workdir = tmp_path_factory.mktemp("prometheus")
    router = RouterProcess(router_config(model_root), log_dir=logs_dir)
    prometheus: PrometheusServer | None = None
    try:
        # Scraping from the start: the workers' starting/loading states are in the data too.
        prometheus = PrometheusServer(
            lambda port: scrape_config(f"127.0.0.1:{router.rest_port}", f"127.0.0.1:{port}"), workdir)
        prometheus.wait_ready()
        router.wait_ready()
        csv_prefix = workdir / "locust"
        locust = subprocess.Popen(
            [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless",
             "-u", "8", "-r", "8", "-t", f"{LOAD_SECONDS}s", "--host", router.url, "--only-summary",
             "--csv", str(csv_prefix)],
            env={**child_env(), "TFS_GRPC_TARGET": f"127.0.0.1:{router.grpc_port}"}, cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        try:
            started = time.monotonic()
            time.sleep(3)  # locust's users up and running
            extra = side_traffic(router, started + LOAD_SECONDS)
            out, _ = locust.communicate(timeout=LOAD_SECONDS + 60)
        finally:
            if locust.poll() is None:
                locust.kill()
                locust.communicate()
        # locust exits 1 when a request failed (the killed worker's may); its stats say what ran
        assert locust.returncode in (0, 1), out[-3000:]
        with open(f"{csv_prefix}_stats.csv", newline="") as f:
            stats = {row["Name"]: row for row in csv.DictReader(f)}
        wait_for_series(prometheus, 'tfs_router_worker_restarts_total{job="tfs-router"}')
        time.sleep(3)  # a few more scrapes: every series has samples to rate over
        yield Stack(router, prometheus, stats, extra, started)
    finally:
        if prometheus is not None:
            prometheus.stop()
        assert router.terminate() == 0, router.log()


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def test_the_load_ran(stack: Stack) -> None:
    for name in ("REST predict", "gRPC Predict"):
        assert int(stack.locust_stats[name]["Request Count"]) > 100, stack.locust_stats
    assert stack.side_traffic["flood_429"] > 0 and stack.side_traffic["small_429"] > 0, stack.side_traffic


def test_prometheus_scrapes_the_router_with_the_shipped_job(stack: Stack) -> None:
    targets = stack.prometheus.api("targets")["activeTargets"]
    (router,) = [t for t in targets if t["labels"]["job"] == "tfs-router"]
    assert router["health"] == "up", router
    assert router["scrapeUrl"] == f"http://127.0.0.1:{stack.router.rest_port}/monitoring/prometheus/metrics"
    assert stack.prometheus.query('up{job="tfs-router"} == 1')


def test_every_dashboard_query_returns_data(stack: Stack, dashboard: dict[str, Any]) -> None:
    queries = dashboard_queries(dashboard, stack.rate_interval()) + variable_queries(dashboard)
    assert len(queries) > 40
    problems = check_queries(queries, stack.prometheus.query)
    assert not problems, "\n".join(problems)


def test_the_dashboard_annotations_evaluate(stack: Stack, dashboard: dict[str, Any]) -> None:
    variables = variable_values(dashboard)
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            stack.prometheus.query(substitute(annotation["expr"], variables))  # raises PromQLError if bad


def test_the_checker_fails_on_a_missing_series(stack: Stack, dashboard: dict[str, Any]) -> None:
    broken = copy.deepcopy(dashboard)
    renamed = 0
    for panel in broken["panels"]:
        for target in panel.get("targets", []):
            if "tfs_router_split_weight" in target["expr"]:
                target["expr"] = target["expr"].replace("tfs_router_split_weight", "tfs_router_split_weights")
                renamed += 1
    assert renamed == 1
    problems = check_queries(dashboard_queries(broken, stack.rate_interval()), stack.prometheus.query)
    assert len(problems) == 1, problems
    assert problems[0].startswith("panel 'Split weights' target A: empty result: "), problems

    problems = check_queries([Query("no such series", "sum(rate(tfs_router_no_such_series_total[1m]))"),
                              Query("bad syntax", "sum(rate(tfs_router_requests_total[1m])"),
                              Query("only NaN", "vector(0) / vector(0)"),
                              Query("fine", "sum(tfs_router_worker_inflight)")], stack.prometheus.query)
    assert [p.split(":")[0] for p in problems] == ["no such series", "bad syntax", "only NaN"], problems
    assert "empty result" in problems[0] and "query failed" in problems[1] and "only NaN" in problems[2]


def test_every_alert_rule_loads_and_evaluates(stack: Stack) -> None:
    expected = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    deadline = time.monotonic() + 15
    while True:
        loaded = {r["name"]: r for g in stack.prometheus.api("rules")["groups"] for r in g["rules"]}
        if all(r["health"] != "unknown" for r in loaded.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert sorted(loaded) == sorted(expected)
    for name, rule in loaded.items():
        assert rule["health"] == "ok" and not rule.get("lastError"), rule
    for name, expr in expected.items():
        try:
            stack.prometheus.query(expr)  # empty is fine: nothing is (supposed to be) wrong
        except PromQLError as exc:
            pytest.fail(f"alert {name}: {exc}")


def test_every_series_an_alert_names_exists(stack: Stack) -> None:
    """An alert on a misspelt series would never fire: every name in every rule must be scraped."""
    missing = []
    for rule in alert_rules():
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        for name in sorted(names):
            if not stack.prometheus.query(f'count({name}{{job="tfs-router"}})'):
                missing.append(f"{rule['alert']}: {name}")
    assert not missing, missing
