"""Client keys: bearer tokens checked against configured sha256 hashes in constant time."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from gateway.errors import Forbidden, Unauthorized
from gateway.settings import Key


class KeyRing:
    """The keys a gateway accepts. With no keys configured the gateway is open (key is None)."""

    def __init__(self, keys: Sequence[Key]) -> None:
        self._keys = {bytes.fromhex(k.sha256): k for k in keys}

    @property
    def open(self) -> bool:
        return not self._keys

    def authenticate(self, authorization: str | None) -> Key | None:
        """The caller's key, None on an open gateway, or 401."""
        if self.open:
            return None
        token = _bearer(authorization)
        if token is None:
            raise Unauthorized("Missing API key: send `Authorization: Bearer <key>`.")
        digest = hashlib.sha256(token.encode()).digest()
        key = self._match(digest)
        if key is None or key.disabled:
            raise Unauthorized("Incorrect API key provided.")
        return key

    def _match(self, digest: bytes) -> Key | None:
        found = None
        for stored, key in self._keys.items():
            if hmac.compare_digest(stored, digest):
                found = key
        return found


def check_admin(authorization: str | None, admin_key: str | None) -> None:
    """Pass with the admin key, else 403 (also when no admin key is configured: endpoints off)."""
    if not admin_key:
        raise Forbidden("Admin endpoints are disabled: no admin key is configured.")
    token = _bearer(authorization) or ""
    if not hmac.compare_digest(token.encode(), admin_key.encode()):
        raise Forbidden("This endpoint needs the admin key.")


def may_call(key: Key | None, route: str) -> bool:
    return key is None or key.routes is None or route in key.routes


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token
