"""Backfill rate of the Aqueduct importer against the ceiling of a plain COPY ... TO STDOUT.

    .venv/bin/python bench/importer.py [--rows 1000000] [--repeat 3]

Starts a throwaway PostgreSQL (tests/pg_support.py), creates Aqueduct's tables
(tests/aqueduct_db.py) with 7 orgs, 60 user and service-account tokens and ``--rows`` requests
over 30 days (2 % without status or latency), then measures, best of ``--repeat``:

- ceiling: ``COPY management_request TO STDOUT`` read to the end by psycopg and discarded;
- import: ``AqueductImporter.run_once`` (what ``usage-exporter import aqueduct`` runs) into a fresh
  embedded store each time: the join, PostgreSQL rendering the rows, and the insert into
  ``requests`` with its materialized views, the two overlapped;
- and, to show where the time goes, each half alone: the importer's own ``COPY (SELECT ... joins)``
  read to the end, the insert of those same rows (fetched beforehand) into a fresh store, and the
  same inserts into a copy of ``requests`` that feeds none of the store's materialized views.

Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from exporter.config import load_config  # noqa: E402
from exporter.integrations.aqueduct import (  # noqa: E402
    COLUMNS,
    AqueductImporter,
    AqueductSource,
    ImportSettings,
    Watermark,
    insert_tsv,
)
from exporter.storage import Store  # noqa: E402
from tests.aqueduct_db import AqueductDB  # noqa: E402
from tests.pg_support import PostgresCluster  # noqa: E402

ORGS = ["Technische Universität Wien", "acme", "datalab", "globex", "initech", "umbrella", "東京ラボ"]

FILL = """
INSERT INTO management_request (input_tokens, output_tokens, model, "timestamp", method, status_code,
                                response_time_ms, user_agent, ip_address, path, token_id, user_id)
SELECT (random() * 2000)::int,
       CASE WHEN g % 4 = 2 THEN 0 ELSE (random() * 800)::int END,
       (ARRAY['gpt-4o', 'gpt-4o-mini', 'text-embedding-3-small', 'llama-3.3-70b-instruct'])[1 + g % 4],
       now() - interval '30 days' + g * (interval '30 days' / %(rows)s),
       'POST',
       CASE WHEN g % 50 = 0 THEN NULL WHEN g % 31 = 0 THEN 429 WHEN g % 97 = 0 THEN 500 ELSE 200 END,
       CASE WHEN g % 50 = 0 THEN NULL ELSE (random() * 5000)::int END,
       'python-httpx/0.28', '10.0.0.1',
       (ARRAY['/v1/chat/completions', '/v1/completions', '/v1/embeddings', '/v1/chat/completions'])[1 + g % 4],
       tokens.ids[1 + (g::bigint * 7919) % array_length(tokens.ids, 1)],
       CASE WHEN g % 3 = 0 THEN '' ELSE 'user-' || (g % 997) END
FROM generate_series(1, %(rows)s) AS g,
     (SELECT array_agg(id ORDER BY id) AS ids FROM management_token) AS tokens
"""


def seed(dsn: str, rows: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        db = AqueductDB(conn)
        db.create_schema()
        for index, name in enumerate(ORGS):
            org = db.add_org(name)
            team = db.add_team(f"team-{index}", org)
            for n in range(8):
                user = db.add_user(f"user{n}@{index}.example", org)
                db.add_token(f"token-{index}-{n}", user)
            for n in range(2):
                account = db.add_service_account(f"bot-{index}-{n}", team)
                db.add_token(f"bot-token-{index}-{n}", user, account)
        conn.execute(FILL.replace("%(rows)s", str(rows)))  # no parameters: psycopg leaves the % alone
        conn.execute("VACUUM (ANALYZE) management_request")  # sets hint bits, so no run pays for them


def ceiling(dsn: str) -> tuple[float, int]:
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        started = time.perf_counter()
        size = 0
        with cur.copy("COPY management_request TO STDOUT") as copy:
            for block in copy:
                size += len(block)
        return time.perf_counter() - started, size


def fresh_store(data_dir: Path) -> Store:
    config = load_config(None, {"data_dir": str(data_dir), "clickhouse": {"database": f"bench_{uuid.uuid4().hex[:8]}"}}, environ={})
    store = Store(config)
    store.migrate()
    return store


def store_views(data_dir: Path) -> int:
    store = fresh_store(data_dir)
    try:
        return store.query("SELECT count() FROM system.tables WHERE database = {db:String} AND engine = 'MaterializedView'",
                           {"db": store.database})[0][0]
    finally:
        store.close()


def read_half(dsn: str, batch_rows: int) -> tuple[float, list[bytes]]:
    """The importer's PostgreSQL side alone: every chunk's COPY of the joined rows."""
    source = AqueductSource(dsn)
    chunks, after = [], 0
    started = time.perf_counter()
    while (last := source.chunk_end(after, 2**62, batch_rows, None)) is not None:
        chunks.append(source.rows(after, last, None))
        after = last
    source.close()
    return time.perf_counter() - started, chunks


def write_half(chunks: list[bytes], data_dir: Path) -> float:
    """The store side alone: the same chunks inserted into requests (and its views)."""
    store = fresh_store(data_dir)
    try:
        started = time.perf_counter()
        for index, chunk in enumerate(chunks):
            insert_tsv(store, chunk, f"bench-{index}")
        return time.perf_counter() - started
    finally:
        store.close()


def write_half_without_views(chunks: list[bytes], data_dir: Path) -> float:
    """The same inserts into a copy of ``requests`` that feeds no materialized view: the views' share."""
    store = fresh_store(data_dir)
    try:
        store.writer.command(f"CREATE TABLE {store.database}.requests_alone AS {store.database}.requests")
        started = time.perf_counter()
        for index, chunk in enumerate(chunks):
            store.writer.raw_insert(f"{store.database}.requests_alone", list(COLUMNS), chunk, fmt="TabSeparated",
                                    settings={"insert_deduplication_token": f"bench-{index}", "max_partitions_per_insert_block": 0})
        return time.perf_counter() - started
    finally:
        store.close()


def import_once(dsn: str, data_dir: Path, batch_rows: int) -> tuple[float, int]:
    store = fresh_store(data_dir)
    source = AqueductSource(dsn)
    importer = AqueductImporter(source, store, Watermark(data_dir / f"{store.database}.json", source.display),
                                ImportSettings(postgres_dsn=dsn, settle_s=0, batch_rows=batch_rows))
    try:
        started = time.perf_counter()
        result = importer.run_once()
        elapsed = time.perf_counter() - started
        stored = store.query("SELECT count() FROM requests")[0][0]
        assert stored == result.written, (stored, result.written)
        return elapsed, result.written
    finally:
        source.close()
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch-rows", type=int, default=50_000, help="the importer's chunk size (default: its default)")
    args = parser.parse_args()
    with PostgresCluster.started(settings={"shared_buffers": "512MB"}) as pg, tempfile.TemporaryDirectory() as tmp:
        dsn = pg.create_database("aqueduct")
        started = time.perf_counter()
        seed(dsn, args.rows)
        print(f"seeded {args.rows} rows in {time.perf_counter() - started:.1f}s", file=sys.stderr)
        best: dict[str, float] = {}
        for attempt in range(args.repeat):
            timings = {"ceiling": ceiling(dsn)[0]}
            timings["read"], chunks = read_half(dsn, args.batch_rows)
            timings["write"] = write_half(chunks, Path(tmp))
            timings["write_alone"] = write_half_without_views(chunks, Path(tmp))
            timings["import"], written = import_once(dsn, Path(tmp), args.batch_rows)
            assert written == args.rows, written
            print(f"run {attempt + 1}: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()), file=sys.stderr)
            best = {k: min(v, best.get(k, v)) for k, v in timings.items()}

        def rate(key: str) -> str:
            return f"{best[key]:.2f} s = {args.rows / best[key]:,.0f} rows/s"

        views = int(store_views(Path(tmp)))
        print("| rows | COPY management_request TO STDOUT (ceiling) | importer backfill | ratio | its read half alone "
              f"| its write half alone | the same inserts without the {views} views |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        print(f"| {args.rows:,} | {rate('ceiling')} | {rate('import')} | {best['ceiling'] / best['import']:.2f} "
              f"| {rate('read')} | {rate('write')} | {rate('write_alone')} |")


if __name__ == "__main__":
    main()
