"""Admission: a key's requests and tokens per minute and the dollar budgets of keys and routes,
held before the call and settled after it, with the policy for a state store that is away.

Failure policy (`state` settings): rate limits fall back to this process's share of the limit
(limit / `replicas`) in memory, never to "unlimited"; budgets are refused (503) unless
`budget_when_unavailable: local`, which lets each process spend `local_budget_usd` per period.
The shared store is tried again on every request, so recovery is automatic.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gateway.errors import RateLimited, ServiceUnavailable
from gateway.records import Usage, token_cost
from gateway.settings import Budget, Key, Price, Route, State
from gateway.state import StateStore, StateUnavailable
from gateway.state_memory import MemoryState
from router.limits import period_bounds

log = logging.getLogger("turnout.limits")
MINUTE = 60.0
HOLD_GRACE_S = 60.0  # a hold outlives the request's deadline by this much
PROBE_S = 1.0  # while the shared store is away, it is asked again once per this interval


@dataclass
class Limiter:
    """Decides admission against the shared store, falling back to a local one."""

    shared: StateStore
    policy: State
    share: int = 1  # a memory store behind N workers: each enforces limit / N
    local: MemoryState = field(default_factory=MemoryState)
    unavailable_since: float | None = None
    on_fallback: Callable[[str], None] = lambda feature: None
    _next_probe: float = 0.0

    @staticmethod
    def applies(key: Key | None, route: Route) -> bool:
        """Does any limit or budget bind this request? (Else admission is skipped entirely.)"""
        limited = key is not None and bool(key.rpm or key.tpm or key.budget)
        return limited or route.budget is not None

    async def admit(
        self,
        key: Key | None,
        route: tuple[str, Route],
        request: tuple[Callable[[], int], int | None, Sequence[Price | None]],
        deadline_s: float,
    ) -> Admission:
        """Take the request's units and hold its maximum cost, or raise 429 (or 503).

        `request` = (the prompt token estimate, counted only if a limit needs it; max_tokens or
        None; the prices of every variant the request may be sent to: the hold is at the
        dearest, so a fallback never overspends). Holds carry an id made here, never one a
        client could choose and repeat.
        """
        budgets = _budgets(key, route)
        admission = Admission(self, uuid.uuid4().hex if budgets else "")
        estimate, max_tokens, prices = request
        completion = max_tokens or self.policy.max_tokens_ceiling
        try:
            if key is not None and key.rpm:
                await admission.take(f"key:{key.name}:rpm", 1, key.rpm, "requests per minute")
            prompt = estimate() if budgets or (key is not None and key.tpm) else 0
            if key is not None and key.tpm:
                await admission.take(
                    f"key:{key.name}:tpm", prompt + completion, key.tpm, "tokens per minute",
                    tokens=True,
                )  # fmt: skip
            usage = Usage(prompt=prompt, completion=completion)
            most = max((token_cost(price, usage) for price in prices), default=0.0)
            for name, budget in budgets:
                await admission.reserve(name, budget, most, deadline_s + HOLD_GRACE_S)
        except BaseException:
            await admission.undo()
            raise
        return admission

    async def take(self, key: str, cost: float, limit: float) -> tuple[bool, float, bool, bool]:
        """(allowed, retry_after_s, too_large, shared) from the shared store, or the local share."""
        if self.use_shared():
            try:
                decision = await self.shared.take(key, cost, limit / self.share, MINUTE)
                self.recovered()
                return decision.allowed, decision.retry_after_s, decision.too_large, True
            except StateUnavailable:
                self.fell_back("rate_limit")
        else:
            self.on_fallback("rate_limit")
        decision = await self.local.take(key, cost, limit / self._local_share, MINUTE)
        return decision.allowed, decision.retry_after_s, decision.too_large, False

    async def give_back(self, key: str, cost: float, limit: float, shared: bool) -> None:
        if not shared:
            await self.local.give_back(key, cost, limit / self._local_share, MINUTE)
            return
        if self.use_shared():  # else the units come back on their own as the window moves
            try:
                await self.shared.give_back(key, cost, limit / self.share, MINUTE)
            except StateUnavailable:
                self.fell_back("rate_limit")

    async def reserve(
        self, name: str, budget: Budget, amount: float, ttl_s: float, reservation: str
    ) -> tuple[bool, float, str, bool]:
        """(allowed, retry_after_s, period, shared) for a hold on budget `name` in its current
        period; `period` names the budget in that period (settle there)."""
        start, end = period_bounds(budget.per, time.time())
        period = f"{name}:{budget.per}:{int(start)}"
        limit = budget.usd / self.share
        if self.use_shared():
            try:
                decision = await self.shared.reserve(period, reservation, amount, limit, end, ttl_s)
                self.recovered()
                return decision.allowed, decision.retry_after_s, period, True
            except StateUnavailable:
                self.fell_back("budget")
        else:
            self.on_fallback("budget")
        if self.policy.budget_when_unavailable == "closed":
            raise ServiceUnavailable(
                "Budgets cannot be checked right now (the shared state store is away)."
            )
        allowance = min(self.policy.local_budget_usd, limit)
        decision = await self.local.reserve(period, reservation, amount, allowance, end, ttl_s)
        return decision.allowed, decision.retry_after_s, period, False

    async def settle(self, period: str, reservation: str, cost: float, shared: bool) -> None:
        if not shared:
            await self.local.settle(period, reservation, cost)
            return
        try:
            await self.shared.settle(period, reservation, cost)
        except StateUnavailable:
            self.fell_back("budget")  # the hold expires by itself; this spend goes unrecorded
            log.warning("could not settle %s on the state store; its hold will expire", period)

    @property
    def _local_share(self) -> int:
        return self.share * self.policy.replicas

    def use_shared(self) -> bool:
        """Ask the shared store? While it is away, one caller a second probes it; the others go
        straight to the local fallback, so a frozen store costs its deadline once a second,
        not on every request."""
        if self.unavailable_since is None:
            return True
        now = time.monotonic()
        if now < self._next_probe:
            return False
        self._next_probe = now + PROBE_S
        return True

    def fell_back(self, feature: str) -> None:
        now = time.monotonic()
        self._next_probe = now + PROBE_S
        if self.unavailable_since is None:
            self.unavailable_since = now
            log.warning("state store unavailable: %s falls back to local limits", feature)
        self.on_fallback(feature)

    def recovered(self) -> None:
        if self.unavailable_since is not None:
            self.unavailable_since = None
            log.warning("state store is back: limits and budgets are shared again")


@dataclass
class Admission:
    """What one request took and holds; `settle` (once) gives back what it did not use."""

    limiter: Limiter
    request_id: str
    _taken: list[tuple[str, float, float, bool]] = field(default_factory=list)
    _holds: list[tuple[str, bool]] = field(default_factory=list)  # (budget period, shared)
    _tokens: tuple[str, float, float, bool] | None = None
    _settled: bool = False

    async def take(
        self, key: str, cost: float, limit: float, label: str, *, tokens: bool = False
    ) -> None:
        """Take `cost` units; `tokens`: they are the tokens-per-minute hold, settled to usage."""
        allowed, retry, too_large, shared = await self.limiter.take(key, cost, limit)
        if too_large:  # no wait helps; Retry-After still tells a client's retry loop to back off
            raise _limited(f"This request needs more than the key's {label} limit ({limit:g}).", 60)
        if not allowed:
            raise _limited(f"Rate limit reached: {label} ({limit:g}).", retry)
        self._taken.append((key, cost, limit, shared))
        if tokens:
            self._tokens = (key, cost, limit, shared)

    async def reserve(self, name: str, budget: Budget, amount: float, ttl_s: float) -> None:
        allowed, retry, period, shared = await self.limiter.reserve(
            name, budget, amount, ttl_s, self.request_id
        )
        if not allowed:
            raise _limited(f"Budget reached: ${budget.usd:g} per {budget.per} ({name}).", retry)
        self._holds.append((period, shared))

    async def settle(self, usage: Usage, cost: float) -> None:
        """Give back unused tokens and turn the holds into the request's real cost."""
        if self._settled:
            return
        self._settled = True
        if self._tokens is not None:
            key, reserved, limit, shared = self._tokens
            unused = reserved - (usage.prompt + usage.completion)
            if unused > 0:
                await self.limiter.give_back(key, unused, limit, shared)
        for period, shared in self._holds:
            await self.limiter.settle(period, self.request_id, cost, shared)

    async def undo(self) -> None:
        """A refused request: return everything it took, release its holds."""
        for key, cost, limit, shared in self._taken:
            await self.limiter.give_back(key, cost, limit, shared)
        self._tokens = None
        self._taken.clear()
        await self.settle(Usage(), 0.0)


def _budgets(key: Key | None, route: tuple[str, Route]) -> list[tuple[str, Budget]]:
    found = []
    if key is not None and key.budget is not None:
        found.append((f"key:{key.name}", key.budget))
    if route[1].budget is not None:
        found.append((f"route:{route[0]}", route[1].budget))
    return found


def _limited(message: str, retry_after_s: float) -> RateLimited:
    seconds = 1 if not math.isfinite(retry_after_s) else max(1, math.ceil(retry_after_s))
    return RateLimited(message, headers={"retry-after": str(seconds)})
