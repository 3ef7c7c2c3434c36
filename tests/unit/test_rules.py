"""Route rules: each condition, AND semantics, first match wins, and the settings converter."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import msgspec
import pytest

from gateway.body import CHAT, ClientRequest
from gateway.rules_config import request_facts, rules_from_settings
from gateway.settings import Route
from router.rules import Condition, RequestFacts, RuleSpec, first_match, matches


def facts(**overrides: Any) -> RequestFacts:
    values: dict[str, Any] = {
        "headers": {"x-tenant": "acme"},
        "key": "app-a",
        "prompt_tokens": 100,
        "tools": False,
        "stream": False,
    }
    return RequestFacts(**(values | overrides))


def test_empty_condition_always_holds() -> None:
    assert matches(Condition(), facts())


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ({"x-tenant": "acme"}, True),
        ({"X-Tenant": "acme"}, True),  # names are case-insensitive
        ({"x-tenant": "Acme"}, False),  # values are exact
        ({"x-tenant": "acm"}, False),
        ({"x-other": "acme"}, False),  # an absent header never matches
    ],
)
def test_header(header: dict[str, str], expected: bool) -> None:
    assert matches(Condition(header=MappingProxyType(header)), facts()) is expected


@pytest.mark.parametrize(
    ("key", "names", "expected"),
    [
        ("app-a", {"app-a", "app-b"}, True),
        ("app-c", {"app-a", "app-b"}, False),
        (None, {"app-a"}, False),  # an open gateway has no key name
    ],
)
def test_key(key: str | None, names: set[str], expected: bool) -> None:
    assert matches(Condition(key=frozenset(names)), facts(key=key)) is expected


@pytest.mark.parametrize(("tokens", "expected"), [(99, False), (100, False), (101, True)])
def test_prompt_tokens_above_is_strict(tokens: int, expected: bool) -> None:
    assert matches(Condition(prompt_tokens_above=100), facts(prompt_tokens=tokens)) is expected


@pytest.mark.parametrize(("tokens", "expected"), [(99, True), (100, False), (101, False)])
def test_prompt_tokens_below_is_strict(tokens: int, expected: bool) -> None:
    assert matches(Condition(prompt_tokens_below=100), facts(prompt_tokens=tokens)) is expected


@pytest.mark.parametrize("field", ["tools", "stream"])
@pytest.mark.parametrize(("wanted", "actual"), [(True, True), (True, False), (False, False)])
def test_flags(field: str, wanted: bool, actual: bool) -> None:
    cond = Condition(**{field: wanted})
    assert matches(cond, facts(**{field: actual})) is (wanted == actual)


def test_all_given_conditions_must_hold() -> None:
    cond = Condition(
        header=MappingProxyType({"x-tenant": "acme"}),
        prompt_tokens_above=50,
        prompt_tokens_below=200,
        stream=True,
    )
    assert matches(cond, facts(stream=True))
    assert not matches(cond, facts(stream=False))
    assert not matches(cond, facts(stream=True, prompt_tokens=300))
    assert not matches(cond, facts(stream=True, headers={}))


def test_first_match_wins_and_none_when_nothing_matches() -> None:
    long_prompts = RuleSpec(Condition(prompt_tokens_above=1000), variant="big")
    tools = RuleSpec(Condition(tools=True), variant="tools")
    catch_all = RuleSpec(Condition(), split=(("a", 1.0), ("b", 3.0)))
    rules = [long_prompts, tools, catch_all]
    assert first_match(rules, facts(prompt_tokens=2000, tools=True)) is long_prompts
    assert first_match(rules, facts(tools=True)) is tools
    assert first_match(rules, facts()) is catch_all
    assert first_match(rules[:2], facts()) is None
    assert first_match([], facts()) is None


def test_rules_from_settings() -> None:
    route = msgspec.convert(
        {
            "split": {"a": 1},
            "rules": [
                {"when": {"header": {"X-Tier": "gold"}, "key": ["app-a"]}, "variant": "b"},
                {"when": {"prompt_tokens_above": 10, "tools": True}, "split": {"a": 1, "b": 2}},
                {"when": {"stream": False, "prompt_tokens_below": 5}, "variant": "a"},
            ],
        },
        Route,
    )
    first, second, third = rules_from_settings(route)
    assert first == RuleSpec(
        Condition(header=MappingProxyType({"x-tier": "gold"}), key=frozenset({"app-a"})),
        variant="b",
    )
    assert second == RuleSpec(
        Condition(prompt_tokens_above=10, tools=True), split=(("a", 1.0), ("b", 2.0))
    )
    assert third == RuleSpec(Condition(stream=False, prompt_tokens_below=5), variant="a")
    assert first_match(rules_from_settings(route), facts(headers={"x-tier": "gold"})) == first


def test_request_facts() -> None:
    client = ClientRequest(
        endpoint=CHAT,
        body={"model": "r", "messages": [], "tools": [{"type": "function"}], "stream": True},
        model="r",
        stream=True,
        include_usage=False,
        user=None,
    )
    got = request_facts(client, {"X-Tenant": "acme"}, "app-a", 42)
    assert got == RequestFacts({"x-tenant": "acme"}, "app-a", 42, tools=True, stream=True)
    client.body["tools"] = []
    assert not request_facts(client, {}, None, 0).tools
