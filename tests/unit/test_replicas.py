"""Tests for replica choice: least outstanding, load scores and power-of-two-choices."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.settings import Timeouts
from gateway.upstreams.base import Upstream
from router.replicas import least_outstanding, pick_two, score, scores
from router.vllm_metrics import ReplicaLoad

ADAPTER = "support-lora"


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


def test_score_without_load_is_in_flight() -> None:
    assert score(None, 0, None) == 0
    assert score(None, 3, ADAPTER) == 3


def test_a_queue_scores_worse_than_an_idle_replica() -> None:
    idle = ReplicaLoad()
    busy = ReplicaLoad(running=4)
    queued = ReplicaLoad(running=4, waiting=4)
    assert score(idle, 0, None) < score(busy, 0, None) < score(queued, 0, None)
    # a waiting request weighs more than a running one
    assert score(ReplicaLoad(waiting=1), 0, None) > score(ReplicaLoad(running=1), 0, None)


def test_in_flight_adds_to_the_scraped_load() -> None:
    load = ReplicaLoad(running=2)
    assert score(load, 3, None) > score(load, 0, None)


def test_resident_adapter_is_preferred() -> None:
    resident = ReplicaLoad(running=2, running_adapters=frozenset({ADAPTER}))
    queued_for = ReplicaLoad(running=2, waiting_adapters=frozenset({ADAPTER}))
    absent = ReplicaLoad(running=2, running_adapters=frozenset({"other"}))
    assert score(resident, 0, ADAPTER) == score(queued_for, 0, ADAPTER)
    assert score(resident, 0, ADAPTER) < score(absent, 0, ADAPTER)
    assert score(absent, 0, None) == score(resident, 0, None)  # no adapter asked: no penalty


def test_full_lora_slots_cost_more() -> None:
    free_slot = ReplicaLoad(running_adapters=frozenset({"a"}), max_loras=2)
    full = ReplicaLoad(running_adapters=frozenset({"a", "b"}), max_loras=2)
    assert score(full, 0, ADAPTER) > score(free_slot, 0, ADAPTER) > score(free_slot, 0, "a")


def test_kv_cache_pressure() -> None:
    scores_by_use = [score(ReplicaLoad(kv_cache=use), 0, None) for use in (0.0, 0.5, 0.9, 1.0)]
    assert scores_by_use == sorted(scores_by_use) and len(set(scores_by_use)) == 4
    assert score(ReplicaLoad(kv_cache=0.3), 0, None) < score(ReplicaLoad(running=1), 0, None)
    assert score(ReplicaLoad(kv_cache=1.0), 0, None) > score(ReplicaLoad(running=4), 0, None)


def test_long_queue_outweighs_missing_adapter() -> None:
    long_queue = ReplicaLoad(waiting=20, running_adapters=frozenset({ADAPTER}))
    missing = ReplicaLoad(waiting=1)
    assert score(missing, 0, ADAPTER) < score(long_queue, 0, ADAPTER)


def test_scores_ignore_a_model_no_replica_holds_as_adapter() -> None:
    full = ReplicaLoad(running_adapters=frozenset({"a", "b"}), max_loras=2)
    free = ReplicaLoad(running=1, max_loras=2)
    # a base-model name: no penalty, so the busier replica is not favoured by slot counts
    assert scores([full, free], [0, 0], "base-model") == [0.0, 1.0]
    assert scores([full, free, None], [0, 0, 2], "a") == [
        score(full, 0, "a"),
        score(free, 0, "a"),
        2.0,
    ]


def test_pick_two_single_replica_and_empty() -> None:
    assert pick_two([5.0], 0.9, 0.1) == 0
    with pytest.raises(ValueError):
        pick_two([], 0.0, 0.0)


def test_pick_two_is_deterministic_given_uniforms() -> None:
    values = [3.0, 1.0, 2.0, 0.5]
    # u1 -> index 0 (of 4); u2 -> index 0 of the other 3, i.e. replica 1
    assert pick_two(values, 0.0, 0.0) == 1
    # u1 -> replica 3; u2 -> 0.99 * 3 -> 2 -> replica 2 (below 3, kept): 0.5 < 2.0
    assert pick_two(values, 0.99, 0.99) == 3
    # u1 -> replica 2; u2 -> 1 of 3 -> replica 1
    assert pick_two(values, 0.5, 0.34) == 1
    for u1, u2 in itertools.product([0.0, 0.3, 0.6, 0.999], repeat=2):
        assert pick_two(values, u1, u2) == pick_two(values, u1, u2)


def test_pick_two_draws_two_distinct_and_never_the_worse() -> None:
    rand = random.Random(7)
    values = [4.0, 1.0, 3.0, 2.0, 5.0]
    seen = set()
    for _ in range(2000):
        u1, u2 = rand.random(), rand.random()
        first = min(int(u1 * 5), 4)
        second = min(int(u2 * 4), 3)
        second += second >= first
        assert first != second
        chosen = pick_two(values, u1, u2)
        assert chosen in (first, second)
        assert values[chosen] == min(values[first], values[second])
        seen.add(chosen)
    assert seen == {0, 1, 2, 3}  # the worst (index 4) is never chosen; the others are


def test_pick_two_tie_keeps_the_first_draw() -> None:
    assert pick_two([1.0, 1.0], 0.0, 0.0) == 0
    assert pick_two([1.0, 1.0], 0.9, 0.0) == 1


def test_pick_two_clamps_out_of_range_uniforms() -> None:
    assert pick_two([2.0, 1.0], 1.0, 1.0) == 1
    assert pick_two([1.0, 2.0], -0.5, -0.5) == 0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_upstream(clock: Clock) -> Iterator[Any]:
    clients: list[httpx.AsyncClient] = []

    def make(replicas: int, interval: float | None = 1.0) -> Upstream:
        client = httpx.AsyncClient()
        clients.append(client)
        roots = [f"http://r{i}/v1" for i in range(replicas)]
        return Upstream(
            "u", "vllm", roots, client, Timeouts(),
            metrics_urls=[f"http://r{i}/metrics" for i in range(replicas)],
            scrape_interval_s=interval, rand=random.Random(1), clock=clock,
        )  # fmt: skip

    yield make
    # the clients never opened a connection; nothing to close


def _load(waiting: float = 0, adapters: frozenset[str] = frozenset()) -> ReplicaLoad:
    return ReplicaLoad(waiting=waiting, running_adapters=adapters)


def test_acquire_without_loads_is_least_outstanding(make_upstream: Any) -> None:
    upstream = make_upstream(3)
    picks = [upstream.acquire() for _ in range(6)]
    assert sorted(picks) == [0, 0, 1, 1, 2, 2]
    upstream.release(1)
    assert upstream.acquire("anything") == 1


def test_acquire_with_fresh_loads_prefers_the_better_replica(
    make_upstream: Any, clock: Clock
) -> None:
    upstream = make_upstream(2)
    upstream.record_load(0, _load(waiting=20), clock.now)
    upstream.record_load(1, _load(waiting=1, adapters=frozenset({ADAPTER})), clock.now)
    # scores 2 * 20 + 4 (adapter not resident) = 44 against 2 * 1 + in flight
    for _ in range(42):
        assert upstream.acquire(ADAPTER) == 1
    upstream.acquire(ADAPTER)  # a tie at 44: either
    upstream.in_flight[:] = [0, 43]
    # this gateway's own requests in flight count too: replica 1 is now the busier
    assert upstream.acquire(ADAPTER) == 0


def test_stale_loads_fall_back_to_least_outstanding(make_upstream: Any, clock: Clock) -> None:
    upstream = make_upstream(2)
    upstream.record_load(0, _load(waiting=20), clock.now)
    upstream.record_load(1, _load(waiting=0), clock.now)
    clock.now += 3.5  # past 3 intervals of 1 s
    assert sorted(upstream.acquire() for _ in range(4)) == [0, 0, 1, 1]


def test_one_missing_load_falls_back_to_least_outstanding(make_upstream: Any, clock: Clock) -> None:
    upstream = make_upstream(2)
    upstream.record_load(0, _load(waiting=20), clock.now)
    assert sorted(upstream.acquire() for _ in range(4)) == [0, 0, 1, 1]


def test_loads_are_ignored_without_scraping(make_upstream: Any, clock: Clock) -> None:
    upstream = make_upstream(2, interval=None)
    upstream.record_load(0, _load(waiting=20), clock.now)
    upstream.record_load(1, _load(waiting=0), clock.now)
    assert sorted(upstream.acquire() for _ in range(4)) == [0, 0, 1, 1]
    assert upstream.stale_replicas(clock.now + 1000) == []


@pytest.mark.parametrize("scraped", [True, False])
def test_acquire_skips_excluded_replicas(make_upstream: Any, clock: Clock, scraped: bool) -> None:
    upstream = make_upstream(3)
    if scraped:
        for i, waiting in enumerate([0, 5, 10]):
            upstream.record_load(i, _load(waiting=waiting), clock.now)
    for _ in range(10):
        assert upstream.acquire(exclude={0}) in (1, 2)
    assert upstream.acquire(exclude=[0, 1]) == 2
    assert upstream.in_flight[0] == 0
    # everything excluded: the exclusion is ignored rather than refusing the request
    assert upstream.acquire(exclude=range(3)) in (0, 1, 2)
    assert sum(upstream.in_flight) == 12


def test_stale_replicas(make_upstream: Any, clock: Clock) -> None:
    upstream = make_upstream(2)
    assert upstream.stale_replicas(clock.now + 100) == []  # the scraper has not started
    upstream.scraping_since = clock.now
    assert upstream.stale_replicas(clock.now + 2.9) == []  # first scrapes still due
    upstream.record_load(0, _load(), clock.now + 2.0)
    assert upstream.stale_replicas(clock.now + 3.5) == [1]
    assert upstream.stale_replicas(clock.now + 5.5) == [0, 1]
