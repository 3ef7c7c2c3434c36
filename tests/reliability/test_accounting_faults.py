"""Issue #9, row 24: accounting under failover and cuts.

A key with a dollar budget in a real Redis sends requests that fail over (a priced 503 first,
then a priced answer), streams that are cut after their first event, and a request whose
hosted upstream resets after reading it. What the budget spent, what the records say and what
/metrics counts must all equal the upstream's own usage at the variant's price; failed
attempts cost nothing; and the stream a client gets is the upstream's, byte for byte, whether
or not it asked for usage (Turnout asks the upstream for it either way).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.record_store import connect_redis
from gateway.state_redis import RedisState
from router.limits import period_bounds
from tests.fakes import CACHED_TOKENS, OK_PIECES, PROMPT_TOKENS
from tests.integration.conftest import Upstreams, base_config, running
from tests.redis_server import RedisServer
from tests.reliability import faultproxy
from tests.reliability.faultproxy import (
    USER,
    FaultProxy,
    chat,
    direct_stream,
    events,
    fake_upstreams,
    first_chunk_bytes,
    metric,
    record_of,
    stream,
)

KEY = "sk-client-accounting-0001"
AUTH = {"authorization": f"Bearer {KEY}"}
# Dollars per million tokens, large enough that Redis's micro-dollars round nothing away.
PRICE = {"input_per_mtok": 3000.0, "cached_input_per_mtok": 1500.0, "output_per_mtok": 12000.0}
MODEL = "detailed-usage"  # streams like `ok`, and reports cached tokens too
DEADLINES = {"connect": 1.0, "first_byte": 2.0, "idle": 2.0, "total": 10.0}


def _cost(prompt: int, cached: int, completion: int) -> float:
    dollars = (prompt - cached) * PRICE["input_per_mtok"] + cached * PRICE["cached_input_per_mtok"]
    return (dollars + completion * PRICE["output_per_mtok"]) / 1e6


# One answer of the fallback, at the price, from the upstream's own usage.
ANSWER_USD = _cost(PROMPT_TOKENS, CACHED_TOKENS, len(OK_PIECES))


@pytest.fixture(scope="module")
def fake() -> Iterator[Upstreams]:
    with fake_upstreams() as upstreams:
        yield upstreams


def _config(fake: Upstreams, redis_url: str, prefix: str, cut: str, reset: str) -> dict[str, Any]:
    config = base_config(fake, **DEADLINES)
    config["state"] = {"redis_url": redis_url, "key_prefix": prefix}
    for name, url in (("cut", cut), ("reset", reset)):
        config["upstreams"][name] = {
            "kind": "openai", "base_url": url + "/v1", "timeouts": DEADLINES
        }  # fmt: skip
    config["variants"] |= {
        "answers": {"upstream": "hosted", "model": MODEL, "price": PRICE},
        "refuses": {"upstream": "hosted", "model": "error-503", "price": PRICE},
        "cut": {"upstream": "cut", "model": MODEL, "price": PRICE},
        "reset": {"upstream": "reset", "model": MODEL, "price": PRICE},
    }
    config["routes"] |= {
        "failover": {"split": {"refuses": 1}, "fallback": ["answers"]},
        "cut": {"split": {"cut": 1}},
        "reset": {"split": {"reset": 1}, "fallback": ["answers"]},
    }
    # Every request here fails over, one after another on a quiet gateway: more retries than
    # the default budget (3, then a fifth of a retry per request: row 2) would grant.
    config["routing"] = {"retry_budget_min": 10}
    sha = hashlib.sha256(KEY.encode()).hexdigest()
    config["keys"] = [{"name": "acct", "sha256": sha, "budget": {"usd": 1000.0, "per": "day"}}]
    return config


async def _spent(redis_url: str, prefix: str) -> float:
    start, _ = period_bounds("day", time.time())
    client = connect_redis(redis_url)
    try:
        spent, _ = await RedisState(client, prefix).totals(f"key:acct:day:{int(start)}")
        return spent
    finally:
        await client.aclose()


def _settled(redis_url: str, prefix: str, expected: float) -> float:
    """The budget's spend once it reaches `expected` (settling runs off the response path)."""
    deadline = time.monotonic() + 3.0
    while (spent := asyncio.run(_spent(redis_url, prefix))) < expected - 1e-6:
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return spent


def test_row24_spend_equals_upstream_usage_under_failover_and_cuts(
    fake: Upstreams, redis_server: RedisServer, prefix: str
) -> None:
    """Row 24: spend (the key's budget in Redis), records and metrics equal the upstream's
    usage at the price, with failovers (the 503 attempt billed nothing, the answer once), a
    stream cut after its first event (no usage came: what was relayed is counted), and a
    hosted upstream that reset after reading the request (nothing known, nothing billed). The
    client's stream is the upstream's bytes: without usage asked, minus the usage chunk
    Turnout asked for; with it, that chunk gains only `cost_usd`, equal to the record's."""
    first = first_chunk_bytes(fake.urls[0], MODEL)
    with contextlib.ExitStack() as stack:
        cut = stack.enter_context(FaultProxy(fake.urls[0], faultproxy.cut_after(first + 10)))
        reset = stack.enter_context(FaultProxy(fake.urls[0], faultproxy.reset_after_request()))
        config = _config(fake, redis_server.url, prefix, cut.url, reset.url)
        url, _ = stack.enter_context(running(config))
        costs: list[float] = []

        # Failover, non-streaming, twice: one answer's cost each, and in the header.
        for _ in range(2):
            response = chat(url, {"model": "failover", "messages": USER}, headers=AUTH).response
            assert response.status_code == 200, response.text
            record = record_of(url, response.headers["x-request-id"])
            assert record["attempts"] == 2 and record["variant"] == "answers"
            usage = record["usage"]
            assert (usage["prompt"], usage["cached"], usage["completion"]) == (
                PROMPT_TOKENS, CACHED_TOKENS, len(OK_PIECES)
            )  # fmt: skip
            assert record["cost_usd"] == pytest.approx(ANSWER_USD, rel=1e-9)
            assert float(response.headers["x-turnout-cost-usd"]) == pytest.approx(ANSWER_USD)
            costs.append(record["cost_usd"])

        # Failover, streamed, without and with usage asked: the upstream's bytes.
        direct, usage_event = direct_stream(fake.urls[0], {"model": MODEL, "messages": USER})
        plain = stream(url, {"model": "failover", "messages": USER, "stream": True}, AUTH)
        assert plain.raw == direct.replace(usage_event, b"")
        costs.append(record_of(url, plain.response.headers["x-request-id"])["cost_usd"])
        asked = {"model": "failover", "messages": USER, "stream": True}
        asked["stream_options"] = {"include_usage": True}
        with_usage = stream(url, asked, AUTH)
        ours, theirs = events(with_usage.raw), events(direct)
        at = next(i for i, e in enumerate(theirs) if b'"choices":[]' in e)
        assert ours[:at] + ours[at + 1 :] == theirs[:at] + theirs[at + 1 :]
        mine = json.loads(ours[at].removeprefix(b"data: "))
        upstream = json.loads(theirs[at].removeprefix(b"data: "))
        record = record_of(url, with_usage.response.headers["x-request-id"])
        assert mine["usage"].pop("cost_usd") == pytest.approx(record["cost_usd"], rel=1e-6)
        assert mine == upstream
        costs.append(record["cost_usd"])
        assert costs == pytest.approx([ANSWER_USD] * 4, rel=1e-9)

        # A stream cut after its first event: estimated from what was relayed, at the price.
        cut_stream = stream(url, {"model": "cut", "messages": USER, "stream": True}, AUTH)
        assert b"[DONE]" not in cut_stream.raw
        record = record_of(url, cut_stream.response.headers["x-request-id"])
        usage = record["usage"]
        assert record["status"] == 502 and usage["estimated"] and usage["completion"] >= 1
        estimated = _cost(usage["prompt"], 0, usage["completion"])
        assert record["cost_usd"] == pytest.approx(estimated, rel=1e-9)
        costs.append(record["cost_usd"])

        # A hosted upstream that reset after reading the request: no usage known, no cost.
        failed = chat(url, {"model": "reset", "messages": USER}, headers=AUTH).response
        assert failed.status_code == 502
        record = record_of(url, failed.headers["x-request-id"])
        assert record["cost_usd"] == 0.0 and record["attempts"] == 1
        assert reset.requests == 1

        total = sum(costs)
        spent = _settled(redis_server.url, prefix, total)
        by_metrics = metric(url, "turnout_cost_usd_total")
        refused = metric(url, "turnout_cost_usd_total", variant="refuses")
        reset_cost = metric(url, "turnout_cost_usd_total", variant="reset")
    assert spent == pytest.approx(total, abs=1e-6), f"budget spent {spent}, records say {total}"
    assert by_metrics == pytest.approx(total, rel=1e-9)
    assert refused == 0.0 and reset_cost == 0.0
    print(
        f"FIGURE row 24: 4 failovers at ${ANSWER_USD:.6f} each (the upstream's usage at the "
        f"price; the 503 attempts $0), a cut stream ${costs[-1]:.6f} (estimated), a reset $0; "
        f"budget spent ${spent:.6f} = records ${total:.6f} = metrics ${by_metrics:.6f}"
    )
