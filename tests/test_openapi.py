"""GET /openapi.json: a valid OpenAPI 3.1 document that says what the exporter really does.

The document is checked by openapi-spec-validator; the record schema against the validator's own
constants and verdicts; every answer the API can give (provoked for real, 503s included) against
the documented schema of its status; and schemathesis drives every operation of a real app from
the document alone (``test_openapi_schemathesis.py``).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi

from exporter import records
from exporter.app import runtime
from exporter.openapi import NDJSON, NDJSON_ALIASES, build_openapi
from exporter.web.ingest import NDJSON_TYPES

from .conftest import flush

ADMIN = "admin-key-0123456789"
ORG_KEY = "acme-key-0123456789"
INGEST = "ingest-token-0123456789"
GOOD = {"timestamp": "2026-11-24T10:15:30.123+01:00", "org": "acme", "model": "gpt-4o", "status_code": 200}


def keyed(make_app, **overrides):
    base = {
        "ingest": {"tokens": [INGEST]},
        "viewers": [{"key": ADMIN, "role": "admin"}, {"key": ORG_KEY, "role": "org", "org": "acme"}],
        "models": [{"name": "gpt-4o"}],
    }
    return make_app(**(base | overrides))


def validator(document: dict[str, Any], schema: dict[str, Any]) -> Draft202012Validator:
    """A JSON Schema validator for ``schema``, whose ``#/components/...`` references resolve in ``document``."""
    return Draft202012Validator({**schema, "components": document["components"]}, format_checker=Draft202012Validator.FORMAT_CHECKER)


def documented(document: dict[str, Any], path: str, method: str, response) -> None:
    """The answer's status is documented for the operation, and its body matches that status's schema."""
    responses = document["paths"][path][method]["responses"]
    status = str(response.status_code)
    assert status in responses, f"{method.upper()} {path} answered {status}, which the document does not list"
    content = responses[status].get("content")
    if not content:
        return
    mimetype = response.mimetype
    assert mimetype in content, f"{status} of {path} is {mimetype}, documented {list(content)}"
    for header, spec in responses[status].get("headers", {}).items():
        assert header in response.headers, f"{status} of {path} lacks its documented {header} header"
        if spec["schema"].get("type") == "integer":
            assert response.headers[header].isdigit()
    if mimetype == "application/json":
        validator(document, content[mimetype]["schema"]).validate(response.get_json())


@pytest.mark.parametrize("keys", [False, True], ids=["open", "keyed"])
def test_the_document_is_valid_openapi_3_1(make_config, keys):
    overrides = {"ingest": {"tokens": [INGEST]}, "viewers": [{"key": ADMIN, "role": "admin"}]} if keys else {}
    document = build_openapi(make_config(**overrides))
    validate_openapi(document)  # raises on any violation of the 3.1 schema
    assert document["openapi"].startswith("3.1.")
    ingest = document["paths"]["/v1/requests"]["post"]
    assert ingest["security"] == ([{"ingestToken": []}] if keys else [])
    assert ("401" in ingest["responses"]) is keys
    assert document["paths"]["/api/v1/usage"]["get"]["security"] == ([{"viewerKey": []}, {"pageSession": []}] if keys else [])


def test_the_served_document_is_the_one_built_for_the_running_config(make_app):
    app = keyed(make_app, ingest={"tokens": [INGEST], "max_records": 777, "max_body_bytes": 123_456})
    answer = app.test_client().get("/openapi.json")
    assert answer.status_code == 200 and answer.mimetype == "application/json"
    document = answer.get_json()
    assert document == json.loads(json.dumps(build_openapi(runtime(app).config)))
    assert document["components"]["schemas"]["RecordBatch"]["maxItems"] == 777
    assert "123456 bytes" in document["paths"]["/v1/requests"]["post"]["responses"]["413"]["description"]
    assert {NDJSON, *NDJSON_ALIASES} == NDJSON_TYPES  # every NDJSON type ingest reads is named
    served = {(path, method) for path, ops in document["paths"].items() for method in ops}
    routed = {(rule.rule, method.lower()) for rule in app.url_map.iter_rules() for method in rule.methods - {"HEAD", "OPTIONS"}
              if rule.endpoint != "static"}
    assert routed == served, "every route is documented, and nothing else"


def test_the_record_schema_has_the_validators_types_bounds_and_lengths(make_config):
    record = build_openapi(make_config())["components"]["schemas"]["Record"]
    props = record["properties"]
    assert sorted(record["required"]) == ["model", "org", "status_code", "timestamp"]
    assert set(props) == set(records.Record.__struct_fields__)
    assert record["additionalProperties"] is True
    assert props["org"] == props["org"] | {"type": "string", "minLength": 1, "maxLength": records.MAX_STRING_CHARS}
    for name in ("model", "path", "method", "token_name", "token_owner", "service_account", "team", "user_id"):
        assert props[name]["type"] == "string" and props[name]["maxLength"] == records.MAX_STRING_CHARS, name
    assert props["request_id"]["maxLength"] == records.MAX_REQUEST_ID_CHARS == 128
    assert (props["status_code"]["type"], props["status_code"]["minimum"], props["status_code"]["maximum"]) == ("integer", 100, 599)
    for name in ("input_tokens", "output_tokens"):
        assert (props[name]["minimum"], props[name]["maximum"]) == (0, 2**32 - 1)
    number = next(b for b in props["timestamp"]["anyOf"] if b.get("type") == "number")
    assert (number["minimum"], number["exclusiveMaximum"]) == (records.MIN_EPOCH_S, records.MAX_EPOCH_S)
    assert {"type": "string", "format": "date-time"}.items() <= next(b for b in props["timestamp"]["anyOf"] if b.get("type") == "string").items()
    assert props["endpoint"]["anyOf"] == [{"enum": ["completion", "embedding", "other"]}, {"type": "null"}]
    assert props["response_time_ms"]["anyOf"][0] == {"type": "number", "minimum": 0, "maximum": records.MAX_RESPONSE_TIME_MS}


# Records on both sides of every documented rule: (record, the exporter accepts it, the schema
# accepts it). The two differ only where the schema states a rule in words (marked).
AGREEMENT = [
    (GOOD, True, True),
    (GOOD | {"timestamp": 1795000000.25}, True, True),
    (GOOD | {"timestamp": "2026-11-24T10:15:30z"}, True, True),
    (GOOD | {"timestamp": "2026-11-24 10:15:30Z"}, True, False),  # a space for T: in words
    (GOOD | {"timestamp": records.MIN_EPOCH_S}, True, True),
    (GOOD | {"timestamp": records.MAX_EPOCH_S}, False, False),
    (GOOD | {"timestamp": "2026-11-24T10:15:30"}, False, False),
    (GOOD | {"timestamp": "1999-12-31T23:59:59Z"}, False, True),  # the date-time's range: in words
    (GOOD | {"timestamp": "2026-11-24T23:59:60Z"}, False, False),
    (GOOD | {"org": ""}, False, False),
    (GOOD | {"org": "é" * records.MAX_STRING_CHARS}, True, True),
    (GOOD | {"org": "é" * (records.MAX_STRING_CHARS + 1)}, False, False),
    (GOOD | {"user_id": "😀" * records.MAX_STRING_CHARS}, True, True),
    (GOOD | {"request_id": "r" * 129}, False, False),
    (GOOD | {"status_code": 99}, False, False),
    (GOOD | {"status_code": 599}, True, True),
    (GOOD | {"status_code": "200"}, False, False),
    (GOOD | {"status_code": True}, False, False),
    (GOOD | {"status_code": 200.0}, False, True),  # integers written without a fraction: in words
    (GOOD | {"input_tokens": 2**32}, False, False),
    (GOOD | {"input_tokens": -1}, False, False),
    (GOOD | {"response_time_ms": None, "endpoint": None}, True, True),
    (GOOD | {"response_time_ms": 86_400_000.5}, False, False),
    (GOOD | {"endpoint": "chat"}, False, False),
    (GOOD | {"unknown": {"nested": [1, 2]}}, True, True),
    ({k: v for k, v in GOOD.items() if k != "model"}, False, False),
]


def test_the_schema_and_the_exporter_agree_on_each_record(make_app):
    app = make_app()
    record_schema = validator(app.test_client().get("/openapi.json").get_json(), {"$ref": "#/components/schemas/Record"})
    for record, accepted, schema_accepts in AGREEMENT:
        answer = app.test_client().post("/v1/requests", json=record)
        assert (answer.status_code == 202) is accepted, (record, answer.json)
        assert record_schema.is_valid(record) is schema_accepts, record


def test_every_ingest_answer_is_documented(make_app, tmp_path):
    app = keyed(make_app, ingest={"tokens": [INGEST], "max_body_bytes": 2000}, spool={"max_bytes": 4000})
    document = app.test_client().get("/openapi.json").get_json()
    client = app.test_client()
    auth = {"Authorization": f"Bearer {INGEST}"}

    def post(data, content_type="application/json", headers=auth):
        answer = client.post("/v1/requests", data=data, content_type=content_type, headers=headers)
        documented(document, "/v1/requests", "post", answer)
        return answer

    assert post(json.dumps([GOOD, {"org": "x"}])).status_code == 202
    assert post(json.dumps(GOOD) + "\n{}\n", "application/x-ndjson").status_code == 202
    assert post(json.dumps([{"org": "x"}])).get_json()["accepted"] == 0  # 400, every record rejected
    assert "error" in post(b"not json").get_json()  # 400, not JSON at all
    assert post(json.dumps(GOOD), headers={}).status_code == 401
    assert post(json.dumps(GOOD), headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert post(json.dumps(GOOD), "text/csv").status_code == 415
    assert post(b"[" + b" " * 3000 + b"]").status_code == 413
    while (answer := post(json.dumps([GOOD] * 5))).status_code == 202:  # nothing drains: the buffer fills
        pass
    assert answer.status_code == 503 and int(answer.headers["Retry-After"]) > 0
    runtime(app).draining = True
    assert post(json.dumps(GOOD)).status_code == 503


def test_every_usage_sql_and_operations_answer_is_documented(make_app):
    app = keyed(make_app)
    runtime(app).writer.start()
    document = app.test_client().get("/openapi.json").get_json()
    client = app.test_client()
    assert client.post("/v1/requests", json=[GOOD, GOOD | {"status_code": 500, "path": "/v1/embeddings"}],
                       headers={"Authorization": f"Bearer {INGEST}"}).status_code == 202
    flush(app)

    def get(path, key=ADMIN, **params):
        answer = client.get(path, query_string=params, headers={"Authorization": f"Bearer {key}"} if key else {})
        documented(document, path, "get", answer)
        return answer.status_code

    def sql(query, key=ADMIN, **params):
        answer = client.post("/api/v1/sql", data=query, query_string=params, content_type="text/plain",
                             headers={"Authorization": f"Bearer {key}"} if key else {})
        documented(document, "/api/v1/sql", "post", answer)
        return answer.status_code

    for timeframe in ("1h", "1d", "1w"):
        assert get("/api/v1/usage", timeframe=timeframe, top="25") == 200
    assert get("/api/v1/usage", org="acme", token="t") == 200
    assert get("/api/v1/usage", key=ORG_KEY) == 200
    assert get("/api/v1/usage", timeframe="2d") == 400
    assert get("/api/v1/usage", token="t") == 400
    assert get("/api/v1/usage", key=None) == 401
    assert get("/api/v1/usage", key=ORG_KEY, org="other") == 403
    assert sql("SELECT count() FROM requests") == 200
    assert sql("SELECT count() FROM requests", format="TSV") == 200
    assert sql("SELECT count() FROM requests FORMAT JSONCompact") == 200
    assert sql("SELEC nonsense") == 400
    assert sql("SELECT 1", key=None) == 401
    assert sql("SELECT 1", key=ORG_KEY) == 403
    assert get("/healthz") == 200 and get("/metrics") == 200 and get("/readyz") == 200
    runtime(app).draining = True
    assert get("/readyz") == 503


SQL_ANSWERS = [
    ("SELECT 1 AS one", {}, 200, "application/json"),
    ("SELECT 1 AS one FORMAT TSV", {}, 200, "text/plain"),  # the query's own FORMAT decides the type
    ("SELECT 1 AS one FORMAT JSONCompact", {"format": "TSV"}, 200, "application/json"),
    ("SELECT 1 AS one", {"format": "JSONEachRow"}, 200, "text/plain"),
    ("SELECT 1 AS one", {"format": "JSONLines"}, 200, "text/plain"),
    # chDB reads the text as a C string and answered an empty 200 for what follows a NUL.
    ("\x00SELECT 1", {}, 400, "application/json"),
    ("SELECT 1\x00; SELECT 2", {}, 400, "application/json"),
    # chDB answers nothing, not a syntax error, for text starting with a non-ASCII letter.
    ("é", {}, 400, "application/json"),
    ("Ê\x1dª", {}, 400, "application/json"),
]


def test_sql_answers_are_what_their_content_type_says(make_app):
    client = make_app().test_client()
    for query, params, status, mimetype in SQL_ANSWERS:
        answer = client.post("/api/v1/sql", data=query.encode(), query_string=params, content_type="text/plain")
        assert (answer.status_code, answer.mimetype) == (status, mimetype), (query, answer.data[:200])
        if mimetype == "application/json":
            assert isinstance(answer.get_json(), dict)
        else:
            assert answer.data.strip() in (b"1", b'{"one":1}'), query


def test_an_undocumented_method_is_405_naming_the_documented_ones(make_app):
    app = make_app()
    client = app.test_client()
    document = client.get("/openapi.json").get_json()
    for path, operations in document["paths"].items():
        for method in {"get", "post", "put", "delete", "patch"} - set(operations):
            answer = client.open(path, method=method.upper())
            assert answer.status_code == 405, (method, path)
            assert set(answer.json) == {"error"}
            allowed = {m.strip().lower() for m in answer.headers["Allow"].split(",")}
            assert allowed - {"head", "options"} == set(operations), (method, path, allowed)
