"""Request bounds: what one request may ask of an upstream (`n`, tokens, logprobs, schemas).

A route enforces the tightest bounds of every upstream it may send a request to, so whichever
arm a request is drawn to, it is accepted or refused alike. Pure: the caller answers 400.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# Integer parameters counted against each bound; best_of goes with n (vLLM: best_of >= n).
N_PARAMS = ("n", "best_of")
TOKEN_PARAMS = ("max_tokens", "max_completion_tokens", "min_tokens")
LOGPROB_PARAMS = ("top_logprobs", "logprobs", "prompt_logprobs")
# Structured-output constraints a vLLM server compiles into a grammar before decoding.
SCHEMA_PARAMS = (
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_grammar",
    "guided_choice",
    "structured_outputs",
)


@dataclass(frozen=True)
class RequestBounds:
    max_n: int
    max_tokens: int
    max_logprobs: int
    max_schema_bytes: int
    max_schema_depth: int


@dataclass(frozen=True)
class Violation:
    """Why a request is refused: the parameter, a message safe to show, OpenAI's code."""

    param: str
    message: str
    code: str


def tightest(bounds: Iterable[RequestBounds]) -> RequestBounds:
    """The bounds every one of `bounds` allows (each limit the smallest). At least one."""
    items = list(bounds)
    if not items:
        raise ValueError("tightest() needs at least one RequestBounds")
    return RequestBounds(
        max_n=min(b.max_n for b in items),
        max_tokens=min(b.max_tokens for b in items),
        max_logprobs=min(b.max_logprobs for b in items),
        max_schema_bytes=min(b.max_schema_bytes for b in items),
        max_schema_depth=min(b.max_schema_depth for b in items),
    )


def violation(body: Mapping[str, Any], bounds: RequestBounds) -> Violation | None:
    """The first parameter of `body` outside `bounds`, or None. Parameters that are absent or
    null pass; a boolean `logprobs` (chat) passes; others must be integers in range."""
    for names, low, high in (
        (N_PARAMS, 1, bounds.max_n),
        (TOKEN_PARAMS, 0, bounds.max_tokens),
        (LOGPROB_PARAMS, 0, bounds.max_logprobs),
    ):
        for name in names:
            value = body.get(name)
            if value is None or (name == "logprobs" and isinstance(value, bool)):
                continue
            found = _int_violation(name, value, low, high)
            if found is not None:
                return found
    for name in SCHEMA_PARAMS:
        value = body.get(name)
        if value is not None:
            found = _schema_violation(name, value, bounds)
            if found is not None:
                return found
    return None


def _int_violation(name: str, value: Any, low: int, high: int) -> Violation | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return Violation(name, f"Invalid '{name}': expected an integer.", "invalid_type")
    if value > high:
        message = f"Invalid '{name}': at most {high} on this route, got {value}."
        return Violation(name, message, "integer_above_max_value")
    if value < low:
        message = f"Invalid '{name}': at least {low}, got {value}."
        return Violation(name, message, "integer_below_min_value")
    return None


def _schema_violation(name: str, value: Any, bounds: RequestBounds) -> Violation | None:
    limit = bounds.max_schema_depth
    if nesting_depth(value, limit) > limit:
        message = f"Invalid '{name}': nested deeper than {limit} levels."
        return Violation(name, message, "schema_too_deep")
    size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())
    if size > bounds.max_schema_bytes:
        message = f"Invalid '{name}': {size} bytes as JSON, at most {bounds.max_schema_bytes}."
        return Violation(name, message, "schema_too_large")
    return None


def nesting_depth(value: Any, limit: int) -> int:
    """How deep `value` nests (a scalar 0, `[]` or `{}` 1, `[[1]]` 2), counted without
    recursion and without looking past `limit` + 1."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth + 1)
        if deepest > limit:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest
