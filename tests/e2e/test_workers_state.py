"""`turnout serve --workers 2`: limits and budgets hold exactly across workers on Redis, and are
divided (never multiplied) between workers on the memory store."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest

from gateway.record_store import connect_redis
from gateway.state_redis import RedisState
from router.limits import period_bounds
from tests.e2e.processes import ROOT, TURNOUT, Served, free_port, wait_ready
from tests.integration.conftest import running
from tests.redis_server import RedisServer

CLIENT_KEY = "sk-client-workers-0001"
AUTH = {"authorization": f"Bearer {CLIENT_KEY}"}
PRICE = {"input_per_mtok": 1000.0, "output_per_mtok": 2000.0}
BODY: dict[str, Any] = {
    "model": "paid",
    "messages": [{"role": "user", "content": "Where is my refund?"}],
    "max_tokens": 5,
}
CONCURRENT = 64
Per = Literal["minute", "hour", "day", "month"]


def _config(state: dict[str, Any], **key: Any) -> dict[str, Any]:
    # The simulated upstream counts prompt tokens as Turnout's estimate does and generates exactly
    # max_tokens, so a request's held maximum equals its real cost: budgets admit exact counts.
    sha = hashlib.sha256(CLIENT_KEY.encode()).hexdigest()
    return {
        "state": state,
        "upstreams": {"sim": {"kind": "simulated", "ttft_ms": 20, "tokens_per_s": 1000}},
        "variants": {"paid": {"upstream": "sim", "model": "m", "price": PRICE}},
        "routes": {"paid": {"split": {"paid": 1}}},
        "keys": [{"name": "app", "sha256": sha, **key}],
    }


@contextlib.contextmanager
def _serve(tmp_path: Path, config: dict[str, Any]) -> Iterator[Served]:
    path = tmp_path / "turnout.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["TMPDIR"] = str(tmp_path)
    proc = subprocess.Popen(
        [TURNOUT, "serve", "-c", str(path), "--workers", "2", "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    served = Served(f"http://127.0.0.1:{port}", proc)
    try:
        wait_ready(served.url, served.proc)
        yield served
    finally:
        served.stop()


async def _burst(url: str, count: int = CONCURRENT) -> list[httpx.Response]:
    # No keep-alive: every request opens its own connection, so the kernel spreads them over
    # both workers.
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=20, headers=AUTH, limits=limits) as client:
        return await asyncio.gather(
            *(client.post(url + "/v1/chat/completions", json=BODY) for _ in range(count))
        )


def _one_cost() -> float:
    """One request's cost, measured on an in-process gateway with the same variant."""
    with running(_config({})) as (url, _):
        response = httpx.post(url + "/v1/chat/completions", json=BODY, headers=AUTH, timeout=10)
    assert response.status_code == 200, response.text
    cost = float(response.headers["x-turnout-cost-usd"])
    assert cost > 0
    return cost


async def _settled_totals(redis_url: str, prefix: str, per: Per) -> tuple[float, float]:
    """The budget's (spent, reserved) in Redis once the workers' settles are done."""
    start, _ = period_bounds(per, time.time())
    client = connect_redis(redis_url)
    try:
        state = RedisState(client, prefix)
        deadline = time.monotonic() + 5
        while True:  # settles run just after the responses
            spent, reserved = await state.totals(f"key:app:{per}:{int(start)}")
            if reserved == 0 or time.monotonic() > deadline:
                return spent, reserved
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()


def _workers_served(output: str) -> int:
    return output.count("serving routes")


def test_budget_is_exact_across_workers(
    tmp_path: Path, redis_server: RedisServer, prefix: str
) -> None:
    cost = _one_cost()
    budget = {"usd": round(10 * cost, 6), "per": "day"}
    state = {"redis_url": redis_server.url, "key_prefix": prefix}
    with _serve(tmp_path, _config(state, budget=budget)) as served:
        replies = asyncio.run(_burst(served.url))
        spent, reserved = asyncio.run(_settled_totals(redis_server.url, prefix, "day"))
        output = served.stop()
    assert _workers_served(output) == 2, output
    ok = [r for r in replies if r.status_code == 200]
    refused = [r for r in replies if r.status_code != 200]
    assert len(ok) == 10, sorted(r.status_code for r in replies)
    assert {r.status_code for r in refused} == {429}
    assert all("Budget reached" in r.json()["error"]["message"] for r in refused)
    assert reserved == 0
    assert spent == pytest.approx(sum(float(r.headers["x-turnout-cost-usd"]) for r in ok), abs=1e-6)
    assert spent == pytest.approx(10 * cost, abs=1e-6)


def test_requests_per_minute_are_exact_across_workers(
    tmp_path: Path, redis_server: RedisServer, prefix: str
) -> None:
    state = {"redis_url": redis_server.url, "key_prefix": prefix}
    with _serve(tmp_path, _config(state, rpm=20)) as served:
        started = time.monotonic()
        replies = asyncio.run(_burst(served.url))
        elapsed = time.monotonic() - started
        output = served.stop()
    assert _workers_served(output) == 2, output
    statuses = [r.status_code for r in replies]
    # The whole burst fits well inside one refill interval (60 s / 20), so the window admits its
    # 20 and nothing more.
    assert elapsed < 3.0
    assert statuses.count(200) == 20, sorted(statuses)
    assert statuses.count(429) == CONCURRENT - 20
    limited = next(r for r in replies if r.status_code == 429)
    assert "requests per minute" in limited.json()["error"]["message"]
    assert int(limited.headers["retry-after"]) >= 1


def test_memory_store_divides_limits_between_workers(tmp_path: Path) -> None:
    with _serve(tmp_path, _config({}, rpm=20)) as served:
        replies = asyncio.run(_burst(served.url))
        output = served.stop()
    assert _workers_served(output) == 2, output
    warning = "2 workers share no state store: each enforces 1/2 of every rate limit and budget"
    assert output.count(warning) == 2, output  # said by each worker
    admitted = [r.status_code for r in replies].count(200)
    # Each worker admits at most its 10: together never more than the key's 20.
    assert 10 <= admitted <= 20, admitted
