"""Operations: /metrics, /healthz, /readyz."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify, request

from ..app import runtime

bp = Blueprint("ops", __name__)


@bp.get("/metrics")
def metrics():
    body, content_type = runtime(current_app).metrics.render(request.headers.get("Accept"))
    return Response(body, content_type=content_type)


@bp.get("/healthz")
def healthz():
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz():
    rt = runtime(current_app)
    problems = []
    if rt.draining:
        problems.append("the exporter is shutting down")
    store_problem = rt.store.ping()
    if store_problem:
        problems.append(store_problem)
    spool = rt.spool
    if spool.refusing or spool.pending_bytes >= spool.max_bytes * 0.9:
        problems.append(f"the durable buffer is full ({spool.pending_bytes} of {spool.max_bytes} bytes, or its disk)")
    writer_status = rt.writer.status
    if writer_status.consecutive_failures:
        problems.append(f"the last {writer_status.consecutive_failures} inserts into ClickHouse failed ({writer_status.last_error})")
    if not rt.writer.alive and not rt.draining:
        problems.append("the writer thread is not running")
    status = rt.writer.status
    body = {
        "status": "ready" if not problems else "not ready",
        "problems": problems,
        "spool": {"records": spool.pending_rows, "bytes": spool.pending_bytes, "oldest_age_s": round(spool.oldest_age(), 3)},
        "writer": {
            "last_error": status.last_error,
            "last_error_at": status.last_error_at,
            "last_success_at": status.last_success_at,
            "consecutive_failures": status.consecutive_failures,
        },
    }
    if problems:
        body["error"] = "Not ready: " + "; ".join(problems) + "."
    return jsonify(body), (200 if not problems else 503)
