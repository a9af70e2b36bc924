"""The Grafana dashboard and its provisioning: structure, variables, metric names, and every
query parsed and evaluated by a real Prometheus."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.deploy.conftest import DEPLOY, Prometheus, assert_known_metrics, load_yaml

GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "inferd.json"
PANEL_TYPES = {"row", "timeseries", "stat", "gauge", "table", "heatmap", "bargauge", "text"}
# Grafana's own variables, replaced with values Prometheus accepts where they stand.
BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "1h",
    "__range_s": "3600",
    "__interval_ms": "60000",
}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def dashboard() -> dict[str, Any]:
    result: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return result


def panels() -> list[dict[str, Any]]:
    found = []
    for panel in dashboard()["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def targets() -> list[tuple[str, dict[str, Any]]]:
    return [(p["title"], t) for p in panels() for t in p.get("targets", [])]


def variables() -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard()["templating"]["list"]}


def substitute(expr: str) -> str:
    """The query Grafana sends with "All" selected: user variables become ``.*``."""
    defined = variables()

    def value(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name in BUILTINS:
            return BUILTINS[name]
        assert name in defined, f"{expr!r} uses the undefined variable ${name}"
        return ".*"

    return _VARIABLE.sub(value, expr)


def test_the_dashboard_is_a_provisionable_dashboard() -> None:
    d = dashboard()
    assert d["uid"] == "inferd" and d["title"]
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    assert d.get("id") is None, "a provisioned dashboard carries no database id"
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels():
        assert panel["type"] in PANEL_TYPES, panel["type"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]


def test_no_panels_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in panels():
        g = panel["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_the_template_variables_filter_by_model_and_version() -> None:
    v = variables()
    assert v["datasource"]["type"] == "datasource" and v["datasource"]["query"] == "prometheus"
    for name in ("model", "version"):
        assert v[name]["type"] == "query"
        assert v[name]["includeAll"] and v[name]["allValue"] == ".*"
        assert_known_metrics([v[name]["definition"]], f"variable {name}")
    for title, target in targets():
        expr = target["expr"]
        uses_model_labels = any(
            m in expr for m in ("inference_request_latency", "inference_batch_", "inference_queue_")
        )
        if uses_model_labels:
            assert 'model=~"$model"' in expr and 'version=~"$version"' in expr, title


def test_the_dashboard_shows_what_operators_need() -> None:
    exprs = " ".join(" ".join(t["expr"].split()) for _, t in targets())
    for quantile in ("0.5", "0.95", "0.99"):
        assert (
            f"histogram_quantile({quantile}, sum by (le, model, version) "
            "(rate(inference_request_latency_seconds_bucket{" in exprs
        )
    assert "rate(inference_batch_size_sum{" in exprs and "rate(inference_batch_size_count{" in exprs
    for metric in (
        "inference_queue_depth",
        "inference_queue_rejections_total",
        "inference_request_timeouts_total",
        "inference_jobs",
        "inference_job_runs_total",
        "inference_model_ready",
    ):
        assert metric in exprs, metric


def test_queries_use_only_exported_metrics() -> None:
    assert_known_metrics((t["expr"] for _, t in targets()), "dashboard")


def test_every_query_parses_and_evaluates(bare_prometheus: Prometheus) -> None:
    """A real Prometheus answers 400 (bad_data) to a query it cannot parse."""
    assert targets()
    for title, target in targets():
        expr = substitute(target["expr"])
        response = bare_prometheus.query(expr)
        assert response.status_code == 200, f"{title}: {expr!r}: {response.text}"
        assert response.json()["status"] == "success"
    for name in ("model", "version"):
        query = variables()[name]["definition"]
        selector = re.fullmatch(r"label_values\((.+), (\w+)\)", query)
        assert selector, query
        assert bare_prometheus.query(substitute(selector.group(1))).status_code == 200


def test_a_broken_query_is_caught(bare_prometheus: Prometheus) -> None:
    response = bare_prometheus.query("sum by (model (rate(inference_batch_size_sum[1m]))")
    assert response.status_code == 400
    with pytest.raises(AssertionError, match="undefined variable"):
        substitute('inference_queue_depth{model=~"$modle"}')


def test_provisioning_points_grafana_at_the_dashboard_and_prometheus() -> None:
    compose = load_yaml(DEPLOY / "compose.yaml")
    grafana = compose["services"]["grafana"]
    mounts = {
        dst: (DEPLOY / src).resolve() for src, dst, *_ in (v.split(":") for v in grafana["volumes"])
    }
    assert mounts["/etc/grafana/provisioning"] == (GRAFANA / "provisioning").resolve()
    provider = load_yaml(GRAFANA / "provisioning" / "dashboards" / "inferd.yml")["providers"][0]
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent.resolve()
    datasource = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    source = datasource["datasources"][0]
    assert source["type"] == "prometheus" and source["isDefault"]
    assert source["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    assert variables()["datasource"]["current"]["value"] == source["uid"]
