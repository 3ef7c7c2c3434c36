"""Tests for attempt plans: the retry decision table, plan order and Retry-After parsing."""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from router.plan import Decision, Failure, Stage, attempt_plan, decide, retry_after_seconds

F, S = Failure, Stage
NO = Decision(retry=False, same_variant=False, breaker_failure=False)
NO_COUNTED = Decision(retry=False, same_variant=False, breaker_failure=True)
ANY = Decision(retry=True, same_variant=True, breaker_failure=True)
ELSEWHERE = Decision(retry=True, same_variant=False, breaker_failure=False)
ELSEWHERE_COUNTED = Decision(retry=True, same_variant=False, breaker_failure=True)

# (failure, stage, billed) -> decision, for every combination.
TABLE: dict[tuple[Failure, Stage, bool], Decision] = {}
for _billed in (False, True):
    for _failure in (F.CONNECT, F.FIRST_BYTE_TIMEOUT, F.SERVER, F.BROKEN):
        TABLE[_failure, S.NOT_SENT, _billed] = ANY
        TABLE[_failure, S.MAYBE_ACCEPTED, _billed] = NO_COUNTED if _billed else ANY
        TABLE[_failure, S.RESPONDING, _billed] = NO_COUNTED
    TABLE[F.RATE_LIMITED, S.NOT_SENT, _billed] = ELSEWHERE
    TABLE[F.RATE_LIMITED, S.MAYBE_ACCEPTED, _billed] = NO if _billed else ELSEWHERE
    TABLE[F.RATE_LIMITED, S.RESPONDING, _billed] = NO
    TABLE[F.SETUP, S.NOT_SENT, _billed] = ELSEWHERE_COUNTED
    TABLE[F.SETUP, S.MAYBE_ACCEPTED, _billed] = NO_COUNTED if _billed else ELSEWHERE_COUNTED
    TABLE[F.SETUP, S.RESPONDING, _billed] = NO_COUNTED
    for _stage in Stage:
        TABLE[F.REQUEST, _stage, _billed] = NO


def test_table_covers_every_combination() -> None:
    assert set(TABLE) == set(itertools.product(Failure, Stage, (False, True)))


@pytest.mark.parametrize(
    ("failure", "stage", "billed"),
    list(TABLE),
    ids=lambda value: str(getattr(value, "value", value)),
)
def test_decide(failure: Failure, stage: Stage, billed: bool) -> None:
    assert decide(failure, stage, billed=billed) == TABLE[failure, stage, billed]


def test_billed_upstream_is_never_resent_once_it_may_have_accepted() -> None:
    for failure in Failure:
        assert not decide(failure, S.MAYBE_ACCEPTED, billed=True).retry
        for billed in (False, True):
            assert not decide(failure, S.RESPONDING, billed=billed).retry


def test_same_variant_implies_retry() -> None:
    for failure, stage, billed in TABLE:
        decision = decide(failure, stage, billed=billed)
        assert decision.retry or not decision.same_variant


def plan(
    chosen: str,
    fallbacks: list[str],
    open_: Collection[str] = (),
    failed_at: dict[str, float] | None = None,
) -> list[str]:
    times = failed_at or {}
    return attempt_plan(
        chosen,
        fallbacks,
        lambda variant: variant not in open_,
        lambda variant: times.get(variant, -math.inf),
    )


def test_plan_is_chosen_then_fallbacks() -> None:
    assert plan("a", []) == ["a"]
    assert plan("a", ["b", "c"]) == ["a", "b", "c"]


def test_plan_removes_duplicates_keeping_first_place() -> None:
    assert plan("a", ["b", "a", "c", "b"]) == ["a", "b", "c"]
    assert plan("b", ["a", "b"]) == ["b", "a"]


def test_plan_skips_open_variants() -> None:
    assert plan("a", ["b", "c"], {"a"}) == ["b", "c"]
    assert plan("a", ["b", "c"], {"b"}) == ["a", "c"]
    assert plan("a", ["b", "a", "c"], {"a", "c"}) == ["b"]


def test_all_open_tries_least_recently_failed() -> None:
    failed = {"a": 30.0, "b": 10.0, "c": 20.0}
    assert plan("a", ["b", "c"], {"a", "b", "c"}, failed) == ["b"]
    assert plan("a", [], {"a"}, failed) == ["a"]


def test_all_open_ties_go_to_the_earlier_variant() -> None:
    assert plan("a", ["b", "c"], {"a", "b", "c"}, {"a": 5.0, "b": 1.0, "c": 1.0}) == ["b"]
    assert plan("c", ["b", "a"], {"a", "b", "c"}) == ["c"]


def test_all_open_prefers_a_variant_that_never_failed() -> None:
    assert plan("a", ["b"], {"a", "b"}, {"a": 5.0}) == ["b"]


NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("0", 0.0),
        ("5", 5.0),
        (" 120 ", 120.0),
        ("1.5", 1.5),
        (format_datetime(datetime.fromtimestamp(NOW + 30, UTC), usegmt=True), 30.0),
        (format_datetime(datetime.fromtimestamp(NOW - 30, UTC), usegmt=True), 0.0),
        (format_datetime(datetime.fromtimestamp(NOW + 7, UTC)), 7.0),
    ],
)
def test_retry_after_parses(value: str, seconds: float) -> None:
    assert retry_after_seconds(value, NOW) == pytest.approx(seconds)


def test_retry_after_http_date_literal() -> None:
    now = datetime(2015, 10, 21, 7, 28, 0, tzinfo=UTC).timestamp()
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now) == 0.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:29:30 GMT", now) == 90.0


def test_retry_after_naive_date_is_utc() -> None:
    now = datetime(2015, 10, 21, 7, 28, 0, tzinfo=UTC).timestamp()
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:10 -0000", now) == 10.0


@pytest.mark.parametrize(
    "value", [None, "", "   ", "-5", "soon", "5s", "1e3", "nan", "inf", "Wed, 99 Foo 2015"]
)
def test_retry_after_rejects(value: str | None) -> None:
    assert retry_after_seconds(value, NOW) is None
