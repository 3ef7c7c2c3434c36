"""Token estimates with tiktoken for requests whose upstream gave no usage (cut, left, ignored)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

from gateway.records import Usage
from gateway.tokens import TokenCounter


def prompt_tokens(counter: TokenCounter, body: dict[str, Any]) -> int:
    """Prompt tokens of the body as sent upstream (chat messages, a prompt, or embedding input)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        return counter.chat(m for m in messages if isinstance(m, dict))
    value = body.get("prompt", body.get("input"))
    return _input_tokens(counter, value)


def _input_tokens(counter: TokenCounter, value: Any) -> int:
    if isinstance(value, str):
        return counter.text(value)
    if not isinstance(value, list):
        return 0
    total = 0
    for item in value:
        if isinstance(item, str):
            total += counter.text(item)
        elif isinstance(item, list):
            total += len(item)
        elif isinstance(item, int):
            total += 1
    return total


def choice_texts(payload: Any) -> list[str]:
    """The generated text in one response or stream chunk (content, text, tool arguments)."""
    if not isinstance(payload, dict) or not isinstance(choices := payload.get("choices"), list):
        return []
    texts: list[str] = []
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        if isinstance(text := choice.get("text"), str):
            texts.append(text)
        for key in ("delta", "message"):
            part = choice.get(key)
            if isinstance(part, dict):
                texts.extend(_message_texts(part))
    return texts


def _message_texts(message: dict[str, Any]) -> list[str]:
    texts = [message["content"]] if isinstance(message.get("content"), str) else []
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            texts.append(function["arguments"])
    return texts


def stream_texts(payloads: Iterable[bytes]) -> list[str]:
    """Generated text in relayed stream chunks (undecodable chunks are skipped)."""
    texts: list[str] = []
    for data in payloads:
        try:
            texts.extend(choice_texts(msgspec.json.decode(data)))
        except msgspec.DecodeError:
            continue
    return texts


def estimate(counter: TokenCounter, prompt: int, completion: Iterable[str], injected: int) -> Usage:
    """Usage from a prompt count and the completion text, marked as estimated."""
    return Usage(
        prompt=prompt,
        injected=min(injected, prompt),
        completion=counter.texts(completion),
        estimated=True,
    )
