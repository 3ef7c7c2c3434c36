"""Client keys: bearer tokens checked against configured sha256 hashes in constant time, then
against the run-time keys of the directory through a short-lived local cache.

Policy (the directory's store is shared, and may be away): a run-time key's entry, found or
not, is trusted for `FRESH_S` (under a second, so a key disabled on one replica stops working
on every replica within a second). Past that the store is asked again; when it does not answer,
a key seen to be valid within `STALE_S` keeps working from the cache, and any other token gets
503 (`state_unavailable`): the gateway cannot tell a new key from a wrong one.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Sequence

from gateway.directory import Directory, MemoryDirectory
from gateway.errors import Forbidden, ServiceUnavailable, Unauthorized
from gateway.settings import Key
from gateway.state import StateUnavailable

FRESH_S = 0.5  # a cached lookup (found or not) is used without asking the store
STALE_S = 10.0  # with the store away, a key seen valid this recently still works
CACHE_SIZE = 10_000  # entries at most; the oldest go first
ADMIN_KEY_ENV = "TURNOUT_ADMIN_KEY"  # where the CLI looks for the admin key by default


class KeyRing:
    """The keys a gateway accepts. With no keys configured the gateway is open (key is None)."""

    def __init__(
        self,
        keys: Sequence[Key],
        directory: Directory | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._keys = {bytes.fromhex(k.sha256): k for k in keys}
        self.directory: Directory = directory or MemoryDirectory()  # start() may replace it
        self.on_fallback: Callable[[str], None] = lambda feature: None
        self._clock = clock
        self._cache: dict[str, tuple[Key | None, float]] = {}  # sha256 -> (key, fetched at)
        self._store_away_until = 0.0  # after a failure, spare requests the store's deadline

    @property
    def open(self) -> bool:
        """No configured keys: anyone may call (run-time keys are then refused at creation)."""
        return not self._keys

    def configured(self, name: str) -> bool:
        return any(k.name == name for k in self._keys.values())

    async def authenticate(self, authorization: str | None) -> Key | None:
        """The caller's key, None on an open gateway, 401, or 503 (see the module docstring)."""
        if self.open:
            return None
        token = _bearer(authorization)
        if token is None:
            raise Unauthorized("Missing API key: send `Authorization: Bearer <key>`.")
        digest = hashlib.sha256(token.encode()).digest()
        key = self._match(digest)
        if key is None:
            key = await self._runtime(digest.hex())
        if key is None or key.disabled:
            raise Unauthorized("Incorrect API key provided.")
        return key

    async def _runtime(self, sha: str) -> Key | None:
        now = self._clock()
        cached = self._cache.get(sha)
        if cached is not None and now - cached[1] < FRESH_S:
            return cached[0]
        try:
            if now < self._store_away_until:
                raise StateUnavailable("The state store was unavailable a moment ago.")
            stored = await self.directory.get_key(sha)
        except StateUnavailable:
            self._store_away_until = self._clock() + FRESH_S
            self.on_fallback("auth")
            if cached is not None and cached[0] is not None and now - cached[1] < STALE_S:
                return cached[0]
            raise ServiceUnavailable(
                "The key store is unavailable and this key was not seen recently."
            ) from None
        key = stored.as_key() if stored is not None else None
        self._remember(sha, key, now)
        return key

    def _remember(self, sha: str, key: Key | None, now: float) -> None:
        self._cache.pop(sha, None)  # re-inserted last: the dict's order is the age order
        self._cache[sha] = (key, now)
        while len(self._cache) > CACHE_SIZE:
            del self._cache[next(iter(self._cache))]

    def _match(self, digest: bytes) -> Key | None:
        """A dict lookup by the token's sha256: what it could leak through timing is about the
        hash, and a hash reveals nothing usable about a token (nor does a near miss), so
        comparing in constant time against every key (O(keys) per request) buys nothing."""
        return self._keys.get(digest)


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
