"""A client that goes away cancels the upstream call: before the first byte, mid-stream, unary."""

from __future__ import annotations

import time

import httpx
import pytest

from gateway.app import TurnoutApp
from gateway.tokens import TokenCounter
from tests.fakes import Recorder

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
