"""Every Prometheus metric family of the exporter, built on a registry the app factory owns.

Usage metrics (``llm_*``) count the accepted records by organization, model and endpoint kind;
self-metrics (``usage_exporter_*``) describe the exporter's own pipeline. ``docs/metrics.md`` is the
reference for names, labels and example queries.

Two things shape this module:

* The ingest hot path calls :meth:`Metrics.observe_rows` once per accepted batch. Calling
  ``.labels(...).inc()`` per record costs more than parsing the record, so a batch is first tallied
  in plain dicts, and each label set then gets one update per family. Label sets resolve to cached
  children, so ``labels()`` runs once per label set, not once per record.
* Label values come from gateways and are unbounded. At most ``max_series`` distinct label sets
  (org, model, endpoint[, token_name]) get series of their own; records of any further label set are
  counted under ``org``/``model``/``token_name`` = ``__other__`` (endpoint and status class, closed
  sets, are kept), and ``usage_exporter_folded_records_total`` counts them. The usage families share
  one admission decision, so a record is either folded in every family or in none, and ratios such
  as failed/total per org stay right.

Under a multi-worker server (``exporter.wsgi``) prometheus-client runs in multiprocess mode: every
worker writes its values to memory-mapped files in one directory and ``/metrics`` sums them. Gauges
that describe one worker's state (its spool, its process) are then written by a refresher thread
each second and summed over live workers; see :meth:`Metrics.start_refresh`.
"""

from __future__ import annotations

import glob
import os
import re
import threading
from bisect import bisect_left
from collections.abc import Callable, Sequence
from operator import attrgetter
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    multiprocess,
    values,
)
from prometheus_client.exposition import choose_encoder

from . import __version__
from .records import Row

OTHER = "__other__"

# LLM latencies run from ~20 ms (small embeddings) to minutes (long completions); a response time
# above ten minutes lands in +Inf. Kept in milliseconds, the unit records carry, so a batch is
# bucketed without a division per record; exposed in seconds.
RESPONSE_TIME_BUCKETS_MS = (25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 120_000, 300_000, 600_000)
RESPONSE_TIME_BUCKETS_S = tuple(ms / 1000 for ms in RESPONSE_TIME_BUCKETS_MS)
# A ClickHouse insert of one batch: milliseconds when healthy, up to the query timeout when not.
INSERT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REJECT_REASONS = ("invalid_record", "invalid_body", "too_large", "unsupported_media_type", "unauthorized", "buffer_full")
FLUSH_OUTCOMES = ("success", "failure")
REFRESH_INTERVAL_S = 1.0

Backlog = Callable[[], tuple[int, int, float]]


def status_class(code: int) -> str:
    """``2xx`` .. ``5xx``; ``unknown`` for the status 0 that importers without a status write."""
    return f"{code // 100}xx" if code else "unknown"


class _LabelSet:
    """The children of one admitted label set, resolved once so a batch skips ``labels()``."""

    __slots__ = ("labels", "requests_by_code", "failed", "input_tokens", "output_tokens", "buckets", "time_sum", "histogram")

    def __init__(self, metrics: "Metrics", labels: tuple[str, ...]) -> None:
        self.labels = labels
        self.requests_by_code: dict[int, Counter] = {}
        # Created up front so a label set reads 0 failed requests rather than no series at all.
        self.failed = metrics.failed_requests.labels(*labels)
        self.input_tokens = metrics.input_tokens.labels(*labels)
        self.output_tokens = metrics.output_tokens.labels(*labels)
        self.histogram = metrics.response_time.labels(*labels)
        # prometheus-client's Histogram child keeps one value per bucket (not cumulative) and a sum;
        # adding a batch's per-bucket counts to them is exactly what one observe() per record does.
        # tests/test_metrics.py pins that equivalence against observe().
        try:
            self.buckets = self.histogram._buckets
            self.time_sum = self.histogram._sum
        except AttributeError:
            raise RuntimeError("this prometheus-client's Histogram has no _buckets/_sum; pin prometheus-client<1") from None
        if len(self.buckets) != len(RESPONSE_TIME_BUCKETS_MS) + 1:
            raise RuntimeError("prometheus-client's Histogram buckets changed shape; pin prometheus-client<1")


class Metrics:
    """The registry and every metric family; one instance per app (per worker process)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        token_name_label: bool = False,
        max_series: int = 10_000,
        multiprocess_dir: Path | None = None,
    ) -> None:
        self.registry = registry
        self.token_name_label = token_name_label
        self.max_series = max_series
        self.multiprocess_dir = multiprocess_dir
        if multiprocess_dir is not None and not getattr(values.ValueClass, "_multiprocess", False):
            raise RuntimeError(
                "multiprocess metrics need PROMETHEUS_MULTIPROC_DIR set before prometheus_client is imported; "
                "start multi-worker servers through exporter.wsgi"
            )
        # `_created` series double the series count and mean nothing to these dashboards; multiprocess
        # mode never has them, so turning them off keeps both modes' exposition the same.
        disable_created_metrics()

        self.usage_labels = ("org", "model", "endpoint") + (("token_name",) if token_name_label else ())
        usage_labels = list(self.usage_labels)
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
            "Gateway response time of the requests that reported one.",
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
            "usage_exporter_flushes",
            "Batches the writer tried to store in ClickHouse, by outcome; a failure is retried with the same batch.",
            ["outcome"],
            registry=registry,
        )
        for outcome in FLUSH_OUTCOMES:
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
        self.folded_records = Counter(
            "usage_exporter_folded_records",
            "Records counted under the label value __other__ because the usage metrics hold metrics.max_series label sets.",
            registry=registry,
        )

        # Gauges of one worker's state: summed (or max/min) over live workers in multiprocess mode.
        self.last_flush_success = Gauge(
            "usage_exporter_last_flush_success_timestamp_seconds",
            "Unix time of the last successful ClickHouse insert.",
            registry=registry,
            multiprocess_mode="max",
        )
        self.spool_records = Gauge(
            "usage_exporter_spool_records", "Records accepted but not yet in ClickHouse.",
            registry=registry, multiprocess_mode="livesum",
        )
        self.spool_bytes = Gauge(
            "usage_exporter_spool_bytes", "Bytes of the durable buffer not yet in ClickHouse.",
            registry=registry, multiprocess_mode="livesum",
        )
        self.spool_max_bytes = Gauge(
            "usage_exporter_spool_max_bytes", "Size of the durable buffer at which ingest answers 503 (spool.max_bytes).",
            registry=registry, multiprocess_mode="livesum",
        )
        self.oldest_unflushed_age = Gauge(
            "usage_exporter_oldest_unflushed_age_seconds", "Age of the oldest record not yet in ClickHouse (0 when none).",
            registry=registry, multiprocess_mode="livemax",
        )
        self.label_sets = Gauge(
            "usage_exporter_usage_label_sets",
            "Label sets (org, model, endpoint[, token_name]) holding series of their own in the usage metrics.",
            registry=registry, multiprocess_mode="livemax",
        )
        self.label_sets_max = Gauge(
            "usage_exporter_usage_label_sets_max", "The cap on usage label sets (metrics.max_series).",
            registry=registry, multiprocess_mode="livemax",
        )
        self.label_sets_max.set(max_series)
        self.workers = Gauge(
            "usage_exporter_workers", "Exporter processes serving (more than 1 under a multi-worker server).",
            registry=registry, multiprocess_mode="livesum",
        )
        self.workers.set(1)
        self.build_info = Gauge(
            "usage_exporter_build_info", "Always 1; the version label names the exporter's version.",
            ["version"], registry=registry, multiprocess_mode="livemax",
        )
        self.build_info.labels(__version__).set(1)

        if self.multiprocess:
            self._process = _ProcessMirror(registry)
        else:
            self._process = None
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
            self.label_sets.set_function(lambda: self._admitted)

        self._key_of = attrgetter(*self.usage_labels, "status_code")
        self._series: dict[tuple[str, ...], _LabelSet] = {}
        self._admitted = 0
        self._lock = threading.Lock()
        self._backlog: Backlog | None = None
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    @property
    def multiprocess(self) -> bool:
        return self.multiprocess_dir is not None

    # -- the ingest hot path -------------------------------------------------------------------

    def observe_rows(self, rows: Sequence[Row]) -> None:
        """Count a batch of accepted rows in the usage metrics."""
        bounds = RESPONSE_TIME_BUCKETS_MS
        nbuckets = len(bounds) + 1
        key_of = self._key_of
        tally: dict[tuple, list] = {}
        find = tally.get
        # One pass of plain-dict work per record: [records, input, output, time sum, buckets or None].
        for row in rows:
            key = key_of(row)
            acc = find(key)
            if acc is None:
                acc = tally[key] = [0, 0, 0, 0.0, None]
            acc[0] += 1
            acc[1] += row.input_tokens
            acc[2] += row.output_tokens
            elapsed = row.response_time_ms
            if elapsed is not None:
                acc[3] += elapsed
                if acc[4] is None:
                    acc[4] = [0] * nbuckets
                acc[4][bisect_left(bounds, elapsed)] += 1
        series_of = self._series.get
        for key, (count, tokens_in, tokens_out, time_sum, buckets) in tally.items():
            labels, code = key[:-1], key[-1]
            series = series_of(labels) or self._admit(labels, count)
            requests = series.requests_by_code.get(code)
            if requests is None:
                requests = series.requests_by_code[code] = self.requests.labels(*series.labels, status_class(code))
            requests.inc(count)
            if code >= 400:
                series.failed.inc(count)
            if tokens_in:
                series.input_tokens.inc(tokens_in)
            if tokens_out:
                series.output_tokens.inc(tokens_out)
            if buckets is not None:
                self._observe_times(series, buckets, time_sum)

    @staticmethod
    def _observe_times(series: _LabelSet, buckets: list[int], time_sum_ms: float) -> None:
        for index, n in enumerate(buckets):
            if n:
                series.buckets[index].inc(n)
        series.time_sum.inc(time_sum_ms / 1000.0)

    def _admit(self, labels: tuple[str, ...], records: int) -> _LabelSet:
        """The series of a label set seen for the first time, or the ``__other__`` one past the cap."""
        with self._lock:
            series = self._series.get(labels)
            if series is not None:
                return series
            if self._admitted < self.max_series:
                series = self._series[labels] = _LabelSet(self, labels)
                self._admitted += 1
                return series
            endpoint = labels[2]
            folded = (OTHER, OTHER, endpoint) + ((OTHER,) if self.token_name_label else ())
            series = self._series.get(folded)
            if series is None:
                # At most one per endpoint kind, so these stay outside the cap. Folded label sets
                # are not remembered: a flood of new tokens must not grow this process's memory.
                series = self._series[folded] = _LabelSet(self, folded)
        self.folded_records.inc(records)
        return series

    # -- gauges read from the spool ------------------------------------------------------------

    def register_spool_gauges(self, backlog: Backlog, max_bytes: int | None = None) -> None:
        """Expose the spool's backlog: read at scrape time in one process, refreshed each second in many."""
        self._backlog = backlog
        if max_bytes is not None:
            self.spool_max_bytes.set(max_bytes)
        if not self.multiprocess:
            self.spool_records.set_function(lambda: backlog()[0])
            self.spool_bytes.set_function(lambda: backlog()[1])
            self.oldest_unflushed_age.set_function(lambda: backlog()[2])

    def refresh(self) -> None:
        """Write this worker's state gauges to its multiprocess files (no-op in one process)."""
        if not self.multiprocess:
            return
        if self._backlog is not None:
            rows, size, age = self._backlog()
            self.spool_records.set(rows)
            self.spool_bytes.set(size)
            self.oldest_unflushed_age.set(age)
        self.label_sets.set(self._admitted)
        if self._process is not None:
            self._process.update()

    def start_refresh(self, interval_s: float = REFRESH_INTERVAL_S) -> None:
        """Keep this worker's gauges current while another worker answers the scrape."""
        if not self.multiprocess or self._refresher is not None:
            return
        self.refresh()

        def run() -> None:
            while not self._stop.wait(interval_s):
                self.refresh()

        self._refresher = threading.Thread(target=run, name="usage-exporter-metrics", daemon=True)
        self._refresher.start()

    def close(self) -> None:
        """Stop the refresher; in multiprocess mode drop this worker's live gauges from the sums."""
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join(timeout=5)
        if self.multiprocess:
            multiprocess.mark_process_dead(os.getpid(), str(self.multiprocess_dir))

    # -- exposition ----------------------------------------------------------------------------

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition for a scrape, in the format the scraper asked for, and its content type."""
        encoder, content_type = choose_encoder(accept or "")
        if not self.multiprocess:
            return encoder(self.registry), content_type
        self.refresh()
        _reap_dead_workers(Path(self.multiprocess_dir))
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(self.multiprocess_dir))
        return encoder(registry), content_type


_LIVE_FILE = re.compile(r"^gauge_live\w+?_(\d+)\.db$")


def _reap_dead_workers(directory: Path) -> None:
    """Drop the live gauges of workers that died without cleaning up (SIGKILL, OOM)."""
    pids = set()
    for path in glob.glob(str(directory / "gauge_live*_*.db")):
        match = _LIVE_FILE.match(os.path.basename(path))
        if match:
            pids.add(int(match.group(1)))
    for pid in pids:
        if pid != os.getpid() and not _alive(pid):
            multiprocess.mark_process_dead(pid, str(directory))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _ProcessMirror:
    """The standard ``process_*`` metrics in multiprocess mode, where collectors cannot be summed.

    Each worker copies its own values into multiprocess families: memory and descriptors summed over
    live workers, CPU time as a counter over every worker the server ran, start time of the oldest
    live worker.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._source = ProcessCollector(registry=None)
        self._cpu_seen = 0.0
        self.cpu = Counter("process_cpu_seconds", "Total user and system CPU time spent in seconds.", registry=registry)
        self.gauges = {
            "process_resident_memory_bytes": Gauge("process_resident_memory_bytes", "Resident memory size in bytes.",
                                                   registry=registry, multiprocess_mode="livesum"),
            "process_virtual_memory_bytes": Gauge("process_virtual_memory_bytes", "Virtual memory size in bytes.",
                                                  registry=registry, multiprocess_mode="livesum"),
            "process_open_fds": Gauge("process_open_fds", "Number of open file descriptors.",
                                      registry=registry, multiprocess_mode="livesum"),
            "process_max_fds": Gauge("process_max_fds", "Maximum number of open file descriptors.",
                                     registry=registry, multiprocess_mode="livemin"),
            "process_start_time_seconds": Gauge("process_start_time_seconds", "Start time of the process since unix epoch in seconds.",
                                                registry=registry, multiprocess_mode="livemin"),
        }

    def update(self) -> None:
        for family in self._source.collect():
            for sample in family.samples:
                if sample.name == "process_cpu_seconds_total":
                    if sample.value > self._cpu_seen:
                        self.cpu.inc(sample.value - self._cpu_seen)
                        self._cpu_seen = sample.value
                elif sample.name in self.gauges:
                    self.gauges[sample.name].set(sample.value)
