"""The usage rollups (clickhouse/040_usage_rollups.sql) are exact: the whole minutes of a window
come from them, the cut minutes at its edges from requests, replayed batches count once, rows
that predate the rollups are backfilled, and the rollups expire with the raw rows."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import msgspec

from exporter import usage
from exporter.app import runtime
from exporter.demo import generate
from exporter.records import encode_rows
from exporter.writer import drop_duplicates

from .test_usage import CATALOG, NOW_S, build_dataset, direct, expected, ingest, record_ms, unique

ROLLUPS = ("usage_by_org_1m", "usage_by_token_1m", "usage_by_user_1m", "usage_by_org_1h", "usage_by_token_1h", "usage_by_user_1h")
SCOPES = [
    usage.UsageQuery(None, None, "1w"),
    usage.UsageQuery(None, None, "1h", 25),
    usage.UsageQuery("org-01", None, "1d"),
    usage.UsageQuery("org-01", "tok-1-0", "1d"),
    usage.UsageQuery("org-01", None, "1w", 10, usage.Visibility("jane@org-01.example", ("ml-team",))),
]


def answers(app, source: usage.Source) -> list[dict]:
    return [direct(app, query, NOW_S, "UTC", source) for query in SCOPES]


def test_each_tier_answers_exactly_its_part_of_the_window(make_app):
    records = build_dataset(seed=21, now_ms=int(NOW_S * 1000), count=600, orgs=3)
    app = make_app(models=CATALOG)
    ingest(app, records)
    store = runtime(app).store
    assert answers(app, "rollup") == answers(app, "raw")
    # Edges read from requests (a window older than the recent requests reach) agree too.
    far = datetime.now(timezone.utc) + timedelta(days=1)
    assert [direct(app, q, NOW_S, "UTC", "rollup", recent_from=far) for q in SCOPES] == answers(app, "raw")
    week = direct(app, SCOPES[0], NOW_S, "UTC", "rollup")
    assert week == expected(records, now_s=NOW_S, timeframe="1w")
    now = datetime.fromtimestamp(NOW_S, timezone.utc)
    spans = usage.ranges(usage.window_for("1w", now, "UTC"), usage.recent_horizon(datetime.now(timezone.utc)))
    assert spans.edges_from_recent
    assert spans.hour_start < spans.hour_end

    def stored_between(low: datetime, high: datetime, inclusive: bool = False) -> int:
        lo, hi = low.timestamp() * 1000, high.timestamp() * 1000
        return sum(1 for r in unique(records) if lo <= record_ms(r) < hi or (inclusive and record_ms(r) == hi))

    def total() -> int:
        return direct(app, SCOPES[0], NOW_S, "UTC", "rollup")["metrics"]["total_requests"]

    # The rollup answer never reads requests.
    store.writer.command("DELETE FROM requests WHERE 1")
    assert answers(app, "raw")[0]["metrics"]["total_requests"] == 0
    assert direct(app, SCOPES[0], NOW_S, "UTC", "rollup") == week
    # Without the recent requests, exactly the records of the two cut minutes are missing.
    edges = stored_between(spans.start, spans.whole_start) + stored_between(spans.whole_end, spans.end, inclusive=True)
    assert edges > 0
    store.writer.command("TRUNCATE TABLE usage_recent_requests")
    assert total() == week["metrics"]["total_requests"] - edges
    # Without the minute rollup, also those of the partial hours; the rest are the whole hours.
    partial_hours = stored_between(spans.whole_start, spans.hour_start) + stored_between(spans.hour_end, spans.whole_end)
    assert partial_hours > 0
    store.writer.command("TRUNCATE TABLE usage_by_org_1m")
    assert total() == week["metrics"]["total_requests"] - edges - partial_hours == stored_between(spans.hour_start, spans.hour_end)


def test_replayed_batch_counts_once_in_requests_and_every_rollup(make_app):
    app = make_app()
    store = runtime(app).store
    rows = list(generate(500, 1, seed=4, now=NOW_S))
    payload = encode_rows(rows)
    store.insert_rows(payload, "batch-1")
    store.insert_rows(payload, "batch-1", retry=True)  # the spool replays a batch whose answer was lost
    store.insert_rows(encode_rows(rows[:100]), "batch-2")  # a different batch: stored
    assert store.query("SELECT count() FROM requests") == [(600,)]
    for table in ROLLUPS:
        assert store.query(f"SELECT sum(requests), sum(input_tokens) FROM {table}") == [
            (600, sum(r.input_tokens for r in rows) + sum(r.input_tokens for r in rows[:100]))
        ], table


def test_a_batch_the_views_kept_but_requests_lost_is_stored_again_and_counted_once(make_app):
    # A crash inside an insert can leave the views' tables holding a batch that requests never
    # committed. Its retry must reach requests (not be dropped as a duplicate, by token or by
    # request_id) while the views' tables, which hold it already, drop it.
    app = make_app()
    store = runtime(app).store
    rows = [msgspec.structs.replace(row, request_id=f"lost-{i}" if i % 2 else "")
            for i, row in enumerate(generate(400, 1, seed=5, now=NOW_S))]
    payload = encode_rows(rows)
    store.insert_rows(payload, "batch-lost")
    store.writer.command("DELETE FROM requests WHERE ingest_batch = 'batch-lost'")  # what the crash took
    assert store.query("SELECT count() FROM requests") == [(0,)]
    assert store.query("SELECT count() FROM request_ids") == [(200,)]

    kept, duplicates = drop_duplicates(payload, store.existing_request_ids)
    assert duplicates == 0, "request ids of a batch that is not in requests were taken for duplicates"
    store.insert_rows(kept, "batch-lost", retry=True)
    store.insert_rows(kept, "batch-lost", retry=True)  # and once more: now it is there
    assert store.query("SELECT count(), uniqExact(ingest_batch) FROM requests") == [(400, 1)]
    for table in ROLLUPS:
        assert store.query(f"SELECT sum(requests) FROM {table}") == [(400,)], table
    assert drop_duplicates(payload, store.existing_request_ids)[1] == 200


def test_rows_stored_before_the_rollups_existed_are_backfilled_once(make_app):
    records = build_dataset(seed=22, now_ms=int(NOW_S * 1000), count=400, orgs=3)
    app = make_app(models=CATALOG)
    ingest(app, records)
    store = runtime(app).store
    for table in (*ROLLUPS, "usage_recent_requests"):  # a database from before this schema file
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


def test_rollups_expire_with_the_raw_rows_and_recent_requests_after_8_days(make_app):
    for days, recent_days in ((30, 8), (3, 3), (0, 8)):
        store = runtime(make_app(clickhouse={"retention_days": days})).store
        for table in ROLLUPS:
            create = store.writer.command(f"SHOW CREATE TABLE {table}")
            column = "hour" if table.endswith("_1h") else "minute"
            assert (f"TTL toDateTime({column}) + toIntervalDay({days})" in create) == (days > 0), (table, days)
            assert ("TTL" in create) == (days > 0)
        create = store.writer.command("SHOW CREATE TABLE usage_recent_requests")
        assert f"TTL toDateTime(timestamp) + toIntervalDay({recent_days})" in create
        store.migrate()  # a restart keeps them
        assert f"TTL toDateTime(timestamp) + toIntervalDay({recent_days})" in store.writer.command("SHOW CREATE TABLE usage_recent_requests")


def test_schema_doc_example_queries_run_and_agree_with_the_api(make_app):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "schema.md").read_text()
    queries = re.findall(r"```sql\n(.*?)```", text, flags=re.S)
    assert len(queries) == 3
    records = build_dataset(seed=24, now_ms=int(NOW_S * 1000), count=300, orgs=3)
    for r in records[:40]:
        r.update(org="acme", token_name="ci-token", status_code=503)
    app = make_app(models=CATALOG)
    ingest(app, records)
    store = runtime(app).store
    per_org, per_model, slowest = (store.query(q) for q in queries)
    assert per_org and per_model and slowest
    # The first example sums whole hours of the rollup: it counts what requests holds for those hours.
    [(from_raw,)] = store.query("SELECT count() FROM requests WHERE timestamp >= toStartOfHour(now() - INTERVAL 7 DAY)")
    assert sum(row[1] for row in per_org) == from_raw


def test_migrate_brings_a_database_from_before_ingest_batch_up_to_date(make_app):
    app = make_app()
    store = runtime(app).store
    # The schema as it was before requests.ingest_batch.
    store.writer.command("ALTER TABLE request_ids_mv MODIFY QUERY SELECT request_id, timestamp FROM requests WHERE request_id != ''")
    store.writer.command("ALTER TABLE request_ids DROP COLUMN ingest_batch")
    store.writer.command("ALTER TABLE requests DROP INDEX ingest_batch_idx")
    store.writer.command("ALTER TABLE requests DROP COLUMN ingest_batch")
    store.writer.command("ALTER TABLE requests MODIFY SETTING non_replicated_deduplication_window = 10000")
    old_rows = list(generate(50, 1, seed=6, now=NOW_S))
    store.insert_rows(encode_rows(old_rows), "before-upgrade")

    store.migrate()
    store.migrate()  # and again: nothing left to do
    create = str(store.writer.command("SHOW CREATE TABLE requests"))
    assert "ingest_batch" in create and "ingest_batch_idx" in create and "non_replicated_deduplication_window = 0" in create
    assert "ingest_batch" in str(store.writer.command("SHOW CREATE TABLE request_ids_mv"))
    rows = list(generate(30, 1, seed=7, now=NOW_S))
    store.insert_rows(encode_rows(rows), "after-upgrade")
    store.insert_rows(encode_rows(rows), "after-upgrade", retry=True)
    assert store.query("SELECT ingest_batch, count() FROM requests GROUP BY ingest_batch ORDER BY ingest_batch") == [
        ("", 50), ("after-upgrade", 30)]
    assert store.query("SELECT DISTINCT ingest_batch FROM request_ids WHERE ingest_batch != ''") == [("after-upgrade",)]
    # Ids stored before the upgrade carry no batch and are trusted as stored.
    assert store.existing_request_ids([r.request_id for r in old_rows]) == {r.request_id for r in old_rows}


def test_a_batch_across_two_months_that_requests_kept_one_of_is_completed(make_app):
    # A batch spanning two months is one part per month; a crash between them keeps one.
    app = make_app()
    store = runtime(app).store
    rows = [msgspec.structs.replace(row, request_id=f"split-{i}", timestamp=("2026-10-31 23:59:59.000" if i < 60 else "2026-11-01 00:00:01.000"))
            for i, row in enumerate(generate(100, 1, seed=8, now=NOW_S))]
    payload = encode_rows(rows)
    store.insert_rows(payload, "batch-split")
    store.writer.command("DELETE FROM requests WHERE ingest_batch = 'batch-split' AND toYYYYMM(timestamp) = 202611")
    assert store.batch_partitions("batch-split") == {"202610"}

    kept, duplicates = drop_duplicates(payload, store.existing_request_ids)
    assert duplicates == 60, "only the ids of the month that requests holds are duplicates"
    store.insert_rows(kept, "batch-split", retry=True)
    assert store.query("SELECT toYYYYMM(timestamp), count(), uniqExact(request_id) FROM requests GROUP BY 1 ORDER BY 1") == [
        (202610, 60, 60), (202611, 40, 40)]
