"""Tests for variant selection: sticky draw, weighted walk, sticky subject, exclusion."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from router.selection import choose_variant, pick_weighted, sticky_draw, sticky_subject


def _never() -> float:
    raise AssertionError("rand() must not be called for a sticky subject")


def _reference_draw(route: str, subject: str) -> float:
    digest = hashlib.sha256(f"{route}\x00{subject}".encode()).hexdigest()
    return int(digest[:16], 16) / 2**64


@pytest.mark.parametrize(
    ("route", "subject"),
    [("support", "alice"), ("support", "bob"), ("r", ""), ("ünï", "コード"), ("a\0b", "c")],
)
def test_sticky_draw_matches_independent_computation(route: str, subject: str) -> None:
    u = sticky_draw(route, subject)
    assert u == _reference_draw(route, subject)
    assert 0.0 <= u < 1.0


def test_sticky_draw_known_values() -> None:
    # Pinned literals (first 8 bytes of the digest in hex) so the hash can never drift.
    assert sticky_draw("support", "alice") == 0x0E34E4DBAE93E8CB / 2**64
    assert sticky_draw("support", "bob") == 0x391C493A3EB4FE90 / 2**64


def test_sticky_draw_depends_on_route_and_separator() -> None:
    assert sticky_draw("support", "alice") != sticky_draw("billing", "alice")
    assert sticky_draw("ab", "c") != sticky_draw("a", "bc")


def test_same_subject_gets_same_variant() -> None:
    weights = [("ft", 50.0), ("prompted", 50.0)]
    for subject in ("alice", "bob", "carol", "dave"):
        picks = {choose_variant("support", weights, subject, _never) for _ in range(20)}
        assert len(picks) == 1


@pytest.mark.parametrize(
    "weights",
    [
        [("ft", 90.0), ("prompted", 10.0)],
        [("a", 50.0), ("b", 30.0), ("c", 20.0)],
    ],
)
def test_shares_over_many_subjects_follow_weights(weights: list[tuple[str, float]]) -> None:
    n = 10_000
    counts = Counter(choose_variant("route", weights, f"user-{i}", _never) for i in range(n))
    total = sum(weight for _, weight in weights)
    for name, weight in weights:
        assert abs(counts[name] / n - weight / total) <= 0.02


def test_declaration_order_is_walked() -> None:
    assert pick_weighted([("a", 90.0), ("b", 10.0)], 0.5) == "a"
    assert pick_weighted([("b", 10.0), ("a", 90.0)], 0.5) == "a"
    assert pick_weighted([("b", 10.0), ("a", 90.0)], 0.05) == "b"
    assert pick_weighted([("a", 90.0), ("b", 10.0)], 0.05) == "a"


def test_random_draw_used_without_subject() -> None:
    weights = [("a", 50.0), ("b", 50.0)]
    assert choose_variant("r", weights, None, lambda: 0.1) == "a"
    assert choose_variant("r", weights, None, lambda: 0.9) == "b"
    assert choose_variant("r", weights, "", lambda: 0.9) == "b"


def test_random_draw_called_once_per_choice() -> None:
    calls: list[int] = []

    def rand() -> float:
        calls.append(1)
        return 0.3

    choose_variant("r", [("a", 1.0)], None, rand)
    assert len(calls) == 1


def test_exclusion_renormalises_over_the_rest() -> None:
    weights = [("a", 50.0), ("b", 30.0), ("c", 20.0)]
    # Without a: b covers [0, 0.6), c covers [0.6, 1).
    assert choose_variant("r", weights, None, lambda: 0.55, exclude={"a"}) == "b"
    assert choose_variant("r", weights, None, lambda: 0.65, exclude={"a"}) == "c"
    assert choose_variant("r", weights, None, lambda: 0.0, exclude={"a", "b"}) == "c"


def test_exclusion_applies_to_sticky_subjects() -> None:
    weights = [("a", 50.0), ("b", 50.0)]
    picks = {choose_variant("r", weights, f"u{i}", _never, exclude=("a",)) for i in range(200)}
    assert picks == {"b"}


def test_all_excluded_falls_back_to_everything() -> None:
    weights = [("a", 50.0), ("b", 50.0)]
    assert choose_variant("r", weights, None, lambda: 0.1, exclude={"a", "b"}) == "a"
    assert choose_variant("r", weights, None, lambda: 0.9, exclude={"a", "b"}) == "b"


def test_exclusion_leaving_only_zero_weights_is_ignored() -> None:
    weights = [("a", 100.0), ("b", 0.0)]
    assert choose_variant("r", weights, None, lambda: 0.5, exclude={"a"}) == "a"


def test_pick_weighted_edges() -> None:
    weights = [("a", 1.0), ("b", 1.0), ("c", 1.0)]
    assert pick_weighted(weights, 0.0) == "a"
    assert pick_weighted(weights, 1.0 - 2**-53) == "c"
    assert pick_weighted(weights, 1.0) == "c"  # rounding guard: the last one, never an error


def test_pick_weighted_normalises_any_total() -> None:
    assert pick_weighted([("a", 3.0), ("b", 1.0)], 0.74) == "a"
    assert pick_weighted([("a", 3.0), ("b", 1.0)], 0.76) == "b"
    assert pick_weighted([("a", 0.3), ("b", 0.3)], 0.49) == "a"
    assert pick_weighted([("a", 0.3), ("b", 0.3)], 0.51) == "b"


def test_pick_weighted_skips_zero_weights() -> None:
    assert pick_weighted([("zero", 0.0), ("a", 1.0)], 0.0) == "a"
    assert pick_weighted([("a", 1.0), ("zero", 0.0)], 1.0) == "a"


@pytest.mark.parametrize(
    "weights",
    [[], [("a", 0.0)], [("a", 0.0), ("b", 0.0)], [("a", 2.0), ("b", -1.0)]],
)
def test_pick_weighted_rejects_bad_weights(weights: list[tuple[str, float]]) -> None:
    with pytest.raises(ValueError):
        pick_weighted(weights, 0.5)


def test_sticky_subject_user_and_key() -> None:
    assert sticky_subject("user", user="u1", key_name="app-a", headers={}) == "u1"
    assert sticky_subject("key", user="u1", key_name="app-a", headers={}) == "app-a"


def test_sticky_subject_header_is_case_insensitive() -> None:
    headers = {"x-session-id": "s-42"}
    assert sticky_subject("header:X-Session-ID", user=None, key_name=None, headers=headers) == (
        "s-42"
    )
    assert sticky_subject("header:x-session-id", user=None, key_name=None, headers=headers) == (
        "s-42"
    )


@pytest.mark.parametrize(
    ("sticky", "user", "key_name", "headers"),
    [
        (None, "u1", "app-a", {"x-s": "v"}),
        ("user", None, "app-a", {}),
        ("user", "", "app-a", {}),
        ("key", "u1", None, {}),
        ("header:x-s", "u1", "app-a", {}),
        ("header:x-s", "u1", "app-a", {"x-s": ""}),
    ],
)
def test_sticky_subject_absent_or_empty_is_none(
    sticky: str | None, user: str | None, key_name: str | None, headers: dict[str, str]
) -> None:
    assert sticky_subject(sticky, user=user, key_name=key_name, headers=headers) is None


def test_sticky_subject_rejects_unknown_setting() -> None:
    with pytest.raises(ValueError):
        sticky_subject("cookie", user="u", key_name="k", headers={})
