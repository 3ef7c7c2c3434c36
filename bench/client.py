"""A load generator that is not the bottleneck: raw HTTP/1.1 keep-alive connections on uvloop.

Each connection is an `asyncio.Protocol` with an httptools response parser that sends its next
request from the callback that completed the previous one (closed loop, no task per request,
no httpx: that would add ~100 µs per request). It measures latency, time to the first byte of
the first SSE data event, data events received, and compares every streamed body (de-chunked)
with a reference.

`run_load` runs one level for a duration or a request count; `Mix` lets each request pick its
kind (the soak mixes streaming, non-streaming, upstream errors and clients that leave
mid-stream).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import httptools
import uvloop

DEFAULT_PROMPT = "Say hello twenty times."


@dataclass(frozen=True)
class Kind:
    """One kind of request: its bytes, and what the client does with the answer."""

    name: str
    request: bytes
    stream: bool = False
    leave_after_first_event: bool = False  # close the connection at the first data event


def request_bytes(
    host: str,
    port: int,
    model: str,
    *,
    stream: bool = False,
    path: str = "/v1/chat/completions",
    api_key: str | None = None,
    include_usage: bool = False,
    prompt: str = DEFAULT_PROMPT,
) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 20,
    }
    if stream:
        body["stream"] = True
        if include_usage:
            body["stream_options"] = {"include_usage": True}
    payload = json.dumps(body, separators=(",", ":")).encode()
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        "Accept: */*",
        f"Content-Length: {len(payload)}",
    ]
    if api_key is not None:
        lines.append(f"Authorization: Bearer {api_key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


@dataclass
class LoadResult:
    """What one level measured (times in seconds)."""

    concurrency: int
    elapsed: float = 0.0
    completed: int = 0  # answers read to their end
    left: int = 0  # streams the client left on purpose
    failed: int = 0  # connections lost or refused before an answer ended
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    by_kind: collections.Counter[tuple[str, int]] = field(default_factory=collections.Counter)
    latencies: list[float] = field(default_factory=list)
    first_events: list[float] = field(default_factory=list)
    events: int = 0  # SSE data events received (complete streams only)
    identical: int = 0
    different: int = 0
    first_difference: bytes | None = None
    first_body: bytes | None = None

    @property
    def rate(self) -> float:
        return self.completed / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def errors(self) -> int:
        return self.failed + sum(n for status, n in self.statuses.items() if status >= 400)

    def percentile(self, values: Sequence[float], q: float) -> float | None:
        if not values:
            return None
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]

    def summary(self) -> dict[str, Any]:
        ms = 1000.0

        def pct(values: Sequence[float], q: float) -> float | None:
            found = self.percentile(values, q)
            return None if found is None else found * ms

        return {
            "concurrency": self.concurrency,
            "elapsed_s": round(self.elapsed, 3),
            "requests": self.completed,
            "rate": round(self.rate, 1),
            "errors": self.errors,
            "left": self.left,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "p50_ms": pct(self.latencies, 50),
            "p90_ms": pct(self.latencies, 90),
            "p99_ms": pct(self.latencies, 99),
            "first_event_p50_ms": pct(self.first_events, 50),
            "first_event_p99_ms": pct(self.first_events, 99),
            "events_per_s": round(self.events / self.elapsed, 1) if self.elapsed > 0 else 0.0,
            "identical": self.identical,
            "different": self.different,
        }


class _Plan:
    """Shared by a level's connections: what to send next, when to stop, where to record."""

    def __init__(
        self,
        kinds: Sequence[Kind],
        result: LoadResult,
        deadline: float | None,
        count: int | None,
        reference: bytes | None,
        min_requests: int = 0,
        hard_deadline: float | None = None,
    ) -> None:
        self.kinds = kinds
        self.result = result
        self.deadline = deadline
        self.remaining = count
        self.reference = reference
        self.min_requests = min_requests
        self.hard_deadline = hard_deadline
        self.sent = 0
        self.last_done = 0.0

    def done(self) -> bool:
        """Past the deadline (and `min_requests` sent, or past the hard deadline), or the
        request count used up."""
        if self.deadline is not None:
            now = time.perf_counter()
            if now >= self.deadline and (
                self.sent >= self.min_requests
                or (self.hard_deadline is not None and now >= self.hard_deadline)
            ):
                return True
        return self.remaining is not None and self.remaining <= 0

    def next_kind(self) -> Kind | None:
        if self.done():
            return None
        if self.remaining is not None:
            self.remaining -= 1
        kind = self.kinds[self.sent % len(self.kinds)]
        self.sent += 1
        return kind


class _Connection(asyncio.Protocol):
    """A keep-alive connection sending one request after another until the plan says stop."""

    def __init__(self, plan: _Plan, finished: asyncio.Future[None]) -> None:
        self.plan = plan
        self.finished = finished
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.kind: Kind | None = None
        self.sent_at = 0.0
        self.first_event = False
        self.prefix = b""
        self.body: list[bytes] = []

    # connection
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self._send_next()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.kind is not None:  # in the middle of an answer
            self.plan.result.failed += 1
            self.kind = None
        if not self.finished.done():
            self.finished.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._close()
        except httptools.HttpParserError:
            self.plan.result.failed += 1
            self.kind = None
            self._close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.first_event = False
        self.prefix = b""
        self.body = []

    def on_body(self, body: bytes) -> None:
        kind = self.kind
        if kind is None:
            return
        if kind.stream:
            self.body.append(body)
            if not self.first_event:
                self.prefix += body
                if b"data:" in self.prefix:
                    self.first_event = True
                    self.plan.result.first_events.append(time.perf_counter() - self.sent_at)
                    if kind.leave_after_first_event:
                        self.plan.result.left += 1
                        self.plan.result.by_kind[(kind.name, 0)] += 1  # 0: left on purpose
                        self.kind = None
                        self._close()

    def on_message_complete(self) -> None:
        kind = self.kind
        if kind is None:
            return
        now = time.perf_counter()
        result = self.plan.result
        status = self.parser.get_status_code()
        result.statuses[status] += 1
        result.by_kind[(kind.name, status)] += 1
        result.completed += 1
        result.latencies.append(now - self.sent_at)
        self.plan.last_done = now
        if kind.stream and status == 200:
            body = b"".join(self.body)
            result.events += body.count(b"\n\n")
            if result.first_body is None:
                result.first_body = body
            reference = self.plan.reference
            if reference is not None:
                if body == reference:
                    result.identical += 1
                else:
                    result.different += 1
                    if result.first_difference is None:
                        result.first_difference = body
        self.kind = None
        if self.parser.should_keep_alive():
            self._send_next()
        else:
            self._close()

    # helpers
    def _send_next(self) -> None:
        kind = self.plan.next_kind()
        if kind is None or self.transport is None:
            self._close()
            return
        self.kind = kind
        self.sent_at = time.perf_counter()
        self.transport.write(kind.request)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def _drive(
    host: str,
    port: int,
    concurrency: int,
    plan: _Plan,
) -> None:
    """Keep `concurrency` connections busy until the plan stops; reopen a connection that was
    closed (by the client leaving a stream, or by the server) while there is work left."""
    loop = asyncio.get_running_loop()

    async def lane() -> None:
        while True:
            finished: asyncio.Future[None] = loop.create_future()
            try:
                protocol = functools.partial(_Connection, plan, finished)
                await loop.create_connection(protocol, host, port)
            except OSError:
                plan.result.failed += 1
                if plan.next_kind() is None:  # counts the refused request as sent
                    return
                await asyncio.sleep(0.05)
                continue
            await finished
            if plan.done():
                return

    await asyncio.gather(*(lane() for _ in range(concurrency)))


def run_load(
    host: str,
    port: int,
    kinds: Sequence[Kind],
    *,
    concurrency: int,
    seconds: float | None = None,
    count: int | None = None,
    reference: bytes | None = None,
    min_requests: int = 0,
) -> LoadResult:
    """One level: `concurrency` connections in a closed loop for `seconds` or `count` requests,
    cycling through `kinds`. Streamed bodies are compared with `reference` when given. A slow
    system gets up to 3 x `seconds` to be sent `min_requests` (so that percentiles mean
    something)."""
    result = LoadResult(concurrency)

    async def main() -> None:
        started = time.perf_counter()
        deadline = hard = None
        if seconds is not None:
            deadline, hard = started + seconds, started + 3 * seconds
        plan = _Plan(kinds, result, deadline, count, reference, min_requests, hard)
        await _drive(host, port, concurrency, plan)
        result.elapsed = (plan.last_done or time.perf_counter()) - started

    uvloop.run(main())
    return result
