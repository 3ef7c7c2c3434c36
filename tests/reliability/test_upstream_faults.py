"""Issue #9, rows 1-5, 13 and 14: upstream faults before any byte reached the client.

Every fault is real: status codes from the fake upstream on its own socket, and resets,
refusals, black holes and silence from tests/reliability/faultproxy.py. Each test reads what a
client sees (status, OpenAI error, time taken, headers) and what Turnout recorded (records API,
/metrics); the upstream side counts what really reached it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fakes import FORBIDDEN, SECRET
from tests.integration.conftest import UPSTREAM_KEY, Upstreams, base_config, running
from tests.reliability import faultproxy
from tests.reliability.faultproxy import (
    PASS,
    USER,
    FaultProxy,
    black_hole,
    chat,
    fake_upstreams,
    metric,
    record_of,
    refused_url,
    sent_by,
)

CONNECT_S = 1.0
FIRST_BYTE_S = 1.0
TOTAL_S = 5.0
DEADLINES = {"connect": CONNECT_S, "first_byte": FIRST_BYTE_S, "idle": 1.0, "total": TOTAL_S}


@pytest.fixture(scope="module")
def fake() -> Iterator[Upstreams]:
    with fake_upstreams() as upstreams:
        yield upstreams


def _user() -> str:
    return f"user-{uuid.uuid4().hex[:12]}"


def _config(fake: Upstreams, **timeouts: float) -> dict[str, Any]:
    return base_config(fake, **(DEADLINES | timeouts))


def _at(url: str, kind: str, **timeouts: float) -> dict[str, Any]:
    """An upstream of `kind` at `url` (a fault proxy, a refused port, a black hole)."""
    limits = DEADLINES | timeouts
    if kind == "openai":
        return {"kind": "openai", "base_url": url + "/v1", "timeouts": limits}
    return {"kind": "vllm", "urls": [url], "timeouts": limits}


def _assert_openai_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code, body
    error: dict[str, Any] = body["error"]
    return error


def _figure(row: int, text: str) -> None:
    print(f"FIGURE row {row}: {text}")


# --- row 1 -------------------------------------------------------------------------------------

# (case, primary variant, fallbacks, status, error code, upstream attempts, least seconds)
ROW1 = [
    ("429-retry-after-1s-honoured", "once-429", [], 200, None, 2, 1.0),
    ("429-retry-after-7s-past-deadline", "error-429", [], 429, "upstream_rate_limited", 1, 0.0),
    ("429-no-retry-after", "once-429-bare", [], 429, "upstream_rate_limited", 1, 0.0),
    ("429-no-retry-after-fallback", "once-429-bare", ["ok"], 200, None, 2, 0.0),
    ("500-once-other-replica", "v-once-500", [], 200, None, 2, 0.0),
    ("500-once-fallback", "once-500", ["ok"], 200, None, 2, 0.0),
    ("500-once-no-fallback", "once-500", [], 502, "upstream_error", 1, 0.0),
    ("503-always", "v-error-503", ["error-503"], 502, "upstream_error", 3, 0.0),
]


def _row1_config(fake: Upstreams) -> dict[str, Any]:
    config = _config(fake)
    for model in ("once-429", "once-429-bare", "once-500"):
        config["variants"][model] = {"upstream": "hosted", "model": model}
    for model in ("once-500", "error-503"):  # self-hosted, two replicas
        config["variants"][f"v-{model}"] = {"upstream": "vllm", "model": model}
    for case, primary, fallback, *_ in ROW1:
        config["routes"][case] = {"split": {primary: 1}, "fallback": fallback}
    return config


@pytest.mark.parametrize(
    ("case", "status", "code", "attempts", "least_s"),
    [(c[0], *c[3:]) for c in ROW1],
    ids=[c[0] for c in ROW1],
)
def test_row01_upstream_429_500_503_bounded_attempts_retry_after_answer_in_deadline(
    fake: Upstreams,
    case: str,
    status: int,
    code: str | None,
    attempts: int,
    least_s: float,
) -> None:
    """Row 1: an upstream 429 (with and without Retry-After), a 500 once, a 503 always. The
    attempts are bounded (routing.max_attempts = 3), a Retry-After that fits the deadline is
    waited out and one that does not is passed on, and the client gets a 2xx or an OpenAI
    error of the right class within the request deadline (total 5 s). A gateway each, so
    that each case starts with the whole retry budget (its balance is a share of requests)."""
    user = _user()
    with running(_row1_config(fake)) as (url, _):
        timed = chat(url, {"model": case, "messages": USER, "user": user})
        record = record_of(url, timed.response.headers["x-request-id"])
    response = timed.response
    assert timed.seconds < TOTAL_S, f"{case}: answered after {timed.seconds:.2f} s"
    assert timed.seconds >= least_s, f"{case}: Retry-After not waited ({timed.seconds:.2f} s)"
    if code is None:
        assert response.status_code == status, response.text
        assert response.json()["choices"][0]["message"]["content"]
    else:
        error = _assert_openai_error(response, status, code)
        assert error["type"] == ("rate_limit_error" if status == 429 else "upstream_error")
    if case == "429-retry-after-7s-past-deadline":
        assert response.headers["retry-after"] == "7"  # the client may wait it out itself
    assert record["attempts"] == attempts == sent_by(fake.recorder, user)
    assert record["status"] == status
    _figure(1, f"{case}: {status} after {timed.seconds:.2f} s, {attempts} attempt(s)")


# --- row 2 -------------------------------------------------------------------------------------

CLIENTS = 64


async def _hammer(url: str, seconds: float, user: str) -> list[int]:
    """CLIENTS clients, each sending one request after another for `seconds`."""
    statuses: list[int] = []
    stop_at = time.monotonic() + seconds
    body = {"model": "dead", "messages": USER, "user": user}
    limits = httpx.Limits(max_connections=CLIENTS)

    async def client(http: httpx.AsyncClient) -> None:
        while time.monotonic() < stop_at:
            response = await http.post(url + "/v1/chat/completions", json=body)
            statuses.append(response.status_code)

    async with httpx.AsyncClient(timeout=30, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(CLIENTS)))
    return statuses


def _row2(fake: Upstreams, seconds: float, breaker: str) -> None:
    config = _config(fake)
    config["variants"]["v-error-503"] = {"upstream": "vllm", "model": "error-503"}
    config["routes"]["dead"] = {"split": {"v-error-503": 1}, "fallback": ["error-500"]}
    if breaker == "off":  # the retry budget alone must hold the line
        config["routing"] = {"breaker": {"consecutive_failures": 10**9, "min_requests": 10**9}}
    user = _user()
    with running(config) as (url, _):
        statuses = asyncio.run(_hammer(url, seconds, user))
    attempts = sent_by(fake.recorder, user)
    requests = len(statuses)
    assert set(statuses) == {502}, sorted(set(statuses))
    assert attempts <= 1.2 * requests + 3, f"{attempts} attempts for {requests} requests"
    _figure(
        2,
        f"breaker {breaker}, {seconds:g} s: {requests} requests, {attempts} upstream attempts "
        f"= {attempts / requests:.3f}x",
    )


@pytest.mark.parametrize("breaker", ["default", "off"])
def test_row02_total_upstream_failure_64_clients_attempts_within_retry_budget(
    fake: Upstreams, breaker: str
) -> None:
    """Row 2 (5 s form): every upstream fails (503 on both vLLM replicas, 500 on the
    fallback); 64 clients send requests back to back for 5 s. Upstream attempts <= 1.2 x
    client requests + 3, with circuit breakers on (the default) and off (retry budget only)."""
    _row2(fake, 5.0, breaker)


@pytest.mark.long
@pytest.mark.parametrize("breaker", ["default", "off"])
def test_row02_long_total_upstream_failure_64_clients_30s(
    fake: Upstreams, breaker: str, request: pytest.FixtureRequest
) -> None:
    """Row 2 (30 s form, -m long): as the 5 s form, for the issue's full 30 s."""
    faultproxy.skip_unless_long(request)
    _row2(fake, 30.0, breaker)


# --- row 3 -------------------------------------------------------------------------------------

# (case, where the upstream is, its kind, fallback?, the statuses allowed)
ROW3 = [
    ("refused", "refused", "openai", False, {502}),
    ("refused-fallback", "refused", "openai", True, {200}),
    ("black-hole", "hole", "openai", False, {502}),
    ("black-hole-fallback", "hole", "openai", True, {200}),
    ("reset", "reset", "openai", False, {502}),
    # A reset as the connection opens: whether the request had gone out is a race. If it may
    # have, a hosted (billed) upstream is not sent it twice (row 4): 502; if the client knows
    # it had not, the fallback answers. A self-hosted one is free to repeat: fallback.
    ("reset-billed-fallback", "reset", "openai", True, {200, 502}),
    ("reset-self-hosted-fallback", "reset", "vllm", True, {200}),
]


@contextlib.contextmanager
def _dead_end(where: str, fake: Upstreams) -> Iterator[str]:
    if where == "refused":
        with refused_url() as url:
            yield url
    elif where == "hole":
        with black_hole() as hole:
            yield hole.url
    else:
        with FaultProxy(fake.urls[0], faultproxy.reset()) as proxy:
            yield proxy.url


@pytest.mark.parametrize(
    ("where", "kind", "fallback", "status"), [c[1:] for c in ROW3], ids=[c[0] for c in ROW3]
)
def test_row03_refused_or_reset_before_headers_falls_back_or_502_within_connect_timeout(
    fake: Upstreams, where: str, kind: str, fallback: bool, status: set[int]
) -> None:
    """Row 3: connection refused, connect timeout (a black hole) or reset before the headers:
    the fallback answers, or the client gets a 502 within the connect timeout + 1 s."""
    with _dead_end(where, fake) as target:
        config = _config(fake)
        config["upstreams"]["dead"] = _at(target, kind)
        config["variants"]["dead"] = {"upstream": "dead", "model": "ok"}
        config["routes"]["r"] = {"split": {"dead": 1}, "fallback": ["ok"] if fallback else []}
        with running(config) as (url, _):
            timed = chat(url, {"model": "r", "messages": USER})
    response = timed.response
    assert response.status_code in status, response.text
    if response.status_code == 200:
        assert response.headers["x-turnout-variant"] == "ok"
    else:
        _assert_openai_error(response, 502, "upstream_error")
        assert response.headers["x-turnout-variant"] == "dead"
    assert timed.seconds < CONNECT_S + 1.0, f"answered after {timed.seconds:.2f} s"
    got = response.status_code
    _figure(3, f"{where}/{kind}/fallback={fallback}: {got} after {timed.seconds:.2f} s")


# --- row 4 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_row04_hosted_upstream_reads_body_then_resets_exactly_one_attempt(
    fake: Upstreams, stream: bool
) -> None:
    """Row 4: a hosted (billed) upstream reads the whole request, then resets the connection.
    Exactly one attempt reaches it, the fallback is not tried (no double billing), the client
    gets a 502, and the request is recorded as one attempt costing nothing."""
    user = _user()
    with FaultProxy(fake.urls[0], faultproxy.reset_after_request()) as proxy:
        config = _config(fake)
        config["upstreams"]["flaky"] = _at(proxy.url, "openai")
        config["variants"]["billed"] = {
            "upstream": "flaky",
            "model": "ok",
            "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0},
        }
        config["routes"]["r"] = {"split": {"billed": 1}, "fallback": ["ok"]}
        with running(config) as (url, _):
            timed = chat(url, {"model": "r", "messages": USER, "user": user, "stream": stream})
            record = record_of(url, timed.response.headers["x-request-id"])
            errors = metric(url, "turnout_upstream_attempts_total", upstream="flaky")
        assert (proxy.requests, proxy.connections) == (1, 1)
    _assert_openai_error(timed.response, 502, "upstream_error")
    assert sent_by(fake.recorder, user) == 0  # the fallback was never called
    assert (record["attempts"], record["status"], record.get("cost_usd", 0.0)) == (1, 502, 0.0)
    assert errors == 1
    _figure(4, f"{'stream' if stream else 'unary'}: 1 attempt, 502 after {timed.seconds:.2f} s")


# --- row 5 -------------------------------------------------------------------------------------

UNARY_TOTAL_S = 2.5


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "unary"])
def test_row05_silent_upstream_504_within_deadline_and_connection_closed(
    fake: Upstreams, stream: bool
) -> None:
    """Row 5: an upstream that accepts the connection and the request and never answers. The
    client gets a 504 within the deadline + 1 s (a stream: the first-byte deadline, 1 s; a
    non-streaming answer arrives whole, so the total deadline, 2.5 s, bounds it); the upstream
    connection is closed within 1 s; the next request is answered and leaves the pooled
    connection idle for reuse."""
    deadline = FIRST_BYTE_S if stream else UNARY_TOTAL_S
    with FaultProxy(fake.urls[0], faultproxy.stall()) as proxy:
        config = _config(fake)
        config["upstreams"]["silent"] = _at(proxy.url, "openai", total=UNARY_TOTAL_S)
        config["variants"]["silent"] = {"upstream": "silent", "model": "ok"}
        config["routes"]["r"] = {"split": {"silent": 1}}
        body = {"model": "r", "messages": USER, "stream": stream}
        with running(config) as (url, _):
            timed = chat(url, body)
            answered = time.monotonic()
            _assert_openai_error(timed.response, 504, "upstream_timeout")
            assert timed.seconds < deadline + 1.0, f"504 after {timed.seconds:.2f} s"
            closed = proxy.wait_open(0, timeout=1.0)
            assert closed is not None, "the silent upstream's connection was left open"
            proxy.fault = PASS
            assert chat(url, body).response.status_code == 200
            assert proxy.wait_open(1, timeout=1.0) is not None
            used = proxy.connections
            assert chat(url, body).response.status_code == 200
            assert proxy.connections == used, "the pooled connection was not reused"
            assert proxy.open_connections == 1
    _figure(
        5,
        f"{'stream' if stream else 'unary'}: 504 after {timed.seconds:.2f} s "
        f"(deadline {deadline} s), connection closed {closed - answered:+.3f} s after it",
    )


# --- row 13 ------------------------------------------------------------------------------------

COOLDOWN_S = 0.5


def _served_by(url: str, model: str, **extra: Any) -> httpx.Response:
    return chat(url, {"model": model, "messages": USER, **extra}).response


def test_row13_flapping_primary_served_by_fallback_back_within_cooldown_client_errors_no_circuit(
    fake: Upstreams,
) -> None:
    """Row 13: a self-hosted primary that goes down (every connection reset, open ones
    dropped) and comes back, three times. During each outage >= 95% of requests are served by
    the fallback (and all are answered); after it, traffic is back on the primary within the
    circuit's cool-down (+ 1 s). Then 15 client errors in a row (upstream 400, context length)
    on a variant whose circuit opens after 3 failures: it stays closed and keeps serving."""
    with FaultProxy(fake.urls[0]) as proxy:
        config = _config(fake)
        config["upstreams"]["primary"] = _at(proxy.url, "vllm")
        config["variants"]["main"] = {"upstream": "primary", "model": "ok"}
        config["variants"]["picky"] = {"upstream": "hosted", "model": "picky"}
        config["routes"]["r"] = {"split": {"main": 1}, "fallback": ["ok"]}
        config["routes"]["careful"] = {"split": {"picky": 1}, "fallback": ["ok"]}
        config["routing"] = {"breaker": {"consecutive_failures": 3, "cooldown_s": COOLDOWN_S}}
        with running(config) as (url, _):
            for flap in range(3):
                proxy.fault = PASS
                back_at = time.monotonic()
                while (response := _served_by(url, "r")).headers["x-turnout-variant"] != "main":
                    assert response.status_code == 200, response.text
                    assert time.monotonic() - back_at < COOLDOWN_S + 1.0, "not back on primary"
                    time.sleep(0.02)
                recovery = time.monotonic() - back_at
                assert all(
                    _served_by(url, "r").headers["x-turnout-variant"] == "main" for _ in range(10)
                )
                proxy.fault = faultproxy.reset()
                proxy.drop_all()
                before = proxy.connections
                replies = [_served_by(url, "r") for _ in range(60)]
                assert {r.status_code for r in replies} == {200}
                spare = sum(r.headers["x-turnout-variant"] == "ok" for r in replies)
                assert spare >= 0.95 * len(replies), f"{spare}/{len(replies)} by the fallback"
                _figure(
                    13,
                    f"flap {flap}: back on primary {recovery:.2f} s after it returned; outage: "
                    f"{spare}/60 by fallback, {proxy.connections - before} primary attempts",
                )
            user, prompt = _user(), [{"role": "user", "content": "word " * 5000}]
            for _ in range(15):
                error = _served_by(url, "careful", messages=prompt, user=user)
                _assert_openai_error(error, 400, "context_length_exceeded")
            assert sent_by(fake.recorder, user) == 15  # one attempt each, no fallback
            served = _served_by(url, "careful")
            assert served.status_code == 200 and served.headers["x-turnout-variant"] == "picky"
            degraded = faultproxy.get(url + "/readyz").json()["degraded"]
            assert not any("picky" in part for part in degraded), degraded
    _figure(13, "15 upstream 400s in a row: circuit stayed closed, variant still served")


# --- row 14 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("reason", ["context-length", "content-policy"])
def test_row14_upstream_400_context_length_or_content_policy_one_attempt_reason_sanitised(
    fake: Upstreams, reason: str, stream: bool
) -> None:
    """Row 14: the upstream refuses with a 400 (context length exceeded, content policy). One
    attempt (the fallback is not tried: another model would refuse the same request or, worse,
    answer what the policy refused), and the client gets a 400 whose message carries the
    upstream's reason with its secrets scrubbed and its code (what apps branch on) unchanged."""
    config = _config(fake)
    config["variants"]["picky"] = {"upstream": "hosted", "model": "picky"}
    config["routes"]["careful"] = {"split": {"picky": 1}, "fallback": ["ok"]}
    content = "word " * 5000 if reason == "context-length" else f"say something {FORBIDDEN}"
    user = _user()
    body = {"model": "careful", "messages": [{"role": "user", "content": content}]}
    with running(config) as (url, _):
        timed = chat(url, body | {"user": user, "stream": stream})
        record = record_of(url, timed.response.headers["x-request-id"])
    code = "context_length_exceeded" if reason == "context-length" else "content_policy_violation"
    error = _assert_openai_error(timed.response, 400, code)  # the upstream's code, passed on
    assert error["type"] == "invalid_request_error"
    expected = "maximum context length is 4096 tokens" if reason == "context-length" else "safety"
    assert expected in error["message"], error["message"]
    assert SECRET not in timed.response.text and UPSTREAM_KEY not in timed.response.text
    assert SECRET[:8] not in timed.response.text
    assert sent_by(fake.recorder, user) == 1
    assert record["attempts"] == 1 and record["status"] == 400
    shape = "stream" if stream else "unary"
    _figure(14, f"{reason}/{shape}: 1 attempt, message {error['message']!r}")
