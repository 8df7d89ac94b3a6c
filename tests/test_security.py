"""Hostile callers: keys compared in constant time, no secret in any log line or answer, and
SQL-injection text in every usage parameter answered correctly from an intact store."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
import yaml

from exporter import access
from exporter.app import runtime

from .conftest import flush

INGEST_TOKENS = ["ingest-tok-Alpha-7f3a9c", "ingest-tok-Bravo-1e8d42"]
ADMIN_KEY = "viewer-admin-Charlie-55b1"
ORG_KEY = "viewer-org-Delta-9a0c77"
USER_KEY = "viewer-user-Echo-3d2e18"
HASHED_KEY = "viewer-hashed-Foxtrot-64aa"  # configured only by its SHA-256
SESSION_SECRET = "session-secret-Golf-0123456789abcdef"
DSN_PASSWORD = "dsn-pw-Hotel/55@x"  # '/' and '@' force percent-encoding in the DSN

VIEWERS = [
    {"key": ADMIN_KEY, "role": "admin"},
    {"key": ORG_KEY, "role": "org", "org": "acme"},
    {"key": USER_KEY, "role": "user", "org": "acme", "email": "jane@acme.org"},
    {"key_sha256": hashlib.sha256(HASHED_KEY.encode()).hexdigest(), "role": "org", "org": "beta"},
]


# --- constant-time comparison -------------------------------------------------------------------


@pytest.fixture
def compare_calls(monkeypatch) -> list[tuple[int, int]]:
    """Every hmac.compare_digest call the access module makes, as the lengths of its operands."""
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(access.hmac, "compare_digest", spy)
    return calls


def test_ingest_tokens_and_viewer_keys_are_compared_as_fixed_length_digests_against_every_entry(make_app, compare_calls):
    app = make_app(ingest={"tokens": INGEST_TOKENS}, viewers=VIEWERS)
    client = app.test_client()
    record = {"timestamp": 1795000000, "org": "acme", "model": "m", "status_code": 200}
    attempts = [
        # (request, how many entries it is compared against)
        (lambda: client.post("/v1/requests", json=record, headers={"Authorization": f"Bearer {INGEST_TOKENS[0]}"}), 2),
        (lambda: client.post("/v1/requests", json=record, headers={"Authorization": "Bearer x"}), 2),
        (lambda: client.post("/v1/requests", json=record, headers={"Authorization": "Bearer " + "y" * 5000}), 2),
        (lambda: client.get("/api/v1/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"}), 4),
        (lambda: client.get("/api/v1/usage", headers={"Authorization": f"Bearer {HASHED_KEY}"}), 4),
        (lambda: client.get("/api/v1/usage", headers={"Authorization": f"Bearer {ADMIN_KEY[:-1]}"}), 4),
        (lambda: client.post("/api/v1/sql", data="SELECT 1", headers={"Authorization": "Bearer é\u202e"}), 4),
        (lambda: client.post("/login", data={"key": "wrong"}), 4),
    ]
    expected_status = [202, 401, 401, 200, 200, 401, 401, 401]
    for (attempt, entries), status in zip(attempts, expected_status):
        compare_calls.clear()
        assert attempt().status_code == status
        # SHA-256 on both sides whatever was presented, and every entry checked: neither the
        # presented length nor the position of a match shows in the time taken.
        assert compare_calls == [(32, 32)] * entries


# --- no secret in logs or answers --------------------------------------------------------------


def secret_forms() -> dict[str, str]:
    """Each secret and the encodings it could leak in (URL-encoded in a DSN, Basic auth)."""
    forms = {}
    for secret in [*INGEST_TOKENS, ADMIN_KEY, ORG_KEY, USER_KEY, HASHED_KEY, SESSION_SECRET, DSN_PASSWORD]:
        forms[secret] = secret
        forms[quote(secret, safe="")] = secret
    forms[base64.b64encode(f"default:{DSN_PASSWORD}".encode()).decode()] = DSN_PASSWORD
    return forms


def drive(url: str) -> list[str]:
    """Right and wrong keys, bad input and errors against every endpoint; every answer as text."""
    seen: list[str] = []
    good = {"timestamp": time.time() - 30, "org": "acme", "model": "gpt-4o", "status_code": 200, "request_id": "sec-1"}
    calls = [
        ("post", "/v1/requests", {"json": good}),
        ("post", "/v1/requests", {"json": good, "headers": {"Authorization": f"Bearer {INGEST_TOKENS[0]}x"}}),
        ("post", "/v1/requests", {"json": good, "headers": {"Authorization": f"Basic {INGEST_TOKENS[1]}"}}),
        ("post", "/v1/requests", {"json": [good, {"org": INGEST_TOKENS[0]}], "headers": {"Authorization": f"Bearer {INGEST_TOKENS[1]}"}}),
        ("post", "/v1/requests", {"data": b"{" + INGEST_TOKENS[0].encode(), "headers": {"Authorization": f"Bearer {INGEST_TOKENS[0]}",
                                                                                     "Content-Type": "application/json"}}),
        ("post", "/v1/requests", {"data": b"x", "headers": {"Authorization": f"Bearer {INGEST_TOKENS[0]}", "Content-Type": "text/csv"}}),
        ("get", "/api/v1/usage", {}),
        ("get", "/api/v1/usage", {"headers": {"Authorization": f"Bearer {ADMIN_KEY}"}}),
        ("get", "/api/v1/usage", {"headers": {"Authorization": f"Bearer {ORG_KEY}"}, "params": {"org": "other"}}),
        ("get", "/api/v1/usage", {"headers": {"Authorization": f"Bearer {USER_KEY}"}, "params": {"timeframe": ADMIN_KEY}}),
        ("get", "/api/v1/usage", {"headers": {"Authorization": f"Bearer {HASHED_KEY}"}}),
        ("get", "/api/v1/usage", {"headers": {"Authorization": f"Bearer {ADMIN_KEY}"}, "params": {"org": "acme", "token": "t"}}),
        ("post", "/api/v1/sql", {"data": "SELECT count() FROM requests", "headers": {"Authorization": f"Bearer {ADMIN_KEY}"}}),
        ("post", "/api/v1/sql", {"data": "SELECT nothing FROM nowhere", "headers": {"Authorization": f"Bearer {ADMIN_KEY}"}}),
        ("post", "/api/v1/sql", {"data": "SELECT 1", "headers": {"Authorization": f"Bearer {ORG_KEY}"}}),
        ("post", "/login", {"data": {"key": USER_KEY + "-wrong", "next": "/"}, "allow_redirects": False}),
        ("post", "/login", {"data": {"key": USER_KEY, "next": "/"}, "allow_redirects": False}),
        ("get", "/", {"headers": {"Authorization": f"Bearer {ADMIN_KEY}"}}),
        ("get", "/readyz", {}),
        ("get", "/metrics", {}),
        ("get", "/openapi.json", {}),
        ("get", "/no/such/page", {}),
        ("delete", "/v1/requests", {}),
    ]
    for method, path, kwargs in calls:
        answer = requests.request(method, url + path, timeout=30, **kwargs)
        assert answer.status_code != 500, (path, answer.text[:300])
        seen.append(f"{method} {path} -> {answer.status_code} {answer.headers} {answer.text}")
    return seen


def test_no_secret_reaches_a_log_line_or_an_answer(tmp_path: Path, exporter_process):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "log_level": "DEBUG",  # the most a deployment can log
        "ingest": {"tokens": INGEST_TOKENS},
        "viewers": VIEWERS,
        "page": {"session_secret": SESSION_SECRET},
        "shutdown_grace_s": 2,
        "writer": {"retry_initial_s": 0.05, "retry_max_s": 0.2},
    }))
    dsn = f"http://default:{quote(DSN_PASSWORD, safe='')}@127.0.0.1:9/llm_usage"  # nothing listens on port 9
    working = exporter_process(data_dir=tmp_path / "up", config_file=config)
    down = exporter_process(data_dir=tmp_path / "down", config_file=config, extra_args=["--clickhouse-dsn", dsn])

    answers = drive(working.url) + drive(down.url)
    time.sleep(0.5)  # let the unreachable store's writer fail and log a few retries
    answers += [requests.get(down.url + "/readyz", timeout=30).text]
    assert "127.0.0.1:9" in answers[-1]  # the failure is reported, with where it happened
    assert working.terminate() == 0 and down.terminate() == 0
    logs = {"working": working.log(), "unreachable": down.log()}
    assert "insert into ClickHouse failed" in logs["unreachable"]

    for form, secret in secret_forms().items():
        for where, text in logs.items():
            assert form not in text, f"{secret!r} appears in the {where} exporter's log"
        for text in answers:
            assert form not in text, f"{secret!r} appears in an answer: {text[:300]}"


# --- SQL injection in every usage parameter ----------------------------------------------------

INJECTIONS = [
    "' OR 1=1 --",
    "' OR '1'='1",
    "\\'",
    "\\",
    "\\\\'; DROP TABLE requests; --",
    '" OR ""="',
    "`requests`",
    "acme' UNION ALL SELECT * FROM system.users --",
    "{org:String}",
    "%27%20OR%201%3D1",
    "\u02bc OR 1=1 --",  # modifier letter apostrophe
    "\uff07 OR 1=1",  # fullwidth apostrophe
    "\u202e'--",
    "a\x00' OR 1=1 --",
    "😀'; SELECT 1",
]


def test_injection_text_in_usage_parameters_is_only_ever_a_value(make_app):
    app = make_app()
    client = app.test_client()
    now = time.time() - 120
    # Each injection string is also a real org and a real token name with its own, different count,
    # so a correct answer is exactly that count and any leak through the SQL shows as a wrong one.
    batch = []
    for i, text in enumerate(INJECTIONS):
        batch += [{"timestamp": now, "org": text, "model": "m", "status_code": 200, "input_tokens": 1}] * (i + 1)
        batch += [{"timestamp": now, "org": "acme", "model": "m", "status_code": 200, "token_name": text, "input_tokens": 10}] * (i + 2)
    assert client.post("/v1/requests", json=batch).status_code == 202
    flush(app)
    store = runtime(app).store
    tables_before = store.query("SHOW TABLES")

    def usage(**params):
        answer = client.get("/api/v1/usage", query_string={"timeframe": "1h", **params})
        assert answer.status_code in (200, 400), (params, answer.status_code, answer.json)
        return answer

    for i, text in enumerate(INJECTIONS):
        as_org = usage(org=text).json
        assert (as_org["scope"]["org"], as_org["metrics"]["total_requests"], as_org["metrics"]["input_tokens"]) == (text, i + 1, i + 1)
        as_token = usage(org="acme", token=text).json
        assert (as_token["metrics"]["total_requests"], as_token["metrics"]["input_tokens"]) == (i + 2, 10 * (i + 2))
        absent = usage(org=text + "'", token=text).json  # no such org: an empty, well-formed answer
        assert absent["metrics"]["total_requests"] == 0 and absent["top"] == [] and absent["models"] == []
        assert all(point["requests"] == 0 for point in absent["timeseries"])
        for name in ("timeframe", "top"):
            refused = usage(**{name: text})
            assert refused.status_code == 400 and set(refused.json) == {"error"}

    assert store.query("SHOW TABLES") == tables_before
    assert store.query("SELECT count() FROM requests") == [(len(batch),)]
