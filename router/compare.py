"""Comparing a shadow's answer with its primary's: exact, normalised similarity, JSON equality."""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

AGREE_SIMILARITY = 0.9
_SPACE = re.compile(r"\s+")
_TOKEN = re.compile(r"\w+|[^\w\s]")
_FENCE = re.compile(r"^```[A-Za-z0-9_-]*\s*\n(.*)\n\s*```$", re.DOTALL)
# Punctuation stripped at the ends only: "Billing." and "billing" are the same label.
# Typographic quotes, guillemets, ellipsis, CJK full stop and comma, full-width ! and ?.
_END_PUNCTUATION = (
    string.punctuation + "\u201c\u201d\u2018\u2019\u00ab\u00bb\u2026\u3002\u3001\uff01\uff1f"
)

Agreement = Literal["agree", "disagree"]
Shingle = str | tuple[str, str]


@dataclass(frozen=True)
class Comparison:
    """How a shadow's answer compares with the primary's.

    `exact`: the texts are identical. `similarity` (0..1): `text_similarity`. `json_equal`:
    None unless both answers parse as a JSON object or array (a markdown code fence around
    them is allowed), else whether the parsed values are equal (key order ignored; numbers by
    value; `true` is not `1`). `agreement`: "agree" when exact; else, when both are JSON,
    exactly when `json_equal`; else when similarity >= 0.9.
    """

    exact: bool
    similarity: float
    json_equal: bool | None
    agreement: Agreement

    def as_dict(self) -> dict[str, object]:
        return {
            "exact": self.exact,
            "similarity": self.similarity,
            "json_equal": self.json_equal,
            "agreement": self.agreement,
        }


def compare(primary: str, shadow: str) -> Comparison:
    """Compare the primary's answer text with the shadow's."""
    exact = primary == shadow
    similarity = 1.0 if exact else text_similarity(primary, shadow)
    json_equal = _json_equal(primary, shadow)
    if exact:
        agree = True
    elif json_equal is not None:
        agree = json_equal
    else:
        agree = similarity >= AGREE_SIMILARITY
    return Comparison(exact, similarity, json_equal, "agree" if agree else "disagree")


def normalise(text: str) -> str:
    """Casefolded, whitespace runs collapsed to one space, punctuation stripped at both ends."""
    return _SPACE.sub(" ", text.casefold()).strip().strip(_END_PUNCTUATION).strip()


def text_similarity(a: str, b: str) -> float:
    """The weighted Jaccard index of the normalised texts' shingles: their tokens (words, and
    punctuation marks one by one) and pairs of adjacent tokens, counted as multisets.

    1.0 for equal normalised texts, 0.0 when nothing is shared; pair shingles make word order
    count ("dog bites man" vs "man bites dog": 3/7). Linear in the texts' length, unlike
    difflib's ratio, whose worst case takes seconds on a few thousand characters.
    """
    a, b = normalise(a), normalise(b)
    if a == b:
        return 1.0
    left, right = _shingles(a), _shingles(b)
    union = sum((left | right).values())
    return sum((left & right).values()) / union


def _shingles(text: str) -> Counter[Shingle]:
    tokens: list[str] = _TOKEN.findall(text)
    shingles: Counter[Shingle] = Counter(tokens)
    shingles.update(pairwise(tokens))
    return shingles


def _json_equal(primary: str, shadow: str) -> bool | None:
    a, b = _parse_document(primary), _parse_document(shadow)
    if a is None or b is None:
        return None
    try:
        return _same(a[0], b[0])
    except RecursionError:  # parsed, but too deep to walk: no verdict
        return None


def _parse_document(text: str) -> tuple[object] | None:
    """(value,) when `text` is a JSON object or array, possibly in a code fence; else None."""
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    if not text.startswith(("{", "[")):
        return None
    try:
        return (json.loads(text),)
    except (ValueError, RecursionError):  # malformed, or nested too deep to parse
        return None


def _same(a: object, b: object) -> bool:
    """JSON equality: objects by keys, arrays in order, numbers by value, booleans apart from
    numbers (Python's True == 1 must not make `true` equal `1`)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b
