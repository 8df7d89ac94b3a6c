"""The Usage page's server side, in process: the login session, its cookie, and what / serves.

The browser tests (test_page_browser.py) drive the page itself; these pin the HTTP contract the
page relies on, quickly and without a browser.
"""

from __future__ import annotations

import hashlib
import re
import time
from importlib import resources

import pytest

from exporter.access import SESSION_FIELD
from exporter.web.page import _safe_next

from .conftest import flush

ADMIN = "admin-key-0123456789"
ACME = "acme-org-key-0123456789"
VIEWERS = [{"key": ADMIN, "role": "admin"}, {"key": ACME, "role": "org", "org": "acme"}]


@pytest.fixture
def keyed_app(make_app):
    return make_app(viewers=VIEWERS)


def _login(client, key: str, next_url: str = "/", **headers: str):
    return client.post("/login", data={"key": key, "next": next_url}, headers={"Sec-Fetch-Site": "same-origin", **headers})


def _set_cookie(response) -> str:
    [cookie] = response.headers.getlist("Set-Cookie")
    return cookie


def test_without_viewer_keys_the_page_opens_with_no_login(make_app):
    client = make_app().test_client()
    page = client.get("/")
    html = page.get_data(as_text=True)
    assert page.status_code == 200
    assert 'id="org-select"' in html and 'data-role="admin"' in html
    assert "Viewer key" not in html and "Log out" not in html and "open to everyone" in html
    assert page.headers["Content-Security-Policy"].startswith("default-src 'none'; script-src 'self'")
    assert page.headers["Cache-Control"] == "no-store"
    # Everything the page loads is served by the exporter itself.
    for asset in re.findall(r'(?:src|href)="(/[^"]+)"', html):
        assert client.get(asset).status_code == 200, asset
    assert not re.search(r'(?:src|href)="(?:https?:)?//', html)


def test_with_viewer_keys_the_page_asks_for_one(keyed_app):
    client = keyed_app.test_client()
    page = client.get("/?org=acme&timeframe=1w")
    html = page.get_data(as_text=True)
    assert page.status_code == 200
    assert 'name="key"' in html and 'type="password"' in html and "usage.js" not in html
    # The login returns to the view the link asked for.
    assert 'name="next" value="/?org=acme&amp;timeframe=1w"' in html


def test_a_wrong_key_is_refused_with_one_sentence(keyed_app):
    client = keyed_app.test_client()
    answer = _login(client, "wrong")
    assert answer.status_code == 401
    assert "That is not a valid viewer key." in answer.get_data(as_text=True)
    assert "Set-Cookie" not in answer.headers


def test_a_valid_key_sets_a_strict_httponly_session_holding_no_key(keyed_app):
    client = keyed_app.test_client()
    answer = _login(client, ACME, "/?org=acme&timeframe=1h")
    assert answer.status_code == 303 and answer.headers["Location"] == "/?org=acme&timeframe=1h"
    cookie = _set_cookie(answer)
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Expires=" in cookie
    assert ACME not in cookie
    with client.session_transaction() as session:
        assert session[SESSION_FIELD] == hashlib.sha256(ACME.encode()).hexdigest()
    page = client.get("/").get_data(as_text=True)
    assert 'data-role="org"' in page and 'data-org="acme"' in page
    assert 'id="org-select"' not in page and "org key for acme" in page and "Log out" in page


def test_logins_and_logouts_from_other_sites_are_refused(keyed_app):
    client = keyed_app.test_client()
    assert _login(client, ADMIN, **{"Sec-Fetch-Site": "cross-site"}).status_code == 403
    answer = client.post("/login", data={"key": ADMIN}, headers={"Origin": "https://evil.example"})
    assert answer.status_code == 403 and "Set-Cookie" not in answer.headers
    assert _login(client, ADMIN).status_code == 303
    assert client.post("/logout", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert 'data-role="admin"' in client.get("/").get_data(as_text=True)


def test_logout_clears_the_session(keyed_app):
    client = keyed_app.test_client()
    _login(client, ADMIN)
    answer = client.post("/logout", headers={"Sec-Fetch-Site": "same-origin"})
    assert answer.status_code == 303 and answer.headers["Location"] == "/"
    assert 'name="key"' in client.get("/").get_data(as_text=True)


def test_a_session_stops_working_when_its_key_leaves_the_config(make_app, make_config):
    secret = "s" * 32
    first = make_app(viewers=VIEWERS, page={"session_secret": secret})
    client = first.test_client()
    _login(client, ACME)
    cookie = client.get_cookie("usage_exporter_session").value
    # Same secret, the key still configured: the cookie is good on another process (worker).
    again = make_app(viewers=VIEWERS, page={"session_secret": secret}).test_client()
    again.set_cookie("usage_exporter_session", cookie)
    assert 'data-org="acme"' in again.get("/").get_data(as_text=True)
    # The key removed: the same cookie is worth nothing.
    removed = make_app(viewers=VIEWERS[:1], page={"session_secret": secret}).test_client()
    removed.set_cookie("usage_exporter_session", cookie)
    assert 'name="key"' in removed.get("/").get_data(as_text=True)


def test_the_usage_api_accepts_the_page_session(keyed_app):
    client = keyed_app.test_client()
    now = time.time()
    client.post("/v1/requests", json=[
        {"timestamp": now - 60, "org": "acme", "model": "gpt-4o", "status_code": 200},
        {"timestamp": now - 90, "org": "globex", "model": "gpt-4o", "status_code": 500},
    ])
    flush(keyed_app)
    assert client.get("/api/v1/usage").status_code == 401
    _login(client, ACME)
    mine = client.get("/api/v1/usage?timeframe=1h")
    assert mine.status_code == 200, mine.get_data(as_text=True)
    assert mine.json["scope"]["org"] == "acme" and mine.json["metrics"]["total_requests"] == 1
    assert client.get("/api/v1/usage?org=globex").status_code == 403
    # A Bearer header, when sent, wins over the session.
    other = client.get("/api/v1/usage?org=globex&timeframe=1h", headers={"Authorization": f"Bearer {ADMIN}"})
    assert other.status_code == 200 and other.json["metrics"]["failed_requests"] == 1
    assert client.get("/api/v1/usage", headers={"Authorization": "Bearer wrong"}).status_code == 401


@pytest.mark.parametrize(
    ("asked", "safe"),
    [("/?org=acme", "/?org=acme"), ("//evil.example/x", "/"), ("https://evil.example/", "/"),
     ("/\\evil.example", "/"), ("", "/"), (None, "/"), ("relative", "/")],
)
def test_the_login_only_returns_to_paths_on_this_exporter(asked, safe):
    assert _safe_next(asked) == safe


def test_the_page_assets_ship_in_the_package():
    package = resources.files("exporter")
    for name in ("templates/base.html", "templates/page.html", "templates/login.html",
                 "static/usage.js", "static/usage.css", "static/favicon.svg"):
        assert (package / name).is_file(), name
