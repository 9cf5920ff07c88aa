"""deploy/prometheus: promtool accepts the config and the rules, the rules' unit tests pass,
a broken rules file is refused, and every alert carries what an on-call person needs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.promstack import (
    ALERT_RULES,
    ALERT_TESTS,
    PROMETHEUS_CONFIG,
    alert_rules,
    run_promtool,
)

SEVERITIES = {"critical", "warning", "info"}


def output(run: subprocess.CompletedProcess[str]) -> str:
    return f"exit {run.returncode}\n{run.stdout}\n{run.stderr}"


def test_promtool_checks_the_config_and_the_rules_it_loads() -> None:
    run = run_promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert run.returncode == 0, output(run)
    assert "is valid prometheus config file" in run.stdout, output(run)
    assert "SUCCESS: 1 rule files found" in run.stdout, output(run)  # alerts.yml, found beside it


def test_promtool_checks_the_rules() -> None:
    run = run_promtool("check", "rules", str(ALERT_RULES))
    assert run.returncode == 0, output(run)
    assert f"SUCCESS: {len(alert_rules())} rules found" in run.stdout, output(run)


def test_alert_rules_unit_tests_pass() -> None:
    """tests/deploy/alerts_test.yml: synthetic series in, expected alerts (labels and rendered annotations) out."""
    run = run_promtool("test", "rules", ALERT_TESTS.name, cwd=ALERT_TESTS.parent)
    assert run.returncode == 0, output(run)
    assert "SUCCESS" in run.stdout, output(run)


def test_every_alert_has_a_unit_test_where_it_fires() -> None:
    doc = yaml.safe_load(ALERT_TESTS.read_text())
    fired = {case["alertname"] for test in doc["tests"] for case in test["alert_rule_test"] if case["exp_alerts"]}
    missing = sorted({rule["alert"] for rule in alert_rules()} - fired)
    assert not missing, f"alerts never seen firing in {ALERT_TESTS.name}: {missing}"


BREAKAGES = {
    # name: (text in alerts.yml, its broken replacement, what promtool must say)
    "unbalanced parenthesis": ('expr: up{job="tfs-router"} == 0', 'expr: up{job="tfs-router"} == (0',
                               "unclosed left parenthesis"),
    "unknown function": ("increase(tfs_router_worker_restarts_total", "increse(tfs_router_worker_restarts_total",
                         'unknown function with name "increse"'),
    "bad label matcher": ('{state="dead"}', '{state=="dead"}', "parse error"),
    "broken annotation template": ('summary: "tfs-router {{ $labels.instance }} cannot be scraped"',
                                   'summary: "tfs-router {{ $labels.instance } cannot be scraped"',
                                   'annotation "summary"'),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_a_broken_rules_file_fails_the_checks(breakage: str, tmp_path: Path) -> None:
    good, bad, message = BREAKAGES[breakage]
    text = ALERT_RULES.read_text()
    assert good in text, f"{good!r} is no longer in alerts.yml: update this test"
    broken = tmp_path / "alerts.yml"
    broken.write_text(text.replace(good, bad, 1))
    run = run_promtool("check", "rules", str(broken))
    assert run.returncode != 0, output(run)
    assert message in run.stdout + run.stderr, output(run)
    # ... and the config that loads it fails too.
    shutil.copy(PROMETHEUS_CONFIG, tmp_path / "prometheus.yml")
    run = run_promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert run.returncode != 0, output(run)


def test_the_config_scrapes_the_router_service() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "tfs-router"]
    assert job["metrics_path"] in ("/monitoring/prometheus/metrics", "/metrics")
    assert job["static_configs"][0]["targets"] == ["router:8501"]
    assert job.get("scrape_interval", config["global"]["scrape_interval"]) == "5s"


def test_every_alert_says_how_bad_and_what_happened() -> None:
    rules = alert_rules()
    assert len({r["alert"] for r in rules}) == len(rules), "duplicate alert names"
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"TfsRouter[A-Za-z0-9]+", name), name
        assert "for" in rule, f"{name}: say `for:` (0m for an event)"
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert set(annotations) >= {"summary", "description"}, name
        for key in ("summary", "description"):
            assert "$labels." in annotations[key], f"{name}: its {key} names no label value"
