"""A fast OpenAI-compatible upstream for benchmarks: asyncio.Protocol + httptools on uvloop.

It does nothing but answer, so that it is never what limits a benchmark: every answer is built
once per (model, stream, usage) and then written with one `transport.write`.

- `POST /v1/chat/completions`: a fixed completion (CONTENT, fixed usage) echoing the request's
  `model`; with `"stream": true`, an SSE stream of a role event, `--chunks` content events, a
  finish event, the usage event when `stream_options.include_usage` is true, and `[DONE]`.
- model `fail-500`: a 500 with an OpenAI-style error body.
- a model starting with `slow`: streams are paced, one event every `--slow-ms` (so that a
  client can leave mid-stream); non-streaming answers are not delayed.
- any `GET`: 200 — `/v1/models` lists `--model` names, `/metrics` is empty, the rest `{}`
  (health checks of peers such as vllm-router).

Run: .venv/bin/python -m bench.upstream --port 9000 [--chunks 20]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Callable
from typing import cast

import httptools
import msgspec
import uvloop

CREATED = 1_700_000_000
ANSWER_ID = "chatcmpl-bench"
WORDS = 20
CONTENT = " ".join(["hello"] * WORDS)
USAGE = {"prompt_tokens": 12, "completion_tokens": WORDS, "total_tokens": 12 + WORDS}
FAIL_MODEL = "fail-500"
SLOW_PREFIX = "slow"

_encode = msgspec.json.encode


class _StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _Request(msgspec.Struct):
    model: str = ""
    stream: bool = False
    stream_options: _StreamOptions | None = None


_decode_request = msgspec.json.Decoder(_Request).decode


def _head(status: bytes, content_type: bytes, length: int | None) -> bytes:
    framing = b"transfer-encoding: chunked" if length is None else b"content-length: %d" % length
    return b"HTTP/1.1 %s\r\ncontent-type: %s\r\n%s\r\n\r\n" % (status, content_type, framing)


def _json(status: bytes, body: bytes) -> bytes:
    return _head(status, b"application/json", len(body)) + body


def completion(model: str) -> bytes:
    body = {
        "id": ANSWER_ID,
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": CONTENT},
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
    }
    return _encode(body)


def stream_events(model: str, chunks: int, include_usage: bool) -> list[bytes]:
    """The SSE events of a streamed answer, each `data: ...\\n\\n`."""

    def chunk(delta: dict[str, str], finish: str | None = None) -> dict[str, object]:
        return {
            "id": ANSWER_ID,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    payloads: list[object] = [chunk({"role": "assistant", "content": ""})]
    payloads += [chunk({"content": "hello" if i == 0 else " hello"}) for i in range(chunks)]
    payloads.append(chunk({}, "stop"))
    if include_usage:
        payloads.append(
            {
                "id": ANSWER_ID,
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": model,
                "choices": [],
                "usage": USAGE,
            }
        )
    events = [b"data: " + _encode(p) + b"\n\n" for p in payloads]
    return [*events, b"data: [DONE]\n\n"]


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


SSE_HEAD = _head(b"200 OK", b"text/event-stream; charset=utf-8", None)
LAST_CHUNK = b"0\r\n\r\n"
ERROR_500 = _json(
    b"500 Internal Server Error",
    _encode({"error": {"message": "bench upstream failure", "type": "server_error", "code": 500}}),
)
NOT_FOUND = _json(b"404 Not Found", b'{"error": {"message": "not found"}}')
BAD_REQUEST = _json(b"400 Bad Request", b'{"error": {"message": "bad request"}}')
EMPTY_JSON = _json(b"200 OK", b"{}")
METRICS = _head(b"200 OK", b"text/plain; version=0.0.4", 0)


class Answers:
    """Every answer's bytes, built on first use."""

    def __init__(self, chunks: int, models: list[str]) -> None:
        self.chunks = chunks
        self._cache: dict[tuple[str, bool, bool], bytes] = {}
        self._events: dict[tuple[str, bool], list[bytes]] = {}
        listed = [{"id": m, "object": "model", "owned_by": "bench"} for m in models]
        self.models = _json(b"200 OK", _encode({"object": "list", "data": listed}))

    def whole(self, model: str, stream: bool, include_usage: bool) -> bytes:
        key = (model, stream, include_usage)
        found = self._cache.get(key)
        if found is None:
            if len(self._cache) > 1000:
                self._cache.clear()
            if stream:
                events = stream_events(model, self.chunks, include_usage)
                found = SSE_HEAD + b"".join(_chunked(e) for e in events) + LAST_CHUNK
            else:
                found = _json(b"200 OK", completion(model))
            self._cache[key] = found
        return found

    def events(self, model: str, include_usage: bool) -> list[bytes]:
        key = (model, include_usage)
        found = self._events.get(key)
        if found is None:
            found = [_chunked(e) for e in stream_events(model, self.chunks, include_usage)]
            self._events[key] = found
        return found


class Connection(asyncio.Protocol):
    """One client connection: parse requests with httptools, answer each from `Answers`."""

    def __init__(self, answers: Answers, slow_s: float) -> None:
        self.answers = answers
        self.slow_s = slow_s
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.pacing: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if self.pacing is not None:
            self.pacing.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._send(BAD_REQUEST, close=True)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        keep = self.parser.should_keep_alive()
        method = self.parser.get_method()
        path = self.url.split(b"?", 1)[0]
        if method == b"GET":
            if path.endswith(b"/models"):
                self._send(self.answers.models, not keep)
            elif path == b"/metrics":
                self._send(METRICS, not keep)
            else:
                self._send(EMPTY_JSON, not keep)
            return
        if method != b"POST" or not path.endswith(b"/chat/completions"):
            self._send(NOT_FOUND, not keep)
            return
        try:
            request = _decode_request(b"".join(self.body))
        except (msgspec.DecodeError, msgspec.ValidationError):
            self._send(BAD_REQUEST, not keep)
            return
        if request.model == FAIL_MODEL:
            self._send(ERROR_500, not keep)
            return
        usage = request.stream_options is not None and request.stream_options.include_usage
        if request.stream and request.model.startswith(SLOW_PREFIX):
            self._pace(self.answers.events(request.model, usage), not keep)
            return
        self._send(self.answers.whole(request.model, request.stream, usage), not keep)

    def _send(self, data: bytes, close: bool) -> None:
        if self.transport is None:
            return
        self.transport.write(data)
        if close:
            self.transport.close()

    def _pace(self, events: list[bytes], close: bool) -> None:
        """Write the stream's head and events one by one, `slow_s` apart."""
        loop = asyncio.get_running_loop()
        self._send(SSE_HEAD, False)
        remaining = iter([*events, LAST_CHUNK])

        def step() -> None:
            self.pacing = None
            item = next(remaining, None)
            if item is None or self.transport is None:
                if close and self.transport is not None:
                    self.transport.close()
                return
            self.transport.write(item)
            self.pacing = loop.call_later(self.slow_s, step)

        step()


async def serve(host: str, port: int, chunks: int, models: list[str], slow_ms: float) -> None:
    answers = Answers(chunks, models)
    loop = asyncio.get_running_loop()
    factory: Callable[[], Connection] = lambda: Connection(answers, slow_ms / 1000)  # noqa: E731
    server = await loop.create_server(factory, host, port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"bench upstream on http://{host}:{port} ({chunks} chunks per stream)", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--chunks", type=int, default=20, help="content events per stream")
    parser.add_argument("--model", action="append", default=None, help="listed by /v1/models")
    parser.add_argument("--slow-ms", type=float, default=2.0, help="pacing of `slow*` streams")
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port, args.chunks, args.model or ["m"], args.slow_ms))


if __name__ == "__main__":
    main()
