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
from router.breaker import CircuitBreaker
from router.plan import Failure, Stage, decide

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
    `count` is the number of upstream calls made.
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
        self._last_variant: str | None = None

    async def run(self, once: Once[T]) -> T:
        budget = self.gw.retry_budget
        budget.begin()
        try:
            return await self._run(once)
        finally:
            budget.end()

    async def _run(self, once: Once[T]) -> T:
        position, last = 0, None
        while position < len(self.plan) and self._may_try():
            variant = self.gw.variants[self.plan[position]]
            retry = self.count > 0
            if retry and not self.gw.retry_budget.acquire():
                break
            wait = None
            try:
                self.prepare(variant)
                return await self._attempt(variant, once, last_resort=self._last_resort(position))
            except BadRequest:
                if position == 0 and last is None:
                    raise
                position += 1  # this fallback cannot take the request
            except UpstreamError as exc:
                last = exc
                decision = decide(exc.failure, exc.stage, billed=variant.upstream.billed)
                if not exc.verdict:
                    position += 1  # nothing was sent: look further down the plan
                elif not decision.retry:
                    raise
                elif not (decision.same_variant and self._replicas_left(variant)):
                    wait = self._retry_after_wait(exc, position, holding=retry)
                    position += 0 if wait is not None else 1
            finally:
                if retry:
                    self.gw.retry_budget.release()
            if wait is not None:
                await asyncio.sleep(wait)
                self._failed.clear()
        if last is None:
            raise UpstreamError("No upstream could be tried for this model.")
        raise last

    def _may_try(self) -> bool:
        return self.count < self.gw.settings.routing.max_attempts and self.deadline.left() > 0

    async def _attempt(self, variant: VariantRuntime, once: Once[T], *, last_resort: bool) -> T:
        replica, breaker = self._pick(variant, last_resort)
        if self._last_variant is not None and self._last_variant != variant.name:
            self.gw.metrics.fallback(self.route)
        self._last_variant = variant.name
        self.count += 1
        try:
            result = await once(variant, replica)
        except UpstreamError as exc:
            self._failed.setdefault(variant.name, set()).add(replica)
            self._judge(variant, breaker, exc)
            raise
        except BaseException:
            breaker.release(time.monotonic())
            self.gw.metrics.attempt(variant.upstream.name, "client_closed")
            raise
        breaker.success(time.monotonic())
        self.gw.metrics.attempt(variant.upstream.name, "ok")
        self._publish_circuit(variant)
        return result

    def _judge(self, variant: VariantRuntime, breaker: CircuitBreaker, exc: UpstreamError) -> None:
        """Count a failed attempt against its circuit when the failure was the upstream's."""
        now = time.monotonic()
        if not exc.verdict:
            self.count -= 1  # it never reached the upstream
            breaker.release(now)
            return
        if decide(exc.failure, exc.stage, billed=variant.upstream.billed).breaker_failure:
            breaker.failure(now)
        else:
            breaker.release(now)
        self.gw.metrics.attempt(variant.upstream.name, _OUTCOMES.get(exc.failure, "error"))
        self._publish_circuit(variant)

    def _pick(self, variant: VariantRuntime, last_resort: bool) -> tuple[int, CircuitBreaker]:
        """A replica whose circuit admits this attempt (reserving a half-open probe). With none,
        the plan moves on — unless nothing later in it could do better: then any replica."""
        upstream, board, now = variant.upstream, self.gw.breakers, time.monotonic()
        exclude = set(self._failed.get(variant.name, ()))
        exclude |= {i for i in range(len(upstream.roots)) if not board.admits(variant.name, i, now)}
        if len(exclude) >= len(upstream.roots) and not last_resort:
            refused = UpstreamError("Every replica of this variant is failing.")
            raise refused.tagged(Failure.CONNECT, Stage.NOT_SENT, verdict=False)
        replica = upstream.acquire(variant.adapter, exclude=exclude)
        breaker = board.breaker(variant.name, replica)
        breaker.allow(now)
        return replica, breaker

    def _last_resort(self, position: int) -> bool:
        now = time.monotonic()
        return not any(self.gw.available(v, now) for v in self.plan[position + 1 :])

    def _replicas_left(self, variant: VariantRuntime) -> bool:
        failed = self._failed.get(variant.name, set())
        return len(failed) < len(variant.upstream.roots)

    def _retry_after_wait(
        self, exc: UpstreamError, position: int, *, holding: bool
    ) -> float | None:
        """With no other variant to try, wait out a Retry-After that fits the deadline — and
        only when another attempt could follow it (attempts and a retry slot left; the slot
        this attempt holds is given back before the wait)."""
        wait = exc.retry_after
        if wait is None or position + 1 < len(self.plan) or wait >= self.deadline.left() - 0.5:
            return None
        budget = self.gw.retry_budget
        in_flight = budget.retries_in_flight - (1 if holding else 0)
        if self.count >= self.gw.settings.routing.max_attempts or in_flight >= budget.limit:
            return None
        if budget.balance < 1:  # the retry after the wait would be refused: do not wait for it
            return None
        return max(wait, 0.0)

    def _publish_circuit(self, variant: VariantRuntime) -> None:
        self.gw.metrics.circuit(variant.name, not self.gw.available(variant.name, time.monotonic()))
