"""Deterministic words and vectors for the simulated upstream."""

from __future__ import annotations

import base64
import hashlib
import math
import random
import struct

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
