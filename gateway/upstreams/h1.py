"""A lean HTTP/1.1 client for the request path: one asyncio.Protocol per connection, responses
parsed by httptools (llhttp), connections kept alive in a pool per origin.

httpx + httpcore were ~40% of the gateway's CPU per proxied request (bench/profile.py): request
and URL objects, header normalisation, h11's state machine in Python and a pool that scans
every connection per request. This client does only what an upstream call needs: one POST (or
GET) with a pre-encoded header block, a response whose status and headers arrive first and
whose body is read whole or chunk by chunk, and keep-alive reuse. Deadlines belong to the
caller (`asyncio.timeout` around each wait); cancelling a wait closes the connection.

Errors: `ConnectFailed` means nothing was sent (refused, DNS, TLS handshake, connect or pool
timeout); `ConnectionBroken` means the connection failed once the request may have been sent
(reset, closed before the response was complete, a malformed response).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import ssl
import time
import zlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

PAUSE_ABOVE = 256 * 1024  # buffered body bytes at which reading from the socket pauses
RESUME_BELOW = 64 * 1024
KEEPALIVE_EXPIRY_S = 15.0  # an idle connection older than this is closed, not reused


class ConnectFailed(Exception):
    """No byte of the request reached the upstream."""


class ConnectionBroken(Exception):
    """The connection failed after the request may have reached the upstream."""


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int

    @property
    def tls(self) -> bool:
        return self.scheme == "https"


@functools.lru_cache(maxsize=1024)
def split_url(url: str) -> tuple[Origin, bytes, bytes]:
    """(origin, Host header value, request target) of an absolute http(s) URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an absolute http(s) URL: {url!r}")
    default = 443 if parts.scheme == "https" else 80
    port = parts.port or default
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if port == default else f"{shown}:{port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Origin(parts.scheme, host, port), host_header.encode("ascii"), target.encode("ascii")


# Headers the client frames itself: a configured value would contradict the request's framing.
FRAMING = frozenset({"content-length", "transfer-encoding", "connection", "te", "upgrade"})
# Headers the client sends unless the configured block has its own (which then replaces it).
_DEFAULTS = (("user-agent", b"turnout"), ("accept-encoding", b"identity"))


def encode_headers(headers: Mapping[str, str]) -> bytes:
    """A header block ("name: value\\r\\n"...) to send with every request. Refuses CR/LF/NUL
    and the framing headers; a `host`, `user-agent` or `accept-encoding` replaces the
    client's own."""
    lines = []
    for name, value in headers.items():
        if any(c in name + value for c in "\r\n\0") or not name or ":" in name:
            raise ValueError(f"header {name!r} has a character that cannot be sent")
        if name.lower() in FRAMING:
            raise ValueError(f"header {name!r} is set by the HTTP client itself")
        lines.append(f"{name}: {value}\r\n".encode("latin-1"))
    return b"".join(lines)


@functools.lru_cache(maxsize=256)
def _own_lines(block: bytes) -> tuple[bool, bytes]:
    """For a configured block: whether to send our Host, and our default lines it lacks."""
    names = {line.split(b":", 1)[0].strip().lower() for line in block.split(b"\r\n") if line}
    lines = b"".join(
        b"%s: %s\r\n" % (name.encode(), value)
        for name, value in _DEFAULTS
        if name.encode() not in names
    )
    return b"host" not in names, lines


class Headers:
    """Response headers, looked up case-insensitively (repeated names: the last one)."""

    __slots__ = ("_map", "raw")

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self.raw = raw
        self._map: dict[str, str] | None = None

    def get(self, name: str, default: str | None = None) -> str | None:
        if self._map is None:
            self._map = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self.raw}
        return self._map.get(name.lower(), default)


class Response:
    """An upstream response: status and headers have arrived; the body comes as it is read.

    `aclose()` must be called (it is idempotent): a fully read keep-alive response gives its
    connection back to the pool, anything else closes it.
    """

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self.status_code = 0
        self.headers = Headers([])
        self.complete = False
        self.keep_alive = False
        self._started: asyncio.Future[None] = connection.loop.create_future()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._decoder: zlib._Decompress | None = None
        self._until_eof = False
        self._closed = False

    # -- fed by the connection

    def _headers_done(self, status: int, raw: list[tuple[bytes, bytes]], keep_alive: bool) -> None:
        self.status_code, self.headers, self.keep_alive = status, Headers(raw), keep_alive
        encoding = (self.headers.get("content-encoding") or "").strip().lower()
        if encoding in ("gzip", "deflate"):
            self._decoder = zlib.decompressobj(zlib.MAX_WBITS | (16 if encoding == "gzip" else 0))
        self._until_eof = (
            self.headers.get("content-length") is None
            and self.headers.get("transfer-encoding") is None
            and status not in (204, 304)
            and status >= 200
        )
        if not self._started.done():
            self._started.set_result(None)

    def _feed(self, data: bytes) -> None:
        if self._decoder is not None:
            try:
                data = self._decoder.decompress(data)
            except zlib.error:
                self._fail(ConnectionBroken("the upstream sent a body that does not decompress"))
                return
        if data:
            self._chunks.append(data)
            self._buffered += len(data)
            if self._buffered > PAUSE_ABOVE:
                self._connection.pause()
            self._wake()

    def _finish(self) -> None:
        if self._decoder is not None and (tail := self._decoder.flush()):
            self._chunks.append(tail)
        self.complete = True
        self._wake()

    def _lost(self, exc: BaseException | None) -> None:
        """The connection closed: a body delimited by the close is complete, else it failed."""
        if self.complete:
            return
        if self._started.done() and self._until_eof and exc is None:
            self.keep_alive = False
            self._finish()
        else:
            reason = f" ({type(exc).__name__})" if exc is not None else ""
            self._fail(ConnectionBroken(f"the upstream closed the connection early{reason}"))

    def _fail(self, exc: BaseException) -> None:
        if self._error is None and not self.complete:
            self._error = exc
        if not self._started.done():
            self._started.set_exception(exc)
            self._started.exception()  # retrieved: no "never retrieved" warning when cancelled
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- read by the caller

    async def started(self) -> None:
        await self._started

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._buffered < RESUME_BELOW:
                    self._connection.resume()
                yield chunk
            elif self._error is not None:
                raise self._error
            elif self.complete:
                return
            else:
                self._waiter = self._connection.loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self.aiter_bytes()])

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        reusable = self.complete and self.keep_alive and self._error is None and not self._chunks
        if not self.complete:
            self._fail(ConnectionBroken("the response was closed before its end"))
        self._connection.done(reusable)


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection to an origin and the response being read on it."""

    def __init__(self, pool: Pool, origin: Origin, loop: asyncio.AbstractEventLoop) -> None:
        self.pool, self.origin, self.loop = pool, origin, loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.closed = False
        self.idle_since = 0.0
        self._raw: list[tuple[bytes, bytes]] = []
        self._paused = False

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.response is None:  # bytes nobody asked for: the connection cannot be trusted
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except Exception as exc:  # a malformed response, an upgrade, a second response
            self.response._fail(ConnectionBroken(f"the upstream sent a malformed response: {exc}"))
            self.close()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.response is not None:
            self.response._lost(exc)
        self.pool._forget(self)

    # -- httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw.append((name, value))

    def on_headers_complete(self) -> None:
        assert self.response is not None
        if self.response.complete:
            raise ConnectionBroken("a second response to one request")
        status = self.parser.get_status_code()
        if status < 200:  # an interim response (100 Continue, 103): wait for the real one
            self._raw = []
            return
        raw, self._raw = self._raw, []
        self.response._headers_done(status, raw, self.parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            if self.response.complete:
                raise ConnectionBroken("bytes after the end of the response")
            self.response._feed(body)

    def on_message_complete(self) -> None:
        if self.response is not None and self.response.status_code >= 200:
            self.response.keep_alive = self.parser.should_keep_alive()
            self.response._finish()

    # -- used by the pool and the response

    def send(self, head: bytes, body: bytes) -> Response:
        assert self.transport is not None
        self.response = Response(self)
        self.transport.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            self.transport.write(body)
        return self.response

    def pause(self) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def done(self, reusable: bool) -> None:
        """The caller is finished with the response: keep the connection for reuse or close it."""
        self.response = None
        self.resume()
        if reusable and not self.closed:
            self.parser = httptools.HttpResponseParser(self)
            self.pool._idle_put(self)
        else:
            self.close()
        self.pool._slot_free()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            if self.response is not None:  # not a clean end, even of a close-delimited body
                self.response._fail(ConnectionBroken("the connection was closed"))
            self.transport.abort()
            self.pool._forget(self)

    def usable(self, now: float) -> bool:
        assert self.transport is not None
        return (
            not self.closed
            and not self.transport.is_closing()
            and now - self.idle_since < KEEPALIVE_EXPIRY_S
        )


@functools.cache
def _default_tls() -> ssl.SSLContext:
    """Certificates verified against certifi's roots, as httpx does; made on first use."""
    import certifi

    tls = ssl.create_default_context(cafile=certifi.where())
    tls.set_alpn_protocols(["http/1.1"])
    return tls


class Pool:
    """Connections to any origin, at most `max_connections` at once (a request waits for a
    free one up to its connect timeout), at most `max_keepalive` idle per origin."""

    def __init__(
        self,
        *,
        max_connections: int,
        max_keepalive: int,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.max_connections, self.max_keepalive = max_connections, max_keepalive
        self._tls = tls
        self._in_use = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._idle: dict[Origin, list[_Connection]] = {}
        self._open: set[_Connection] = set()

    def open_connections(self) -> int:
        return len(self._open)

    def idle_connections(self) -> int:
        return sum(len(conns) for conns in self._idle.values())

    async def request(
        self,
        method: bytes,
        url: str,
        headers: bytes,
        body: bytes,
        *,
        connect_timeout: float,
    ) -> Response:
        """Send a request; return once the response's status and headers have arrived.

        `headers` is an encoded block (`encode_headers`); Content-Length is added here, and
        Host, User-Agent (`turnout`) and Accept-Encoding (`identity`) unless the block has its
        own. Cancellation at any point closes the connection.
        """
        origin, host, target = split_url(url)
        await self._slot_take(connect_timeout)
        connection: _Connection | None = None
        try:
            connection = self._idle_get(origin) or await self._connect(origin, connect_timeout)
            with_host, defaults = _own_lines(headers)
            head = b"".join(
                (
                    method, b" ", target, b" HTTP/1.1\r\n",
                    b"host: %s\r\n" % host if with_host else b"",
                    defaults, b"content-length: ", str(len(body)).encode(), b"\r\n",
                    headers, b"\r\n",
                )
            )  # fmt: skip
            response = connection.send(head, body)
            await response.started()
            return response
        except BaseException:
            if connection is None:
                self._slot_free()
            else:
                connection.response = None
                connection.close()
                self._slot_free()
            raise

    async def aclose(self) -> None:
        for connection in list(self._open):
            connection.close()
        self._idle.clear()

    # -- connections

    def _idle_get(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if connection.usable(now):
                return connection
            connection.close()
        return None

    def _idle_put(self, connection: _Connection) -> None:
        idle = self._idle.setdefault(connection.origin, [])
        if len(idle) >= self.max_keepalive:
            connection.close()
            return
        connection.idle_since = time.monotonic()
        idle.append(connection)

    def _forget(self, connection: _Connection) -> None:
        self._open.discard(connection)
        idle = self._idle.get(connection.origin)
        if idle and connection in idle:
            idle.remove(connection)

    async def _connect(self, origin: Origin, timeout: float) -> _Connection:  # noqa: ASYNC109
        loop = asyncio.get_running_loop()
        connection = _Connection(self, origin, loop)
        tls = (self._tls or _default_tls()) if origin.tls else None
        try:
            async with asyncio.timeout(timeout):
                transport, _ = await loop.create_connection(
                    lambda: connection,
                    origin.host,
                    origin.port,
                    ssl=tls,
                    server_hostname=origin.host if tls else None,
                )
        except TimeoutError:
            connection.close()
            raise ConnectFailed("connect timeout") from None
        except (OSError, ssl.SSLError) as exc:
            connection.close()
            raise ConnectFailed(type(exc).__name__) from None
        if connection.transport is None:  # uvloop calls connection_made a step later
            connection.connection_made(transport)
        self._open.add(connection)
        return connection

    # -- the connection limit

    async def _slot_take(self, timeout: float) -> None:  # noqa: ASYNC109
        if self._in_use < self.max_connections and not self._waiters:
            self._in_use += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter  # _slot_free counted it in for us
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self._slot_free()  # handed over as we gave up: pass it on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise ConnectFailed("no free connection to the upstream (pool timeout)") from None
            raise

    def _slot_free(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to this waiter as is
                return
        self._in_use -= 1
