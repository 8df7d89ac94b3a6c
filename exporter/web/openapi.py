"""GET /openapi.json: the OpenAPI 3.1 description of this exporter's HTTP API."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from ..app import runtime
from ..openapi import build_openapi

bp = Blueprint("openapi", __name__)


@bp.get("/openapi.json")
def openapi_document():
    # Built per request from the running config: a few hundred microseconds, and nothing to keep in sync.
    return jsonify(build_openapi(runtime(current_app).config))
