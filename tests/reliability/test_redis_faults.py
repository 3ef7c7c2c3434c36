"""Row 12: Redis frozen (SIGSTOP), killed, paused for writes (CLIENT PAUSE WRITE), out of memory
(maxmemory with noeviction) and with its connections dropped (CLIENT KILL), under a steady
stream of requests: every request is still answered in time per the failure policy, the added
p99 latency stays under 250 ms, and the gateway is back on Redis within 5 s of its return; and a
gateway started while Redis is down serves, then moves onto Redis when it comes up.

The policy per feature while Redis is away (gateway/limits.py, gateway/auth.py, proxy.py):
rate limits fall back to each process's share (limit / state.replicas), never unlimited;
budgets are refused (503 `state_unavailable`) unless `budget_when_unavailable: local`, which
allows `local_budget_usd` per process and period; run-time keys seen valid in the last 10 s keep
working from the cache, other tokens get 503; sticky overrides are skipped (the hash decides);
records are written behind, dropped and counted when the queue fills. Redis is probed once a
second meanwhile, so recovery is automatic."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

from gateway.record_store import connect_redis
from gateway.state_redis import RedisState
from router.limits import period_bounds
from tests.integration.conftest import running
from tests.redis_server import RedisServer, private_redis

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


def _config(redis_url: str, prefix: str, budgets: str = "local") -> dict[str, Any]:
    """A key with a rate limit and a budget that the stream never reaches, on Redis or off it."""
    sha = hashlib.sha256(CLIENT_KEY.encode()).hexdigest()
    return {
        "state": {
            "redis_url": redis_url,
            "key_prefix": prefix,
            "budget_when_unavailable": budgets,
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
    redis_server: RedisServer,
    prefix: str,
    fault: Fault,
    seconds: float = 3.5,
    felt: bool = True,
) -> tuple[list[Reply], list[Reply]]:
    """(healthy, faulty) replies; checks every request was answered and Redis came back.
    `felt`: the fault must send both limits and budgets to their local fallbacks and show on
    /readyz (a dropped connection may instead be reopened before anyone notices)."""
    resumed: list[float] = []
    with running(_config(redis_server.url, prefix)) as (url, _):
        healthy = await _stream(url, 1.5, _nothing)
        _check_answered(healthy)
        assert await _spent(redis_server.url, prefix) > 0  # decisions are made on Redis
        ready: list[list[str]] = []
        faulty = await _stream(
            url, seconds, lambda: _watch_ready(url, fault(redis_server, resumed), ready)
        )
        _check_answered(faulty)
        async with httpx.AsyncClient() as http:
            fallbacks = _fallbacks((await http.get(url + "/metrics")).text)
        if felt:
            # The fault was felt: both limits and budgets went to their local fallbacks, and
            # readiness named Redis (even when it still answered PING).
            assert fallbacks.get("rate_limit", 0) > 0 and fallbacks.get("budget", 0) > 0, fallbacks
            assert any(any("redis" in part for part in parts) for parts in ready), ready
        recovery = await _back_on_redis(url, redis_server.url, prefix, resumed[0])
    assert recovery < RECOVERY_S
    print(  # the figures for the closing note
        f"{fault.__name__}: {len(faulty)} requests, p99 {_p99(faulty):.3f} s vs "
        f"{_p99(healthy):.3f} s healthy, back on Redis {recovery:.2f} s after, "
        f"fallbacks {fallbacks}"
    )
    return healthy, faulty


async def _watch_ready(url: str, fault: Awaitable[None], seen: list[list[str]]) -> None:
    """Run `fault`, reading /readyz's degraded parts every 100 ms meanwhile."""
    task = asyncio.ensure_future(fault)
    async with httpx.AsyncClient(timeout=DEADLINE_S) as http:
        while not task.done():
            seen.append((await http.get(url + "/readyz")).json()["degraded"])
            await asyncio.wait({task}, timeout=0.1)
    await task


def _check_overhead(healthy: list[Reply], faulty: list[Reply]) -> None:
    baseline, p99 = _p99(healthy), _p99(faulty)
    slowest = max(r.latency for r in faulty)
    assert p99 - baseline < P99_OVERHEAD_S, (
        f"p99 {p99:.3f} s vs {baseline:.3f} s with Redis healthy "
        f"(slowest {slowest:.3f} s, {len(faulty)} requests)"
    )


@contextlib.contextmanager
def _admin(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A plain client of the server for the test's own commands (CONFIG, CLIENT ...)."""
    client = redis.Redis(port=redis_server.port, socket_timeout=5)
    try:
        yield client
    finally:
        client.close()


async def _pause_writes(redis_server: RedisServer, resumed: list[float]) -> None:
    """CLIENT PAUSE WRITE for 1.5 s: reads and PING answer, every write (and every script that
    may write: all of Turnout's) waits."""
    await asyncio.sleep(0.5)
    with _admin(redis_server) as admin:
        admin.client_pause(1500, all=False)  # WRITE
        await asyncio.sleep(1.5)
        admin.client_unpause()
    resumed.append(time.monotonic())


async def _out_of_memory(redis_server: RedisServer, resumed: list[float]) -> None:
    """maxmemory far below what it holds, with noeviction: every write is refused (OOM) at
    once for 1.5 s; then the limits are put back."""
    await asyncio.sleep(0.5)
    with _admin(redis_server) as admin:
        before = cast(dict[str, str], admin.config_get("maxmemory*"))
        try:
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", "1")
            await asyncio.sleep(1.5)
        finally:
            admin.config_set("maxmemory", before["maxmemory"])
            admin.config_set("maxmemory-policy", before["maxmemory-policy"])
    resumed.append(time.monotonic())


async def _connections_dropped(redis_server: RedisServer, resumed: list[float]) -> None:
    """Every client connection but this one killed (CLIENT KILL TYPE normal), ten times a
    second for 1.5 s, as a failing proxy or a Redis restart behind a VIP would."""
    await asyncio.sleep(0.5)
    with _admin(redis_server) as admin:
        killed = 0
        for _ in range(15):
            killed += cast(int, admin.client_kill_filter(_type="normal", skipme=True))
            await asyncio.sleep(0.1)
    assert killed > 0  # the gateway's connections were among them
    resumed.append(time.monotonic())


async def test_redis_paused_for_writes(redis_server: RedisServer, prefix: str) -> None:
    """Row 12: writes paused (PING still answers): requests answered, p99 + < 250 ms, readiness
    degraded meanwhile, back on Redis within 5 s."""
    _check_overhead(*await _run_fault(redis_server, prefix, _pause_writes, seconds=2.5))


async def test_redis_out_of_memory(redis_server: RedisServer, prefix: str) -> None:
    """Row 12: Redis refusing writes for lack of memory: the same."""
    _check_overhead(*await _run_fault(redis_server, prefix, _out_of_memory, seconds=2.5))


async def test_redis_connections_dropped(redis_server: RedisServer, prefix: str) -> None:
    """Row 12: the gateway's Redis connections killed over and over: the same (a request on a
    dead connection falls back; the next one opens a new connection)."""
    faulty = await _run_fault(redis_server, prefix, _connections_dropped, seconds=2.5, felt=False)
    _check_overhead(*faulty)


async def test_start_up_with_redis_down(prefix: str) -> None:
    """Row 12: a gateway started while its Redis is down starts, says so on /readyz, serves by
    the failure policy (rate limits on the local share; a budget with `closed` refused 503
    `state_unavailable`, with `local` spent locally), and moves onto Redis within 5 s of Redis
    coming up."""
    with private_redis() as server:
        server.kill()
        with (
            running(_config(server.url, prefix)) as (local_url, _),
            running(_config(server.url, prefix + "closed:", budgets="closed")) as (closed_url, _),
        ):
            async with httpx.AsyncClient(headers=AUTH, timeout=DEADLINE_S) as http:
                down = [
                    await http.post(local_url + "/v1/chat/completions", json=BODY) for _ in range(5)
                ]
                closed = await http.post(closed_url + "/v1/chat/completions", json=BODY)
                ready = (await http.get(local_url + "/readyz")).json()
            assert [r.status_code for r in down] == [200] * 5, down[-1].text
            assert closed.status_code == 503
            assert closed.json()["error"]["code"] == "state_unavailable"
            assert any("redis" in part for part in ready["degraded"]), ready
            await asyncio.to_thread(server.restart)
            recovery = await _back_on_redis(local_url, server.url, prefix, time.monotonic())
    print(f"start-up with Redis down: served, back on Redis {recovery:.2f} s after it came up")
    assert recovery < RECOVERY_S


async def test_redis_frozen(redis_server: RedisServer, prefix: str) -> None:
    _check_overhead(*await _run_fault(redis_server, prefix, _freeze))


async def test_redis_killed_and_restarted(redis_server: RedisServer, prefix: str) -> None:
    _check_overhead(*await _run_fault(redis_server, prefix, _kill_and_restart))
