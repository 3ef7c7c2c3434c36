"""Request bodies the simulated upstream accepts, checked as vLLM checks them, and its errors."""

from __future__ import annotations

import secrets
import time
from typing import Any

import msgspec

from gateway.tokens import TokenCounter
from serving.sim_answers import token_pieces
from serving.sim_text import seed_of, words

MAX_TOKENS = 1 << 20
MAX_CHOICES = 128
MAX_DIMENSIONS = 8192
DEFAULT_DIMENSIONS = 16

ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    500: "InternalServerError",
}


class SimError(Exception):
    """An error the simulator answers with, rendered in OpenAI's (and newer vLLM's) shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> bytes:
        """`{"error": {message, type, param, code}}` as JSON bytes."""
        error = {
            "message": self.message,
            "type": ERROR_TYPES.get(self.status, "InternalServerError"),
            "param": self.param,
            "code": self.status,
        }
        return msgspec.json.encode({"error": error})


class Generation(msgspec.Struct, kw_only=True):
    """What one chat or text completion request asks for, with its answer decided."""

    chat: bool
    id: str
    created: int
    model: str
    stream: bool
    include_usage: bool
    prompt_tokens: int
    choices: list[list[str]]
    finish_reason: str

    @property
    def completion_tokens(self) -> int:
        return sum(len(tokens) for tokens in self.choices)


class Embedding(msgspec.Struct, kw_only=True):
    """What one embeddings request asks for: a seed and a token count per input."""

    model: str
    inputs: list[tuple[int, int]]
    dimensions: int
    base64: bool


def parse_object(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400."""
    try:
        value = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise SimError(400, f"Invalid JSON body: {exc}") from None
    if not isinstance(value, dict):
        raise SimError(400, "The request body must be a JSON object.")
    return value


def model_of(body: dict[str, Any]) -> str:
    """The requested model name, or a 400 when it is missing."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise SimError(400, "`model` is required and must be a string.", param="model")
    return model


def parse_chat(body: dict[str, Any], counter: TokenCounter, default_tokens: int) -> Generation:
    """A chat completion request; its answer is seeded by the messages."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise SimError(400, "`messages` must be a non-empty list.", param="messages")
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise SimError(400, "Each message must be an object with a `role`.", param="messages")
    limit = _int_field(body, "max_completion_tokens", 1, MAX_TOKENS)
    if limit is None:
        limit = _int_field(body, "max_tokens", 1, MAX_TOKENS)
    n = _int_field(body, "n", 1, MAX_CHOICES) or 1
    seed = seed_of(messages)
    choices = [words(seed_of(seed, i), limit or default_tokens) for i in range(n)]
    return _generation(body, True, counter.chat(messages), choices, limit is not None)


def answer_with(gen: Generation, body: dict[str, Any], counter: TokenCounter, text: str) -> None:
    """Make every choice of a parsed chat request `text` (one piece per token, so usage
    counts what is returned), cut at the request's max tokens ("length") or whole ("stop")."""
    limit = _int_field(body, "max_completion_tokens", 1, MAX_TOKENS)
    if limit is None:
        limit = _int_field(body, "max_tokens", 1, MAX_TOKENS)
    pieces = token_pieces(counter, text)
    cut = limit is not None and len(pieces) > limit
    if cut:
        pieces = pieces[:limit]
    gen.choices = [list(pieces) for _ in gen.choices]
    gen.finish_reason = "length" if cut else "stop"


def parse_completion(
    body: dict[str, Any], counter: TokenCounter, default_tokens: int
) -> Generation:
    """A text completion request: one prompt or a batch, `n` choices per prompt."""
    prompts = _inputs(body.get("prompt"), "prompt", counter)
    limit = _int_field(body, "max_tokens", 1, MAX_TOKENS)
    n = _int_field(body, "n", 1, MAX_CHOICES) or 1
    count = limit or default_tokens
    choices = [words(seed_of(seed, i), count) for seed, _ in prompts for i in range(n)]
    prompt_tokens = sum(tokens for _, tokens in prompts)
    return _generation(body, False, prompt_tokens, choices, limit is not None)


def parse_embedding(body: dict[str, Any], counter: TokenCounter) -> Embedding:
    """An embeddings request: text or token inputs, optional dimensions and base64."""
    inputs = _inputs(body.get("input"), "input", counter)
    dimensions = _int_field(body, "dimensions", 1, MAX_DIMENSIONS) or DEFAULT_DIMENSIONS
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise SimError(
            400, "`encoding_format` must be 'float' or 'base64'.", param="encoding_format"
        )
    return Embedding(
        model=model_of(body), inputs=inputs, dimensions=dimensions, base64=encoding == "base64"
    )


def _generation(
    body: dict[str, Any], chat: bool, prompt_tokens: int, choices: list[list[str]], limited: bool
) -> Generation:
    stream, include_usage = _stream_flags(body)
    return Generation(
        chat=chat,
        id=("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(16),
        created=int(time.time()),
        model=model_of(body),
        stream=stream,
        include_usage=include_usage,
        prompt_tokens=prompt_tokens,
        choices=choices,
        finish_reason="length" if limited else "stop",
    )


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise SimError(400, "`stream` must be a boolean.", param="stream")
    options = body.get("stream_options")
    if options is None:
        return bool(stream), False
    if not stream:
        raise SimError(
            400, "Stream options can only be defined when `stream=True`.", param="stream_options"
        )
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise SimError(
            400, "`stream_options.include_usage` must be a boolean.", param="stream_options"
        )
    return True, bool(options.get("include_usage"))


def _int_field(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SimError(400, f"`{name}` must be an integer from {low} to {high}.", param=name)
    return value


def _inputs(value: object, name: str, counter: TokenCounter) -> list[tuple[int, int]]:
    """(seed, tokens) per input: a string, token ids, or a list of either."""
    if isinstance(value, str):
        return [(seed_of(value), counter.text(value))]
    if isinstance(value, list) and value:
        if all(_is_token_id(x) for x in value):
            return [(seed_of(value), len(value))]
        if all(isinstance(x, str) for x in value):
            return [(seed_of(x), counter.text(x)) for x in value]
        if all(isinstance(x, list) and x and all(_is_token_id(t) for t in x) for x in value):
            return [(seed_of(x), len(x)) for x in value]
    raise SimError(400, f"`{name}` must be a string, a list of strings, or token ids.", param=name)


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
