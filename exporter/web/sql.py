"""POST /api/v1/sql: read-only SQL for engineers, for global admins (or loopback when keys are off)."""

from __future__ import annotations

import ipaddress
import re

from flask import Blueprint, Response, current_app, jsonify, request

from ..app import runtime
from ..storage import QueryRefused

bp = Blueprint("sql", __name__)

_FORMAT = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,63}$")


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
    try:
        result = rt.store.adhoc_sql(query, fmt)
    except QueryRefused as exc:
        return _error(400, str(exc))
    content_type = "application/json" if fmt.upper().startswith("JSON") and "EachRow" not in fmt else "text/plain; charset=utf-8"
    return Response(result, content_type=content_type)


def _query_text() -> str:
    if request.mimetype == "application/json":
        payload = request.get_json(silent=True)
        if isinstance(payload, dict) and isinstance(payload.get("query"), str):
            return payload["query"].strip()
        return ""
    return request.get_data(as_text=True).strip()

