"""One client request's exchange with its variant's upstream, unary or streamed, and its record."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import anyio
import msgspec
from litestar import Response
from litestar.background_tasks import BackgroundTask
from litestar.response import Stream

from gateway import body as bodies
from gateway.attempts import Attempts
from gateway.call import Deadline, Opened, open_call, read_body
from gateway.context import Message, RequestContext
from gateway.errors import ClientDisconnected, TurnoutError, UpstreamError
from gateway.estimate import choice_texts, estimate, prompt_tokens, stream_texts
from gateway.gateway import Gateway, VariantRuntime
from gateway.limits import Admission
from gateway.records import Latency, RequestRecord, Usage, prompt_tax, usage_from
from gateway.relay import StreamRelay
from gateway.settings import Key
from gateway.shaping import shape
from router.plan import Failure, Stage

T = TypeVar("T")
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class Exchange:
    """Runs the call, watches for the client leaving, and records what happened exactly once."""

    def __init__(
        self,
        gw: Gateway,
        ctx: RequestContext,
        client: bodies.ClientRequest,
        plan: list[str],
        receive: Callable[[], Awaitable[Message]],
        key: Key | None = None,
    ) -> None:
        """`plan`: the variants to try in order (the chosen one first). The first is shaped
        now, so that a request it cannot take fails here, before anything is recorded."""
        self.gw, self.ctx, self.client = gw, ctx, client
        self.variant = gw.variants[plan[0]]
        self.sent = shape(client, self.variant)
        ctx.variant = self.variant.name
        self.receive = receive
        self.key = key
        self.admission: Admission | None = None
        self.deadline = Deadline(self.variant.upstream.timeouts.total)
        self.attempts = Attempts(gw, client.model, plan, self.deadline, self._prepare)
        self.opened: Opened | None = None
        self.sent_at: float | None = None  # perf_counter when the upstream call began
        self.upstream_done_at: float | None = None
        self._own_tokens: int | None = None  # the client's prompt, encoded at most once

    @property
    def prompt_estimate(self) -> int:
        """Prompt tokens before the call, for limits: the client's own text, encoded once, plus
        the variant's injected prompt, counted once at start."""
        if self._own_tokens is None:
            self._own_tokens = prompt_tokens(self.variant.counter, self.client.body)
        return self._own_tokens + self.variant.injected_tokens

    def _prepare(self, variant: VariantRuntime) -> None:
        """Make `variant` the one called next (a fallback gets its own shaping)."""
        if variant is not self.variant:
            self.sent = shape(self.client, variant)
            self.variant = variant
            self.ctx.variant = variant.name

    async def run(self) -> Response[Any]:
        await self._admit()
        if self.client.stream:
            return await self._stream()
        return await self._unary()

    async def _admit(self) -> None:
        """Rate limits and budgets (429 over a limit), held until the request is recorded."""
        route = self.gw.route(self.client.model)
        if route is None or not self.gw.limiter.applies(self.key, route):
            return
        body = self.client.body
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if max_tokens is not None:
            max_tokens *= body.get("n") or 1
        try:
            prices = [self.gw.variants[v].config.price for v in self.attempts.plan]
            self.admission = await self.gw.limiter.admit(
                self.key,
                (self.client.model, route),
                (lambda: self.prompt_estimate, max_tokens, prices),
                self.deadline.total_s,
            )
        except TurnoutError as exc:
            self._record(exc.status, Usage(), error=exc)
            raise

    async def _open(self, variant: VariantRuntime, replica: int, *, stream: bool) -> Opened:
        self.opened = None  # an earlier attempt's call is closed; it must not be reported
        self.sent_at = time.perf_counter()
        self.opened = await open_call(
            variant.upstream,
            replica,
            self.client.endpoint,
            msgspec.json.encode(self.sent),
            self.deadline,
            stream=stream,
        )
        return self.opened

    async def _unary(self) -> Response[Any]:
        try:
            body, usage, answer = await self._until_disconnect(self.attempts.run(self._unary_call))
        except BaseException as exc:
            self._record_failure(exc)
            raise
        record = self._record(200, usage, answer=answer)
        self.ctx.extra_headers.append((b"x-turnout-cost-usd", f"{record.cost_usd:.8f}".encode()))
        self._shadow(record, lambda: choice_texts(answer))
        return Response(body, media_type="application/json", status_code=200)

    async def _unary_call(self, variant: VariantRuntime, replica: int) -> tuple[bytes, Usage, Any]:
        opened = await self._open(variant, replica, stream=False)
        try:
            body = await read_body(opened, self.deadline)
        finally:
            await opened.aclose()
        self.upstream_done_at = time.perf_counter()
        try:
            parsed = msgspec.json.decode(body)
        except msgspec.DecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            garbage = UpstreamError(
                "The upstream answered with something that is not a JSON object."
            )
            raise garbage.tagged(Failure.BROKEN, Stage.MAYBE_ACCEPTED)
        usage = usage_from(parsed.get("usage"), self.variant.injected_tokens)
        return body, usage or self._estimate(choice_texts(parsed)), parsed

    async def _stream(self) -> Response[Any]:
        try:
            relay = await self._until_disconnect(self.attempts.run(self._stream_call))
        except BaseException as exc:
            await self._close_opened()
            self._record_failure(exc)
            raise
        return Stream(
            relay,
            media_type="text/event-stream",
            headers=SSE_HEADERS,
            background=BackgroundTask(relay.close),
        )

    async def _stream_call(self, variant: VariantRuntime, replica: int) -> StreamRelay:
        """Open the stream and wait for its first event; until then a failure may be retried."""
        opened = await self._open(variant, replica, stream=True)
        relay = StreamRelay(
            opened,
            self.deadline,
            client_wants_usage=self.client.include_usage,
            injected=variant.injected_tokens,
            on_finish=self._finish_stream,
            cost_of=self._cost_now,
        )
        try:
            await relay.first()
        except BaseException:
            await self._close_opened()
            raise
        return relay

    def _finish_stream(self, relay: StreamRelay) -> None:
        self.upstream_done_at = relay.last_event_at or time.perf_counter()
        status = 499 if relay.client_gone else relay.error.status if relay.error else 200
        usage = relay.usage or self._estimate(stream_texts(relay.relayed))
        answer = stream_texts(relay.relayed) if self.gw.settings.records.content else None
        record = self._record(
            status,
            usage,
            error=relay.error,
            first_event_at=relay.first_event_at,
            answer=answer,
        )
        self._shadow(record, lambda: stream_texts(relay.relayed))

    def _shadow(self, record: RequestRecord, texts: Callable[[], list[str]]) -> None:
        """Offer a sampled copy to the route's shadow variant (it runs off the response path)."""
        route = self.gw.route(self.client.model)
        if route is None or route.shadow is None or record.status != 200 or record.forced:
            return
        self.gw.shadows.maybe_submit(
            self.client.model,
            route,
            record,
            "".join(texts()),
            self.client.body,
            self.client.endpoint,
            self.gw.rand.random(),
        )

    async def _until_disconnect(self, work: Awaitable[T]) -> T:
        """Await `work` in this task, cancelling it (and so closing the upstream) if the client
        goes away first: a watcher task waits for the disconnect and cancels this one. One task
        per request instead of two and an `asyncio.wait`."""
        current = asyncio.current_task()
        assert current is not None
        gone, waiting = False, True

        def on_watched(watcher: asyncio.Task[None]) -> None:
            nonlocal gone
            if watcher.cancelled():
                return
            if watcher.exception() is None and waiting:  # (read even when late: no warning)
                gone = True
                current.cancel()

        watcher = asyncio.ensure_future(self._wait_disconnect())
        watcher.add_done_callback(on_watched)
        try:
            return await work
        except asyncio.CancelledError:
            if gone and current.uncancel() == 0:  # our own cancel, and no one else's
                raise ClientDisconnected("The client closed the connection.") from None
            raise
        finally:
            waiting = False  # a callback already scheduled must not cancel what follows
            watcher.cancel()

    async def _wait_disconnect(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass

    async def _close_opened(self) -> None:
        if self.opened is not None:
            with anyio.CancelScope(shield=True):
                await self.opened.aclose()

    def _estimate(self, completion: Sequence[str]) -> Usage:
        """Usage counted with tiktoken: the prompt as sent upstream, the completion relayed."""
        prompt = prompt_tokens(self.variant.counter, self.sent)
        return estimate(self.variant.counter, prompt, completion, self.variant.injected_tokens)

    def _cost_now(self, usage: Usage) -> float:
        """The request's cost if it ended now (for the usage object of a stream)."""
        span = self._span(time.perf_counter())
        return self.gw.cost(self.variant, self._replica(), usage, span, settle=False)

    def _replica(self) -> int | None:
        return self.opened.replica if self.opened is not None else None

    def _gpu_span(self, now: float) -> tuple[float, float]:
        """The time the upstream worked on this request: until its last byte, not the client's."""
        return self._span(self.upstream_done_at or now)

    def _span(self, end: float) -> tuple[float, float]:
        return (self.sent_at if self.sent_at is not None else self.ctx.started, end)

    def _record_failure(self, exc: BaseException) -> None:
        """An upstream that refused the request used no tokens; a client that left may have."""
        if isinstance(exc, TurnoutError) and not isinstance(exc, ClientDisconnected):
            self._record(exc.status, Usage(), error=exc)
        else:
            self._record(499, self._estimate(()), error=exc)

    def _record(
        self,
        status: int,
        usage: Usage,
        *,
        error: BaseException | None = None,
        first_event_at: float | None = None,
        answer: Any = None,
    ) -> RequestRecord:
        now = time.perf_counter()
        price = self.variant.config.price
        record = RequestRecord(
            request_id=self.ctx.request_id,
            time=time.time() - (now - self.ctx.started),
            key=self.key.name if self.key else None,
            route=self.client.model,
            variant=self.variant.name,
            upstream=self.variant.upstream.name,
            replica=self._replica(),
            tuning=self.variant.tuning,
            endpoint=self.client.endpoint,
            stream=self.client.stream,
            status=status,
            latency=self._latency(now, usage, first_event_at),
            usage=usage,
            cost_usd=self.gw.cost(self.variant, self._replica(), usage, self._gpu_span(now)),
            prompt_tax_usd=prompt_tax(price, usage),
            error=type(error).__name__ if error else None,
            attempts=self.attempts.count,
            forced=self.ctx.forced,
            content=self._content(answer),
        )
        self.gw.account(record)
        if self.admission is not None:
            self.gw.spawn(self.admission.settle(usage, record.cost_usd))
        return record

    def _latency(self, now: float, usage: Usage, first_event_at: float | None) -> Latency:
        total = now - self.ctx.started
        upstream = 0.0
        if self.sent_at is not None:
            upstream = (self.upstream_done_at or now) - self.sent_at
        latency = Latency(total=total, upstream=upstream, overhead=max(total - upstream, 0.0))
        if first_event_at is not None:
            latency.ttft = first_event_at - self.ctx.started
            if usage.completion >= 2 and self.upstream_done_at is not None:
                latency.tpot = (self.upstream_done_at - first_event_at) / (usage.completion - 1)
        return latency

    def _content(self, answer: Any) -> dict[str, object] | None:
        if not self.gw.settings.records.content:
            return None
        return {"request": self.sent, "response": answer}
