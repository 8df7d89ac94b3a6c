"""POST /v1/requests: validate, make durable, count, answer."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from ..access import bearer_token, token_matches
from ..records import BodyError, encode_rows, parse_body
from ..spool import SpoolFull
from ..app import runtime

bp = Blueprint("ingest", __name__)

JSON_TYPES = {"application/json", ""}
NDJSON_TYPES = {"application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines", "application/jsonlines"}
RETRY_AFTER_S = "5"


def _error(status: int, message: str, reason: str):
    runtime(current_app).metrics.records_rejected.labels(reason).inc()
    response = jsonify(error=message)
    response.status_code = status
    return response


@bp.post("/v1/requests")
def ingest():
    rt = runtime(current_app)
    if rt.ingest_token_digests:
        token = bearer_token(request.headers.get("Authorization"))
        if token is None or token_matches(token, rt.ingest_token_digests) is None:
            response = _error(401, "A valid ingest token is required: send Authorization: Bearer <token>.", "unauthorized")
            response.headers["WWW-Authenticate"] = 'Bearer realm="usage-exporter"'
            return response
    if rt.draining:
        response = _error(503, "The exporter is shutting down; retry against another instance or later.", "buffer_full")
        response.headers["Retry-After"] = RETRY_AFTER_S
        return response
    mimetype = request.mimetype
    if mimetype not in JSON_TYPES and mimetype not in NDJSON_TYPES:
        return _error(415, "Send the records as application/json or application/x-ndjson.", "unsupported_media_type")
    limit = rt.config.ingest.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        return _error(413, f"The body is larger than the limit of {limit} bytes.", "too_large")
    size = request.content_length or limit  # a chunked body may grow to the limit
    if not rt.inflight.try_acquire(size):
        response = _error(503, "The exporter is at its limit of bodies in progress; retry shortly.", "overloaded")
        response.headers["Retry-After"] = "1"
        return response
    try:
        return _accept(rt, mimetype)
    finally:
        rt.inflight.release(size)


def _accept(rt, mimetype: str):
    body = request.get_data(cache=False)
    try:
        parsed = parse_body(body, ndjson=mimetype in NDJSON_TYPES, max_records=rt.config.ingest.max_records)
    except BodyError as exc:
        return _error(400, str(exc), "invalid_body")
    rejected = [{"index": r.index, "error": r.error} for r in parsed.rejected]
    if parsed.rejected:
        rt.metrics.records_rejected.labels("invalid_record").inc(len(parsed.rejected))
    if not parsed.rows:
        return jsonify(accepted=0, rejected=rejected), 400
    try:
        rt.spool.append(encode_rows(parsed.rows), len(parsed.rows))
    except SpoolFull as exc:
        rt.metrics.records_rejected.labels("buffer_full").inc(len(parsed.rows))
        response = jsonify(error=f"{str(exc)[0].upper()}{str(exc)[1:]}; retry later.")
        response.status_code = 503
        response.headers["Retry-After"] = RETRY_AFTER_S
        return response
    rt.metrics.records_accepted.inc(len(parsed.rows))
    rt.metrics.observe_rows(parsed.rows)
    return jsonify(accepted=len(parsed.rows), rejected=rejected), 202
