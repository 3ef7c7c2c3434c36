"""Rate limits and budgets on the request path, with the memory store and with Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.app import TurnoutApp
from tests.integration.conftest import CLIENT_KEY, Upstreams, base_config, running, sha256
from tests.redis_server import RedisServer

USER = [{"role": "user", "content": "Where is my refund?"}]
AUTH = {"authorization": f"Bearer {CLIENT_KEY}"}
# The simulated upstream counts prompt tokens as Turnout's estimate does and generates exactly
# max_tokens, so a request's held maximum equals its real cost: budgets admit exact counts.
PRICE = {"input_per_mtok": 1000.0, "output_per_mtok": 2000.0}


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    if request.param == "memory":
        yield {}
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix = request.getfixturevalue("prefix")
    # These tests are about exact decisions under concurrency, not about a slow Redis: a busy
    # CI machine must not turn a 64-request burst into "Redis is away" (that policy has its
    # own tests in tests/reliability).
    yield {"redis_url": server.url, "key_prefix": prefix, "timeout_s": 3.0}


def _config(upstreams: Upstreams, state: dict[str, Any], **key: Any) -> dict[str, Any]:
    config = base_config(upstreams)
    config["state"] = state
    config["upstreams"]["sim"] = {"kind": "simulated", "ttft_ms": 20, "tokens_per_s": 1000}
    config["variants"]["paid"] = {"upstream": "sim", "model": "m", "price": PRICE}
    config["routes"]["paid"] = {"split": {"paid": 1}}
    config["keys"] = [{"name": "app-a", "sha256": sha256(CLIENT_KEY), **key}]
    return config


def _chat(url: str, model: str = "ok", **extra: Any) -> httpx.Response:
    return httpx.post(
        url + "/v1/chat/completions",
        json={"model": model, "messages": USER, **extra},
        headers=AUTH,
        timeout=10,
    )


def test_requests_per_minute(upstreams: Upstreams, store: dict[str, Any]) -> None:
    with running(_config(upstreams, store, rpm=3)) as (url, _):
        statuses = [_chat(url).status_code for _ in range(3)]
        over = _chat(url)
    assert statuses == [200, 200, 200]
    assert over.status_code == 429
    error = over.json()["error"]
    assert error["type"] == "rate_limit_error" and "requests per minute" in error["message"]
    assert 1 <= int(over.headers["retry-after"]) <= 20
    assert over.headers["x-turnout-variant"] == "ok"


def test_tokens_per_minute(upstreams: Upstreams, store: dict[str, Any]) -> None:
    with running(_config(upstreams, store, tpm=100)) as (url, _):
        too_big = _chat(url, max_tokens=500)
        statuses = []
        for _ in range(6):
            statuses.append(_chat(url, max_tokens=20).status_code)
            time.sleep(0.05)  # the settle runs just after the response
        held = [_chat(url, max_tokens=20).status_code for _ in range(2)]
    assert too_big.status_code == 429 and "tokens per minute" in too_big.json()["error"]["message"]
    # Each request holds its prompt estimate (~13) + 20 tokens, then settles to the upstream's
    # usage (7 + 3): six fit in 100 only because the unused part of each hold came back.
    assert statuses == [200] * 6
    assert held[-1] == 429  # 60 used + two holds of ~33 do not fit


def test_budget_admits_exactly_what_it_can_pay_for(
    upstreams: Upstreams, store: dict[str, Any]
) -> None:
    async def burst(url: str, count: int) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=20, headers=AUTH) as client:
            body = {"model": "paid", "messages": USER, "max_tokens": 5}
            return await asyncio.gather(
                *(client.post(url + "/v1/chat/completions", json=body) for _ in range(count))
            )

    with running(_config(upstreams, store)) as (url, app):
        one = _chat(url, "paid", max_tokens=5)
        cost = float(one.headers["x-turnout-cost-usd"])
        assert cost > 0
    budget = {"usd": round(10 * cost, 6), "per": "day"}
    with running(_config(upstreams, store, budget=budget)) as (url, app):
        replies = asyncio.run(burst(url, 64))
        spent, reserved = asyncio.run(_totals(app, budget))
    ok = [r for r in replies if r.status_code == 200]
    refused = [r for r in replies if r.status_code != 200]
    assert len(ok) == 10, [r.status_code for r in replies]
    assert {r.status_code for r in refused} == {429}
    assert "Budget reached" in refused[0].json()["error"]["message"]
    assert reserved == 0
    assert spent == pytest.approx(sum(float(r.headers["x-turnout-cost-usd"]) for r in ok), abs=1e-6)


async def _totals(app: TurnoutApp, budget: dict[str, Any]) -> tuple[float, float]:
    from router.limits import period_bounds

    gw = app.gateway
    for _ in range(100):  # settles run just after the responses
        if not gw.background:
            break
        await asyncio.sleep(0.01)
    start, _ = period_bounds(budget["per"], time.time())
    name = f"key:app-a:{budget['per']}:{int(start)}"
    limiter = gw.limiter
    if gw.settings.state.redis_url is None:
        return await limiter.shared.totals(name)
    from gateway.record_store import connect_redis
    from gateway.state_redis import RedisState

    client = connect_redis(gw.settings.state.redis_url)
    try:
        return await RedisState(client, gw.settings.state.key_prefix).totals(name)
    finally:
        await client.aclose()


def test_redis_away_limits_fall_back_budgets_close(
    upstreams: Upstreams, redis_server: RedisServer, prefix: str
) -> None:
    state = {"redis_url": redis_server.url, "key_prefix": prefix}
    # Its own prefix: calls that timed out against the frozen server still run when it resumes,
    # so the first gateway's rate units may be taken in Redis after the fact.
    fresh = state | {"key_prefix": prefix + "b:"}
    config = _config(upstreams, fresh, rpm=2, budget={"usd": 100.0})
    limited = _config(upstreams, state, rpm=2)
    with running(limited) as (url, _):
        with redis_server.paused():
            statuses = [_chat(url).status_code for _ in range(3)]
            degraded = httpx.get(url + "/readyz").json()["degraded"]
            metrics = httpx.get(url + "/metrics").text
        assert statuses == [200, 200, 429]  # the local share of the limit, not "unlimited"
        assert any("redis" in part for part in degraded)
        assert 'turnout_state_fallbacks_total{feature="rate_limit"}' in metrics
    with running(config) as (url, _):
        with redis_server.paused():
            closed = _chat(url, "paid", max_tokens=5)
        assert closed.status_code == 503 and closed.json()["error"]["code"] == "state_unavailable"
        # While away, Redis is probed once a second: back on it within a couple of seconds.
        deadline = time.monotonic() + 5
        while _chat(url, "paid", max_tokens=5).status_code != 200:
            assert time.monotonic() < deadline, "never back on Redis"
            time.sleep(0.1)
        assert httpx.get(url + "/readyz").json()["degraded"] == []


def test_a_repeated_request_id_does_not_share_a_budget_hold(
    upstreams: Upstreams, store: dict[str, Any]
) -> None:
    with running(_config(upstreams, store)) as (url, _):
        cost = float(_chat(url, "paid", max_tokens=5).headers["x-turnout-cost-usd"])
    budget = {"usd": round(3 * cost, 6), "per": "day"}
    with running(_config(upstreams, store, budget=budget)) as (url, _):
        statuses = [
            httpx.post(
                url + "/v1/chat/completions",
                json={"model": "paid", "messages": USER, "max_tokens": 5},
                headers={**AUTH, "x-request-id": "same-id"},
            ).status_code
            for _ in range(5)
        ]
    assert statuses == [200, 200, 200, 429, 429]


def test_too_large_for_the_limit_still_says_when_to_retry(
    upstreams: Upstreams, store: dict[str, Any]
) -> None:
    with running(_config(upstreams, store, tpm=100)) as (url, _):
        response = _chat(url, max_tokens=500)
    assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1


async def test_memory_store_behind_workers_divides_budgets_too() -> None:
    from gateway.limits import Limiter
    from gateway.settings import Budget, Key, Price, Route, State
    from gateway.state_memory import MemoryState

    limiter = Limiter(MemoryState(), State(), share=2)
    key = Key(name="k", sha256="0" * 64, budget=Budget(usd=1.0))
    price = Price(input_per_mtok=0.0, output_per_mtok=1_000_000 * 0.6)  # $0.60 per token
    route = ("r", Route(split={"v": 1.0}))
    with pytest.raises(Exception, match="Budget reached"):
        await limiter.admit(key, route, (lambda: 0, 1, [price]), 10.0)  # 0.60 > 1.00 / 2
