"""Variant selection: sticky hashing, the sticky subject, and the weighted walk."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from hashlib import sha256

Weights = Sequence[tuple[str, float]]


def sticky_draw(route: str, subject: str) -> float:
    """Map (route, subject) to a uniform number in [0, 1), the same on every call and replica.

    The first 8 bytes of sha256(route + NUL + subject), big-endian, divided by 2**64.
    """
    digest = sha256((route + "\0" + subject).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def pick_weighted(weights: Weights, u: float) -> str:
    """Return the first name, walking `weights` in declaration order, whose cumulative share
    exceeds `u` (a number in [0, 1)).

    Weights need not sum to 100 or 1: shares are normalised by the total. A zero weight is
    never picked. Raises ValueError on an empty list, a negative weight or a total <= 0.
    """
    if not weights:
        raise ValueError("no weights to pick from")
    if any(weight < 0 for _, weight in weights):
        raise ValueError("weights must not be negative")
    total = sum(weight for _, weight in weights)
    if total <= 0:
        raise ValueError("weights must have a positive total")
    cumulative = 0.0
    for name, weight in weights:
        cumulative += weight
        if weight > 0 and cumulative / total > u:
            return name
    # Float rounding can leave the last bound a hair under a u close to 1.
    return next(name for name, weight in reversed(weights) if weight > 0)


def sticky_subject(
    sticky: str | None,
    *,
    user: str | None,
    key_name: str | None,
    headers: Mapping[str, str],
) -> str | None:
    """The subject whose hash makes assignment sticky, or None for a fresh random draw.

    `sticky` is the route's setting: "user" (the body's `user`), "key" (the client key's
    name) or "header:<name>" (that request header; `headers` must have lowercased names).
    No setting, or an absent or empty value, gives None. An unknown setting is a ValueError.
    """
    if sticky is None:
        value = None
    elif sticky == "user":
        value = user
    elif sticky == "key":
        value = key_name
    elif sticky.startswith("header:"):
        value = headers.get(sticky.removeprefix("header:").strip().lower())
    else:
        raise ValueError(f"unknown sticky setting {sticky!r}")
    return value or None


def choose_variant(
    route: str,
    weights: Weights,
    subject: str | None,
    rand: Callable[[], float],
    exclude: Collection[str] = (),
) -> str:
    """Choose a variant of `route`: a sticky draw for a subject, else `rand()` in [0, 1).

    Variants named in `exclude` (open circuits, say) are skipped and the rest re-normalised;
    if that leaves no positive weight, the exclusion is ignored rather than failing.
    """
    u = sticky_draw(route, subject) if subject else rand()
    return pick_weighted(_without(weights, exclude), u)


def _without(weights: Weights, exclude: Collection[str]) -> Weights:
    """`weights` minus the excluded names, or all of `weights` if none positive would remain."""
    if not exclude:
        return weights
    kept = [(name, weight) for name, weight in weights if name not in exclude]
    return kept if sum(weight for _, weight in kept) > 0 else weights
