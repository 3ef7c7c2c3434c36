"""The directory protocol: client keys added at run time, and sticky assignment overrides.

Two implementations pass one test suite: `MemoryDirectory` (here; one process) and
`RedisDirectory` (gateway/directory_redis.py; every worker and replica sharing one Redis).

Keys are stored by the sha256 of their token (never the token itself), and names are unique:
`put_key` refuses a name already held by another hash. A key is never deleted, only disabled,
so its name stays taken and its limits' history keeps meaning the same key.

Assignments pin `subject` (the route's sticky subject) to `variant` on `route`; without one
the deterministic sticky hash decides, so losing the store never reshuffles anyone.

Any failure or a call past its deadline raises `StateUnavailable` (gateway/state.py); the
caller applies its failure policy (auth: a local cache; assignments: the hash).
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from gateway.settings import Budget, Key


class StoredKey(msgspec.Struct, frozen=True, kw_only=True):
    """A run-time key; `created` in epoch seconds."""

    name: str
    sha256: str
    routes: list[str] | None = None
    rpm: int | None = None
    tpm: int | None = None
    budget: Budget | None = None
    disabled: bool = False
    created: float = 0.0

    def as_key(self) -> Key:
        """The key as the request path sees a configured one."""
        return Key(
            name=self.name,
            sha256=self.sha256,
            routes=self.routes,
            rpm=self.rpm,
            tpm=self.tpm,
            budget=self.budget,
            disabled=self.disabled,
        )


class Directory(Protocol):
    """Run-time keys and assignment overrides shared by everything that uses the same store."""

    async def put_key(self, key: StoredKey) -> bool:
        """Store `key` (replacing the one with its hash); False, storing nothing, when another
        hash already holds its name."""
        ...

    async def get_key(self, sha256: str) -> StoredKey | None: ...

    async def list_keys(self) -> list[StoredKey]:
        """Every stored key, disabled ones included, by name."""
        ...

    async def disable_key(self, name: str) -> bool:
        """Disable the key called `name`; False when there is none."""
        ...

    async def set_assignment(self, route: str, subject: str, variant: str) -> None: ...

    async def get_assignment(self, route: str, subject: str) -> str | None: ...

    async def delete_assignment(self, route: str, subject: str) -> bool:
        """Remove the override; False when there was none."""
        ...


class MemoryDirectory:
    """The directory of one process (see the module docstring for the contract)."""

    def __init__(self) -> None:
        self._keys: dict[str, StoredKey] = {}  # sha256 -> key
        self._names: dict[str, str] = {}  # name -> sha256
        self._assignments: dict[tuple[str, str], str] = {}

    async def put_key(self, key: StoredKey) -> bool:
        holder = self._names.get(key.name)
        if holder is not None and holder != key.sha256:
            return False
        self._names[key.name] = key.sha256
        self._keys[key.sha256] = key
        return True

    async def get_key(self, sha256: str) -> StoredKey | None:
        return self._keys.get(sha256)

    async def list_keys(self) -> list[StoredKey]:
        return sorted(self._keys.values(), key=lambda k: k.name)

    async def disable_key(self, name: str) -> bool:
        sha = self._names.get(name)
        if sha is None:
            return False
        self._keys[sha] = msgspec.structs.replace(self._keys[sha], disabled=True)
        return True

    async def set_assignment(self, route: str, subject: str, variant: str) -> None:
        self._assignments[route, subject] = variant

    async def get_assignment(self, route: str, subject: str) -> str | None:
        return self._assignments.get((route, subject))

    async def delete_assignment(self, route: str, subject: str) -> bool:
        return self._assignments.pop((route, subject), None) is not None
