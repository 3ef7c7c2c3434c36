"""Accounting agrees with the upstream: tokens, dollars, estimates, headers and usage objects."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import openai
import pytest

from gateway.app import TurnoutApp
from gateway.records import RequestRecord
from gateway.tokens import TokenCounter
from tests.fakes import CACHED_TOKENS, OK_PIECES, PROMPT_TOKENS, REASONING_TOKENS
from tests.integration.conftest import PROMPT, Upstreams, base_config, running

USER = [{"role": "user", "content": "Where is my refund for order 1234?"}]
PRICE = {"input_per_mtok": 3.0, "cached_input_per_mtok": 1.5, "output_per_mtok": 12.0}


def _config(upstreams: Upstreams) -> dict[str, Any]:
    config = base_config(upstreams)
    config["upstreams"]["sim"] = {"kind": "simulated", "ttft_ms": 0, "completion_tokens": 5}
    config["variants"] |= {
        "priced": {"upstream": "hosted", "model": "detailed-usage", "price": PRICE},
        "sim-ft": {"upstream": "sim", "model": "support-lora"},
        "sim-prompted": {"upstream": "sim", "model": "gpt", "prompt": PROMPT, "price": PRICE},
    }
    for name in ("priced", "sim-ft", "sim-prompted"):
        config["routes"][name] = {"split": {name: 1}}
    return config


@pytest.fixture(scope="module")
def served(upstreams: Upstreams) -> Iterator[tuple[str, TurnoutApp]]:
    with running(_config(upstreams)) as pair:
        yield pair


def _record(app: TurnoutApp, request_id: str) -> RequestRecord:
    record = app.gateway.records.find(request_id)
    assert record is not None, f"no record for {request_id}"
    return record


def _expected_cost(prompt: int, cached: int, completion: int) -> float:
    return ((prompt - cached) * 3.0 + cached * 1.5 + completion * 12.0) / 1e6


def test_non_streaming_tokens_and_cost_equal_upstream_usage(
    served: tuple[str, TurnoutApp],
) -> None:
    url, app = served
    response = httpx.post(url + "/v1/chat/completions", json={"model": "priced", "messages": USER})
    record = _record(app, response.headers["x-request-id"])
    usage = record.usage
    assert (usage.prompt, usage.completion) == (PROMPT_TOKENS, len(OK_PIECES))
    assert (usage.cached, usage.reasoning, usage.estimated) == (
        CACHED_TOKENS,
        REASONING_TOKENS,
        False,
    )
    expected = _expected_cost(PROMPT_TOKENS, CACHED_TOKENS, len(OK_PIECES))
    assert record.cost_usd == pytest.approx(expected, abs=1e-12)
    assert float(response.headers["x-turnout-cost-usd"]) == pytest.approx(expected, abs=1e-8)


@pytest.mark.parametrize("client_usage", [True, False])
def test_streamed_tokens_and_cost_with_and_without_client_usage(
    served: tuple[str, TurnoutApp], client_usage: bool
) -> None:
    url, app = served
    body: dict[str, Any] = {"model": "priced", "messages": USER, "stream": True}
    if client_usage:
        body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body) as response:
        raw = response.read()
        request_id = response.headers["x-request-id"]
    record = _record(app, request_id)
    expected = _expected_cost(PROMPT_TOKENS, CACHED_TOKENS, len(OK_PIECES))
    assert (record.usage.prompt, record.usage.completion) == (PROMPT_TOKENS, len(OK_PIECES))
    assert not record.usage.estimated
    assert record.cost_usd == pytest.approx(expected, abs=1e-12)
    usage_chunks = [
        msgspec.json.decode(e.removeprefix(b"data: "))
        for e in raw.split(b"\n\n")
        if b'"choices":[]' in e
    ]
    if client_usage:
        assert usage_chunks[-1]["usage"]["cost_usd"] == pytest.approx(expected, abs=1e-10)
        assert usage_chunks[-1]["usage"]["prompt_tokens"] == PROMPT_TOKENS
    else:
        assert usage_chunks == []


def test_injected_tokens_are_the_prompt_difference(served: tuple[str, TurnoutApp]) -> None:
    """On an upstream that counts tokens itself, the prompt tax is exactly what was added."""
    url, app = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    plain = client.chat.completions.with_raw_response.create(model="sim-ft", messages=USER)  # type: ignore[arg-type]
    shaped = client.chat.completions.with_raw_response.create(model="sim-prompted", messages=USER)  # type: ignore[arg-type]
    own = _record(app, plain.headers["x-request-id"]).usage
    taxed = _record(app, shaped.headers["x-request-id"])
    assert own.injected == 0
    assert taxed.usage.injected == taxed.usage.prompt - own.prompt > 0
    assert taxed.prompt_tax_usd == pytest.approx(taxed.usage.injected * 3.0 / 1e6, abs=1e-12)
    assert taxed.cost_usd == pytest.approx(
        _expected_cost(taxed.usage.prompt, 0, taxed.usage.completion), abs=1e-12
    )


def test_pre_estimate_matches_the_upstream_count(served: tuple[str, TurnoutApp]) -> None:
    """The cheap pre-call estimate (client text + precounted injection) is close to exact."""
    from gateway import body as bodies
    from gateway.context import RequestContext
    from gateway.exchange import Exchange

    url, app = served
    gw = app.gateway
    for route in ("sim-ft", "sim-prompted"):
        client = bodies.parse(bodies.CHAT, msgspec.json.encode({"model": route, "messages": USER}))
        ctx = RequestContext(request_id="pre-estimate")
        exchange = Exchange(gw, ctx, client, [route], None)  # type: ignore[arg-type]
        response = httpx.post(url + "/v1/chat/completions", json={"model": route, "messages": USER})
        assert (
            exchange.prompt_estimate == _record(app, response.headers["x-request-id"]).usage.prompt
        )


def test_cut_stream_is_estimated_from_relayed_text(served: tuple[str, TurnoutApp]) -> None:
    url, app = served
    body = {"model": "stream-cut", "messages": USER, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.read()
        request_id = response.headers["x-request-id"]
    record = _record(app, request_id)
    counter = TokenCounter()
    assert record.status == 502 and record.usage.estimated
    assert record.usage.completion == counter.texts(OK_PIECES[:2])
    assert record.usage.prompt == counter.chat(USER)


def test_upstream_refusal_costs_nothing(served: tuple[str, TurnoutApp]) -> None:
    url, app = served
    response = httpx.post(
        url + "/v1/chat/completions", json={"model": "error-500", "messages": USER}
    )
    record = _record(app, response.headers["x-request-id"])
    assert record.status == 502 and record.usage.prompt == 0 and record.cost_usd == 0.0


def test_record_is_compact_and_has_no_content(served: tuple[str, TurnoutApp]) -> None:
    url, app = served
    response = httpx.post(url + "/v1/chat/completions", json={"model": "priced", "messages": USER})
    record = _record(app, response.headers["x-request-id"])
    encoded = msgspec.json.encode(record)
    assert b"refund" not in encoded and b"Hello" not in encoded
    assert record.content is None and record.replica == 0 and record.key is None


def test_content_is_kept_only_when_asked(upstreams: Upstreams) -> None:
    config = _config(upstreams)
    config["records"] = {"content": True}
    with running(config) as (url, app):
        response = httpx.post(
            url + "/v1/chat/completions", json={"model": "priced", "messages": USER}
        )
        record = _record(app, response.headers["x-request-id"])
        with httpx.stream(
            "POST",
            url + "/v1/chat/completions",
            json={"model": "priced", "messages": USER, "stream": True},
        ) as streamed:
            streamed.read()
        streamed_record = _record(app, streamed.headers["x-request-id"])
    assert record.content is not None
    assert record.content["request"]["messages"] == USER  # type: ignore[index]
    assert streamed_record.content is not None
    assert "".join(streamed_record.content["response"]) == "".join(OK_PIECES)  # type: ignore[arg-type]


def test_fallback_served_request_is_accounted_once(upstreams: Upstreams) -> None:
    config = _config(upstreams)
    config["routes"]["fails-over"] = {"split": {"error-503": 1}, "fallback": ["priced"]}
    with running(config) as (url, app):
        response = httpx.post(
            url + "/v1/chat/completions", json={"model": "fails-over", "messages": USER}
        )
        record = _record(app, response.headers["x-request-id"])
        metrics = httpx.get(url + "/metrics").text
    assert response.headers["x-turnout-variant"] == "priced" and record.attempts == 2
    assert (record.usage.prompt, record.usage.completion) == (PROMPT_TOKENS, len(OK_PIECES))
    expected = _expected_cost(PROMPT_TOKENS, CACHED_TOKENS, len(OK_PIECES))
    assert record.cost_usd == pytest.approx(expected, abs=1e-12)
    assert float(response.headers["x-turnout-cost-usd"]) == pytest.approx(expected, abs=1e-8)
    assert len([r for r in app.gateway.records if r.request_id == record.request_id]) == 1
    assert 'turnout_upstream_attempts_total{outcome="error",upstream="hosted"} 1.0' in metrics
