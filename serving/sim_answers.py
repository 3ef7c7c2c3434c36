"""A simulated upstream that "knows" a task: labelled examples answered with a set accuracy.

The answers file has the format of `turnout eval` datasets (JSON lines of
`{"messages"|"prompt", "expected"}`). A chat request whose last user message is an example's
last user message gets the expected text when a deterministic draw (a hash of the seed, the
model and the message: the same request always gets the same answer) falls below the model's
accuracy, else a wrong answer: another expected value of the file, or "I am not sure.".
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from gateway.eval import expected_text, last_user_text, load_dataset
from gateway.tokens import TokenCounter
from serving.sim_text import seed_of

UNSURE = "I am not sure."


@dataclass(frozen=True)
class Answers:
    """The questions known (last user message -> expected text) and every distinct answer."""

    by_question: Mapping[str, str]
    distinct: tuple[str, ...]

    def answer(
        self,
        messages: Sequence[Mapping[str, Any]],
        model: str,
        accuracy: Mapping[str, float],
        seed: int | None,
        choice: int = 0,
    ) -> str | None:
        """The answer to a known question (None for an unknown one). A model missing from
        `accuracy` always answers right."""
        question = last_user_text(messages)
        right = None if question is None else self.by_question.get(question)
        if right is None:
            return None
        draw = seed_of(seed, model, question, choice) / 2**64
        if draw < accuracy.get(model, 1.0):
            return right
        wrong = [text for text in self.distinct if text != right]
        if not wrong:
            return UNSURE
        return wrong[seed_of(seed, model, question, choice, "wrong") % len(wrong)]


def load_answers(path: str | os.PathLike[str]) -> Answers:
    """Parse an answers file (DatasetError naming the line if it is bad). A file is read once
    per process while it is unchanged: checking a config and building its upstream share it."""
    stat = os.stat(path)
    return _load(os.fspath(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _load(path: str, mtime_ns: int, size: int) -> Answers:
    by_question: dict[str, str] = {}
    for example in load_dataset(path):
        question = last_user_text(example.messages)
        if question is not None:
            by_question.setdefault(question, expected_text(example.expected))
    distinct = tuple(sorted(set(by_question.values())))
    return Answers(MappingProxyType(by_question), distinct)


def token_pieces(counter: TokenCounter, text: str) -> list[str]:
    """`text` cut into one piece per token, so that usage counts what is returned. A token
    that ends inside a multi-byte character gives an empty piece; the character comes whole
    with the token that completes it."""
    encoding = counter.encoding
    pieces: list[str] = []
    pending = b""
    for token in encoding.encode_ordinary(text):
        pending += encoding.decode_single_token_bytes(token)
        try:
            piece = pending.decode("utf-8")
        except UnicodeDecodeError:
            pieces.append("")
            continue
        pieces.append(piece)
        pending = b""
    return pieces
