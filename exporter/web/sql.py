"""POST /api/v1/sql: read-only SQL for engineers, for global admins (or loopback when keys are off)."""

from __future__ import annotations

import ipaddress
import re

from flask import Blueprint, Response, current_app, jsonify, request

from ..app import runtime
from ..storage import QueryRefused, StorageError

bp = Blueprint("sql", __name__)

_FORMAT = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,63}$")
# A query that names its own FORMAT keeps it (Store.adhoc_sql), so the answer's type follows that one.
_OWN_FORMAT = re.compile(r"\bFORMAT\s+([A-Za-z][A-Za-z0-9]*)\s*;?\s*$", re.IGNORECASE)
# Formats whose whole output is one JSON document, even for zero rows; the JSON*EachRow and
# JSONLines family write a line per row and go out as text.
_JSON_DOCUMENTS = {"json", "jsoncompact", "jsonstrings", "jsoncompactstrings", "jsoncolumnswithmetadata"}


def _is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _error(status: int, message: str):
    response = jsonify(error=message)
    response.status_code = status
    return response


@bp.post("/api/v1/sql")
def sql():
    rt = runtime(current_app)
    if rt.viewers.open:
        if not _is_loopback(request.remote_addr):
            return _error(403, "Ad-hoc SQL is open only to loopback clients when no viewer keys are configured.")
    else:
        viewer = rt.viewers.authenticate(request.headers.get("Authorization"))
        if viewer is None:
            return _error(401, "A valid viewer key is required: send Authorization: Bearer <key>.")
        if not viewer.is_admin:
            return _error(403, "Ad-hoc SQL needs a global admin key.")
    fmt = request.args.get("format", "JSON")
    if not _FORMAT.match(fmt):
        return _error(400, "The format must be a ClickHouse output format name such as JSON or TSV.")
    query = _query_text()
    if not query:
        return _error(400, "Send the SQL as the body, or as {\"query\": \"...\"}.")
    if "\x00" in query:
        # The embedded engine reads the text as a C string: whatever follows a NUL would silently not run.
        return _error(400, "The query must not contain NUL characters.")
    try:
        result = rt.store.adhoc_sql(query, fmt)
    except QueryRefused as exc:
        return _error(400, str(exc))
    except StorageError:  # the server is away (its message names it, so the log has it from the writer)
        return _error(503, "ClickHouse did not answer; try again shortly.")
    own = _OWN_FORMAT.search(query)
    if (own.group(1) if own else fmt).lower() not in _JSON_DOCUMENTS:
        return Response(result, content_type="text/plain; charset=utf-8")
    if not result.strip():
        # chDB answers nothing instead of a syntax error for text it cannot start to read (e.g. a
        # non-ASCII first letter); a statement that ran always prints a JSON document here.
        return _error(400, "ClickHouse ran no statement: the text is not a query it could read.")
    return Response(result, content_type="application/json")


def _query_text() -> str:
    if request.mimetype == "application/json":
        payload = request.get_json(silent=True)
        if isinstance(payload, dict) and isinstance(payload.get("query"), str):
            return payload["query"].strip()
        return ""
    return request.get_data(as_text=True).strip()

