"""Route rules: the first rule whose conditions hold picks a variant or a split of its own."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True)
class RequestFacts:
    """What rules may look at in one request. `headers` must have lowercased names."""

    headers: Mapping[str, str]
    key: str | None  # the client key's name; None on an open gateway
    prompt_tokens: int
    tools: bool  # the body carries a non-empty `tools`
    stream: bool


@dataclass(frozen=True)
class Condition:
    """A rule's conditions; None means "not asked". All given ones must hold.

    `header` maps a header name (any case) to the exact value it must have; `key` lists the
    key names allowed; `prompt_tokens_above`/`_below` are strict bounds.
    """

    header: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    key: frozenset[str] | None = None
    prompt_tokens_above: int | None = None
    prompt_tokens_below: int | None = None
    tools: bool | None = None
    stream: bool | None = None


@dataclass(frozen=True)
class RuleSpec:
    """One rule: when `when` holds, use `variant`, or draw from `split` (name, weight) pairs."""

    when: Condition
    variant: str | None = None
    split: tuple[tuple[str, float], ...] | None = None


def matches(cond: Condition, facts: RequestFacts) -> bool:
    """True when every condition `cond` gives holds for `facts` (an empty condition holds)."""
    for name, value in cond.header.items():
        if facts.headers.get(name.lower()) != value:
            return False
    if cond.key is not None and facts.key not in cond.key:
        return False
    if cond.prompt_tokens_above is not None and not facts.prompt_tokens > cond.prompt_tokens_above:
        return False
    if cond.prompt_tokens_below is not None and not facts.prompt_tokens < cond.prompt_tokens_below:
        return False
    if cond.tools is not None and facts.tools != cond.tools:
        return False
    return cond.stream is None or facts.stream == cond.stream


def first_match(rules: Sequence[RuleSpec], facts: RequestFacts) -> RuleSpec | None:
    """The first rule, in order, whose conditions hold; None when none does."""
    return next((rule for rule in rules if matches(rule.when, facts)), None)
