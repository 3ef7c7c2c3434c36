"""GCRA arithmetic and UTC budget periods (router/limits.py)."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest

from router.limits import TOLERANCE_S, gcra, gcra_give_back, period_bounds

NOW = 1_767_225_600.123456  # near today's epoch, where float rounding matters


def _burst(count: int, cost: float, limit: float, window_s: float, now: float = NOW) -> list[bool]:
    tat: float | None = None
    admitted = []
    for _ in range(count):
        result = gcra(tat, now, cost, limit, window_s)
        tat = result.new_tat
        admitted.append(result.allowed)
    return admitted


@pytest.mark.parametrize(("limit", "window_s"), [(20, 60.0), (7, 60.0), (600, 60.0), (3, 1.0)])
def test_an_idle_key_admits_exactly_a_burst_of_limit(limit: int, window_s: float) -> None:
    admitted = _burst(limit + 5, 1, limit, window_s)
    assert admitted == [True] * limit + [False] * 5


def test_a_large_token_limit_admits_its_whole_burst_in_small_costs() -> None:
    assert _burst(1000, 200, 200_000, 60.0) == [True] * 1000
    assert _burst(1001, 200, 200_000, 60.0)[-1] is False


def test_refusal_says_when_the_same_request_would_fit() -> None:
    tat = gcra(None, NOW, 20, 20, 60.0).new_tat
    refused = gcra(tat, NOW, 1, 20, 60.0)
    assert not refused.allowed and refused.new_tat == tat
    assert refused.retry_after_s == pytest.approx(3.0)
    assert refused.remaining == pytest.approx(0.0)
    assert gcra(tat, NOW + 2.9, 1, 20, 60.0).allowed is False
    assert gcra(tat, NOW + 3.0, 1, 20, 60.0).allowed is True


def test_units_come_back_at_the_steady_rate() -> None:
    tat = gcra(None, 0.0, 20, 20, 60.0).new_tat
    assert gcra(tat, 30.0, 10, 20, 60.0).allowed
    assert not gcra(tat, 30.0, 11, 20, 60.0).allowed
    assert gcra(tat, 1000.0, 20, 20, 60.0).allowed  # long idle: a full burst, never more
    assert not gcra(tat, 1000.0, 21, 20, 60.0).allowed


def test_remaining_counts_what_could_still_be_admitted() -> None:
    first = gcra(None, 0.0, 5, 20, 60.0)
    assert first.allowed and first.remaining == pytest.approx(15)
    assert gcra(first.new_tat, 0.0, 5, 20, 60.0).remaining == pytest.approx(10)


def test_a_cost_above_the_whole_limit_is_refused_for_good() -> None:
    result = gcra(None, NOW, 101, 100, 60.0)
    assert not result.allowed and result.too_large
    assert result.retry_after_s == math.inf
    assert result.remaining == pytest.approx(100)
    assert gcra(None, NOW, 100, 100, 60.0).allowed


def test_a_refusal_takes_nothing() -> None:
    tat = gcra(None, 0.0, 15, 20, 60.0).new_tat
    refused = gcra(tat, 0.0, 10, 20, 60.0)
    assert not refused.allowed and refused.new_tat == tat
    assert gcra(tat, 0.0, 5, 20, 60.0).allowed


def test_tolerance_admits_no_more_than_a_sliver_early() -> None:
    tat = gcra(None, 0.0, 20, 20, 60.0).new_tat
    assert not gcra(tat, 3.0 - 10 * TOLERANCE_S, 1, 20, 60.0).allowed
    assert gcra(tat, 3.0 - TOLERANCE_S / 2, 1, 20, 60.0).allowed


def test_give_back_returns_units_but_never_before_now() -> None:
    tat = gcra(None, 0.0, 20, 20, 60.0).new_tat  # 60 s ahead
    back = gcra_give_back(tat, 0.0, 5, 20, 60.0)
    assert back == pytest.approx(45.0)
    assert gcra(back, 0.0, 5, 20, 60.0).allowed
    assert gcra_give_back(tat, 0.0, 100, 20, 60.0) is None  # more than was taken: idle
    assert gcra_give_back(tat, 61.0, 1, 20, 60.0) is None  # already idle
    assert gcra_give_back(None, 0.0, 1, 20, 60.0) is None


@pytest.mark.parametrize(
    ("cost", "limit", "window_s"),
    [(-1, 10, 60), (1, 0, 60), (1, 10, 0), (1, -5, 60), (math.nan, 10, 60), (1, math.inf, 60)],
)
def test_meaningless_arguments_are_refused(cost: float, limit: float, window_s: float) -> None:
    with pytest.raises(ValueError):
        gcra(None, 0.0, cost, limit, window_s)
    with pytest.raises(ValueError):
        gcra_give_back(None, 0.0, cost, limit, window_s)


def _ts(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("per", "now", "start", "end"),
    [
        ("minute", _ts(2026, 3, 4, 5, 6, 7), _ts(2026, 3, 4, 5, 6), _ts(2026, 3, 4, 5, 7)),
        ("hour", _ts(2026, 3, 4, 5, 6, 7), _ts(2026, 3, 4, 5), _ts(2026, 3, 4, 6)),
        ("day", _ts(2026, 3, 4, 23, 59, 59), _ts(2026, 3, 4), _ts(2026, 3, 5)),
        ("day", _ts(2026, 3, 5), _ts(2026, 3, 5), _ts(2026, 3, 6)),
        ("month", _ts(2026, 2, 28, 12), _ts(2026, 2, 1), _ts(2026, 3, 1)),
        ("month", _ts(2024, 2, 29, 23), _ts(2024, 2, 1), _ts(2024, 3, 1)),
        ("month", _ts(2026, 12, 31, 23, 59, 59), _ts(2026, 12, 1), _ts(2027, 1, 1)),
        ("month", _ts(2027, 1, 1), _ts(2027, 1, 1), _ts(2027, 2, 1)),
    ],
)
def test_periods_are_utc_calendar_periods(per: str, now: float, start: float, end: float) -> None:
    assert period_bounds(per, now) == (start, end)


def test_an_unknown_period_is_refused() -> None:
    with pytest.raises(ValueError):
        period_bounds("week", NOW)
