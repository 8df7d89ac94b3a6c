"""The OpenAPI 3.1 description of the exporter's HTTP API, served at ``GET /openapi.json``.

The record schema is generated from :class:`exporter.records.Record` by msgspec, so types,
required fields, bounds and maximum lengths cannot drift from the validator; only descriptions
and the few rules JSON Schema cannot say exactly are added here, in words. The document is built
for one configuration: the body limits and whether tokens or keys are required are those of the
exporter that serves it.
"""

from __future__ import annotations

import copy
from typing import Any

import msgspec

from . import __version__
from .config import Config
from .records import MAX_REQUEST_ID_CHARS, MAX_STRING_CHARS, Record
from .usage import TIMEFRAMES, TOP_SIZES

OPENAPI_VERSION = "3.1.0"
REF = "#/components/schemas/{name}"
JSON_DIALECT = "https://spec.openapis.org/oas/3.1/dialect/base"
NDJSON = "application/x-ndjson"
# What exporter.web.ingest also reads as NDJSON (a test keeps the two equal).
NDJSON_ALIASES = ("application/jsonl", "application/jsonlines", "application/ndjson", "application/x-jsonlines")

# The contract's words for each record field (CONTRACT.md, POST /v1/requests).
FIELD_DESCRIPTIONS = {
    "timestamp": (
        "When the gateway received the request: an RFC 3339 date-time with an offset or `Z` (`T`, `t` or a "
        "space between date and time; a leap second `:60` is refused), or epoch seconds (fractions allowed). "
        "The instant must lie in [2000-01-01T00:00:00Z, 2100-01-01T00:00:00Z); it is stored to the nearest millisecond."
    ),
    "org": "The organization the API token belongs to.",
    "model": "Model name as requested.",
    "status_code": "HTTP status the gateway returned. Written as an integer (no fraction or exponent).",
    "path": "API path, e.g. `/v1/chat/completions`.",
    "endpoint": (
        "The request kind. When absent or null it is derived from `path`: contains `completion` (any case) -> "
        "`completion`, contains `embedding` -> `embedding`, else `other`."
    ),
    "method": "HTTP method.",
    "response_time_ms": "Gateway response time in milliseconds; null or absent when not measured.",
    "input_tokens": "Input (prompt) tokens. Written as an integer (no fraction or exponent).",
    "output_tokens": "Output (completion) tokens. Written as an integer (no fraction or exponent).",
    "token_name": "Name of the API token used.",
    "token_owner": "Email of the token's owner (empty for service-account tokens).",
    "service_account": "Service account name (for service-account tokens).",
    "team": "Team that owns the service account.",
    "user_id": "End-user id sent by the API caller (an email, a UUID, anything).",
    "request_id": (
        "Unique id of the request. A record sent twice with the same `request_id` (in one batch or in two) is "
        "accepted both times and stored once."
    ),
}


def record_schema() -> dict[str, Any]:
    """The record's JSON Schema, generated from the validator and annotated with the contract's words."""
    _, components = msgspec.json.schema_components([Record], ref_template=REF)
    record = copy.deepcopy(components["Record"])
    record["description"] = (
        "One API request the gateway served. Unknown fields are ignored. Strings are stored as sent (no trimming), "
        f"at most {MAX_STRING_CHARS} characters (Unicode code points; `request_id` at most {MAX_REQUEST_ID_CHARS}). "
        "A field given twice keeps its last value, and every value given must be valid."
    )
    record["additionalProperties"] = True
    for name, description in FIELD_DESCRIPTIONS.items():
        record["properties"][name]["description"] = description
    # The number branch carries the bounds; a date-time's range is checked after parsing, which JSON
    # Schema can only say in words (the description above).
    timestamp = record["properties"]["timestamp"]
    timestamp["examples"] = ["2026-11-24T10:15:30.123+01:00", 1795000000.25]
    record["examples"] = [
        {
            "timestamp": "2026-11-24T10:15:30.123Z",
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
            "user_id": "end-user-1",
            "request_id": "req-1",
        }
    ]
    return record


def _error_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "An error: one clear sentence.",
        "properties": {"error": {"type": "string", "minLength": 1}},
        "required": ["error"],
    }


def _ingest_schemas(config: Config) -> dict[str, Any]:
    max_records = config.ingest.max_records
    return {
        "Rejection": {
            "type": "object",
            "properties": {
                "index": {"type": "integer", "minimum": 0, "description": "0-based position of the record in the batch."},
                "error": {"type": "string", "minLength": 1, "description": "Why the record was rejected, one sentence."},
            },
            "required": ["index", "error"],
            "additionalProperties": False,
        },
        "IngestAccepted": {
            "type": "object",
            "description": "At least one record was accepted and is durable; rejected records are not stored at all.",
            "properties": {
                "accepted": {"type": "integer", "minimum": 1, "maximum": max_records},
                "rejected": {"type": "array", "items": {"$ref": REF.format(name="Rejection")}},
            },
            "required": ["accepted", "rejected"],
            "additionalProperties": False,
        },
        "IngestAllRejected": {
            "type": "object",
            "description": "Every record was rejected; nothing was stored.",
            "properties": {
                "accepted": {"const": 0},
                "rejected": {"type": "array", "minItems": 1, "items": {"$ref": REF.format(name="Rejection")}},
            },
            "required": ["accepted", "rejected"],
            "additionalProperties": False,
        },
        "RecordBatch": {
            "type": "array",
            "description": "Records, each validated on its own: one bad record rejects only itself.",
            "items": {"$ref": REF.format(name="Record")},
            "minItems": 1,
            "maxItems": max_records,
        },
    }


def _usage_schema() -> dict[str, Any]:
    count = {"type": "integer", "minimum": 0}
    average = {"type": ["number", "null"], "minimum": 0}
    instant = {"type": "string", "format": "date-time", "pattern": r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$"}
    nullable_text = {"type": ["string", "null"]}
    return {
        "type": "object",
        "description": "The Usage Dashboard's numbers for one scope and window.",
        "properties": {
            "scope": {
                "type": "object",
                "properties": {
                    "org": {"type": "string", "minLength": 1, "description": "`all` or the organization shown."},
                    "token": nullable_text,
                    "timeframe": {"enum": list(TIMEFRAMES)},
                    "top_kind": {"enum": ["org", "token", "user_id"]},
                },
                "required": ["org", "token", "timeframe", "top_kind"],
                "additionalProperties": False,
            },
            "window": {
                "type": "object",
                "properties": {"start": instant, "end": instant, "bucket": {"enum": ["1m", "1h", "1d"]}},
                "required": ["start", "end", "bucket"],
                "additionalProperties": False,
            },
            "metrics": {
                "type": "object",
                "properties": {
                    "total_requests": count,
                    "failed_requests": count,
                    "avg_response_time_ms_completion": average,
                    "avg_response_time_ms_embedding": average,
                    "input_tokens": count,
                    "output_tokens": count,
                    "total_tokens": count,
                },
                "required": [
                    "total_requests", "failed_requests", "avg_response_time_ms_completion",
                    "avg_response_time_ms_embedding", "input_tokens", "output_tokens", "total_tokens",
                ],
                "additionalProperties": False,
            },
            "timeseries": {
                "type": "array",
                "description": "One point per bucket, from the bucket holding the window's start to the one holding now.",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "properties": {"t": instant, "requests": count},
                    "required": ["t", "requests"],
                    "additionalProperties": False,
                },
            },
            "top": {
                "type": "array",
                "maxItems": max(TOP_SIZES),
                "items": {
                    "type": "object",
                    "properties": {
                        "rank": {"type": "integer", "minimum": 1},
                        "name": {"type": "string"},
                        "requests": count,
                        "input_tokens": count,
                        "output_tokens": count,
                        "total_tokens": count,
                        "token_owner": nullable_text,
                        "service_account": nullable_text,
                    },
                    "required": ["rank", "name", "requests", "input_tokens", "output_tokens", "total_tokens",
                                 "token_owner", "service_account"],
                    "additionalProperties": False,
                },
            },
            "models": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"model": {"type": "string"}, "requests": count},
                    "required": ["model", "requests"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["scope", "window", "metrics", "timeseries", "top", "models"],
        "additionalProperties": False,
    }


def _ready_schema() -> dict[str, Any]:
    nullable_time = {"type": ["number", "null"], "description": "Epoch seconds."}
    return {
        "type": "object",
        "properties": {
            "status": {"enum": ["ready", "not ready"]},
            "problems": {"type": "array", "items": {"type": "string"}},
            "spool": {
                "type": "object",
                "description": "The durable buffer of accepted records not yet in ClickHouse.",
                "properties": {
                    "records": {"type": "integer", "minimum": 0},
                    "bytes": {"type": "integer", "minimum": 0},
                    "oldest_age_s": {"type": "number", "minimum": 0},
                },
                "required": ["records", "bytes", "oldest_age_s"],
            },
            "writer": {
                "type": "object",
                "properties": {
                    "last_error": {"type": ["string", "null"]},
                    "last_error_at": nullable_time,
                    "last_success_at": nullable_time,
                    "consecutive_failures": {"type": "integer", "minimum": 0},
                },
                "required": ["last_error", "last_error_at", "last_success_at", "consecutive_failures"],
            },
            "error": {"type": "string", "description": "Present when not ready: the reasons in one sentence."},
        },
        "required": ["status", "problems", "spool", "writer"],
    }


def _json(schema_name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": REF.format(name=schema_name)}}}


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": _json("Error")}
    if headers:
        response["headers"] = headers
    return response


RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer", "minimum": 0}}}
WWW_AUTHENTICATE = {"WWW-Authenticate": {"description": "The Bearer challenge.", "schema": {"type": "string"}}}


def _ingest_operation(config: Config) -> dict[str, Any]:
    limit = config.ingest.max_body_bytes
    operation: dict[str, Any] = {
        "operationId": "ingestRecords",
        "tags": ["ingest"],
        "summary": "Store usage records",
        "description": (
            "One record per API request the gateway served: a JSON object, a JSON array of objects, or NDJSON "
            f"(one object per line; blank lines are skipped; also read as {', '.join(NDJSON_ALIASES)}). "
            f"At most {config.ingest.max_records} records and "
            f"{limit} bytes per body. A 202 answer means the accepted records are durable: a crash or a ClickHouse "
            "outage after the answer loses none of them."
        ),
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"oneOf": [{"$ref": REF.format(name="Record")}, {"$ref": REF.format(name="RecordBatch")}]}
                },
                NDJSON: {
                    # OpenAPI 3.1 has no item schema for sequential media types (3.2's itemSchema); the
                    # array stands for the lines, one record each.
                    "schema": {"$ref": REF.format(name="RecordBatch"), "description": "Each array item is one line of the body."},
                },
            },
        },
        "responses": {
            "202": {"description": "At least one record accepted and durable.", "content": _json("IngestAccepted")},
            "400": {
                "description": "Every record was rejected (with the per-record reasons), or the body is not JSON/NDJSON at all.",
                "content": {
                    "application/json": {
                        "schema": {"oneOf": [{"$ref": REF.format(name="IngestAllRejected")}, {"$ref": REF.format(name="Error")}]}
                    }
                },
            },
            "413": _error(f"The body is larger than {limit} bytes."),
            "415": _error("The content type is neither JSON nor NDJSON."),
            "503": _error(
                "Shutting down, the durable buffer (or its disk) is full, or too many bodies are in progress; retry later.",
                RETRY_AFTER,
            ),
        },
    }
    if config.ingest.tokens:
        operation["security"] = [{"ingestToken": []}]
        operation["responses"]["401"] = _error("The ingest token is missing or wrong.", WWW_AUTHENTICATE)
    else:
        operation["security"] = []
    return operation


def _viewer_security(config: Config, page_session: bool) -> list[dict[str, list[str]]]:
    if not config.viewers:
        return []
    return [{"viewerKey": []}, {"pageSession": []}] if page_session else [{"viewerKey": []}]


def _usage_operation(config: Config) -> dict[str, Any]:
    name = {"type": "string", "minLength": 1, "maxLength": MAX_STRING_CHARS}
    return {
        "operationId": "getUsage",
        "tags": ["usage"],
        "summary": "The Usage Dashboard's numbers",
        "description": (
            "Totals, time series, top list and models for the last hour, day or week up to now. A global admin key "
            "may choose any org or `all`; org and user keys are pinned to their org (a user key sees only its own "
            "records and its teams')."
        ),
        "parameters": [
            {"name": "org", "in": "query", "schema": {**name, "description": "`all` or an organization name."},
             "description": "Default: the caller's own org, `all` for a global admin."},
            {"name": "token", "in": "query", "schema": name, "description": "A token name within `org` (needs `org`)."},
            {"name": "timeframe", "in": "query", "schema": {"enum": list(TIMEFRAMES), "default": "1d"}},
            {"name": "top", "in": "query", "schema": {"type": "integer", "enum": list(TOP_SIZES), "default": 10}},
        ],
        "security": _viewer_security(config, page_session=True),
        "responses": {
            "200": {
                "description": "The numbers.",
                "headers": {"Cache-Control": {"schema": {"const": "private, no-store"}}},
                "content": _json("Usage"),
            },
            "400": _error("A parameter is malformed, or a token is named without its org."),
            "401": _error("No valid viewer key.", WWW_AUTHENTICATE),
            "403": _error("The key may not see that organization."),
            "503": _error("ClickHouse did not answer the usage query."),
        },
    }


def _sql_operation(config: Config) -> dict[str, Any]:
    return {
        "operationId": "runSql",
        "tags": ["sql"],
        "summary": "Read-only ad-hoc SQL",
        "description": (
            "Runs one read-only query (ClickHouse `readonly=1`, with the configured time and result-size limits) on "
            "the configured database. Global admin keys only; when no viewer keys are configured, loopback clients only."
        ),
        "parameters": [
            {"name": "format", "in": "query", "description": "Any ClickHouse output format.",
             "schema": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9]{0,63}$", "default": "JSON"}},
        ],
        "requestBody": {
            "required": True,
            "content": {
                "text/plain": {"schema": {"type": "string", "minLength": 1}},
                "application/json": {
                    "schema": {"type": "object", "properties": {"query": {"type": "string", "minLength": 1}}, "required": ["query"]}
                },
            },
        },
        "security": _viewer_security(config, page_session=False),
        "responses": {
            "200": {
                "description": "The result in the chosen format: JSON formats as application/json, others as text/plain.",
                "content": {"application/json": {"schema": {}}, "text/plain": {"schema": {"type": "string"}}},
            },
            "400": _error("No query, a malformed format name, or ClickHouse refused the query (its first line)."),
            "401": _error("No valid viewer key."),
            "403": _error("Not a global admin key, or not a loopback client when no keys are configured."),
            "503": _error("ClickHouse cannot be reached."),
        },
    }


def _ops_paths() -> dict[str, Any]:
    return {
        "/metrics": {
            "get": {
                "operationId": "getMetrics",
                "tags": ["operations"],
                "summary": "Prometheus metrics",
                "description": "Prometheus text exposition, or OpenMetrics when the scraper's Accept header asks for it.",
                "responses": {
                    "200": {
                        "description": "The exposition.",
                        "content": {
                            "text/plain": {"schema": {"type": "string"}},
                            "application/openmetrics-text": {"schema": {"type": "string"}},
                        },
                    }
                },
            }
        },
        "/healthz": {
            "get": {
                "operationId": "getHealth",
                "tags": ["operations"],
                "summary": "Liveness",
                "responses": {
                    "200": {
                        "description": "The process runs.",
                        "content": {"application/json": {"schema": {
                            "type": "object", "properties": {"status": {"const": "ok"}}, "required": ["status"]}}},
                    }
                },
            }
        },
        "/readyz": {
            "get": {
                "operationId": "getReadiness",
                "tags": ["operations"],
                "summary": "Readiness",
                "description": "200 only when ClickHouse answers and the durable buffer is below its limit; else 503 with the reasons.",
                "responses": {
                    "200": {"description": "Ready.", "content": _json("Ready")},
                    "503": {"description": "Not ready; `error` and `problems` say why.", "content": _json("Ready")},
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "getOpenApi",
                "tags": ["operations"],
                "summary": "This document",
                "responses": {"200": {"description": "OpenAPI 3.1.", "content": {"application/json": {"schema": {"type": "object"}}}}},
            }
        },
    }


def _page_paths() -> dict[str, Any]:
    html = {"text/html": {"schema": {"type": "string"}}}
    see_other = {"description": "Signed in or out: go on to the page.", "headers": {"Location": {"schema": {"type": "string"}}}}
    form = {
        "required": True,
        "content": {
            "application/x-www-form-urlencoded": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "key": {"type": "string", "description": "A viewer key."},
                        "next": {"type": "string", "description": "A path on this exporter to go on to."},
                    },
                }
            }
        },
    }
    return {
        "/": {
            "get": {
                "operationId": "getUsagePage",
                "tags": ["page"],
                "summary": "The Usage page (or its login form)",
                "responses": {"200": {"description": "The page, or the login form when not signed in.", "content": html}},
            }
        },
        "/login": {
            "post": {
                "operationId": "login",
                "tags": ["page"],
                "summary": "Sign in to the page with a viewer key",
                "requestBody": form,
                "responses": {
                    "303": see_other,
                    "401": {"description": "Not a valid viewer key: the form again.", "content": html},
                    "403": {"description": "The form was posted from another site.", "content": html},
                },
            }
        },
        "/logout": {
            "post": {
                "operationId": "logout",
                "tags": ["page"],
                "summary": "Sign out of the page",
                "responses": {"303": see_other, "403": {"description": "Posted from another site.", "content": html}},
            }
        },
    }


def build_openapi(config: Config) -> dict[str, Any]:
    """The whole document for an exporter running with ``config``."""
    schemas: dict[str, Any] = {"Record": record_schema(), "Error": _error_schema()}
    schemas.update(_ingest_schemas(config))
    schemas["Usage"] = _usage_schema()
    schemas["Ready"] = _ready_schema()
    return {
        "openapi": OPENAPI_VERSION,
        "jsonSchemaDialect": JSON_DIALECT,
        "info": {
            "title": "llm-usage-exporter",
            "version": __version__,
            "summary": "Usage records from LLM API gateways into ClickHouse, Prometheus metrics and the Usage Dashboard.",
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "tags": [
            {"name": "ingest", "description": "Records from gateways."},
            {"name": "usage", "description": "The Usage Dashboard's numbers."},
            {"name": "sql", "description": "Ad-hoc read-only SQL for engineers."},
            {"name": "operations", "description": "Metrics, health and this document."},
            {"name": "page", "description": "The built-in Usage page."},
        ],
        "paths": {
            "/v1/requests": {"post": _ingest_operation(config)},
            "/api/v1/usage": {"get": _usage_operation(config)},
            "/api/v1/sql": {"post": _sql_operation(config)},
            **_ops_paths(),
            **_page_paths(),
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "ingestToken": {"type": "http", "scheme": "bearer", "description": "One of `ingest.tokens`."},
                "viewerKey": {"type": "http", "scheme": "bearer", "description": "A viewer key from `viewers`."},
                "pageSession": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": "usage_exporter_session",
                    "description": "The Usage page's login session (set by POST /login).",
                },
            },
        },
    }
