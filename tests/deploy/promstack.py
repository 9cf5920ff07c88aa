"""Helpers for the deploy/ checks: Debian's Prometheus binaries, a throwaway Prometheus
server, and the dashboard-query checker.

The binaries come from Debian's ``prometheus`` package (``make test`` installs it
when it is missing and we are root). A missing binary fails the test with the
fix in the message: these checks are never skipped silently.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import ROOT

DEPLOY = ROOT / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERT_RULES = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = Path(__file__).resolve().parent / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "tfs-router.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"

# What the checks substitute for Grafana's interval macros. The test Prometheus
# scrapes every second, so these windows hold plenty of samples; the live test
# widens $__rate_interval to reach back to the start of its load run.
RATE_INTERVAL = "1m"
INTERVAL = "5s"
RANGE = "5m"


def binary(name: str) -> str:
    """The path of Debian's ``name`` (``promtool``, ``prometheus``), or a test failure saying how to get it."""
    override = os.environ.get(name.upper())  # $PROMTOOL, $PROMETHEUS: that file and no other
    candidates = [override] if override else [shutil.which(name), f"/usr/bin/{name}"]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    where = f"${name.upper()}={override}" if override else f"PATH and /usr/bin/{name}"
    pytest.fail(
        f"{name} not found (looked at {where}). These checks need Debian's prometheus package: "
        f"`apt-get install prometheus` as root (`make test` installs it when it is missing).",
        pytrace=False,
    )


def run_promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([binary("promtool"), *args], check=False, capture_output=True, text=True, timeout=60, cwd=cwd)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def alert_rules(path: Path = ALERT_RULES) -> list[dict[str, Any]]:
    doc = yaml.safe_load(path.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def scrape_config(scrape_target: str, self_target: str, *, rules: Path = ALERT_RULES,
                interval: str = "1s") -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with its targets replaced, scraping every ``interval``,
    and the shipped rules file by absolute path."""
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval=interval, scrape_timeout=interval, evaluation_interval=interval)
    config["rule_files"] = [str(rules)]
    targets = {"tfs-router": scrape_target, "prometheus": self_target}
    for job in config["scrape_configs"]:
        job["static_configs"][0]["targets"] = [targets[job["job_name"]]]
    return config


class PromQLError(Exception):
    """Prometheus refused a query (HTTP 400/422: it does not parse or cannot be evaluated)."""


class PrometheusServer:
    """Debian's /usr/bin/prometheus on a free loopback port, with its storage in ``workdir``."""

    def __init__(self, config: Callable[[int], Mapping[str, Any]], workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(dict(config(self.port)), sort_keys=False))
        (workdir / "data").mkdir()
        self.log_path = workdir / "prometheus.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(
            [binary("prometheus"), f"--config.file={self.config_path}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=workdir,
        )

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"prometheus not ready after {timeout}s:\n{self.log()}")

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:  # 400 bad_data, 422 execution errors: the reason is in the body
            body = json.loads(exc.read())
            raise PromQLError(f"{body.get('errorType')}: {body.get('error')}") from None
        if body.get("status") != "success":
            raise PromQLError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query at the current time; its result as a list of samples."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# -- the dashboard ---------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    where: str  # "panel 'Title' target A", for messages
    expr: str


def panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, and the panels inside collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def variable_values(dashboard: Mapping[str, Any]) -> dict[str, str]:
    """What each dashboard variable stands for when "All" is selected (its allValue)."""
    values = {}
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") in ("query", "custom") and var.get("includeAll") and var.get("allValue"):
            values[var["name"]] = var["allValue"]
        elif var.get("type") == "constant":
            values[var["name"]] = var["query"]
        else:
            raise AssertionError(f"variable {var.get('name')!r}: give it includeAll and an allValue "
                                 f"(the checks substitute it)")
    return values


def substitute(expr: str, variables: Mapping[str, str], rate_interval: str = RATE_INTERVAL) -> str:
    """The query Grafana would send with every variable at "All" and fixed interval macros."""
    macros = {"__rate_interval": rate_interval, "__interval": INTERVAL, "__range": RANGE, **variables}

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name not in macros:
            raise AssertionError(f"unknown variable ${name} in {expr!r}")
        return macros[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", value, expr)


def dashboard_queries(dashboard: Mapping[str, Any], rate_interval: str = RATE_INTERVAL) -> list[Query]:
    """Every panel target's expression, variables substituted."""
    variables = variable_values(dashboard)
    queries = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            if target.get("hide"):
                continue
            where = f"panel {panel.get('title')!r} target {target.get('refId')}"
            queries.append(Query(where, substitute(target["expr"], variables, rate_interval)))
    return queries


def variable_queries(dashboard: Mapping[str, Any]) -> list[Query]:
    """The query variables' ``label_values(selector, label)`` as the PromQL that has the same values."""
    variables = variable_values(dashboard)
    out = []
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        definition = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\)\s*", definition)
        assert match, f"variable {var['name']}: only label_values(selector, label) is checked, not {definition!r}"
        selector, label = match.groups()
        out.append(Query(f"variable ${var['name']}",
                         f"count by ({label}) ({substitute(selector, variables)})"))
    return out


def check_queries(queries: list[Query], run: Callable[[str], list[dict[str, Any]]]) -> list[str]:
    """Runs each query; a problem for each that fails, returns nothing, or returns only NaN."""
    problems = []
    for q in queries:
        try:
            result = run(q.expr)
        except PromQLError as exc:
            problems.append(f"{q.where}: query failed ({exc}): {q.expr}")
            continue
        if not result:
            problems.append(f"{q.where}: empty result: {q.expr}")
        elif all(math.isnan(float(sample["value"][1])) for sample in result):
            problems.append(f"{q.where}: only NaN: {q.expr}")
    return problems


METRIC_NAME = re.compile(r"\b(tfs_router_[a-z0-9_]+|:tensorflow:serving:[a-z_]+|up)\b(?!\s*\()")


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (this project's, and ``up``)."""
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return set(METRIC_NAME.findall(without_strings))
