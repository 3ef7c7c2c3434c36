"""Tests for replica choice: in-flight counting and least-outstanding with round-robin ties."""

from __future__ import annotations

import pytest

from router.replicas import InFlight, least_outstanding


def test_least_outstanding_picks_minimum() -> None:
    assert least_outstanding([3, 1, 2], 0) == 1
    assert least_outstanding([3, 1, 2], 2) == 1
    assert least_outstanding([0, 5], 1) == 0


def test_ties_round_robin_from_start() -> None:
    assert [least_outstanding([1, 1, 1], start) for start in range(6)] == [0, 1, 2, 0, 1, 2]
    assert least_outstanding([0, 2, 0, 0], 1) == 2
    assert least_outstanding([0, 2, 0, 1], 3) == 0


def test_least_outstanding_rejects_empty() -> None:
    with pytest.raises(ValueError):
        least_outstanding([], 0)


def test_in_flight_counts_and_shares_load() -> None:
    in_flight = InFlight(3)
    picks = []
    for start in range(6):
        index = in_flight.pick(start)
        in_flight.acquire(index)
        picks.append(index)
    assert sorted(picks) == [0, 0, 1, 1, 2, 2]
    assert in_flight.counts == (2, 2, 2)
    in_flight.release(1)
    assert in_flight.counts == (2, 1, 2)
    assert in_flight.pick(0) == 1
    assert len(in_flight) == 3


def test_in_flight_release_without_acquire_is_an_error() -> None:
    in_flight = InFlight(1)
    with pytest.raises(ValueError):
        in_flight.release(0)


def test_in_flight_needs_a_replica() -> None:
    with pytest.raises(ValueError):
        InFlight(0)
