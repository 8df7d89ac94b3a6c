"""The usage metric families (``llm_*``): per-label-set values, the series cap, and fast exposition.

prometheus-client's ``Counter``/``Histogram`` wrappers cost more per record than parsing the
record, and its text encoder needs ~20 µs per series, too slow for a scrape of 10k series. So the
usage families are kept here: each admitted label set holds prometheus-client *value cells*
(``prometheus_client.values.ValueClass``, the storage its own metrics use), created with the same
names and keys a ``Counter``/``Histogram`` child would use. That gives

* one dict update per record plus one cell update per label set and batch (:meth:`observe_rows`);
* in one process, an exposition written straight from the cells with the label text escaped once
  per label set (:meth:`render`);
* in multiprocess mode, cells backed by memory-mapped values, which prometheus-client's
  ``MultiProcessCollector`` sums over workers like any counter or histogram of its own. Writing a
  memory-mapped value costs a lock and a file write, several times a plain float; so batches update
  plain floats and :meth:`sync` (each second, at every scrape, at shutdown) copies the changed ones
  to the files. Another worker's scrape lags by at most that second; a worker killed outright loses
  at most its last second of counts (its records are safe in the spool all the same).

A registry sees the families through :meth:`collect` (prometheus-client's collector protocol), so
``registry.get_sample_value`` and the library's encoders read the same numbers.

Cardinality: at most ``max_series`` label sets (org, model, endpoint[, token_name]) get series of
their own. Records of further label sets are counted under org/model[/token_name] = ``__other__``
(endpoint and status class are closed sets and are kept); the label sets are admitted once for
all families, so a record is folded everywhere or nowhere and ratios per org stay right.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from operator import attrgetter

from prometheus_client import values
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from .records import Row

OTHER = "__other__"

# LLM latencies run from ~20 ms (small embeddings) to minutes (long completions); above ten minutes
# lands in +Inf. Kept in milliseconds, the unit records carry, so a batch is bucketed without a
# division per record; exposed in seconds.
RESPONSE_TIME_BUCKETS_MS = (25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 120_000, 300_000, 600_000)
RESPONSE_TIME_BUCKETS_S = tuple(ms / 1000 for ms in RESPONSE_TIME_BUCKETS_MS)
_LE = tuple(floatToGoString(b) for b in RESPONSE_TIME_BUCKETS_S) + ("+Inf",)

REQUESTS = "llm_requests"
FAILED = "llm_failed_requests"
INPUT = "llm_input_tokens"
OUTPUT = "llm_output_tokens"
RESPONSE_TIME = "llm_response_time_seconds"
HELP = {
    REQUESTS: "Gateway requests recorded, by organization, model, endpoint kind and HTTP status class.",
    FAILED: "Gateway requests that ended with HTTP status >= 400.",
    INPUT: "Input (prompt) tokens consumed.",
    OUTPUT: "Output (completion) tokens returned.",
    RESPONSE_TIME: "Gateway response time of the requests that reported one.",
}
COUNTERS = (FAILED, INPUT, OUTPUT)


def status_class(code: int) -> str:
    """``2xx`` .. ``5xx``; ``unknown`` for the status 0 that importers without a status write."""
    return f"{code // 100}xx" if code else "unknown"


def escape_label_value(value: str) -> str:
    """The text exposition's escaping: backslash, double quote and line feed; nothing else is special."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _encodable(value: str) -> str:
    """A label value that encodes as UTF-8; lone surrogates (never from JSON, maybe from importers) become U+FFFD."""
    if value.isascii():
        return value
    return value.encode("utf-8", "replace").decode("utf-8")


class _Cell:
    """A float updated only under :class:`UsageMetrics`' lock, once per batch; in multiprocess mode
    also the memory-mapped value it is copied to by :meth:`UsageMetrics.sync`."""

    __slots__ = ("value", "shared", "synced")

    def __init__(self, shared: object | None = None) -> None:
        self.value = 0.0
        self.shared = shared
        self.synced = 0.0

    def inc(self, amount: float) -> None:
        self.value += amount

    def get(self) -> float:
        return self.value


class _LabelSet:
    """The value cells of one admitted label set; label text escaped once, here."""

    __slots__ = ("values", "text", "requests", "by_code", "failed", "input_tokens", "output_tokens", "buckets", "time_sum")

    def __init__(self, owner: "UsageMetrics", label_values: tuple[str, ...]) -> None:
        self.values = label_values
        self.text = ",".join(f'{name}="{escape_label_value(v)}"' for name, v in zip(owner.label_names, label_values))
        self.requests: dict[str, object] = {}  # status class -> cell
        self.by_code: dict[int, object] = {}  # status code -> the same cells, skipping status_class() per batch
        # Created up front so a label set reads 0 failed requests and tokens rather than no series.
        self.failed = owner.cell("counter", FAILED, FAILED + "_total", label_values)
        self.input_tokens = owner.cell("counter", INPUT, INPUT + "_total", label_values)
        self.output_tokens = owner.cell("counter", OUTPUT, OUTPUT + "_total", label_values)
        # Created with the first response time: importers without latencies add no 17 zero series.
        self.buckets: list | None = None
        self.time_sum = None


class UsageMetrics:
    """The ``llm_*`` families of one process; thread-safe, one instance per :class:`~exporter.metrics.Metrics`."""

    def __init__(self, token_name_label: bool = False, max_series: int = 10_000) -> None:
        self.label_names = ("org", "model", "endpoint") + (("token_name",) if token_name_label else ())
        self.token_name_label = token_name_label
        self.max_series = max_series
        # prometheus-client's memory-mapped values in multiprocess mode, so its MultiProcessCollector
        # sums them over workers.
        self._shared_class = values.ValueClass if getattr(values.ValueClass, "_multiprocess", False) else None
        self._dirty: set[_LabelSet] = set()
        self._key_of = attrgetter(*self.label_names, "status_code")
        self._series: dict[tuple[str, ...], _LabelSet] = {}
        self._sets: list[_LabelSet] = []  # in admission order, for exposition
        self._admitted = 0
        self._lock = threading.Lock()

    def cell(self, typ: str, family: str, sample: str, label_values: tuple[str, ...], extra: dict[str, str] | None = None):
        """A value cell; its shared value is keyed exactly as a prometheus-client Counter/Histogram child's."""
        if self._shared_class is None:
            return _Cell()
        extra = extra or {}
        return _Cell(self._shared_class(
            typ, family, sample, self.label_names + tuple(extra), label_values + tuple(extra.values()), HELP[family]
        ))

    @property
    def label_sets(self) -> int:
        """Label sets holding series of their own (the ``__other__`` ones not counted)."""
        return self._admitted

    # -- updates -------------------------------------------------------------------------------

    def observe_rows(self, rows: Sequence[Row]) -> int:
        """Count a batch of rows; returns how many were folded into ``__other__``."""
        bounds = RESPONSE_TIME_BUCKETS_MS
        slots = len(bounds) + 1
        bucket_of = bisect_left
        key_of = self._key_of
        tally: dict[tuple, list] = {}
        find = tally.get
        # Plain-dict work per record, no locks: [records, input tokens, output tokens, time sum ms,
        # records per bucket]. Every statement here costs about 1% of ingesting a record.
        for row in rows:
            key = key_of(row)
            acc = find(key)
            if acc is None:
                acc = tally[key] = [0, 0, 0, 0.0, [0] * slots]
            acc[0] += 1
            acc[1] += row.input_tokens
            acc[2] += row.output_tokens
            elapsed = row.response_time_ms
            if elapsed is not None:
                acc[3] += elapsed
                acc[4][bucket_of(bounds, elapsed)] += 1
        with self._lock:
            return self._apply(tally)

    def sync(self) -> None:
        """Multiprocess mode: copy the cells changed since the last sync to the shared files."""
        if self._shared_class is None:
            return
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            for series in dirty:
                cells = [*series.requests.values(), series.failed, series.input_tokens, series.output_tokens]
                if series.buckets is not None:
                    cells += [*series.buckets, series.time_sum]
                for cell in cells:
                    if cell.value != cell.synced:
                        cell.shared.set(cell.value)
                        cell.synced = cell.value

    def _apply(self, tally: dict[tuple, list]) -> int:
        folded = 0
        series_of = self._series.get
        for key, (count, tokens_in, tokens_out, time_sum, buckets) in tally.items():
            labels, code = key[:-1], key[-1]
            series = series_of(labels)
            if series is None:
                series, was_folded = self._admit(labels)
                folded += count if was_folded else 0
            cell = series.by_code.get(code)
            if cell is None:
                cell = self._requests_cell(series, code)
            cell.inc(count)
            if code >= 400:
                series.failed.inc(count)
            if tokens_in:
                series.input_tokens.inc(tokens_in)
            if tokens_out:
                series.output_tokens.inc(tokens_out)
            if self._shared_class is not None:
                self._dirty.add(series)
            if time_sum or any(buckets):
                for cell, n in zip(series.buckets or self._histogram_cells(series), buckets):
                    if n:
                        cell.inc(n)
                series.time_sum.inc(time_sum / 1000.0)
        return folded

    def _admit(self, labels: tuple[str, ...]) -> tuple[_LabelSet, bool]:
        """The series of a label set seen for the first time, or the ``__other__`` one past the cap."""
        if self._admitted < self.max_series:
            series = self._new_set(labels, tuple(_encodable(v) for v in labels))
            self._admitted += 1
            return series, False
        folded = (OTHER, OTHER, labels[2]) + ((OTHER,) if self.token_name_label else ())
        # At most one per endpoint kind, outside the cap. Folded label sets are not remembered:
        # a flood of new tokens must not grow this process's memory either.
        return self._series.get(folded) or self._new_set(folded, folded), True

    def _new_set(self, key: tuple[str, ...], label_values: tuple[str, ...]) -> _LabelSet:
        series = _LabelSet(self, label_values)
        self._series[key] = series
        self._sets.append(series)
        return series

    def _requests_cell(self, series: _LabelSet, code: int):
        klass = status_class(code)
        cell = series.requests.get(klass)
        if cell is None:
            cell = self.cell("counter", REQUESTS, REQUESTS + "_total", series.values, {"status_class": klass})
            series.requests[klass] = cell
        series.by_code[code] = cell
        return cell

    def _histogram_cells(self, series: _LabelSet) -> list:
        name = RESPONSE_TIME + "_bucket"
        # The sum first: readers check buckets, then read the sum.
        series.time_sum = self.cell("histogram", RESPONSE_TIME, RESPONSE_TIME + "_sum", series.values)
        series.buckets = [self.cell("histogram", RESPONSE_TIME, name, series.values, {"le": le}) for le in _LE]
        return series.buckets

    # -- reading -------------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """prometheus-client's collector protocol: the families as metric objects."""
        sets = list(self._sets)
        requests = CounterMetricFamily(REQUESTS, HELP[REQUESTS], labels=self.label_names + ("status_class",))
        for series in sets:
            for klass, cell in list(series.requests.items()):
                requests.add_metric(series.values + (klass,), cell.get())
        yield requests
        for family in COUNTERS:
            metric = CounterMetricFamily(family, HELP[family], labels=self.label_names)
            attribute = {FAILED: "failed", INPUT: "input_tokens", OUTPUT: "output_tokens"}[family]
            for series in sets:
                metric.add_metric(series.values, getattr(series, attribute).get())
            yield metric
        histogram = HistogramMetricFamily(RESPONSE_TIME, HELP[RESPONSE_TIME], labels=self.label_names)
        for series in sets:
            if series.buckets is not None:
                cumulative, running = [], 0.0
                for le, cell in zip(_LE, series.buckets):
                    running += cell.get()
                    cumulative.append((le, running))
                histogram.add_metric(series.values, cumulative, series.time_sum.get())
        yield histogram

    def render(self, openmetrics: bool) -> str:
        """The families in the text format (0.0.4) or OpenMetrics, straight from the cells."""
        sets = list(self._sets)
        out: list[str] = []
        add = out.append

        def header(family: str, kind: str, counter: bool) -> None:
            name = family if openmetrics or not counter else family + "_total"
            add(f"# HELP {name} {HELP[family]}\n# TYPE {name} {kind}\n")

        header(REQUESTS, "counter", True)
        for series in sets:
            for klass, cell in list(series.requests.items()):
                add(f'llm_requests_total{{{series.text},status_class="{klass}"}} {cell.get()!r}\n')
        for family, attribute in ((FAILED, "failed"), (INPUT, "input_tokens"), (OUTPUT, "output_tokens")):
            header(family, "counter", True)
            sample = family + "_total"
            for series in sets:
                add(f"{sample}{{{series.text}}} {getattr(series, attribute).get()!r}\n")
        header(RESPONSE_TIME, "histogram", False)
        for series in sets:
            cells = series.buckets
            if cells is None:
                continue
            text = series.text
            running = 0.0
            for le, cell in zip(_LE, cells):
                running += cell.get()
                add(f'llm_response_time_seconds_bucket{{{text},le="{le}"}} {running!r}\n')
            add(f"llm_response_time_seconds_count{{{text}}} {running!r}\n")
            add(f"llm_response_time_seconds_sum{{{text}}} {series.time_sum.get()!r}\n")
        return "".join(out)
