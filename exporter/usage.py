"""The Usage Dashboard's numbers: the one place that builds the usage SQL.

One :func:`usage` call is one ClickHouse query: each embedded query costs milliseconds of fixed
overhead, so the page's four panels share a single scan. That query reads three tiers of
``clickhouse/040_usage_rollups.sql`` -- whole UTC hours from the hour rollups, the remaining whole
minutes from the minute rollups, and the minutes cut by the window's second-exact start and end
row by row from the recent requests -- and groups the one stream four ways with ``GROUPING SETS``:
the metrics bar, the time buckets, the top-N rows and the models. ``source="raw"`` reads
``requests`` alone; tests and the benchmark use it to prove the tiers give the same answer.

The SQL text depends only on the scope's *shape* (all orgs / one org / one token, user filter or
not, which tiers apply); every value a caller sends travels as a query parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any, Literal, Protocol
from zoneinfo import ZoneInfo

UTC = timezone.utc


@dataclass(frozen=True)
class Timeframe:
    span: timedelta
    bucket: Literal["1m", "1h", "1d"]


TIMEFRAMES: dict[str, Timeframe] = {
    "1h": Timeframe(timedelta(hours=1), "1m"),
    "1d": Timeframe(timedelta(days=1), "1h"),
    "1w": Timeframe(timedelta(days=7), "1d"),
}
TOP_SIZES = (10, 25, 100)

Source = Literal["rollup", "raw"]


class QueryRunner(Protocol):
    """What :func:`usage` needs from the store: ``Store.query`` fits."""

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]: ...


@dataclass(frozen=True)
class Visibility:
    """A user key's record filter: its email as token owner or user id, or one of its teams."""

    email: str
    teams: tuple[str, ...] = ()


@dataclass(frozen=True)
class UsageQuery:
    org: str | None  # None: all organizations
    token: str | None = None  # a token name within ``org``
    timeframe: str = "1d"
    top: int = 10
    visibility: Visibility | None = None

    def __post_init__(self) -> None:
        if self.timeframe not in TIMEFRAMES:
            raise ValueError(f"unknown timeframe {self.timeframe!r}")
        if self.top not in TOP_SIZES:
            raise ValueError(f"top must be one of {TOP_SIZES}")
        if self.token is not None and self.org is None:
            raise ValueError("a token is chosen within one org")

    @property
    def top_kind(self) -> Literal["org", "token", "user_id"]:
        if self.org is None:
            return "org"
        return "token" if self.token is None else "user_id"


@dataclass(frozen=True)
class Window:
    start: datetime  # UTC, whole seconds; records with start <= timestamp <= end count
    end: datetime
    bucket: str
    buckets: tuple[datetime, ...]  # UTC starts of every bucket, the one holding start first


@dataclass(frozen=True)
class Metrics:
    total_requests: int
    failed_requests: int
    avg_response_time_ms_completion: float | None
    avg_response_time_ms_embedding: float | None
    input_tokens: int
    output_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True)
class TopRow:
    name: str
    requests: int
    input_tokens: int
    output_tokens: int
    token_owner: str | None = None  # token rows only; None when the token has none
    service_account: str | None = None


@dataclass(frozen=True)
class Report:
    query: UsageQuery
    window: Window
    metrics: Metrics
    timeseries: tuple[tuple[datetime, int], ...]
    top: tuple[TopRow, ...]
    models: tuple[tuple[str, int], ...]


# --- the window and its buckets -------------------------------------------------------------


def window_for(timeframe: str, now: datetime, tz: str) -> Window:
    """The window ending at ``now`` (truncated to the second) and its buckets in time zone ``tz``."""
    frame = TIMEFRAMES[timeframe]
    end = now.astimezone(UTC).replace(microsecond=0)
    start = end - frame.span
    return Window(start, end, frame.bucket, tuple(bucket_starts(start, end, frame.bucket, ZoneInfo(tz))))


def bucket_start(instant: datetime, bucket: str, tz: ZoneInfo) -> datetime:
    """UTC start of the ``bucket`` (1m, 1h, 1d in ``tz``) that holds ``instant``."""
    local = instant.astimezone(tz)
    if bucket == "1m":
        return instant.replace(second=0, microsecond=0)
    if bucket == "1h":
        # Subtracting the local minutes keeps a repeated hour (DST fall-back) two distinct buckets
        # and gives half-hour zones (Asia/Kolkata) their own hour boundaries.
        return (instant - timedelta(minutes=local.minute, seconds=local.second, microseconds=local.microsecond))
    midnight = datetime(local.year, local.month, local.day, tzinfo=tz)
    return midnight.astimezone(UTC)


def _next_bucket(start: datetime, bucket: str, tz: ZoneInfo) -> datetime:
    if bucket == "1m":
        return start + timedelta(minutes=1)
    if bucket == "1h":
        return bucket_start(start + timedelta(hours=1), bucket, tz)
    local = start.astimezone(tz)
    # Noon of the next local day is never skipped by DST; its midnight starts the next bucket.
    return bucket_start(datetime(local.year, local.month, local.day, 12, tzinfo=tz) + timedelta(days=1), bucket, tz)


def bucket_starts(start: datetime, end: datetime, bucket: str, tz: ZoneInfo) -> list[datetime]:
    """Every bucket from the one holding ``start`` to the one holding ``end``, both included."""
    current = bucket_start(start, bucket, tz)
    starts = []
    while current <= end:
        starts.append(current)
        current = _next_bucket(current, bucket, tz)
    return starts


# --- the query ------------------------------------------------------------------------------

# The edges of every window: the last 8 days of requests, ordered by time (040_usage_rollups.sql).
# It receives rows stamped at most RECENT_DAYS before their insert and drops them RECENT_DAYS
# after their timestamp, so it is complete from (wall clock - RECENT_DAYS) on; the slack allows
# for a ClickHouse server whose clock differs from the exporter's. Windows that start earlier
# (only with an injected past "now": tests, benchmarks) read their edges from requests instead.
_RECENT = "usage_recent_requests"
RECENT_DAYS = 8
_CLOCK_SLACK = timedelta(hours=1)


def recent_horizon(wall_clock: datetime) -> datetime:
    """The earliest instant from which usage_recent_requests holds every row."""
    return wall_clock - timedelta(days=RECENT_DAYS) + _CLOCK_SLACK

# The column each kind of top row is keyed by.
_TOP_COLUMN = {"org": "org", "token": "token_name", "user_id": "user_id"}

# The panels as GROUPING SETS over the one stream. "owners" (token scopes only) finds each
# token's owner and service account as last recorded: max(seen) per (token, owner, account).
_KEYS = ("bucket", "name", "model", "endpoint", "owner_name", "account_name")
_SETS = {
    "metrics": (),
    "buckets": ("bucket",),
    "top": ("name",),
    "models": ("model",),
    "endpoints": ("endpoint",),  # the average response times per endpoint kind
    "owners": ("name", "owner_name", "account_name"),
}


def _shape(query: UsageQuery) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The grouping keys and the sets of ``query``: owners only for token rows."""
    if query.top_kind == "token":
        return _KEYS, tuple(_SETS)
    return _KEYS[:4], tuple(name for name in _SETS if name != "owners")


def _grouping_id(keys: Sequence[str], grouped: Sequence[str]) -> int:
    """ClickHouse's grouping(keys...): one bit per key, the first key highest, set when grouped away."""
    return sum(1 << (len(keys) - 1 - i) for i, key in enumerate(keys) if key not in grouped)


_MEASURES = "requests, failed, rt_count, rt_sum_us, input_tokens, output_tokens"
_RECENT_MEASURES = "1 AS requests, failed, rt_count, rt_sum_us, input_tokens, output_tokens"
_RAW_MEASURES = (
    "1 AS requests, status_code >= 400 AS failed, response_time_ms IS NOT NULL AS rt_count, "
    # Whole microseconds, as the rollups sum them, so raw and rollup sums agree to the bit.
    "ifNull(toUInt64(round(response_time_ms * 1000)), 0) AS rt_sum_us, input_tokens, output_tokens"
)


@dataclass(frozen=True)
class Ranges:
    """Which source answers which part of a window (UTC; the window is start <= t <= end).

    Whole hours ``[hour_start, hour_end)`` come from the hour rollups, the other whole minutes
    ``[whole_start, whole_end)`` from the minute rollups, and the cut minutes at both edges from
    the recent requests. ``hour_start == hour_end`` when the hour rollups cannot be used.
    """

    start: datetime
    end: datetime
    whole_start: datetime
    whole_end: datetime
    hour_start: datetime
    hour_end: datetime
    edges_from_recent: bool  # else from requests


def ranges(window: Window, recent_from: datetime) -> Ranges:
    whole_start = window.start + timedelta(seconds=(60 - window.start.second) % 60)
    whole_end = window.end.replace(second=0)
    hour_start = whole_start + timedelta(minutes=(60 - whole_start.minute) % 60)
    hour_end = whole_end.replace(minute=0)
    # An hour's row must land in one bucket: every bucket boundary inside the window must be a
    # whole UTC hour. Minute buckets, or hour and day buckets of a half-hour time zone, are not.
    aligned = window.bucket != "1m" and all(b.minute == 0 and b.second == 0 for b in window.buckets[1:])
    if not aligned or hour_start >= hour_end:
        hour_start = hour_end = whole_end
    return Ranges(window.start, window.end, whole_start, whole_end, hour_start, hour_end, window.start >= recent_from)


def _tables(query: UsageQuery) -> tuple[str, str]:
    """The (minute, hour) rollups that hold every column the scope filters or groups by."""
    if query.visibility is not None or query.token is not None:
        return "usage_by_user_1m", "usage_by_user_1h"  # the only ones with user_id and team
    if query.org is not None:
        return "usage_by_token_1m", "usage_by_token_1h"
    return "usage_by_org_1m", "usage_by_org_1h"


def _filters(query: UsageQuery) -> str:
    """Scope filters; requests, the recent requests and the rollups name these columns alike."""
    parts = []
    if query.org is not None:
        parts.append("org = {org:String}")
    if query.token is not None:
        parts.append("token_name = {token:String}")
    if query.visibility is not None:
        parts.append("(token_owner = {email:String} OR user_id = {email:String} OR has({teams:Array(String)}, team))")
    return "".join(f" AND {p}" for p in parts)


def _branch(table: str, query: UsageQuery, time_filter: str) -> str:
    """One SELECT of the common row shape: period, name, owner_name, account_name, seen, model, endpoint, measures."""
    per_row = table in (_RECENT, "requests")
    if per_row:
        period = "toStartOfMinute(toDateTime(timestamp, 'UTC')) AS period"
    else:
        period = ("hour" if table.endswith("_1h") else "minute") + " AS period"
    # Aliases differ from every column name: ClickHouse would read an alias in WHERE in its place.
    if query.top_kind == "token":
        # Only token rows show an owner: the one recorded last (ties broken by value).
        owner = "token_owner AS owner_name, service_account AS account_name, " + ("timestamp" if per_row else "last_seen") + " AS seen"
    else:
        owner = "'' AS owner_name, '' AS account_name, toDateTime64(0, 3, 'UTC') AS seen"
    measures = {"requests": _RAW_MEASURES, _RECENT: _RECENT_MEASURES}.get(table, _MEASURES)
    return (
        f"SELECT {period}, {_TOP_COLUMN[query.top_kind]} AS name, {owner}, model, endpoint, {measures} "
        f"FROM {{db:Identifier}}.{table} WHERE {time_filter}{_filters(query)}"
    )


def build_sql(query: UsageQuery, spans: Ranges, source: Source = "rollup") -> str:
    """The one query behind a usage answer (its parameters come from :func:`parameters`)."""
    if source == "raw":
        branches = [_branch("requests", query, "timestamp >= {start:DateTime64(3, 'UTC')} AND timestamp <= {end:DateTime64(3, 'UTC')}")]
    else:
        minute_table, hour_table = _tables(query)
        branches = []
        if spans.hour_start < spans.hour_end:
            branches.append(_branch(hour_table, query, "hour >= {hour_start:DateTime('UTC')} AND hour < {hour_end:DateTime('UTC')}"))
        branches.append(_branch(minute_table, query, (
            "((minute >= {whole_start:DateTime('UTC')} AND minute < {hour_start:DateTime('UTC')})"
            " OR (minute >= {hour_end:DateTime('UTC')} AND minute < {whole_end:DateTime('UTC')}))"
        )))
        branches.append(_branch(_RECENT if spans.edges_from_recent else "requests", query, (
            "((timestamp >= {start:DateTime64(3, 'UTC')} AND timestamp < {whole_start_ms:DateTime64(3, 'UTC')})"
            " OR (timestamp >= {whole_end_ms:DateTime64(3, 'UTC')} AND timestamp <= {end:DateTime64(3, 'UTC')}))"
        )))
    keys, sets = _shape(query)
    owners = _grouping_id(keys, _SETS["owners"])
    return (
        f"SELECT grouping({', '.join(keys)}) AS kind, "
        "arrayCount(b -> b <= period, {bounds:Array(DateTime('UTC'))}) - 1 AS bucket, "
        f"{', '.join(keys[1:])}, "
        "sum(requests) AS requests, sum(failed) AS failed, sum(rt_count) AS rt_count, sum(rt_sum_us) AS rt_sum_us, "
        "sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, max(seen) AS latest "
        f"FROM ({' UNION ALL '.join(branches)}) "
        f"GROUP BY GROUPING SETS ({', '.join('(' + ', '.join(_SETS[name]) + ')' for name in sets)}) "
        # Only the top rows leave ClickHouse (ties by name, as on the page): they share one LIMIT
        # BY group (their other keys are grouped away); every other row is a group of its own.
        f"ORDER BY kind, requests DESC, name LIMIT {{top:UInt32}} BY kind, {', '.join(k for k in keys if k != 'name')}"
        + (f", if(kind = {owners}, name, '')" if query.top_kind == "token" else "")
    )


def _ch_time(instant: datetime, millis: bool = False) -> str:
    text = instant.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return text + ".000" if millis else text


def parameters(query: UsageQuery, window: Window, spans: Ranges, database: str) -> dict[str, Any]:
    params: dict[str, Any] = {
        "db": database,
        "start": _ch_time(spans.start, millis=True),
        "end": _ch_time(spans.end, millis=True),
        "whole_start": _ch_time(spans.whole_start),
        "whole_end": _ch_time(spans.whole_end),
        "whole_start_ms": _ch_time(spans.whole_start, millis=True),
        "whole_end_ms": _ch_time(spans.whole_end, millis=True),
        "hour_start": _ch_time(spans.hour_start),
        "hour_end": _ch_time(spans.hour_end),
        "bounds": [_ch_time(b) for b in window.buckets],
        "top": query.top,
    }
    if query.org is not None:
        params["org"] = query.org
    if query.token is not None:
        params["token"] = query.token
    if query.visibility is not None:
        params["email"] = query.visibility.email
        params["teams"] = [team for team in query.visibility.teams if team]
    return params


def _average(total_us: int, count: int) -> float | None:
    # Sums are whole microseconds; the average is reported in milliseconds to the microsecond.
    return round(total_us / count / 1000, 3) if count else None


def usage(
    runner: QueryRunner,
    database: str,
    query: UsageQuery,
    *,
    now: datetime,
    tz: str,
    catalog: Sequence[str] = (),
    source: Source = "rollup",
    recent_from: datetime | None = None,
) -> Report:
    """Every number of the Usage Dashboard for ``query`` in the window ending at ``now``.

    ``catalog`` is the configured model catalog (config key ``models``, which the exporter also
    writes to the ``models`` table): those models are listed with 0 when unused. Taking it from
    the config rather than the table saves a table read on every call. ``recent_from`` is
    :func:`recent_horizon` of the wall clock unless given.
    """
    window = window_for(query.timeframe, now, tz)
    spans = ranges(window, recent_from or recent_horizon(datetime.now(UTC)))
    rows = runner.query(build_sql(query, spans, source), parameters(query, window, spans, database))
    counts = [0] * len(window.buckets)
    top: list[TopRow] = []
    models: dict[str, int] = dict.fromkeys(catalog, 0)
    totals = (0, 0, 0, 0)
    times: dict[str, tuple[int, int]] = {}
    owners: dict[str, tuple[Any, str, str]] = {}
    keys, sets = _shape(query)
    kinds = {_grouping_id(keys, _SETS[name]): name for name in sets}
    for row in rows:
        values = dict(zip(keys, row[1:len(keys) + 1]))
        requests, failed, rt_count, rt_sum_us, tokens_in, tokens_out, seen = (row[len(keys) + 1:])
        kind = kinds.get(row[0])
        if kind == "metrics":
            totals = (int(requests), int(failed), int(tokens_in), int(tokens_out))
        elif kind == "buckets":
            counts[values["bucket"]] += int(requests)
        elif kind == "top":
            top.append(TopRow(values["name"], int(requests), int(tokens_in), int(tokens_out)))
        elif kind == "models":
            models[values["model"]] = int(requests)
        elif kind == "endpoints":
            times[values["endpoint"]] = (int(rt_sum_us), int(rt_count))
        elif kind == "owners":
            latest = (seen, values["owner_name"], values["account_name"])
            # The last recorded owner; equal times are settled by the values, as max() does in SQL.
            owners[values["name"]] = max(owners.get(values["name"], latest), latest)
    if query.top_kind == "token":
        top = [replace(row, token_owner=owners[row.name][1] or None, service_account=owners[row.name][2] or None) for row in top]
    metrics = Metrics(totals[0], totals[1], _average(*times.get("completion", (0, 0))),
                      _average(*times.get("embedding", (0, 0))), totals[2], totals[3])
    # ClickHouse compares strings bytewise, which for UTF-8 is Python's code point order.
    top.sort(key=lambda row: (-row.requests, row.name))
    return Report(
        query=query,
        window=window,
        metrics=metrics,
        timeseries=tuple(zip(window.buckets, counts)),
        top=tuple(top),
        models=tuple(sorted(models.items(), key=lambda item: (-item[1], item[0]))),
    )


def iso(instant: datetime) -> str:
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def as_json(report: Report) -> dict[str, Any]:
    """The ``GET /api/v1/usage`` body (docs: the contract's field order)."""
    query, window, metrics = report.query, report.window, report.metrics
    return {
        "scope": {"org": query.org or "all", "token": query.token, "timeframe": query.timeframe, "top_kind": query.top_kind},
        "window": {"start": iso(window.start), "end": iso(window.end), "bucket": window.bucket},
        "metrics": {
            "total_requests": metrics.total_requests,
            "failed_requests": metrics.failed_requests,
            "avg_response_time_ms_completion": metrics.avg_response_time_ms_completion,
            "avg_response_time_ms_embedding": metrics.avg_response_time_ms_embedding,
            "input_tokens": metrics.input_tokens,
            "output_tokens": metrics.output_tokens,
            "total_tokens": metrics.total_tokens,
        },
        "timeseries": [{"t": iso(t), "requests": n} for t, n in report.timeseries],
        "top": [
            {
                "rank": rank,
                "name": row.name,
                "requests": row.requests,
                "input_tokens": row.input_tokens,
                "output_tokens": row.output_tokens,
                "total_tokens": row.input_tokens + row.output_tokens,
                "token_owner": row.token_owner,
                "service_account": row.service_account,
            }
            for rank, row in enumerate(report.top, start=1)
        ],
        "models": [{"model": model, "requests": n} for model, n in report.models],
    }

