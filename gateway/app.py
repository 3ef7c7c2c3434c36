"""The app factory: wires settings, the gateway state, handlers and error rendering."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
from litestar import Litestar, Request, Response
from litestar.di import Provide
from litestar.exceptions import HTTPException

from gateway import body as bodies
from gateway.context import (
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    context_of,
    with_request_context,
)
from gateway.errors import (
    BadRequest,
    ConnectionGone,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    TurnoutError,
)
from gateway.gateway import Gateway
from gateway.handlers import ROUTES
from gateway.proxy import EDGE, STAGE, proxy
from gateway.settings import Settings

log = logging.getLogger("turnout")


class TurnoutApp:
    """The ASGI app: Litestar wrapped so every answer carries Turnout's headers.

    `gateway` holds the run-time state (records included); its upstream clients are closed
    when the lifespan ends.
    """

    def __init__(self, litestar: Litestar, gateway: Gateway) -> None:
        self.gateway = gateway
        shed = partial(gateway.account_rejected, 503, None, None)
        api = api_fast_path(litestar, gateway)
        self._asgi = with_request_context(gateway.shedder.wrap(api, shed))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            receive = body_deadline(receive, self.gateway.settings.server.receive_timeout_s)
        try:
            await self._asgi(scope, receive, send)
        except Exception as exc:
            if not _connection_gone(exc):
                raise
            # The client left while being answered: no one to tell, nothing to log.


def _connection_gone(exc: BaseException) -> bool:
    """Whether `exc` is, or was caused by, the client's connection closing mid-answer (as
    Litestar and anyio wrap it: a task group's ExceptionGroup, "caught after response
    started")."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, ConnectionGone):
            return True
        if isinstance(item, BaseExceptionGroup):
            todo.extend(item.exceptions)
        if item.__cause__ is not None:
            todo.append(item.__cause__)
    return False


# The OpenAI API calls: the hot path, served past Litestar's router, dependency injection and
# exception middleware (together about a quarter of the CPU of a proxied call, py-spy via
# bench/profile.py) — the same handler (`proxy`) and the same error rendering. Any other path,
# and any other method on these paths (405), goes through Litestar.
API_CALLS = {
    "/v1/chat/completions": bodies.CHAT,
    "/v1/completions": bodies.COMPLETIONS,
    "/v1/embeddings": bodies.EMBEDDINGS,
}


def api_fast_path(litestar: Litestar, gw: Gateway) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = API_CALLS.get(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None or scope["method"] != "POST":
            await litestar(scope, receive, send)  # type: ignore[arg-type]
            return
        scope["app"] = scope["litestar_app"] = litestar  # as Litestar.__call__ sets them
        scope.setdefault("state", {})
        request: Request[Any, Any, Any] = Request(scope, receive, send)  # type: ignore[arg-type]
        try:
            response = await proxy(gw, request, endpoint)
        except Exception as exc:
            response = render_error(gw, request, exc)
        asgi = response.to_asgi_response(app=None, request=request)
        try:
            await asgi(scope, receive, send)  # type: ignore[arg-type]
        except BaseException:
            # Litestar runs a response's background task only after a complete send: a stream
            # whose start could not be sent (the client left) must still be closed — its
            # upstream call, replica slot, admission and record (StreamRelay.close, idempotent).
            if response.background is not None:
                with anyio.CancelScope(shield=True):
                    await response.background()
            raise

    return app


def body_deadline(receive: Receive, seconds: float) -> Receive:
    """`receive`, but the whole request body must have arrived `seconds` after the head did
    (else RequestTimeout: a 408 that closes the connection), so a slow POST cannot hold a
    connection and a handler longer. Once the body is in, `receive` is passed through."""
    deadline = asyncio.get_running_loop().time() + seconds
    complete = False

    async def timed() -> Message:
        nonlocal complete
        if complete:
            return await receive()
        try:
            async with asyncio.timeout_at(deadline):
                message = await receive()
        except TimeoutError:
            raise RequestTimeout(f"The request body did not arrive within {seconds:g} s.") from None
        if message["type"] != "http.request" or not message.get("more_body", False):
            complete = True
        return message

    return timed


def create_app(settings: Settings, environ: Mapping[str, str] | None = None) -> TurnoutApp:
    """An ASGI app serving `settings`, with secrets read from `environ` (default os.environ)."""
    gw = Gateway(settings, dict(os.environ if environ is None else environ))

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        try:
            await gw.start()
            # What start-up made (settings, clients, encoders, compiled routes) lives as long as
            # the process: moved out of the collector's generations, full collections stay short.
            gc.freeze()
            yield
        finally:
            await gw.aclose()

    def provide_gateway() -> Gateway:
        return gw

    app = Litestar(
        route_handlers=ROUTES,
        dependencies={"gw": Provide(provide_gateway, sync_to_thread=False)},
        exception_handlers={Exception: partial(render_error, gw)},
        lifespan=[lifespan],
        # Bodies the handlers read whole (feedback, admin); API calls read theirs in
        # gateway.body within the same limit.
        request_max_body_size=settings.server.max_body_bytes,
        openapi_config=None,
        logging_config=None,
    )
    return TurnoutApp(app, gw)


_HTTP_ERRORS: dict[int, type[TurnoutError]] = {
    400: BadRequest,
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
}


def render_error(gw: Gateway, request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """The one place that turns an exception into an OpenAI-shaped error response. An API call
    refused at the edge, before an exchange recorded it, is counted in the metrics here."""
    error = as_turnout_error(exc)
    if request.state.get(STAGE) == EDGE:
        ctx = context_of(request.scope)  # type: ignore[arg-type]
        gw.account_rejected(error.status, ctx.route, ctx.variant)
    if error.status >= 500 and not isinstance(exc, TurnoutError):
        log.exception("unhandled error", exc_info=exc)
    return Response(
        error.body(),
        status_code=error.status,
        media_type="application/json",
        headers=error.headers,
    )


def as_turnout_error(exc: Exception) -> TurnoutError:
    if isinstance(exc, TurnoutError):
        return exc
    if isinstance(exc, RecursionError):  # a body nested deeper than a decoder can follow
        return BadRequest("The request body is nested too deeply.")
    if isinstance(exc, HTTPException):
        kind = _HTTP_ERRORS.get(exc.status_code)
        if kind is not None:
            return kind(str(exc.detail))
    return TurnoutError("The gateway failed unexpectedly.", code="internal_error")
