"""Who is asking: viewer keys from the config, compared in constant time, never logged."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .config import ViewerKey


@dataclass(frozen=True)
class Viewer:
    role: str  # "admin", "org" or "user"
    org: str | None = None
    email: str | None = None
    teams: tuple[str, ...] = ()

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def token_matches(presented: str, allowed_digests: Sequence[bytes]) -> int | None:
    """Index of the digest ``presented`` hashes to, checking every entry so timing reveals nothing."""
    digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
    return digest_matches(digest, allowed_digests)


def digest_matches(digest: bytes, allowed_digests: Sequence[bytes]) -> int | None:
    """Index of ``digest`` among ``allowed_digests``, in constant time like :func:`token_matches`."""
    found = None
    for index, allowed in enumerate(allowed_digests):
        if hmac.compare_digest(digest, allowed) and found is None:
            found = index
    return found


# The field of the page's login session (a signed cookie) that holds the SHA-256 hex of the viewer
# key: the key itself never leaves the login request, and removing a key from the config ends its
# sessions at the next start.
SESSION_FIELD = "viewer_key_sha256"


class ViewerDirectory:
    """The configured viewer keys; ``None`` from :meth:`authenticate` means "no valid key"."""

    def __init__(self, keys: Sequence[ViewerKey]) -> None:
        self._keys = list(keys)
        self._digests = [key.digest() for key in keys]

    @property
    def open(self) -> bool:
        """No keys configured: every caller is treated as a global admin."""
        return not self._keys

    def authenticate(self, authorization: str | None) -> Viewer | None:
        if self.open:
            return Viewer(role="admin")
        token = bearer_token(authorization)
        if token is None:
            return None
        index = token_matches(token, self._digests)
        return None if index is None else self._viewer(index)

    def authenticate_request(self, authorization: str | None, session: Mapping[str, object]) -> Viewer | None:
        """The viewer of an HTTP request: its Bearer header when it sends one, else the page's login
        session (``flask.session``), so the page's own fetches need no header."""
        if self.open or authorization:
            return self.authenticate(authorization)
        return self.authenticate_digest(session.get(SESSION_FIELD))

    def authenticate_digest(self, hexdigest: object) -> Viewer | None:
        """The viewer whose key hashes to ``hexdigest`` (as stored by :func:`session_value`)."""
        if self.open:
            return Viewer(role="admin")
        if not isinstance(hexdigest, str):
            return None
        try:
            digest = bytes.fromhex(hexdigest)
        except ValueError:
            return None
        index = digest_matches(digest, self._digests)
        return None if index is None else self._viewer(index)

    def session_value(self, key: str) -> str | None:
        """What the login session stores for a valid ``key`` (its SHA-256 hex), ``None`` for a wrong one."""
        if token_matches(key, self._digests) is None:
            return None
        return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()

    def _viewer(self, index: int) -> Viewer:
        key = self._keys[index]
        return Viewer(role=key.role, org=key.org, email=key.email, teams=tuple(key.teams))


# --- who may see which usage numbers ----------------------------------------------------------


class AccessDenied(Exception):
    """The caller may not see what it asked for; ``status`` is 401 (no valid key) or 403."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class UsageScope:
    """What a viewer sees of ``GET /api/v1/usage``: an org (``None`` for all) and, for user keys,
    the record filter (records whose token owner or user id is ``email``, or whose team is in ``teams``)."""

    org: str | None
    email: str | None = None
    teams: tuple[str, ...] = ()


ALL_ORGS = "all"
UNAUTHENTICATED = "A valid viewer key is required: send Authorization: Bearer <key>."


def usage_scope(viewer: Viewer | None, requested_org: str | None) -> UsageScope:
    """Resolve the ``org`` query parameter (``None`` when absent) against the viewer's key.

    A global admin may ask for any org or ``all`` (the default). Org and user keys are pinned to
    their org: no ``org`` means that org, any other value (``all`` included) is refused.
    """
    if viewer is None:
        raise AccessDenied(401, UNAUTHENTICATED)
    if viewer.is_admin:
        return UsageScope(org=None if requested_org in (None, ALL_ORGS) else requested_org)
    if viewer.role not in ("org", "user") or not viewer.org:
        raise AccessDenied(403, "This key does not grant access to usage numbers.")
    if requested_org is not None and requested_org != viewer.org:
        raise AccessDenied(403, "This key may only see its own organization.")
    if viewer.role == "user":
        return UsageScope(org=viewer.org, email=viewer.email or "", teams=tuple(t for t in viewer.teams if t))
    return UsageScope(org=viewer.org)
