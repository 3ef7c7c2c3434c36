"""One suite for both directories (memory, and Redis against a private server): the key
lifecycle, unique names, assignment overrides, a second client seeing the first's writes, and
a frozen server raising StateUnavailable within the deadline."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from gateway.directory import Directory, MemoryDirectory, StoredKey
from gateway.directory_redis import RedisDirectory
from gateway.record_store import connect_redis
from gateway.settings import Budget
from gateway.state import StateUnavailable
from tests.redis_server import RedisServer

SHA_A, SHA_B = "a" * 64, "b" * 64


@pytest.fixture(params=["memory", "redis"])
async def pair(
    request: pytest.FixtureRequest, prefix: str
) -> AsyncIterator[tuple[Directory, Directory]]:
    """A directory and a peer on the same state (for Redis: another client, another worker)."""
    if request.param == "memory":
        store = MemoryDirectory()
        yield store, store
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    client, other = connect_redis(server.url), connect_redis(server.url)
    try:
        yield RedisDirectory(client, prefix), RedisDirectory(other, prefix)
    finally:
        await client.aclose()
        await other.aclose()


def key(name: str = "app-b", sha: str = SHA_A, **fields: object) -> StoredKey:
    return StoredKey(name=name, sha256=sha, created=1_767_225_600.5, **fields)  # type: ignore[arg-type]


async def test_a_stored_key_comes_back_whole(pair: tuple[Directory, Directory]) -> None:
    store, peer = pair
    full = key(routes=["ok"], rpm=10, tpm=1000, budget=Budget(usd=2.5, per="hour"))
    assert await store.put_key(full)
    assert await peer.get_key(SHA_A) == full
    assert await peer.get_key(SHA_B) is None


async def test_keys_are_listed_by_name(pair: tuple[Directory, Directory]) -> None:
    store, peer = pair
    assert await peer.list_keys() == []
    await store.put_key(key("zeta", SHA_A))
    await store.put_key(key("alpha", SHA_B))
    assert [k.name for k in await peer.list_keys()] == ["alpha", "zeta"]


async def test_a_name_belongs_to_one_hash(pair: tuple[Directory, Directory]) -> None:
    store, peer = pair
    assert await store.put_key(key("app-b", SHA_A))
    assert not await peer.put_key(key("app-b", SHA_B))
    assert await peer.get_key(SHA_B) is None
    assert await peer.put_key(key("app-b", SHA_A, rpm=5))  # the same hash may be rewritten
    found = await store.get_key(SHA_A)
    assert found is not None and found.rpm == 5


async def test_a_disabled_key_stays_listed_and_disabled(pair: tuple[Directory, Directory]) -> None:
    store, peer = pair
    await store.put_key(key(rpm=3))
    assert await peer.disable_key("app-b")
    found = await store.get_key(SHA_A)
    assert found is not None and found.disabled and found.rpm == 3
    assert [k.disabled for k in await store.list_keys()] == [True]
    assert not await store.disable_key("nobody")


async def test_assignments_are_set_read_and_deleted(pair: tuple[Directory, Directory]) -> None:
    store, peer = pair
    assert await peer.get_assignment("split", "alice") is None
    await store.set_assignment("split", "alice", "ft")
    await store.set_assignment("other", "alice", "prompted")
    assert await peer.get_assignment("split", "alice") == "ft"
    assert await peer.get_assignment("split", "bob") is None
    await peer.set_assignment("split", "alice", "prompted")
    assert await store.get_assignment("split", "alice") == "prompted"
    assert await store.delete_assignment("split", "alice")
    assert not await store.delete_assignment("split", "alice")
    assert await peer.get_assignment("split", "alice") is None
    assert await peer.get_assignment("other", "alice") == "prompted"


async def test_a_frozen_redis_raises_unavailable_within_the_deadline(
    redis_server: RedisServer, prefix: str
) -> None:
    client = connect_redis(redis_server.url)
    store = RedisDirectory(client, prefix, deadline_s=0.2)
    try:
        await store.put_key(key())
        with redis_server.paused():
            for call in (store.get_key(SHA_A), store.get_assignment("split", "alice")):
                started = time.monotonic()
                with pytest.raises(StateUnavailable):
                    await call
                assert time.monotonic() - started < 0.6
    finally:
        await client.aclose()
