"""The Aqueduct importer against a real PostgreSQL holding Aqueduct's tables.

The expected numbers come from :func:`aqueduct_page`, a transcription of Aqueduct's own Usage page
logic (``aqueduct/management/views/usage.py``: ``UsageDashboardView.get_context_data``,
``_get_timeseries``, ``_get_top_items``, ``get_all_buckets``) over the rows the test inserted,
computed in Python from what the test knows about each token, never from the importer's output.
"""

from __future__ import annotations

import json
import random
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest

from exporter.app import runtime
from exporter.integrations.aqueduct import (
    COLUMNS,
    UNKNOWN_ORG,
    AqueductImporter,
    AqueductSource,
    ImportFailed,
    ImportSettings,
    parse_since,
    watermark_for,
)
from exporter.records import Row

from .aqueduct_db import AqueductDB
from .pg_support import postgres_cluster  # noqa: F401  (the session fixture)

UTC = timezone.utc
# Aqueduct's router config (LITELLM_ROUTER_CONFIG_FILE_PATH) lists these; its page shows only them.
ROUTER_MODELS = ["gpt-4o", "gpt-4o-mini", "text-embedding-3-small", "whisper-1", "o3-pro"]
SPANS = {"1h": timedelta(hours=1), "1d": timedelta(days=1), "1w": timedelta(days=7)}


@dataclass(frozen=True)
class TokenInfo:
    """What Aqueduct's ORM would resolve for a token (None: the token row is gone)."""

    id: int
    name: str
    profile_org: str | None  # token.user.profile.org.name
    user_email: str
    service_account: str | None = None
    team: str | None = None
    team_org: str | None = None  # token.service_account.team.org.name


@dataclass
class Gateway:
    db: AqueductDB
    dsn: str
    tokens: dict[int, TokenInfo]
    rows: list[dict[str, Any]]  # each with "id" and "token" (TokenInfo, or None once orphaned)


@pytest.fixture
def aqueduct_dsn(postgres_cluster) -> str:  # noqa: F811
    dsn = postgres_cluster.create_database()
    with psycopg.connect(dsn, autocommit=True) as conn:
        AqueductDB(conn).create_schema()
    return dsn


def _offset(rng: random.Random) -> timedelta:
    """A random age up to 8 days, never within 5 minutes of a window edge (1h, 1d, 7d) so the
    seconds between seeding and asking cannot move a row across one."""
    while True:
        # A sixth of the traffic in the last hour, so the 1h view has something to count too.
        seconds = rng.uniform(90, 3300) if rng.random() < 1 / 6 else rng.uniform(90, 8 * 86_400)
        if all(abs(seconds - edge) > 300 for edge in (3600, 86_400, 7 * 86_400)):
            return timedelta(seconds=seconds)


def seed_gateway(dsn: str, rows: int = 600, seed: int = 8) -> Gateway:
    """Orgs, users, teams, service accounts and tokens with non-ASCII names, and ``rows`` requests
    (null status and latency, failures, every endpoint kind), plus rows whose token was removed
    without Django (no cascade) and a user without a profile."""
    rng = random.Random(seed)
    conn = psycopg.connect(dsn, autocommit=True)
    db = AqueductDB(conn)
    tu = db.add_org("Technische Universität Wien")
    acme = db.add_org("acme")
    tokyo = db.add_org("東京ラボ")
    jurgen = db.add_user("jürgen.müller@tuwien.ac.at", tu)
    anna = db.add_user("anna@acme.org", acme)
    sato = db.add_user("佐藤@example.jp", tokyo)
    root = db.add_user("root@gateway.local", None)  # a superuser made with createsuperuser: no profile
    forschung = db.add_team("Forschung & Lehre", tu)
    ml = db.add_team("ml-team", acme)
    indexer = db.add_service_account("rag-indexer ✨", forschung)
    ci = db.add_service_account("ci-bot", ml)

    tokens: dict[int, TokenInfo] = {}

    def token(name: str, user: int, email: str, org: str | None, sa: int | None = None,
              sa_name: str | None = None, team: str | None = None) -> TokenInfo:
        info = TokenInfo(db.add_token(name, user, sa), name, org, email, sa_name, team, org if sa else None)
        tokens[info.id] = info
        return info

    weighted = [
        (token("jürgens-laptop", jurgen, "jürgen.müller@tuwien.ac.at", "Technische Universität Wien"), 8),
        (token("indexer 🔑", jurgen, "jürgen.müller@tuwien.ac.at", "Technische Universität Wien", indexer,
               "rag-indexer ✨", "Forschung & Lehre"), 5),
        (token("anna-laptop", anna, "anna@acme.org", "acme"), 6),
        (token("anna-server", anna, "anna@acme.org", "acme"), 3),
        (token("ci-bot-token", anna, "anna@acme.org", "acme", ci, "ci-bot", "ml-team"), 4),
        (token("東京-main", sato, "佐藤@example.jp", "東京ラボ"), 3),
        (token("root-token", root, "root@gateway.local", None), 1),
        (token("soon-orphaned", anna, "anna@acme.org", "acme"), 1),
    ]
    kinds = [
        ("gpt-4o", "/v1/chat/completions"), ("gpt-4o-mini", "/chat/completions"), ("gpt-4o", "/v1/completions"),
        ("text-embedding-3-small", "/v1/embeddings"), ("whisper-1", "/v1/audio/transcriptions"),
    ]
    user_ids = ["", "", "user-42", "jürgen.müller@tuwien.ac.at", "ユーザー7", "a\\b \"quoted\"", "tab\there\nnewline\r\x07"]
    now = datetime.now(UTC)
    planned = []
    for _ in range(rows):
        info = rng.choices([t for t, _ in weighted], [w for _, w in weighted])[0]
        model, path = rng.choice(kinds)
        roll = rng.random()
        status = None if roll < 0.06 else rng.choice([400, 404, 429, 500, 503]) if roll < 0.16 else 200
        latency = None if status is None or rng.random() < 0.05 else rng.randrange(5, 30_000)
        failed = status is None or status >= 400
        planned.append({
            "token_id": info.id, "timestamp": now - _offset(rng), "model": model, "path": path,
            "method": "POST", "status_code": status, "response_time_ms": latency,
            "input_tokens": 0 if failed else rng.randrange(1, 4000),
            "output_tokens": 0 if failed or "embedding" in path else rng.randrange(1, 2000),
            "user_id": rng.choice(user_ids), "token": info,
        })
    # Aqueduct inserts rows as requests start, so ids follow time.
    planned.sort(key=lambda r: r["timestamp"])
    ids = db.add_requests([{k: v for k, v in r.items() if k != "token"} for r in planned])
    for row, row_id in zip(planned, ids, strict=True):
        row["id"] = row_id
    # A token removed behind Django's back (a restored dump, a database without foreign keys):
    # its requests stay, pointing at nothing.
    orphaned = next(t for t, _ in weighted if t.name == "soon-orphaned")
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute("DELETE FROM management_token WHERE id = %s", [orphaned.id])
    for row in planned:
        if row["token"] is orphaned:
            row["token"] = None
    return Gateway(db, dsn, tokens, planned)


# --- Aqueduct's page logic, transcribed -------------------------------------------------------


def _trunc(instant: datetime, span: str) -> datetime:
    if span == "1h":
        return instant.replace(second=0, microsecond=0)
    if span == "1d":
        return instant.replace(minute=0, second=0, microsecond=0)
    return instant.replace(hour=0, minute=0, second=0, microsecond=0)


def _buckets(start: datetime, now: datetime, span: str) -> list[int]:
    """get_all_buckets(): epoch milliseconds of every bucket from start's to now's, both included."""
    delta = {"1h": timedelta(minutes=1), "1d": timedelta(hours=1), "1w": timedelta(days=1)}[span]
    point, end, points = _trunc(start, span), _trunc(now, span), []
    while point <= end:
        points.append(int(point.timestamp() * 1000))
        point += delta
    return points


def _org_of(token: TokenInfo | None) -> str | None:
    return token.profile_org if token else None


def aqueduct_page(gateway: Gateway, now: datetime, span: str, org: str | None = None,
                  token_name: str | None = None) -> dict[str, Any]:
    """What UsageDashboardView shows a global admin (org=None: "all"), as plain numbers."""
    reqs = gateway.rows
    if org is not None:  # Q(token__user__profile__org=org) | Q(token__service_account__team__org=org)
        reqs = [r for r in reqs if r["token"] and org in (r["token"].profile_org, r["token"].team_org)]
    reqs = [r for r in reqs if r["model"] in ROUTER_MODELS]
    if token_name is not None:
        reqs = [r for r in reqs if r["token"] and r["token"].name == token_name]
    start = now - SPANS[span]
    span_rows = [r for r in reqs if r["timestamp"] >= start]
    per_bucket = Counter(int(_trunc(r["timestamp"], span).timestamp() * 1000) for r in span_rows)

    groups: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for r in span_rows:
        if org is None:
            key = _org_of(r["token"])  # token__user__profile__org__name
        elif token_name is None:
            key = r["token"].id
        else:
            key = r["user_id"]
        groups[key].append(r)
    top = []
    for key, members in groups.items():
        tok = members[0]["token"]
        item = {
            "count": len(members),
            "input_sum": sum(m["input_tokens"] for m in members),
            "output_sum": sum(m["output_tokens"] for m in members),
        }
        if org is None:
            item["name"] = key
        elif token_name is None:
            item |= {"name": tok.name, "user_email": tok.user_email, "service_account_name": tok.service_account}
        else:
            item |= {"name": tok.name, "user_id": key}
        top.append(item)
    top.sort(key=lambda item: -item["count"])

    def average(fragment: str) -> float | None:
        values = [r["response_time_ms"] for r in span_rows if fragment in r["path"].lower() and r["response_time_ms"] is not None]
        return sum(values) / len(values) if values else None

    per_model = Counter(r["model"] for r in span_rows)
    input_tokens = sum(r["input_tokens"] for r in span_rows)
    output_tokens = sum(r["output_tokens"] for r in span_rows)
    return {
        "timeseries": [(b, per_bucket.get(b, 0)) for b in _buckets(start, now, span)],
        "top_items": top[:100],
        "total_requests": len(span_rows),
        "failed_requests": sum(1 for r in span_rows if r["status_code"] is not None and r["status_code"] >= 400),
        "per_model": dict(per_model) | {m: 0 for m in ROUTER_MODELS if m not in per_model},
        "avg_time_completion": average("completion"),
        "avg_time_embedding": average("embedding"),
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
    }


# --- helpers --------------------------------------------------------------------------------


def import_all(app, dsn: str, **overrides: Any) -> AqueductImporter:
    rt = runtime(app)
    source = AqueductSource(dsn)
    settings = ImportSettings(postgres_dsn=dsn, settle_s=0, batch_rows=128) if not overrides else ImportSettings(postgres_dsn=dsn, **overrides)
    importer = AqueductImporter(source, rt.store, watermark_for(rt.config.data_dir, source, rt.store.target.display, rt.store.database), settings)
    importer.run_once()
    return importer


def api_usage(app, **params: Any) -> dict[str, Any]:
    """GET /api/v1/usage with ``params`` (org, token, timeframe, top), through the app's own route."""
    response = app.test_client().get("/api/v1/usage", query_string=params)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def _epoch_ms(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


def assert_same_numbers(answer: dict[str, Any], expected: dict[str, Any], top_kind: str) -> None:
    metrics = answer["metrics"]
    assert metrics["total_requests"] == expected["total_requests"]
    assert metrics["failed_requests"] == expected["failed_requests"]
    assert metrics["input_tokens"] == expected["input_tokens"]
    assert metrics["output_tokens"] == expected["output_tokens"]
    assert metrics["total_tokens"] == expected["total_tokens"]
    for ours, theirs in (("avg_response_time_ms_completion", "avg_time_completion"), ("avg_response_time_ms_embedding", "avg_time_embedding")):
        if expected[theirs] is None:
            assert metrics[ours] is None  # Aqueduct's page prints 0 for "no data"; the API says null
        else:
            assert metrics[ours] == pytest.approx(expected[theirs], abs=1e-3)
    assert [(_epoch_ms(p["t"]), p["requests"]) for p in answer["timeseries"]] == expected["timeseries"]
    assert {m["model"]: m["requests"] for m in answer["models"]} == expected["per_model"]
    counts = [m["requests"] for m in answer["models"]]
    assert counts == sorted(counts, reverse=True)

    ours = {row["name"]: row for row in answer["top"]}
    assert len(ours) == len(answer["top"]) == len(expected["top_items"])
    for item in expected["top_items"]:
        if top_kind == "org":
            name = UNKNOWN_ORG if item["name"] is None else item["name"]
        elif top_kind == "token":
            name = item["name"]
        else:
            name = item["user_id"]
        row = ours[name]
        assert (row["requests"], row["input_tokens"], row["output_tokens"]) == (item["count"], item["input_sum"], item["output_sum"]), name
        assert row["total_tokens"] == item["input_sum"] + item["output_sum"]
        if top_kind == "token":
            assert row["service_account"] == item["service_account_name"]
            # The contract leaves token_owner empty for service-account tokens; Aqueduct shows the
            # email of the user who created the token. User tokens agree.
            assert row["token_owner"] == (None if item["service_account_name"] else item["user_email"])
    requests = [row["requests"] for row in answer["top"]]
    assert requests == sorted(requests, reverse=True)


# --- tests ----------------------------------------------------------------------------------


def test_usage_api_after_import_equals_aqueducts_page(aqueduct_dsn, make_app):
    gateway = seed_gateway(aqueduct_dsn)
    app = make_app(models=[{"name": m} for m in ROUTER_MODELS])
    import_all(app, aqueduct_dsn)

    scopes = [("all", None), ("Technische Universität Wien", None), ("acme", None), ("東京ラボ", None),
              ("acme", "ci-bot-token"), ("Technische Universität Wien", "jürgens-laptop")]
    for span in SPANS:
        for org, token_name in scopes:
            params = {"org": org, "timeframe": span, "top": 100} | ({"token": token_name} if token_name else {})
            answer = api_usage(app, **params)
            now = datetime.fromisoformat(answer["window"]["end"].replace("Z", "+00:00"))
            expected = aqueduct_page(gateway, now, span, None if org == "all" else org, token_name)
            assert expected["total_requests"] > 0 or span == "1h"
            assert_same_numbers(answer, expected, answer["scope"]["top_kind"])


def test_the_select_list_is_the_requests_row():
    assert list(COLUMNS) == list(Row.__struct_fields__)


def test_rows_map_every_field_including_nulls_orphans_and_non_ascii(aqueduct_dsn, make_app):
    gateway = seed_gateway(aqueduct_dsn, rows=120)
    app = make_app()
    import_all(app, aqueduct_dsn)
    stored = {
        row[0]: row
        for row in runtime(app).store.query(
            "SELECT request_id, org, token_name, token_owner, service_account, team, user_id, status_code, "
            "response_time_ms, input_tokens, output_tokens, path, endpoint, model, method, "
            "toUnixTimestamp64Milli(timestamp) FROM requests"
        )
    }
    assert len(stored) == len(gateway.rows)
    for row in gateway.rows:
        tok: TokenInfo | None = row["token"]
        if tok is None:
            org, name, owner, account, team = UNKNOWN_ORG, f"(deleted token {row['token_id']})", "", "", ""
        else:
            org = tok.team_org or tok.profile_org or UNKNOWN_ORG
            name, owner = tok.name, "" if tok.service_account else tok.user_email
            account, team = tok.service_account or "", tok.team or ""
        path = row["path"]
        endpoint = "completion" if "completion" in path else "embedding" if "embedding" in path else "other"
        millis = int(row["timestamp"].timestamp() * 1000)  # Aqueduct keeps microseconds; we keep milliseconds
        assert stored[f"aqueduct-{row['id']}"][1:] == (
            org, name, owner, account, team, row["user_id"], row["status_code"] or 0, row["response_time_ms"],
            row["input_tokens"], row["output_tokens"], path, endpoint, row["model"], "POST", millis,
        )
    statuses = Counter(r[7] for r in stored.values())
    assert statuses[0] > 0 and any(r[8] is None for r in stored.values())
    assert {r[1] for r in stored.values()} >= {"東京ラボ", "Technische Universität Wien", UNKNOWN_ORG}


def test_reimport_and_lost_watermark_add_nothing_and_new_rows_follow(aqueduct_dsn, make_app):
    gateway = seed_gateway(aqueduct_dsn, rows=200)
    app = make_app()
    store = runtime(app).store
    importer = import_all(app, aqueduct_dsn)
    count = lambda: store.query("SELECT count() FROM requests")[0][0]  # noqa: E731
    assert count() == 200
    # The same run again, and a run that lost its watermark file (it resumes from the store).
    importer.run_once()
    importer.watermark.path.unlink()
    again = import_all(app, aqueduct_dsn)
    assert again.resume_point() == max(r["id"] for r in gateway.rows)
    assert count() == 200
    # Even a full re-read (watermark forced to 0) stores nothing twice.
    importer.watermark.save(0)
    importer._last_id = None
    result = importer.run_once()
    assert (result.written, result.duplicates) == (0, 200)
    assert count() == 200

    # A token deleted through Django takes its requests along in Aqueduct; the store keeps the
    # history it already has, and later rows keep coming.
    anna_laptop = next(t for t in gateway.tokens.values() if t.name == "anna-laptop")
    kept = store.query("SELECT count() FROM requests WHERE token_name = 'anna-laptop'")[0][0]
    gateway.db.delete_token(anna_laptop.id)
    server = next(t for t in gateway.tokens.values() if t.name == "anna-server")
    new_ids = gateway.db.add_requests([{"token_id": server.id, "timestamp": datetime.now(UTC) - timedelta(seconds=5),
                                        "model": "gpt-4o", "status_code": 200, "response_time_ms": 99}] * 3)
    assert importer.run_once().written == 3
    assert count() == 203
    assert store.query("SELECT count() FROM requests WHERE token_name = 'anna-laptop'")[0][0] == kept > 0
    assert json.loads(importer.watermark.path.read_text())["last_id"] == max(new_ids)


def test_rows_wait_until_settled_so_finished_requests_are_imported_complete(aqueduct_dsn, make_app):
    gateway = seed_gateway(aqueduct_dsn, rows=20)
    app = make_app()
    store = runtime(app).store
    importer = import_all(app, aqueduct_dsn, settle_s=60)
    assert store.query("SELECT count() FROM requests")[0][0] == 20
    # A streaming request starts (Aqueduct saves the row with no status, no latency, no tokens),
    # then a short one finishes after it.
    tok = next(iter(gateway.tokens.values()))
    now = datetime.now(UTC)
    (running,) = gateway.db.add_requests([{"token_id": tok.id, "timestamp": now, "model": "gpt-4o"}])
    (short,) = gateway.db.add_requests([{"token_id": tok.id, "timestamp": now, "model": "gpt-4o",
                                         "status_code": 200, "response_time_ms": 80, "input_tokens": 3, "output_tokens": 4}])
    assert importer.run_once().written == 0  # both are younger than 60 s
    # The stream ends: Aqueduct's decorator sets status and time, the stream wrapper the tokens.
    gateway.db.conn.execute(
        "UPDATE management_request SET status_code = 200, response_time_ms = 41000, input_tokens = 900, output_tokens = 700 WHERE id = %s",
        [running],
    )
    importer.settings = ImportSettings(postgres_dsn=gateway.dsn, settle_s=0)  # ...and the settle time passes
    assert importer.run_once().written == 2
    assert store.query(
        "SELECT status_code, response_time_ms, input_tokens, output_tokens FROM requests WHERE request_id = {id:String}",
        {"id": f"aqueduct-{running}"},
    ) == [(200, 41000.0, 900, 700)]
    assert importer.resume_point() == short


def test_since_starts_the_backfill_at_a_time(aqueduct_dsn, make_app):
    gateway = seed_gateway(aqueduct_dsn, rows=150)
    app = make_app()
    cutoff = datetime.now(UTC) - timedelta(days=2)
    import_all(app, aqueduct_dsn, settle_s=0, since=cutoff, batch_rows=40)
    wanted = {f"aqueduct-{r['id']}" for r in gateway.rows if r["timestamp"] >= cutoff}
    stored = {row[0] for row in runtime(app).store.query("SELECT request_id FROM requests")}
    assert stored == wanted and 0 < len(wanted) < 150


def test_follow_survives_a_dropped_connection(aqueduct_dsn, make_app, postgres_cluster):  # noqa: F811
    gateway = seed_gateway(aqueduct_dsn, rows=30)
    app = make_app()
    store = runtime(app).store
    source = AqueductSource(aqueduct_dsn)
    rt = runtime(app)
    importer = AqueductImporter(source, store, watermark_for(rt.config.data_dir, source, store.target.display, store.database),
                                ImportSettings(postgres_dsn=aqueduct_dsn, settle_s=0, poll_interval_s=0.05))
    passes: list[int] = []
    stop = threading.Event()
    thread = threading.Thread(target=importer.follow, args=(stop,), kwargs={"on_pass": lambda r: passes.append(r.written)})
    thread.start()
    try:
        _wait(lambda: sum(passes) == 30)
        with psycopg.connect(postgres_cluster.dsn(), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'usage-exporter import aqueduct'")
        tok = next(iter(gateway.tokens.values()))
        gateway.db.add_requests([{"token_id": tok.id, "timestamp": datetime.now(UTC), "model": "gpt-4o", "status_code": 200}] * 2)
        _wait(lambda: sum(passes) == 32)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert store.query("SELECT count() FROM requests")[0][0] == 32


def _wait(condition, timeout: float = 20.0) -> None:
    deadline = threading.Event()
    timer = threading.Timer(timeout, deadline.set)
    timer.start()
    try:
        while not condition():
            if deadline.wait(0.05):
                raise AssertionError("condition not met in time")
    finally:
        timer.cancel()


def test_operator_errors_are_one_clear_sentence(postgres_cluster, tmp_path):  # noqa: F811
    empty = postgres_cluster.create_database()
    with pytest.raises(ImportFailed, match=r"has no management_request.*table: is it Aqueduct's database\?$"):
        AqueductSource(empty).connect()
    with pytest.raises(ImportFailed, match=r"^cannot connect to Aqueduct's PostgreSQL at 127\.0\.0\.1:1/x: "):
        AqueductSource("postgresql://nobody:secret@127.0.0.1:1/x", connect_timeout_s=2).connect()
    with pytest.raises(ImportFailed, match="neither an ISO date/time nor a span"):
        parse_since("yesterday")
    assert parse_since("2026-11-01") == datetime(2026, 11, 1, tzinfo=UTC)
    assert parse_since("7d", now=datetime(2026, 11, 8, tzinfo=UTC)) == datetime(2026, 11, 1, tzinfo=UTC)
