"""Streaming through Turnout: byte-faithful relay, usage handling, failures after the first byte."""

from __future__ import annotations

import time

import httpx
import msgspec
import openai
import pytest

from gateway.app import TurnoutApp
from gateway.tokens import TokenCounter
from tests.fakes import OK_PIECES, OK_TEXT, PROMPT_TOKENS, SECRET, Recorder
from tests.integration.conftest import Upstreams

USER = [{"role": "user", "content": "hi"}]


def _stream_bytes(url: str, body: dict[str, object]) -> tuple[httpx.Response, bytes]:
    with httpx.stream("POST", url, json=body, timeout=10) as response:
        return response, response.read()


def _events(raw: bytes) -> list[bytes]:
    return [e for e in raw.split(b"\n\n") if e]


def _direct(upstreams: Upstreams, body: dict[str, object]) -> bytes:
    direct = dict(body, stream_options={"include_usage": True})
    return _stream_bytes(upstreams.urls[0] + "/v1/chat/completions", direct)[1]


@pytest.mark.parametrize("model", ["ok", "sliced"])
def test_stream_without_usage_is_upstream_bytes_minus_usage_chunk(
    url: str, upstreams: Upstreams, recorder: Recorder, model: str
) -> None:
    body = {"model": model, "messages": USER, "stream": True}
    response, through = _stream_bytes(url + "/v1/chat/completions", body)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-turnout-variant"] == model
    assert recorder.last().json["stream_options"] == {"include_usage": True}
    direct = _direct(upstreams, body)
    usage_events = [e for e in _events(direct) if b'"choices":[]' in e]
    assert len(usage_events) == 1
    assert through == direct.replace(usage_events[0] + b"\n\n", b"")
    assert through.endswith(b"data: [DONE]\n\n")


def test_stream_with_usage_is_byte_identical(url: str, upstreams: Upstreams) -> None:
    body = {
        "model": "ok",
        "messages": USER,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    _, through = _stream_bytes(url + "/v1/chat/completions", body)
    direct = _direct(upstreams, body)
    ours, theirs = _events(through), _events(direct)
    usage_at = next(i for i, e in enumerate(theirs) if b'"choices":[]' in e)
    # Every event is the upstream's own bytes, but the usage chunk, which gains cost_usd.
    assert ours[:usage_at] + ours[usage_at + 1 :] == theirs[:usage_at] + theirs[usage_at + 1 :]
    mine = msgspec.json.decode(ours[usage_at].removeprefix(b"data: "))
    upstream = msgspec.json.decode(theirs[usage_at].removeprefix(b"data: "))
    assert mine["usage"].pop("cost_usd") == 0.0  # the `ok` variant has no price
    assert mine == upstream


def test_openai_client_stream_with_and_without_usage(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="ok", messages=USER, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == OK_TEXT
    assert all(c.usage is None for c in chunks)
    chunks = list(
        client.chat.completions.create(
            model="ok", messages=USER, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == PROMPT_TOKENS


def test_streamed_completions(client: openai.OpenAI, recorder: Recorder) -> None:
    chunks = list(client.completions.create(model="ok", prompt="hi", stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == OK_TEXT
    assert recorder.last().json["stream_options"] == {"include_usage": True}


def test_client_stream_options_are_kept(url: str, recorder: Recorder) -> None:
    body = {
        "model": "ok",
        "messages": USER,
        "stream": True,
        "stream_options": {"include_usage": False, "continuous_usage_stats": True},
    }
    _stream_bytes(url + "/v1/chat/completions", body)
    assert recorder.last().json["stream_options"] == {
        "include_usage": True,
        "continuous_usage_stats": True,
    }


def test_upstream_that_ignores_usage_still_streams(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="no-usage", messages=USER, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == OK_TEXT


def test_last_frame_without_newline_is_completed(url: str) -> None:
    body = {"model": "no-trailing-newline", "messages": USER, "stream": True}
    _, through = _stream_bytes(url + "/v1/chat/completions", body)
    assert through.endswith(b"data: [DONE]\n\n")
    assert b'"error"' not in through


@pytest.mark.parametrize("model", ["stream-cut", "stream-reset"])
def test_stream_failure_after_first_byte_ends_with_error_event(
    url: str, model: str, recorder: Recorder
) -> None:
    body = {"model": model, "messages": USER, "stream": True}
    response, through = _stream_bytes(url + "/v1/chat/completions", body)
    assert response.status_code == 200
    events = _events(through)
    assert b"[DONE]" not in through
    assert b'"finish_reason":"stop"' not in through
    last = msgspec.json.decode(events[-1].removeprefix(b"data: "))
    assert last["error"]["type"] == "upstream_error"
    assert len([r for r in recorder.received if r.json and r.json.get("model") == model]) == 1


def test_openai_client_raises_on_cut_stream(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(model="stream-cut", messages=USER, stream=True))


def test_stall_after_first_byte_ends_with_timeout_event(url: str) -> None:
    body = {"model": "stream-slow", "messages": USER, "stream": True}
    # stream-slow takes 10 s in all; the gateway fixture's total deadline is 5 s.
    _, through = _stream_bytes(url + "/v1/chat/completions", body)
    last = msgspec.json.decode(_events(through)[-1].removeprefix(b"data: "))
    assert last["error"]["type"] == "timeout_error"
    assert b"[DONE]" not in through


def test_failure_before_first_event_is_a_json_error(url: str) -> None:
    response = httpx.post(
        url + "/v1/chat/completions",
        json={"model": "error-500", "messages": USER, "stream": True},
    )
    assert response.status_code == 502
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["code"] == "upstream_error"
    assert response.headers["x-turnout-variant"] == "error-500"


def test_first_byte_deadline_covers_headers_and_first_event(url: str) -> None:
    # Headers come at once, the first event after 2 s; the fixture's first-byte limit is 1 s.
    started = time.monotonic()
    response = httpx.post(
        url + "/v1/chat/completions",
        json={"model": "slow-first-event", "messages": USER, "stream": True},
    )
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"
    assert time.monotonic() - started < 1.9


def test_error_as_first_event_is_a_json_error(url: str) -> None:
    response = httpx.post(
        url + "/v1/chat/completions",
        json={"model": "first-event-error", "messages": USER, "stream": True},
    )
    assert response.status_code == 502
    assert "model overloaded" in response.json()["error"]["message"]
    assert SECRET not in response.text


def test_comment_before_first_event_is_relayed(url: str) -> None:
    body = {"model": "keepalive-first", "messages": USER, "stream": True}
    response, through = _stream_bytes(url + "/v1/chat/completions", body)
    assert response.status_code == 200
    assert through.startswith(b": keepalive\n\n")
    assert through.endswith(b"data: [DONE]\n\n")


def test_upstream_connection_is_reused_after_a_stream(url: str, recorder: Recorder) -> None:
    body = {"model": "ok", "messages": USER, "stream": True}
    for _ in range(3):
        _stream_bytes(url + "/v1/chat/completions", body)
    peers = {r.peer for r in recorder.received}
    assert len(peers) == 1, peers


def test_stream_without_upstream_usage_is_estimated(gateway: tuple[str, TurnoutApp]) -> None:
    url, app = gateway
    body = {"model": "no-usage", "messages": USER, "stream": True}
    response, _ = _stream_bytes(url + "/v1/chat/completions", body)
    record = app.gateway.records.find(response.headers["x-request-id"])
    assert record is not None and record.status == 200
    counter = TokenCounter()
    assert record.usage.estimated
    assert record.usage.completion == counter.texts(OK_PIECES)
    assert record.usage.prompt == counter.chat(USER)


def test_reported_usage_is_recorded(gateway: tuple[str, TurnoutApp]) -> None:
    url, app = gateway
    response, _ = _stream_bytes(
        url + "/v1/chat/completions", {"model": "ok", "messages": USER, "stream": True}
    )
    record = app.gateway.records.find(response.headers["x-request-id"])
    assert record is not None and not record.usage.estimated
    assert (record.usage.prompt, record.usage.completion) == (PROMPT_TOKENS, len(OK_PIECES))
    latency = record.latency
    assert latency.ttft is not None and 0 < latency.ttft <= latency.total
    assert latency.tpot is not None and latency.tpot >= 0
    assert latency.upstream > 0 and latency.overhead >= 0
    assert latency.upstream + latency.overhead == pytest.approx(latency.total)
