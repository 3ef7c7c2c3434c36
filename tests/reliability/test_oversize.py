"""Row 19, oversized requests: a body past server.max_body_bytes (announced by Content-Length,
or chunked and endless), a megabyte of headers, JSON nested 10,000 deep. Each is refused
(413, 431, 400) while the client is still sending, the connection is closed, and the
gateway's memory (RSS of the `turnout serve` process) does not grow with what was sent."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.reliability.gateway_process import Served, serve

MAX_BODY = 1024 * 1024  # server.max_body_bytes
MAX_HEADER = 64 * 1024  # server.max_header_bytes (the default)
HUGE = 256 * 1024 * 1024  # what an abusive client offers to send
CHUNK = b"x" * 65536
ANSWER_S = 1.0  # the refusal arrives within this of the request's start
CLOSE_S = 2.0  # and the connection is closed within this of the refusal
RSS_SLACK = 16 * 1024 * 1024  # growth allowed: allocator noise, never the bodies themselves
CHAT = {"model": "r", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


def _config() -> dict[str, Any]:
    return {
        "server": {"max_body_bytes": MAX_BODY},
        "upstreams": {"sim": {"kind": "simulated", "ttft_ms": 1, "tokens_per_s": 100_000}},
        "variants": {"v": {"upstream": "sim", "model": "m"}},
        "routes": {"r": {"split": {"v": 1}}},
    }


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve(tmp_path_factory.mktemp("oversize"), _config()) as served:
        yield served


def rss(served: Served) -> int:
    """Resident bytes of the gateway process (one worker: the `turnout serve` process)."""
    for line in Path(f"/proc/{served.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _address(served: Served) -> tuple[str, int]:
    host, port = served.url.removeprefix("http://").split(":")
    return host, int(port)


@dataclass
class Outcome:
    status: int | None  # the answer's status, None if the connection ended without one
    body: bytes
    sent: int  # body bytes the client got out before the answer (or the end)
    answered_after: float  # seconds from the request's start to the answer (or the end)
    closed_after: float | None  # seconds from the answer until the connection was closed


def offer(served: Served, head: bytes, body: Iterator[bytes], limit_s: float = 10.0) -> Outcome:
    """Send `head`, then `body` as fast as the gateway takes it while watching for an answer;
    after the answer keep sending until the gateway closes the connection."""
    sock = socket.create_connection(_address(served))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    started = time.monotonic()
    received, sent, pending = b"", 0, b""
    answered: float | None = None
    closed: float | None = None
    try:
        sock.sendall(head)
        sock.setblocking(False)
        while time.monotonic() - started < limit_s and closed is None:
            readable, writable, _ = select.select([sock], [sock], [], 0.05)
            if readable:
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                if not data:
                    closed = time.monotonic()
                received += data
                if answered is None and (b"\r\n\r\n" in received or not data):
                    answered = time.monotonic()
            if writable and closed is None:
                pending = pending or next(body, b"")
                try:
                    count = sock.send(pending) if pending else 0
                except (BrokenPipeError, ConnectionResetError):
                    closed = time.monotonic()
                    answered = answered or closed
                    continue
                pending = pending[count:]
                if answered is None:
                    sent += count
    finally:
        sock.close()
    end = answered if answered is not None else time.monotonic()
    head_part, _, rest = received.partition(b"\r\n\r\n")
    status = int(head_part.split(b" ", 2)[1]) if head_part.startswith(b"HTTP/1.1 ") else None
    return Outcome(
        status=status,
        body=rest,
        sent=sent,
        answered_after=end - started,
        closed_after=None if closed is None or answered is None else closed - answered,
    )


def _endless() -> Iterator[bytes]:
    while True:
        yield CHUNK


def _endless_chunked() -> Iterator[bytes]:
    framed = b"%x\r\n" % len(CHUNK) + CHUNK + b"\r\n"
    while True:
        yield framed


def _head(path: str, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: gateway", "Content-Type: application/json", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _error(outcome: Outcome, status: int, code: str | None) -> None:
    assert outcome.status == status, outcome
    error = json.loads(outcome.body.split(b"\r\n0\r\n")[0])["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings", "/turnout/feedback"])
def test_content_length_past_the_limit_is_refused_before_the_body_is_read(
    gateway: Served, path: str
) -> None:
    before = rss(gateway)
    outcome = offer(gateway, _head(path, f"Content-Length: {HUGE}"), _endless())
    _error(outcome, 413, "request_too_large")
    assert outcome.answered_after < ANSWER_S
    assert outcome.sent < HUGE // 4  # answered while the client was still sending
    assert outcome.closed_after is not None and outcome.closed_after < CLOSE_S
    assert rss(gateway) - before < RSS_SLACK


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/turnout/feedback"])
def test_endless_chunked_body_is_refused_once_past_the_limit(gateway: Served, path: str) -> None:
    before = rss(gateway)
    outcome = offer(gateway, _head(path, "Transfer-Encoding: chunked"), _endless_chunked())
    _error(outcome, 413, "request_too_large")
    assert MAX_BODY < outcome.sent < MAX_BODY + 32 * 1024 * 1024  # read to the limit, no further
    assert outcome.answered_after < ANSWER_S + 1.0
    assert outcome.closed_after is not None and outcome.closed_after < CLOSE_S
    assert rss(gateway) - before < RSS_SLACK


def test_a_megabyte_of_headers_is_refused_quickly_and_memory_stays_bounded(
    gateway: Served,
) -> None:
    """Plain uvicorn + httptools accepts 10 MB of headers into memory; Turnout's connection
    guard answers 431 past server.max_header_bytes and reads no further."""
    before = rss(gateway)
    junk = ("X-Junk-%d: " + "a" * 1000 + "\r\n").encode()
    for _ in range(8):
        lines = (junk.replace(b"%d", str(i).encode()) for i in range(1024 * 1024 // len(junk)))
        head = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n"
        outcome = offer(gateway, head, lines)
        assert outcome.answered_after < ANSWER_S
        assert outcome.status in (431, None), outcome  # 431, or reset while still sending
        if outcome.status == 431:
            _error(outcome, 431, "request_header_fields_too_large")
        assert outcome.sent < 1024 * 1024  # refused before the client could send it all
    assert rss(gateway) - before < RSS_SLACK
    under = {f"x-fine-{i}": "a" * 1000 for i in range(MAX_HEADER // 1100)}
    assert httpx.get(gateway.url + "/healthz", headers=under).status_code == 200


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    ("path", "template"),
    [
        (
            "/v1/chat/completions",
            '{"model": "r", "messages": [{"role": "user", "content": "hi"}], "x": %s}',
        ),
        ("/v1/chat/completions", '{"model": "r", "messages": %s}'),
        ("/v1/completions", '{"model": "r", "prompt": %s}'),
        ("/v1/embeddings", '{"model": "r", "input": %s}'),
        ("/turnout/feedback", '{"request_id": "x", "metric": "m", "value": 1, "x": %s}'),
        ("/turnout/feedback", "%s"),
    ],
)
def test_json_nested_10000_deep_is_a_400_never_a_500(
    gateway: Served, path: str, template: str
) -> None:
    for depth in (10_000, 2_000, 990, 500):
        body = (template % _deep(depth)).encode()
        response = httpx.post(gateway.url + path, content=body, timeout=10)
        assert response.status_code < 500, (depth, response.text)
        if depth >= 2_000:
            assert response.status_code in (400, 401, 403), (depth, response.text)
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_the_gateway_still_serves_and_kept_its_memory(gateway: Served) -> None:
    response = httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, timeout=10)
    assert response.status_code == 200
    assert gateway.proc.poll() is None
    assert rss(gateway) < 256 * 1024 * 1024
