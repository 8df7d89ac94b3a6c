"""Every Prometheus metric family of the exporter, on registries the app factory owns.

Usage metrics (``llm_*``, :mod:`exporter.llm_metrics`) count the accepted records by organization,
model and endpoint kind; self-metrics (``usage_exporter_*``) describe the exporter's own pipeline;
the standard ``process_*`` metrics come last. ``docs/metrics.md`` is the reference for names,
labels and example queries.

Under a multi-worker server (``exporter.wsgi``) prometheus-client runs in multiprocess mode: every
worker writes its values to memory-mapped files in one directory and ``/metrics`` sums them,
whichever worker answers. A refresher thread in each worker copies its usage counts (kept in plain
floats on the hot path) and the gauges of its own state (its spool, its process) to those files
each second; see :meth:`Metrics.start_refresh`.
"""

from __future__ import annotations

import glob
import os
import re
import threading
from collections.abc import Callable, Sequence
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
from .multiproc import MultiProcessRenderer
from .llm_metrics import OTHER, RESPONSE_TIME_BUCKETS_S, UsageMetrics, status_class  # noqa: F401  (re-exported)
from .records import Row

# A ClickHouse insert of one batch: milliseconds when healthy, up to the query timeout when not.
INSERT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REJECT_REASONS = ("invalid_record", "invalid_body", "too_large", "unsupported_media_type", "unauthorized", "buffer_full")
FLUSH_OUTCOMES = ("success", "failure")
REFRESH_INTERVAL_S = 1.0
OPENMETRICS_TYPE = "application/openmetrics-text"

Backlog = Callable[[], tuple[int, int, float]]


class Metrics:
    """Every metric family of one app (one worker process).

    ``registry`` is the caller's: it ends up holding everything (for ``get_sample_value`` and any
    generic encoder). :meth:`render` serves scrapes, with a fast path for the usage families.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        token_name_label: bool = False,
        max_series: int = 10_000,
        multiprocess_dir: Path | None = None,
    ) -> None:
        self.registry = registry
        self.multiprocess_dir = multiprocess_dir
        if multiprocess_dir is not None and not getattr(values.ValueClass, "_multiprocess", False):
            raise RuntimeError(
                "multiprocess metrics need PROMETHEUS_MULTIPROC_DIR set before prometheus_client is imported; "
                "start multi-worker servers through exporter.wsgi"
            )
        # `_created` series double the series count and mean nothing to these dashboards; multiprocess
        # mode never has them, so turning them off keeps both modes' exposition the same.
        disable_created_metrics()
        self.usage = UsageMetrics(token_name_label=token_name_label, max_series=max_series)
        # Everything but the usage families, so render() can encode those itself.
        base = self._base = CollectorRegistry(auto_describe=True)

        self.records_accepted = Counter(
            "usage_exporter_records_accepted", "Records accepted and made durable.", registry=base
        )
        self.records_rejected = Counter(
            "usage_exporter_records_rejected", "Records or bodies refused, by reason.", ["reason"], registry=base
        )
        for reason in REJECT_REASONS:
            self.records_rejected.labels(reason)
        self.flushes = Counter(
            "usage_exporter_flushes",
            "Batches the writer tried to store in ClickHouse, by outcome; a failed batch is retried as it was.",
            ["outcome"],
            registry=base,
        )
        for outcome in FLUSH_OUTCOMES:
            self.flushes.labels(outcome)
        self.flushed_records = Counter(
            "usage_exporter_flushed_records", "Records written to ClickHouse.", registry=base
        )
        self.duplicate_records = Counter(
            "usage_exporter_duplicate_records",
            "Records dropped before insert because their request_id was already stored.",
            registry=base,
        )
        self.insert_duration = Histogram(
            "usage_exporter_clickhouse_insert_duration_seconds",
            "Time to insert one batch into ClickHouse, failures included.",
            buckets=INSERT_BUCKETS_S,
            registry=base,
        )
        self.folded_records = Counter(
            "usage_exporter_folded_records",
            "Records counted under the label value __other__ because the usage metrics hold metrics.max_series label sets.",
            registry=base,
        )

        # Gauges of one worker's state: summed (or max/min) over live workers in multiprocess mode.
        self.last_flush_success = Gauge(
            "usage_exporter_last_flush_success_timestamp_seconds",
            "Unix time of the last successful ClickHouse insert.",
            registry=base, multiprocess_mode="max",
        )
        self.spool_records = Gauge(
            "usage_exporter_spool_records", "Records accepted but not yet in ClickHouse.",
            registry=base, multiprocess_mode="livesum",
        )
        self.spool_bytes = Gauge(
            "usage_exporter_spool_bytes", "Bytes of the durable buffer not yet in ClickHouse.",
            registry=base, multiprocess_mode="livesum",
        )
        self.spool_max_bytes = Gauge(
            "usage_exporter_spool_max_bytes", "Size of the durable buffer at which ingest answers 503 (spool.max_bytes).",
            registry=base, multiprocess_mode="livesum",
        )
        self.oldest_unflushed_age = Gauge(
            "usage_exporter_oldest_unflushed_age_seconds", "Age of the oldest record not yet in ClickHouse (0 when none).",
            registry=base, multiprocess_mode="livemax",
        )
        self.label_sets = Gauge(
            "usage_exporter_usage_label_sets",
            "Label sets (org, model, endpoint[, token_name]) holding series of their own in the usage metrics.",
            registry=base, multiprocess_mode="livemax",
        )
        self.label_sets_max = Gauge(
            "usage_exporter_usage_label_sets_max", "The cap on usage label sets (metrics.max_series).",
            registry=base, multiprocess_mode="livemax",
        )
        self.label_sets_max.set(max_series)
        self.workers = Gauge(
            "usage_exporter_workers", "Exporter processes serving this endpoint (more than 1 under a multi-worker server).",
            registry=base, multiprocess_mode="livesum",
        )
        self.workers.set(1)
        self.build_info = Gauge(
            "usage_exporter_build_info", "Always 1; the version label names the exporter's version.",
            ["version"], registry=base, multiprocess_mode="livemax",
        )
        self.build_info.labels(__version__).set(1)

        if self.multiprocess:
            self._process: _ProcessMirror | None = _ProcessMirror(base)
        else:
            self._process = None
            ProcessCollector(registry=base)
            PlatformCollector(registry=base)
            GCCollector(registry=base)
            self.label_sets.set_function(lambda: self.usage.label_sets)
        registry.register(self.usage)
        registry.register(base)

        self._multiprocess_renderer = MultiProcessRenderer(multiprocess_dir) if multiprocess_dir is not None else None
        self._backlog: Backlog | None = None
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    @property
    def multiprocess(self) -> bool:
        return self.multiprocess_dir is not None

    def observe_rows(self, rows: Sequence[Row]) -> None:
        """Count a batch of accepted rows in the usage metrics (the ingest hot path)."""
        folded = self.usage.observe_rows(rows)
        if folded:
            self.folded_records.inc(folded)

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
        self.usage.sync()
        if self._backlog is not None:
            rows, size, age = self._backlog()
            self.spool_records.set(rows)
            self.spool_bytes.set(size)
            self.oldest_unflushed_age.set(age)
        self.label_sets.set(self.usage.label_sets)
        if self._process is not None:
            self._process.update()

    def start_refresh(self, interval_s: float = REFRESH_INTERVAL_S) -> None:
        """Keep this worker's gauges current while other workers answer the scrapes."""
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
        self.usage.sync()
        if self.multiprocess:
            multiprocess.mark_process_dead(os.getpid(), str(self.multiprocess_dir))

    # -- exposition ----------------------------------------------------------------------------

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition for a scrape, in the format the scraper asked for, and its content type."""
        encoder, content_type = choose_encoder(accept or "")
        openmetrics = content_type.startswith(OPENMETRICS_TYPE)
        if self._multiprocess_renderer is not None:
            self.refresh()
            _reap_dead_workers(self._multiprocess_renderer.directory)
            return self._multiprocess_renderer.render(openmetrics).encode("utf-8"), content_type
        usage = self.usage.render(openmetrics).encode("utf-8")
        # The library's encoder for the rest; in OpenMetrics its output ends with "# EOF".
        return usage + encoder(self._base), content_type


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
