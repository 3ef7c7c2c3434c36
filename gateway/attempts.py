"""One request's attempts along its plan: replica choice under circuit breakers, retries within
the retry budget, fallbacks, and Retry-After — all before any byte went to the client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from gateway.call import Deadline
from gateway.errors import BadRequest, UpstreamError
from gateway.gateway import Gateway, VariantRuntime
from gateway.metrics import Outcome
from router.breaker import CircuitBreaker, State
from router.plan import Failure, decide

T = TypeVar("T")
Once = Callable[[VariantRuntime, int], Awaitable[T]]

_OUTCOMES: dict[Failure, Outcome] = {
    Failure.FIRST_BYTE_TIMEOUT: "timeout",
    Failure.SETUP: "rejected",
    Failure.RATE_LIMITED: "rate_limited",
}


class Attempts:
    """Tries the plan's variants in order until one answers, as the failure rules allow.

    `prepare(variant)` readies the request for a variant (it may refuse one, e.g. a token-array
    prompt on a prompted variant: that variant is skipped). `once(variant, replica)` makes one
    call and raises an UpstreamError, tagged with what failed, when it does not succeed.
    """

    def __init__(
        self,
        gw: Gateway,
        route: str,
        plan: list[str],
        deadline: Deadline,
        prepare: Callable[[VariantRuntime], None],
    ) -> None:
        self.gw, self.route, self.plan, self.deadline = gw, route, plan, deadline
        self.prepare = prepare
        self.count = 0
        self._failed: dict[str, set[int]] = {}

    async def run(self, once: Once[T]) -> T:
        budget = self.gw.retry_budget
        budget.begin()
        try:
            return await self._run(once)
        finally:
            budget.end()

    async def _run(self, once: Once[T]) -> T:
        position = 0
        last: UpstreamError | None = None
        while position < len(self.plan) and self.count < self.gw.settings.routing.max_attempts:
            variant = self.gw.variants[self.plan[position]]
            if position and variant.name != self.plan[position - 1] and self.count:
                self.gw.metrics.fallback(self.route)
            try:
                self.prepare(variant)
            except BadRequest:
                if position == 0 and last is None:
                    raise
                position += 1
                continue
            retry = self.count > 0
            if retry and not self.gw.retry_budget.acquire():
                break
            try:
                return await self._attempt(variant, once)
            except UpstreamError as exc:
                last = exc
                decision = decide(exc.failure, exc.stage, billed=variant.upstream.billed)
                if not decision.retry:
                    raise
                if not (decision.same_variant and self._replicas_left(variant)):
                    if await self._wait_retry_after(exc, position):
                        continue
                    position += 1
            finally:
                if retry:
                    self.gw.retry_budget.release()
        if last is None:
            raise UpstreamError("No upstream could be tried for this model.")
        raise last

    async def _attempt(self, variant: VariantRuntime, once: Once[T]) -> T:
        replica, breaker = self._pick(variant)
        self.count += 1
        try:
            result = await once(variant, replica)
        except UpstreamError as exc:
            self._failed.setdefault(variant.name, set()).add(replica)
            decision = decide(exc.failure, exc.stage, billed=variant.upstream.billed)
            if decision.breaker_failure:
                breaker.failure(time.monotonic())
            else:
                breaker.release(time.monotonic())
            self.gw.metrics.attempt(variant.upstream.name, _OUTCOMES.get(exc.failure, "error"))
            self._publish_circuit(variant)
            raise
        except BaseException:
            breaker.release(time.monotonic())
            self.gw.metrics.attempt(variant.upstream.name, "client_closed")
            raise
        breaker.success(time.monotonic())
        self.gw.metrics.attempt(variant.upstream.name, "ok")
        self._publish_circuit(variant)
        return result

    def _pick(self, variant: VariantRuntime) -> tuple[int, CircuitBreaker]:
        """A replica whose circuit lets this attempt through; if none does, the plan already
        chose to try this variant anyway, so the least-loaded replica goes."""
        upstream, board, now = variant.upstream, self.gw.breakers, time.monotonic()
        exclude = set(self._failed.get(variant.name, ()))
        exclude |= {i for i in range(len(upstream.roots)) if board.is_open(variant.name, i, now)}
        for _ in upstream.roots:
            replica = upstream.acquire(variant.adapter, exclude=exclude)
            breaker = board.breaker(variant.name, replica)
            if breaker.state(now) is not State.HALF_OPEN or breaker.allow(now):
                return replica, breaker
            upstream.release(replica)  # its half-open probes are all out: look elsewhere
            exclude.add(replica)
        replica = upstream.acquire(variant.adapter)
        return replica, board.breaker(variant.name, replica)

    def _replicas_left(self, variant: VariantRuntime) -> bool:
        failed = self._failed.get(variant.name, set())
        return len(failed) < len(variant.upstream.roots)

    async def _wait_retry_after(self, exc: UpstreamError, position: int) -> bool:
        """With no other variant to try, wait out a short Retry-After if the deadline allows."""
        wait = exc.retry_after
        if wait is None or position + 1 < len(self.plan) or wait >= self.deadline.left() - 0.5:
            return False
        await asyncio.sleep(max(wait, 0.0))
        self._failed.clear()
        return True

    def _publish_circuit(self, variant: VariantRuntime) -> None:
        available = self.gw.breakers.variant_available(
            variant.name, len(variant.upstream.roots), time.monotonic()
        )
        self.gw.metrics.circuit(variant.name, not available)
