"""A client that goes away cancels the upstream call: before the first byte, mid-stream, unary."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import MutableMapping
from typing import Any

import httpx
import pytest

from gateway.app import TurnoutApp
from gateway.errors import ConnectionGone
from gateway.tokens import TokenCounter
from tests.fakes import Recorder
from tests.integration.conftest import Upstreams, base_config, build_app

USER = [{"role": "user", "content": "hi"}]
# DESIGN.md: cancelled within 100 ms of Turnout noticing; allow for noticing and thread hops.
CLOSE_WITHIN_S = 0.5


def _records(app: TurnoutApp, model: str) -> list[int]:
    return [r.status for r in app.gateway.records if r.variant == model]


def test_disconnect_mid_stream_closes_upstream(
    gateway: tuple[str, TurnoutApp], recorder: Recorder
) -> None:
    url, app = gateway
    body = {"model": "stream-slow", "messages": USER, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=10) as response:
        assert response.status_code == 200
        events = response.iter_raw()
        next(events)
        next(events)
        left_at = time.monotonic()
    noticed = recorder.wait_disconnect("stream-slow", timeout=3)
    assert noticed is not None, "the upstream never saw the client leave"
    assert noticed - left_at < CLOSE_WITHIN_S
    _wait_for(lambda: _records(app, "stream-slow") == [499])
    assert app.gateway.upstreams["hosted"].in_flight == [0]
    # No usage came: what was relayed is counted, marked as an estimate.
    record = next(r for r in app.gateway.records if r.variant == "stream-slow")
    counter = TokenCounter()
    assert record.usage.estimated and record.usage.prompt == counter.chat(USER)
    # The fake streams "0 ", "1 ", …: the count is tiktoken's for some prefix of those pieces
    # (the gateway may have relayed a little more than this client read before leaving).
    prefixes = [counter.texts(f"{i} " for i in range(k)) for k in range(2, 200)]
    assert record.usage.completion in prefixes


@pytest.mark.parametrize(("model", "stream"), [("hang", False), ("slow-first-token", True)])
def test_disconnect_before_first_byte_closes_upstream(
    upstreams: object, recorder: Recorder, model: str, stream: bool
) -> None:
    from tests.integration.conftest import base_config, running

    # Long upstream deadlines, so only the client's leaving can end the call.
    with running(base_config(upstreams, first_byte=30, total=30)) as (url, app):  # type: ignore[arg-type]
        body = {"model": model, "messages": USER, "stream": stream}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", json=body, timeout=0.4)
        left_at = time.monotonic()
        noticed = recorder.wait_disconnect(model, timeout=3)
        assert noticed is not None, "the upstream never saw the client leave"
        assert noticed - left_at < CLOSE_WITHIN_S
        _wait_for(lambda: _records(app, model) == [499])
        assert app.gateway.upstreams["hosted"].in_flight == [0]


def _wait_for(condition: object, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


async def test_a_stream_whose_start_cannot_be_sent_is_still_closed(upstreams: Upstreams) -> None:
    """The client left between the first upstream event and the response head: `send` raises
    (ConnectionGone, as Turnout's connection guard does) on http.response.start, so the stream
    is never iterated — its upstream call, replica slot and record must still be settled."""
    app = build_app(base_config(upstreams))
    await app.gateway.start()
    try:
        body = json.dumps({"model": "stream-slow", "messages": USER, "stream": True}).encode()
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions", "root_path": "", "query_string": b"",
            "headers": [(b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 5555), "server": ("127.0.0.1", 80),
        }  # fmt: skip
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await asyncio.Event().wait()  # the disconnect is seen by `send`, not here
            raise AssertionError

        async def send(message: MutableMapping[str, Any]) -> None:
            raise ConnectionGone("the client's connection is closed")

        await app(scope, receive, send)
        upstream = app.gateway.upstreams["hosted"]
        assert upstream.in_flight == [0]
        assert upstream.pool is not None and upstream.pool.open_connections() == 0
        assert [r.status for r in app.gateway.records if r.variant == "stream-slow"] == [499]
    finally:
        await app.gateway.aclose()
