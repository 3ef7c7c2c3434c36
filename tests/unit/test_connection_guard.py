"""The connection guard (gateway.serve.ConnectionGuard) on a fake transport, the body deadline
and the check for a client gone mid-answer (gateway.app)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from gateway.app import _connection_gone, body_deadline
from gateway.context import Message
from gateway.errors import ConnectionGone, RequestTimeout
from gateway.serve import ConnectionGuard, uvicorn_options
from gateway.settings import Server


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closed = False
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 5000)}.get(name)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


LIMITS = Server(max_header_bytes=1024, header_timeout_s=0.05, write_timeout_s=0.05)


@pytest.fixture
async def guard() -> AsyncIterator[tuple[ConnectionGuard, FakeTransport]]:
    saved = ConnectionGuard.limits
    ConnectionGuard.limits = LIMITS
    config = Config(app=_app, lifespan="off", log_level="warning")
    config.load()
    protocol = ConnectionGuard(config, ServerState(), {}, _loop=asyncio.get_running_loop())
    transport = FakeTransport()
    protocol.connection_made(transport)
    try:
        yield protocol, transport
    finally:
        ConnectionGuard.limits = saved
        protocol.connection_lost(None)


def _status(written: bytes) -> int:
    return int(written.split(b" ", 2)[1])


def _code(written: bytes) -> str:
    return str(json.loads(written.partition(b"\r\n\r\n")[2])["error"]["code"])


async def test_a_head_past_the_limit_is_431_and_read_no_further(
    guard: tuple[ConnectionGuard, FakeTransport],
) -> None:
    protocol, transport = guard
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n")
    protocol.data_received(b"X-Junk: " + b"a" * 2000 + b"\r\n")
    assert _status(transport.written) == 431
    assert _code(transport.written) == "request_header_fields_too_large"
    assert b"connection: close" in transport.written
    assert transport.closed
    written = transport.written
    protocol.data_received(b"more\r\n\r\n")
    assert transport.written == written


async def test_a_head_within_the_limit_in_pieces_is_served(
    guard: tuple[ConnectionGuard, FakeTransport],
) -> None:
    protocol, transport = guard
    for piece in (b"GET / HTTP/1.1\r\n", b"Host: x\r\n", b"X-A: " + b"a" * 800 + b"\r\n", b"\r\n"):
        protocol.data_received(piece)
    await asyncio.sleep(0.01)  # the app's task
    assert _status(transport.written) == 200
    await asyncio.sleep(LIMITS.header_timeout_s * 2)  # the head timer was cancelled
    assert not transport.closed


async def test_a_head_that_does_not_complete_in_time_is_408(
    guard: tuple[ConnectionGuard, FakeTransport],
) -> None:
    protocol, transport = guard
    protocol.data_received(b"GET / HTTP/1.1\r\nHo")
    await asyncio.sleep(LIMITS.header_timeout_s * 2)
    assert _status(transport.written) == 408
    assert _code(transport.written) == "request_timeout"
    assert transport.closed


async def test_a_connection_with_nothing_sent_is_closed_without_an_answer(
    guard: tuple[ConnectionGuard, FakeTransport],
) -> None:
    _, transport = guard
    await asyncio.sleep(LIMITS.header_timeout_s * 2)
    assert transport.written == b""
    assert transport.closed


async def test_writes_paused_past_the_write_timeout_drop_the_connection(
    guard: tuple[ConnectionGuard, FakeTransport],
) -> None:
    protocol, transport = guard
    protocol.pause_writing()
    protocol.resume_writing()  # a client that reads again in time keeps its connection
    await asyncio.sleep(LIMITS.write_timeout_s * 2)
    assert not transport.aborted
    protocol.pause_writing()
    await asyncio.sleep(LIMITS.write_timeout_s * 2)
    assert transport.aborted


def test_uvicorn_options_use_the_guard() -> None:
    options = uvicorn_options(Server(keep_alive_s=7))
    assert options == {"http": ConnectionGuard, "timeout_keep_alive": 7}


async def test_body_deadline_408_when_the_body_is_late() -> None:
    async def never() -> Message:
        await asyncio.sleep(10)
        return {"type": "http.request"}

    with pytest.raises(RequestTimeout):
        await body_deadline(never, 0.05)()


async def test_body_deadline_passes_through_once_the_body_is_in() -> None:
    messages: list[Message] = [
        {"type": "http.request", "body": b"a", "more_body": True},
        {"type": "http.request", "body": b"b", "more_body": False},
    ]

    async def receive() -> Message:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(0.1)  # waiting for the client to leave: not bounded
        return {"type": "http.disconnect"}

    timed = body_deadline(receive, 0.05)
    assert (await timed())["body"] == b"a"
    assert (await timed())["body"] == b"b"
    assert (await timed())["type"] == "http.disconnect"


def test_connection_gone_is_found_however_it_was_wrapped() -> None:
    gone = ConnectionGone("closed")
    assert _connection_gone(gone)
    grouped = BaseExceptionGroup("task group", [ValueError("x"), gone])
    wrapped = RuntimeError("Exception caught after response started")
    wrapped.__cause__ = grouped
    assert _connection_gone(wrapped)
    assert not _connection_gone(RuntimeError("something else"))
    looped = RuntimeError("a")
    looped.__cause__ = looped
    assert not _connection_gone(looped)
