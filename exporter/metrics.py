"""Every Prometheus metric family of the exporter, built on a registry the app factory owns.

Usage metrics are updated once per accepted record; self-metrics describe the exporter's own
pipeline (accepted/rejected records, spool backlog, flushes, ClickHouse inserts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from .records import Row

# LLM latencies run from ~20 ms (small embeddings) to several minutes (long completions).
RESPONSE_TIME_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
# A ClickHouse insert of one batch: milliseconds when healthy, up to the query timeout when not.
INSERT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REJECT_REASONS = ("invalid_record", "invalid_body", "too_large", "unsupported_media_type", "unauthorized", "buffer_full")


def status_class(code: int) -> str:
    return f"{code // 100}xx" if code else "unknown"


class Metrics:
    def __init__(self, registry: CollectorRegistry, token_name_label: bool = False) -> None:
        self.registry = registry
        self.token_name_label = token_name_label
        usage_labels = ["org", "model", "endpoint"] + (["token_name"] if token_name_label else [])
        self.requests = Counter(
            "llm_requests",
            "Gateway requests recorded, by organization, model, endpoint kind and HTTP status class.",
            usage_labels + ["status_class"],
            registry=registry,
        )
        self.failed_requests = Counter(
            "llm_failed_requests",
            "Gateway requests that ended with HTTP status >= 400.",
            usage_labels,
            registry=registry,
        )
        self.input_tokens = Counter(
            "llm_input_tokens", "Input (prompt) tokens consumed.", usage_labels, registry=registry
        )
        self.output_tokens = Counter(
            "llm_output_tokens", "Output (completion) tokens returned.", usage_labels, registry=registry
        )
        self.response_time = Histogram(
            "llm_response_time_seconds",
            "Gateway response time of requests that reported one.",
            usage_labels,
            buckets=RESPONSE_TIME_BUCKETS_S,
            registry=registry,
        )
        self.records_accepted = Counter(
            "usage_exporter_records_accepted", "Records accepted and made durable.", registry=registry
        )
        self.records_rejected = Counter(
            "usage_exporter_records_rejected", "Records or bodies refused, by reason.", ["reason"], registry=registry
        )
        for reason in REJECT_REASONS:
            self.records_rejected.labels(reason)
        self.flushes = Counter(
            "usage_exporter_flushes", "Batches written to ClickHouse, by outcome.", ["outcome"], registry=registry
        )
        for outcome in ("success", "failure"):
            self.flushes.labels(outcome)
        self.flushed_records = Counter(
            "usage_exporter_flushed_records", "Records written to ClickHouse.", registry=registry
        )
        self.duplicate_records = Counter(
            "usage_exporter_duplicate_records",
            "Records dropped before insert because their request_id was already stored.",
            registry=registry,
        )
        self.insert_duration = Histogram(
            "usage_exporter_clickhouse_insert_duration_seconds",
            "Time to insert one batch into ClickHouse, failures included.",
            buckets=INSERT_BUCKETS_S,
            registry=registry,
        )

    def observe_rows(self, rows: Iterable[Row]) -> None:
        with_token = self.token_name_label
        for row in rows:
            labels = (row.org, row.model, row.endpoint) + ((row.token_name,) if with_token else ())
            self.requests.labels(*labels, status_class(row.status_code)).inc()
            if row.status_code >= 400:
                self.failed_requests.labels(*labels).inc()
            if row.input_tokens:
                self.input_tokens.labels(*labels).inc(row.input_tokens)
            if row.output_tokens:
                self.output_tokens.labels(*labels).inc(row.output_tokens)
            if row.response_time_ms is not None:
                self.response_time.labels(*labels).observe(row.response_time_ms / 1000.0)

    def register_spool_gauges(self, backlog: Callable[[], tuple[int, int, float]]) -> None:
        """Expose the spool's backlog, read at scrape time so it is never stale."""
        registry = self.registry

        class _SpoolCollector:
            def collect(self):
                rows, size, age = backlog()
                yield GaugeMetricFamily("usage_exporter_spool_records", "Records accepted but not yet in ClickHouse.", value=rows)
                yield GaugeMetricFamily("usage_exporter_spool_bytes", "Bytes of the durable buffer not yet in ClickHouse.", value=size)
                yield GaugeMetricFamily(
                    "usage_exporter_oldest_unflushed_age_seconds",
                    "Age of the oldest record not yet in ClickHouse (0 when none).",
                    value=age,
                )

        registry.register(_SpoolCollector())
        self.last_flush_success = Gauge(
            "usage_exporter_last_flush_success_timestamp_seconds",
            "Unix time of the last successful ClickHouse insert.",
            registry=registry,
        )
