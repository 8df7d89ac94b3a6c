"""Every ClickHouse panel of grafana/dashboards/llm-usage.json shows what GET /api/v1/usage answers.

No Grafana server runs here, so each panel's SQL goes through what Grafana and the ClickHouse
plugin would do to it (tests/grafana_macros.py: ``$__conditionalAll``, template variables,
``$__toTime``, ported from grafana/clickhouse-datasource v4.20.0, commit
973c4a508220c378ef8a477f3133bba935ca2345, and grafana/scenes) and then runs on real embedded
ClickHouse holding seeded traffic. Each result is compared cell by cell with the API's answer for
the same scope, at the same instant (the API's clock is pinned and Grafana's range ends at that
instant plus a fraction of a second, which both truncate).

Scopes are reached the way a person reaches them: from "All" through the top table's drill-down
links to one organization, then to one of its tokens.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import msgspec
import pytest

from exporter.app import create_app, runtime
from exporter.config import load_config
from exporter.demo import catalog, generate
from exporter.records import Row, encode_rows, format_timestamp
from exporter.writer import drop_duplicates

from .grafana_macros import ALL_VALUE, TimeRange, Variable, interpolate, option_values, render_query

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = json.loads((REPO / "grafana/dashboards/llm-usage.json").read_text())
PANELS = {panel["title"]: panel for panel in DASHBOARD["panels"]}
VARIABLES = {variable["name"]: variable for variable in DASHBOARD["templating"]["list"]}
KIND_HEADER = {"org": "Organization", "token": "Token Name", "user_id": "User ID"}
SPANS = {"1h": 3600, "1d": 86400, "1w": 7 * 86400}
STAT_METRIC = {
    "Total Requests": "total_requests",
    "Failed Requests": "failed_requests",
    "Avg Resp Time (Completion)": "avg_response_time_ms_completion",
    "Avg Resp Time (Embedding)": "avg_response_time_ms_embedding",
    "Input Tokens": "input_tokens",
    "Output Tokens": "output_tokens",
    "Total Tokens": "total_tokens",
}

# A fixed "now" with a fraction of a second, so truncation to the second is exercised.
NOW_UTC = datetime(2026, 11, 20, 14, 37, 41, 734000, tzinfo=timezone.utc).timestamp()
# Just after Europe/Vienna switched to summer time: the 1w view holds a 23-hour day.
NOW_DST = datetime(2026, 3, 31, 10, 17, 23, 412000, tzinfo=timezone.utc).timestamp()

# Quotes, an ampersand and a double quote: SQL quoting and link encoding both have to hold.
ODD_ORG = "O'Hara & Sons"
ODD_TOKEN = 'deploy "main" #1'


@dataclass
class Seeded:
    app: Any
    now: float
    tz: str


def _insert(app, rows: Iterator[Row], tag: str) -> None:
    store = runtime(app).store
    part = 0
    while batch := list(islice(rows, 20_000)):
        payload, _ = drop_duplicates(encode_rows(batch), store.existing_request_ids)
        store.insert_rows(payload, f"{tag}-{part}")
        part += 1


def _edge_rows(now: float) -> list[Row]:
    """ODD_ORG's records around the 1h window's second-exact edges: 3 inside, 2 just outside."""
    end_ms = int(now) * 1000
    start_ms = end_ms - 3600 * 1000
    stamps = {
        "at-start": start_ms,  # included: start <= timestamp
        "before-start": start_ms - 1,
        "middle": start_ms + 1800 * 1000 + 5,
        "at-end": end_ms,  # included: timestamp <= end
        "after-end": end_ms + 1,  # later than the window's last second, though before "now"
    }
    rows = []
    for index, (name, stamp) in enumerate(stamps.items()):
        rows.append(Row(
            timestamp=format_timestamp(stamp), org=ODD_ORG, model="gpt-4o", endpoint="completion",
            status_code=500 if name == "middle" else 200, response_time_ms=100.0 + index, input_tokens=10, output_tokens=index,
            token_name=ODD_TOKEN, token_owner="", service_account="release-bot", user_id=f"u{index}", request_id=f"edge-{name}",
        ))
    return rows


def _seed(chdb_dir: Path, tmp: Path, now: float, tz: str, events: int) -> Seeded:
    config = load_config(None, {
        "data_dir": str(tmp / "data"),
        "timezone": tz,
        "clickhouse": {"dsn": f"chdb://{chdb_dir}", "database": f"t_{uuid.uuid4().hex[:12]}", "retention_days": 0},
        "models": [msgspec.to_builtins(entry) for entry in catalog()],
    }, environ={})
    app = create_app(config, start_writer=False, clock=lambda: now)
    _insert(app, generate(events, 8.0, 11, now=now), "demo")
    _insert(app, iter(_edge_rows(now)), "edges")
    return Seeded(app, now, tz)


@pytest.fixture(scope="module")
def seeded(chdb_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    built = _seed(chdb_dir, tmp_path_factory.mktemp("grafana-usage"), NOW_UTC, "UTC", 20_000)
    yield built
    runtime(built.app).shutdown(0)


@pytest.fixture(scope="module")
def seeded_dst(chdb_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    built = _seed(chdb_dir, tmp_path_factory.mktemp("grafana-usage-dst"), NOW_DST, "Europe/Vienna", 6_000)
    yield built
    runtime(built.app).shutdown(0)


# --- what Grafana would do --------------------------------------------------------------------


class Dashboard:
    """The usage dashboard evaluated for one scope, the way Grafana evaluates it."""

    def __init__(self, seeded: Seeded, org: str | None, token: str | None, timeframe: str, top: int) -> None:
        self.store = runtime(seeded.app).store
        to_ms = int(seeded.now * 1000)
        # The panels' relative time override ("$timeframe") gives from = now - span; the SQL
        # derives its window from $__toTime alone, so `from` only has to be plausible.
        self.range = TimeRange(to_ms - SPANS[timeframe] * 1000, to_ms)
        self.vars: dict[str, Variable] = {
            "timeframe": Variable("timeframe", timeframe),
            "top": Variable("top", str(top)),
            "tz": Variable("tz", seeded.tz),
        }
        self.vars["org"] = self._query_variable("org", org)
        self.vars["token"] = self._query_variable("token", token)
        kinds = self.options("top_kind")
        assert len(kinds) == 1
        self.vars["top_kind"] = Variable("top_kind", kinds[0])

    def run(self, raw_sql: str) -> tuple[list[str], list[tuple]]:
        sql = render_query(raw_sql, self.vars, self.range)
        result = self.store.reader.query(sql)
        return list(result.column_names), result.result_rows

    def options(self, name: str) -> list[str]:
        return option_values(self.run(VARIABLES[name]["query"])[1])

    def _query_variable(self, name: str, chosen: str | None) -> Variable:
        options = self.options(name)
        if chosen is not None:
            # Grafana offers only what the variable's query returns.
            assert chosen in options, f"{chosen!r} is not offered by ${name}: {options[:20]}"
        return Variable(name, chosen if chosen is not None else ALL_VALUE, options=options,
                        include_all=VARIABLES[name]["includeAll"])

    def frame(self, title: str) -> list[dict[str, Any]]:
        panel = PANELS[title]
        if panel["datasource"]["uid"] == "-- Dashboard --":
            source_id = panel["targets"][0]["panelId"]
            panel = next(p for p in DASHBOARD["panels"] if p["id"] == source_id)
        [target] = panel["targets"]
        columns, rows = self.run(target["rawSql"])
        return [dict(zip(columns, row)) for row in rows]

    def stat(self, title: str) -> Any:
        """The value a stat panel shows: its field regex picks one column of its (one-row) frame."""
        pattern = PANELS[title]["options"]["reduceOptions"]["fields"]
        assert pattern.startswith("/^") and pattern.endswith("$/")
        column = pattern[2:-2]
        [row] = self.frame(title)
        return row[column]

    def link(self, row: dict[str, Any]) -> dict[str, str]:
        """The variables a click on the top table's name cell sets (its data link, interpolated)."""
        overrides = PANELS["Request Counts by ${top_kind}"]["fieldConfig"]["overrides"]
        [links] = [prop["value"] for o in overrides for prop in o["properties"] if prop["id"] == "links"]
        [link] = links
        fields = lambda path: str(row[path.split(".", 1)[1]])  # noqa: E731  ${__data.fields.<name>}
        url = interpolate(link["url"], self.vars, default_format=None, scoped={"__data": fields})
        parts = urlsplit(url)
        assert parts.path == f"/d/{DASHBOARD['uid']}/llm-usage"
        return dict(parse_qsl(parts.query, keep_blank_values=True))


def api(seeded: Seeded, org: str | None, token: str | None, timeframe: str, top: int) -> dict[str, Any]:
    params = {"org": org or "all", "timeframe": timeframe, "top": str(top)}
    if token is not None:
        params["token"] = token
    answer = seeded.app.test_client().get("/api/v1/usage", query_string=params)
    assert answer.status_code == 200, answer.json
    return answer.json


def compare(seeded: Seeded, org: str | None, token: str | None, timeframe: str, top: int = 10) -> tuple[dict, Dashboard, list[dict]]:
    """Assert every panel equals the API for this scope; return both for further checks."""
    expected = api(seeded, org, token, timeframe, top)
    board = Dashboard(seeded, org, token, timeframe, top)
    scope = expected["scope"]

    # The metrics bar: seven stat panels fed by one query.
    for title, metric in STAT_METRIC.items():
        value = board.stat(title)
        if metric.startswith("avg_") and value is not None:
            # The panel carries the full mean; the API rounds it to the microsecond.
            value = round(value, 3)
        assert value == expected["metrics"][metric], (title, scope)

    # Requests Over Time: every bucket of the window, zeros included.
    series = [{"t": row["time"].strftime("%Y-%m-%dT%H:%M:%SZ"), "requests": row["requests"]} for row in board.frame("Requests Over Time")]
    assert series == expected["timeseries"], scope

    # The top table, column by column, under the header the API's top_kind names.
    header = KIND_HEADER[scope["top_kind"]]
    assert board.vars["top_kind"].value == header
    table = board.frame("Request Counts by ${top_kind}")
    shown = [
        {"rank": row["#"], "name": row[header], "requests": row["Requests"], "input_tokens": row["Input Tokens"],
         "output_tokens": row["Output Tokens"], "total_tokens": row["Total Tokens"], "token_owner": row["Token Owner"],
         "service_account": row["Service Account"]}
        for row in table
    ]
    assert shown == expected["top"], scope

    # Requests by Model, configured models with 0 included.
    models = [{"model": row["Model"], "requests": row["Requests"]} for row in board.frame("Requests by Model")]
    assert models == expected["models"], scope
    return expected, board, table


@pytest.mark.parametrize("timeframe", ["1h", "1d", "1w"])
def test_every_panel_matches_the_api_from_all_orgs_down_to_one_token(seeded: Seeded, timeframe: str) -> None:
    everything, board, table = compare(seeded, None, None, timeframe)
    assert everything["metrics"]["total_requests"] > 0 and len(table) > 1
    assert board.options("token") == []  # no org chosen: nothing to pick a token from

    # Drill down from the busiest organization...
    link = board.link(table[0])
    assert link["var-org"] == table[0]["Organization"] and link["var-token"] == ALL_VALUE
    assert link["var-timeframe"] == timeframe and link["var-top"] == "10"
    org_view, board, table = compare(seeded, link["var-org"], None, timeframe)
    assert org_view["scope"]["top_kind"] == "token" and table
    assert any(row["token_owner"] for row in org_view["top"]) or any(row["service_account"] for row in org_view["top"])

    # ...to its busiest token, whose rows are user ids.
    link = board.link(table[0])
    assert link["var-org"] == org_view["scope"]["org"] and link["var-token"] == table[0]["Token Name"]
    token_view, board, _ = compare(seeded, link["var-org"], link["var-token"], timeframe)
    assert token_view["scope"]["top_kind"] == "user_id"
    assert token_view["metrics"]["total_requests"] == org_view["top"][0]["requests"]


def test_window_edges_quoting_and_drill_down_links_for_an_odd_org_name(seeded: Seeded) -> None:
    org_view, board, table = compare(seeded, ODD_ORG, None, "1h")
    # Independent count: of the five records around the edges, at-start, middle and at-end count.
    assert org_view["metrics"]["total_requests"] == 3
    assert org_view["metrics"]["failed_requests"] == 1
    assert org_view["metrics"]["input_tokens"] == 30 and org_view["metrics"]["output_tokens"] == 0 + 2 + 3
    assert org_view["metrics"]["avg_response_time_ms_completion"] == pytest.approx((100 + 102 + 103) / 3, abs=1e-3)
    [row] = table
    assert row["Token Name"] == ODD_TOKEN and row["Service Account"] == "release-bot" and row["Token Owner"] is None
    link = board.link(row)
    assert (link["var-org"], link["var-token"]) == (ODD_ORG, ODD_TOKEN)
    token_view, _, users = compare(seeded, ODD_ORG, ODD_TOKEN, "1h")
    assert sorted(r["User ID"] for r in users) == ["u0", "u2", "u3"]

    everything, board, table = compare(seeded, None, None, "1h", top=100)
    odd = next(row for row in table if row["Organization"] == ODD_ORG)
    assert board.link(odd) == {"var-timeframe": "1h", "var-top": "100", "var-org": ODD_ORG, "var-token": ALL_VALUE}


@pytest.mark.parametrize("timeframe", ["1d", "1w"])
def test_buckets_follow_the_time_zone_across_a_daylight_saving_change(seeded_dst: Seeded, timeframe: str) -> None:
    expected, _, _ = compare(seeded_dst, None, None, timeframe, top=25)
    starts = [datetime.strptime(point["t"], "%Y-%m-%dT%H:%M:%SZ") for point in expected["timeseries"]]
    if timeframe == "1w":
        gaps = {(b - a).total_seconds() / 3600 for a, b in zip(starts, starts[1:])}
        assert gaps == {24, 23}  # Vienna's 29 March 2026 had 23 hours
    compare(seeded_dst, "acme", None, timeframe)
