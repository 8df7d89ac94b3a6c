"""POST /v1/requests against real embedded ClickHouse: what is accepted is stored field for field."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from exporter.app import runtime

from .conftest import flush

FULL = {
    "timestamp": "2026-11-24T10:15:30.123+01:00",
    "org": "acme",
    "model": "gpt-4o",
    "status_code": 200,
    "path": "/v1/chat/completions",
    "method": "POST",
    "response_time_ms": 1234.5,
    "input_tokens": 100,
    "output_tokens": 50,
    "token_name": "ci-token",
    "token_owner": "jane@acme.org",
    "service_account": "",
    "team": "ml-team",
    "user_id": "end-user-ü-1",
    "request_id": "req-1",
    "unknown_field": "ignored",
}


def rows(app, where: str = "1") -> list[dict]:
    rt = runtime(app)
    result = rt.store.reader.query(f"SELECT * FROM requests WHERE {where} ORDER BY timestamp, request_id")
    return [dict(zip(result.column_names, row)) for row in result.result_rows]


def post(client, body, content_type="application/json", **headers):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return client.post("/v1/requests", data=data, content_type=content_type, headers=headers)


def test_every_field_is_stored_as_sent(make_app):
    app = make_app()
    answer = post(app.test_client(), FULL)
    assert answer.status_code == 202
    assert answer.json == {"accepted": 1, "rejected": []}
    flush(app)
    [row] = rows(app)
    assert row["timestamp"].replace(tzinfo=timezone.utc) == datetime(2026, 11, 24, 9, 15, 30, 123000, tzinfo=timezone.utc)
    for field in ("org", "model", "status_code", "path", "method", "response_time_ms", "input_tokens", "output_tokens",
                  "token_name", "token_owner", "service_account", "team", "user_id", "request_id"):
        assert row[field] == FULL[field], field
    assert row["endpoint"] == "completion"


def test_optional_fields_default_and_epoch_timestamps(make_app):
    app = make_app()
    record = {"timestamp": 1795000000.25, "org": "o", "model": "m", "status_code": 404}
    assert post(app.test_client(), record).status_code == 202
    flush(app)
    [row] = rows(app)
    assert row["timestamp"].replace(tzinfo=timezone.utc).timestamp() == pytest.approx(1795000000.25)
    assert row["response_time_ms"] is None
    assert (row["input_tokens"], row["output_tokens"], row["endpoint"], row["path"]) == (0, 0, "other", "")


@pytest.mark.parametrize(
    ("path", "endpoint", "expected"),
    [
        ("/v1/chat/completions", None, "completion"),
        ("/V1/COMPLETIONS", None, "completion"),
        ("/v1/embeddings", None, "embedding"),
        ("/v1/models", None, "other"),
        ("", None, "other"),
        ("/v1/embeddings", "completion", "completion"),  # sent endpoint wins over the path
    ],
)
def test_endpoint_is_derived_from_path_when_absent(make_app, path, endpoint, expected):
    app = make_app()
    record = {"timestamp": 1795000000, "org": "o", "model": "m", "status_code": 200, "path": path}
    if endpoint:
        record["endpoint"] = endpoint
    assert post(app.test_client(), record).status_code == 202
    flush(app)
    assert [r["endpoint"] for r in rows(app)] == [expected]


def test_request_id_is_counted_once_within_and_across_batches(make_app):
    app = make_app()
    client = app.test_client()
    base = {"timestamp": 1795000000, "org": "o", "model": "m", "status_code": 200}
    batch = [base | {"request_id": "a"}, base | {"request_id": "a"}, base | {"request_id": "b"}, base, base]
    assert post(client, batch).json["accepted"] == 5
    flush(app)
    assert post(client, [base | {"request_id": "a"}, base | {"request_id": "c"}]).json["accepted"] == 2
    flush(app)
    stored = rows(app)
    assert sorted(r["request_id"] for r in stored) == ["", "", "a", "b", "c"]
    assert runtime(app).metrics.duplicate_records._value.get() == 2


def test_partial_acceptance_reports_each_rejected_index(make_app):
    app = make_app()
    good = {"timestamp": "2026-11-24T00:00:00Z", "org": "o", "model": "m", "status_code": 200}
    batch = [
        good | {"request_id": "ok-0"},
        good | {"status_code": 0},
        {k: v for k, v in good.items() if k != "org"},
        good | {"request_id": "ok-3"},
        good | {"timestamp": "yesterday"},
        "not an object",
    ]
    answer = post(app.test_client(), batch)
    assert answer.status_code == 202
    assert answer.json["accepted"] == 2
    assert [r["index"] for r in answer.json["rejected"]] == [1, 2, 4, 5]
    assert all(r["error"].endswith(".") and "\n" not in r["error"] for r in answer.json["rejected"])
    flush(app)
    assert sorted(r["request_id"] for r in rows(app)) == ["ok-0", "ok-3"]


def test_ndjson_body(make_app):
    app = make_app()
    lines = "\n".join(json.dumps({"timestamp": 1795000000 + i, "org": "o", "model": "m", "status_code": 200, "request_id": f"n{i}"}) for i in range(3))
    answer = post(app.test_client(), lines + "\n\n{broken\n", content_type="application/x-ndjson")
    assert answer.status_code == 202
    assert answer.json["accepted"] == 3
    assert answer.json["rejected"][0]["index"] == 3
    flush(app)
    assert len(rows(app)) == 3


BAD_RECORDS = [
    ({"org": "o", "model": "m", "status_code": 200}, "missing required field timestamp"),
    ({"timestamp": "2026-11-24T00:00:00", "org": "o", "model": "m", "status_code": 200}, "timezone"),
    ({"timestamp": "not a time", "org": "o", "model": "m", "status_code": 200}, "timestamp"),
    ({"timestamp": -5, "org": "o", "model": "m", "status_code": 200}, "timestamp"),
    ({"timestamp": "1800-01-01T00:00:00Z", "org": "o", "model": "m", "status_code": 200}, "between"),
    ({"timestamp": 1795000000, "org": "", "model": "m", "status_code": 200}, "org"),
    ({"timestamp": 1795000000, "org": 5, "model": "m", "status_code": 200}, "org"),
    ({"timestamp": 1795000000, "org": "o", "model": "m", "status_code": 0}, "status_code"),
    ({"timestamp": 1795000000, "org": "o", "model": "m", "status_code": 600}, "status_code"),
    ({"timestamp": 1795000000, "org": "o", "model": "m", "status_code": "200"}, "status_code"),
    ({"timestamp": 1795000000, "org": "o", "model": "m", "status_code": 200, "input_tokens": -1}, "input_tokens"),
    ({"timestamp": 1795000000, "org": "o", "model": "m", "status_code": 200, "output_tokens": 1.5}, "output_tokens"),
    ({"timestamp": 1795000000, "org": "o", "model": "m", "status_code": 200, "response_time_ms": -3}, "response_time_ms"),
    ({"timestamp": 1795000000, "org": "o", "model": "m", "status_code": 200, "endpoint": "chat"}, "endpoint"),
    ({"timestamp": 1795000000, "org": "o" * 5000, "model": "m", "status_code": 200}, "org"),
    ({"timestamp": 1795000000, "org": "o", "model": "m", "status_code": 200, "request_id": "r" * 129}, "request_id"),
]


@pytest.mark.parametrize(("record", "mentions"), BAD_RECORDS)
def test_bad_records_are_rejected_with_a_clear_error_and_not_stored(make_app, record, mentions):
    app = make_app()
    answer = post(app.test_client(), [record])
    assert answer.status_code == 400
    assert answer.json["accepted"] == 0
    [rejection] = answer.json["rejected"]
    assert rejection["index"] == 0
    assert mentions in rejection["error"]
    flush(app)
    assert rows(app) == []
    assert runtime(app).spool.pending_rows == 0


@pytest.mark.parametrize(
    ("body", "content_type", "status", "mentions"),
    [
        (b"{not json", "application/json", 400, None),
        (b"hello", "application/json", 400, "not JSON"),
        (b"", "application/json", 400, "empty"),
        (b"[]", "application/json", 400, "no records"),
        (b"42", "application/json", 400, "not JSON"),
        (b"<xml/>", "application/xml", 415, "application/json"),
        (b"a=b", "application/x-www-form-urlencoded", 415, "application/json"),
        (b"not json at all\nnor this", "application/x-ndjson", 400, "not JSON"),
    ],
)
def test_unreadable_bodies(make_app, body, content_type, status, mentions):
    app = make_app()
    answer = post(app.test_client(), body, content_type=content_type)
    assert answer.status_code == status
    if status == 415 or mentions:
        assert "error" in answer.json
        assert mentions in answer.json["error"]
    assert runtime(app).spool.pending_rows == 0


def test_body_over_the_limit_is_413_and_the_service_keeps_serving(make_app):
    app = make_app(ingest={"max_body_bytes": 1000})
    client = app.test_client()
    big = [{"timestamp": 1795000000, "org": "o", "model": "m", "status_code": 200, "user_id": "x" * 200}] * 10
    answer = post(client, big)
    assert answer.status_code == 413
    assert "1000 bytes" in answer.json["error"]
    small = {"timestamp": 1795000000, "org": "o", "model": "m", "status_code": 200}
    assert post(client, small).status_code == 202


def test_batch_over_the_record_limit_is_refused_whole(make_app):
    app = make_app(ingest={"max_records": 3})
    record = {"timestamp": 1795000000, "org": "o", "model": "m", "status_code": 200}
    answer = post(app.test_client(), [record] * 4)
    assert answer.status_code == 400
    assert "limit of 3" in answer.json["error"]
    assert runtime(app).spool.pending_rows == 0


def test_ingest_tokens_are_required_when_configured(make_app):
    app = make_app(ingest={"tokens": ["s3cret", "other"]})
    client = app.test_client()
    record = {"timestamp": 1795000000, "org": "o", "model": "m", "status_code": 200}
    assert post(client, record).status_code == 401
    assert post(client, record, Authorization="Bearer wrong").status_code == 401
    assert post(client, record, Authorization="Basic s3cret").status_code == 401
    assert post(client, record, Authorization="Bearer other").status_code == 202
    assert post(client, record, Authorization="Bearer s3cret").status_code == 202


def test_full_buffer_sheds_load_with_503_and_retry_after(make_app):
    app = make_app(spool={"max_bytes": 2000})
    client = app.test_client()
    record = {"timestamp": 1795000000, "org": "o", "model": "m", "status_code": 200, "user_id": "u" * 300}
    statuses = [post(client, record).status_code for _ in range(10)]
    assert statuses[0] == 202
    assert 503 in statuses
    refused = post(client, record)
    assert refused.status_code == 503
    assert refused.headers["Retry-After"].isdigit()
    accepted = statuses.count(202)
    flush(app)
    assert len(rows(app)) == accepted
    assert post(client, record).status_code == 202  # drained: accepting again


def test_strings_are_stored_untrimmed_and_unicode_safe(make_app):
    app = make_app()
    odd = {"timestamp": 1795000000, "org": " spaced org ", "model": "m\"quote'\\", "status_code": 200,
           "user_id": "line\nbreak\ttab 🚀", "token_name": "'; DROP TABLE requests; --"}
    assert post(app.test_client(), odd).status_code == 202
    flush(app)
    [row] = rows(app)
    for key in ("org", "model", "user_id", "token_name"):
        assert row[key] == odd[key]
