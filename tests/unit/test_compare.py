"""Comparing a shadow's answer with its primary's."""

from __future__ import annotations

import json
import time

import pytest

from router.compare import Comparison, compare, normalise


def test_exact() -> None:
    assert compare("billing", "billing") == Comparison(True, 1.0, None, "agree")


@pytest.mark.parametrize(
    ("primary", "shadow"),
    [
        ("billing", "Billing."),
        ("Hello   from\n fake", "hello from fake"),
        ("  The answer is 42!  ", "the answer is 42"),
        ("«Straße»", "strasse"),  # casefold folds ß
    ],
)
def test_case_whitespace_and_end_punctuation_do_not_matter(primary: str, shadow: str) -> None:
    result = compare(primary, shadow)
    assert not result.exact
    assert result.similarity == 1.0
    assert result.agreement == "agree"


def test_normalise_keeps_inner_punctuation() -> None:
    assert normalise('  "Hi,\tthere!"\n') == "hi, there"


def test_json_key_order_and_whitespace_are_json_equal() -> None:
    result = compare('{"label": "bug", "score": 1}', '{"score":1.0,\n"label":"bug"}')
    assert result.json_equal is True
    assert result.agreement == "agree"


def test_json_in_a_code_fence_is_parsed() -> None:
    result = compare('{"a": [1, 2]}', '```json\n{"a": [1, 2]}\n```')
    assert result.json_equal is True
    assert result.agreement == "agree"


def test_json_decides_when_both_parse_even_if_the_texts_look_alike() -> None:
    fields = {f"field_{i}": f"value {i}" for i in range(20)}
    primary = json.dumps(fields | {"amount": 100})
    result = compare(primary, json.dumps(fields | {"amount": 900}))
    assert result.json_equal is False
    assert result.similarity >= 0.9
    assert result.agreement == "disagree"


@pytest.mark.parametrize(
    ("primary", "shadow"),
    [('{"ok": true}', '{"ok": 1}'), ("[1, 2]", "[2, 1]"), ('{"a": 1}', '{"a": 1, "b": 2}')],
)
def test_json_not_equal(primary: str, shadow: str) -> None:
    assert compare(primary, shadow).json_equal is False


@pytest.mark.parametrize(
    ("primary", "shadow"),
    [("billing", '{"label": "billing"}'), ("42", "42.0"), ("true", "1"), ("{bad", "{bad")],
)
def test_json_equal_is_none_unless_both_are_json_documents(primary: str, shadow: str) -> None:
    assert compare(primary, shadow).json_equal is None


def test_different_labels_disagree() -> None:
    result = compare("billing", "bug")
    assert result == Comparison(False, result.similarity, None, "disagree")
    assert 0.0 <= result.similarity < 0.9


@pytest.mark.parametrize(
    ("primary", "shadow", "low", "high"),
    [
        ("", "", 1.0, 1.0),
        ("", "something", 0.0, 0.0),
        ("abc", "xyz", 0.0, 0.0),
        ("the quick brown fox", "the quick brown cat", 5 / 9, 5 / 9),
        ("dog bites man", "man bites dog", 3 / 7, 3 / 7),  # order counts
        (" ".join(map(str, range(100))), " ".join(map(str, range(1, 101))), 0.9, 0.99),
    ],
)
def test_similarity_bounds(primary: str, shadow: str, low: float, high: float) -> None:
    assert low <= compare(primary, shadow).similarity <= high


def test_long_repetitive_texts_stay_cheap() -> None:
    a, b = "ab " * 100_000, "ba " * 100_000
    started = time.perf_counter()
    assert compare(a, b).similarity < 0.01
    assert time.perf_counter() - started < 2.0


def test_deeply_nested_json_gives_no_verdict() -> None:
    deep = "[" * 100_000 + "]" * 100_000
    assert compare(deep, deep + " ").json_equal is None


def test_as_dict() -> None:
    assert compare("a", "a").as_dict() == {
        "exact": True,
        "similarity": 1.0,
        "json_equal": None,
        "agreement": "agree",
    }
