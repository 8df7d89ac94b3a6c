"""schemathesis drives every operation of a real app from GET /openapi.json alone.

Positive and negative cases for every operation (ingest weighted up), each answer checked by
schemathesis against the document: never a 5xx, a documented status, content type, headers and
body, and auth that is really enforced. Afterwards ClickHouse must hold exactly the records the
API answered 202 for (one row per request id), and nothing from a rejected record.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import schemathesis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from exporter.app import runtime

from .record_model import (
    assert_stored_exactly,
    expected_row,
    first_of_each_request_id,
    stored_rows,
)

ADMIN = "schemathesis-admin-key"
INGEST = "schemathesis-ingest-token"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, ignored_auth]


# The document describes an NDJSON body as the array of its lines (OpenAPI 3.1 has no item schema
# for sequential media types); this is how such an array goes on the wire. Registered with
# schemathesis's own serializer registry, as its documentation shows.
@schemathesis.serializer("application/x-ndjson")
def _ndjson(ctx, value: Any) -> bytes:
    items = value if isinstance(value, list) else [value]
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


def sent_records(request) -> list[Any]:
    """The records of an ingest request as it went on the wire, read back with the stdlib."""
    body = request.body or b""
    body = body.encode() if isinstance(body, str) else body
    if "ndjson" in request.headers.get("Content-Type", ""):
        return [json.loads(line) for line in body.splitlines() if line.strip()]
    decoded = json.loads(body)
    return decoded if isinstance(decoded, list) else [decoded]


def accepted_records(request, answer: dict[str, Any]) -> Iterator[dict[str, Any]]:
    rejected = {r["index"] for r in answer["rejected"]}
    for index, record in enumerate(sent_records(request)):
        if index not in rejected:
            yield record


def test_schemathesis_finds_no_server_error_no_nonconformance_and_no_stored_rejected_record(make_app):
    app = make_app(
        clickhouse={"retention_days": 0},  # generated timestamps reach back to 2000
        ingest={"tokens": [INGEST]},
        viewers=[{"key": ADMIN, "role": "admin"}, {"key": "org-key-for-acme", "role": "org", "org": "acme"}],
        models=[{"name": "gpt-4o"}, {"name": "text-embedding-3-small", "endpoint": "embedding"}],
        writer={"max_age_s": 0.5},
    )
    rt = runtime(app)
    rt.writer.start()  # a live writer, so /readyz answers 200 and rows land while the run goes on
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    ingest = schema["/v1/requests"]["POST"]
    cases = st.one_of(
        ingest.as_strategy(), ingest.as_strategy(), ingest.as_strategy(GenerationMode.NEGATIVE),
        schema.as_strategy(), schema.as_strategy(GenerationMode.NEGATIVE),
    )
    acknowledged: list[tuple[str, Any]] = []

    @settings(max_examples=120, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
    @given(case=cases)
    def exercise(case) -> None:
        key = INGEST if case.operation.path == "/v1/requests" else ADMIN
        auth = {"Authorization": f"Bearer {key}"}
        response = case.call(headers=auth)
        case.validate_response(response, checks=CHECKS, headers=auth)
        event(f"{case.operation.method.upper()} {case.operation.path} -> {response.status_code}")
        if case.operation.path == "/v1/requests" and response.status_code == 202:
            for record in accepted_records(response.request, response.json()):
                acknowledged.append((record.get("request_id", ""), expected_row(record)))

    exercise()

    assert rt.writer.alive, "the writer thread survived the run"
    assert app.test_client().get("/readyz").status_code == 200
    rt.writer.stop_thread()  # drain() is the writer thread's job while it runs; one flusher at a time
    assert rt.writer.drain(time.monotonic() + 60), rt.writer.status.last_error
    assert acknowledged, "some generated records were accepted"
    assert_stored_exactly(stored_rows(app), first_of_each_request_id(acknowledged))
