"""The usage rollups (clickhouse/040_usage_rollups.sql) are exact: the whole minutes of a window
come from them, the cut minutes at its edges from requests, replayed batches count once, rows
that predate the rollups are backfilled, and the rollups expire with the raw rows."""

from __future__ import annotations

from datetime import datetime, timezone

from exporter import usage
from exporter.app import runtime
from exporter.records import encode_rows
from exporter.demo import generate

from .test_usage import CATALOG, NOW_S, build_dataset, direct, expected, ingest

ROLLUPS = ("usage_by_org_1m", "usage_by_token_1m", "usage_by_user_1m")
SCOPES = [
    usage.UsageQuery(None, None, "1w"),
    usage.UsageQuery(None, None, "1h", 25),
    usage.UsageQuery("org-01", None, "1d"),
    usage.UsageQuery("org-01", "tok-1-0", "1d"),
    usage.UsageQuery("org-01", None, "1w", 10, usage.Visibility("jane@org-01.example", ("ml-team",))),
]


def answers(app, source: usage.Source) -> list[dict]:
    return [direct(app, query, NOW_S, "UTC", source) for query in SCOPES]


def test_whole_minutes_come_from_rollups_and_cut_minutes_from_requests(make_app):
    records = build_dataset(seed=21, now_ms=int(NOW_S * 1000), count=600, orgs=3)
    app = make_app(models=CATALOG)
    ingest(app, records)
    store = runtime(app).store
    before = answers(app, "rollup")
    assert before == answers(app, "raw")
    # Remove the raw rows of every whole minute of the 1w window: the rollups still hold them.
    window = usage.window_for("1w", datetime.fromtimestamp(NOW_S, timezone.utc), "UTC")
    params = usage.parameters(SCOPES[0], window, store.database)
    store.writer.command(
        "DELETE FROM requests WHERE timestamp >= {whole_start_ms:DateTime64(3, 'UTC')} AND timestamp < {whole_end_ms:DateTime64(3, 'UTC')}",
        parameters=params,
    )
    assert answers(app, "rollup")[0] == before[0]
    raw_week = answers(app, "raw")[0]
    assert 0 < raw_week["metrics"]["total_requests"] < before[0]["metrics"]["total_requests"]
    # Remove the cut minutes too: exactly those records leave the rollup-based answer.
    store.writer.command("DELETE FROM requests WHERE 1")
    emptied = answers(app, "rollup")[0]["metrics"]["total_requests"]
    assert emptied == before[0]["metrics"]["total_requests"] - raw_week["metrics"]["total_requests"]


def test_replayed_batch_counts_once_in_requests_and_every_rollup(make_app):
    app = make_app()
    store = runtime(app).store
    rows = list(generate(500, 1, seed=4, now=NOW_S))
    payload = encode_rows(rows)
    store.insert_rows(payload, "batch-1")
    store.insert_rows(payload, "batch-1")  # the spool replays a batch whose answer was lost
    store.insert_rows(encode_rows(rows[:100]), "batch-2")  # a different batch: stored
    assert store.query("SELECT count() FROM requests") == [(600,)]
    for table in ROLLUPS:
        assert store.query(f"SELECT sum(requests), sum(input_tokens) FROM {table}") == [
            (600, sum(r.input_tokens for r in rows) + sum(r.input_tokens for r in rows[:100]))
        ], table


def test_rows_stored_before_the_rollups_existed_are_backfilled_once(make_app):
    records = build_dataset(seed=22, now_ms=int(NOW_S * 1000), count=400, orgs=3)
    app = make_app(models=CATALOG)
    ingest(app, records)
    store = runtime(app).store
    for table in ROLLUPS:  # a database from before this schema file
        store.writer.command(f"DROP VIEW {table}_mv")
        store.writer.command(f"DROP TABLE {table}")
    store.migrate()
    store.migrate()  # a second start must not add the rows again
    want = [expected(records, now_s=NOW_S, timeframe=q.timeframe, org=q.org, token=q.token, top=q.top,
                     email=q.visibility.email if q.visibility else None,
                     teams=q.visibility.teams if q.visibility else ()) for q in SCOPES]
    assert answers(app, "rollup") == want
    ingest(app, build_dataset(seed=23, now_ms=int(NOW_S * 1000), count=50, orgs=2))  # the views run again
    assert answers(app, "rollup") == answers(app, "raw")


def test_rollups_expire_with_the_raw_rows(make_app):
    store = runtime(make_app(clickhouse={"retention_days": 30})).store
    for table in ROLLUPS:
        assert "TTL toDateTime(minute) + toIntervalDay(30)" in store.writer.command(f"SHOW CREATE TABLE {table}")
    store = runtime(make_app(clickhouse={"retention_days": 0})).store
    for table in ROLLUPS:
        assert "TTL" not in store.writer.command(f"SHOW CREATE TABLE {table}")
