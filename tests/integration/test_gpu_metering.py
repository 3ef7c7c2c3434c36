"""GPU cost through the gateway: a self-hosted variant pays for its replica's busy time."""

from __future__ import annotations

import concurrent.futures
import math
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import pytest

from gateway.app import TurnoutApp
from gateway.records import RequestRecord
from router.gpu_cost import busy_seconds
from tests.integration.conftest import Upstreams, base_config, running

USD_PER_S = 0.01  # hourly_usd 36 * 1 GPU / 3600
USER = [{"role": "user", "content": "Where is my refund?"}]


@pytest.fixture(scope="module")
def served(upstreams: Upstreams) -> Iterator[tuple[str, TurnoutApp]]:
    config = base_config(upstreams)
    config["upstreams"]["vllm"]["gpu"] = {"hourly_usd": 36.0, "count": 1}
    with running(config) as pair:
        yield pair


def _record(app: TurnoutApp, request_id: str) -> RequestRecord:
    found = [r for r in app.gateway.records if r.request_id == request_id]
    assert found, f"no record for {request_id}"
    return found[-1]


def _chat(url: str, **extra: Any) -> httpx.Response:
    body = {"model": "ft", "messages": USER, **extra}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=10)


def _metered_busy_usd(app: TurnoutApp) -> float:
    """The busy cost of every replica over the requests its meter remembers."""
    meter = app.gateway.meters["vllm"]
    everything = (-math.inf, math.inf)
    return sum(
        USD_PER_S * busy_seconds([(r.start, r.end) for r in meter.history(replica)], everything)
        for replica in range(meter.replicas)
    )


def _gpu_records(app: TurnoutApp) -> list[RequestRecord]:
    return [r for r in app.gateway.records if r.variant == "ft"]


def test_sequential_requests_pay_the_replicas_busy_time(served: tuple[str, TurnoutApp]) -> None:
    url, app = served
    for _ in range(6):
        response = _chat(url)
        assert response.status_code == 200
        record = _record(app, response.headers["x-request-id"])
        assert record.cost_usd > 0
        assert float(response.headers["x-turnout-cost-usd"]) == pytest.approx(
            record.cost_usd, abs=5e-9
        )
    assert app.gateway.meters["vllm"].history(0) and app.gateway.meters["vllm"].history(1)
    total = sum(r.cost_usd for r in _gpu_records(app))
    assert total == pytest.approx(_metered_busy_usd(app), abs=1e-9)


def test_concurrent_requests_still_add_up(served: tuple[str, TurnoutApp]) -> None:
    url, app = served
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: _chat(url), range(16)))
    for response in responses:
        record = _record(app, response.headers["x-request-id"])
        assert record.cost_usd >= 0
        assert float(response.headers["x-turnout-cost-usd"]) == pytest.approx(
            record.cost_usd, abs=5e-9
        )
    total = sum(r.cost_usd for r in _gpu_records(app))
    assert total == pytest.approx(_metered_busy_usd(app), abs=1e-9)


def test_stream_usage_chunk_carries_the_gpu_cost(served: tuple[str, TurnoutApp]) -> None:
    url, app = served
    body = {"model": "ft", "messages": USER, "stream": True}
    body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=10) as response:
        raw = response.read()
        request_id = response.headers["x-request-id"]
    chunks = [
        msgspec.json.decode(event.removeprefix(b"data: "))
        for event in raw.split(b"\n\n")
        if b'"choices":[]' in event
    ]
    assert chunks and chunks[-1]["usage"]["cost_usd"] > 0
    assert _record(app, request_id).cost_usd > 0
    total = sum(r.cost_usd for r in _gpu_records(app))
    assert total == pytest.approx(_metered_busy_usd(app), abs=1e-9)


def test_priced_and_unmetered_variants_are_untouched(served: tuple[str, TurnoutApp]) -> None:
    url, app = served
    response = httpx.post(url + "/v1/chat/completions", json={"model": "ok", "messages": USER})
    assert float(response.headers["x-turnout-cost-usd"]) == 0.0
    assert set(app.gateway.meters) == {"vllm"}
