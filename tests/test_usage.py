"""GET /api/v1/usage against real embedded ClickHouse: every field of every answer equals an
independent plain-Python computation over the records that were POSTed to /v1/requests.

The expected answers are computed here from the records themselves (filter, group, sort in
Python), never with the exporter's SQL; the exporter's answers come from its rollups. The same
answers read from the raw table (``source="raw"``) must match too.
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from exporter import usage
from exporter.app import runtime

from .conftest import flush

UTC = timezone.utc
SPANS = {"1h": 3600, "1d": 86_400, "1w": 7 * 86_400}
BUCKETS = {"1h": "1m", "1d": "1h", "1w": "1d"}

CATALOG = [
    {"name": "gpt-4o", "endpoint": "completion"},
    {"name": "gpt-4o-mini", "endpoint": "completion"},
    {"name": "text-embedding-3-small", "endpoint": "embedding"},
    {"name": "never-used-model", "endpoint": "other"},
]
# Models the gateway reports that are not in the catalog.
EXTRA_MODELS = ["llama-3.3-70b", "whisper-1"]
PATHS = {"completion": "/v1/chat/completions", "embedding": "/v1/embeddings", "other": "/v1/audio/transcriptions"}

ADMIN_KEY, ORG_KEY, USER_KEY = "admin-secret", "org-secret", "jane-secret"
JANE = "jane@org-01.example"


# --- the dataset ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    org: str
    name: str
    owner: str
    account: str
    team: str
    users: tuple[str, ...]


def iso_ms(ms: int, offset_minutes: int = 0) -> str:
    tz = timezone(timedelta(minutes=offset_minutes))
    moment = datetime.fromtimestamp(ms / 1000, UTC).astimezone(tz)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}"
    return text + ("Z" if offset_minutes == 0 else moment.strftime("%z")[:3] + ":" + moment.strftime("%z")[3:])


def make_tokens(rng: random.Random, orgs: list[str]) -> list[Token]:
    tokens = []
    for o, org in enumerate(orgs):
        for t in range(2 + o % 4):
            if t % 3 == 2:
                owner, account, team = "", f"svc-{t}", ["ml-team", "platform"][o % 2]
            else:
                owner, account, team = f"user{t}@{org}.example", "", ""
            users = tuple(rng.choice([JANE, f"u-{rng.randrange(50)}", f"person{rng.randrange(9)}@{org}.example"]) for _ in range(rng.randrange(0, 5)))
            tokens.append(Token(org, f"tok-{o}-{t}", owner, account, team, users))
    # A token whose owner changed: the latest record's owner is the one reported.
    tokens.append(Token("org-01", "handed-over", "old.owner@org-01.example", "", "", ()))
    tokens.append(Token("org-01", "handed-over", "new.owner@org-01.example", "", "", ()))
    # Jane's own token in org-01, and a service account of her team.
    tokens.append(Token("org-01", "jane-token", JANE, "", "", ("x-1", "x-2")))
    tokens.append(Token("org-01", "team-bot", "", "ml-bot", "ml-team", ("y-1",)))
    return tokens


def record(rng: random.Random, token: Token, ms: int, *, model: str | None = None, request_id: str = "") -> dict[str, Any]:
    if model is None:
        model = rng.choice([m["name"] for m in CATALOG[:3]] + EXTRA_MODELS)
    endpoint = {"text-embedding-3-small": "embedding", "whisper-1": "other"}.get(model, "completion")
    status = rng.choice([200] * 12 + [201, 399, 400, 404, 429, 500, 503])
    rec: dict[str, Any] = {
        "timestamp": iso_ms(ms, rng.choice([0, 0, 60, -300, 330])),
        "org": token.org,
        "model": model,
        "status_code": status,
        "input_tokens": rng.randrange(0, 4000),
        "output_tokens": rng.randrange(0, 1500) if endpoint == "completion" else 0,
        "token_name": token.name,
    }
    if rng.random() < 0.1:
        rec["timestamp"] = ms / 1000  # epoch seconds, as some gateways send
    # The endpoint is sent, or derived from the path by the exporter.
    if rng.random() < 0.5:
        rec["endpoint"] = endpoint
    else:
        rec["path"] = PATHS[endpoint]
    if rng.random() < 0.9:
        # Up to 4 decimals: sums in whole microseconds must still agree everywhere.
        rec["response_time_ms"] = round(rng.uniform(5, 9000), rng.choice([0, 1, 3, 4]))
    if token.owner:
        rec["token_owner"] = token.owner
    if token.account:
        rec["service_account"] = token.account
        rec["team"] = token.team
    if token.users and rng.random() < 0.85:
        rec["user_id"] = rng.choice(token.users)
    if request_id:
        rec["request_id"] = request_id
    return rec


def edge_instants(now_ms: int) -> list[int]:
    """Milliseconds right at, inside and outside every window's edges and minute boundaries."""
    end = now_ms - now_ms % 1000
    out = []
    for span in SPANS.values():
        start = end - span * 1000
        for edge in (start, end):
            out += [edge - 1, edge, edge + 1, edge + 999, edge + 1000]
        out += [start - start % 60_000 + 60_000 - 1, start - start % 60_000 + 60_000]  # first whole minute
        out += [end - end % 60_000 - 1, end - end % 60_000]  # last partial minute
        out += [start - start % 3_600_000 + 3_600_000 - 1, start - start % 3_600_000 + 3_600_000]  # first whole hour
        out += [end - end % 3_600_000 - 1, end - end % 3_600_000]  # last partial hour
    return out


def build_dataset(seed: int, now_ms: int, count: int, orgs: int = 12) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    org_names = [f"org-{i:02d}" for i in range(orgs)]
    tokens = make_tokens(rng, org_names)
    weights = [1.0 / (1 + i) for i in range(len(tokens))]
    records = []
    for i in range(count):
        token = rng.choices(tokens, weights)[0]
        ms = now_ms - rng.randrange(-120_000, 8 * 86_400_000)  # 8 days back, some in the future
        # Half the handed-over token's records carry the old owner, all older than the new ones.
        if token.name == "handed-over":
            ms = now_ms - (rng.randrange(0, 20) if token.owner.startswith("new") else rng.randrange(30, 3000)) * 60_000
        records.append(record(rng, token, ms, request_id=f"r-{i}" if i % 3 else ""))
    for j, ms in enumerate(edge_instants(now_ms)):
        records.append(record(rng, rng.choice(tokens), ms, request_id=f"edge-{j}"))
    # Two orgs tie in every window: the same number of records at the same instants.
    for k in range(3):
        ms = now_ms - (10 + k) * 60_000
        records.append(record(rng, Token("tie-b", "tb", "b@tie", "", "", ()), ms))
        records.append(record(rng, Token("tie-a", "ta", "a@tie", "", "", ()), ms))
    # A gateway retry: the same record again with its request id; it is counted once.
    records += [dict(r) for r in records[1:40:3] if r.get("request_id")]
    return records


# --- the independent computation ---------------------------------------------------------------


def record_ms(rec: dict[str, Any]) -> int:
    value = rec["timestamp"]
    if isinstance(value, (int, float)):
        return round(value * 1000)
    return round(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000)


def record_endpoint(rec: dict[str, Any]) -> str:
    if "endpoint" in rec:
        return rec["endpoint"]
    path = rec.get("path", "").lower()
    return "completion" if "completion" in path else "embedding" if "embedding" in path else "other"


def unique(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    seen, out = set(), []
    for rec in records:
        rid = rec.get("request_id", "")
        if rid and rid in seen:
            continue
        seen.add(rid)
        out.append(rec)
    return out


def python_buckets(start_ms: int, end_ms: int, bucket: str, tz: ZoneInfo) -> list[int]:
    """Every bucket start (epoch ms) from start's bucket to end's, found minute by minute."""
    def label(ms: int) -> int:
        local = datetime.fromtimestamp(ms / 1000, UTC).astimezone(tz)
        if bucket == "1m":
            return ms - ms % 60_000
        if bucket == "1h":
            return ms - (local.minute * 60 + local.second) * 1000 - ms % 1000
        return round(datetime(local.year, local.month, local.day, tzinfo=tz).timestamp() * 1000)

    labels = []
    for ms in list(range(start_ms, end_ms, 60_000)) + [end_ms]:
        if not labels or label(ms) != labels[-1]:
            labels.append(label(ms))
    return labels


def iso_z(ms: int) -> str:
    return datetime.fromtimestamp(ms // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def avg_ms(values: list[float]) -> float | None:
    if not values:
        return None
    # The documented definition: each response time taken to the microsecond.
    return round(sum(round(v * 1000) for v in values) / len(values) / 1000, 3)


def expected(records, *, now_s: float, timeframe: str, org: str | None = None, token: str | None = None,
             top: int = 10, tz: str = "UTC", email: str | None = None, teams: tuple[str, ...] = ()) -> dict[str, Any]:
    end_ms = int(now_s) * 1000
    start_ms = end_ms - SPANS[timeframe] * 1000
    rows = []
    for rec in unique(records):
        ms = record_ms(rec)
        if not start_ms <= ms <= end_ms:
            continue
        if org is not None and rec["org"] != org:
            continue
        if token is not None and rec.get("token_name", "") != token:
            continue
        if email is not None and not (rec.get("token_owner") == email or rec.get("user_id") == email or rec.get("team", "") in teams):
            continue
        rows.append((ms, rec))
    buckets = python_buckets(start_ms, end_ms, BUCKETS[timeframe], ZoneInfo(tz))
    counts = dict.fromkeys(buckets, 0)
    for ms, _ in rows:
        label = max(b for b in buckets if b <= ms)
        counts[label] += 1
    kind = "org" if org is None else "token" if token is None else "user_id"
    key = {"org": "org", "token": "token_name", "user_id": "user_id"}[kind]
    groups: dict[str, list] = defaultdict(list)
    for ms, rec in rows:
        groups[rec.get(key, "")].append((ms, rec))
    top_rows = []
    for name, members in groups.items():
        owner = account = None
        if kind == "token":
            _, own, acc = max((ms, rec.get("token_owner", ""), rec.get("service_account", "")) for ms, rec in members)
            owner, account = own or None, acc or None
        tin = sum(rec.get("input_tokens", 0) for _, rec in members)
        tout = sum(rec.get("output_tokens", 0) for _, rec in members)
        top_rows.append({"name": name, "requests": len(members), "input_tokens": tin, "output_tokens": tout,
                         "total_tokens": tin + tout, "token_owner": owner, "service_account": account})
    top_rows.sort(key=lambda r: (-r["requests"], r["name"]))
    models = dict.fromkeys((m["name"] for m in CATALOG), 0)
    for _, rec in rows:
        models[rec["model"]] = models.get(rec["model"], 0) + 1
    tin = sum(rec.get("input_tokens", 0) for _, rec in rows)
    tout = sum(rec.get("output_tokens", 0) for _, rec in rows)
    return {
        "scope": {"org": org or "all", "token": token, "timeframe": timeframe, "top_kind": kind},
        "window": {"start": iso_z(start_ms), "end": iso_z(end_ms), "bucket": BUCKETS[timeframe]},
        "metrics": {
            "total_requests": len(rows),
            "failed_requests": sum(1 for _, rec in rows if rec["status_code"] >= 400),
            "avg_response_time_ms_completion": avg_ms([rec["response_time_ms"] for _, rec in rows
                                                       if record_endpoint(rec) == "completion" and "response_time_ms" in rec]),
            "avg_response_time_ms_embedding": avg_ms([rec["response_time_ms"] for _, rec in rows
                                                      if record_endpoint(rec) == "embedding" and "response_time_ms" in rec]),
            "input_tokens": tin,
            "output_tokens": tout,
            "total_tokens": tin + tout,
        },
        "timeseries": [{"t": iso_z(b), "requests": counts[b]} for b in buckets],
        "top": [{"rank": i + 1, **row} for i, row in enumerate(top_rows[:top])],
        "models": [{"model": m, "requests": n} for m, n in sorted(models.items(), key=lambda kv: (-kv[1], kv[0]))],
    }


# --- helpers ---------------------------------------------------------------------------------


def ingest(app, records: list[dict[str, Any]]) -> None:
    client = app.test_client()
    for i in range(0, len(records), 1000):
        answer = client.post("/v1/requests", data=json.dumps(records[i:i + 1000]), content_type="application/json")
        assert answer.status_code == 202, answer.json
        assert answer.json["rejected"] == []
        flush(app)  # one insert per batch: the duplicates of later batches meet stored ids


def get(app, key: str | None = None, **params) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return app.test_client().get("/api/v1/usage", query_string=params, headers=headers)


def direct(app, query: usage.UsageQuery, now_s: float, tz: str, source: usage.Source,
           recent_from: datetime | None = None) -> dict[str, Any]:
    rt = runtime(app)
    report = usage.usage(rt.store, rt.store.database, query, now=datetime.fromtimestamp(now_s, UTC), tz=tz,
                         catalog=[m["name"] for m in CATALOG], source=source, recent_from=recent_from)
    return usage.as_json(report)


# "Now" a few minutes ago at hh:mm:05.4 (truncated to hh:mm:05): recent enough that the windows'
# edges come from usage_recent_requests, as in production.
NOW_S = (int(time.time()) // 60 - 3) * 60 + 5.4
VIEWERS = [
    {"key": ADMIN_KEY, "role": "admin"},
    {"key": ORG_KEY, "role": "org", "org": "org-01"},
    {"key": USER_KEY, "role": "user", "org": "org-01", "email": JANE, "teams": ["ml-team"]},
]


@pytest.fixture(scope="module")
def dataset() -> list[dict[str, Any]]:
    return build_dataset(seed=3, now_ms=int(NOW_S * 1000), count=2500)


@pytest.fixture
def seeded(make_app, dataset):
    app = make_app(models=CATALOG, viewers=VIEWERS)
    app.extensions["clock"] = lambda: NOW_S
    ingest(app, dataset)
    return app


def top_token(records, org: str) -> str:
    return expected(records, now_s=NOW_S, timeframe="1w", org=org)["top"][0]["name"]


# --- the tests -------------------------------------------------------------------------------


def test_every_scope_and_timeframe_matches_an_independent_computation(seeded, dataset):
    busiest = top_token(dataset, "org-01")
    cases = []
    for timeframe in SPANS:
        cases += [
            {"timeframe": timeframe},
            {"timeframe": timeframe, "top": 100},
            {"timeframe": timeframe, "org": "org-01"},
            {"timeframe": timeframe, "org": "org-00", "top": 25},
            {"timeframe": timeframe, "org": "org-01", "token": busiest},
            {"timeframe": timeframe, "org": "org-01", "token": "handed-over"},
            {"timeframe": timeframe, "org": "no-such-org"},
            {"timeframe": timeframe, "org": "org-01", "token": "no-such-token"},
        ]
    for params in cases:
        answer = get(seeded, ADMIN_KEY, **params)
        assert answer.status_code == 200, answer.json
        want = expected(dataset, now_s=NOW_S, timeframe=params["timeframe"], org=params.get("org"),
                        token=params.get("token"), top=params.get("top", 10))
        assert answer.json == want, params
        # The same numbers from the raw table: the rollups are exact.
        query = usage.UsageQuery(params.get("org"), params.get("token"), params["timeframe"], params.get("top", 10))
        assert direct(seeded, query, NOW_S, "UTC", "raw") == want, params


def test_the_dataset_exercises_what_it_should(dataset):
    """Guards the comparisons above against a dataset that stopped covering the hard cases."""
    week = expected(dataset, now_s=NOW_S, timeframe="1w", top=100)
    assert len(week["top"]) == 14 and len(expected(dataset, now_s=NOW_S, timeframe="1w")["top"]) == 10
    hour = expected(dataset, now_s=NOW_S, timeframe="1h", top=100)
    ties = {row["name"]: row["requests"] for row in hour["top"] if row["name"].startswith("tie-")}
    assert ties == {"tie-a": 3, "tie-b": 3}
    assert [r["name"] for r in hour["top"]].index("tie-a") + 1 == [r["name"] for r in hour["top"]].index("tie-b")
    assert {"model": "never-used-model", "requests": 0} in week["models"]
    assert any(m["model"] in EXTRA_MODELS and m["requests"] > 0 for m in week["models"])
    assert any(p["requests"] == 0 for p in hour["timeseries"]) and any(p["requests"] > 0 for p in hour["timeseries"])
    handed = expected(dataset, now_s=NOW_S, timeframe="1d", org="org-01")
    assert {"name": "handed-over", "token_owner": "new.owner@org-01.example"}.items() <= next(
        r for r in handed["top"] if r["name"] == "handed-over").items()
    bots = [r for r in handed["top"] if r["service_account"]]
    assert bots and all(r["token_owner"] is None for r in bots)
    # Records right at every window's edges (and just outside them).
    stamps = {record_ms(r) for r in dataset}
    end_ms = int(NOW_S) * 1000
    for span in SPANS.values():
        assert {end_ms - span * 1000 - 1, end_ms - span * 1000, end_ms, end_ms + 1} <= stamps


def test_user_key_sees_only_its_records_and_org_key_its_org(seeded, dataset):
    for timeframe in SPANS:
        answer = get(seeded, USER_KEY, timeframe=timeframe)
        assert answer.status_code == 200
        want = expected(dataset, now_s=NOW_S, timeframe=timeframe, org="org-01", email=JANE, teams=("ml-team",))
        assert answer.json == want
        assert 0 < want["metrics"]["total_requests"] < expected(dataset, now_s=NOW_S, timeframe=timeframe, org="org-01")["metrics"]["total_requests"]
        for token in ("jane-token", "team-bot", top_token(dataset, "org-01")):
            answer = get(seeded, USER_KEY, timeframe=timeframe, token=token, top=25)
            want = expected(dataset, now_s=NOW_S, timeframe=timeframe, org="org-01", token=token, top=25,
                            email=JANE, teams=("ml-team",))
            assert answer.json == want, (timeframe, token)
        answer = get(seeded, ORG_KEY, timeframe=timeframe)
        assert answer.json == expected(dataset, now_s=NOW_S, timeframe=timeframe, org="org-01")
    # Everything a user key sees also comes out of the raw table unchanged.
    query = usage.UsageQuery("org-01", None, "1w", 10, usage.Visibility(JANE, ("ml-team",)))
    assert direct(seeded, query, NOW_S, "UTC", "rollup") == direct(seeded, query, NOW_S, "UTC", "raw")


def test_empty_window_is_well_formed(seeded, dataset):
    later = NOW_S + 30 * 86_400
    seeded.extensions["clock"] = lambda: later
    for timeframe in SPANS:
        answer = get(seeded, ADMIN_KEY, timeframe=timeframe).json
        assert answer == expected(dataset, now_s=later, timeframe=timeframe)
        assert answer["metrics"] == {"total_requests": 0, "failed_requests": 0, "avg_response_time_ms_completion": None,
                                     "avg_response_time_ms_embedding": None, "input_tokens": 0, "output_tokens": 0,
                                     "total_tokens": 0}
        assert answer["top"] == [] and {p["requests"] for p in answer["timeseries"]} == {0}
        assert answer["models"] == [{"model": m["name"], "requests": 0} for m in sorted(CATALOG, key=lambda m: m["name"])]
    assert len(get(seeded, ADMIN_KEY, timeframe="1h").json["timeseries"]) == 61


def test_defaults_follow_the_key(seeded):
    assert get(seeded, ADMIN_KEY).json["scope"] == {"org": "all", "token": None, "timeframe": "1d", "top_kind": "org"}
    assert get(seeded, ORG_KEY).json["scope"] == {"org": "org-01", "token": None, "timeframe": "1d", "top_kind": "token"}
    assert get(seeded, USER_KEY, token="jane-token").json["scope"]["top_kind"] == "user_id"
    assert get(seeded, ADMIN_KEY).headers["Cache-Control"] == "private, no-store"


# --- time zones --------------------------------------------------------------------------------

# Europe/Vienna leaves summer time on 2026-10-25 at 01:00 UTC (03:00 CEST -> 02:00 CET) and enters
# it on 2026-03-29 at 01:00 UTC (02:00 CET -> 03:00 CEST).
FALL_DAY = datetime(2026, 10, 25, 10, 17, 23, 600000, UTC).timestamp()  # 1d window holds the repeated hour
FALL_WEEK = FALL_DAY + 86_400  # 1w window holds the 25-hour day
SPRING_NOW = datetime(2026, 3, 30, 8, 0, 41, tzinfo=UTC).timestamp()  # 1w window holds the 23-hour day


def test_buckets_follow_the_configured_time_zone_across_dst(make_app):
    records = []
    for seed, now in ((11, FALL_WEEK), (12, SPRING_NOW)):
        records += build_dataset(seed=seed, now_ms=int(now * 1000), count=700, orgs=3)
    # Records at local midnights, in the repeated hour, and around the skipped one.
    rng = random.Random(5)
    token = Token("org-00", "midnight", "m@org-00.example", "", "", ())
    for local in ("2026-10-24T00:00:00+02:00", "2026-10-25T00:00:00+02:00", "2026-10-25T02:30:00+02:00",
                  "2026-10-25T02:30:00+01:00", "2026-10-25T23:59:59.999+01:00", "2026-10-26T00:00:00+01:00",
                  "2026-03-29T00:00:00+01:00", "2026-03-29T01:59:59.999+01:00", "2026-03-29T03:00:00+02:00"):
        rec = record(rng, token, 0)
        rec["timestamp"] = local
        records.append(rec)
    app = make_app(models=CATALOG, timezone="Europe/Vienna")
    ingest(app, records)
    for now in (FALL_DAY, FALL_WEEK, SPRING_NOW):
        app.extensions["clock"] = lambda now=now: now
        for timeframe in SPANS:
            for params in ({}, {"org": "org-00"}, {"org": "org-00", "token": "midnight"}):
                answer = get(app, **params, timeframe=timeframe)
                assert answer.json == expected(records, now_s=now, timeframe=timeframe, tz="Europe/Vienna",
                                               org=params.get("org"), token=params.get("token")), (now, timeframe, params)

    def labels(now: float, timeframe: str) -> list[str]:
        app.extensions["clock"] = lambda: now
        return [p["t"] for p in get(app, timeframe=timeframe).json["timeseries"]]

    # Local midnights: 22:00Z in summer time, 23:00Z in winter time.
    assert labels(FALL_WEEK, "1w") == [f"2026-10-{d}T22:00:00Z" for d in range(18, 25)] + ["2026-10-25T23:00:00Z"]
    assert labels(SPRING_NOW, "1w") == [f"2026-03-{d}T23:00:00Z" for d in range(22, 29)] + ["2026-03-29T22:00:00Z"]
    # The repeated local hour 02:00 is two buckets (00:00Z and 01:00Z).
    day = labels(FALL_DAY, "1d")
    assert len(day) == 25 and {"2026-10-25T00:00:00Z", "2026-10-25T01:00:00Z"} <= set(day)
    # A half-hour zone: hour buckets start at half past the UTC hour.
    for now in (FALL_DAY, SPRING_NOW):
        for timeframe in SPANS:
            want = expected(records, now_s=now, timeframe=timeframe, tz="Asia/Kolkata")
            assert direct(app, usage.UsageQuery(None, None, timeframe), now, "Asia/Kolkata", "rollup") == want
    kolkata = direct(app, usage.UsageQuery(None, None, "1d"), FALL_DAY, "Asia/Kolkata", "rollup")["timeseries"]
    assert all(point["t"].endswith(":30:00Z") for point in kolkata)
