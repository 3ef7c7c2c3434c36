"""The request path's HTTP/1.1 client (gateway/upstreams/h1.py) against raw servers on real
sockets: framing, keep-alive reuse, the connection limit, failures and cancellation."""

from __future__ import annotations

import asyncio
import gzip
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway.upstreams import h1

Handler = Callable[[bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """A raw HTTP server: `handler(request_head, reader, writer)` writes whatever it likes."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.closed = 0
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1/chat"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(_header(head, b"content-length") or 0)
                self.heads.append(head)
                self.bodies.append(await reader.readexactly(length))
                await self.handler(head, reader, writer)
                if writer.is_closing():
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.closed += 1
            writer.close()


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def ok(body: bytes, *extra: bytes) -> bytes:
    headers = b"".join(h + b"\r\n" for h in extra)
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), headers, body)


def replying(data: bytes, *, close: bool = False) -> Handler:
    async def handler(_: bytes, __: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        if close:
            writer.close()

    return handler


@pytest.fixture
async def pool() -> AsyncIterator[h1.Pool]:
    pool = h1.Pool(max_connections=4, max_keepalive=4)
    yield pool
    await pool.aclose()


async def post(pool: h1.Pool, url: str, body: bytes = b"{}") -> tuple[int, bytes, h1.Response]:
    headers = h1.encode_headers({"authorization": "Bearer k", "content-type": "application/json"})
    response = await pool.request(b"POST", url, headers, body, connect_timeout=2)
    try:
        return response.status_code, await response.aread(), response
    finally:
        await response.aclose()


async def test_a_request_is_sent_as_given_and_the_connection_is_reused(pool: h1.Pool) -> None:
    async with Server(replying(ok(b'{"a":1}'))) as server:
        for _ in range(3):
            status, body, response = await post(pool, server.url, b'{"x":2}')
            assert (status, body) == (200, b'{"a":1}')
        assert server.connections == 1
        head = server.heads[0]
        assert head.startswith(b"POST /v1/chat HTTP/1.1\r\n")
        assert _header(head, b"authorization") == b"Bearer k"
        assert _header(head, b"host") == server.url.split("/")[2].encode()
        assert server.bodies == [b'{"x":2}'] * 3
        assert response.headers.get("Content-Length") == b"7".decode()
        assert pool.idle_connections() == 1


async def test_chunked_and_close_delimited_bodies_are_read_whole(pool: h1.Pool) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    async with Server(replying(chunked)) as server:
        assert (await post(pool, server.url))[:2] == (200, b"abcde")
    until_close = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it"
    async with Server(replying(until_close, close=True)) as server:
        assert (await post(pool, server.url))[:2] == (200, b"all of it")
        assert pool.idle_connections() == 0  # a closed connection is never pooled


async def test_a_gzip_body_is_decoded(pool: h1.Pool) -> None:
    async with Server(replying(ok(gzip.compress(b"hello"), b"content-encoding: gzip"))) as server:
        assert (await post(pool, server.url))[1] == b"hello"
        assert _header(server.heads[0], b"accept-encoding") == b"identity"


async def test_streamed_chunks_arrive_as_sent(pool: h1.Pool) -> None:
    release = asyncio.Event()

    async def handler(_: bytes, __: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")

    async with Server(handler) as server:
        headers = h1.encode_headers({})
        response = await pool.request(b"POST", server.url, headers, b"", connect_timeout=2)
        chunks = response.aiter_bytes()
        assert await anext(chunks) == b"first"  # before the rest was written
        release.set()
        assert [c async for c in chunks] == [b"second"]
        await response.aclose()


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort",  # cut inside the body
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nabc",  # cut inside a chunk
        b"HTTP/1.1 200 OK\r\ncontent-le",  # cut inside the headers
        b"",  # closed without a byte
        b"NOT HTTP AT ALL\r\n\r\n",  # malformed
    ],
)
async def test_a_cut_or_malformed_response_is_a_broken_connection(
    pool: h1.Pool, reply: bytes
) -> None:
    async with Server(replying(reply, close=True)) as server:
        with pytest.raises(h1.ConnectionBroken):
            await post(pool, server.url)
        assert pool.open_connections() == 0


async def test_refused_connections_fail_before_sending(pool: h1.Pool) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(h1.ConnectFailed):
            await post(pool, f"http://127.0.0.1:{port}/v1")


async def test_an_idle_connection_the_server_closed_is_not_reused(pool: h1.Pool) -> None:
    async with Server(replying(ok(b"x"), close=True)) as server:
        # keep-alive by the headers, but the server closes after answering
        for _ in range(3):
            assert (await post(pool, server.url))[:2] == (200, b"x")
            await asyncio.sleep(0.05)
        assert server.connections == 3


async def test_the_connection_limit_queues_and_times_out(pool: h1.Pool) -> None:
    gate = asyncio.Event()

    async def handler(_: bytes, __: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await gate.wait()
        writer.write(ok(b"done"))

    async with Server(handler) as server:
        small = h1.Pool(max_connections=2, max_keepalive=2)
        calls = [asyncio.create_task(post(small, server.url)) for _ in range(2)]
        await asyncio.sleep(0.1)
        with pytest.raises(h1.ConnectFailed, match="pool timeout"):
            await small.request(b"POST", server.url, b"", b"", connect_timeout=0.2)
        third = asyncio.create_task(post(small, server.url))  # waits for a slot, then goes
        await asyncio.sleep(0.05)
        gate.set()
        results = await asyncio.gather(*calls, third)
        assert [r[1] for r in results] == [b"done"] * 3
        assert server.connections == 2
        await small.aclose()


async def test_cancelling_a_wait_closes_the_connection(pool: h1.Pool) -> None:
    gone = asyncio.Event()

    async def handler(_: bytes, reader: asyncio.StreamReader, __: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client closes
        gone.set()

    async with Server(handler) as server:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await post(pool, server.url)
        await asyncio.wait_for(gone.wait(), 1.0)
        assert pool.open_connections() == 0
        # the slot came back: the pool still has all four
        assert [await _slot(pool) for _ in range(4)] == [True] * 4


async def _slot(pool: h1.Pool) -> bool:
    await pool._slot_take(0.1)
    return True


async def test_closing_a_response_before_its_end_closes_the_connection(pool: h1.Pool) -> None:
    async def handler(_: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n")
        await reader.read()

    async with Server(handler) as server:
        response = await pool.request(b"POST", server.url, b"", b"", connect_timeout=2)
        await response.aclose()
        for _ in range(50):
            if server.closed:
                break
            await asyncio.sleep(0.02)
        assert server.closed == 1
        assert pool.open_connections() == 0 and pool.idle_connections() == 0


async def test_a_slow_reader_pauses_the_socket_instead_of_buffering(pool: h1.Pool) -> None:
    written = 0

    async def handler(_: bytes, __: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        block = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
        for _block in range(400):  # 25 MiB if nobody stopped it
            writer.write(block)
            await writer.drain()
            written += 65536
        writer.write(b"0\r\n\r\n")

    async with Server(handler) as server:
        response = await pool.request(b"POST", server.url, b"", b"", connect_timeout=2)
        await asyncio.sleep(0.5)  # read nothing
        assert response._buffered <= h1.PAUSE_ABOVE + 65536 * 2
        assert written < 20 * 1024 * 1024  # the server was held back by TCP
        got = 0
        async for chunk in response.aiter_bytes():
            got += len(chunk)
        assert got == 400 * 65536
        await response.aclose()


def test_headers_that_would_inject_are_refused() -> None:
    with pytest.raises(ValueError):
        h1.encode_headers({"authorization": "Bearer k\r\nx-evil: 1"})
    with pytest.raises(ValueError):
        h1.split_url("ftp://example.com/v1")
    assert h1.split_url("https://api.example.com/v1/chat?x=1")[1:] == (
        b"api.example.com",
        b"/v1/chat?x=1",
    )


@pytest.mark.parametrize("test", [
    test_a_request_is_sent_as_given_and_the_connection_is_reused,
    test_streamed_chunks_arrive_as_sent,
    test_cancelling_a_wait_closes_the_connection,
])  # fmt: skip
def test_on_uvloop(test: Callable[[h1.Pool], Awaitable[None]]) -> None:
    """`turnout serve` runs on uvloop, whose transports differ (connection_made comes later)."""
    uvloop = pytest.importorskip("uvloop")

    async def run() -> None:
        pool = h1.Pool(max_connections=4, max_keepalive=4)
        try:
            await test(pool)
        finally:
            await pool.aclose()

    uvloop.run(run())


async def test_a_second_response_to_one_request_is_not_read_into_the_first(pool: h1.Pool) -> None:
    async with Server(
        replying(ok(b"ok") + b"HTTP/1.1 500 Oops\r\ncontent-length: 3\r\n\r\nbad")
    ) as server:
        status, body, _ = await post(pool, server.url)
        assert (status, body) == (200, b"ok")  # not overwritten by what followed
        await asyncio.sleep(0.05)
        assert pool.idle_connections() == 0  # and the connection is not trusted again


async def test_configured_headers_replace_the_clients_own(pool: h1.Pool) -> None:
    async with Server(replying(ok(b"x"))) as server:
        headers = h1.encode_headers({"Host": "api.example", "User-Agent": "mine/1"})
        response = await pool.request(b"POST", server.url, headers, b"", connect_timeout=2)
        await response.aread()
        await response.aclose()
        head = server.heads[0].lower()
        assert head.count(b"\r\nhost:") == 1 and b"host: api.example\r\n" in head
        assert head.count(b"\r\nuser-agent:") == 1 and b"user-agent: mine/1\r\n" in head
        assert b"accept-encoding: identity\r\n" in head
    for framing in ("Content-Length", "Transfer-Encoding", "Connection"):
        with pytest.raises(ValueError, match="set by the HTTP client"):
            h1.encode_headers({framing: "1"})


async def test_closing_wakes_a_waiting_reader(pool: h1.Pool) -> None:
    async def handler(_: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nstart")  # close-delimited
        await reader.read()

    async with Server(handler) as server:
        response = await pool.request(b"POST", server.url, b"", b"", connect_timeout=2)
        chunks = response.aiter_bytes()
        assert await anext(chunks) == b"start"
        reader = asyncio.create_task(anext(chunks))
        await asyncio.sleep(0.05)
        await pool.aclose()  # shutting down: the body is cut, not complete
        with pytest.raises(h1.ConnectionBroken):
            await asyncio.wait_for(reader, 1)
        await response.aclose()
