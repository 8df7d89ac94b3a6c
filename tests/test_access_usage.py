"""Who may ask GET /api/v1/usage for what: 401 without a valid key, 403 outside the key's scope,
400 for parameters the API cannot use, and keys that never reach the log."""

from __future__ import annotations

import hashlib
import logging

import pytest

from exporter.access import AccessDenied, UsageScope, Viewer, usage_scope

ADMIN, ORG, USER = "adm-7f3c9a", "org-2b8e41", "usr-5d0c66"
VIEWERS = [
    {"key": ADMIN, "role": "admin"},
    # Stored as its SHA-256 only: the config need not hold the key itself.
    {"key_sha256": hashlib.sha256(ORG.encode()).hexdigest(), "role": "org", "org": "acme"},
    {"key": USER, "role": "user", "org": "acme", "email": "jane@acme.org", "teams": ["ml-team", ""]},
]


@pytest.fixture
def app(make_app):
    return make_app(viewers=VIEWERS, models=[{"name": "gpt-4o"}])


def get(app, key=None, authorization=None, **params):
    headers = {}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    if authorization is not None:
        headers["Authorization"] = authorization
    return app.test_client().get("/api/v1/usage", query_string=params, headers=headers)


def test_scope_rules_for_each_role():
    admin = Viewer(role="admin")
    assert usage_scope(admin, None) == UsageScope(org=None)
    assert usage_scope(admin, "all") == UsageScope(org=None)
    assert usage_scope(admin, "globex") == UsageScope(org="globex")
    org = Viewer(role="org", org="acme")
    assert usage_scope(org, None) == usage_scope(org, "acme") == UsageScope(org="acme")
    user = Viewer(role="user", org="acme", email="jane@acme.org", teams=("ml-team", ""))
    assert usage_scope(user, None) == UsageScope(org="acme", email="jane@acme.org", teams=("ml-team",))
    for viewer in (org, user):
        for other in ("all", "globex", "ACME"):
            with pytest.raises(AccessDenied) as denied:
                usage_scope(viewer, other)
            assert denied.value.status == 403
    with pytest.raises(AccessDenied) as denied:
        usage_scope(None, None)
    assert denied.value.status == 401


def test_missing_or_wrong_key_is_401_before_anything_else(app):
    # The stored SHA-256 itself is not a key.
    for authorization in (None, "Bearer", "Bearer ", "Basic " + ADMIN, "Bearer wrong-key", f"Bearer {ADMIN}x",
                          "Bearer " + hashlib.sha256(ORG.encode()).hexdigest()):
        answer = get(app, authorization=authorization, timeframe="nonsense")
        assert answer.status_code == 401, authorization
        assert answer.json == {"error": "A valid viewer key is required: send Authorization: Bearer <key>."}
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")


def test_each_role_reaches_exactly_its_scope(app):
    for org in ("all", "acme", "globex"):
        assert get(app, ADMIN, org=org).status_code == 200
    assert get(app, ADMIN).json["scope"]["org"] == "all"
    for key in (ORG, USER):
        assert get(app, key).json["scope"]["org"] == "acme"
        assert get(app, key, org="acme", token="t").json["scope"] == {"org": "acme", "token": "t", "timeframe": "1d", "top_kind": "user_id"}
        for org in ("all", "globex"):
            answer = get(app, key, org=org)
            assert answer.status_code == 403
            assert answer.json == {"error": "This key may only see its own organization."}


BAD_PARAMETERS = [
    ({"timeframe": "2h"}, "timeframe must be one of 1h, 1d, 1w."),
    ({"timeframe": ""}, "timeframe must be one of 1h, 1d, 1w."),
    ({"top": "11"}, "top must be one of 10, 25, 100."),
    ({"top": "ten"}, "top must be one of 10, 25, 100."),
    ({"top": " 10"}, "top must be one of 10, 25, 100."),
    ({"org": ""}, "org must be 'all' or an organization name of 1 to 1024 characters."),
    ({"org": "x" * 1025}, "org must be 'all' or an organization name of 1 to 1024 characters."),
    ({"org": "acme", "token": ""}, "token must be a token name of 1 to 1024 characters."),
    ({"token": "ci"}, "A token is chosen within one organization: name the org as well."),
    ({"org": "all", "token": "ci"}, "A token is chosen within one organization: name the org as well."),
]


def test_bad_parameters_are_400_with_one_sentence(app):
    for params, message in BAD_PARAMETERS:
        answer = get(app, ADMIN, **params)
        assert answer.status_code == 400, params
        assert answer.json == {"error": message}


def test_bad_parameters_come_before_scope(app):
    assert get(app, ORG, org="globex", top="7").status_code == 400


def test_open_exporter_treats_everyone_as_admin(make_app):
    app = make_app()
    answer = get(app, org="anything", token="t", timeframe="1h", top="100")
    assert answer.status_code == 200
    assert answer.json["scope"] == {"org": "anything", "token": "t", "timeframe": "1h", "top_kind": "user_id"}


def test_keys_never_reach_the_log(app, caplog):
    caplog.set_level(logging.DEBUG)
    for key in (ADMIN, ORG, USER, "wrong-guess"):
        get(app, key, org="globex")
        get(app, key, top="3")
    text = "\n".join(r.getMessage() for r in caplog.records)
    for key in (ADMIN, ORG, USER, "wrong-guess"):
        assert key not in text
