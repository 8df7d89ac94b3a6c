"""GET /: the built-in Usage page, a browser view of ``GET /api/v1/usage`` and nothing else.

When viewer keys are configured, ``/`` shows a login form until the browser holds a session: a
signed cookie (``HttpOnly``, ``SameSite=Strict``) carrying the SHA-256 of the key, which
``/api/v1/usage`` accepts in place of a Bearer header (:meth:`ViewerDirectory.authenticate_request`).
With no keys there is no login: everyone is a global admin, as on the API.
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from urllib.parse import urlsplit

from flask import Blueprint, Response, current_app, redirect, render_template, request, session
from flask.blueprints import BlueprintSetupState

from ..access import SESSION_FIELD, Viewer
from ..app import runtime

bp = Blueprint("page", __name__)

# Everything the page loads comes from the exporter itself: no CDN, no inline script.
_CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


@bp.record_once
def _configure_sessions(state: BlueprintSetupState) -> None:
    """The page is the only user of Flask's session, so it sets the session cookie up."""
    app = state.app
    page = runtime(app).config.page
    app.secret_key = page.session_secret or secrets.token_hex(32)
    app.config.update(
        SESSION_COOKIE_NAME="usage_exporter_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_SECURE=page.secure_cookie,
        PERMANENT_SESSION_LIFETIME=timedelta(hours=page.session_hours),
    )


@bp.after_request
def _page_headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = _CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    # The page names the viewer's role and org: never keep it in a shared cache.
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/")
def index():
    rt = runtime(current_app)
    viewer = rt.viewers.authenticate_request(request.headers.get("Authorization"), session)
    if viewer is None:
        return _login_form(next_url=request.full_path.rstrip("?"))
    return render_template(
        "page.html",
        viewer=viewer,
        who=_describe(viewer),
        keys_configured=not rt.viewers.open,
        timezone=rt.config.timezone,
    )


@bp.post("/login")
def login():
    rt = runtime(current_app)
    next_url = _safe_next(request.form.get("next"))
    if not _same_origin():
        return _login_form(next_url, "The login form must be sent from this exporter's own page.", 403)
    if rt.viewers.open:
        return redirect(next_url, code=303)
    stored = rt.viewers.session_value(request.form.get("key", "").strip())
    if stored is None:
        return _login_form(next_url, "That is not a valid viewer key.", 401)
    session.clear()
    session[SESSION_FIELD] = stored
    session.permanent = True
    return redirect(next_url, code=303)


@bp.post("/logout")
def logout():
    if not _same_origin():
        return _login_form("/", "The logout form must be sent from this exporter's own page.", 403)
    session.clear()
    return redirect("/", code=303)


def _login_form(next_url: str, error: str | None = None, status: int = 200):
    return render_template("login.html", next_url=next_url, error=error), status


def _describe(viewer: Viewer) -> str:
    if viewer.role == "admin":
        return "global admin"
    if viewer.role == "org":
        return f"org key for {viewer.org}"
    return f"{viewer.email} ({viewer.org})"


def _safe_next(value: str | None) -> str:
    """Only a path on this exporter, so the login cannot be turned into an open redirect."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return "/"
    return value


def _same_origin() -> bool:
    """A login or logout posted from another site is forged: browsers say where a POST comes from."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("Origin")
    return origin is None or urlsplit(origin).netloc == request.host
