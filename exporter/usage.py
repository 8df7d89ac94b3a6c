"""The Usage Dashboard's numbers: the one place that builds the usage SQL.

One :func:`usage` call is one ClickHouse query (each embedded query costs milliseconds of fixed
overhead, so the page's four panels share a single scan). The query reads the per-minute rollups
of ``clickhouse/040_usage_rollups.sql`` for the whole minutes of the window and ``requests`` only
for the two partial minutes that the window's second-exact start and end cut, then groups that
one stream four ways with ``GROUPING SETS``: the metrics bar, the time buckets, the top-N rows and
the models. ``source="raw"`` reads ``requests`` alone; tests and the benchmark use it to prove the
rollups give the same answer.

The SQL text depends only on the scope's *shape* (all orgs / one org / one token, user filter or
not); every value a caller sends travels as a query parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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

# Rollup tables, by what they can answer (040_usage_rollups.sql).
_BY_ORG = "usage_by_org_1m"
_BY_TOKEN = "usage_by_token_1m"
_BY_USER = "usage_by_user_1m"

# The column each kind of top row is keyed by.
_TOP_COLUMN = {"org": "org", "token": "token_name", "user_id": "user_id"}

# GROUPING SETS ids: grouping(bucket, name, model) has a bit set for each column grouped away.
_SET_METRICS, _SET_BUCKETS, _SET_TOP, _SET_MODELS = 7, 3, 5, 6

_MEASURES = "requests, failed, rt_count, rt_sum_us, input_tokens, output_tokens"
_RAW_MEASURES = (
    "toUInt64(1) AS requests, toUInt64(status_code >= 400) AS failed, "
    "toUInt64(response_time_ms IS NOT NULL) AS rt_count, "
    # Whole microseconds, as the rollups sum them, so raw and rollup sums agree to the bit.
    "ifNull(toUInt64(round(response_time_ms * 1000)), 0) AS rt_sum_us, "
    "toUInt64(input_tokens) AS input_tokens, toUInt64(output_tokens) AS output_tokens"
)


def _rollup_table(query: UsageQuery) -> str:
    if query.visibility is not None or query.token is not None:
        return _BY_USER  # the only rollup with user_id and team
    return _BY_TOKEN if query.org is not None else _BY_ORG


def _filters(query: UsageQuery) -> str:
    """Scope filters, the same column names on requests and on every rollup that holds them."""
    parts = []
    if query.org is not None:
        parts.append("org = {org:String}")
    if query.token is not None:
        parts.append("token_name = {token:String}")
    if query.visibility is not None:
        parts.append("(token_owner = {email:String} OR user_id = {email:String} OR has({teams:Array(String)}, team))")
    return "".join(f" AND {p}" for p in parts)


def _branch(table: str, query: UsageQuery, time_filter: str, raw: bool) -> str:
    """One SELECT of the common row shape: minute, name, owner, account, last_seen, model, endpoint, measures."""
    name = _TOP_COLUMN[query.top_kind]
    has_owner = raw or table != _BY_ORG
    owner = "token_owner, service_account" if has_owner else "'' AS token_owner, '' AS service_account"
    if raw:
        minute = "toStartOfMinute(toDateTime(timestamp, 'UTC')) AS minute"
        last_seen = "timestamp AS last_seen"
        measures = _RAW_MEASURES
    else:
        minute = "minute"
        last_seen = "last_seen" if has_owner else "toDateTime64(0, 3, 'UTC') AS last_seen"
        measures = _MEASURES
    return (
        f"SELECT {minute}, {name} AS name, {owner}, {last_seen}, model, endpoint, {measures} "
        f"FROM {{db:Identifier}}.{table} WHERE {time_filter}{_filters(query)}"
    )


def build_sql(query: UsageQuery, source: Source = "rollup") -> str:
    """The one query behind a usage answer (its parameters come from :func:`parameters`)."""
    if source == "raw":
        stream = _branch("requests", query, "timestamp >= {start:DateTime64(3, 'UTC')} AND timestamp <= {end:DateTime64(3, 'UTC')}", raw=True)
    else:
        whole = "minute >= {whole_start:DateTime('UTC')} AND minute < {whole_end:DateTime('UTC')}"
        # The minutes cut by the window's edges; requests is ordered by (org, token_name, timestamp),
        # so these two short ranges are a few granules per token.
        edges = (
            "((timestamp >= {start:DateTime64(3, 'UTC')} AND timestamp < {whole_start_ms:DateTime64(3, 'UTC')})"
            " OR (timestamp >= {whole_end_ms:DateTime64(3, 'UTC')} AND timestamp <= {end:DateTime64(3, 'UTC')}))"
        )
        stream = f"{_branch(_rollup_table(query), query, whole, raw=False)} UNION ALL {_branch('requests', query, edges, raw=True)}"
    owner = (
        "argMax((token_owner, service_account), (last_seen, token_owner, service_account))"
        if query.top_kind == "token"
        else "('', '')"
    )
    grouped = (
        "SELECT grouping(bucket, name, model) AS kind, "
        "arrayCount(b -> b <= minute, {bounds:Array(DateTime('UTC'))}) - 1 AS bucket, name, model, "
        "sum(requests) AS requests, sum(failed) AS failed, "
        "sumIf(rt_count, endpoint = 'completion') AS rt_count_completion, "
        "sumIf(rt_sum_us, endpoint = 'completion') AS rt_sum_us_completion, "
        "sumIf(rt_count, endpoint = 'embedding') AS rt_count_embedding, "
        "sumIf(rt_sum_us, endpoint = 'embedding') AS rt_sum_us_embedding, "
        "sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, "
        f"{owner} AS owner "
        f"FROM ({stream}) "
        "GROUP BY GROUPING SETS ((), (bucket), (name), (model)) "
        # Only the top rows leave ClickHouse (ties by name, as on the page). Bucket and model rows
        # each form their own LIMIT BY group; the top rows share (bucket 0, model '').
        "ORDER BY kind, requests DESC, name LIMIT {top:UInt32} BY kind, bucket, model"
    )
    return grouped


def _ch_time(instant: datetime, millis: bool) -> str:
    text = instant.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return text + ".000" if millis else text


def parameters(query: UsageQuery, window: Window, database: str) -> dict[str, Any]:
    whole_start = window.start + timedelta(seconds=(60 - window.start.second) % 60)
    whole_end = window.end.replace(second=0)
    params: dict[str, Any] = {
        "db": database,
        "start": _ch_time(window.start, True),
        "end": _ch_time(window.end, True),
        "whole_start": _ch_time(whole_start, False),
        "whole_end": _ch_time(whole_end, False),
        "whole_start_ms": _ch_time(whole_start, True),
        "whole_end_ms": _ch_time(whole_end, True),
        "bounds": [_ch_time(b, False) for b in window.buckets],
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
) -> Report:
    """Every number of the Usage Dashboard for ``query`` in the window ending at ``now``.

    ``catalog`` is the configured model catalog (config key ``models``, which the exporter also
    writes to the ``models`` table): those models are listed with 0 when unused. Taking it from
    the config rather than the table saves a table read on every call.
    """
    window = window_for(query.timeframe, now, tz)
    rows = runner.query(build_sql(query, source), parameters(query, window, database))
    counts = [0] * len(window.buckets)
    top: list[TopRow] = []
    models: dict[str, int] = dict.fromkeys(catalog, 0)
    metrics = Metrics(0, 0, None, None, 0, 0)
    for (kind, bucket, name, model, requests, failed, rtc_c, rts_c, rtc_e, rts_e, tokens_in, tokens_out, owner) in rows:
        if kind == _SET_METRICS:
            metrics = Metrics(int(requests), int(failed), _average(rts_c, rtc_c), _average(rts_e, rtc_e), int(tokens_in), int(tokens_out))
        elif kind == _SET_BUCKETS:
            counts[bucket] += int(requests)
        elif kind == _SET_TOP:
            token_owner, account = owner
            is_token = query.top_kind == "token"
            top.append(TopRow(name, int(requests), int(tokens_in), int(tokens_out),
                              (token_owner or None) if is_token else None, (account or None) if is_token else None))
        elif kind == _SET_MODELS:
            models[model] = int(requests)
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

