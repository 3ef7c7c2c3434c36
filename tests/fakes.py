"""Fake OpenAI-compatible upstream (raw ASGI) whose behaviour is picked by the request's model."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

Scope = Mapping[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SECRET = "sk-live-SECRET123456"
PROMPT_TOKENS = 7
EMBEDDING_PROMPT_TOKENS = 3
CACHED_TOKENS = 4  # reported by `detailed-usage`
REASONING_TOKENS = 2
OK_PIECES = ("Hel", "lo from ", "fake")
OK_TEXT = "".join(OK_PIECES)
CREATED = 1_700_000_000
FIRST_TOKEN_DELAY_S = 2.0
SLOW_INTERVAL_S = 0.05
SLOW_CHUNKS = 200
RETRY_AFTER_S = "7"
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = (("content-type", "text/event-stream"), ("cache-control", "no-cache"))

MODELS = (
    *("ok", "echo", "garbage", "slow-first-token", "hang", "no-usage", "sliced"),
    *("stream-slow", "stream-cut", "stream-reset", "stream-garbage", "stream-garbage-late"),
    *("no-trailing-newline", "slow-first-event", "first-event-error", "keepalive-first"),
    "detailed-usage",
    "stream-empty",
    "judge",
    *("once-500", "once-429", "once-429-bare", "stream-no-done", "picky"),
)
# `once-*`: the first request for a (model, `user`) pair fails, later ones are answered; a test
# sends a `user` of its own. `picky` refuses like a real provider: messages (about 4 characters
# a token) plus max_tokens over its context, or a message with FORBIDDEN against its content
# policy; 400 with OpenAI's codes and messages that carry SECRET, to be scrubbed.
ONCE_RETRY_AFTER_S = "1"
CONTEXT_LIMIT = 4096
FORBIDDEN = "FORBIDDEN"
_failed_once: set[tuple[str, str]] = set()
_failed_once_lock = threading.Lock()

# status -> (message, type, param, code); the messages that pass through carry a secret.
ERRORS: Mapping[int, tuple[str, str, str | None, str | None]] = MappingProxyType(
    {
        400: (f"bad field foo; key {SECRET} leaked", "invalid_request_error", "foo", None),
        401: (f"Incorrect API key {SECRET}", "invalid_request_error", None, "invalid_api_key"),
        403: ("Not allowed to use this model", "permission_error", None, None),
        404: ("The model does not exist", "invalid_request_error", "model", "model_not_found"),
        413: (f"request too large; key {SECRET} leaked", "invalid_request_error", None, None),
        422: (f"bar must be positive; key {SECRET} leaked", "invalid_request_error", "bar", None),
        429: ("Rate limit reached for requests", "rate_limit_error", None, "rate_limit_exceeded"),
        500: ("The server had an error processing your request", "server_error", None, None),
        502: ("Bad gateway", "server_error", None, None),
        503: ("The engine is currently overloaded", "server_error", None, None),
    }
)

_ENDPOINTS: Mapping[tuple[str, str], str] = MappingProxyType(
    {
        ("POST", "/v1/chat/completions"): "chat",
        ("POST", "/v1/completions"): "completion",
        ("POST", "/v1/embeddings"): "embedding",
        ("GET", "/v1/models"): "models",
    }
)


@dataclass
class Received:
    """One request as the fake upstream saw it; header names are lowercased."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any
    peer: tuple[str, int] | None = None  # the client's address: one per upstream connection


class Recorder:
    """What the fake received, and when it noticed clients going away; safe to read from tests."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.disconnects: list[tuple[str, float]] = []
        self._changed = threading.Condition()

    def last(self) -> Received:
        """The most recent request; fails loudly when there was none."""
        if not self.received:
            raise AssertionError("the fake upstream received no request")
        return self.received[-1]

    def note_disconnect(self, model: str) -> None:
        """Record that the request for `model` lost its client (called by the fake)."""
        noticed = time.monotonic()
        with self._changed:
            self.disconnects.append((model, noticed))
            self._changed.notify_all()

    def wait_disconnect(self, model: str, timeout: float) -> float | None:
        """Monotonic time the first disconnect for `model` was noticed, or None after `timeout`."""
        with self._changed:
            self._changed.wait_for(lambda: self._first_disconnect(model) is not None, timeout)
            return self._first_disconnect(model)

    def clear(self) -> None:
        with self._changed:
            self.received.clear()
            self.disconnects.clear()

    def _first_disconnect(self, model: str) -> float | None:
        return next((at for name, at in self.disconnects if name == model), None)


class _Reply:
    """The response side of one exchange; knows whether the response was completed."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.complete = False

    async def start(self, status: int, headers: Iterable[tuple[str, str]]) -> None:
        raw = [(name.encode(), value.encode()) for name, value in headers]
        await self._send({"type": "http.response.start", "status": status, "headers": raw})

    async def body(self, data: bytes, *, more: bool) -> None:
        if not more:
            self.complete = True
        await self._send({"type": "http.response.body", "body": data, "more_body": more})

    async def raw_json(
        self,
        status: int,
        data: bytes,
        headers: Iterable[tuple[str, str]] = (),
        sliced: bool = False,
    ) -> None:
        length = ("content-length", str(len(data)))
        await self.start(status, [("content-type", "application/json"), length, *headers])
        if sliced:
            await _sliced(data, self)
        await self.body(b"" if sliced else data, more=False)

    async def json(self, status: int, obj: Any, headers: Iterable[tuple[str, str]] = ()) -> None:
        await self.raw_json(status, _dumps(obj), headers)

    async def error(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        """An error in OpenAI's shape; a 429 says when to retry."""
        err = {"message": message, "type": type_, "param": param, "code": code}
        headers = [("retry-after", RETRY_AFTER_S)] if status == 429 else []
        await self.json(status, {"error": err}, headers)


def create_fake_upstream() -> tuple[ASGIApp, Recorder]:
    """A new fake upstream app and the recorder that sees everything it receives."""
    recorder = Recorder()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
        elif scope["type"] == "http":
            await _http(scope, receive, send, recorder)

    return app, recorder


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _http(scope: Scope, receive: Receive, send: Send, recorder: Recorder) -> None:
    body = await read_body(receive)
    if body is None:
        return
    received = Received(
        method=scope["method"],
        path=scope["path"],
        headers=_headers(scope),
        body=body,
        json=_parse(body),
        peer=tuple(scope["client"]) if scope.get("client") else None,
    )
    recorder.received.append(received)
    reply = _Reply(send)
    model = received.json.get("model") if isinstance(received.json, dict) else None
    model = model if isinstance(model, str) else "ok"
    work = _dispatch(received, model, reply)
    await _watched(work, reply, receive, lambda: recorder.note_disconnect(model))


async def read_body(receive: Receive) -> bytes | None:
    """An ASGI request's whole body (None: the client left first)."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _headers(scope: Scope) -> dict[str, str]:
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope["headers"]:
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


def _parse(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


async def _watched(
    work: Coroutine[Any, Any, None], reply: _Reply, receive: Receive, on_gone: Callable[[], None]
) -> None:
    """Run `work` while watching for the client to leave; a departure cancels it and is noted."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        on_gone()
        await _cancel(task, watcher)
        raise
    if watcher.done() and not reply.complete:
        on_gone()
        await _cancel(task)
        return
    await _cancel(watcher)
    await task


async def _until_disconnect(receive: Receive) -> None:
    # After the body was read, the server's receive() blocks until the client leaves
    # (or the response completes): safe to cancel.
    while (await receive())["type"] != "http.disconnect":
        pass


async def _cancel(*tasks: asyncio.Future[None]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _dispatch(received: Received, model: str, reply: _Reply) -> None:
    kind = _ENDPOINTS.get((received.method, received.path))
    if kind == "models":
        await reply.json(200, {"object": "list", "data": [_model_card(name) for name in MODELS]})
    elif kind is None:
        await reply.error(404, f"no route for {received.method} {received.path}")
    elif not isinstance(received.json, dict):
        await reply.error(400, "the body must be a JSON object")
    else:
        await _answer(kind, received, model, reply)


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": CREATED, "owned_by": "fake"}


async def _answer(kind: str, received: Received, model: str, reply: _Reply) -> None:
    """Behaviours shared by every endpoint first, then the endpoint's own answer."""
    status = _error_status(model)
    if status is not None:
        await reply.error(status, *ERRORS[status])
        return
    if await _refused(received.json, model, reply):
        return
    if model == "garbage":
        await reply.raw_json(200, b"not json{{")
        return
    if model == "hang":
        await asyncio.Event().wait()
    if model == "slow-first-token":
        await asyncio.sleep(FIRST_TOKEN_DELAY_S)
    if kind == "embedding":
        await reply.json(200, _embeddings(received.json, model))
    elif received.json.get("stream") is True:
        await _stream(_Frames(kind, model), model, received, reply)
    else:
        await _complete(kind, received, model, reply)


async def _refused(body: dict[str, Any], model: str, reply: _Reply) -> bool:
    """The `once-*` and `picky` refusals; True when the request was refused."""
    if model.startswith("once-") and _first_time(model, str(body.get("user"))):
        if model == "once-500":
            await reply.error(500, *ERRORS[500])
        else:
            headers = [] if model == "once-429-bare" else [("retry-after", ONCE_RETRY_AFTER_S)]
            error = {"message": ERRORS[429][0], "type": "rate_limit_error", "param": None,
                     "code": "rate_limit_exceeded"}  # fmt: skip
            await reply.json(429, {"error": error}, headers)
        return True
    if model != "picky":
        return False
    max_tokens = body.get("max_tokens")
    # About four characters a token, as a real tokenizer would count English.
    requested = len(json.dumps(body.get("messages"))) // 4
    requested += max_tokens if isinstance(max_tokens, int) else 0
    if requested > CONTEXT_LIMIT:
        message = (
            f"This model's maximum context length is {CONTEXT_LIMIT} tokens. However, you "
            f"requested {requested} tokens. Please reduce the length of the messages. "
            f"(key {SECRET})"
        )
        await reply.error(400, message, "invalid_request_error", "messages",
                          "context_length_exceeded")  # fmt: skip
        return True
    if FORBIDDEN in json.dumps(body.get("messages")):
        message = f"Your request was rejected as a result of our safety system. (key {SECRET})"
        await reply.error(400, message, "invalid_request_error", None,
                          "content_policy_violation")  # fmt: skip
        return True
    return False


def _first_time(model: str, user: str) -> bool:
    with _failed_once_lock:
        if (model, user) in _failed_once:
            return False
        _failed_once.add((model, user))
        return True


def _error_status(model: str) -> int | None:
    prefix, _, code = model.partition("-")
    if prefix != "error" or not code.isdigit():
        return None
    return int(code) if int(code) in ERRORS else None


def _embeddings(body: dict[str, Any], model: str) -> dict[str, Any]:
    inputs = body.get("input")
    count = 1 if isinstance(inputs, str) or _is_tokens(inputs) else len(inputs or [])
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index in range(count):
        vector = (index + 0.25, -0.5)
        encoded = base64.b64encode(struct.pack("<2f", *vector)).decode() if as_base64 else vector
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    usage = {"prompt_tokens": EMBEDDING_PROMPT_TOKENS, "total_tokens": EMBEDDING_PROMPT_TOKENS}
    return {"object": "list", "data": data, "model": model, "usage": usage}


def _is_tokens(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, int) for v in value)


async def _complete(kind: str, received: Received, model: str, reply: _Reply) -> None:
    if model == "echo":
        text, tokens = received.body.decode("utf-8", "replace"), 1
    elif model == "judge":
        text, tokens = _judge(received.json), 1
    else:
        text, tokens = OK_TEXT, len(OK_PIECES)
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        envelope = {"id": "chatcmpl-fake", "object": "chat.completion"}
    else:
        choice = {"index": 0, "text": text}
        envelope = {"id": "cmpl-fake", "object": "text_completion"}
    choice |= {"logprobs": None, "finish_reason": "stop"}
    answer = envelope | {"created": CREATED, "model": model, "choices": [choice]}
    data = _dumps(answer | {"usage": _usage(tokens, model)})
    await reply.raw_json(200, data, sliced=model == "sliced")


def _judge(body: dict[str, Any]) -> str:
    """`judge`: "Yes." when the last message's <candidate> equals its <reference> (case and
    surrounding blanks aside), else "No, ..."; as an LLM judge asked by `turnout eval` would."""
    messages = body.get("messages") or [{}]
    content = str(messages[-1].get("content", ""))

    def tagged(tag: str) -> str:
        start, end = content.find(f"<{tag}>"), content.find(f"</{tag}>")
        return content[start + len(tag) + 2 : end].strip().casefold() if 0 <= start < end else ""

    return "Yes." if tagged("candidate") == tagged("reference") else "No, it differs."


def _usage(completion_tokens: int, model: str = "") -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": completion_tokens,
        "total_tokens": PROMPT_TOKENS + completion_tokens,
    }
    if model == "detailed-usage":
        usage["prompt_tokens_details"] = {"cached_tokens": CACHED_TOKENS}
        usage["completion_tokens_details"] = {"reasoning_tokens": REASONING_TOKENS}
    return usage


class _Frames:
    """SSE frames of one streamed chat or text completion."""

    def __init__(self, kind: str, model: str) -> None:
        self._chat = kind == "chat"
        self._model = model
        self._first = True

    def content(self, text: str) -> bytes:
        if not self._chat:
            return self._frame(
                [{"index": 0, "text": text, "logprobs": None, "finish_reason": None}]
            )
        delta = {"role": "assistant", "content": text} if self._first else {"content": text}
        self._first = False
        return self._frame([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])

    def finish(self) -> bytes:
        end: dict[str, Any] = {"delta": {}} if self._chat else {"text": ""}
        return self._frame([{"index": 0, **end, "logprobs": None, "finish_reason": "stop"}])

    def usage(self, completion_tokens: int) -> bytes:
        return self._frame([], usage=_usage(completion_tokens, self._model))

    def _frame(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        obj = "chat.completion.chunk" if self._chat else "text_completion"
        ident = "chatcmpl-fake" if self._chat else "cmpl-fake"
        chunk = {"id": ident, "object": obj, "created": CREATED, "model": self._model}
        return b"data: " + _dumps(chunk | {"choices": choices, **extra}) + b"\n\n"


async def _stream(frames: _Frames, model: str, received: Received, reply: _Reply) -> None:
    options = received.json.get("stream_options")
    wants_usage = isinstance(options, dict) and options.get("include_usage") is True
    await reply.start(200, SSE_HEADERS)
    if model == "stream-garbage":
        await reply.body(b"data: {broken\n\n" + DONE, more=False)
        return
    if model == "stream-slow":
        await _stream_slow(frames, wants_usage, reply)
        return
    if model == "first-event-error":
        error = {"error": {"message": f"model overloaded {SECRET}", "type": "server_error"}}
        await reply.body(b"data: " + _dumps(error) + b"\n\n" + DONE, more=False)
        return
    if model == "stream-empty":
        await reply.body(b"", more=False)
        return
    if model == "slow-first-event":
        await asyncio.sleep(FIRST_TOKEN_DELAY_S)
    if model == "keepalive-first":
        await reply.body(b": keepalive\n\n", more=True)
    if model == "echo":
        events = [frames.content(received.body.decode("utf-8", "replace"))]
    else:
        events = [frames.content(piece) for piece in OK_PIECES]
    if model in ("stream-cut", "stream-reset"):
        await reply.body(b"".join(events[:2]), more=True)
        if model == "stream-cut":
            await reply.body(b"", more=False)
        return
    if model == "stream-garbage-late":
        events.insert(1, b"data: {broken\n\n")
    events.append(frames.finish())
    if wants_usage and model != "no-usage":
        events.append(frames.usage(len(OK_PIECES) if model != "echo" else 1))
    if model != "stream-no-done":  # that one ends cleanly after its usage, with no [DONE]
        events.append(DONE[:-2] if model == "no-trailing-newline" else DONE)
    await _write_events(events, model == "sliced", reply)


async def _stream_slow(frames: _Frames, wants_usage: bool, reply: _Reply) -> None:
    for index in range(SLOW_CHUNKS):
        if index:
            await asyncio.sleep(SLOW_INTERVAL_S)
        await reply.body(frames.content(f"{index} "), more=True)
    tail = frames.finish() + (frames.usage(SLOW_CHUNKS) if wants_usage else b"") + DONE
    await reply.body(tail, more=False)


async def _write_events(events: list[bytes], sliced: bool, reply: _Reply) -> None:
    for event in events:
        await (_sliced(event, reply) if sliced else reply.body(event, more=True))
    await reply.body(b"", more=False)


async def _sliced(data: bytes, reply: _Reply) -> None:
    for index in range(len(data)):
        await reply.body(data[index : index + 1], more=True)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()
