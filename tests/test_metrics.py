"""The metrics of one exporter process: usage numbers equal to the records, the series cap, hostile
label values, self-metrics, and the fast exposition equal to prometheus-client's own encoders."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import threading
from collections import Counter

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from exporter.app import runtime
from exporter.llm_metrics import OTHER, RESPONSE_TIME_BUCKETS_S, status_class
from exporter.metrics import Metrics
from exporter.records import Row

from .conftest import flush

OPENMETRICS = "application/openmetrics-text;version=1.0.0"
HOSTILE = ['q"uote', "back\\slash", "new\nline", "cr\r", "tab\t", "nul\x00", "ünï©ødé 🚀", "z" * 1024,
           'a",evil="1', "} 1\nfake_metric 2", "\u2028line sep", "#", " "]


def records(n: int, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        record = {
            "timestamp": 1_764_000_000 + i, "org": rng.choice(["acme", "beta", "gamma"]),
            "model": rng.choice(["gpt-4o", "text-embedding-3-small", ""]),
            "path": rng.choice(["/v1/chat/completions", "/v1/embeddings", "/v1/models"]),
            "status_code": rng.choice([200, 200, 200, 201, 400, 429, 500, 503]),
            "input_tokens": rng.randrange(0, 3000), "output_tokens": rng.randrange(0, 800),
            "token_name": rng.choice(["ci", "laptop"]), "user_id": f"u-{rng.randrange(1000)}",
        }
        if rng.random() < 0.8:
            record["response_time_ms"] = rng.choice([0, 25, 25.0001, 999.9, 1000, 61_000, 700_000, rng.uniform(0, 9000)])
        out.append(record)
    return out


def endpoint_of(record: dict) -> str:
    path = record.get("path", "").lower()
    return "completion" if "completion" in path else "embedding" if "embedding" in path else "other"


def post(client, body) -> dict:
    answer = client.post("/v1/requests", data=json.dumps(body), content_type="application/json")
    assert answer.status_code in (202, 400), answer.data
    return answer.json


def samples(text: str, openmetrics: bool = False) -> set[tuple]:
    parse = parse_openmetrics if openmetrics else parse_text
    return {(s.name, tuple(sorted(s.labels.items())), s.value) for family in parse(text) for s in family.samples}


def test_usage_metrics_equal_an_independent_count_of_the_records(make_app):
    app = make_app()
    sent = records(600)
    for start in range(0, len(sent), 150):
        assert post(app.test_client(), sent[start:start + 150])["accepted"] == 150
    registry = runtime(app).metrics.registry

    requests_by, failed, tokens_in, tokens_out = Counter(), Counter(), Counter(), Counter()
    for r in sent:
        labels = (r["org"], r["model"], endpoint_of(r))
        requests_by[labels + (status_class(r["status_code"]),)] += 1
        failed[labels] += r["status_code"] >= 400
        tokens_in[labels] += r["input_tokens"]
        tokens_out[labels] += r["output_tokens"]
    for (org, model, endpoint, klass), n in requests_by.items():
        labels = {"org": org, "model": model, "endpoint": endpoint, "status_class": klass}
        assert registry.get_sample_value("llm_requests_total", labels) == n
    for (org, model, endpoint), n in failed.items():
        labels = {"org": org, "model": model, "endpoint": endpoint}
        assert registry.get_sample_value("llm_failed_requests_total", labels) == n
        assert registry.get_sample_value("llm_input_tokens_total", labels) == tokens_in[(org, model, endpoint)]
        assert registry.get_sample_value("llm_output_tokens_total", labels) == tokens_out[(org, model, endpoint)]
    assert registry.get_sample_value("usage_exporter_records_accepted_total") == 600
    assert registry.get_sample_value("usage_exporter_usage_label_sets") == len(failed)
    # No per-user or per-token label by default.
    text = app.test_client().get("/metrics").data.decode()
    label_names = {name for f in parse_text(text) if f.name.startswith("llm_") for s in f.samples for name in s.labels}
    assert label_names == {"org", "model", "endpoint", "status_class", "le"}


def test_histogram_counts_equal_one_observe_per_record(make_app):
    """Batch bucketing must give exactly what prometheus-client's own Histogram.observe gives."""
    app = make_app()
    sent = records(500, seed=11)
    post(app.test_client(), sent)
    registry = runtime(app).metrics.registry
    reference = CollectorRegistry()
    histogram = Histogram("ref_seconds", "reference", ["org", "model", "endpoint"], buckets=RESPONSE_TIME_BUCKETS_S,
                          registry=reference)
    for r in sent:
        if "response_time_ms" in r:
            histogram.labels(r["org"], r["model"], endpoint_of(r)).observe(r["response_time_ms"] / 1000)
    compared = 0
    for family in reference.collect():
        for s in family.samples:
            mine = registry.get_sample_value(s.name.replace("ref_seconds", "llm_response_time_seconds"), s.labels)
            if s.name.endswith("_created"):
                continue
            assert mine == pytest.approx(s.value, rel=1e-12), (s.name, s.labels)
            compared += 1
    assert compared > 100


@pytest.mark.parametrize("accept", [None, OPENMETRICS])
def test_fast_exposition_equals_prometheus_client_encoders(make_app, accept):
    app = make_app()
    post(app.test_client(), records(300) + [
        {"timestamp": 1_764_000_000, "org": org, "model": org, "status_code": 500, "response_time_ms": 5} for org in HOSTILE
    ])
    rt = runtime(app)
    answer = app.test_client().get("/metrics", headers={"Accept": accept} if accept else {})
    openmetrics = accept is not None
    assert answer.content_type.startswith("application/openmetrics-text" if openmetrics else "text/plain")
    library = (generate_openmetrics if openmetrics else generate_latest)(rt.metrics.registry).decode()
    mine = answer.data.decode()
    volatile = ("process_", "python_gc_", "usage_exporter_oldest_unflushed_age_seconds")
    stable = lambda found: {s for s in found if not s[0].startswith(volatile)}  # noqa: E731
    assert stable(samples(mine, openmetrics)) == stable(samples(library, openmetrics))
    if openmetrics:
        assert mine.endswith("# EOF\n") and mine.count("# EOF") == 1


def test_hostile_label_values_round_trip_and_pass_promtool(make_app):
    app = make_app()
    sent = [{"timestamp": 1_764_000_000, "org": org, "model": model, "status_code": 200, "response_time_ms": 30}
            for org in HOSTILE for model in ("", HOSTILE[0])]
    assert post(app.test_client(), sent)["accepted"] == len(sent)
    text = app.test_client().get("/metrics").data.decode()
    orgs = {labels["org"] for name, labels, _ in ((s.name, s.labels, s.value) for f in parse_text(text) for s in f.samples)
            if name == "llm_requests_total"}
    assert orgs == set(HOSTILE)
    # No value ended a label or a line: every sample line belongs to a family of ours.
    names = {s.name for f in parse_text(text) for s in f.samples}
    assert "fake_metric" not in names and not any("evil" in n for n in names)
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: scripts/setup --test installs Debian's prometheus package"
    check = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    om = app.test_client().get("/metrics", headers={"Accept": OPENMETRICS}).data.decode()
    assert {s.labels["org"] for f in parse_openmetrics(om) for s in f.samples if s.name == "llm_requests_total"} == set(HOSTILE)


def test_series_cap_folds_new_label_sets_into_other_and_counts_them(make_app):
    app = make_app(metrics={"max_series": 3})
    sent = [{"timestamp": 1_764_000_000, "org": f"org-{i}", "model": "m", "path": "/v1/chat/completions",
             "status_code": 500 if i % 2 else 200, "input_tokens": 10, "response_time_ms": 100}
            for i in range(10)]
    sent += [{"timestamp": 1_764_000_000, "org": "org-0", "model": "m", "path": "/v1/embeddings", "status_code": 200}]
    post(app.test_client(), sent[:4])
    post(app.test_client(), sent[4:])
    registry = runtime(app).metrics.registry
    families = {f.name: f for f in registry.collect()}
    request_samples = families["llm_requests"].samples
    label_sets = {(s.labels["org"], s.labels["model"], s.labels["endpoint"]) for s in request_samples}
    # org-0..org-2 were first (first batch, in order); the rest of the completions fold, keeping the endpoint.
    assert label_sets == {("org-0", "m", "completion"), ("org-1", "m", "completion"), ("org-2", "m", "completion"),
                          (OTHER, OTHER, "completion"), (OTHER, OTHER, "embedding")}
    assert registry.get_sample_value("usage_exporter_folded_records_total") == 8
    assert registry.get_sample_value("usage_exporter_usage_label_sets") == 3
    # Totals stay exact, and failures fold together with their requests.
    assert sum(s.value for s in request_samples) == len(sent)
    other = {"org": OTHER, "model": OTHER, "endpoint": "completion"}
    assert registry.get_sample_value("llm_requests_total", other | {"status_class": "5xx"}) == 4
    assert registry.get_sample_value("llm_failed_requests_total", other) == 4
    assert registry.get_sample_value("llm_input_tokens_total", other) == 70
    assert registry.get_sample_value("llm_response_time_seconds_count", other) == 7


def test_token_name_label_is_optional(make_app):
    app = make_app(metrics={"token_name_label": True})
    post(app.test_client(), [{"timestamp": 1_764_000_000, "org": "acme", "model": "m", "status_code": 200,
                              "token_name": "ci", "user_id": "someone"}])
    registry = runtime(app).metrics.registry
    labels = {"org": "acme", "model": "m", "endpoint": "other", "token_name": "ci"}
    assert registry.get_sample_value("llm_requests_total", labels | {"status_class": "2xx"}) == 1
    text = app.test_client().get("/metrics").data.decode()
    label_names = {name for f in parse_text(text) if f.name.startswith("llm_") for s in f.samples for name in s.labels}
    assert label_names == {"org", "model", "endpoint", "status_class", "token_name"}


def test_self_metrics_follow_the_pipeline(make_app):
    app = make_app(ingest={"tokens": ["secret"]})
    client = app.test_client()
    auth = {"Authorization": "Bearer secret"}
    good = records(5)
    client.post("/v1/requests", data=json.dumps(good + [{"org": "no-timestamp"}]), content_type="application/json", headers=auth)
    client.post("/v1/requests", data="not json", content_type="application/json", headers=auth)
    client.post("/v1/requests", data="a,b", content_type="text/csv", headers=auth)
    client.post("/v1/requests", data=json.dumps(good), content_type="application/json")
    registry = runtime(app).metrics.registry

    def rejected(reason: str) -> float:
        return registry.get_sample_value("usage_exporter_records_rejected_total", {"reason": reason})

    assert (rejected("invalid_record"), rejected("invalid_body"), rejected("unsupported_media_type"),
            rejected("unauthorized"), rejected("too_large"), rejected("buffer_full")) == (1, 1, 1, 1, 0, 0)
    assert registry.get_sample_value("usage_exporter_records_accepted_total") == 5
    assert registry.get_sample_value("usage_exporter_spool_records") == 5
    assert registry.get_sample_value("usage_exporter_spool_bytes") > 0
    assert registry.get_sample_value("usage_exporter_oldest_unflushed_age_seconds") > 0
    assert registry.get_sample_value("usage_exporter_spool_max_bytes") == runtime(app).config.spool.max_bytes
    flush(app)
    assert registry.get_sample_value("usage_exporter_spool_records") == 0
    assert registry.get_sample_value("usage_exporter_spool_bytes") == 0
    assert registry.get_sample_value("usage_exporter_oldest_unflushed_age_seconds") == 0
    assert registry.get_sample_value("usage_exporter_flushed_records_total") == 5
    assert registry.get_sample_value("usage_exporter_flushes_total", {"outcome": "success"}) >= 1
    assert registry.get_sample_value("usage_exporter_flushes_total", {"outcome": "failure"}) == 0
    assert registry.get_sample_value("usage_exporter_clickhouse_insert_duration_seconds_count") >= 1
    assert registry.get_sample_value("usage_exporter_last_flush_success_timestamp_seconds") > 1.7e9
    assert registry.get_sample_value("usage_exporter_workers") == 1
    assert registry.get_sample_value("process_resident_memory_bytes") > 0
    assert registry.get_sample_value("process_cpu_seconds_total") > 0
    assert registry.get_sample_value("usage_exporter_build_info", {"version": __import__("exporter").__version__}) == 1
    # A replayed record (same request_id) is counted by the metrics when accepted, stored once.
    client.post("/v1/requests", data=json.dumps([good[0] | {"request_id": "r1"}] * 2), content_type="application/json",
                headers=auth)
    flush(app)
    assert registry.get_sample_value("usage_exporter_duplicate_records_total") == 1


def test_concurrent_batches_are_all_counted(make_app):
    metrics = Metrics(CollectorRegistry(auto_describe=True), max_series=50)
    rows = [Row(timestamp="2026-11-24 10:00:00.000", org=f"org-{i % 80}", model="m", endpoint="completion",
                status_code=200, response_time_ms=float(i), input_tokens=1) for i in range(400)]

    def work() -> None:
        for _ in range(25):
            metrics.observe_rows(rows)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = 8 * 25 * len(rows)
    text = metrics.render(None)[0].decode()
    found = [s for f in parse_text(text) for s in f.samples]
    assert sum(s.value for s in found if s.name == "llm_requests_total") == total
    assert sum(s.value for s in found if s.name == "llm_input_tokens_total") == total
    assert sum(s.value for s in found if s.name == "llm_response_time_seconds_count") == total
    assert len({s.labels["org"] for s in found if s.name == "llm_requests_total"}) == 51  # 50 + __other__
    folded = metrics.registry.get_sample_value("usage_exporter_folded_records_total")
    assert folded == sum(s.value for s in found if s.name == "llm_requests_total" and s.labels["org"] == OTHER)
