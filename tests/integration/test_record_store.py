"""Record stores against a real (private) Redis: one suite for memory and Redis, the write-behind
under a stalled server, and a gateway that keeps its records in Redis and a JSON-lines file."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from redis.asyncio import Redis

from gateway.errors import TurnoutError
from gateway.record_store import MemoryRecordStore, RecordStore, RedisRecordStore, connect_redis
from gateway.records import Latency, RequestRecord
from tests.integration.conftest import ADMIN_KEY, Upstreams, base_config, running
from tests.redis_server import RedisServer

USER = [{"role": "user", "content": "my secret refund question"}]
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def _record(request_id: str, time: float = 0.0, **fields: Any) -> RequestRecord:
    return RequestRecord(
        request_id=request_id, route="r", variant="v", upstream="u", tuning="prompted",
        endpoint="/chat/completions", stream=False, status=200, time=time,
        latency=Latency(total=0.1), **fields,
    )  # fmt: skip


class Backend:
    """Opens stores of one kind; `reopen` flushes a store and returns a fresh reader of its data
    (for memory the store itself: its data lives in the instance)."""

    def __init__(self, client: Redis | None, prefix: str) -> None:
        self.client, self.prefix = client, prefix
        self.opened: list[RecordStore] = []

    async def open(self, capacity: int = 100) -> RecordStore:
        store: RecordStore = MemoryRecordStore(capacity)
        if self.client is not None:
            store = RedisRecordStore(self.client, self.prefix, capacity)
        await store.start()
        self.opened.append(store)
        return store

    async def reopen(self, store: RecordStore, capacity: int = 100) -> RecordStore:
        if isinstance(store, MemoryRecordStore):
            return store
        await store.aclose()
        return await self.open(capacity)


@pytest.fixture(params=["memory", "redis"])
def redis_or_none(request: pytest.FixtureRequest) -> Redis | None:
    return request.getfixturevalue("redis_client") if request.param == "redis" else None


@pytest.fixture
async def backend(redis_or_none: Redis | None, prefix: str) -> AsyncIterator[Backend]:
    backend = Backend(redis_or_none, prefix)
    yield backend
    for store in backend.opened:
        await store.aclose()


async def test_get_finds_a_record_by_id(backend: Backend) -> None:
    store = await backend.open()
    records = [_record(f"id-{i}", time=float(i)) for i in range(3)]
    for record in records:
        store.add(record)
    store = await backend.reopen(store)
    assert await store.get("id-1") == records[1]
    assert await store.get("unknown") is None


async def test_recent_lists_the_newest_last_up_to_limit(backend: Backend) -> None:
    store = await backend.open()
    for i in range(5):
        store.add(_record(f"id-{i}"))
    store = await backend.reopen(store)
    assert [r.request_id for r in await store.recent(3)] == ["id-2", "id-3", "id-4"]
    assert len(await store.recent(100)) == 5
    assert await store.recent(0) == []


async def test_recent_since_filters_on_arrival_time_in_recorded_order(backend: Backend) -> None:
    store = await backend.open()
    now = time.time()
    for name, arrived in [("slow", now - 30), ("old", now - 3600), ("new", now - 1)]:
        store.add(_record(name, time=arrived))
    store = await backend.reopen(store)
    assert [r.request_id for r in await store.recent(10, since=now - 60)] == ["slow", "new"]
    assert [r.request_id for r in await store.recent(1, since=now - 60)] == ["new"]
    assert await store.recent(10, since=now + 60) == []


async def test_capacity_keeps_the_newest(backend: Backend) -> None:
    store = await backend.open(capacity=3)
    for i in range(5):
        store.add(_record(f"id-{i}"))
    store = await backend.reopen(store, capacity=3)
    assert [r.request_id for r in await store.recent(10)] == ["id-2", "id-3", "id-4"]


async def test_content_is_absent_unless_the_record_has_it(backend: Backend) -> None:
    store = await backend.open()
    content: dict[str, object] = {"request": {"messages": USER}, "response": "ok"}
    store.add(_record("plain"))
    store.add(_record("with-content", content=content))
    store = await backend.reopen(store)
    plain = await store.get("plain")
    assert plain is not None and plain.content is None
    kept = await store.get("with-content")
    assert kept is not None and kept.content == content


async def test_close_flushes_pending_writes(backend: Backend) -> None:
    store = await backend.open(capacity=5000)
    for i in range(2500):  # several write batches, several read pages
        store.add(_record(f"id-{i}"))
    store = await backend.reopen(store, capacity=5000)  # closes at once, without waiting first
    assert [r.request_id for r in await store.recent(5000)] == [f"id-{i}" for i in range(2500)]
    assert [r.request_id for r in await store.recent(1500)] == [
        f"id-{i}" for i in range(1000, 2500)
    ]


async def test_redis_keys_are_a_capped_stream_and_expiring_ids(
    redis_client: Redis, prefix: str
) -> None:
    store = RedisRecordStore(redis_client, prefix, capacity=10, lookup_ttl_s=3600)
    await store.start()
    store.add(_record("a"))
    await store.aclose()
    assert await redis_client.xlen(f"{prefix}records") == 1
    assert 0 < await redis_client.ttl(f"{prefix}record:a") <= 3600
    raw = await redis_client.get(f"{prefix}record:a")
    assert msgspec.json.decode(raw, type=RequestRecord) == _record("a")


async def test_add_returns_at_once_while_redis_is_stopped(
    redis_server: RedisServer, redis_client: Redis, prefix: str
) -> None:
    store = RedisRecordStore(redis_client, prefix, capacity=1000, queue_size=50)
    await store.start()
    await redis_client.ping()  # connected before the server stops
    with redis_server.paused():
        started = time.perf_counter()
        for i in range(200):
            store.add(_record(f"id-{i}"))
        elapsed = time.perf_counter() - started
        await asyncio.sleep(0.1)  # the writer has sent its batch and waits for the stopped server
    assert elapsed < 0.05, elapsed  # far below the 0.5 s socket timeout
    assert store.writer.dropped == 150  # the queue kept the newest 50
    await store.aclose()  # resumed in time: the batch in flight is written
    reader = RedisRecordStore(redis_client, prefix, capacity=1000)
    assert [r.request_id for r in await reader.recent(1000)] == [f"id-{i}" for i in range(150, 200)]
    assert store.writer.failed == 0


async def test_an_unreachable_redis_costs_records_never_errors(prefix: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = connect_redis(f"redis://127.0.0.1:{port}/0")  # nothing listens there
    try:
        store = RedisRecordStore(client, prefix)
        await store.start()
        store.add(_record("lost"))
        await store.aclose()
        assert (store.writer.failed, store.writer.written) == (1, 0)
        with pytest.raises(TurnoutError, match="unavailable"):
            await store.get("lost")
    finally:
        await client.aclose()


def _config(upstreams: Upstreams, redis_url: str, prefix: str, file: Path | None) -> Any:
    config = base_config(upstreams)
    config["state"] = {"redis_url": redis_url, "key_prefix": prefix}
    config["records"] = {"file": str(file)} if file else {}
    return config


async def _chat(client: httpx.AsyncClient, model: str, *, stream: bool = False) -> str:
    body = {"model": model, "messages": USER, "stream": stream}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code in (200, 502), response.text
    return response.headers["x-request-id"]


async def test_gateway_keeps_records_in_redis_and_the_file(
    upstreams: Upstreams,
    redis_server: RedisServer,
    redis_client: Redis,
    prefix: str,
    tmp_path: Path,
) -> None:
    file = tmp_path / "records.jsonl"
    config = _config(upstreams, redis_server.url, prefix, file)
    with running(config) as (url, _):
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            ids = [await _chat(client, "ok", stream=i % 2 == 1) for i in range(6)]
            ids.append(await _chat(client, "error-500"))
            answer = await client.get(f"/turnout/requests/{ids[0]}", headers=ADMIN)
            assert answer.status_code == 200 and answer.json()["request_id"] == ids[0]
            assert (await client.get(f"/turnout/requests/{ids[0]}")).status_code == 403
            missing = await client.get("/turnout/requests/nope", headers=ADMIN)
            assert missing.status_code == 404
    # The gateway has stopped and flushed: a fresh store reads what it wrote.
    reader = RedisRecordStore(redis_client, prefix)
    assert [r.request_id for r in await reader.recent(100)] == ids
    failed = await reader.get(ids[-1])
    assert failed is not None and failed.status == 502
    lines = file.read_bytes().splitlines()
    assert [msgspec.json.decode(line, type=RequestRecord).request_id for line in lines] == ids
    stored = b"".join(await redis_client.mget([f"{prefix}record:{i}" for i in ids]))
    for kept in (stored, file.read_bytes()):
        assert b"secret refund" not in kept and b'"content"' not in kept


async def test_another_replica_answers_from_redis(
    upstreams: Upstreams, redis_server: RedisServer, prefix: str
) -> None:
    config = _config(upstreams, redis_server.url, prefix, None)
    with running(config) as (first, _), running(config) as (second, _):
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.post(
                first + "/v1/chat/completions", json={"model": "ok", "messages": USER}
            )
            request_id = response.headers["x-request-id"]
            answer = await _poll(client, f"{second}/turnout/requests/{request_id}")
    assert answer.status_code == 200 and answer.json()["variant"] == "ok"


async def _poll(client: httpx.AsyncClient, url: str) -> httpx.Response:
    """The other replica sees a record once the first one's writer has sent it (milliseconds)."""
    deadline = time.monotonic() + 5
    while True:
        response = await client.get(url, headers=ADMIN)
        if response.status_code != 404 or time.monotonic() > deadline:
            return response
        await asyncio.sleep(0.01)


async def test_a_stopped_redis_does_not_slow_requests_or_lookups(
    upstreams: Upstreams, redis_server: RedisServer, redis_client: Redis, prefix: str
) -> None:
    config = _config(upstreams, redis_server.url, prefix, None)
    with running(config) as (url, _):
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            await _chat(client, "ok")  # the gateway's Redis connection is open
            with redis_server.paused():
                started = time.perf_counter()
                request_id = await _chat(client, "ok")
                answer = await client.get(f"/turnout/requests/{request_id}", headers=ADMIN)
                elapsed = time.perf_counter() - started
    assert answer.status_code == 200  # from this process's memory, at once
    assert elapsed < 0.4, elapsed  # a wait on Redis would take its 0.5 s socket timeout
    store = RedisRecordStore(redis_client, prefix)
    for _ in range(20):  # the write-behind lands once Redis runs again (read may time out once)
        with contextlib.suppress(Exception):
            if await store.get(request_id) is not None:
                return
        await asyncio.sleep(0.1)
    raise AssertionError("the record never reached Redis")
