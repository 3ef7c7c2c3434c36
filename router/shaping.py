"""Prompt shaping for a prompted variant: its system text and few-shot examples prepended."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Examples = Sequence[tuple[str, str]]


class PromptShapeError(ValueError):
    """The client's prompt cannot be shaped for a prompted variant (the caller answers 400)."""


def shape_chat_messages(messages: list[Any], system: str, examples: Examples) -> list[Any]:
    """A new message list for a prompted chat call; `messages` itself is not changed.

    Order: one system message (the variant's `system`, then the client's system text after a
    blank line), the examples as user/assistant pairs, then the client's other messages, the
    same objects in the same order. Only a FIRST client message with role "system" is merged
    ("developer" is not); later system messages stay where they are. Its other fields (such as
    `name`) are kept. A list-of-parts content is merged as the joined text of its "text"
    parts; other parts are dropped. With an empty `system`, the client's system message stays
    first as-is. With an empty `system` and no examples, the result equals `messages`.
    Raises PromptShapeError if the merged system content is neither a string nor a list.
    """
    client_system, rest = _split_system(messages)
    if not system and not examples:
        return list(messages)
    head: list[Any] = []
    if system:
        head.append(_merged_system(system, client_system))
    elif client_system is not None:
        head.append(client_system)
    for user, assistant in examples:
        head.append({"role": "user", "content": user})
        head.append({"role": "assistant", "content": assistant})
    return head + rest


def _split_system(messages: list[Any]) -> tuple[dict[str, Any] | None, list[Any]]:
    """The client's first message if it is a system message, and the messages after it."""
    if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
        return messages[0], messages[1:]
    return None, list(messages)


def _merged_system(system: str, client_system: dict[str, Any] | None) -> dict[str, Any]:
    """The variant's system message, with the client's system text after a blank line."""
    if client_system is None:
        return {"role": "system", "content": system}
    client_text = _content_text(client_system.get("content"))
    content = f"{system}\n\n{client_text}" if client_text else system
    return {**client_system, "content": content}


def _content_text(content: Any) -> str:
    """The text of a message content: a string, or the joined "text" parts of a list."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        )
    raise PromptShapeError("a system message's content must be a string or a list of parts")


def shape_completion_prompt(prompt: str, system: str, examples: Examples) -> str:
    """`{system}\\n\\nUser: {u}\\nAssistant: {a}\\n\\n…User: {prompt}\\nAssistant:`.

    An empty `system` adds no leading blank lines; with an empty `system` and no examples
    there is nothing to inject and `prompt` is returned unchanged.
    """
    if not system and not examples:
        return prompt
    blocks = [system] if system else []
    blocks.extend(f"User: {user}\nAssistant: {assistant}" for user, assistant in examples)
    blocks.append(f"User: {prompt}\nAssistant:")
    return "\n\n".join(blocks)


def shape_completion(prompt: Any, system: str, examples: Examples) -> str | list[str]:
    """Shape a `/v1/completions` prompt: a string, or each string of a list of strings.

    A token-array prompt (a list of ints, or a list of such lists) cannot carry text and
    raises PromptShapeError, as does any other shape.
    """
    if isinstance(prompt, str):
        return shape_completion_prompt(prompt, system, examples)
    if isinstance(prompt, list):
        if all(isinstance(item, str) for item in prompt):
            return [shape_completion_prompt(item, system, examples) for item in prompt]
        if all(_is_tokens(item) or _is_token(item) for item in prompt):
            raise PromptShapeError("a token-array prompt cannot be used with a prompted variant")
    raise PromptShapeError("prompt must be a string or a list of strings")


def _is_token(item: Any) -> bool:
    return isinstance(item, int) and not isinstance(item, bool)


def _is_tokens(item: Any) -> bool:
    return isinstance(item, list) and all(_is_token(token) for token in item)


def injected_text(system: str, examples: Examples) -> list[str]:
    """The texts Turnout adds to a prompt: `system`, then each example's user and assistant
    text, in order; empty strings left out. Role framing and template separators are not
    included, so counting these gives the injected ("prompt tax") tokens to within a few.
    """
    texts = [system]
    for user, assistant in examples:
        texts.extend((user, assistant))
    return [text for text in texts if text]
