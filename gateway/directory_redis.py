"""The directory in Redis: run-time keys and assignment overrides for every worker and replica.

Keys under `prefix`:
- `key:{sha256}`: hash, one field per StoredKey field, each value JSON;
- `keynames`: hash name -> sha256 (the name index; names are unique);
- `assign:{route}`: hash subject -> variant.

Writing a key checks and fills the name index in one Lua script, so two admins creating the
same name at once cannot both win. Any failure or a call past `deadline_s` raises
`StateUnavailable`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.directory import StoredKey
from gateway.state import StateUnavailable
from gateway.state_redis import DEADLINE_S

# KEYS: key hash, name index. ARGV: name, sha256, then field, value pairs. 0: name taken.
PUT_KEY = """
local holder = redis.call('HGET', KEYS[2], ARGV[1])
if holder and holder ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
return 1
"""

# KEYS: name index. ARGV: name, key hash prefix. 0: no such key.
DISABLE_KEY = """
local sha = redis.call('HGET', KEYS[1], ARGV[1])
if not sha then return 0 end
redis.call('HSET', ARGV[2] .. sha, 'disabled', 'true')
return 1
"""


class RedisDirectory:
    """Run-time keys and assignments in Redis (see gateway/directory.py for the contract). The
    client is the caller's; this never closes it."""

    def __init__(self, client: Redis, prefix: str = "turnout:", deadline_s: float = DEADLINE_S):
        self._client = client
        self._prefix = prefix
        self._deadline_s = deadline_s
        self._put_key = client.register_script(PUT_KEY)
        self._disable_key = client.register_script(DISABLE_KEY)

    async def put_key(self, key: StoredKey) -> bool:
        fields = msgspec.structs.asdict(key)
        args = [key.name, key.sha256]
        for name, value in fields.items():
            args += [name, msgspec.json.encode(value).decode()]
        keys = [self._key(key.sha256), self._names]
        return bool(await self._run(self._put_key(keys=keys, args=args), admin=True))

    async def get_key(self, sha256: str) -> StoredKey | None:
        fields = await self._run(self._client.hgetall(self._key(sha256)))
        return _decode(fields) if fields else None

    async def list_keys(self) -> list[StoredKey]:
        index: dict[bytes, bytes] = await self._run(self._client.hgetall(self._names), admin=True)
        if not index:
            return []
        pipe = self._client.pipeline(transaction=False)
        for sha in index.values():
            pipe.hgetall(self._key(sha.decode()))
        found = await self._run(pipe.execute(), admin=True)
        return sorted((_decode(f) for f in found if f), key=lambda k: k.name)

    async def disable_key(self, name: str) -> bool:
        args = [name, self._key("")]
        return bool(await self._run(self._disable_key(keys=[self._names], args=args), admin=True))

    async def set_assignment(self, route: str, subject: str, variant: str) -> None:
        await self._run(self._client.hset(self._assign(route), subject, variant), admin=True)

    async def get_assignment(self, route: str, subject: str) -> str | None:
        found: bytes | None = await self._run(self._client.hget(self._assign(route), subject))
        return None if found is None else found.decode()

    async def delete_assignment(self, route: str, subject: str) -> bool:
        return bool(await self._run(self._client.hdel(self._assign(route), subject), admin=True))

    async def _run(self, call: Awaitable[Any] | Any, *, admin: bool = False) -> Any:
        """Lookups on the request path wait `deadline_s`; admin calls at least DEADLINE_S."""
        """Await a redis-py call (typed as maybe-sync by redis-py; always a coroutine here)."""
        try:
            async with asyncio.timeout(
                max(self._deadline_s, DEADLINE_S) if admin else self._deadline_s
            ):
                return await call
        except (RedisError, TimeoutError, OSError) as exc:
            raise StateUnavailable("The state store is unavailable.") from exc

    @property
    def _names(self) -> str:
        return f"{self._prefix}keynames"

    def _key(self, sha256: str) -> str:
        return f"{self._prefix}key:{sha256}"

    def _assign(self, route: str) -> str:
        return f"{self._prefix}assign:{route}"


def _decode(fields: dict[bytes, bytes]) -> StoredKey:
    values: dict[str, Any] = {k.decode(): msgspec.json.decode(v) for k, v in fields.items()}
    return msgspec.convert(values, StoredKey)
