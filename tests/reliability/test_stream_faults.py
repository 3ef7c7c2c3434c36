"""Issue #9, rows 6-8: streams that fail — slow to start, stalled, cut, garbled, unterminated,
sliced into single bytes — and what the client sees of them.

The faults sit in tests/reliability/faultproxy.py between Turnout and the fake upstream (or in
the fake itself: a malformed event, a stream with no [DONE]). A stream that did not end as the
upstream meant must never look complete: no `[DONE]` and no `finish_reason: stop` that the
upstream did not send, and a final error event instead, which the openai client raises.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest

from tests.fakes import OK_TEXT
from tests.integration.conftest import Upstreams, base_config, running
from tests.reliability import faultproxy
from tests.reliability.faultproxy import (
    USER,
    FaultProxy,
    direct_stream,
    events,
    fake_upstreams,
    first_chunk_bytes,
    last_json,
    metric,
    record_of,
    sent_by,
    stream,
)

FIRST_BYTE_S = 1.0
IDLE_S = 1.0
DEADLINES = {"connect": 1.0, "first_byte": FIRST_BYTE_S, "idle": IDLE_S, "total": 10.0}
DONE = b"data: [DONE]"
STOP = b'"finish_reason":"stop"'
# Faults that strike after the first event reached the client: proxy name -> Fault maker,
# given the size of the first event's HTTP chunk.
AFTER_FIRST_EVENT: dict[str, Callable[[int], faultproxy.Fault]] = {
    "cut": lambda first: faultproxy.cut_after(first + 10),  # mid second event, closed
    "reset": lambda first: faultproxy.reset_after(first + 10),  # mid second event, RST
    "stall": lambda first: faultproxy.stall_after(first + 10),  # mid second event, silence
    "garble": lambda first: faultproxy.garble_after(first),  # a bad chunk size next
}


@dataclass
class Rig:
    """One gateway over the fake upstream, directly and through a proxy per fault."""

    url: str
    fake: Upstreams
    proxies: dict[str, FaultProxy]


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    with fake_upstreams() as fake, contextlib.ExitStack() as stack:
        first = first_chunk_bytes(fake.urls[0], "ok")
        faults = {name: make(first) for name, make in AFTER_FIRST_EVENT.items()}
        faults |= {"sliced": faultproxy.sliced(), "slow": faultproxy.delayed(2 * FIRST_BYTE_S)}
        proxies = {
            name: stack.enter_context(FaultProxy(fake.urls[0], fault))
            for name, fault in faults.items()
        }
        config = base_config(fake, **DEADLINES)
        config["variants"]["stream-no-done"] = {"upstream": "hosted", "model": "stream-no-done"}
        config["routes"]["stream-no-done"] = {"split": {"stream-no-done": 1}}
        for name, proxy in proxies.items():
            config["upstreams"][f"h-{name}"] = {
                "kind": "openai", "base_url": proxy.url + "/v1", "timeouts": DEADLINES
            }  # fmt: skip
            config["upstreams"][f"v-{name}"] = {
                "kind": "vllm", "urls": [proxy.url], "timeouts": DEADLINES
            }  # fmt: skip
            for kind in ("h", "v"):
                variant = f"{kind}-{name}"
                config["variants"][variant] = {"upstream": variant, "model": "ok"}
                config["routes"][variant] = {"split": {variant: 1}, "fallback": ["ok"]}
        with running(config) as (url, _):
            yield Rig(url, fake, proxies)


def _user() -> str:
    return f"user-{uuid.uuid4().hex[:12]}"


def _figure(row: int, text: str) -> None:
    print(f"FIGURE row {row}: {text}")


def _openai(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=15)


def _assert_not_shown_complete(raw: bytes, *, upstream_stopped: bool = False) -> dict[str, Any]:
    """The stream ends with an error event; no [DONE], and no finish_reason "stop" unless the
    upstream itself sent one. Returns the error."""
    assert DONE not in raw, raw[-300:]
    if not upstream_stopped:
        assert STOP not in raw, raw[-300:]
    last = last_json(raw)
    assert set(last) == {"error"}, last
    error: dict[str, Any] = last["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def _text(client: openai.OpenAI, model: str) -> str:
    """The answer as the openai client assembles it from the stream."""
    chunks = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# --- row 6 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["v", "h"], ids=["self-hosted", "hosted"])
def test_row06a_slow_first_token_before_any_byte_falls_back(rig: Rig, kind: str) -> None:
    """Row 6, first half: the upstream holds back its first byte (2 s) past the first-byte
    deadline (1 s), before anything went to the client. A self-hosted upstream's request is
    abandoned (its connection closed at once) and the fallback answers the whole stream. A
    hosted (billed) upstream may already be generating, so it is not paid twice: 504 within
    the first-byte deadline + 1 s, the fallback not called."""
    user, route = _user(), f"{kind}-slow"
    proxy = rig.proxies["slow"]
    got = stream(rig.url, {"model": route, "messages": USER, "stream": True, "user": user})
    seconds = got.ended_at - got.started
    assert seconds < FIRST_BYTE_S + 1.0, f"answered after {seconds:.2f} s"
    abandoned = proxy.wait_open(0, timeout=1.0)
    assert abandoned is not None, "the slow upstream's connection was left open"
    if kind == "v":
        assert got.response.status_code == 200
        assert got.response.headers["x-turnout-variant"] == "ok"
        assert got.raw.endswith(DONE + b"\n\n")
        assert sent_by(rig.fake.recorder, user) == 2  # the slow one, then the fallback
    else:
        assert got.response.status_code == 504
        assert json.loads(got.raw)["error"]["code"] == "upstream_timeout"
        assert sent_by(rig.fake.recorder, user) == 1
    what = "fallback answered" if kind == "v" else "504"
    _figure(6, f"slow first token, {'self-hosted' if kind == 'v' else 'hosted'}: {what} "
               f"after {seconds:.2f} s (first-byte deadline {FIRST_BYTE_S} s)")  # fmt: skip


def test_row06b_stall_after_bytes_sent_ends_with_error_event_within_idle_deadline(
    rig: Rig,
) -> None:
    """Row 6, second half: the upstream stalls after its first event reached the client. The
    stream ends with an error event (timeout_error) within the idle deadline (1 s) + 1 s of
    the last byte; no `[DONE]`, no `finish_reason: stop` invented, no fallback."""
    user = _user()
    got = stream(rig.url, {"model": "v-stall", "messages": USER, "stream": True, "user": user})
    assert got.response.status_code == 200 and got.first_at is not None
    error = _assert_not_shown_complete(got.raw)
    assert error["type"] == "timeout_error", error
    assert len(events(got.raw)) == 2  # the first event, then the error
    waited = got.ended_at - got.first_at
    assert waited < IDLE_S + 1.0, f"error event {waited:.2f} s after the last byte"
    assert sent_by(rig.fake.recorder, user) == 1
    assert rig.proxies["stall"].wait_open(0, timeout=1.0) is not None
    _figure(6, f"stall after first event: error event {waited:.2f} s after it (idle {IDLE_S} s)")


# --- row 7 -------------------------------------------------------------------------------------

# route -> (what the fault is, does the stream end as the upstream meant it to?)
ROW7 = {
    "h-cut": ("connection closed mid-event", False),
    "h-garble": ("malformed HTTP chunk (bad chunk size)", False),
    "stream-garbage-late": ("malformed SSE chunk (bad JSON), relayed as sent", True),
    "stream-no-done": ("clean end after finish and usage, no [DONE]", False),
    "no-trailing-newline": ("last frame without its blank line", True),
    "h-sliced": ("every byte of the response a write of its own", True),
}


@pytest.mark.parametrize("route", list(ROW7))
def test_row07_cut_malformed_unterminated_or_sliced_stream_never_shown_complete(
    rig: Rig, route: str
) -> None:
    """Row 7: a stream cut, a malformed chunk (HTTP framing, or an SSE event that is not
    JSON), no `[DONE]`, a last frame without its newline, and bytes sliced one at a time.
    Never a truncated answer shown as complete: what did not end as the upstream meant ends in
    an error event (which the openai client raises); what did is the upstream's bytes exactly
    (sliced: reassembled byte-identical; the usage chunk Turnout asked for removed)."""
    what, whole = ROW7[route]
    model = "ok" if route.startswith("h-") else route  # what the upstream is asked for
    got = stream(rig.url, {"model": route, "messages": USER, "stream": True})
    assert got.response.status_code == 200
    client = _openai(rig.url)
    if not whole:
        _assert_not_shown_complete(got.raw, upstream_stopped=route == "stream-no-done")
        with pytest.raises(openai.APIError):
            _text(client, route)
        _figure(7, f"{what}: ends in an error event, no [DONE]; the openai client raises")
        return
    direct, usage = direct_stream(rig.fake.urls[0], {"model": model, "messages": USER})
    expected = direct.replace(usage, b"")
    if route == "no-trailing-newline":
        assert direct.endswith(DONE) and not direct.endswith(b"\n\n")
        expected += b"\n\n"  # the last event completed, nothing else changed
    assert got.raw == expected
    if route == "h-sliced":  # the proxy did write every byte on its own
        conns = rig.proxies["sliced"].conns
        assert all(c.writes == c.down for c in conns) and sum(c.down for c in conns) > len(got.raw)
    if route == "stream-garbage-late":  # faithful: the client sees the garbage, so it raises
        with pytest.raises(ValueError):
            _text(client, route)
    else:
        assert _text(client, route) == OK_TEXT
    _figure(7, f"{what}: {len(got.raw)} bytes, byte-identical to the upstream's")


def test_row07_sliced_unary_answer_is_byte_identical(rig: Rig) -> None:
    """Row 7, non-streaming: a JSON answer arriving one byte per write is reassembled
    byte-identical."""
    response = faultproxy.chat(rig.url, {"model": "h-sliced", "messages": USER}).response
    direct = faultproxy.chat(rig.fake.urls[0], {"model": "ok", "messages": USER}).response
    assert response.status_code == 200 and response.content == direct.content


# --- row 8 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", list(AFTER_FIRST_EVENT))
def test_row08_failure_after_first_byte_makes_zero_fallback_attempts(rig: Rig, fault: str) -> None:
    """Row 8: the upstream fails after its first event went to the client (closed, reset,
    stalled, garbled), on a self-hosted upstream where a repeat would cost nothing and a
    fallback is configured. Zero fallback attempts: the stream ends with an error event, the
    upstream saw one request, the record says one attempt, no fallback is counted."""
    user, route = _user(), f"v-{fault}"
    fallbacks = metric(rig.url, "turnout_fallbacks_total", route=route)
    got = stream(rig.url, {"model": route, "messages": USER, "stream": True, "user": user})
    assert got.response.status_code == 200
    _assert_not_shown_complete(got.raw)
    assert sent_by(rig.fake.recorder, user) == 1
    record = record_of(rig.url, got.response.headers["x-request-id"])
    assert record["attempts"] == 1 and record["status"] in (502, 504), record
    assert metric(rig.url, "turnout_fallbacks_total", route=route) == fallbacks
    _figure(8, f"{fault} after the first event: 0 fallback attempts, record {record['status']}")
