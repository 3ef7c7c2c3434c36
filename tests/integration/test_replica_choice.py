"""Load-aware replica choice: the gateway scrapes fake vLLM `/metrics` and follows the queues."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from gateway.app import TurnoutApp
from gateway.scraper import MetricsScraper
from gateway.settings import Pool, Timeouts
from gateway.upstreams.base import Upstream, make_client
from tests.integration.conftest import UPSTREAM_KEY, running
from tests.servers import serve_app

ADAPTER = "support-lora"
REQUESTS = 40
USER = [{"role": "user", "content": "Where is my refund?"}]


def metrics_page(*, waiting: int, running: int, adapters: str, kv: float = 0.3) -> str:
    """A vLLM V1-style page (engine label, kv_cache_usage_perc, lora info)."""
    labels = 'engine="0",model_name="base-model"'
    return "\n".join(
        [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{labels}}} {running}.0",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{labels}}} {waiting}.0",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{{{labels}}} {kv}",
            "# TYPE vllm:lora_requests_info gauge",
            f'vllm:lora_requests_info{{engine="0",max_lora="2",running_lora_adapters="{adapters}",'
            f'waiting_lora_adapters=""}} {time.time():.6e}',
            "",
        ]
    )


BUSY = metrics_page(waiting=30, running=8, adapters="")
READY = metrics_page(waiting=1, running=2, adapters=ADAPTER)


class FakeVllm:
    """A raw-ASGI stand-in for one vLLM server: `/metrics` text set by the test, and chat
    completions counted."""

    def __init__(self, page: str) -> None:
        self.page = page
        self.metrics_status = 200
        self.chats = 0
        self.scrape_auth: set[str] = set()

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Any) -> None:
        assert scope["type"] == "http"
        while (await receive()).get("more_body"):
            pass
        if scope["path"] == "/metrics":
            headers = dict(scope["headers"])
            self.scrape_auth.add(headers.get(b"authorization", b"").decode())
            await _reply(send, self.metrics_status, self.page.encode(), b"text/plain")
        elif scope["path"] == "/v1/chat/completions":
            self.chats += 1
            await _reply(send, 200, json.dumps(_completion()).encode(), b"application/json")
        else:
            await _reply(send, 404, b"{}", b"application/json")


async def _reply(send: Any, status: int, body: bytes, content_type: bytes) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _completion() -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": ADAPTER,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "billing"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
    }


@pytest.fixture
def fleet() -> Iterator[tuple[FakeVllm, FakeVllm, str, TurnoutApp]]:
    first, second = FakeVllm(BUSY), FakeVllm(READY)
    with serve_app(first) as url1, serve_app(second) as url2:
        config = {
            "upstreams": {
                "vllm": {
                    "kind": "vllm",
                    "urls": [url1, url2],
                    "api_key_env": "FAKE_KEY",
                    "scrape_metrics": True,
                    "scrape_interval_s": 0.1,
                }
            },
            "variants": {"support-ft": {"upstream": "vllm", "model": ADAPTER}},
            "routes": {"support": {"split": {"support-ft": 1}}},
        }
        with running(config) as (url, app):
            yield first, second, url, app


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def _waiting(app: TurnoutApp) -> list[float | None]:
    return [load and load.waiting for load in app.gateway.upstreams["vllm"].loads]


def _send(url: str, count: int, fakes: tuple[FakeVllm, FakeVllm]) -> tuple[int, int]:
    before = (fakes[0].chats, fakes[1].chats)
    with httpx.Client(base_url=url, timeout=10) as client:
        for _ in range(count):
            body = {"model": "support", "messages": USER}
            response = client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
    return fakes[0].chats - before[0], fakes[1].chats - before[1]


def test_traffic_follows_short_queues_and_resident_adapters(
    fleet: tuple[FakeVllm, FakeVllm, str, TurnoutApp],
) -> None:
    first, second, url, app = fleet
    _wait_for(lambda: _waiting(app) == [30.0, 1.0])
    to_first, to_second = _send(url, REQUESTS, (first, second))
    assert to_second >= 0.9 * REQUESTS, (to_first, to_second)
    assert first.scrape_auth == second.scrape_auth == {f"Bearer {UPSTREAM_KEY}"}

    first.page, second.page = READY, BUSY
    _wait_for(lambda: _waiting(app) == [1.0, 30.0])
    to_first, to_second = _send(url, REQUESTS, (first, second))
    assert to_first >= 0.9 * REQUESTS, (to_first, to_second)


def test_failed_scrapes_go_stale_and_fall_back_to_least_outstanding(
    fleet: tuple[FakeVllm, FakeVllm, str, TurnoutApp],
) -> None:
    first, second, url, app = fleet
    _wait_for(lambda: _waiting(app) == [30.0, 1.0])
    first.metrics_status = 500
    stale = "upstream vllm replica 0: metrics stale"
    _wait_for(lambda: stale in httpx.get(url + "/readyz").json()["degraded"])
    to_first, to_second = _send(url, 10, (first, second))
    assert (to_first, to_second) == (5, 5)  # sequential: least outstanding takes turns

    first.metrics_status = 200
    _wait_for(lambda: stale not in httpx.get(url + "/readyz").json()["degraded"])
    assert _send(url, 10, (first, second)) == (0, 10)


async def test_scraper_survives_failures_and_logs_once_per_replica(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeVllm("<html>not metrics</html>")
    with serve_app(fake) as live, serve_app(FakeVllm(READY)) as dead:
        pass  # `dead` is closed now: connections to it are refused
    with serve_app(fake) as live:
        upstream = Upstream(
            "u", "vllm", [live + "/v1", dead + "/v1"],
            make_client(Timeouts(connect=0.5), Pool()), Timeouts(),
            metrics_urls=[live + "/metrics", dead + "/metrics"], scrape_interval_s=0.05,
        )  # fmt: skip
        scraper = MetricsScraper(upstream)
        with caplog.at_level(logging.WARNING, logger="turnout"):
            for _ in range(3):
                await scraper.poll_once()
        assert upstream.loads == [None, None]
        messages = sorted(r.getMessage() for r in caplog.records)
        failures = [m for m in messages if "scrape failed" in m]
        assert len(failures) == 2, failures
        assert "replica 0" in failures[0] and "no vllm:num_requests_" in failures[0]
        assert "replica 1" in failures[1]

        fake.page = READY
        scraper.start()
        await asyncio.sleep(0.3)
        assert upstream.loads[0] is not None and upstream.loads[0].waiting == 1.0
        assert upstream.stale_replicas(upstream.clock()) == [1]
        await scraper.aclose()
        await scraper.aclose()  # twice is fine
        await upstream.aclose()
