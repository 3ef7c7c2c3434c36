"""Fallbacks, retries, the retry budget and circuit breakers against real sockets."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import pytest

from tests.fakes import Recorder
from tests.integration.conftest import Upstreams, base_config, running
from tests.servers import serve_app

USER = [{"role": "user", "content": "hi"}]


class ResettingServer:
    """A TCP server that reads a whole HTTP request, then drops the connection unanswered."""

    def __init__(self) -> None:
        self.requests = 0
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(next(
                    line.split(b":")[1] for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                ))  # fmt: skip
                while len(body) < length:
                    body += conn.recv(65536)
                self.requests += 1
                conn.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def resetting() -> Iterator[ResettingServer]:
    server = ResettingServer()
    yield server
    server.close()


def _with_routes(config: dict[str, Any], **routes: dict[str, Any]) -> dict[str, Any]:
    config["routes"] |= routes
    return config


def _count(recorder: Recorder, model: str) -> int:
    return sum(
        1 for r in recorder.received if isinstance(r.json, dict) and r.json.get("model") == model
    )


def _chat(url: str, model: str, **extra: Any) -> httpx.Response:
    return httpx.post(
        url + "/v1/chat/completions", json={"model": model, "messages": USER, **extra}, timeout=15
    )


def test_primary_503_falls_back(upstreams: Upstreams, recorder: Recorder) -> None:
    config = _with_routes(base_config(upstreams), r={"split": {"error-503": 1}, "fallback": ["ok"]})
    with running(config) as (url, app):
        response = _chat(url, "r")
        assert response.status_code == 200
        assert response.headers["x-turnout-variant"] == "ok"
        record = app.gateway.records.find(response.headers["x-request-id"])
        assert record is not None and record.attempts == 2 and record.variant == "ok"
        metrics = httpx.get(url + "/metrics").text
    assert 'turnout_fallbacks_total{route="r"} 1.0' in metrics
    assert (_count(recorder, "error-503"), _count(recorder, "ok")) == (1, 1)


@pytest.mark.parametrize(("model", "status"), [("error-401", 200), ("error-400", 400)])
def test_setup_failures_fall_back_request_failures_do_not(
    upstreams: Upstreams, recorder: Recorder, model: str, status: int
) -> None:
    config = _with_routes(base_config(upstreams), r={"split": {model: 1}, "fallback": ["ok"]})
    with running(config) as (url, _):
        assert _chat(url, "r").status_code == status
    assert _count(recorder, model) == 1
    assert _count(recorder, "ok") == (1 if status == 200 else 0)


def test_hosted_upstream_that_resets_after_the_body_is_tried_once(
    upstreams: Upstreams, recorder: Recorder, resetting: ResettingServer
) -> None:
    config = base_config(upstreams)
    config["upstreams"]["flaky-hosted"] = {"kind": "openai", "base_url": resetting.url + "/v1"}
    config["upstreams"]["flaky-vllm"] = {"kind": "vllm", "urls": [resetting.url]}
    config["variants"] |= {
        "hosted-reset": {"upstream": "flaky-hosted", "model": "m"},
        "vllm-reset": {"upstream": "flaky-vllm", "model": "m"},
    }
    _with_routes(
        config,
        billed={"split": {"hosted-reset": 1}, "fallback": ["ok"]},
        free={"split": {"vllm-reset": 1}, "fallback": ["ok"]},
    )
    with running(config) as (url, _):
        billed = _chat(url, "billed")
        assert billed.status_code == 502  # may have been accepted: never sent twice
        assert resetting.requests == 1 and _count(recorder, "ok") == 0
        free = _chat(url, "free")  # self-hosted: a repeat costs nothing, so fall back
        assert free.status_code == 200 and free.headers["x-turnout-variant"] == "ok"


def test_failure_after_first_chunk_is_not_retried(upstreams: Upstreams, recorder: Recorder) -> None:
    config = _with_routes(
        base_config(upstreams), r={"split": {"stream-cut": 1}, "fallback": ["ok"]}
    )
    with (
        running(config) as (url, _),
        httpx.stream(
            "POST",
            url + "/v1/chat/completions",
            json={"model": "r", "messages": USER, "stream": True},
        ) as response,
    ):
        raw = response.read()
    last = msgspec.json.decode(raw.strip().split(b"\n\n")[-1].removeprefix(b"data: "))
    assert "error" in last and b"[DONE]" not in raw
    assert _count(recorder, "ok") == 0


def test_retry_budget_bounds_attempts_against_a_dead_upstream(
    upstreams: Upstreams, recorder: Recorder
) -> None:
    config = _with_routes(
        base_config(upstreams), r={"split": {"error-503": 1}, "fallback": ["error-500"]}
    )
    clients = 64

    async def burst(url: str) -> list[int]:
        async with httpx.AsyncClient(timeout=15, limits=httpx.Limits(max_connections=clients)) as c:
            body = {"model": "r", "messages": USER}
            replies = await asyncio.gather(
                *(c.post(url + "/v1/chat/completions", json=body) for _ in range(clients))
            )
        return [r.status_code for r in replies]

    with running(config) as (url, _):
        for _ in range(3):
            assert set(asyncio.run(burst(url))) == {502}
    attempts = _count(recorder, "error-503") + _count(recorder, "error-500")
    assert attempts <= 1.2 * clients * 3 + 3, attempts


def test_flapping_upstream_fails_over_and_comes_back() -> None:
    state = {"down": False}
    served = {"primary": 0}

    async def primary(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        status = 503 if state["down"] else 200
        served["primary"] += 1
        body = b'{"error": {"message": "down"}}' if state["down"] else _ANSWER
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})

    from tests.fakes import create_fake_upstream

    fake, _ = create_fake_upstream()
    with serve_app(primary) as primary_url, serve_app(fake) as fallback_url:
        config = {
            "upstreams": {
                "p": {"kind": "vllm", "urls": [primary_url]},
                "f": {"kind": "openai", "base_url": fallback_url + "/v1"},
            },
            "variants": {
                "main": {"upstream": "p", "model": "m"},
                "spare": {"upstream": "f", "model": "ok"},
            },
            "routes": {"r": {"split": {"main": 1}, "fallback": ["spare"]}},
            "routing": {"breaker": {"consecutive_failures": 3, "cooldown_s": 0.5}},
        }
        with running(config) as (url, app):
            with httpx.Client(timeout=10) as client:
                variants = [_served_by(client, url) for _ in range(5)]
                assert variants == ["main"] * 5
                state["down"] = True
                before, started = served["primary"], time.monotonic()
                outage = [_served_by(client, url) for _ in range(100)]
                assert outage.count("spare") >= 95
                # The circuit opens after 3 failures; then one half-open probe per cool-down.
                probes = (time.monotonic() - started) / 0.5 + 1
                assert served["primary"] - before <= 3 + probes
                # Right after a request the circuit is open (or its probe just failed and
                # reopened it); a loaded machine may let a cool-down pass before /readyz.
                assert any(
                    _served_by(client, url) == "spare"
                    and httpx.get(url + "/readyz").json()["degraded"]
                    for _ in range(5)
                )
                state["down"] = False
                recovered_at = time.monotonic()
                while _served_by(client, url) != "main":
                    assert time.monotonic() - recovered_at < 0.5 + 1.0, "never back on primary"
                    time.sleep(0.02)
                assert [_served_by(client, url) for _ in range(5)] == ["main"] * 5
            assert app.gateway.degraded() == []


_ANSWER = msgspec.json.encode(
    {
        "id": "x", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
)  # fmt: skip


def _served_by(client: httpx.Client, url: str) -> str:
    response = client.post(url + "/v1/chat/completions", json={"model": "r", "messages": USER})
    assert response.status_code == 200, response.text
    return response.headers["x-turnout-variant"]


def test_rate_limited_upstream_falls_back_or_passes_retry_after(
    upstreams: Upstreams, recorder: Recorder
) -> None:
    config = _with_routes(
        base_config(upstreams, total=5.0),
        alone={"split": {"error-429": 1}},
        helped={"split": {"error-429": 1}, "fallback": ["ok"]},
    )
    with running(config) as (url, _):
        alone = _chat(url, "alone")  # Retry-After 7 s does not fit a 5 s deadline
        assert alone.status_code == 429 and alone.headers["retry-after"] == "7"
        helped = _chat(url, "helped")
        assert helped.status_code == 200 and helped.headers["x-turnout-variant"] == "ok"


def test_billed_stream_that_ends_before_any_event_is_not_resent(
    upstreams: Upstreams, recorder: Recorder
) -> None:
    config = _with_routes(
        base_config(upstreams), r={"split": {"stream-empty": 1}, "fallback": ["ok"]}
    )
    with running(config) as (url, _):
        response = _chat(url, "r", stream=True)
    assert response.status_code == 502
    assert (_count(recorder, "stream-empty"), _count(recorder, "ok")) == (1, 0)


def test_running_out_of_time_blames_no_one_else(upstreams: Upstreams, recorder: Recorder) -> None:
    config = base_config(upstreams, first_byte=30.0, total=1.0)
    config["variants"]["vllm-hang"] = {"upstream": "vllm", "model": "hang"}
    _with_routes(config, r={"split": {"vllm-hang": 1}, "fallback": ["ok"]})
    with running(config) as (url, app):
        response = _chat(url, "r")
        record = app.gateway.records.find(response.headers["x-request-id"])
    assert response.status_code == 504
    assert record is not None and record.attempts == 1 and record.variant == "vllm-hang"
    assert _count(recorder, "ok") == 0
    assert app.gateway.breakers.last_failure("ok") == float("-inf")
    assert app.gateway.breakers.open_circuits(time.monotonic()) == []


def test_split_avoids_a_variant_whose_circuit_is_open(upstreams: Upstreams) -> None:
    config = _with_routes(base_config(upstreams), r={"split": {"error-503": 1, "ok": 1}})
    config["routing"] = {"breaker": {"consecutive_failures": 2, "cooldown_s": 60}}
    with running(config) as (url, _):
        statuses = [_chat(url, "r").status_code for _ in range(40)]
    assert statuses.count(502) <= 2  # until the circuit opened; then only `ok` is drawn


def test_retry_after_is_not_waited_when_no_attempt_may_follow(upstreams: Upstreams) -> None:
    config = _with_routes(base_config(upstreams, total=20.0), r={"split": {"error-429": 1}})
    config["routing"] = {"max_attempts": 1}
    with running(config) as (url, _):
        started = time.monotonic()
        response = _chat(url, "r")
    assert response.status_code == 429 and time.monotonic() - started < 2.0
