"""Every PromQL query of grafana/dashboards/llm-operations.json runs on a real Prometheus holding the
exporter's own metrics, and the key panels show the numbers the traffic implies.

The exporter (in-process, real ingest and writer) takes the same batch of records every 15
seconds of simulated time; after each step its ``/metrics`` answer (OpenMetrics) is stamped with
that step's time. ``promtool tsdb create-blocks-from openmetrics`` turns the stamped scrapes into
TSDB blocks and Debian's Prometheus serves them, so every rate is exact (a counter growing by the
same amount per scrape has that amount / 15 s as its rate, extrapolation included) and the test
needs no sleeping. Prometheus also loads prometheus/rules, so ``ALERTS`` exists as a series name.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from exporter.app import create_app, runtime
from exporter.config import load_config
from exporter.metrics import RESPONSE_TIME_BUCKETS_S

from .conftest import flush
from .grafana_macros import Variable, interpolate

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = json.loads((REPO / "grafana/dashboards/llm-operations.json").read_text())
STEP_S = 15
STEPS = 12
# Grafana: $__rate_interval = max($__interval + scrape interval, 4 * scrape interval); the
# datasource declares a 15 s scrape interval, and a dashboard-wide view makes $__interval small.
RATE_INTERVAL = "1m"

# One step's traffic: (org, model, path, status, latency ms, input tokens, output tokens).
BATCH = [
    ("acme", "gpt-4o", "/v1/chat/completions", 200, 300.0, 100, 40),
    ("acme", "gpt-4o", "/v1/chat/completions", 200, 300.0, 100, 40),
    ("acme", "gpt-4o", "/v1/chat/completions", 200, 300.0, 100, 40),
    ("acme", "gpt-4o", "/v1/chat/completions", 500, 2000.0, 0, 0),
    ("globex", "text-embedding-3-small", "/v1/embeddings", 200, 40.0, 250, 0),
    ("globex", "text-embedding-3-small", "/v1/embeddings", 200, 40.0, 250, 0),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _records(step: int, start: float) -> list[dict[str, Any]]:
    return [
        {"timestamp": start + step * STEP_S, "org": org, "model": model, "path": path, "status_code": status,
         "response_time_ms": latency, "input_tokens": tokens_in, "output_tokens": tokens_out,
         "request_id": f"ops-{step}-{index}"}
        for index, (org, model, path, status, latency, tokens_in, tokens_out) in enumerate(BATCH)
    ]


def _openmetrics(scrapes: list[tuple[float, str]]) -> str:
    """Merge stamped scrapes into one OpenMetrics text: each family once, each series in time order."""
    families: dict[str, tuple[str, str]] = {}
    samples: dict[str, dict[tuple, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for stamp, text in scrapes:
        for family in text_string_to_metric_families(text):
            families[family.name] = (family.type, family.documentation)
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                samples[family.name][key].append((stamp, sample.value))
    lines = []
    for name, (kind, doc) in families.items():
        lines.append(f"# HELP {name} {doc}")
        lines.append(f"# TYPE {name} {kind}")
        for (sample_name, labels), points in samples[name].items():
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            selector = f"{sample_name}{{{label_text}}}" if labels else sample_name
            for stamp, value in points:
                lines.append(f"{selector} {_number(value)} {stamp:.3f}")
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class Prometheus:
    def __init__(self, url: str, proc: subprocess.Popen[bytes], evaluation_time: float) -> None:
        self.url = url
        self.proc = proc
        self.time = evaluation_time

    def instant(self, expr: str) -> list[dict[str, Any]]:
        answer = requests.get(f"{self.url}/api/v1/query", params={"query": expr, "time": self.time}, timeout=30).json()
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def range(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        answer = requests.get(f"{self.url}/api/v1/query_range",
                              params={"query": expr, "start": start, "end": end, "step": STEP_S}, timeout=30).json()
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]


@pytest.fixture(scope="module")
def prometheus(chdb_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    tmp = tmp_path_factory.mktemp("grafana-ops")
    config = load_config(None, {
        "data_dir": str(tmp / "data"),
        "clickhouse": {"dsn": f"chdb://{chdb_dir}", "database": f"t_{uuid.uuid4().hex[:12]}"},
    }, environ={})
    app = create_app(config, start_writer=False)
    client = app.test_client()
    # Whole minutes in the recent past: inside Prometheus's retention, finished before "now".
    start = (int(time.time()) // 60 - 30) * 60
    scrapes = []
    try:
        for step in range(STEPS):
            body = _records(step, start) + [{"org": "acme", "model": "gpt-4o"}]  # the last one lacks timestamp and status
            answer = client.post("/v1/requests", json=body)
            assert answer.status_code == 202 and answer.json["accepted"] == len(BATCH), answer.json
            flush(app)
            metrics = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
            assert metrics.content_type.startswith("application/openmetrics-text")
            scrapes.append((start + step * STEP_S, metrics.get_data(as_text=True)))
    finally:
        runtime(app).shutdown(0)

    source = tmp / "scrapes.om"
    source.write_text(_openmetrics(scrapes))
    tsdb = tmp / "tsdb"
    subprocess.run(["promtool", "tsdb", "create-blocks-from", "openmetrics", "--quiet", str(source), str(tsdb)],
                   check=True, capture_output=True, timeout=120)
    rules = sorted(str(p) for p in (REPO / "prometheus" / "rules").glob("*.yml"))
    cfg = tmp / "prometheus.yml"
    cfg.write_text(json.dumps({"global": {"scrape_interval": f"{STEP_S}s", "evaluation_interval": f"{STEP_S}s"},
                               "rule_files": rules}))
    port = _free_port()
    log = open(tmp / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [shutil.which("prometheus") or "prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={tsdb}",
         f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=30d"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, (tmp / "prometheus.log").read_text()
        try:
            if requests.get(f"{url}/-/ready", timeout=1).status_code == 200:
                break
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, "Prometheus did not become ready"
        time.sleep(0.1)
    try:
        yield Prometheus(url, proc, evaluation_time=start + (STEPS - 1) * STEP_S)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


# --- the dashboard's queries ------------------------------------------------------------------

ALL = {name: Variable(name, "$__all", include_all=True, all_value=".*") for name in ("org", "model")}


def prometheus_format(value):
    """The Prometheus datasource's interpolation: a regex-escaped single value, (a|b) for several."""
    import re

    if isinstance(value, list):
        return "(" + "|".join(re.escape(v) for v in value) + ")" if len(value) > 1 else re.escape(value[0])
    return re.escape(value)


def expand(expr: str, variables: dict[str, Variable]) -> str:
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    return interpolate(expr, variables, default_format=prometheus_format)


def targets() -> list[tuple[str, dict[str, Any]]]:
    found = [(panel["title"], target) for panel in DASHBOARD["panels"] for target in panel.get("targets", [])]
    found += [(f"annotation {a['name']}", a) for a in DASHBOARD["annotations"]["list"]]
    return found


def panel_value(prom: Prometheus, title: str, variables: dict[str, Variable] = ALL, ref: str = "A") -> dict[str, float]:
    """A panel target's instant result, keyed by its legend."""
    panel = next(p for p in DASHBOARD["panels"] if p["title"] == title)
    target = next(t for t in panel["targets"] if t["refId"] == ref)
    result = prom.instant(expand(target["expr"], variables))
    values = {}
    for series in result:
        legend = target["legendFormat"]
        for label, text in series["metric"].items():
            legend = legend.replace("{{" + label + "}}", text)
        values[legend] = float(series["value"][1])
    return values


def test_every_query_and_variable_query_runs(prometheus: Prometheus) -> None:
    start = prometheus.time - (STEPS - 5) * STEP_S
    for title, target in targets():
        expr = expand(target["expr"], ALL)
        assert "$" not in expr, (title, expr)
        prometheus.instant(expr)
        prometheus.range(expr, start, prometheus.time)
    for variable in DASHBOARD["templating"]["list"]:
        query = variable["query"]["query"]
        metric = query[len("label_values("):-1].rsplit(",", 1)
        selector = expand(metric[0], ALL)
        series = requests.get(f"{prometheus.url}/api/v1/series", params={"match[]": selector, "start": start, "end": prometheus.time},
                              timeout=30).json()
        assert series["status"] == "success"
        values = {s[metric[1].strip()] for s in series["data"]}
        assert values == ({"acme", "globex"} if variable["name"] == "org" else {"gpt-4o", "text-embedding-3-small"})


def _histogram_quantile(q: float, observations: list[float]) -> float:
    """Prometheus's bucket interpolation, on the per-step observations (rates only scale them)."""
    bounds = list(RESPONSE_TIME_BUCKETS_S) + [math.inf]
    cumulative = [sum(1 for o in observations if o <= b) for b in bounds]
    rank = q * cumulative[-1]
    for index, count in enumerate(cumulative):
        if count >= rank:
            lower = bounds[index - 1] if index else 0.0
            below = cumulative[index - 1] if index else 0
            return lower + (bounds[index] - lower) * (rank - below) / (count - below)
    raise AssertionError("unreachable")


def test_key_panels_show_the_traffic_rates(prometheus: Prometheus) -> None:
    per_second = 1 / STEP_S
    assert panel_value(prometheus, "Requests / s")[""] == pytest.approx(len(BATCH) * per_second)
    assert panel_value(prometheus, "Error ratio")[""] == pytest.approx(1 / len(BATCH))
    assert panel_value(prometheus, "Requests / s by organization") == pytest.approx({"acme": 4 * per_second, "globex": 2 * per_second})
    assert panel_value(prometheus, "Requests / s by status class") == pytest.approx({"2xx": 5 * per_second, "5xx": per_second})
    assert panel_value(prometheus, "Error ratio by organization") == pytest.approx({"acme": 0.25, "globex": 0.0})
    tokens = sum(b[5] + b[6] for b in BATCH)
    assert panel_value(prometheus, "Tokens / s")[""] == pytest.approx(tokens * per_second)
    assert panel_value(prometheus, "Tokens / s by organization", ref="B") == pytest.approx({"acme output": 120 * per_second, "globex output": 0.0})

    latencies = [b[4] / 1000 for b in BATCH]
    assert panel_value(prometheus, "p95 response time")[""] == pytest.approx(_histogram_quantile(0.95, latencies))
    for ref, q in (("A", 0.5), ("B", 0.9), ("C", 0.99)):
        legend = f"p{round(q * 100)}"
        assert panel_value(prometheus, "Response time percentiles", ref=ref)[legend] == pytest.approx(_histogram_quantile(q, latencies))

    # One organization chosen: the variable narrows every usage query.
    only_globex = dict(ALL, org=Variable("org", "globex"))
    assert panel_value(prometheus, "Requests / s", only_globex)[""] == pytest.approx(2 * per_second)
    assert panel_value(prometheus, "Requests / s by model", only_globex) == pytest.approx({"text-embedding-3-small": 2 * per_second})


def test_exporter_health_panels(prometheus: Prometheus) -> None:
    per_second = 1 / STEP_S
    accepted = panel_value(prometheus, "Records accepted and rejected / s", ref="A")
    rejected = panel_value(prometheus, "Records accepted and rejected / s", ref="B")
    assert accepted == pytest.approx({"accepted": len(BATCH) * per_second})
    assert rejected == pytest.approx({"rejected: invalid_record": per_second})
    assert panel_value(prometheus, "Unflushed records")[""] == 0
    assert panel_value(prometheus, "Durable buffer", ref="A")["unflushed records"] == 0
    # Each step's flush stored one batch.
    assert panel_value(prometheus, "ClickHouse insert batches / s") == pytest.approx({"success": per_second, "failure": 0.0})
    assert panel_value(prometheus, "Firing alerts")[""] == 0
