"""The shared-state protocol for rate limits and dollar budgets, its results and its one error.

Two implementations pass one test suite: `MemoryState` (one process) and `RedisState` (every
worker and replica sharing one Redis).

Rate limits (GCRA, see router/limits.py): `take` admits `cost` units against "`limit` per
`window_s`" under `key`, atomically; `give_back` returns units taken but not used (tokens
per minute: the reserved estimate minus the actual usage).

Budgets (reserve, then settle): `reserve` holds a request's maximum cost before the call;
`settle` replaces the hold with the actual cost after it. A hold not settled within its
`ttl_s` (a crashed or cancelled request) expires and frees its room. `budget` names one
budget in one period (put the period's start in the name, e.g. `key:app-a:day:1767225600`):
all of its state expires at the `period_end` given to its first `reserve` (later ones keep
it; a `period_end` already past, from a clock behind the store's, is read as now + `ttl_s`).

Invariant: spent + reserved ≤ limit at every moment, under any concurrency, provided each
settle's `actual` is at most its reservation's amount and arrives before the hold expires
(so `ttl_s` must exceed the request's whole deadline). A settle that comes late, after its
hold expired, still adds its spend: the money was spent; only then can spent pass the limit.

Settling is idempotent per reservation id: a repeat within `SETTLED_MEMORY_S` (or until the
hold would have expired, if later) changes nothing, so a settle retried after a timeout is
not counted twice. Settling a budget whose period has ended records nothing.

Money is kept in integer micro-dollars (amounts round to the nearest micro-dollar), so totals
in Redis are exact integers (HINCRBY) with no float drift.
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from gateway.errors import ServiceUnavailable

MICROS_PER_USD = 1_000_000
SETTLED_MEMORY_S = 60.0  # how long a settled reservation id is remembered at least
HOLD_RETRY_S = 1.0  # retry hint, at most, when only other requests' holds are in the way


class StateUnavailable(ServiceUnavailable):
    """The state store did not answer in time or failed; the caller applies its failure policy
    (rate limits: a local share; budgets: closed by default). Unhandled, it renders as 503."""


class RateDecision(msgspec.Struct, frozen=True):
    """`retry_after_s`: 0 when allowed; `math.inf` when `too_large` (the cost alone exceeds the
    limit, so no wait helps). `remaining`: units admissible at once after this decision."""

    allowed: bool
    retry_after_s: float
    remaining: float
    too_large: bool = False


class BudgetDecision(msgspec.Struct, frozen=True):
    """The budget's totals in dollars as this decision saw them (the new hold included when
    allowed). `retry_after_s` when refused: until the period ends when spending alone leaves no
    room; else until the soonest hold expires, at most HOLD_RETRY_S."""

    allowed: bool
    spent: float
    reserved: float
    retry_after_s: float


class StateStore(Protocol):
    """Rate limits and budgets shared by everything that uses the same store."""

    async def take(self, key: str, cost: float, limit: float, window_s: float) -> RateDecision:
        """Admit `cost` units now, or refuse and take nothing."""
        ...

    async def give_back(self, key: str, cost: float, limit: float, window_s: float) -> None:
        """Return `cost` unused units to `key` (its state never goes back before now)."""
        ...

    async def reserve(
        self,
        budget: str,
        reservation: str,
        amount: float,
        limit: float,
        period_end: float,
        ttl_s: float,
    ) -> BudgetDecision:
        """Hold `amount` dollars for `ttl_s` seconds if spent + reserved + amount ≤ limit.
        Reserving a live reservation id again holds nothing more and answers allowed."""
        ...

    async def settle(self, budget: str, reservation: str, actual: float) -> None:
        """Release the hold `reservation` (if still held) and add `actual` dollars to spent."""
        ...

    async def totals(self, budget: str) -> tuple[float, float]:
        """(spent, reserved) in dollars, expired holds excluded."""
        ...

    async def aclose(self) -> None: ...


def to_micros(usd: float) -> int:
    """Dollars as integer micro-dollars (nearest); negative amounts are refused."""
    if not usd >= 0:
        raise ValueError("a dollar amount cannot be negative")
    return round(usd * MICROS_PER_USD)


def to_usd(micros: int) -> float:
    return micros / MICROS_PER_USD


def check_budget_args(ttl_s: float) -> None:
    if not ttl_s > 0:
        raise ValueError("a reservation needs a positive ttl_s")
