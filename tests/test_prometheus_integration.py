"""A real Prometheus scrapes a real exporter; the PromQL of docs/metrics.md returns the numbers
computed here from the records sent.

Counters are compared over an exact window: T1 is a scrape after warm-up records (one per label
set and status class, so every series exists before the measured records arrive), T2 a scrape
after the measured records. Evaluated at T2 over ``[T2 - T1]``, ``increase`` is exactly the
measured records' contribution (the window starts and ends on samples, so Prometheus does not
extrapolate), and ``rate`` that divided by the window.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from collections import Counter, defaultdict

import pytest
import requests

from exporter.llm_metrics import RESPONSE_TIME_BUCKETS_S, status_class

from .prom_support import docs_queries, prometheus_server, with_grafana_ranges  # noqa: F401

pytestmark = pytest.mark.slow

HOSTILE_ORGS = [
    'q"uote', "back\\slash", "new\nline", "cr\rtab\t", "nul\x00byte", "ünï©ødé 🚀", "x" * 1024,
    'a",evil="1', '} 1\nfake_metric 2',
]
ORGS = ["acme", "beta"] + HOSTILE_ORGS
MODELS = [("gpt-4o", "/v1/chat/completions"), ("text-embedding-3-small", "/v1/embeddings"), ("", "/v1/other"),
          ('m{odel="x"}', "/v1/completions")]
STATUSES = [200, 200, 201, 429, 500, 200, 503, 404]
TIMES_MS = [12, 40, 180, 700, 1500, 4000, 9000, 45_000, 200_000, None, 800_000]


def measured_records() -> list[dict]:
    records = []
    for i in range(160):
        model, path = MODELS[i % len(MODELS)]
        record = {
            "timestamp": 1_764_000_000 + i, "org": ORGS[i % len(ORGS)], "model": model, "path": path,
            "status_code": STATUSES[i % len(STATUSES)], "input_tokens": 10 * (i % 7), "output_tokens": 3 * (i % 5),
            "user_id": f"user-{i}", "request_id": f"measured-{i}",
        }
        if TIMES_MS[i % len(TIMES_MS)] is not None:
            record["response_time_ms"] = TIMES_MS[i % len(TIMES_MS)]
        records.append(record)
    return records


def endpoint_of(record: dict) -> str:
    path = record["path"].lower()
    return "completion" if "completion" in path else "embedding" if "embedding" in path else "other"


def warm_up(records: list[dict]) -> list[dict]:
    """One timed record per label set and status class of ``records``: their series exist before T1."""
    seen, out = set(), []
    for record in records:
        key = (record["org"], record["model"], endpoint_of(record), status_class(record["status_code"]))
        if key not in seen:
            seen.add(key)
            out.append(record | {"request_id": f"warm-{len(out)}", "response_time_ms": 1.0})
    return out


def post(url: str, records: list[dict]) -> None:
    answer = requests.post(url + "/v1/requests", json=records, timeout=30)
    assert answer.status_code == 202 and answer.json()["rejected"] == [], answer.text


def quantile(q: float, counts: dict[float, int]) -> float:
    """Prometheus's histogram_quantile over non-cumulative bucket counts, computed independently."""
    bounds = sorted(counts)
    cumulative, running = [], 0
    for bound in bounds:
        running += counts[bound]
        cumulative.append(running)
    rank = q * cumulative[-1]
    index = next(i for i, c in enumerate(cumulative) if c >= rank)
    if bounds[index] == math.inf:
        return bounds[-2]
    start = bounds[index - 1] if index > 0 else 0.0
    below = cumulative[index - 1] if index > 0 else 0
    return start + (bounds[index] - start) * (rank - below) / (cumulative[index] - below)


def bucket_of(ms: float) -> float:
    return next((b for b in RESPONSE_TIME_BUCKETS_S if ms / 1000 <= b), math.inf)


def test_docs_queries_return_the_records_numbers(exporter_process, prometheus_server, tmp_path):  # noqa: F811
    exporter = exporter_process(env={
        "USAGE_EXPORTER_WRITER_MAX_AGE_S": "0.2", "USAGE_EXPORTER_METRICS_MAX_SERIES": "1000",
    })
    prom = prometheus_server([exporter.url])
    prom.wait_for_scrape()
    measured = measured_records()
    warm = warm_up(measured)

    post(exporter.url, warm)
    n_warm = len(warm)
    prom.wait_until("usage_exporter_flushed_records_total", lambda v: v.get(None) == n_warm)
    prom.wait_until("usage_exporter_records_accepted_total", lambda v: v.get(None) == n_warm)
    t1 = prom.last_scrape_time("usage_exporter_flushed_records_total")

    post(exporter.url, measured[:100])
    post(exporter.url, measured[100:])
    # Refusals: three invalid records next to one good one, a body that is not JSON, a CSV body.
    extra = measured[1] | {"request_id": "extra"}
    invalid = [{"org": "no-timestamp"}, {"timestamp": 1, "org": "x"}, measured[0] | {"status_code": 99}]
    mixed = requests.post(exporter.url + "/v1/requests", json=invalid + [extra], timeout=30)
    assert mixed.status_code == 202 and len(mixed.json()["rejected"]) == 3
    measured.append(extra)
    for body, content_type, status in ((b"not json", "application/json", 400), (b"a,b", "text/csv", 415)):
        answer = requests.post(exporter.url + "/v1/requests", data=body, headers={"Content-Type": content_type}, timeout=30)
        assert answer.status_code == status

    total = n_warm + len(measured)
    prom.wait_until("usage_exporter_flushed_records_total", lambda v: v.get(None) == total)
    prom.wait_until("usage_exporter_records_accepted_total", lambda v: v.get(None) == total)
    prom.wait_until("sum(usage_exporter_spool_records)", lambda v: v.get(None) == 0)
    t2 = prom.last_scrape_time("usage_exporter_flushed_records_total")
    window_ms = round((t2 - t1) * 1000)
    window_s = window_ms / 1000

    # The exposition, hostile label values and all, passes promtool's own checks.
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: scripts/setup --test installs Debian's prometheus package"
    text = requests.get(exporter.url + "/metrics", timeout=10).content
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr

    # The numbers, computed from the measured records alone.
    by_org, by_model, by_org_model, by_class = Counter(), Counter(), Counter(), Counter()
    failed_by_org, in_by_org, out_by_org, tokens_by_model = Counter(), Counter(), Counter(), Counter()
    fivexx_by_model, timed_by_model = Counter(), Counter()
    buckets_by_endpoint: dict[str, Counter] = defaultdict(Counter)
    time_sum_by_endpoint: Counter = Counter()
    all_buckets: Counter = Counter()
    for r in measured:
        org, model, code = r["org"], r["model"], r["status_code"]
        by_org[org] += 1
        by_model[model] += 1
        by_org_model[(org, model)] += 1
        by_class[status_class(code)] += 1
        failed_by_org[org] += code >= 400
        fivexx_by_model[model] += code >= 500
        in_by_org[org] += r["input_tokens"]
        out_by_org[org] += r["output_tokens"]
        tokens_by_model[model] += r["input_tokens"] + r["output_tokens"]
        if "response_time_ms" in r:
            endpoint = endpoint_of(r)
            bound = bucket_of(r["response_time_ms"])
            buckets_by_endpoint[endpoint][bound] += 1
            all_buckets[bound] += 1
            time_sum_by_endpoint[endpoint] += r["response_time_ms"] / 1000
            timed_by_model[model] += 1
    for counts in list(buckets_by_endpoint.values()) + [all_buckets]:
        for bound in RESPONSE_TIME_BUCKETS_S + (math.inf,):
            counts.setdefault(bound, 0)

    def per_second(counter: Counter) -> dict:
        return {key: value / window_s for key, value in counter.items()}

    expected = {
        "requests_total": ({None: len(measured)}, None),
        "requests_by_org": (dict(by_org), "org"),
        "requests_by_model": (dict(by_model), "model"),
        "requests_by_org_model": (dict(by_org_model), ("org", "model")),
        "request_rate_by_status_class": (per_second(by_class), "status_class"),
        "failed_requests_by_org": (dict(failed_by_org), "org"),
        "failed_ratio_by_org": ({org: failed_by_org[org] / by_org[org] for org in by_org}, "org"),
        # Only models that had a 5xx have a 5xx series.
        "errors_5xx_rate_by_model": ({m: v for m, v in per_second(fivexx_by_model).items() if v}, "model"),
        "input_tokens_by_org": (dict(in_by_org), "org"),
        "output_tokens_by_org": (dict(out_by_org), "org"),
        "tokens_by_model": (dict(tokens_by_model), "model"),
        "token_rate_by_org": ({org: (in_by_org[org] + out_by_org[org]) / window_s for org in by_org}, "org"),
        "response_time_p95_by_endpoint": ({e: quantile(0.95, c) for e, c in buckets_by_endpoint.items()}, "endpoint"),
        "response_time_avg_by_endpoint": (
            {e: time_sum_by_endpoint[e] / sum(c.values()) for e, c in buckets_by_endpoint.items()}, "endpoint"),
        "response_time_distribution": (
            {("+Inf" if b == math.inf else repr(b)): n for b, n in _cumulative(all_buckets).items()}, "le"),
        "timed_requests_by_model": (dict(timed_by_model), "model"),
        "records_rejected_by_reason": ({"invalid_record": 3, "invalid_body": 1, "unsupported_media_type": 1,
                                        "too_large": 0, "unauthorized": 0, "buffer_full": 0}, "reason"),
        "spool_records": ({None: 0}, None),
        "oldest_unflushed_age": ({None: 0}, None),
        "flushed_records": ({None: len(measured)}, None),
        "folded_records": ({None: 0}, None),
        "label_sets_used": ({None: len({(r["org"], r["model"], endpoint_of(r)) for r in measured}) / 1000}, None),
        "workers": ({None: 1}, None),
        "exporter_up": ({None: 1}, None),
        "records_accepted_rate": ({None: len(measured) / window_s}, None),
    }
    # Numbers that depend on timing or on the machine: checked for their range.
    bounded = {
        "spool_fill_ratio": None,
        "flushes_by_outcome": None,
        "insert_latency_p95": None,
        "seconds_since_last_flush": None,
        "memory": None,
        "cpu": None,
    }
    queries = docs_queries()
    assert set(queries) == set(expected) | set(bounded), "every query in docs/metrics.md is checked here"

    for name, (want, by) in expected.items():
        expr = with_grafana_ranges(queries[name], window_ms)
        got = prom.values(expr, at=t2, by=by if by else None)
        if name == "response_time_distribution":
            got = {("+Inf" if le == "+Inf" else repr(float(le))): v for le, v in got.items()}
        assert set(got) == set(want), f"{name}: label values {sorted(map(repr, got))} != {sorted(map(repr, want))}"
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-9), f"{name}[{key!r}]: {got[key]} != {value}"

    at = {"at": t2}
    assert prom.values(with_grafana_ranges(queries["spool_fill_ratio"], window_ms), **at) == {None: 0.0}
    flushes = prom.values(with_grafana_ranges(queries["flushes_by_outcome"], window_ms), by="outcome", **at)
    assert flushes["failure"] == 0 and flushes["success"] >= 1
    [p95] = prom.values(with_grafana_ranges(queries["insert_latency_p95"], window_ms), **at).values()
    assert 0 < p95 <= 60
    [since] = prom.values(with_grafana_ranges(queries["seconds_since_last_flush"], window_ms), **at).values()
    assert 0 <= since < 60
    [memory] = prom.values(queries["memory"], **at).values()
    assert memory > 10 * 1024 * 1024
    [cpu] = prom.values(with_grafana_ranges(queries["cpu"], window_ms), **at).values()
    assert cpu >= 0

    # Prometheus's own scrape (OpenMetrics, negotiated) took every hostile label value verbatim.
    [target] = prom.targets_health()
    assert target["health"] == "up" and target["lastError"] == "", target
    stored_orgs = set(prom.values("count by (org) (llm_requests_total)", by="org"))
    assert stored_orgs == set(ORGS)
    assert "fake_metric" not in {s["metric"]["__name__"] for s in prom.query('{__name__=~".+"}')}
    assert json.dumps(sorted(stored_orgs))  # every value is plain UTF-8 text


def _cumulative(counts: Counter) -> dict[float, int]:
    running, out = 0, {}
    for bound in sorted(counts):
        running += counts[bound]
        out[bound] = running
    return out
