"""The app factory: wires settings, the gateway state, handlers and error rendering."""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from litestar import Litestar, Request, Response
from litestar.di import Provide
from litestar.exceptions import HTTPException

from gateway.context import Receive, Scope, Send, context_of, with_request_context
from gateway.errors import (
    BadRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    TurnoutError,
)
from gateway.gateway import Gateway
from gateway.handlers import ROUTES
from gateway.proxy import EDGE, STAGE
from gateway.settings import Settings

log = logging.getLogger("turnout")


class TurnoutApp:
    """The ASGI app: Litestar wrapped so every answer carries Turnout's headers.

    `gateway` holds the run-time state (records included); its upstream clients are closed
    when the lifespan ends.
    """

    def __init__(self, litestar: Litestar, gateway: Gateway) -> None:
        self.gateway = gateway
        self._asgi = with_request_context(litestar)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._asgi(scope, receive, send)


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
        request_max_body_size=None,
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
    if isinstance(exc, HTTPException):
        kind = _HTTP_ERRORS.get(exc.status_code)
        if kind is not None:
            return kind(str(exc.detail))
    return TurnoutError("The gateway failed unexpectedly.", code="internal_error")
