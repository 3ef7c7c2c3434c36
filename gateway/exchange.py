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
from gateway.call import Deadline, Opened, open_call, read_body
from gateway.context import Message, RequestContext
from gateway.errors import ClientDisconnected, TurnoutError, UpstreamError
from gateway.estimate import choice_texts, estimate, stream_texts
from gateway.gateway import Gateway, VariantRuntime
from gateway.records import RequestRecord, Usage, token_cost, usage_from
from gateway.relay import StreamRelay

T = TypeVar("T")
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class Exchange:
    """Runs the call, watches for the client leaving, and records what happened exactly once."""

    def __init__(
        self,
        gw: Gateway,
        ctx: RequestContext,
        client: bodies.ClientRequest,
        variant: VariantRuntime,
        sent: dict[str, Any],
        receive: Callable[[], Awaitable[Message]],
    ) -> None:
        self.gw, self.ctx, self.client, self.variant = gw, ctx, client, variant
        self.sent = sent
        self.receive = receive
        self.deadline = Deadline(variant.upstream.timeouts.total)
        self.opened: Opened | None = None

    async def run(self) -> Response[Any]:
        payload = msgspec.json.encode(self.sent)
        if self.client.stream:
            return await self._stream(payload)
        return await self._unary(payload)

    async def _open(self, payload: bytes, *, stream: bool) -> Opened:
        self.opened = await open_call(
            self.variant.upstream, self.client.endpoint, payload, self.deadline, stream=stream
        )
        return self.opened

    async def _unary(self, payload: bytes) -> Response[Any]:
        try:
            body, usage = await self._until_disconnect(self._unary_call(payload))
        except BaseException as exc:
            self._record_failure(exc)
            raise
        cost = token_cost(self.variant.config.price, usage)
        self.ctx.extra_headers.append((b"x-turnout-cost-usd", f"{cost:.8f}".encode()))
        self._record(200, usage, None)
        return Response(body, media_type="application/json", status_code=200)

    async def _unary_call(self, payload: bytes) -> tuple[bytes, Usage]:
        opened = await self._open(payload, stream=False)
        try:
            body = await read_body(opened, self.deadline)
        finally:
            await opened.aclose()
        try:
            parsed = msgspec.json.decode(body)
        except msgspec.DecodeError:
            raise UpstreamError("The upstream answered with something that is not JSON.") from None
        if not isinstance(parsed, dict):
            raise UpstreamError("The upstream answered with JSON that is not an object.")
        usage = usage_from(parsed.get("usage"), self.variant.injected_tokens)
        return body, usage or self._estimate(choice_texts(parsed))

    async def _stream(self, payload: bytes) -> Response[Any]:
        try:
            opened = await self._until_disconnect(self._open(payload, stream=True))
            relay = StreamRelay(
                opened,
                self.deadline,
                client_wants_usage=self.client.include_usage,
                injected=self.variant.injected_tokens,
                on_finish=self._finish_stream,
            )
            await self._until_disconnect(relay.first())
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

    def _finish_stream(self, relay: StreamRelay) -> None:
        ttft = None
        if relay.first_event_at is not None:
            ttft = relay.first_event_at - self.ctx.started
        status = 499 if relay.client_gone else relay.error.status if relay.error else 200
        usage = relay.usage or self._estimate(stream_texts(relay.relayed))
        self._record(status, usage, ttft, error=relay.error)

    async def _until_disconnect(self, work: Awaitable[T]) -> T:
        """Run `work`, cancelling it (and closing the upstream) if the client goes away first.

        The work never outlives this call: if the caller itself is cancelled, so is the work.
        """
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(self._wait_disconnect())
        try:
            await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
                with anyio.CancelScope(shield=True):
                    await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            raise ClientDisconnected("The client closed the connection.")
        return task.result()

    async def _wait_disconnect(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass

    async def _close_opened(self) -> None:
        if self.opened is not None:
            with anyio.CancelScope(shield=True):
                await self.opened.aclose()

    def _estimate(self, completion: Sequence[str]) -> Usage:
        return estimate(self.variant.counter, self.sent, completion, self.variant.injected_tokens)

    def _record_failure(self, exc: BaseException) -> None:
        """An upstream that refused the request used no tokens; a client that left may have."""
        if isinstance(exc, TurnoutError) and not isinstance(exc, ClientDisconnected):
            self._record(exc.status, Usage(), None, error=exc)
        else:
            self._record(499, self._estimate(()), None, error=exc)

    def _record(
        self, status: int, usage: Usage, ttft: float | None, error: BaseException | None = None
    ) -> None:
        elapsed = time.perf_counter() - self.ctx.started
        self.gw.records.add(
            RequestRecord(
                request_id=self.ctx.request_id,
                route=self.client.model,
                variant=self.variant.name,
                upstream=self.variant.upstream.name,
                tuning=self.variant.tuning,
                endpoint=self.client.endpoint,
                stream=self.client.stream,
                status=status,
                started_at=time.time() - elapsed,
                duration_s=elapsed,
                ttft_s=ttft,
                usage=usage,
                cost_usd=token_cost(self.variant.config.price, usage),
                error=type(error).__name__ if error else None,
            )
        )
