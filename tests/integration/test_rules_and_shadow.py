"""Rules pick variants by request attributes; shadows copy traffic off the response path."""

from __future__ import annotations

import statistics
import time
from typing import Any

import httpx
import pytest

from tests.fakes import PROMPT_TOKENS, Recorder
from tests.integration.conftest import CLIENT_KEY, Upstreams, base_config, running, sha256

USER = [{"role": "user", "content": "hi"}]
LONG = [{"role": "user", "content": "word " * 300}]


def _rules_config(upstreams: Upstreams) -> dict[str, Any]:
    config = base_config(upstreams)
    config["routes"]["ruled"] = {
        "split": {"ok": 1},
        "rules": [
            {"when": {"header": {"x-tier": "gold"}}, "variant": "ft"},
            {"when": {"key": ["app-a"], "stream": True}, "variant": "echo"},
            {"when": {"prompt_tokens_above": 200}, "variant": "prompted"},
            {"when": {"tools": True}, "split": {"ft": 1, "prompted": 1}},
        ],
    }
    config["keys"] = [{"name": "app-a", "sha256": sha256(CLIENT_KEY)}]
    return config


def test_rules_pick_variants_first_match_wins(upstreams: Upstreams) -> None:
    auth = {"authorization": f"Bearer {CLIENT_KEY}"}
    with running(_rules_config(upstreams)) as (url, _):

        def variant(
            messages: list[dict[str, str]], headers: dict[str, str] | None = None, **extra: Any
        ) -> str:
            response = httpx.post(
                url + "/v1/chat/completions",
                json={"model": "ruled", "messages": messages, **extra},
                headers={**auth, **(headers or {})},
            )
            assert response.status_code == 200, response.text
            return response.headers["x-turnout-variant"]

        assert variant(USER) == "ok"  # no rule matches: the split
        assert variant(USER, {"x-tier": "gold"}) == "ft"
        assert variant(LONG, {"x-tier": "gold"}) == "ft"  # first match wins
        assert variant(LONG) == "prompted"
        assert variant(USER, stream=True) == "echo"
        tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
        assert {variant(USER, tools=tools, user=f"u{i}") for i in range(30)} <= {"ft", "prompted"}


def _shadow_config(upstreams: Upstreams, fraction: float) -> dict[str, Any]:
    config = base_config(upstreams)
    config["variants"]["shadow-ok"] = {
        "upstream": "vllm",
        "model": "ok",
    }
    price = {"input_per_mtok": 1.0, "output_per_mtok": 1.0}
    config["variants"]["shadow-echo"] = {"upstream": "hosted", "model": "echo", "price": price}
    config["routes"]["watched"] = {
        "split": {"ok": 1},
        "shadow": {"variant": "shadow-ok", "fraction": fraction},
    }
    config["routes"]["contrasted"] = {
        "split": {"ok": 1},
        "shadow": {"variant": "shadow-echo", "fraction": fraction},
    }
    return config


def _wait_shadows(app: Any, count: int) -> list[Any]:
    deadline = time.monotonic() + 5
    while True:
        shadows = [r for r in app.gateway.records if r.shadow_of]
        if len(shadows) >= count or time.monotonic() > deadline:
            return shadows
        time.sleep(0.02)


@pytest.mark.parametrize("stream", [False, True])
def test_shadow_records_a_comparison_for_every_request(
    upstreams: Upstreams, recorder: Recorder, stream: bool
) -> None:
    with running(_shadow_config(upstreams, 1.0)) as (url, app):
        ids = []
        for _ in range(10):
            with httpx.stream(
                "POST",
                url + "/v1/chat/completions",
                json={"model": "watched", "messages": USER, "stream": stream},
            ) as response:
                response.read()
                assert response.headers["x-turnout-variant"] == "ok"
                ids.append(response.headers["x-request-id"])
        shadows = _wait_shadows(app, 10)
        contrast = httpx.post(
            url + "/v1/chat/completions", json={"model": "contrasted", "messages": USER}
        )
        echo = next(
            r for r in _wait_shadows(app, 11) if r.shadow_of == contrast.headers["x-request-id"]
        )
        metrics = httpx.get(url + "/metrics").text
    assert sorted(r.shadow_of for r in shadows if r.variant == "shadow-ok") == sorted(ids)
    for record in shadows:
        if record.variant == "shadow-ok":
            assert record.comparison["agreement"] == "agree"
            assert record.usage.prompt == PROMPT_TOKENS and record.status == 200
    assert echo.comparison["agreement"] == "disagree"
    assert echo.cost_usd == pytest.approx((echo.usage.prompt + echo.usage.completion) / 1e6)
    assert 'turnout_shadow_total{agreement="agree",route="watched"} 10.0' in metrics
    # Shadow calls are never streamed and never counted as client requests.
    assert all(
        r.json.get("stream") is not True
        for r in recorder.received
        if r.headers.get("authorization") is None
    )
    requests = 'turnout_requests_total{route="watched",status_class="2xx",upstream="hosted",'
    assert requests + 'variant="ok"} 10.0' in metrics


def test_shadow_adds_no_latency_to_the_primary(upstreams: Upstreams) -> None:
    def p50(fraction: float) -> float:
        config = _shadow_config(upstreams, fraction)
        config["variants"]["shadow-ok"]["model"] = "slow-first-token"  # a slow shadow
        with running(config) as (url, _), httpx.Client() as client:
            timings = []
            for _ in range(20):
                started = time.perf_counter()
                response = client.post(
                    url + "/v1/chat/completions", json={"model": "watched", "messages": USER}
                )
                timings.append(time.perf_counter() - started)
                assert response.status_code == 200
        return statistics.median(timings)

    off, on = p50(0.0), p50(1.0)
    assert on < off + 0.05, (off, on)
