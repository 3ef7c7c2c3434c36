"""Row 11, rate-limit race and spoofed client addresses: a burst far over a key's limit admits
exactly the limit, however the requests are spread over workers and whatever client address
or identity each one claims (X-Forwarded-For and friends, `user`): the bucket is the key's."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import running
from tests.redis_server import RedisServer
from tests.reliability.gateway_process import serve, workers_serving

CLIENT_KEY = "sk-client-rate-race-0001"
RPM = 20  # a refill every 3 s: a burst that ends sooner admits exactly RPM
TPM = 1000
MAX_TOKENS = 100
BURST = 64


def _config(state: dict[str, Any], **limits: Any) -> dict[str, Any]:
    sha = hashlib.sha256(CLIENT_KEY.encode()).hexdigest()
    return {
        "state": state,
        "upstreams": {"sim": {"kind": "simulated", "ttft_ms": 20, "tokens_per_s": 10_000}},
        "variants": {"v": {"upstream": "sim", "model": "m"}},
        "routes": {"r": {"split": {"v": 1}}},
        "keys": [{"name": "app", "sha256": sha, **limits}],
    }


def _spoofed(i: int) -> dict[str, str]:
    """Request i claims to come from its own client, every way proxies say so."""
    address = f"203.0.113.{i % 250 + 1}"
    return {
        "authorization": f"Bearer {CLIENT_KEY}",
        "x-forwarded-for": f"{address}, 10.0.0.{i % 250 + 1}",
        "x-real-ip": address,
        "forwarded": f"for={address};proto=https",
        "true-client-ip": address,
        "cf-connecting-ip": address,
        "x-client-ip": address,
        "x-request-id": f"spoof-{i}",
    }


def _body(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": "r",
        "messages": [{"role": "user", "content": "hi"}],
        "user": f"user-{i}",
        **extra,
    }


async def _burst(url: str, count: int = BURST, **extra: Any) -> tuple[list[httpx.Response], float]:
    """`count` requests at once, each on its own connection (so the kernel spreads them over
    the workers), each spoofing its own address; and how long the burst took."""
    limits = httpx.Limits(max_keepalive_connections=0)
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=20, limits=limits) as client:
        replies = await asyncio.gather(
            *(
                client.post(
                    url + "/v1/chat/completions", json=_body(i, **extra), headers=_spoofed(i)
                )
                for i in range(count)
            )
        )
    return list(replies), time.monotonic() - started


def _check_refusals(replies: list[httpx.Response], label: str) -> None:
    for reply in replies:
        if reply.status_code == 200:
            continue
        assert reply.status_code == 429, reply.text
        error = reply.json()["error"]
        assert error["type"] == "rate_limit_error" and label in error["message"], error
        assert int(reply.headers["retry-after"]) >= 1


@pytest.fixture(params=["memory", "redis"])
def state(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    if request.param == "memory":
        yield {}
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    # A slow moment of a loaded machine must not look like Redis being away (that policy,
    # each process's local share, has its own tests in test_redis_faults.py).
    yield {
        "redis_url": server.url,
        "key_prefix": request.getfixturevalue("prefix"),
        "timeout_s": 3.0,
    }


def test_a_spoofed_burst_admits_exactly_the_rpm(state: dict[str, Any]) -> None:
    """Row 11 (one process, memory and Redis stores): 64 requests at once, each claiming another
    client address and user, admit exactly rpm; one more, from yet another "address", is
    refused: it is the same bucket."""
    with running(_config(state, rpm=RPM)) as (url, _):
        replies, elapsed = asyncio.run(_burst(url))
        (after,), _ = asyncio.run(_burst(url, 1))
    assert elapsed < 60 / RPM, f"the burst took {elapsed:.2f} s: a refill came in between"
    statuses = [r.status_code for r in replies]
    assert statuses.count(200) == RPM, sorted(statuses)
    assert statuses.count(429) == BURST - RPM
    _check_refusals(replies, "requests per minute")
    assert after.status_code == 429
    _check_refusals([after], "requests per minute")


def test_a_spoofed_burst_over_two_workers_admits_exactly_the_rpm(
    tmp_path: Path, redis_server: RedisServer, prefix: str
) -> None:
    """Row 11 (`turnout serve --workers 2`, Redis): 64 spoofed requests at once on fresh
    connections, spread over both workers, admit exactly rpm between them."""
    state = {"redis_url": redis_server.url, "key_prefix": prefix, "timeout_s": 3.0}
    with serve(tmp_path, _config(state, rpm=RPM), workers=2) as served:
        replies, elapsed = asyncio.run(_burst(served.url))
        (after,), _ = asyncio.run(_burst(served.url, 1))
        output = served.stop()
    assert workers_serving(output) == 2, output
    assert elapsed < 60 / RPM, f"the burst took {elapsed:.2f} s: a refill came in between"
    statuses = [r.status_code for r in replies]
    assert statuses.count(200) == RPM, sorted(statuses)
    assert statuses.count(429) == BURST - RPM
    _check_refusals(replies, "requests per minute")
    assert after.status_code == 429


def test_a_spoofed_burst_never_takes_more_tokens_than_the_tpm(
    tmp_path: Path, redis_server: RedisServer, prefix: str
) -> None:
    """Row 11, tokens per minute (two workers, Redis): each admitted request holds at least its
    max_tokens before the call, so a burst admits at most tpm / max_tokens of them; and the
    tokens the admitted ones used stay within the tpm."""
    state = {"redis_url": redis_server.url, "key_prefix": prefix, "timeout_s": 3.0}
    with serve(tmp_path, _config(state, tpm=TPM), workers=2) as served:
        replies, _ = asyncio.run(_burst(served.url, max_tokens=MAX_TOKENS))
    admitted = [r for r in replies if r.status_code == 200]
    used = sum(r.json()["usage"]["total_tokens"] for r in admitted)
    print(f"tpm {TPM}: {len(admitted)} of {BURST} admitted, {used} tokens used")
    assert 1 <= len(admitted) <= TPM // MAX_TOKENS, sorted(r.status_code for r in replies)
    assert used <= TPM
    _check_refusals(replies, "tokens per minute")
