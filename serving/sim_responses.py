"""Response bodies of the simulated upstream, shaped as vLLM's OpenAI server shapes them."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any

import msgspec

from serving.sim_requests import Embedding, Generation
from serving.sim_text import float32_base64, unit_vector

DONE = b"data: [DONE]\n\n"

_encode = msgspec.json.Encoder().encode


def completion_body(gen: Generation) -> bytes:
    """The whole non-streaming answer."""
    choices = [
        _full_choice(gen, index, "".join(tokens)) for index, tokens in enumerate(gen.choices)
    ]
    body = {
        "id": gen.id,
        "object": "chat.completion" if gen.chat else "text_completion",
        "created": gen.created,
        "model": gen.model,
        "choices": choices,
        "usage": _usage(gen),
    }
    return _encode(body)


def stream_steps(gen: Generation) -> Iterator[bytes]:
    """SSE bytes per token step: step 0 is due at the first token, then one per token.

    The last step also carries the finish chunks, the usage chunk when asked, and [DONE].
    """
    out = bytearray()
    if gen.chat:
        for index in range(len(gen.choices)):
            out += _event(_role_chunk(gen, index))
    length = len(gen.choices[0]) if gen.choices else 0
    for step in range(length):
        for index, tokens in enumerate(gen.choices):
            out += _event(_chunk(gen, index, tokens[step], None))
        if step < length - 1:
            yield bytes(out)
            out.clear()
    for index in range(len(gen.choices)):
        out += _event(_chunk(gen, index, None, gen.finish_reason))
    if gen.include_usage:
        out += _event(_usage_chunk(gen))
    yield bytes(out + DONE)


def embedding_body(emb: Embedding) -> bytes:
    """Unit vectors, one per input, as floats or little-endian float32 base64."""
    data = []
    for index, (seed, _) in enumerate(emb.inputs):
        vector = unit_vector(seed, emb.dimensions)
        value: Any = float32_base64(vector) if emb.base64 else vector
        data.append({"index": index, "object": "embedding", "embedding": value})
    tokens = sum(count for _, count in emb.inputs)
    body = {
        "id": "embd-" + secrets.token_hex(16),
        "object": "list",
        "created": int(time.time()),
        "model": emb.model,
        "data": data,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
    }
    return _encode(body)


def models_body(models: tuple[str, ...], created: int) -> bytes:
    """OpenAI's model list."""
    data = [
        {"id": name, "object": "model", "created": created, "owned_by": "turnout-sim"}
        for name in models
    ]
    return _encode({"object": "list", "data": data})


def _full_choice(gen: Generation, index: int, text: str) -> dict[str, Any]:
    if gen.chat:
        return {
            "index": index,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": gen.finish_reason,
        }
    return {"index": index, "text": text, "logprobs": None, "finish_reason": gen.finish_reason}


def _chunk(gen: Generation, index: int, piece: str | None, finish: str | None) -> dict[str, Any]:
    """A chunk for one choice carrying one token, or no text when `piece` is None."""
    choice: dict[str, Any] = {"index": index}
    if gen.chat:
        choice["delta"] = {} if piece is None else {"content": piece}
    else:
        choice["text"] = piece or ""
    choice["logprobs"] = None
    choice["finish_reason"] = finish
    return _with_choices(gen, [choice])


def _role_chunk(gen: Generation, index: int) -> dict[str, Any]:
    delta = {"role": "assistant", "content": ""}
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
    return _with_choices(gen, [choice])


def _with_choices(gen: Generation, choices: list[dict[str, Any]]) -> dict[str, Any]:
    chunk = _chunk_head(gen)
    chunk["choices"] = choices
    if gen.include_usage:
        chunk["usage"] = None
    return chunk


def _usage_chunk(gen: Generation) -> dict[str, Any]:
    chunk = _chunk_head(gen)
    chunk["choices"] = []
    chunk["usage"] = _usage(gen)
    return chunk


def _chunk_head(gen: Generation) -> dict[str, Any]:
    return {
        "id": gen.id,
        "object": "chat.completion.chunk" if gen.chat else "text_completion",
        "created": gen.created,
        "model": gen.model,
    }


def _usage(gen: Generation) -> dict[str, int]:
    completion = gen.completion_tokens
    return {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": gen.prompt_tokens + completion,
    }


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + _encode(payload) + b"\n\n"
