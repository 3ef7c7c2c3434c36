"""Redis frozen (SIGSTOP) and killed under a steady stream of requests: every request is still
answered in time per the failure policy, the added latency stays small, and the gateway is back
on Redis within seconds of its return."""

from __future__ import annotations

import asyncio
import hashlib
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from gateway.record_store import connect_redis
from gateway.state_redis import RedisState
from router.limits import period_bounds
from tests.integration.conftest import running
from tests.redis_server import RedisServer

CLIENT_KEY = "sk-client-faults-0001"
AUTH = {"authorization": f"Bearer {CLIENT_KEY}"}
BODY = {
    "model": "paid",
    "messages": [{"role": "user", "content": "Where is my refund?"}],
    "max_tokens": 5,
}
CLIENTS = 4
DEADLINE_S = 3.0  # each request's own deadline (the client's timeout)
RECOVERY_S = 5.0
P99_OVERHEAD_S = 0.25


def _config(redis_url: str, prefix: str) -> dict[str, Any]:
    """A key with a rate limit and a budget that the stream never reaches, on Redis or off it."""
    sha = hashlib.sha256(CLIENT_KEY.encode()).hexdigest()
    return {
        "state": {
            "redis_url": redis_url,
            "key_prefix": prefix,
            "budget_when_unavailable": "local",
            "local_budget_usd": 100.0,
            # A request waits on Redis at most this long: it bounds the added latency while
            # Redis is frozen (the requests in flight when it froze, then one probe a second).
            "timeout_s": 0.1,
        },
        "upstreams": {"sim": {"kind": "simulated", "ttft_ms": 5, "tokens_per_s": 10000}},
        "variants": {
            "paid": {
                "upstream": "sim",
                "model": "m",
                "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0},
            }
        },
        "routes": {"paid": {"split": {"paid": 1}}},
        "keys": [
            {"name": "app", "sha256": sha, "rpm": 100_000, "budget": {"usd": 1000.0, "per": "day"}}
        ],
    }


@dataclass
class Reply:
    started: float  # monotonic
    latency: float
    status: int | None  # None: no answer within the deadline


async def _stream(url: str, seconds: float, fault: Callable[[], Awaitable[None]]) -> list[Reply]:
    """CLIENTS clients sending one request after another for `seconds`, while `fault` runs."""
    replies: list[Reply] = []
    stop_at = time.monotonic() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        while time.monotonic() < stop_at:
            started = time.monotonic()
            try:
                response = await http.post(url + "/v1/chat/completions", json=BODY)
                status: int | None = response.status_code
            except httpx.TimeoutException:
                status = None
            replies.append(Reply(started, time.monotonic() - started, status))

    async with httpx.AsyncClient(headers=AUTH, timeout=DEADLINE_S) as http:
        await asyncio.gather(fault(), *(client(http) for _ in range(CLIENTS)))
    return replies


def _p99(replies: list[Reply]) -> float:
    return statistics.quantiles([r.latency for r in replies], n=100)[98]


async def _spent(redis_url: str, prefix: str) -> float:
    start, _ = period_bounds("day", time.time())
    client = connect_redis(redis_url)
    try:
        spent, _ = await RedisState(client, prefix).totals(f"key:app:day:{int(start)}")
        return spent
    finally:
        await client.aclose()


async def _back_on_redis(url: str, redis_url: str, prefix: str, since: float) -> float:
    """Seconds from `since` until /readyz is no longer degraded and the budget's spend in Redis
    grows again (new decisions are made there), under a light stream of requests."""
    before = await _spent(redis_url, prefix)
    async with httpx.AsyncClient(headers=AUTH, timeout=DEADLINE_S) as http:
        while True:
            reply = await http.post(url + "/v1/chat/completions", json=BODY)
            assert reply.status_code == 200, reply.text
            degraded = (await http.get(url + "/readyz")).json()["degraded"]
            if not degraded and await _spent(redis_url, prefix) > before:
                return time.monotonic() - since
            assert time.monotonic() - since < RECOVERY_S, f"still degraded: {degraded}"
            await asyncio.sleep(0.05)


def _fallbacks(metrics: str) -> dict[str, float]:
    found = {}
    for family in text_string_to_metric_families(metrics):
        if family.name == "turnout_state_fallbacks":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    found[sample.labels["feature"]] = sample.value
    return found


def _check_answered(replies: list[Reply]) -> None:
    late = [r for r in replies if r.status is None]
    assert not late, f"{len(late)} of {len(replies)} requests got no answer in {DEADLINE_S} s"
    # The limits and budgets are far away and the local allowance covers the outage: every
    # request is admitted, on Redis or on the local fallback.
    assert {r.status for r in replies} == {200}, sorted({str(r.status) for r in replies})


async def _nothing() -> None:
    pass


async def _freeze(redis_server: RedisServer, resumed: list[float]) -> None:
    await asyncio.sleep(0.5)
    with redis_server.paused():
        await asyncio.sleep(2.0)
    resumed.append(time.monotonic())


async def _kill_and_restart(redis_server: RedisServer, resumed: list[float]) -> None:
    await asyncio.sleep(0.5)
    await asyncio.to_thread(redis_server.kill)
    await asyncio.sleep(1.5)
    await asyncio.to_thread(redis_server.restart)  # the same port, empty
    resumed.append(time.monotonic())


Fault = Callable[[RedisServer, list[float]], Awaitable[None]]


async def _run_fault(
    redis_server: RedisServer, prefix: str, fault: Fault
) -> tuple[list[Reply], list[Reply]]:
    """(healthy, faulty) replies; checks every request was answered and Redis came back."""
    resumed: list[float] = []
    with running(_config(redis_server.url, prefix)) as (url, _):
        healthy = await _stream(url, 1.5, _nothing)
        _check_answered(healthy)
        assert await _spent(redis_server.url, prefix) > 0  # decisions are made on Redis
        faulty = await _stream(url, 3.5, lambda: fault(redis_server, resumed))
        _check_answered(faulty)
        async with httpx.AsyncClient() as http:
            fallbacks = _fallbacks((await http.get(url + "/metrics")).text)
        # The fault was felt: both limits and budgets went to their local fallbacks.
        assert fallbacks.get("rate_limit", 0) > 0 and fallbacks.get("budget", 0) > 0, fallbacks
        recovery = await _back_on_redis(url, redis_server.url, prefix, resumed[0])
    assert recovery < RECOVERY_S
    return healthy, faulty


def _check_overhead(healthy: list[Reply], faulty: list[Reply]) -> None:
    baseline, p99 = _p99(healthy), _p99(faulty)
    slowest = max(r.latency for r in faulty)
    assert p99 - baseline < P99_OVERHEAD_S, (
        f"p99 {p99:.3f} s vs {baseline:.3f} s with Redis healthy "
        f"(slowest {slowest:.3f} s, {len(faulty)} requests)"
    )


async def test_redis_frozen(redis_server: RedisServer, prefix: str) -> None:
    _check_overhead(*await _run_fault(redis_server, prefix, _freeze))


async def test_redis_killed_and_restarted(redis_server: RedisServer, prefix: str) -> None:
    _check_overhead(*await _run_fault(redis_server, prefix, _kill_and_restart))
