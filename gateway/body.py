"""The request body: read within the size limit, decoded, the fields Turnout reads checked."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec

from gateway.errors import BadRequest, PayloadTooLarge

CHAT = "/chat/completions"
COMPLETIONS = "/completions"
EMBEDDINGS = "/embeddings"
MAX_N = 128
MAX_TOKENS = 10_000_000


@dataclass
class ClientRequest:
    """A decoded body (kept whole, unknown fields included) and the fields Turnout acts on."""

    endpoint: str
    body: dict[str, Any]
    model: str
    stream: bool
    include_usage: bool
    user: str | None


async def read_limited(
    chunks: AsyncIterator[bytes], content_length: str | None, limit: int
) -> bytes:
    """The whole body, or 413 as soon as it is known to pass `limit` (chunked bodies included)."""
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise _too_large(limit)
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        parts.append(chunk)
    return b"".join(parts)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"Request body is larger than the limit of {limit} bytes.")


def parse(endpoint: str, raw: bytes) -> ClientRequest:
    """Decode and check; any problem is a 400 naming the parameter."""
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}") from None
    except RecursionError:  # msgspec follows nesting to the interpreter's recursion limit
        raise BadRequest("The request body is nested too deeply.") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("`model` is required and must be a non-empty string.", param="model")
    _check_common(body)
    _PAYLOAD_CHECKS[endpoint](body)
    stream = endpoint != EMBEDDINGS and body.get("stream") is True
    return ClientRequest(
        endpoint=endpoint,
        body=body,
        model=model,
        stream=stream,
        include_usage=stream and _include_usage(body),
        user=body.get("user"),
    )


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _check_common(body: dict[str, Any]) -> None:
    _expect(body, "stream", bool)
    _expect(body, "user", str)
    _expect(body, "stream_options", dict)
    options = body.get("stream_options")
    if isinstance(options, dict):
        _expect(options, "include_usage", bool, "stream_options.include_usage")
    for name in ("max_tokens", "max_completion_tokens"):
        _int_in(body, name, 1, MAX_TOKENS)
    _int_in(body, "n", 1, MAX_N)
    _number_in(body, "temperature", 0.0, 2.0)
    _number_in(body, "top_p", 0.0, 1.0)


def _check_chat(body: dict[str, Any]) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("`messages` must be a non-empty array.", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(
                f"`messages[{i}]` must be an object with a string `role`.", param=f"messages[{i}]"
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise BadRequest(
                f"`messages[{i}].content` must be a string or an array of parts.",
                param=f"messages[{i}].content",
            )


def _check_completion(body: dict[str, Any]) -> None:
    if not _is_text_or_tokens(body.get("prompt")):
        raise BadRequest(
            "`prompt` must be a string, an array of strings, or token arrays.", param="prompt"
        )


def _check_embedding(body: dict[str, Any]) -> None:
    if not _is_text_or_tokens(body.get("input")):
        raise BadRequest(
            "`input` must be a string, an array of strings, or token arrays.", param="input"
        )


def _is_text_or_tokens(value: Any) -> bool:
    if isinstance(value, str):
        return True
    if not isinstance(value, list) or not value:
        return False
    if all(isinstance(v, str) for v in value):
        return True
    if all(_is_token(v) for v in value):
        return True
    return all(isinstance(v, list) and v and all(_is_token(t) for t in v) for v in value)


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


_PAYLOAD_CHECKS = {CHAT: _check_chat, COMPLETIONS: _check_completion, EMBEDDINGS: _check_embedding}
_TYPE_NAMES = {bool: "a boolean", str: "a string", dict: "an object"}


def _expect(body: dict[str, Any], name: str, kind: type, param: str | None = None) -> None:
    value = body.get(name)
    if value is not None and not isinstance(value, kind):
        raise BadRequest(f"`{param or name}` must be {_TYPE_NAMES[kind]}.", param=param or name)


def _int_in(body: dict[str, Any], name: str, low: int, high: int) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"`{name}` must be an integer between {low} and {high}.", param=name)


def _number_in(body: dict[str, Any], name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise BadRequest(f"`{name}` must be a number between {low} and {high}.", param=name)
