"""Tests for the circuit breaker state machine and the board, with a fake clock (plain floats)."""

from __future__ import annotations

import math

import pytest

from router.breaker import (
    MAX_WINDOW_OUTCOMES,
    BreakerBoard,
    BreakerConfig,
    CircuitBreaker,
    State,
)

# Ratio rule out of the way unless a test wants it.
CONSECUTIVE = BreakerConfig(consecutive_failures=3, min_requests=1000, cooldown_s=10.0)
RATIO = BreakerConfig(consecutive_failures=1000, failure_ratio=0.5, window_s=30.0, min_requests=10)


def opened(config: BreakerConfig = CONSECUTIVE, at: float = 0.0) -> CircuitBreaker:
    breaker = CircuitBreaker(config)
    while breaker.state(at) is State.CLOSED:
        breaker.failure(at)
    return breaker


def test_starts_closed_and_allows() -> None:
    breaker = CircuitBreaker(BreakerConfig())
    assert breaker.state(0.0) is State.CLOSED
    assert breaker.allow(0.0)
    assert breaker.last_failure_at is None


def test_opens_after_consecutive_failures() -> None:
    breaker = CircuitBreaker(CONSECUTIVE)
    breaker.failure(1.0)
    breaker.failure(2.0)
    assert breaker.state(2.0) is State.CLOSED
    breaker.failure(3.0)
    assert breaker.state(3.0) is State.OPEN
    assert not breaker.allow(3.0)
    assert breaker.last_failure_at == 3.0


def test_success_breaks_the_consecutive_run() -> None:
    breaker = CircuitBreaker(CONSECUTIVE)
    for now in (1.0, 2.0):
        breaker.failure(now)
    breaker.success(3.0)
    breaker.failure(4.0)
    breaker.failure(5.0)
    assert breaker.state(5.0) is State.CLOSED
    breaker.failure(6.0)
    assert breaker.state(6.0) is State.OPEN


def test_ratio_opens_once_min_requests_reached() -> None:
    breaker = CircuitBreaker(RATIO)
    # Alternate: 50% failures, but only 9 outcomes so far.
    for step in range(9):
        if step % 2:
            breaker.failure(float(step))
        else:
            breaker.success(float(step))
    assert breaker.state(9.0) is State.CLOSED  # 4 failures of 9, and below min_requests
    breaker.failure(9.0)  # 5 of 10 = 0.5 >= 0.5
    assert breaker.state(9.0) is State.OPEN


def test_ratio_below_threshold_stays_closed() -> None:
    breaker = CircuitBreaker(RATIO)
    for step in range(6):
        breaker.success(float(step))
    for step in range(6, 10):
        breaker.failure(float(step))
    assert breaker.state(10.0) is State.CLOSED  # 4 of 10 = 0.4
    breaker.failure(10.0)  # 5 of 11 < 0.5
    assert breaker.state(10.0) is State.CLOSED
    breaker.failure(10.0)  # 6 of 12 = 0.5
    assert breaker.state(10.0) is State.OPEN


def test_all_failures_below_min_requests_do_not_open_by_ratio() -> None:
    breaker = CircuitBreaker(RATIO)
    for step in range(9):
        breaker.failure(float(step))
    assert breaker.state(9.0) is State.CLOSED


def test_window_expiry_forgets_old_outcomes() -> None:
    breaker = CircuitBreaker(RATIO)
    for step in range(9):
        breaker.failure(float(step))  # t = 0..8
    # At t = 38.5 the failures at t <= 8 are more than 30 s old: only this one counts.
    breaker.failure(38.5)
    assert breaker.state(38.5) is State.CLOSED
    for step in range(8):
        breaker.failure(39.0 + step)
    assert breaker.state(46.0) is State.CLOSED  # 9 outcomes in the window
    breaker.failure(47.0)
    assert breaker.state(47.0) is State.OPEN


def test_window_edge_keeps_outcomes_exactly_window_old() -> None:
    breaker = CircuitBreaker(RATIO)
    for _ in range(9):
        breaker.failure(0.0)
    breaker.failure(30.0)  # the t=0 outcomes are exactly 30 s old: still in the window
    assert breaker.state(30.0) is State.OPEN


def test_window_is_bounded() -> None:
    config = BreakerConfig(consecutive_failures=1000, min_requests=1, failure_ratio=1.0)
    breaker = CircuitBreaker(config)
    for _ in range(MAX_WINDOW_OUTCOMES + 10):
        breaker.success(0.0)
    assert len(breaker._window) == MAX_WINDOW_OUTCOMES


def test_cooldown_turns_open_into_half_open() -> None:
    breaker = opened(at=100.0)
    assert breaker.state(109.9) is State.OPEN
    assert not breaker.allow(109.9)
    assert breaker.state(110.0) is State.HALF_OPEN


def test_half_open_limits_probes() -> None:
    breaker = opened(BreakerConfig(consecutive_failures=1, half_open_probes=2, cooldown_s=5.0))
    assert breaker.allow(5.0)
    assert breaker.allow(5.0)
    assert not breaker.allow(5.0)
    assert not breaker.allow(6.0)


def test_probe_success_closes_and_resets() -> None:
    breaker = opened()
    assert breaker.allow(10.0)
    breaker.success(10.5)
    assert breaker.state(10.5) is State.CLOSED
    assert breaker.allow(10.5)
    # Counters reset: it takes a full run of failures again.
    breaker.failure(11.0)
    breaker.failure(12.0)
    assert breaker.state(12.0) is State.CLOSED
    breaker.failure(13.0)
    assert breaker.state(13.0) is State.OPEN


def test_probe_failure_reopens_and_restarts_cooldown() -> None:
    breaker = opened()
    assert breaker.allow(10.0)
    breaker.failure(12.0)
    assert breaker.state(12.0) is State.OPEN
    assert breaker.last_failure_at == 12.0
    assert breaker.state(21.9) is State.OPEN
    assert breaker.state(22.0) is State.HALF_OPEN
    assert breaker.allow(22.0)


def test_release_frees_a_probe_and_counts_nothing() -> None:
    breaker = opened()
    assert breaker.allow(10.0)
    assert not breaker.allow(10.0)
    breaker.release(11.0)
    assert breaker.state(11.0) is State.HALF_OPEN
    assert breaker.allow(11.0)
    assert not breaker.allow(11.0)


def test_release_in_closed_counts_nothing() -> None:
    breaker = CircuitBreaker(CONSECUTIVE)
    breaker.failure(0.0)
    breaker.failure(0.0)
    breaker.release(0.0)  # does not break the run of failures like a success would
    breaker.failure(0.0)
    assert breaker.state(0.0) is State.OPEN


def test_extra_release_does_not_create_probes() -> None:
    breaker = opened()
    breaker.release(10.0)
    breaker.release(10.0)
    assert breaker.allow(10.0)
    assert not breaker.allow(10.0)


def test_late_outcomes_while_open_are_ignored() -> None:
    breaker = opened()
    breaker.success(1.0)
    assert breaker.state(1.0) is State.OPEN
    breaker.failure(2.0)
    assert breaker.last_failure_at == 2.0
    assert breaker.state(10.0) is State.HALF_OPEN  # cooldown counts from the opening at 0


def test_config_rejects_bad_values() -> None:
    for bad in (
        {"consecutive_failures": 0},
        {"failure_ratio": 0.0},
        {"failure_ratio": 1.5},
        {"window_s": 0.0},
        {"min_requests": 0},
        {"cooldown_s": -1.0},
        {"half_open_probes": 0},
    ):
        with pytest.raises(ValueError):
            BreakerConfig(**bad)


def test_board_makes_breakers_on_first_use() -> None:
    board = BreakerBoard(CONSECUTIVE)
    first = board.breaker("a", 0)
    assert board.breaker("a", 0) is first
    assert board.breaker("a", 1) is not first
    assert board.breaker("b", 0) is not first


def test_board_is_open_and_variant_available() -> None:
    board = BreakerBoard(CONSECUTIVE)
    assert not board.is_open("a", 0, 0.0)
    assert board.variant_available("a", 2, 0.0)
    for _ in range(3):
        board.breaker("a", 0).failure(0.0)
    assert board.is_open("a", 0, 1.0)
    assert board.variant_available("a", 2, 1.0)
    for _ in range(3):
        board.breaker("a", 1).failure(2.0)
    assert not board.variant_available("a", 2, 3.0)
    assert board.variant_available("a", 3, 3.0)  # replica 2 never failed
    # Half-open is not open: replica 0 is available again after its cool-down.
    assert not board.is_open("a", 0, 10.0)
    assert board.variant_available("a", 2, 10.0)


def test_board_last_failure() -> None:
    board = BreakerBoard(CONSECUTIVE)
    assert board.last_failure("a") == -math.inf
    board.breaker("a", 0).success(1.0)
    assert board.last_failure("a") == -math.inf
    board.breaker("a", 0).failure(5.0)
    board.breaker("a", 1).failure(7.0)
    board.breaker("b", 0).failure(9.0)
    assert board.last_failure("a") == 7.0
    assert board.last_failure("b") == 9.0


def test_board_open_circuits_sorted() -> None:
    board = BreakerBoard(CONSECUTIVE)
    assert board.open_circuits(0.0) == []
    for variant, replica in (("b", 0), ("a", 1), ("a", 0)):
        for _ in range(3):
            board.breaker(variant, replica).failure(0.0)
    board.breaker("c", 0).failure(0.0)
    assert board.open_circuits(1.0) == [("a", 0), ("a", 1), ("b", 0)]
    assert board.open_circuits(10.0) == []


def test_half_open_with_every_probe_out_admits_nothing_and_is_unavailable() -> None:
    board = BreakerBoard(BreakerConfig(consecutive_failures=1, cooldown_s=1.0, half_open_probes=1))
    breaker = board.breaker("v", 0)
    breaker.failure(0.0)
    assert not board.admits("v", 0, 0.5) and not board.variant_available("v", 1, 0.5)
    assert board.admits("v", 0, 1.5) and board.variant_available("v", 1, 1.5)
    assert breaker.allow(1.5)  # the one probe goes out
    assert not board.admits("v", 0, 1.6) and not board.variant_available("v", 1, 1.6)
    assert board.variant_available("v", 2, 1.6)  # replica 1 was never tried: it admits
    breaker.release(1.7)
    assert board.admits("v", 0, 1.7)
