"""One suite for both state stores (memory with a fake clock, Redis against a private server):
rate limits, budgets, races, script reloading, a frozen server; and a stateful property test
of the budget invariant on the memory store."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from redis.asyncio import Redis

from gateway.record_store import connect_redis
from gateway.state import SETTLED_MEMORY_S, StateStore, StateUnavailable, to_micros
from gateway.state_memory import MemoryState
from gateway.state_redis import RedisState
from tests.redis_server import RedisServer

T = TypeVar("T")
START = 1_767_225_600.0  # the fake clock's start: 2026-01-01T00:00:00Z
HOUR = 3600.0


class FakeClock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Harness:
    """A store under test and its time: the fake clock moves at once (memory); Redis's server
    clock moves by really sleeping. `peer` is a second store on the same state (for Redis a
    second client: another worker)."""

    def __init__(
        self, store: StateStore, peer: StateStore, clock: FakeClock | None, client: Redis | None
    ) -> None:
        self.store, self.peer, self.clock, self.client = store, peer, clock, client

    @property
    def exact(self) -> bool:
        return self.clock is not None

    async def now(self) -> float:
        if self.client is None:
            assert self.clock is not None
            return self.clock.now
        seconds, micros = await self.client.time()
        return seconds + micros / 1e6

    async def sleep(self, seconds: float) -> None:
        if self.clock is not None:
            self.clock.now += seconds
        else:
            await asyncio.sleep(seconds)


@pytest.fixture(params=["memory", "redis"])
def server_or_none(request: pytest.FixtureRequest) -> RedisServer | None:
    if request.param == "memory":
        return None
    server: RedisServer = request.getfixturevalue("redis_server")
    return server


@pytest.fixture(name="h")
async def harness(server_or_none: RedisServer | None, prefix: str) -> AsyncIterator[Harness]:
    if server_or_none is None:
        clock = FakeClock()
        store = MemoryState(clock)
        yield Harness(store, store, clock, None)
        return
    client, other = connect_redis(server_or_none.url), connect_redis(server_or_none.url)
    store, peer = RedisState(client, prefix), RedisState(other, prefix)
    try:
        yield Harness(store, peer, None, client)
    finally:
        for state, redis in ((store, client), (peer, other)):
            await state.aclose()
            await redis.aclose()


# Rate limits


async def test_a_burst_admits_exactly_the_limit_then_says_when_to_retry(h: Harness) -> None:
    decisions = [await h.store.take("k", 1, 20, 60.0) for _ in range(25)]
    assert [d.allowed for d in decisions] == [True] * 20 + [False] * 5
    assert decisions[19].remaining == pytest.approx(0, abs=0.01)
    refused = decisions[20]
    assert not refused.too_large and refused.retry_after_s == pytest.approx(3.0, abs=0.1)
    assert decisions[0].retry_after_s == 0 and decisions[0].remaining == pytest.approx(19, abs=0.01)


async def test_units_refill_over_time(h: Harness) -> None:
    for _ in range(4):
        assert (await h.store.take("k", 1, 4, 1.0)).allowed  # one unit every 0.25 s
    assert not (await h.store.take("k", 1, 4, 1.0)).allowed
    await h.sleep(0.3)
    assert (await h.store.take("k", 1, 4, 1.0)).allowed
    assert not (await h.store.take("k", 1, 4, 1.0)).allowed


async def test_costs_weigh_requests_as_tokens(h: Harness) -> None:
    assert (await h.store.take("tpm", 600, 1000, 60.0)).allowed
    refused = await h.store.take("tpm", 500, 1000, 60.0)
    assert not refused.allowed and refused.retry_after_s == pytest.approx(6.0, abs=0.1)
    assert refused.remaining == pytest.approx(400, abs=1)
    assert (await h.store.take("tpm", 400, 1000, 60.0)).allowed
    assert not (await h.store.take("tpm", 1, 1000, 60.0)).allowed


async def test_give_back_returns_unused_units_but_never_banks_them(h: Harness) -> None:
    assert (await h.store.take("tpm", 1000, 1000, 60.0)).allowed
    await h.store.give_back("tpm", 300, 1000, 60.0)  # estimated 1000, used 700
    assert (await h.store.take("tpm", 300, 1000, 60.0)).allowed
    assert not (await h.store.take("tpm", 1, 1000, 60.0)).allowed
    await h.store.give_back("tpm", 5000, 1000, 60.0)  # more than held: back to idle, not below
    assert (await h.store.take("tpm", 1000, 1000, 60.0)).allowed
    assert not (await h.store.take("tpm", 1, 1000, 60.0)).allowed
    await h.store.give_back("never-seen", 10, 1000, 60.0)


async def test_a_request_above_the_whole_limit_is_refused_and_takes_nothing(h: Harness) -> None:
    refused = await h.store.take("tpm", 1001, 1000, 60.0)
    assert not refused.allowed and refused.too_large and refused.retry_after_s == math.inf
    assert (await h.store.take("tpm", 1000, 1000, 60.0)).allowed


async def test_keys_are_limited_apart(h: Harness) -> None:
    assert (await h.store.take("a", 2, 2, 60.0)).allowed
    assert (await h.store.take("b", 2, 2, 60.0)).allowed
    assert not (await h.store.take("a", 1, 2, 60.0)).allowed


async def test_concurrent_takes_admit_exactly_the_limit(h: Harness) -> None:
    stores = [h.store, h.peer] * 32
    decisions = await asyncio.gather(*(s.take("rpm", 1, 20, 60.0) for s in stores))
    assert sum(d.allowed for d in decisions) == 20


# Budgets


async def _period_end(h: Harness, seconds: float = HOUR) -> float:
    return await h.now() + seconds


async def test_reserve_then_settle_keeps_the_books(h: Harness) -> None:
    end = await _period_end(h)
    first = await h.store.reserve("b", "r1", 0.3, 1.0, end, 60)
    assert first.allowed and (first.spent, first.reserved) == (0, pytest.approx(0.3))
    second = await h.store.reserve("b", "r2", 0.3, 1.0, end, 60)
    assert second.allowed and second.reserved == pytest.approx(0.6)
    await h.store.settle("b", "r1", 0.1)
    assert await h.store.totals("b") == (pytest.approx(0.1), pytest.approx(0.3))
    await h.store.settle("b", "r2", 0.25)
    assert await h.store.totals("b") == (pytest.approx(0.35), 0)
    assert await h.store.totals("unknown") == (0, 0)


async def test_a_reservation_that_would_exceed_the_budget_is_refused(h: Harness) -> None:
    end = await _period_end(h)
    assert (await h.store.reserve("b", "r1", 0.6, 1.0, end, 60)).allowed
    held = await h.store.reserve("b", "r2", 0.5, 1.0, end, 60)
    assert not held.allowed and held.reserved == pytest.approx(0.6) and held.spent == 0
    assert 0 < held.retry_after_s <= 1.0  # other requests' holds: soon
    assert await h.store.totals("b") == (0, pytest.approx(0.6))
    await h.store.settle("b", "r1", 0.6)
    spent = await h.store.reserve("b", "r3", 0.5, 1.0, end, 60)
    assert not spent.allowed and spent.spent == pytest.approx(0.6)
    assert spent.retry_after_s == pytest.approx(HOUR, abs=5)  # spending: until the period ends
    assert (await h.store.reserve("b", "r4", 0.4, 1.0, end, 60)).allowed  # exactly the limit


async def test_a_crashed_requests_hold_expires(h: Harness) -> None:
    end = await _period_end(h)
    assert (await h.store.reserve("b", "crashed", 0.8, 1.0, end, 1.0)).allowed
    assert not (await h.store.reserve("b", "next", 0.8, 1.0, end, 60)).allowed
    await h.sleep(1.1)
    assert await h.store.totals("b") == (0, 0)
    assert (await h.store.reserve("b", "next", 0.8, 1.0, end, 60)).allowed


async def test_a_late_settle_adds_its_spend_but_reserved_never_goes_negative(h: Harness) -> None:
    end = await _period_end(h)
    assert (await h.store.reserve("b", "slow", 0.5, 1.0, end, 1.0)).allowed
    assert (await h.store.reserve("b", "other", 0.2, 1.0, end, 60)).allowed
    await h.sleep(1.1)
    await h.store.settle("b", "slow", 0.4)
    assert await h.store.totals("b") == (pytest.approx(0.4), pytest.approx(0.2))


async def test_settling_twice_counts_once(h: Harness) -> None:
    end = await _period_end(h)
    assert (await h.store.reserve("b", "r", 0.5, 1.0, end, 60)).allowed
    await h.store.settle("b", "r", 0.3)
    await h.store.settle("b", "r", 0.3)
    await h.peer.settle("b", "r", 0.3)
    assert await h.store.totals("b") == (pytest.approx(0.3), 0)


async def test_reserving_the_same_id_again_holds_once(h: Harness) -> None:
    end = await _period_end(h)
    assert (await h.store.reserve("b", "r", 0.5, 1.0, end, 60)).allowed
    again = await h.store.reserve("b", "r", 0.5, 1.0, end, 60)
    assert again.allowed and again.reserved == pytest.approx(0.5)


async def test_a_new_period_starts_from_nothing(h: Harness) -> None:
    end = await _period_end(h, 1.0)
    assert (await h.store.reserve("b", "r1", 0.6, 1.0, end, 60)).allowed
    await h.store.settle("b", "r1", 0.6)
    assert (await h.store.reserve("b", "r2", 0.3, 1.0, end, 60)).allowed
    assert not (await h.store.reserve("b", "r3", 0.3, 1.0, end, 60)).allowed
    await h.sleep(1.1)
    assert await h.store.totals("b") == (0, 0)
    await h.store.settle("b", "r2", 0.3)  # its period is over: nothing to record
    assert await h.store.totals("b") == (0, 0)
    decision = await h.store.reserve("b", "r4", 1.0, 1.0, await _period_end(h), 60)
    assert decision.allowed and decision.spent == 0


async def test_money_is_exact_to_the_micro_dollar(h: Harness) -> None:
    end = await _period_end(h)
    for i in range(10):
        assert (await h.store.reserve("b", f"r{i}", 0.1, 1.0, end, 60)).allowed
        await h.store.settle("b", f"r{i}", 0.1)
    assert await h.store.totals("b") == (1.0, 0.0)
    assert not (await h.store.reserve("b", "more", 0.000001, 1.0, end, 60)).allowed


async def test_concurrent_reservations_never_overspend(h: Harness) -> None:
    end, cost = await _period_end(h), 0.0125
    stores = [h.store, h.peer] * 32
    decisions = await asyncio.gather(
        *(s.reserve("b", f"r{i}", cost, 10 * cost, end, 60) for i, s in enumerate(stores))
    )
    allowed = [i for i, d in enumerate(decisions) if d.allowed]
    assert len(allowed) == 10
    assert await h.store.totals("b") == (0, pytest.approx(10 * cost))
    actuals = {i: cost * (i % 7 + 1) / 8 for i in allowed}
    await asyncio.gather(*(stores[i].settle("b", f"r{i}", actuals[i]) for i in allowed))
    spent, reserved = await h.store.totals("b")
    assert reserved == 0
    assert to_micros(spent) == sum(to_micros(a) for a in actuals.values())


async def test_bad_arguments_are_refused_before_any_work(h: Harness) -> None:
    with pytest.raises(ValueError):
        await h.store.take("k", -1, 10, 60.0)
    with pytest.raises(ValueError):
        await h.store.reserve("b", "r", -0.5, 1.0, await _period_end(h), 60)
    with pytest.raises(ValueError):
        await h.store.reserve("b", "r", 0.5, 1.0, await _period_end(h), 0)


# Redis only


@pytest.fixture
async def redis_state(redis_client: Redis, prefix: str) -> AsyncIterator[RedisState]:
    state = RedisState(redis_client, prefix)
    yield state
    await state.aclose()


async def test_scripts_are_sent_again_after_a_script_flush(
    redis_state: RedisState, redis_client: Redis
) -> None:
    end = time.time() + HOUR
    assert (await redis_state.take("k", 1, 2, 60.0)).allowed
    assert (await redis_state.reserve("b", "r", 0.5, 1.0, end, 60)).allowed
    await redis_client.script_flush()
    assert (await redis_state.take("k", 1, 2, 60.0)).allowed
    assert not (await redis_state.take("k", 1, 2, 60.0)).allowed
    await redis_client.script_flush()
    await redis_state.give_back("k", 1, 2, 60.0)
    await redis_client.script_flush()
    await redis_state.settle("b", "r", 0.25)
    await redis_client.script_flush()
    assert await redis_state.totals("b") == (0.25, 0)


async def test_every_key_lives_under_the_prefix_and_expires(
    redis_state: RedisState, redis_client: Redis, prefix: str
) -> None:
    await redis_state.take("k", 1, 2, 60.0)
    await redis_state.reserve("b", "r1", 0.5, 1.0, time.time() + HOUR, 60)
    await redis_state.reserve("b", "r2", 0.1, 1.0, time.time() + HOUR, 60)
    await redis_state.settle("b", "r1", 0.25)
    keys = await redis_client.keys(f"{prefix}*")
    budget = f"{prefix}budget:{{b}}"
    names = {f"{prefix}rate:{{k}}", budget, f"{budget}:res", f"{budget}:amt", f"{budget}:done"}
    assert {key.decode() for key in keys} == names
    for key in keys:
        assert 0 < await redis_client.pttl(key) <= HOUR * 1000


async def _timed(call: Coroutine[Any, Any, T]) -> float:
    started = time.monotonic()
    with pytest.raises(StateUnavailable):
        await call
    return time.monotonic() - started


async def test_a_frozen_redis_fails_fast_and_recovers(
    redis_server: RedisServer, redis_state: RedisState
) -> None:
    end = time.time() + HOUR
    assert (await redis_state.take("k", 1, 100, 60.0)).allowed  # a pooled connection exists
    with redis_server.paused():
        elapsed = [
            await _timed(redis_state.take("k", 1, 100, 60.0)),
            await _timed(redis_state.reserve("b", "r", 0.5, 1.0, end, 60)),
            await _timed(redis_state.settle("b", "r", 0.5)),
            await _timed(redis_state.totals("b")),
        ]
    assert max(elapsed) < 1.0, elapsed
    assert (await redis_state.take("k", 1, 100, 60.0)).allowed


async def test_an_unreachable_redis_fails_fast(prefix: str) -> None:
    client = connect_redis("redis://127.0.0.1:1/0")
    state = RedisState(client, prefix)
    try:
        assert await _timed(state.take("k", 1, 10, 60.0)) < 1.0
    finally:
        await client.aclose()


# The budget invariant under arbitrary interleavings (memory store, fake clock)

LIMIT = 1.0


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a MemoryState call: it never awaits, so it finishes on its first step."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    raise AssertionError("a MemoryState call awaited")


class BudgetMachine(RuleBasedStateMachine):
    """Reserve, settle (once or again), crash and let time pass; the store must agree with a
    model of its holds and spend, and spent + reserved ≤ limit must hold throughout."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.store = MemoryState(self.clock)
        self.end = START + 10 * HOUR
        self.holds: dict[str, tuple[int, float]] = {}  # id -> (micros, expiry), crashed too
        self.running: set[str] = set()  # holds whose request will still settle
        self.settled: dict[str, float] = {}  # id -> remembered until
        self.spent = 0
        self.count = 0

    @rule(cents=st.integers(0, 40), ttl=st.sampled_from([0.5, 1.0, 5.0, 30.0]))
    def reserve(self, cents: int, ttl: float) -> None:
        self.count += 1
        reservation = f"r{self.count}"
        decision = _run(self.store.reserve("b", reservation, cents / 100, LIMIT, self.end, ttl))
        fits = self.spent + self._reserved() + cents * 10_000 <= to_micros(LIMIT)
        assert decision.allowed == fits
        if decision.allowed:
            self.holds[reservation] = (cents * 10_000, self.clock.now + ttl)
            self.running.add(reservation)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), share=st.integers(0, 100))
    def settle(self, data: st.DataObject, share: int) -> None:
        reservation = data.draw(st.sampled_from(sorted(self.running)))
        micros, expiry = self.holds.pop(reservation)
        self.running.discard(reservation)
        actual = micros * share // 100
        _run(self.store.settle("b", reservation, actual / 1_000_000))
        self.spent += actual
        self.settled[reservation] = max(self.clock.now + SETTLED_MEMORY_S, expiry)

    @precondition(lambda self: self.settled)
    @rule(data=st.data())
    def settle_again(self, data: st.DataObject) -> None:
        reservation = data.draw(st.sampled_from(sorted(self.settled)))
        _run(self.store.settle("b", reservation, 0.4))

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        self.running.discard(data.draw(st.sampled_from(sorted(self.running))))

    @rule(seconds=st.floats(0, 3))
    def advance(self, seconds: float) -> None:
        self.clock.now += seconds
        for reservation, (_, expiry) in list(self.holds.items()):
            if expiry <= self.clock.now:
                del self.holds[reservation]
                self.running.discard(reservation)  # its request outlived its hold: none do
        self.settled = {r: t for r, t in self.settled.items() if t > self.clock.now}

    def _reserved(self) -> int:
        return sum(micros for micros, _ in self.holds.values())

    @invariant()
    def books_balance_within_the_limit(self) -> None:
        spent, reserved = _run(self.store.totals("b"))
        assert (to_micros(spent), to_micros(reserved)) == (self.spent, self._reserved())
        assert 0 <= to_micros(spent) + to_micros(reserved) <= to_micros(LIMIT)


BudgetMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None, database=None
)
test_budget_invariant = BudgetMachine.TestCase
