"""Usage API benchmark: the numbers behind one GET /api/v1/usage, at 1M, 10M and 100M rows.

For each N it builds a seeded dataset of N gateway requests over the last --days days (the demo's
orgs, tokens, users, models and failure mix, generated inside ClickHouse from numbers() so that
100M rows take minutes, not hours), inserted into ``requests`` through the rollups' materialized
views exactly as the writer's inserts are. Then, 5 warm runs each (after one warm-up):

  * exporter: the whole GET /api/v1/usage (Flask view, access check, the one rollup query, JSON)
  * plain table: the same answer computed from ``requests`` alone (usage(source="raw")), i.e.
    ClickHouse without rollups
  * PostgreSQL: the same rows in Aqueduct's own schema (management_request with its indexes on
    timestamp, (token, timestamp), (model, timestamp), user_id, joined to token / user / profile /
    service account / team / org) and the SQL its usage page runs, one query per panel

for the scopes (all orgs, 1w), (all orgs, 1d), (one org, 1d), (one token, 1d), (all orgs, 1h),
reporting median and max, the rollup answers checked equal to the plain-table answers, the
PostgreSQL totals checked equal to ClickHouse's, and the on-disk sizes.

Usage: .venv/bin/python bench/usage.py [--rows 1000000 10000000 100000000] [--postgres-max-rows 10000000]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from exporter import demo, usage  # noqa: E402
from exporter.app import create_app, runtime  # noqa: E402
from exporter.config import load_config  # noqa: E402

UTC = timezone.utc
# The data ends now (to the second): windows this recent read their edges from the recent
# requests, as a live exporter's do.
NOW = datetime.now(UTC).replace(microsecond=0)
BUSIEST_ORG = demo.ORGS[0][0]


@dataclass(frozen=True)
class Scope:
    label: str
    org: str | None
    token: str | None
    timeframe: str


# --- the dataset ----------------------------------------------------------------------------


def token_table(seed: int) -> dict[str, list[demo.Token]]:
    """The demo's tokens (same generator, same seed), so the data looks like `usage-exporter demo`."""
    return demo._tokens(random.Random(seed))  # noqa: SLF001 -- the demo's own token set on purpose


def cumulative(weights: list[float]) -> list[float]:
    total, out = 0.0, []
    for w in weights:
        total += w
        out.append(total)
    return [c / total for c in out[:-1]] + [2.0]  # the last bound catches u == 1.0


# Every value is a deterministic function of (seed, row number): cityHash64 -> uniform in (0, 1).
GENERATE = """
INSERT INTO {db:Identifier}.requests
    (timestamp, org, model, endpoint, status_code, path, method, response_time_ms, input_tokens,
     output_tokens, token_name, token_owner, service_account, team, user_id, request_id)
SELECT
    fromUnixTimestamp64Milli(toInt64({start_ms:Int64} + intDiv(cityHash64({seed:UInt64}, n, 1), 1000) % {span_ms:UInt64}), 'UTC'),
    {orgs:Array(String)}[oi],
    {model_names:Array(String)}[mi],
    {model_endpoints:Array(String)}[mi],
    status,
    if({model_endpoints:Array(String)}[mi] = 'embedding', '/v1/embeddings', '/v1/chat/completions'),
    'POST',
    if(u(12) < 0.01, NULL, round(if(failed AND status IN (400, 401, 404, 413, 429), 3 + 37 * u(11),
        {model_median:Array(Float64)}[mi] * exp(0.55 * sqrt(-2 * ln(u(9))) * cos(2 * pi() * u(10)))), 3)),
    if(failed, 0, greatest(1, toUInt32(-{model_in:Array(Float64)}[mi] * ln(u(13))))),
    if(failed OR {model_out:Array(Float64)}[mi] = 0, 0, greatest(1, toUInt32(-{model_out:Array(Float64)}[mi] * ln(u(14))))),
    {tok_name:Array(Array(String))}[oi][ti],
    {tok_owner:Array(Array(String))}[oi][ti],
    {tok_account:Array(Array(String))}[oi][ti],
    {tok_team:Array(Array(String))}[oi][ti],
    if(length(users) > 0 AND u(4) < 0.8, users[1 + cityHash64({seed:UInt64}, n, 5) % length(users)], ''),
    concat('bench-', toString({seed:UInt64}), '-', toString(n))
FROM
(
    SELECT
        number AS n,
        arrayFirstIndex(c -> c > u(2), {org_cum:Array(Float64)}) AS oi,
        arrayFirstIndex(c -> c > u(3), {tok_cum:Array(Array(Float64))}[oi]) AS ti,
        arrayFirstIndex(c -> c > u(6), {model_cum:Array(Float64)}) AS mi,
        u(7) < 0.03 AS failed,
        if(failed, {fail_codes:Array(UInt16)}[arrayFirstIndex(c -> c > u(8), {fail_cum:Array(Float64)})], 200) AS status,
        {tok_users:Array(Array(Array(String)))}[oi][ti] AS users
    FROM numbers({offset:UInt64}, {count:UInt64})
)
"""


def _u_expand(sql: str) -> str:
    """Spell out u(k), the k-th uniform draw of row n, strictly inside (0, 1) so ln() stays finite."""
    out, i = [], 0
    while True:
        j = sql.find("u(", i)
        if j < 0:
            out.append(sql[i:])
            return "".join(out)
        if j > 0 and (sql[j - 1].isalnum() or sql[j - 1] == "_"):
            out.append(sql[i:j + 2])
            i = j + 2
            continue
        k = sql.index(")", j)
        out.append(sql[i:j])
        out.append(f"((cityHash64({{seed:UInt64}}, n, {sql[j + 2:k]}) + 0.5) / 18446744073709551616.0)")
        i = k + 1


def generation_parameters(seed: int, days: float) -> dict[str, Any]:
    tokens = token_table(seed)
    orgs = [org for org, _, _ in demo.ORGS]
    return {
        "seed": seed,
        "start_ms": int((NOW - timedelta(days=days)).timestamp() * 1000),
        "span_ms": int(days * 86_400_000),
        "orgs": orgs,
        "org_cum": cumulative([w for _, w, _ in demo.ORGS]),
        "tok_cum": [cumulative([1.0 / (rank + 1) ** 1.1 for rank in range(len(tokens[o]))]) for o in orgs],
        "tok_name": [[t.name for t in tokens[o]] for o in orgs],
        "tok_owner": [[t.owner for t in tokens[o]] for o in orgs],
        "tok_account": [[t.service_account for t in tokens[o]] for o in orgs],
        "tok_team": [[t.team for t in tokens[o]] for o in orgs],
        "tok_users": [[list(t.users) for t in tokens[o]] for o in orgs],
        "model_names": [m[0] for m in demo.MODELS],
        "model_endpoints": [m[1] for m in demo.MODELS],
        "model_cum": cumulative([m[2] for m in demo.MODELS]),
        "model_median": [float(m[3]) for m in demo.MODELS],
        "model_in": [float(m[4]) for m in demo.MODELS],
        "model_out": [float(m[5]) for m in demo.MODELS],
        "fail_codes": [c for c, _ in demo.FAILURE_CODES],
        "fail_cum": cumulative([w for _, w in demo.FAILURE_CODES]),
    }


def build_clickhouse(store, rows: int, days: float, seed: int, chunk: int = 5_000_000) -> float:
    sql = _u_expand(GENERATE)
    params = generation_parameters(seed, days) | {"db": store.database}
    started = time.perf_counter()
    for offset in range(0, rows, chunk):
        count = min(chunk, rows - offset)
        store.writer.command(sql, parameters=params | {"offset": offset, "count": count},
                             settings={"insert_deduplicate": 0, "max_partitions_per_insert_block": 1000})
        print(f"  inserted {offset + count:,} rows ({time.perf_counter() - started:.0f} s)", flush=True)
    for table in ("requests", "request_ids", "usage_by_org_1m", "usage_by_token_1m", "usage_by_user_1m"):
        # Steady state: the tables merged, as background merges leave them between bursts.
        store.writer.command(f"OPTIMIZE TABLE {store.database}.{table} FINAL")
    return time.perf_counter() - started


def clickhouse_sizes(store) -> dict[str, tuple[int, int]]:
    rows = store.query(
        "SELECT table, sum(rows), sum(bytes_on_disk) FROM system.parts WHERE active AND database = {db:String} GROUP BY table",
        {"db": store.database},
    )
    return {table: (int(n), int(size)) for table, n, size in rows}


# --- PostgreSQL with Aqueduct's schema -----------------------------------------------------------


def load_postgres(conn, store, seed: int) -> dict[tuple[str, str], int]:
    from tests.aqueduct_db import SCHEMA, AqueductDB

    db = AqueductDB(conn)
    db.create_schema()
    token_ids: dict[tuple[str, str], int] = {}
    with conn.transaction():
        for org, _, domain in demo.ORGS:
            org_id = db.add_org(org)
            admin = db.add_user(f"admin@{domain}", org_id)
            teams: dict[str, int] = {}
            for token in token_table(seed)[org]:
                if token.service_account:
                    team_id = teams.get(token.team) or teams.setdefault(token.team, db.add_team(token.team, org_id))
                    account = db.add_service_account(f"{token.service_account}-{token.name}", team_id)
                    token_ids[(org, token.name)] = db.add_token(token.name, admin, account)
                else:
                    token_ids[(org, token.name)] = db.add_token(token.name, db.add_user(token.owner, org_id))
    request_indexes = [line for line in SCHEMA.splitlines() if line.startswith("CREATE INDEX") and '"management_request"' in line]
    for line in request_indexes:  # build them once after the load, as a restore would
        conn.execute(f'DROP INDEX "{line.split(chr(34))[1]}"')
    keys = [f"{org}/{name}" for org, name in token_ids]
    export = (
        "SELECT input_tokens, output_tokens, model, formatDateTime(timestamp, '%Y-%m-%d %H:%i:%S.%f+00', 'UTC'), method, "
        "status_code, toUInt32(round(response_time_ms)), 'bench/1.0', '10.0.0.1', path, "
        "transform(concat(org, '/', token_name), {keys:Array(String)}, {ids:Array(Int64)}, toInt64(0)), user_id "
        "FROM {db:Identifier}.requests WHERE toDate(timestamp) = {day:Date} FORMAT CSV"
    )
    days = [d for (d,) in store.query("SELECT DISTINCT toDate(timestamp) FROM requests ORDER BY 1")]
    columns = ", ".join(f'"{c}"' for c in ("input_tokens", "output_tokens", "model", "timestamp", "method", "status_code",
                                             "response_time_ms", "user_agent", "ip_address", "path", "token_id", "user_id"))
    with conn.cursor() as cur:
        for day in days:
            data = store.reader.raw_query(export, parameters={"keys": keys, "ids": list(token_ids.values()), "day": day, "db": store.database})
            with cur.copy(f"COPY \"management_request\" ({columns}) FROM STDIN WITH (FORMAT csv, NULL '\\N')") as copy:
                copy.write(data)
    conn.commit()
    for line in request_indexes:
        conn.execute(line.rstrip(";"))
    conn.commit()
    conn.autocommit = True
    conn.execute("VACUUM ANALYZE")
    conn.autocommit = False
    return token_ids


# The joins Django builds for Q(token__user__profile__org=o) | Q(token__service_account__team__org=o).
PG_FROM = """
FROM management_request
INNER JOIN management_token ON management_request.token_id = management_token.id
INNER JOIN auth_user ON management_token.user_id = auth_user.id
LEFT OUTER JOIN management_userprofile ON auth_user.id = management_userprofile.user_id
LEFT OUTER JOIN management_serviceaccount ON management_token.service_account_id = management_serviceaccount.id
LEFT OUTER JOIN management_team ON management_serviceaccount.team_id = management_team.id
"""
PG_TRUNC = {"1h": "minute", "1d": "hour", "1w": "day"}


def postgres_queries(scope: Scope, org_id: int | None, token_id: int | None, start: datetime, end: datetime) -> list[tuple[str, list]]:
    """The usage page's queries, one per panel, as the gateway's ORM issues them."""
    where = "management_request.timestamp >= %s AND management_request.timestamp <= %s"
    args: list[Any] = [start, end]
    base = "FROM management_request"
    if token_id is not None:
        where += " AND management_request.token_id = %s"
        args.append(token_id)
    elif org_id is not None:
        base = PG_FROM
        where += " AND (management_userprofile.org_id = %s OR management_team.org_id = %s)"
        args += [org_id, org_id]
    w = f"{base} WHERE {where}"
    if scope.org is None:
        top = (f"SELECT COALESCE(management_userprofile.org_id, management_team.org_id) AS org_id, COUNT(management_request.id) AS c, "
               f"SUM(management_request.input_tokens), SUM(management_request.output_tokens) {PG_FROM} WHERE {where} "
               "GROUP BY 1 ORDER BY c DESC LIMIT 10")
        lookup = "SELECT id, name FROM management_org WHERE id = ANY(%s)"
    elif scope.token is None:
        top = (f"SELECT management_request.token_id, COUNT(management_request.id) AS c, SUM(management_request.input_tokens), "
               f"SUM(management_request.output_tokens) {w} GROUP BY 1 ORDER BY c DESC LIMIT 10")
        lookup = ("SELECT management_token.id, management_token.name, auth_user.email, management_serviceaccount.name FROM management_token "
                  "INNER JOIN auth_user ON management_token.user_id = auth_user.id LEFT OUTER JOIN management_serviceaccount "
                  "ON management_token.service_account_id = management_serviceaccount.id WHERE management_token.id = ANY(%s)")
    else:
        top = (f"SELECT management_request.user_id, COUNT(management_request.id) AS c, SUM(management_request.input_tokens), "
               f"SUM(management_request.output_tokens) {w} GROUP BY 1 ORDER BY c DESC, 1 LIMIT 10")
        lookup = ""
    queries = [
        (f"SELECT date_trunc('{PG_TRUNC[scope.timeframe]}', management_request.timestamp AT TIME ZONE 'UTC') AS period, "
         f"COUNT(management_request.id) {w} GROUP BY 1 ORDER BY 1", args),
        (top, args),
        (f"SELECT COUNT(*) {w}", args),
        (f"SELECT COUNT(*) {w} AND management_request.status_code >= 400", args),
        (f"SELECT management_request.model, COUNT(management_request.id) AS c {w} GROUP BY 1 ORDER BY c DESC", args),
        (f"SELECT AVG(management_request.response_time_ms) {w} AND management_request.path ILIKE '%%completion%%'", args),
        (f"SELECT AVG(management_request.response_time_ms) {w} AND management_request.path ILIKE '%%embedding%%'", args),
        (f"SELECT SUM(management_request.input_tokens), SUM(management_request.output_tokens) {w}", args),
    ]
    if lookup:
        queries.append((lookup, None))
    return queries


def run_postgres(conn, queries) -> dict[str, Any]:
    results: dict[str, Any] = {}
    ids: list[int] = []
    with conn.cursor() as cur:
        for index, (sql, args) in enumerate(queries):
            if args is None:  # the name lookup of the top rows, as the ORM does it
                cur.execute(sql, [ids])
                cur.fetchall()
                continue
            cur.execute(sql, args)
            rows = cur.fetchall()
            if index == 1:
                ids = [row[0] for row in rows if row[0] is not None]
            results[index] = rows
    conn.rollback()
    return results


# --- timing -----------------------------------------------------------------------------------


def timed(fn: Callable[[], Any], runs: int) -> tuple[float, float]:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000, max(times) * 1000


def fmt_ms(value: tuple[float, float] | None) -> str:
    if value is None:
        return "–"
    return f"{value[0]:.0f} / {value[1]:.0f}" if value[0] >= 10 else f"{value[0]:.1f} / {value[1]:.1f}"


def ratio(value: float) -> str:
    return f"{value:.1f}x" if value < 10 else f"{value:.0f}x"


def human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


def bench_one(rows: int, args, work: Path, cluster) -> list[str]:
    print(f"== {rows:,} rows", flush=True)
    config = load_config(None, {
        "data_dir": str(work / f"data-{rows}"),
        "clickhouse": {"dsn": f"chdb://{work / f'chdb-{rows}'}", "database": "llm_usage"},
        "models": [{"name": m.name, "endpoint": m.endpoint} for m in demo.catalog()],
    }, environ={})
    app = create_app(config, start_writer=False, clock=lambda: NOW.timestamp())
    rt = runtime(app)
    store = rt.store
    took = build_clickhouse(store, rows, args.days, args.seed)
    print(f"  built and merged in {took:.0f} s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    tokens = token_table(args.seed)[BUSIEST_ORG]
    [(busiest_token,)] = store.query(
        "SELECT token_name FROM requests WHERE org = {o:String} GROUP BY token_name ORDER BY count() DESC LIMIT 1", {"o": BUSIEST_ORG})
    assert busiest_token in {t.name for t in tokens}
    scopes = [
        Scope("all orgs, 1w", None, None, "1w"),
        Scope("all orgs, 1d", None, None, "1d"),
        Scope("one org, 1d", BUSIEST_ORG, None, "1d"),
        Scope("one token, 1d", BUSIEST_ORG, busiest_token, "1d"),
        Scope("all orgs, 1h", None, None, "1h"),
    ]
    client = app.test_client()
    catalog = [m.name for m in config.models]
    results: dict[str, dict[str, Any]] = {}
    for scope in scopes:
        query = usage.UsageQuery(scope.org, scope.token, scope.timeframe)
        params = {"timeframe": scope.timeframe} | ({"org": scope.org} if scope.org else {}) | ({"token": scope.token} if scope.token else {})
        rollup = client.get("/api/v1/usage", query_string=params).json
        raw = usage.as_json(usage.usage(store, store.database, query, now=NOW, tz="UTC", catalog=catalog, source="raw"))
        assert rollup == raw, f"rollup and raw answers differ for {scope.label}"
        results[scope.label] = {
            "answer": rollup,
            "exporter": timed(lambda: client.get("/api/v1/usage", query_string=params).json, args.runs),
            "plain": timed(lambda: usage.usage(store, store.database, query, now=NOW, tz="UTC", catalog=catalog, source="raw"), args.runs),
        }
        print(f"  {scope.label}: exporter {fmt_ms(results[scope.label]['exporter'])} ms, plain table {fmt_ms(results[scope.label]['plain'])} ms", flush=True)
    sizes = clickhouse_sizes(store)
    pg_size = None
    if cluster is not None and rows <= args.postgres_max_rows:
        import psycopg

        dsn = cluster.create_database(f"bench_{rows}")
        with psycopg.connect(dsn) as conn:
            started = time.perf_counter()
            token_ids = load_postgres(conn, store, args.seed)
            print(f"  PostgreSQL loaded and indexed in {time.perf_counter() - started:.0f} s", flush=True)
            org_id = conn.execute("SELECT id FROM management_org WHERE name = %s", [BUSIEST_ORG]).fetchone()[0]
            for scope in scopes:
                window = usage.window_for(scope.timeframe, NOW, "UTC")
                queries = postgres_queries(scope, org_id if scope.org else None,
                                           token_ids[(scope.org, scope.token)] if scope.token else None, window.start, window.end)
                answer = run_postgres(conn, queries)
                metrics = results[scope.label]["answer"]["metrics"]
                # Same rows: PostgreSQL counts what ClickHouse counts.
                assert answer[2][0][0] == metrics["total_requests"], scope.label
                assert answer[3][0][0] == metrics["failed_requests"], scope.label
                assert (answer[7][0][0] or 0) == metrics["input_tokens"], scope.label
                results[scope.label]["postgres"] = timed(lambda: run_postgres(conn, queries), args.runs)
                print(f"  {scope.label}: PostgreSQL {fmt_ms(results[scope.label]['postgres'])} ms", flush=True)
            pg_size = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    rt.spool.close()
    store.close()
    lines = [f"| {rows:,} | {label} | {fmt_ms(r['exporter'])} | {fmt_ms(r['plain'])} | {fmt_ms(r.get('postgres'))} | "
             + (ratio(r["postgres"][0] / r["exporter"][0]) if r.get("postgres") else "–") + " |"
             for label, r in results.items()]
    rollups = ("usage_by_org_1m", "usage_by_token_1m", "usage_by_user_1m", "usage_by_org_1h", "usage_by_token_1h",
               "usage_by_user_1h", "usage_recent_requests")
    raw_bytes = sizes["requests"][1] + sizes.get("request_ids", (0, 0))[1]
    rollup_bytes = sum(sizes.get(t, (0, 0))[1] for t in rollups)
    size_line = (f"| {rows:,} | {human(sizes['requests'][1])} | {human(sizes.get('request_ids', (0, 0))[1])} | "
                 + " | ".join(f"{human(sizes.get(t, (0, 0))[1])} ({sizes.get(t, (0, 0))[0]:,})" for t in rollups)
                 + f" | {human(rollup_bytes)} (+{100 * rollup_bytes / max(raw_bytes, 1):.0f} %) | "
                 + (human(pg_size) if pg_size else "–") + " |")
    if not args.keep:
        shutil.rmtree(work / f"chdb-{rows}", ignore_errors=True)
        shutil.rmtree(work / f"data-{rows}", ignore_errors=True)
    return lines + ["SIZE" + size_line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000, 100_000_000])
    parser.add_argument("--days", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--postgres-max-rows", type=int, default=10_000_000,
                        help="skip the PostgreSQL baseline above this many rows (loading and indexing take long)")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the stores live (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the stores after the run")
    args = parser.parse_args()
    # A stopped benchmark still stops its PostgreSQL and removes its stores (the finally blocks run).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="usage-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    from tests.pg_support import PostgresCluster

    settings = {"shared_buffers": "1GB", "work_mem": "64MB", "effective_cache_size": "8GB", "max_parallel_workers_per_gather": "2"}
    lines: list[str] = []
    with PostgresCluster.started(settings=settings) as cluster:
        for rows in args.rows:
            lines += bench_one(rows, args, work, cluster)
    print()
    print(f"Median / max of {args.runs} warm runs, ms; data over {args.days:g} days; now = {NOW.isoformat()}")
    print("| rows | scope | exporter (rollups) | plain ClickHouse table | PostgreSQL (Aqueduct schema) | PostgreSQL / exporter |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for line in lines:
        if not line.startswith("SIZE"):
            print(line)
    print()
    print("On disk (rows in parentheses):")
    print("| rows | requests | request_ids | org_1m | token_1m | user_1m | org_1h | token_1h | user_1h | recent_requests | all usage tables | PostgreSQL |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for line in lines:
        if line.startswith("SIZE"):
            print(line[4:])


if __name__ == "__main__":
    main()
