"""The dashboards' structure: what Grafana would reject or silently show wrong, checked offline."""

from __future__ import annotations

import json
import re
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest
import yaml

from .grafana_macros import variable_refs

REPO = Path(__file__).resolve().parent.parent
DASHBOARD_FILES = sorted((REPO / "grafana/dashboards").glob("*.json"))
DATASOURCES = yaml.safe_load((REPO / "grafana/provisioning/datasources/datasources.yml").read_text())["datasources"]
PROVISIONED_UIDS = {ds["uid"]: ds["type"] for ds in DATASOURCES}
BUILTIN_DATASOURCES = {"-- Dashboard --", "-- Grafana --", "-- Mixed --"}
# Grafana's global variables and data-link names, and the plugin's macros ($__toTime, ...).
BUILTIN_PREFIX = "__"


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows keep their panels inside
    return panels


def strings(node: Any) -> list[str]:
    """Every string anywhere in a JSON value."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for value in node.values() for s in strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in strings(value)]
    return []


def test_both_dashboards_exist_with_their_uids() -> None:
    uids = {load(path)["uid"]: path.name for path in DASHBOARD_FILES}
    assert uids == {"llm-usage": "llm-usage.json", "llm-operations": "llm-operations.json"}


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_panel_ids_are_unique_and_the_grid_has_no_overlap(path: Path) -> None:
    dashboard = load(path)
    panels = all_panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), ids
    boxes = []
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["y"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, f"{panel['title']} is wider than the 24-column grid"
        boxes.append((panel["title"], grid["x"], grid["y"], grid["x"] + grid["w"], grid["y"] + grid["h"]))
    for (a, ax0, ay0, ax1, ay1), (b, bx0, by0, bx1, by1) in combinations(boxes, 2):
        assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, f"{a!r} overlaps {b!r}"


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_every_datasource_is_provisioned_with_the_right_type(path: Path) -> None:
    dashboard = load(path)
    refs = []
    for panel in all_panels(dashboard):
        if panel["type"] == "row":
            continue
        refs.append((panel["title"], panel["datasource"]))
        refs += [(panel["title"], target["datasource"]) for target in panel["targets"]]
    refs += [(v["name"], v["datasource"]) for v in dashboard["templating"]["list"] if "datasource" in v]
    refs += [(a["name"], a["datasource"]) for a in dashboard["annotations"]["list"]]
    assert refs
    for where, ref in refs:
        if ref["uid"] in BUILTIN_DATASOURCES:
            continue
        assert ref["uid"] in PROVISIONED_UIDS, f"{where}: datasource {ref['uid']} is not provisioned"
        assert ref["type"] == PROVISIONED_UIDS[ref["uid"]], where


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_every_variable_used_is_defined_before_use(path: Path) -> None:
    dashboard = load(path)
    defined = [v["name"] for v in dashboard["templating"]["list"]]
    assert len(defined) == len(set(defined))
    for index, variable in enumerate(dashboard["templating"]["list"]):
        # A variable's query may use only variables defined above it (Grafana resolves in order).
        used = {name for text in strings(variable.get("query", "")) for name in variable_refs(text)}
        unknown = {n for n in used if not n.startswith(BUILTIN_PREFIX)} - set(defined[:index])
        assert not unknown, f"variable {variable['name']} uses {unknown}"
    for panel in all_panels(dashboard) + dashboard["annotations"]["list"]:
        used = {name for text in strings(panel) for name in variable_refs(text)}
        unknown = {n for n in used if not n.startswith(BUILTIN_PREFIX)} - set(defined)
        assert not unknown, f"{panel.get('title') or panel.get('name')} uses undefined {unknown}"


def test_usage_dashboard_shape() -> None:
    dashboard = load(REPO / "grafana/dashboards/llm-usage.json")
    panels = {panel["title"]: panel for panel in dashboard["panels"]}
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert [o["value"] for o in variables["timeframe"]["options"]] == ["1h", "1d", "1w"]
    assert variables["timeframe"]["current"]["value"] == "1d"
    assert [o["value"] for o in variables["top"]["options"]] == ["10", "25", "100"]
    assert variables["org"]["includeAll"] and variables["token"]["includeAll"]
    stats = [p for p in dashboard["panels"] if p["type"] == "stat"]
    assert [p["title"] for p in stats] == [
        "Total Requests", "Failed Requests", "Avg Resp Time (Completion)", "Avg Resp Time (Embedding)",
        "Input Tokens", "Output Tokens", "Total Tokens",
    ]
    assert all(p["fieldConfig"]["defaults"]["unit"] for p in stats)
    # Stats that reuse another panel's result point at a panel that runs a query.
    by_id = {p["id"]: p for p in dashboard["panels"]}
    for panel in stats:
        if panel["datasource"]["uid"] == "-- Dashboard --":
            assert by_id[panel["targets"][0]["panelId"]]["targets"][0]["rawSql"]
    # The timeframe variable, not the time picker, sets every ClickHouse panel's window.
    for panel in dashboard["panels"]:
        assert panel["timeFrom"] == "$timeframe", panel["title"]
    assert dashboard["timepicker"]["hidden"] is True
    assert panels["Requests Over Time"]["type"] == "timeseries"
    assert panels["Requests by Model"]["type"] == "barchart"
    assert panels["Request Counts by ${top_kind}"]["type"] == "table"


def test_queries_keep_macros_out_of_comments_and_strings() -> None:
    """macropro skips comments and literals; the test helper refuses both, so keep them out."""
    for path in DASHBOARD_FILES:
        for text in strings(load(path)):
            if "$__" in text and "SELECT" in text:
                assert "--" not in re.sub(r"'[^']*'", "''", text), path.name


def test_dashboards_provider_points_at_the_mounted_folder() -> None:
    provider = yaml.safe_load((REPO / "grafana/provisioning/dashboards/dashboards.yml").read_text())["providers"]
    [only] = provider
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{only['options']['path']}:ro" in mounts


def test_the_layout_pictures_in_the_readme_match_the_dashboards() -> None:
    """docs/img/*-layout.svg are drawn from the JSON by grafana/render_layout.py; rerun it after a layout change."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_layout", REPO / "grafana/render_layout.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rendered = module.outputs()
    assert {path.name for path in rendered} == {"llm-usage-layout.svg", "llm-operations-layout.svg"}
    for path, svg in rendered.items():
        assert path.read_text() == svg, f"{path.name} is stale: run python grafana/render_layout.py"
