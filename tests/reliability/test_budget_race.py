"""Row 10, budget race: waves of 64 concurrent requests over two workers sharing a real Redis
spend a key's and a route's dollar budgets to the end and never past them, while holds are
larger than what requests end up costing (so room frees up mid-wave), streams and plain calls
are mixed, and some clients hang up mid-stream."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from gateway.record_store import connect_redis
from gateway.state_redis import RedisState
from router.limits import period_bounds
from tests.redis_server import RedisServer
from tests.reliability.gateway_process import serve, workers_serving

KEYS = {"app-a": "sk-client-budget-a-0001", "app-b": "sk-client-budget-b-0001"}
CHEAP = {"input_per_mtok": 1000.0, "output_per_mtok": 2000.0}
DEAR = {"input_per_mtok": 3000.0, "output_per_mtok": 6000.0}  # a fallback: holds are at this
MAX_TOKENS = 20  # the simulated upstream generates exactly this many
KEY_BUDGET = 1.0  # dollars per day, each key
ROUTE_BUDGET = 1.5  # dollars per day, both keys together
WAVE = 64
WAVES = 12  # at most; the budgets run out after a few


def _config(redis_url: str, prefix: str) -> dict[str, Any]:
    return {
        # Generous Redis deadline: a busy moment must not look like an outage (the outage
        # policy is row 12's); budgets stay closed when Redis is away, never local.
        "state": {"redis_url": redis_url, "key_prefix": prefix, "timeout_s": 3.0},
        "upstreams": {"sim": {"kind": "simulated", "ttft_ms": 20, "tokens_per_s": 400}},
        "variants": {
            "cheap": {"upstream": "sim", "model": "m", "price": CHEAP},
            "dear": {"upstream": "sim", "model": "m", "price": DEAR},
        },
        "routes": {
            "r": {
                "split": {"cheap": 1},
                "fallback": ["dear"],
                "budget": {"usd": ROUTE_BUDGET, "per": "day"},
            }
        },
        "keys": [
            {
                "name": name,
                "sha256": hashlib.sha256(token.encode()).hexdigest(),
                "budget": {"usd": KEY_BUDGET, "per": "day"},
            }
            for name, token in KEYS.items()
        ],
    }


BODY = {"model": "r", "messages": [{"role": "user", "content": "Where is my refund?"}]}


class Outcome:
    """What one wave's request saw: status, and the cost the gateway told the client."""

    def __init__(self, status: int, cost: float | None, cut: bool = False) -> None:
        self.status, self.cost, self.cut = status, cost, cut


async def _plain(client: httpx.AsyncClient) -> Outcome:
    reply = await client.post("/v1/chat/completions", json=BODY | {"max_tokens": MAX_TOKENS})
    cost = reply.headers.get("x-turnout-cost-usd")
    return Outcome(reply.status_code, float(cost) if cost else None)


async def _streamed(client: httpx.AsyncClient) -> Outcome:
    body = BODY | {
        "max_tokens": MAX_TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
        if reply.status_code != 200:
            await reply.aread()
            return Outcome(reply.status_code, None)
        cost = None
        async for line in reply.aiter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    cost = usage["cost_usd"]
        return Outcome(200, cost)


async def _hung_up(client: httpx.AsyncClient) -> Outcome:
    """A stream the client leaves after its first bytes: spend is whatever was generated."""
    body = BODY | {"max_tokens": MAX_TOKENS, "stream": True}
    async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
        if reply.status_code != 200:
            await reply.aread()
            return Outcome(reply.status_code, None)
        async for _ in reply.aiter_bytes():
            break
        return Outcome(200, None, cut=True)


KINDS: list[Callable[[httpx.AsyncClient], Awaitable[Outcome]]] = [_plain, _streamed, _hung_up]


async def _waves(url: str) -> list[Outcome]:
    """Waves of WAVE requests at once, both keys, every kind, until a wave admits none."""
    seen: list[Outcome] = []
    limits = httpx.Limits(max_keepalive_connections=0)  # fresh connections: both workers
    clients = [
        httpx.AsyncClient(
            base_url=url, timeout=20, limits=limits, headers={"authorization": f"Bearer {t}"}
        )
        for t in KEYS.values()
    ]
    try:
        for _ in range(WAVES):
            wave = await asyncio.gather(*(KINDS[i % 3](clients[i % 2]) for i in range(WAVE)))
            seen += wave
            if all(o.status != 200 for o in wave):
                break
    finally:
        for client in clients:
            await client.aclose()
    return seen


async def _totals(redis_url: str, prefix: str, name: str) -> tuple[float, float]:
    """(spent, reserved) of budget `name` today once the settles are done."""
    start, _ = period_bounds("day", time.time())
    client = connect_redis(redis_url)
    try:
        state = RedisState(client, prefix)
        deadline = time.monotonic() + 10
        while True:
            spent, reserved = await state.totals(f"{name}:day:{int(start)}")
            if reserved == 0 or time.monotonic() > deadline:
                return spent, reserved
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()


def test_concurrent_waves_never_overspend(
    tmp_path: Path, redis_server: RedisServer, prefix: str
) -> None:
    """Row 10: 64 concurrent requests a wave, 2 workers, real Redis, until the budgets are
    spent: overspend 0 on the route's budget and on each key's, holds all released, and the
    budgets really reached (the race was run to the end, within one hold of the limit)."""
    with serve(tmp_path, _config(redis_server.url, prefix), workers=2) as served:
        outcomes = asyncio.run(_waves(served.url))
        route = asyncio.run(_totals(redis_server.url, prefix, "route:r"))
        keys = {
            name: asyncio.run(_totals(redis_server.url, prefix, f"key:{name}")) for name in KEYS
        }
        output = served.stop()
    assert workers_serving(output) == 2, output
    admitted = [o for o in outcomes if o.status == 200]
    assert {o.status for o in outcomes} <= {200, 429}, sorted({o.status for o in outcomes})
    assert len(admitted) > WAVE / 4, len(admitted)
    known = [o.cost for o in admitted if o.cost is not None]
    hold = max(known) * DEAR["output_per_mtok"] / CHEAP["output_per_mtok"]  # the dearest price
    spent, reserved = route
    overspend = spent - ROUTE_BUDGET
    print(  # the figure for the closing note
        f"{len(outcomes)} requests in waves of {WAVE}, {len(admitted)} admitted; route spent "
        f"${spent:.4f} of ${ROUTE_BUDGET} (overspend {max(overspend, 0):.4f}); keys {keys}"
    )
    assert overspend <= 1e-6, f"route overspent by ${overspend:.6f}"
    assert reserved == 0
    assert spent >= ROUTE_BUDGET - hold, f"the budget was not run down: ${spent:.4f}"
    for name, (key_spent, key_reserved) in keys.items():
        assert key_spent <= KEY_BUDGET + 1e-6, f"{name} overspent: ${key_spent:.6f}"
        assert key_reserved == 0
    assert abs(sum(s for s, _ in keys.values()) - spent) < 1e-6
    # What the clients were told they spent is in the books; streams they left cost at most
    # one full answer each.
    cut = sum(1 for o in admitted if o.cut or o.cost is None)
    assert sum(known) - 1e-6 <= spent <= sum(known) + cut * max(known) + 1e-6
