"""The in-process state store: rate limits and budgets for one gateway process.

Every method runs to completion without awaiting, so on one event loop each call is atomic
without locks. Expiry is checked lazily against an injectable clock (wall time by default,
since budget periods are calendar periods in epoch seconds).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.state import (
    HOLD_RETRY_S,
    SETTLED_MEMORY_S,
    BudgetDecision,
    RateDecision,
    check_budget_args,
    to_micros,
    to_usd,
)
from router.limits import gcra, gcra_give_back


@dataclass
class _Budget:
    """One budget in one period; amounts in micro-dollars."""

    ends_at: float
    spent: int = 0
    reserved: int = 0
    holds: dict[str, tuple[int, float]] = field(default_factory=dict)  # id -> (amount, expiry)
    expiries: list[tuple[float, str]] = field(default_factory=list)  # heap; stale entries skipped
    settled: dict[str, float] = field(default_factory=dict)  # id -> forget at
    forgets: list[tuple[float, str]] = field(default_factory=list)  # heap of settled ids

    def prune(self, now: float) -> None:
        """Drop holds that expired at or before `now`, and settled ids past their memory."""
        while self.expiries and self.expiries[0][0] <= now:
            expiry, reservation = heapq.heappop(self.expiries)
            hold = self.holds.get(reservation)
            if hold is not None and hold[1] == expiry:
                del self.holds[reservation]
                self.reserved -= hold[0]
        while self.forgets and self.forgets[0][0] <= now:
            _, reservation = heapq.heappop(self.forgets)
            self.settled.pop(reservation, None)

    def remember(self, reservation: str, until: float) -> None:
        self.settled[reservation] = until
        heapq.heappush(self.forgets, (until, reservation))

    def hold_retry(self, now: float) -> float:
        soonest = min((expiry for _, expiry in self.holds.values()), default=now + HOLD_RETRY_S)
        return min(max(soonest - now, 0.0), HOLD_RETRY_S)


class MemoryState:
    """Rate limits and budgets of one process (see gateway/state.py for the contract)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._tats: dict[str, float] = {}
        self._budgets: dict[str, _Budget] = {}

    async def take(self, key: str, cost: float, limit: float, window_s: float) -> RateDecision:
        now = self._clock()
        result = gcra(self._tats.get(key), now, cost, limit, window_s)
        if result.allowed and result.new_tat > now:
            self._tats[key] = result.new_tat
        return RateDecision(
            result.allowed, result.retry_after_s, result.remaining, result.too_large
        )

    async def give_back(self, key: str, cost: float, limit: float, window_s: float) -> None:
        tat = gcra_give_back(self._tats.get(key), self._clock(), cost, limit, window_s)
        if tat is None:
            self._tats.pop(key, None)
        else:
            self._tats[key] = tat

    async def reserve(
        self,
        budget: str,
        reservation: str,
        amount: float,
        limit: float,
        period_end: float,
        ttl_s: float,
    ) -> BudgetDecision:
        check_budget_args(ttl_s)
        micros, cap = to_micros(amount), to_micros(limit)
        now = self._clock()
        state = self._live(budget, now)
        if state is None:
            self._forget_ended(now)
            ends_at = period_end if period_end > now else now + ttl_s  # a clock behind ours
            state = self._budgets[budget] = _Budget(ends_at)
        if reservation in state.holds:
            return self._decision(True, state, 0.0)
        if state.spent + micros > cap:
            return self._decision(False, state, max(state.ends_at - now, 0.0))
        if state.spent + state.reserved + micros > cap:
            return self._decision(False, state, state.hold_retry(now))
        expiry = now + ttl_s
        state.holds[reservation] = (micros, expiry)
        heapq.heappush(state.expiries, (expiry, reservation))
        state.reserved += micros
        return self._decision(True, state, 0.0)

    async def settle(self, budget: str, reservation: str, actual: float) -> None:
        micros = to_micros(actual)
        now = self._clock()
        state = self._live(budget, now)
        if state is None or reservation in state.settled:
            return
        hold = state.holds.pop(reservation, None)
        remember = now + SETTLED_MEMORY_S
        if hold is not None:
            state.reserved -= hold[0]
            remember = max(remember, hold[1])
        state.spent += micros
        state.remember(reservation, remember)

    async def totals(self, budget: str) -> tuple[float, float]:
        state = self._live(budget, self._clock())
        if state is None:
            return 0.0, 0.0
        return to_usd(state.spent), to_usd(state.reserved)

    async def aclose(self) -> None:
        pass

    def _live(self, budget: str, now: float) -> _Budget | None:
        """The budget's state with expired holds pruned, or None (never seen, or period over)."""
        state = self._budgets.get(budget)
        if state is None:
            return None
        if state.ends_at <= now:
            del self._budgets[budget]
            return None
        state.prune(now)
        return state

    def _forget_ended(self, now: float) -> None:
        """Drop every budget whose period is over (called when a new one starts)."""
        ended = [name for name, state in self._budgets.items() if state.ends_at <= now]
        for name in ended:
            del self._budgets[name]

    @staticmethod
    def _decision(allowed: bool, state: _Budget, retry_after_s: float) -> BudgetDecision:
        return BudgetDecision(allowed, to_usd(state.spent), to_usd(state.reserved), retry_after_s)
