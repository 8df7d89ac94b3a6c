"""GET /api/v1/usage: the Usage Dashboard's numbers. Parses parameters, checks access, serialises;
the numbers come from :mod:`exporter.usage`."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone

from clickhouse_connect.driver.exceptions import OperationalError
from flask import Blueprint, current_app, jsonify, request, session

from ..access import ALL_ORGS, UNAUTHENTICATED, AccessDenied, usage_scope
from ..app import runtime
from ..records import MAX_STRING_CHARS
from ..storage import StorageError
from ..usage import TIMEFRAMES, TOP_SIZES, UsageQuery, Visibility, as_json, usage

log = logging.getLogger(__name__)

bp = Blueprint("api", __name__)


class BadParameter(ValueError):
    """A query parameter the API cannot use; the message is the answer's one sentence."""


@dataclass(frozen=True)
class UsageParams:
    org: str | None
    token: str | None
    timeframe: str
    top: int


def _name(args: Mapping[str, str], key: str, what: str) -> str | None:
    value = args.get(key)
    if value is None:
        return None
    if not value or len(value) > MAX_STRING_CHARS:
        raise BadParameter(f"{key} must be {what} of 1 to {MAX_STRING_CHARS} characters.")
    return value


def parse_params(args: Mapping[str, str]) -> UsageParams:
    """The query string as a usage request; BadParameter names the first unusable value."""
    timeframe = args.get("timeframe", "1d")
    if timeframe not in TIMEFRAMES:
        raise BadParameter(f"timeframe must be one of {', '.join(TIMEFRAMES)}.")
    top_text = args.get("top", "10")
    if top_text not in {str(n) for n in TOP_SIZES}:
        raise BadParameter(f"top must be one of {', '.join(map(str, TOP_SIZES))}.")
    org = _name(args, "org", f"{ALL_ORGS!r} or an organization name")
    token = _name(args, "token", "a token name")
    return UsageParams(org=org, token=token, timeframe=timeframe, top=int(top_text))


def _error(status: int, message: str):
    response = jsonify(error=message)
    response.status_code = status
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="usage-exporter"'
    return response


@bp.get("/api/v1/usage")
def get_usage():
    rt = runtime(current_app)
    # Bearer header, or the built-in page's login session; the key itself is never logged.
    viewer = rt.viewers.authenticate_request(request.headers.get("Authorization"), session)
    # A missing key is 401 before anything else; then malformed parameters (400), then scope (403).
    try:
        if viewer is None:
            raise AccessDenied(401, UNAUTHENTICATED)
        params = parse_params(request.args)
        scope = usage_scope(viewer, params.org)
    except AccessDenied as exc:
        return _error(exc.status, exc.message)
    except BadParameter as exc:
        return _error(400, str(exc))
    if params.token is not None and scope.org is None:
        return _error(400, "A token is chosen within one organization: name the org as well.")
    query = UsageQuery(
        org=scope.org,
        token=params.token,
        timeframe=params.timeframe,
        top=params.top,
        visibility=Visibility(scope.email, scope.teams) if scope.email is not None else None,
    )
    now = datetime.fromtimestamp(current_app.extensions["clock"](), timezone.utc)
    try:
        rt.store.ensure_migrated()
        report = usage(
            rt.store,
            rt.store.database,
            query,
            now=now,
            tz=rt.config.timezone,
            catalog=[model.name for model in rt.config.models],
        )
    except (StorageError, OperationalError, OSError) as exc:  # ClickHouse away; a bad query stays a 500
        log.warning("usage query failed: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return _error(503, "ClickHouse did not answer the usage query; try again shortly.")
    response = jsonify(as_json(report))
    # Per-viewer numbers: no shared cache may keep them.
    response.headers["Cache-Control"] = "private, no-store"
    return response
