"""The request flow of DESIGN.md: auth, body, route, variant, shape, call, relay, account."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import msgspec
from litestar import Request, Response
from litestar.background_tasks import BackgroundTask
from litestar.response import Stream

from gateway import body as bodies
from gateway.auth import may_call
from gateway.call import Deadline, Opened, open_call, read_body
from gateway.context import RequestContext, context_of
from gateway.errors import (
    BadRequest,
    ClientDisconnected,
    ModelNotFound,
    TurnoutError,
    UpstreamError,
)
from gateway.gateway import Gateway, VariantRuntime
from gateway.records import RequestRecord, Usage, token_cost, usage_from
from gateway.relay import StreamRelay
from router.selection import choose_variant, sticky_subject
from router.shaping import PromptShapeError, shape_chat_messages, shape_completion

T = TypeVar("T")
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


async def proxy(gw: Gateway, request: Request[Any, Any, Any], endpoint: str) -> Response[Any]:
    """Handle one OpenAI API call end to end."""
    ctx = context_of(request.scope)  # type: ignore[arg-type]
    key = gw.keys.authenticate(request.headers.get("authorization"))
    raw = await bodies.read_limited(
        request.stream(), request.headers.get("content-length"), gw.settings.server.max_body_bytes
    )
    client = bodies.parse(endpoint, raw)
    route = gw.route(client.model)
    if route is None or not may_call(key, client.model):
        raise ModelNotFound(client.model)
    ctx.route = client.model
    subject = sticky_subject(
        route.sticky,
        user=client.user,
        key_name=key.name if key else None,
        headers=request.headers,
    )
    name = choose_variant(client.model, list(route.split.items()), subject, gw.rand.random)
    ctx.variant = name
    variant = gw.variants[name]
    payload = msgspec.json.encode(shape(client, variant))
    call = Call(gw, ctx, client, variant, request)
    if client.stream:
        return await call.stream(payload)
    return await call.unary(payload)


def shape(client: bodies.ClientRequest, variant: VariantRuntime) -> dict[str, Any]:
    """The body sent upstream: the client's, with the variant's model and prompt applied."""
    body = dict(client.body)
    body["model"] = variant.config.model
    if client.stream:
        options = body.get("stream_options")
        body["stream_options"] = {**(options if isinstance(options, dict) else {})}
        body["stream_options"]["include_usage"] = True
    else:
        body.pop("stream_options", None)
    if not (variant.system or variant.examples):
        return body
    if client.endpoint == bodies.CHAT:
        body["messages"] = shape_chat_messages(body["messages"], variant.system, variant.examples)
    elif client.endpoint == bodies.COMPLETIONS:
        try:
            body["prompt"] = shape_completion(body["prompt"], variant.system, variant.examples)
        except PromptShapeError as exc:
            raise BadRequest(str(exc), param="prompt") from None
    return body


class Call:
    """One client request's call to its variant's upstream, with accounting when it ends."""

    def __init__(
        self,
        gw: Gateway,
        ctx: RequestContext,
        client: bodies.ClientRequest,
        variant: VariantRuntime,
        request: Request[Any, Any, Any],
    ) -> None:
        self.gw, self.ctx, self.client, self.variant, self.request = (
            gw,
            ctx,
            client,
            variant,
            request,
        )
        self.deadline = Deadline(variant.upstream.timeouts.total)
        self.path = client.endpoint

    async def unary(self, payload: bytes) -> Response[Any]:
        try:
            body, usage = await self._until_disconnect(self._unary(payload))
        except TurnoutError as exc:
            self._record(exc.status, None, None, error=exc)
            raise
        cost = token_cost(self.variant.config.price, usage) if usage else 0.0
        self.ctx.extra_headers.append((b"x-turnout-cost-usd", f"{cost:.8f}".encode()))
        self._record(200, usage, None)
        return Response(body, media_type="application/json", status_code=200)

    async def _unary(self, payload: bytes) -> tuple[bytes, Usage | None]:
        opened = await open_call(
            self.variant.upstream, self.path, payload, self.deadline, stream=False
        )
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
        return body, usage_from(parsed.get("usage"), self.variant.injected_tokens)

    async def stream(self, payload: bytes) -> Response[Any]:
        opened: Opened | None = None
        try:
            opened = await self._until_disconnect(
                open_call(self.variant.upstream, self.path, payload, self.deadline, stream=True)
            )
            relay = StreamRelay(
                opened,
                self.deadline,
                client_wants_usage=self.client.include_usage,
                injected=self.variant.injected_tokens,
                on_finish=self._finish_stream,
            )
            await self._until_disconnect(relay.first())
        except BaseException as exc:
            if opened is not None:
                await opened.aclose()
            status = exc.status if isinstance(exc, TurnoutError) else 499
            self._record(status, None, None, error=exc if isinstance(exc, TurnoutError) else None)
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
        self._record(status, relay.usage, ttft, error=relay.error)

    async def _until_disconnect(self, work: Awaitable[T]) -> T:
        """Run `work`, cancelling it (and closing the upstream) if the client goes away first."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_wait_disconnect(self.request))
        try:
            await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise ClientDisconnected("The client closed the connection.")
        return task.result()

    def _record(
        self,
        status: int,
        usage: Usage | None,
        ttft: float | None,
        error: BaseException | None = None,
    ) -> None:
        usage = usage or Usage(estimated=True)
        self.gw.records.add(
            RequestRecord(
                request_id=self.ctx.request_id,
                route=self.client.model,
                variant=self.variant.name,
                upstream=self.variant.upstream.name,
                tuning=self.variant.tuning,
                endpoint=self.path,
                stream=self.client.stream,
                status=status,
                started_at=time.time() - (time.perf_counter() - self.ctx.started),
                duration_s=time.perf_counter() - self.ctx.started,
                ttft_s=ttft,
                usage=usage,
                cost_usd=token_cost(self.variant.config.price, usage),
                error=type(error).__name__ if error else None,
            )
        )


async def _wait_disconnect(request: Request[Any, Any, Any]) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
