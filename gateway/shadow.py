"""Shadow traffic: sampled copies of requests sent to a route's shadow variant, off the response
path, compared with the primary's answer and recorded, never returned."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from gateway import body as bodies
from gateway.call import Deadline, Opened, open_call, read_body
from gateway.errors import TurnoutError, UpstreamError
from gateway.estimate import choice_texts, estimate, prompt_tokens
from gateway.records import Latency, RequestRecord, Usage, prompt_tax, usage_from
from gateway.settings import Route
from router.compare import Comparison, compare

if TYPE_CHECKING:
    from gateway.gateway import Gateway, VariantRuntime

log = logging.getLogger("turnout")
SHADOWED_ENDPOINTS = frozenset({bodies.CHAT, bodies.COMPLETIONS})
_STREAM_FIELDS = ("stream", "stream_options")


@dataclass
class _Job:
    """One shadow call: what to send, and what it is compared with."""

    route: str
    variant: VariantRuntime
    primary: RequestRecord
    primary_text: str
    client: bodies.ClientRequest
    started: float = field(default_factory=time.perf_counter)
    arrived: float = field(default_factory=time.time)
    sent_at: float | None = None
    done_at: float | None = None
    opened: Opened | None = None


class ShadowRunner:
    """Runs shadow calls in background tasks, at most `concurrency` at once.

    A submission that finds every slot taken is dropped (and counted in `dropped`): shadows
    never wait, so they can never slow or starve real traffic. Shadows are never retried and
    never touch a client's rate limit or budget; their cost is in their own record.
    """

    def __init__(self, gw: Gateway, concurrency: int) -> None:
        self._gw = gw
        self._limit = concurrency
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.dropped = 0

    @property
    def running(self) -> int:
        """Shadow calls in flight."""
        return len(self._tasks)

    def maybe_submit(
        self,
        route_name: str,
        route: Route,
        primary_record: RequestRecord,
        primary_text: str,
        client_body: dict[str, Any],
        endpoint: str,
        rand: float,
    ) -> bool:
        """Schedule a shadow of a successful primary when the route has one and `rand` (uniform
        in [0, 1)) falls under its fraction; True when scheduled. Cheap and synchronous.

        `primary_text` is the primary's answer ("".join of its choice or stream texts);
        `client_body` the client's body as received (it is copied here, not later). Only chat
        and text completions are shadowed: embeddings have no answer to compare.
        """
        shadow = route.shadow
        if shadow is None or self._closed or not rand < shadow.fraction:
            return False
        if primary_record.status != 200 or endpoint not in SHADOWED_ENDPOINTS:
            return False
        if len(self._tasks) >= self._limit:
            self.dropped += 1
            return False
        body = {k: v for k, v in client_body.items() if k not in _STREAM_FIELDS}
        client = bodies.ClientRequest(
            endpoint=endpoint,
            body=body,
            model=route_name,
            stream=False,
            include_usage=False,
            user=body.get("user") if isinstance(body.get("user"), str) else None,
        )
        variant = self._gw.variants[shadow.variant]
        job = _Job(route_name, variant, primary_record, primary_text, client)
        task = asyncio.get_running_loop().create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def drain(self) -> None:
        """Wait until every shadow in flight, and any it was waiting on, has been recorded."""
        while pending := [task for task in self._tasks if not task.done()]:
            await asyncio.wait(pending)

    async def aclose(self) -> None:
        """Cancel the shadows in flight and refuse new ones."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, job: _Job) -> None:
        try:
            await self._shadow(job)
        except Exception:  # a bug here must not surface as an unretrieved task exception
            log.exception("shadow of request %s failed unexpectedly", job.primary.request_id)

    async def _shadow(self, job: _Job) -> None:
        sent: dict[str, Any] = {}
        try:
            sent = _shape(job.client, job.variant)
            answer = await self._call(job, sent)
        except Exception as exc:
            if not isinstance(exc, TurnoutError):
                log.exception("shadow of request %s failed", job.primary.request_id)
            status = exc.status if isinstance(exc, TurnoutError) else 500
            self._finish(job, status, Usage(), None, None, sent, exc)
            return
        texts = choice_texts(answer)
        usage = usage_from(answer.get("usage"), job.variant.injected_tokens)
        if usage is None:
            counter = job.variant.counter
            prompt = prompt_tokens(counter, sent)
            usage = estimate(counter, prompt, texts, job.variant.injected_tokens)
        comparison = compare(job.primary_text, "".join(texts))
        self._finish(job, 200, usage, answer, comparison, sent, None)

    async def _call(self, job: _Job, sent: dict[str, Any]) -> dict[str, Any]:
        """One non-streaming call, never retried; the parsed JSON object it answered."""
        upstream = job.variant.upstream
        deadline = Deadline(upstream.timeouts.total)
        job.sent_at = time.perf_counter()
        payload = msgspec.json.encode(sent)
        replica = upstream.acquire(job.variant.adapter)  # open_call releases it on failure
        job.opened = await open_call(
            upstream, replica, job.client.endpoint, payload, deadline, stream=False
        )
        try:
            raw = await read_body(job.opened, deadline)
        finally:
            with anyio.CancelScope(shield=True):
                await job.opened.aclose()
        job.done_at = time.perf_counter()
        try:
            answer = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            raise UpstreamError("The shadow upstream answered with something not JSON.") from None
        if not isinstance(answer, dict):
            raise UpstreamError("The shadow upstream answered with JSON that is not an object.")
        return answer

    def _finish(
        self,
        job: _Job,
        status: int,
        usage: Usage,
        answer: Any,
        comparison: Comparison | None,
        sent: dict[str, Any],
        error: BaseException | None,
    ) -> None:
        now = time.perf_counter()
        gw, variant = self._gw, job.variant
        replica = job.opened.replica if job.opened is not None else None
        span = (job.sent_at or job.started, job.done_at or now)
        record = RequestRecord(
            request_id=job.primary.request_id + "-shadow",
            time=job.arrived,
            route=job.route,
            variant=variant.name,
            upstream=variant.upstream.name,
            replica=replica,
            tuning=variant.tuning,
            endpoint=job.client.endpoint,
            stream=False,
            status=status,
            latency=_latency(job, now),
            usage=usage,
            cost_usd=gw.cost(variant, replica, usage, span),
            prompt_tax_usd=prompt_tax(variant.config.price, usage),
            error=type(error).__name__ if error else None,
            shadow_of=job.primary.request_id,
            content={"request": sent, "response": answer} if gw.settings.records.content else None,
            comparison=comparison.as_dict() if comparison else {"agreement": "error"},
        )
        gw.account(record)
        gw.metrics.shadowed(job.route, comparison.agreement if comparison else "error")


def _latency(job: _Job, now: float) -> Latency:
    total = now - job.started
    upstream = 0.0 if job.sent_at is None else (job.done_at or now) - job.sent_at
    return Latency(total=total, upstream=upstream, overhead=max(total - upstream, 0.0))


def _shape(client: bodies.ClientRequest, variant: VariantRuntime) -> dict[str, Any]:
    # gateway.shaping imports gateway.gateway, which imports this module: import at call time.
    from gateway.shaping import shape

    return shape(client, variant)
