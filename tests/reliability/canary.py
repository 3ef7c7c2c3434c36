"""Helpers of the security rows (SSRF, key leakage, auth abuse): a canary TCP port that counts
the connections it gets, a raw TCP "upstream" that answers with whatever bytes a test chooses,
a raw HTTP/1.1 client for requests httpx refuses to send, a log capture and a leak scanner."""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Self

from redis.asyncio import Redis

from gateway.serve import configure_logging
from tests.servers import request_framing

PIECE = 8  # a leak is any run of this many characters of a secret
_ACCEPT_POLL_S = 0.05
_READ_TIMEOUT_S = 10.0


class _Listener:
    """A TCP server on 127.0.0.1, port 0, accepting in a daemon thread; `_accepted(conn)`
    handles each connection (in the accepting thread)."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(_ACCEPT_POLL_S)
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._accepted(conn)

    def _accepted(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CanaryPort(_Listener):
    """A listening TCP port on 127.0.0.1 that accepts, counts and closes every connection.

    `url` is an http:// URL aimed at it; `connections` is how many it accepted so far.
    """

    def __init__(self) -> None:
        super().__init__()
        self.connections = 0
        self.first_bytes: list[bytes] = []  # what each connection sent first, for diagnosis
        self._thread.start()

    def _accepted(self, conn: socket.socket) -> None:
        self.connections += 1
        with conn:
            conn.settimeout(0.2)
            try:
                self.first_bytes.append(conn.recv(4096))
            except OSError:
                self.first_bytes.append(b"")

    def probe(self) -> None:
        """Connect once, and wait until it is counted: the canary does see connections."""
        before = self.connections
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as conn:
            conn.sendall(b"probe")
        deadline = time.monotonic() + 5
        while self.connections == before:
            assert time.monotonic() < deadline, "the canary did not count a connection"
            time.sleep(0.01)


Answer = Callable[[bytes], bytes | None]


class RawUpstream(_Listener):
    """A TCP server that reads one HTTP request per connection and writes `answer(request)`
    verbatim, then closes (None: reset the connection). For upstreams that break HTTP itself.
    `requests` keeps every request it read, headers and body as bytes."""

    def __init__(self, answer: Answer) -> None:
        super().__init__()
        self._answer = answer
        self.requests: list[bytes] = []
        self._thread.start()

    def _accepted(self, conn: socket.socket) -> None:
        threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(_READ_TIMEOUT_S)
            try:
                request = _read_request(conn)
            except OSError:
                return
            if not request:
                return
            self.requests.append(request)
            reply = self._answer(request)
            try:
                if reply is None:  # a reset: RST instead of FIN
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                conn.sendall(reply)
                conn.shutdown(socket.SHUT_WR)
                time.sleep(0.05)  # let the peer read before the close
            except OSError:
                return


def _read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length, chunked = request_framing(head)
    while (chunked and not body.endswith(b"0\r\n\r\n")) or (not chunked and len(body) < length):
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


@dataclass
class RawReply:
    status: int
    headers: list[tuple[str, str]]  # names lowercased, values latin-1
    body: bytes
    raw: bytes  # everything the server sent


def raw_http(url: str, target: bytes, headers: Iterable[bytes], body: bytes = b"") -> RawReply:
    """Send one request exactly as given (method and target in `target`, e.g. b"POST /v1/x"),
    with `Connection: close`, and read the answer to EOF. `headers` are whole header lines."""
    host, port = url.removeprefix("http://").split(":")
    lines = [target + b" HTTP/1.1", *headers, b"Connection: close"]
    if body:
        lines.append(b"Content-Length: %d" % len(body))
    with socket.create_connection((host, int(port)), timeout=_READ_TIMEOUT_S) as conn:
        conn.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        raw = b""
        while chunk := conn.recv(65536):
            raw += chunk
    head, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.split(b"\r\n")
    parsed = []
    for line in header_lines:
        name, _, value = line.partition(b":")
        parsed.append((name.decode("latin-1").lower(), value.strip().decode("latin-1")))
    if any(n == "transfer-encoding" and "chunked" in v for n, v in parsed):
        rest = _dechunk(rest)
    return RawReply(int(status_line.split()[1]), parsed, rest, raw)


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


class LogCapture(logging.Handler):
    """Every log record at DEBUG and up of Turnout's and uvicorn's loggers (and any other
    that is not pinned), formatted with its traceback, while logging is set up as `turnout
    serve` sets it up (gateway.serve.configure_logging: the HTTP client library's loggers
    pinned at WARNING). Use as a context manager around the gateway's whole life."""

    NAMES = ("", "uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")
    PINNED = ("httpx", "httpcore")  # restored afterwards, whatever configure_logging does

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
        self._levels: dict[str, int] = {}
        self._root_handlers: list[logging.Handler] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def __enter__(self) -> LogCapture:
        root = logging.getLogger()
        self._root_handlers = list(root.handlers)
        for name in (*self.NAMES, *self.PINNED):
            self._levels[name] = logging.getLogger(name).level
        configure_logging()
        for name in self.NAMES:
            logger = logging.getLogger(name)
            logger.setLevel(logging.DEBUG)
            logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        root = logging.getLogger()
        for handler in [h for h in root.handlers if h not in self._root_handlers]:
            root.removeHandler(handler)  # basicConfig's, when the root had none
        for name, level in self._levels.items():
            logger = logging.getLogger(name)
            logger.removeHandler(self)
            logger.setLevel(level)


def pieces(secret: str, size: int = PIECE) -> set[str]:
    """Every run of `size` characters of `secret`."""
    return {secret[i : i + size] for i in range(len(secret) - size + 1)}


class LeakScanner:
    """Finds pieces of secrets in text; `scan(where, text)` remembers every place it found one."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._pieces = {piece: secret for secret in secrets for piece in pieces(secret)}
        self.found: list[str] = []
        self.scanned = 0

    def add(self, secret: str) -> None:
        self._pieces |= {piece: secret for piece in pieces(secret)}

    def scan(self, where: str, text: str | bytes) -> None:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        self.scanned += 1
        hits = sorted({piece for piece in self._pieces if piece in text})
        if hits:
            at = text.find(hits[0])
            context = text[:80] + " … " + text[max(at - 60, 0) : at + 60]
            self.found.append(f"{where}: {hits[:3]} in …{context!r}…")

    def assert_clean(self) -> None:
        assert not self.found, "secrets leaked:\n" + "\n".join(self.found[:20])


async def redis_dump(client: Redis, prefix: str) -> list[tuple[str, bytes]]:
    """Every key under `prefix` with every value it holds (strings, hashes, lists, sets,
    sorted sets, streams), as (key, value bytes) pairs; key names are included as values."""
    found: list[tuple[str, bytes]] = []
    async for raw_key in client.scan_iter(match=f"{prefix}*", count=1000):
        key = raw_key.decode("latin-1")
        found.append((key, raw_key))
        kind = (await client.type(raw_key)).decode()
        values: list[bytes] = []
        if kind == "string":
            values = [await client.get(raw_key)]
        elif kind == "hash":
            for field, value in (await client.hgetall(raw_key)).items():  # type: ignore[misc]
                values += [field, value]
        elif kind == "list":
            values = await client.lrange(raw_key, 0, -1)  # type: ignore[misc]
        elif kind == "set":
            values = list(await client.smembers(raw_key))  # type: ignore[misc]
        elif kind == "zset":
            values = [m for m, _ in await client.zrange(raw_key, 0, -1, withscores=True)]
        elif kind == "stream":
            for _, fields in await client.xrange(raw_key):
                for field, value in fields.items():
                    values += [field, value]
        found += [(key, v) for v in values if v is not None]
    return found


@contextlib.contextmanager
def no_connections(canary: CanaryPort) -> Iterator[None]:
    """Assert the canary got no connection during the block (and a short while after it)."""
    before = canary.connections
    yield
    time.sleep(0.05)  # a connection attempt made off the request path would land by now
    assert canary.connections == before, (
        f"{canary.connections - before} connection(s) reached the canary: {canary.first_bytes}"
    )
