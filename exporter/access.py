"""Who is asking: viewer keys from the config, compared in constant time, never logged."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
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
    found = None
    for index, allowed in enumerate(allowed_digests):
        if hmac.compare_digest(digest, allowed) and found is None:
            found = index
    return found


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
        if index is None:
            return None
        key = self._keys[index]
        return Viewer(role=key.role, org=key.org, email=key.email, teams=tuple(key.teams))
