"""Tests for the retry budget: Envoy-style at once, Finagle-style in all."""

from __future__ import annotations

import pytest

from router.retry_budget import RetryBudget


def started(requests: int, ratio: float = 0.2, minimum: int = 3) -> RetryBudget:
    budget = RetryBudget(ratio, minimum)
    for _ in range(requests):
        budget.begin()
    return budget


def granted(budget: RetryBudget, tries: int = 1000) -> int:
    return sum(budget.acquire() for _ in range(tries))


def test_defaults() -> None:
    budget = RetryBudget()
    assert budget.requests_in_flight == 0
    assert budget.retries_in_flight == 0
    assert budget.limit == 3


def test_ratio_caps_retries_with_many_in_flight() -> None:
    budget = started(100)
    for _ in range(20):
        assert budget.acquire()
    assert not budget.acquire()
    assert budget.retries_in_flight == 20


def test_minimum_applies_with_few_in_flight() -> None:
    budget = started(2)
    assert granted(budget) == 3
    assert not budget.acquire()


@pytest.mark.parametrize(
    ("requests", "limit"), [(0, 3), (1, 3), (15, 3), (19, 3), (20, 4), (64, 12), (100, 20)]
)
def test_limit_grows_with_requests_in_flight(requests: int, limit: int) -> None:
    budget = started(requests)
    assert budget.limit == limit
    assert granted(budget) == limit


def test_float_rounding_does_not_lose_a_retry() -> None:
    assert started(100, ratio=0.29, minimum=0).limit == 29


def test_growing_in_flight_reopens_the_budget() -> None:
    budget = started(10)
    assert granted(budget) == 3
    for _ in range(10):
        budget.begin()
    assert budget.requests_in_flight == 20
    assert budget.acquire()
    assert not budget.acquire()


def test_release_frees_a_retry() -> None:
    budget = started(20)  # limit 4 at once, 7 in all
    assert granted(budget) == 4
    budget.release()
    assert budget.retries_in_flight == 3
    assert budget.acquire()
    assert not budget.acquire()


def test_retries_in_all_are_a_share_of_requests() -> None:
    """Quick failures keep few retries in flight; the balance still caps them in all."""
    budget, requests, retries = RetryBudget(), 1000, 0
    for _ in range(requests):
        budget.begin()
        for _ in range(2):  # max_attempts 3: up to two retries each, one at a time
            if budget.acquire():
                retries += 1
                budget.release()
        budget.end()
    assert retries <= 0.2 * requests + 3
    assert retries >= 0.2 * requests  # the whole share is used


def test_healthy_traffic_does_not_bank_retries() -> None:
    budget = RetryBudget()
    for _ in range(10_000):
        budget.begin()
        budget.end()
    budget.begin()
    assert budget.balance == pytest.approx(3.2)
    assert granted(budget) == 3


def test_minimum_comes_back_with_traffic() -> None:
    budget = started(1)
    assert granted(budget) == 3
    for _ in range(3):
        budget.release()
    budget.end()
    for _ in range(15):  # each request earns a fifth of a retry
        budget.begin()
        budget.end()
    budget.begin()
    assert granted(budget) == 3


def test_end_shrinks_the_limit() -> None:
    budget = started(50)
    assert granted(budget) == 10
    for _ in range(30):
        budget.end()
    assert budget.requests_in_flight == 20
    budget.release()
    assert not budget.acquire()  # 9 in flight, limit now 4
    for _ in range(6):
        budget.release()
    assert budget.acquire()


def test_zero_budget_refuses_every_retry() -> None:
    assert not started(100, ratio=0.0, minimum=0).acquire()


def test_unbalanced_calls_raise() -> None:
    budget = RetryBudget()
    with pytest.raises(ValueError):
        budget.end()
    with pytest.raises(ValueError):
        budget.release()


def test_rejects_negative_settings() -> None:
    with pytest.raises(ValueError):
        RetryBudget(ratio=-0.1)
    with pytest.raises(ValueError):
        RetryBudget(minimum=-1)
