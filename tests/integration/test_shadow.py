"""The shadow runner against fake upstreams on real sockets: records, comparisons, limits.

The gateway is built from config like the app's, and its lifespan (start, aclose) runs on the
test's own loop: the runner's tasks and the gateway's httpx clients must share one loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.body import CHAT, COMPLETIONS, EMBEDDINGS
from gateway.gateway import Gateway
from gateway.records import Latency, RequestRecord
from tests.fakes import OK_PIECES, OK_TEXT, PROMPT_TOKENS, Recorder
from tests.integration.conftest import Upstreams, base_config, build_app

ROUTE = "shadowed"
PRICE = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}
MESSAGES = [{"role": "user", "content": "The app crashes"}]


def config(upstreams: Upstreams, shadow: str, *, fraction: float = 1.0, limit: int = 8) -> Any:
    settings = base_config(upstreams)
    for name in ("ok", "echo", "error-500", "slow-first-token"):
        settings["variants"][f"{name}-priced"] = {
            "upstream": "hosted",
            "model": name,
            "price": PRICE,
        }
    settings["routes"][ROUTE] = {
        "split": {"ok": 1},
        "shadow": {"variant": shadow, "fraction": fraction},
    }
    settings["routing"] = {"shadow_concurrency": limit}
    return settings


@contextlib.asynccontextmanager
async def started(settings: dict[str, Any]) -> AsyncIterator[Gateway]:
    gw = build_app(settings).gateway
    await gw.start()
    try:
        yield gw
    finally:
        await gw.aclose()


def primary(request_id: str = "req-1", status: int = 200) -> RequestRecord:
    return RequestRecord(
        request_id=request_id,
        time=time.time(),
        route=ROUTE,
        variant="ok",
        upstream="hosted",
        tuning="fine-tuned",
        endpoint=CHAT,
        stream=False,
        status=status,
        latency=Latency(total=0.01),
        key="app-a",
    )


def submit(
    gw: Gateway,
    record: RequestRecord | None = None,
    body: dict[str, Any] | None = None,
    endpoint: str = CHAT,
    rand: float = 0.5,
) -> bool:
    return gw.shadows.maybe_submit(
        ROUTE,
        gw.settings.routes[ROUTE],
        record or primary(),
        OK_TEXT,
        body or {"model": ROUTE, "messages": MESSAGES},
        endpoint,
        rand,
    )


async def settled(gw: Gateway) -> None:
    async with asyncio.timeout(10.0):
        await gw.shadows.drain()


def shadow_of(gw: Gateway, request_id: str = "req-1") -> RequestRecord:
    record = gw.records.find(request_id + "-shadow")
    assert record is not None, "no shadow record"
    return record


def shadow_count(gw: Gateway, agreement: str) -> float:
    text = gw.metrics.render()[0].decode()
    line = f'turnout_shadow_total{{agreement="{agreement}",route="{ROUTE}"}} '
    found = [row for row in text.splitlines() if row.startswith(line)]
    return float(found[0].removeprefix(line)) if found else 0.0


async def test_agreeing_shadow_is_recorded_with_tokens_cost_and_comparison(
    upstreams: Upstreams, recorder: Recorder
) -> None:
    async with started(config(upstreams, "ok-priced")) as gw:
        body = {"model": ROUTE, "messages": MESSAGES, "stream": True, "user": "u1"}
        body["stream_options"] = {"include_usage": True}
        assert submit(gw, body=body)
        await settled(gw)
        record = shadow_of(gw)
        assert record.shadow_of == "req-1"
        assert (record.route, record.variant, record.status, record.error) == (
            ROUTE,
            "ok-priced",
            200,
            None,
        )
        assert record.key is None  # never charged to the client's key
        assert not record.stream
        assert (record.usage.prompt, record.usage.completion) == (PROMPT_TOKENS, len(OK_PIECES))
        expected = (PROMPT_TOKENS * 1.0 + len(OK_PIECES) * 2.0) / 1e6
        assert record.cost_usd == pytest.approx(expected)
        assert record.comparison == {
            "exact": True,
            "similarity": 1.0,
            "json_equal": None,
            "agreement": "agree",
        }
        assert 0 < record.latency.upstream <= record.latency.total
        sent = recorder.last().json
        assert sent["model"] == "ok" and sent["user"] == "u1"
        assert "stream" not in sent and "stream_options" not in sent  # never streamed
        assert shadow_count(gw, "agree") == 1


async def test_prompted_shadow_of_a_text_completion_gets_its_prompt(
    upstreams: Upstreams, recorder: Recorder
) -> None:
    async with started(config(upstreams, "prompted")) as gw:
        body = {"model": ROUTE, "prompt": "The app crashes"}
        assert submit(gw, body=body, endpoint=COMPLETIONS)
        await settled(gw)
        record = shadow_of(gw)
        assert record.endpoint == COMPLETIONS and record.tuning == "prompted"
        assert record.usage.injected > 0 and record.prompt_tax_usd > 0
        assert recorder.last().json["prompt"].startswith("You classify tickets.")
        assert record.comparison is not None and record.comparison["agreement"] == "agree"


async def test_different_answer_disagrees(upstreams: Upstreams) -> None:
    async with started(config(upstreams, "echo-priced")) as gw:
        assert submit(gw)
        await settled(gw)
        record = shadow_of(gw)
        assert record.status == 200
        assert record.comparison is not None
        assert record.comparison["agreement"] == "disagree"
        assert record.comparison["exact"] is False
        assert isinstance(record.comparison["similarity"], float)
        assert shadow_count(gw, "disagree") == 1 and shadow_count(gw, "agree") == 0


async def test_failed_shadow_is_recorded_as_an_error(upstreams: Upstreams) -> None:
    async with started(config(upstreams, "error-500-priced")) as gw:
        assert submit(gw)
        await settled(gw)
        record = shadow_of(gw)
        assert (record.status, record.error) == (502, "UpstreamError")
        assert record.comparison == {"agreement": "error"}
        assert record.usage.prompt == 0 and record.cost_usd == 0.0
        assert shadow_count(gw, "error") == 1


async def test_submissions_that_are_not_shadowed(upstreams: Upstreams) -> None:
    async with started(config(upstreams, "ok-priced", fraction=0.25)) as gw:
        assert not submit(gw, rand=0.25)  # the fraction is a strict bound
        assert not submit(gw, record=primary(status=502))  # nothing to compare with
        embedding = {"model": ROUTE, "input": "hi"}
        assert not submit(gw, body=embedding, endpoint=EMBEDDINGS)
        unshadowed = gw.settings.routes["ok"]
        assert not gw.shadows.maybe_submit(
            "ok", unshadowed, primary(), OK_TEXT, {"model": "ok"}, CHAT, 0.0
        )
        assert submit(gw, rand=0.2499)
        await settled(gw)
        assert shadow_of(gw).status == 200
        assert gw.shadows.dropped == 0


async def test_concurrency_limit_drops_excess_and_aclose_cancels(
    upstreams: Upstreams, recorder: Recorder
) -> None:
    async with started(config(upstreams, "slow-first-token-priced", limit=1)) as gw:
        submitted = [submit(gw, record=primary(f"req-{i}")) for i in range(5)]
        assert submitted == [True, False, False, False, False]
        assert gw.shadows.running == 1 and gw.shadows.dropped == 4
        await asyncio.sleep(0.2)
        began = time.monotonic()
        await gw.shadows.aclose()
        assert time.monotonic() - began < 1.0  # cancelled, not waited for
        assert gw.shadows.running == 0
        assert gw.upstreams["hosted"].in_flight == [0]
        assert not submit(gw, record=primary("req-late"))  # closed: no new shadows
        assert all(r.shadow_of is None for r in gw.records)
        assert len(recorder.received) == 1
