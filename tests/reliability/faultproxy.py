"""A fault-injecting TCP proxy for the reliability tests, and two dead ends (refused, black hole).

`FaultProxy(target)` listens on 127.0.0.1, port 0, in a background thread with its own asyncio
loop, and forwards every accepted connection to `target` ("http://host:port" or "host:port").
What it does to a connection is the `Fault` in force when the connection was accepted
(`proxy.fault = ...` changes it for the connections that follow):

    PASS                    forward both ways
    reset()                 RST at once (SO_LINGER 0), nothing read
    reset_after_request()   read one whole HTTP request, then RST: no byte answered
    stall()                 read whatever comes, never answer, never connect to the target
    stall_after(n)          forward the response head and n body bytes, then nothing more
    cut_after(n)            forward the response head and n body bytes, then close (FIN)
    reset_after(n)          forward the response head and n body bytes, then RST
    garble_after(n)         forward the response head and n body bytes, then bytes that are
                            not HTTP (a bad chunk size), then nothing more
    sliced()                forward the response in 1-byte writes (TCP_NODELAY, drained each)
    delayed(d)              hold the first response byte back d seconds

"Body bytes" are counted on the wire after the first response head's blank line (chunk
framing included). Faults act on a connection's first response; later ones on a kept-alive
connection pass (slicing goes on for the whole connection).

The proxy counts connections accepted, connections open now, requests read whole (by the
faults that read them) and bytes each way; `wait_open(n, timeout)` tells when no more than n
connections are open, e.g. that the gateway closed its upstream connection after a fault.

`refused_url()` and `black_hole()` are upstreams that refuse at once or never complete the
TCP handshake. At the end: what the reliability tests share to talk to Turnout as a client
does (chat and stream calls, records and metrics through its API, the fake's own stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes import Recorder, create_fake_upstream
from tests.integration.conftest import ADMIN_KEY, Upstreams
from tests.servers import request_framing, serve_app

_CHUNK = 65536
_STARTUP_S = 10.0
GARBAGE = b"zz-not-a-chunk-size\r\n\r\n"


@dataclass(frozen=True)
class Fault:
    """What the proxy does to one connection; build one with the functions below."""

    name: str = "pass"
    reset_on_accept: bool = False
    reset_after_request: bool = False
    stall: bool = False
    after: int | None = None  # body bytes forwarded before `then` happens
    then: str | None = None  # "stall" | "cut" | "reset" | "garble"
    slice: bool = False
    delay_s: float = 0.0


PASS = Fault()


def reset() -> Fault:
    return Fault(name="reset", reset_on_accept=True)


def reset_after_request() -> Fault:
    return Fault(name="reset-after-request", reset_after_request=True)


def stall() -> Fault:
    return Fault(name="stall", stall=True)


def stall_after(n: int) -> Fault:
    return Fault(name=f"stall-after-{n}", after=n, then="stall")


def cut_after(n: int) -> Fault:
    return Fault(name=f"cut-after-{n}", after=n, then="cut")


def reset_after(n: int) -> Fault:
    return Fault(name=f"reset-after-{n}", after=n, then="reset")


def garble_after(n: int) -> Fault:
    return Fault(name=f"garble-after-{n}", after=n, then="garble")


def sliced() -> Fault:
    return Fault(name="sliced", slice=True)


def delayed(seconds: float) -> Fault:
    return Fault(name=f"delayed-{seconds}", delay_s=seconds)


@dataclass
class Connection:
    """One accepted connection: its fault, when it opened and closed (monotonic), and bytes."""

    index: int
    fault: Fault
    opened_at: float
    closed_at: float | None = None
    up: int = 0  # bytes from the client (the gateway) toward the target
    down: int = 0  # bytes from the target toward the client
    writes: int = 0  # writes toward the client (sliced: one per byte)
    requests: int = 0  # whole requests read (only faults that read them count)


class FaultProxy:
    """Use as a context manager; `url` is "http://127.0.0.1:PORT"."""

    def __init__(self, target: str, fault: Fault = PASS) -> None:
        parts = urlsplit(target if "//" in target else f"//{target}")
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"target needs a host and a port: {target!r}")
        self._target = (parts.hostname, parts.port)
        self.fault = fault
        self.conns: list[Connection] = []
        self._changed = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._writers: dict[int, asyncio.StreamWriter] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()
        self.port = 0

    # --- life cycle -----------------------------------------------------------------------

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        if not self._ready.wait(_STARTUP_S) or self._server is None:
            raise RuntimeError("the fault proxy did not start")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(_STARTUP_S)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(_STARTUP_S)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=256)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers.values()):
            writer.transport.abort()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- what tests read and set ------------------------------------------------------------

    @property
    def connections(self) -> int:
        """Connections accepted so far."""
        return len(self.conns)

    @property
    def open_connections(self) -> int:
        with self._changed:
            return sum(1 for c in self.conns if c.closed_at is None)

    @property
    def requests(self) -> int:
        """Whole requests read by the faults that read them (reset_after_request, stall)."""
        return sum(c.requests for c in self.conns)

    @property
    def bytes_up(self) -> int:
        return sum(c.up for c in self.conns)

    @property
    def bytes_down(self) -> int:
        return sum(c.down for c in self.conns)

    def wait_open(self, at_most: int, timeout: float) -> float | None:
        """Once no more than `at_most` connections are open: the monotonic time the latest
        connection closed (now, if none has); None if that did not happen within `timeout`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                open_now = [c for c in self.conns if c.closed_at is None]
                if len(open_now) <= at_most:
                    closed = [c.closed_at for c in self.conns if c.closed_at is not None]
                    return max(closed, default=time.monotonic())
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)

    def drop_all(self) -> None:
        """Reset every open connection at once (a crashed server), both sides."""

        async def drop() -> None:
            for writer in list(self._writers.values()):
                _rst(writer)

        asyncio.run_coroutine_threadsafe(drop(), self._loop).result(_STARTUP_S)

    # --- the proxy itself --------------------------------------------------------------------

    def _next(self) -> Connection:
        with self._changed:
            conn = Connection(len(self.conns), self.fault, time.monotonic())
            self.conns.append(conn)
            self._changed.notify_all()
            return conn

    def _closed(self, conn: Connection) -> None:
        with self._changed:
            if conn.closed_at is None:
                conn.closed_at = time.monotonic()
            self._changed.notify_all()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = self._next()
        _nodelay(writer)
        key = id(writer)
        self._writers[key] = writer
        try:
            await self._serve(conn, reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.pop(key, None)
            writer.transport.abort()
            self._closed(conn)

    async def _serve(
        self, conn: Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        fault = conn.fault
        if fault.reset_on_accept:
            _rst(writer)
            return
        if fault.reset_after_request:
            conn.up += await _read_request(reader)
            conn.requests += 1
            _rst(writer)
            return
        if fault.stall:
            conn.up += await _read_request(reader)
            conn.requests += 1
            await _drain_until_eof(reader, conn)
            return
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        _nodelay(up_writer)
        key = id(up_writer)
        self._writers[key] = up_writer
        try:
            upward = asyncio.ensure_future(_pump(reader, up_writer, conn))
            downward = asyncio.ensure_future(self._downward(up_reader, writer, conn))
            try:
                await asyncio.wait({upward, downward}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (upward, downward):
                    task.cancel()
                await asyncio.gather(upward, downward, return_exceptions=True)
            ended = downward.result() if downward.done() and not downward.cancelled() else None
            if ended == "reset":
                _rst(writer)
        finally:
            self._writers.pop(key, None)
            up_writer.transport.abort()

    async def _downward(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, conn: Connection
    ) -> str:
        """Forward the target's bytes under the fault; returns how it ended ("eof", "cut",
        "reset"), or never returns (stalled) until cancelled."""
        fault = conn.fault
        head = b""
        body_seen: int | None = None  # body bytes forwarded, once the head is complete
        first = True
        while True:
            try:
                data = await source.read(_CHUNK)
            except OSError:
                data = b""
            if not data:
                await _finish(sink)
                return "eof"
            if first and fault.delay_s:
                await asyncio.sleep(fault.delay_s)
            first = False
            if fault.after is not None:
                if body_seen is None:
                    head += data
                    end = head.find(b"\r\n\r\n")
                    if end < 0:
                        await _write(sink, data, conn, fault.slice)
                        continue
                    body_start = len(data) - (len(head) - (end + 4))
                    body_seen = 0
                    await _write(sink, data[:body_start], conn, fault.slice)
                    data = data[body_start:]
                allowed = fault.after - body_seen
                await _write(sink, data[: max(allowed, 0)], conn, fault.slice)
                body_seen += min(len(data), max(allowed, 0))
                if body_seen >= fault.after:
                    return await self._then(fault, sink, conn)
                continue
            await _write(sink, data, conn, fault.slice)

    async def _then(self, fault: Fault, sink: asyncio.StreamWriter, conn: Connection) -> str:
        if fault.then == "cut":
            await _finish(sink)
            return "cut"
        if fault.then == "reset":
            return "reset"
        if fault.then == "garble":
            await _write(sink, GARBAGE, conn, False)
        await asyncio.Event().wait()  # stall: forward nothing more, until the client leaves
        return "stall"


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, conn: Connection) -> None:
    while True:
        try:
            data = await source.read(_CHUNK)
        except OSError:
            return
        if not data:
            return
        conn.up += len(data)
        sink.write(data)
        await sink.drain()


async def _write(
    sink: asyncio.StreamWriter, data: bytes, conn: Connection, one_by_one: bool
) -> None:
    if not data:
        return
    if one_by_one:
        for index in range(len(data)):
            sink.write(data[index : index + 1])
            await sink.drain()
            conn.down += 1
            conn.writes += 1
            await asyncio.sleep(0)
        return
    sink.write(data)
    await sink.drain()
    conn.down += len(data)
    conn.writes += 1


async def _finish(sink: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        await sink.drain()
        sink.close()


async def _drain_until_eof(reader: asyncio.StreamReader, conn: Connection) -> None:
    while data := await reader.read(_CHUNK):
        conn.up += len(data)


async def _read_request(reader: asyncio.StreamReader) -> int:
    """Read one whole HTTP/1.1 request (Content-Length or chunked); its size in bytes."""
    head = await reader.readuntil(b"\r\n\r\n")
    length, chunked = request_framing(head)
    if chunked:
        body = await reader.readuntil(b"0\r\n\r\n")
        return len(head) + len(body)
    await reader.readexactly(length)
    return len(head) + length


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER on, 0 s), not a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@contextlib.contextmanager
def refused_url() -> Iterator[str]:
    """A URL on which nothing listens: connecting is refused at once."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # the port stays free for the test's short life: nobody else binds port-0 ports
    yield f"http://127.0.0.1:{port}"


@dataclass
class BlackHole:
    """A listening socket whose accept queue is full: a SYN to it is dropped, so connecting
    hangs until the client's connect timeout (as a firewalled host would)."""

    url: str
    _socks: list[socket.socket] = field(default_factory=list)

    def close(self) -> None:
        for sock in self._socks:
            sock.close()


@contextlib.contextmanager
def black_hole() -> Iterator[BlackHole]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)  # Linux: room for one connection waiting to be accepted
    port = listener.getsockname()[1]
    hole = BlackHole(f"http://127.0.0.1:{port}", [listener])
    try:
        for _ in range(2):  # fill the accept queue (never accepted)
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            hole._socks.append(filler)
        time.sleep(0.05)
        yield hole
    finally:
        hole.close()


# --- Turnout as a client sees it: shared by the reliability tests ---------------------------

USER = [{"role": "user", "content": "hi"}]
RECORD_DEFAULTS = {"attempts": 1, "cost_usd": 0.0, "error": None}


def fake_upstreams() -> contextlib.AbstractContextManager[Upstreams]:
    """Two replicas of the fake upstream (tests.fakes) sharing one recorder."""

    @contextlib.contextmanager
    def serve() -> Iterator[Upstreams]:
        app, recorder = create_fake_upstream()
        with serve_app(app) as first, serve_app(app) as second:
            yield Upstreams([first, second], recorder)

    return serve()


_http = httpx.Client(timeout=15.0)  # one client (one SSL context) for the whole session


def chat(
    url: str, body: dict[str, Any], timeout: float = 15.0, headers: dict[str, str] | None = None
) -> Timed:
    """POST /v1/chat/completions and read the whole answer; (response, seconds taken)."""
    started = time.monotonic()
    response = _http.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=timeout)
    return Timed(response, time.monotonic() - started)


@dataclass
class Timed:
    response: httpx.Response
    seconds: float


def record_of(url: str, request_id: str, timeout: float = 3.0) -> dict[str, Any]:
    """The request's record from Turnout's records API (admin key), once it is written."""
    auth = {"authorization": f"Bearer {ADMIN_KEY}"}
    deadline = time.monotonic() + timeout
    while True:
        response = _http.get(f"{url}/turnout/requests/{request_id}", headers=auth, timeout=5)
        if response.status_code == 200:
            # The API leaves out fields at their defaults.
            found: dict[str, Any] = RECORD_DEFAULTS | response.json()
            return found
        assert response.status_code == 404, response.text
        if time.monotonic() > deadline:
            raise AssertionError(f"no record for {request_id} within {timeout} s")
        time.sleep(0.02)


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` (e.g. turnout_requests_total) whose labels include
    `labels`, from Turnout's /metrics."""
    text = _http.get(url + "/metrics", timeout=5).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def events(raw: bytes) -> list[bytes]:
    """The SSE events of a stream, without their blank-line terminators."""
    return [e for e in raw.split(b"\n\n") if e.strip()]


def last_json(raw: bytes) -> Any:
    return json.loads(events(raw)[-1].removeprefix(b"data: "))


def sent_by(recorder: Recorder, user: str) -> int:
    """Requests the fake upstream received carrying this `user` (one per upstream attempt)."""
    return sum(
        1
        for r in list(recorder.received)
        if isinstance(r.json, dict) and r.json.get("user") == user
    )


def first_chunk_bytes(upstream_url: str, model: str) -> int:
    """Bytes on the wire of the first HTTP chunk (= first SSE event) of the fake's stream for
    `model`, chunk framing included: a fault `after` this many body bytes falls just after the
    first event."""
    body = {"model": model, "messages": USER, "stream": True}
    with _http.stream("POST", upstream_url + "/v1/chat/completions", json=body) as response:
        first = events(response.read())[0] + b"\n\n"
    return len(f"{len(first):x}\r\n") + len(first) + 2


def skip_unless_long(request: pytest.FixtureRequest) -> None:
    """Long forms (marker `long`) run only when asked for: `pytest -m long`."""
    if "long" not in (request.config.option.markexpr or ""):
        pytest.skip("a long form: run with -m long")


def get(url: str) -> httpx.Response:
    return _http.get(url, timeout=5)


@dataclass
class Streamed:
    """A streamed answer as the client got it: bytes, and when they came (monotonic)."""

    response: httpx.Response
    raw: bytes
    started: float
    first_at: float | None  # the first body bytes
    ended_at: float


def stream(
    url: str, body: dict[str, Any], headers: dict[str, str] | None = None, timeout: float = 15.0
) -> Streamed:
    """POST a streaming chat request to Turnout and read it to its end."""
    started = time.monotonic()
    first_at = None
    parts: list[bytes] = []
    target = url + "/v1/chat/completions"
    with _http.stream("POST", target, json=body, headers=headers, timeout=timeout) as response:
        for part in response.iter_raw():
            if first_at is None:
                first_at = time.monotonic()
            parts.append(part)
    return Streamed(response, b"".join(parts), started, first_at, time.monotonic())


def direct_stream(upstream_url: str, body: dict[str, Any]) -> tuple[bytes, bytes]:
    """The fake upstream's own stream for `body` as Turnout asks for it (usage included):
    (all its bytes, its usage event with terminator)."""
    asked = body | {"stream": True, "stream_options": {"include_usage": True}}
    with _http.stream("POST", upstream_url + "/v1/chat/completions", json=asked) as response:
        raw = response.read()
    usage = [e for e in events(raw) if b'"choices":[]' in e]
    return raw, (usage[0] + b"\n\n" if usage else b"")
