"""Route rules from settings to the plain data that router.rules evaluates."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from gateway.body import ClientRequest
from gateway.settings import Route, Rule, When
from router.rules import Condition, RequestFacts, RuleSpec


def rules_from_settings(route: Route) -> tuple[RuleSpec, ...]:
    """The route's rules, in order, as router.rules.RuleSpec (header names lowercased)."""
    return tuple(_rule(rule) for rule in route.rules)


def _rule(rule: Rule) -> RuleSpec:
    split = tuple(rule.split.items()) if rule.split is not None else None
    return RuleSpec(when=_condition(rule.when), variant=rule.variant, split=split)


def _condition(when: When) -> Condition:
    headers = {name.lower(): value for name, value in (when.header or {}).items()}
    return Condition(
        header=MappingProxyType(headers),
        key=frozenset(when.key) if when.key is not None else None,
        prompt_tokens_above=when.prompt_tokens_above,
        prompt_tokens_below=when.prompt_tokens_below,
        tools=when.tools,
        stream=when.stream,
    )


def request_facts(
    client: ClientRequest, headers: Mapping[str, str], key: str | None, prompt_tokens: int
) -> RequestFacts:
    """The facts rules look at: header names lowercased, `tools` true when non-empty.

    `prompt_tokens` is the caller's count of the client's prompt (before any injected prompt:
    the variant is not chosen yet).
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    return RequestFacts(
        headers=lowered,
        key=key,
        prompt_tokens=prompt_tokens,
        tools=bool(client.body.get("tools")),
        stream=client.stream,
    )
