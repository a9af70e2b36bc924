"""Prometheus configuration and alert rules: promtool's own checks and rule unit tests, plus
what promtool cannot know (the metrics exist, every alert has a runbook section)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.conftest import DEPLOY, ROOT, assert_known_metrics, load_yaml, need_tool

PROMETHEUS_DIR = DEPLOY / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
RUNBOOK = ROOT / "docs" / "deploy.md"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = need_tool("promtool")
    return subprocess.run(
        [binary, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60
    )


def alert_rules() -> list[dict[str, Any]]:
    groups = load_yaml(ALERTS)["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file."""
    anchors = set()
    for line in markdown.splitlines():
        match = re.match(r"#{1,6}\s+(.+?)\s*#*\s*$", line)
        if match:
            text = re.sub(r"[`*_\[\]()]", "", match.group(1)).strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return anchors


def test_promtool_accepts_the_config() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_accepts_the_rules() -> None:
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_alerts_fire_on_failures_and_not_on_health() -> None:
    """deploy/prometheus/alerts_test.yml: synthetic series for each failure, and healthy ones."""
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {
        case["alertname"]
        for test in load_yaml(PROMETHEUS_DIR / "alerts_test.yml")["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    untested = {rule["alert"] for rule in alert_rules()} - tested
    assert not untested, f"alerts with no firing unit test: {untested}"


def test_the_config_loads_the_alerts_and_scrapes_the_api() -> None:
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    api = jobs["inferd-api"]
    assert api.get("metrics_path", "/metrics") == "/metrics"
    # the compose service and port of `inferd serve`
    compose = load_yaml(DEPLOY / "compose.yaml")
    assert [sd["names"] for sd in api["dns_sd_configs"]] == [["api"]]
    assert api["dns_sd_configs"][0]["port"] == 8000
    assert "api" in compose["services"]
    assert "8000:8000" in compose["services"]["api"]["ports"]


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_each_alert_is_documented(rule: dict[str, Any]) -> None:
    annotations = rule["annotations"]
    assert annotations.get("summary") and annotations.get("description")
    assert rule["labels"]["severity"] in {"page", "warning"}
    page, _, anchor = annotations["runbook_url"].partition("#")
    assert page == "docs/deploy.md"
    assert anchor == rule["alert"].lower()
    assert anchor in github_anchors(RUNBOOK.read_text()), f"no section #{anchor} in {page}"


def test_alerts_use_only_exported_metrics() -> None:
    assert_known_metrics((rule["expr"] for rule in alert_rules()), "alerts.yml")


def test_the_sla_alert_is_the_documented_one() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    sla = rules["InferdLatencySLABreach"]
    expr = " ".join(sla["expr"].split())
    assert expr.startswith("histogram_quantile(0.95,")
    assert "inference_request_latency_seconds_bucket" in expr
    assert expr.endswith("> 0.05")
    assert sla["for"] == "5m"
    assert rules["InferdLoadShedding"]["for"] == "10m"
    assert "inference_queue_rejections_total[5m]" in rules["InferdLoadShedding"]["expr"]
    assert rules["InferdModelNotReady"]["expr"].strip() == "inference_model_ready == 0"
    assert rules["InferdModelNotReady"]["for"] == "5m"
    assert 'inference_jobs{status="dead"}' in rules["InferdDeadJobs"]["expr"]


def _mounted(path: str) -> Path:
    return (DEPLOY / path).resolve()


def test_compose_mounts_the_config_where_prometheus_reads_it() -> None:
    service = load_yaml(DEPLOY / "compose.yaml")["services"]["prometheus"]
    mounts = dict(volume.split(":")[:2] for volume in service["volumes"])
    source = next(src for src, dst in mounts.items() if dst == "/etc/prometheus")
    assert _mounted(source) == PROMETHEUS_DIR
    assert "--config.file=/etc/prometheus/prometheus.yml" in service["command"]
