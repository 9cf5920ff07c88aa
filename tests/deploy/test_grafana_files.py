"""deploy/grafana: the provisioning files have the structure Grafana reads, the dashboard
names the provisioned datasource everywhere, is laid out sanely, and covers the router's
series. (The dashboard's queries run against a real Prometheus in test_live_stack.py.)"""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from tests.deploy.promstack import (
    DASHBOARD,
    DASHBOARD_PROVIDERS,
    DATASOURCES,
    dashboard_queries,
    metric_names,
    panels,
    substitute,
    variable_values,
)

# Every series the dashboard must show (the list).
REQUIRED_SERIES = {
    "tfs_router_requests_total", "tfs_router_request_latency_seconds_bucket",
    "tfs_router_version_requests_total", "tfs_router_version_latency_seconds_bucket",
    "tfs_router_batch_size_rows_bucket", "tfs_router_batch_size_requests_bucket", "tfs_router_batch_queue_depth",
    "tfs_router_worker_state", "tfs_router_worker_inflight", "tfs_router_worker_restarts_total",
    "tfs_router_shed_total", "tfs_router_quota_shed_total", "tfs_router_admission", "tfs_router_tenant_inflight",
    "tfs_router_rollout_in_progress", "tfs_router_rollout_phase", "tfs_router_rollouts_total",
    "tfs_router_default_version", "tfs_router_worker_versions",
    "tfs_router_split_weight", "tfs_router_canary_state",
}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


@pytest.fixture(scope="module")
def datasource_uid() -> str:
    doc = yaml.safe_load(DATASOURCES.read_text())
    (prometheus,) = [d for d in doc["datasources"] if d["type"] == "prometheus"]
    uid: str = prometheus["uid"]
    return uid


def test_datasource_provisioning() -> None:
    doc = yaml.safe_load(DATASOURCES.read_text())
    assert doc["apiVersion"] == 1
    sources = doc["datasources"]
    assert isinstance(sources, list) and sources
    for source in sources:
        for key in ("name", "type", "url", "uid"):
            assert isinstance(source.get(key), str) and source[key], f"datasource without {key}: {source}"
    (prometheus,) = [d for d in sources if d["type"] == "prometheus"]
    assert prometheus["url"] == "http://prometheus:9090"
    assert prometheus.get("access", "proxy") == "proxy"  # the browser cannot reach the compose network
    assert len(prometheus["uid"]) <= 40  # Grafana's limit on uids
    assert sum(bool(d.get("isDefault")) for d in sources) <= 1


def test_dashboard_provider_provisioning() -> None:
    doc = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())
    assert doc["apiVersion"] == 1
    providers = doc["providers"]
    assert isinstance(providers, list) and providers
    for provider in providers:
        assert provider["name"]
        assert provider.get("type", "file") == "file"
        path = provider["options"]["path"]
        assert isinstance(path, str) and path.startswith("/"), provider


def test_dashboard_is_a_provisionable_dashboard(dashboard: dict[str, Any]) -> None:
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and len(dashboard["uid"]) <= 40
    assert dashboard["title"]
    assert dashboard.get("id") is None  # provisioning assigns it
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"


def test_every_query_uses_the_provisioned_datasource(dashboard: dict[str, Any], datasource_uid: str) -> None:
    def check(where: str, ds: Any) -> None:
        assert ds == {"type": "prometheus", "uid": datasource_uid}, f"{where}: datasource {ds}"

    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        check(f"panel {panel['title']!r}", panel.get("datasource"))
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            check(f"panel {panel['title']!r} target {target.get('refId')}", target.get("datasource"))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            check(f"variable {var['name']}", var.get("datasource"))
    for annotation in dashboard["annotations"]["list"]:
        if not annotation.get("builtIn"):
            check(f"annotation {annotation['name']!r}", annotation.get("datasource"))


def test_panel_targets_are_well_formed(dashboard: dict[str, Any]) -> None:
    variables = variable_values(dashboard)
    for panel in panels(dashboard):
        refs = [t.get("refId") for t in panel.get("targets", [])]
        assert all(refs) and len(refs) == len(set(refs)), f"panel {panel.get('title')!r}: refIds {refs}"
        for target in panel.get("targets", []):
            assert target.get("expr", "").strip(), f"panel {panel['title']!r} target {target['refId']}: no expr"
            assert "$" not in substitute(target["expr"], variables)


def test_panels_tile_the_grid(dashboard: dict[str, Any]) -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:  # top level: none of the rows is collapsed
        pos = panel["gridPos"]
        assert pos["w"] >= 1 and pos["h"] >= 1 and 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"{panel['title']!r} overlaps {taken[(x, y)]!r}"
                taken[(x, y)] = panel["title"]


def test_dashboard_shows_every_required_series(dashboard: dict[str, Any]) -> None:
    shown = set().union(*(metric_names(q.expr) for q in dashboard_queries(dashboard)))
    missing = sorted(REQUIRED_SERIES - shown)
    assert not missing, f"the dashboard shows none of {missing}"


def test_panels_explain_themselves(dashboard: dict[str, Any]) -> None:
    for panel in panels(dashboard):
        if panel["type"] != "row":
            assert panel.get("description"), f"panel {panel['title']!r} has no description"
            assert panel["targets"][0].get("legendFormat"), f"panel {panel['title']!r}: no legend format"
