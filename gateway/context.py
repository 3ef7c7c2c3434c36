"""Per-request context and the ASGI wrapper that stamps `x-request-id` and `x-turnout-*` headers."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SCOPE_KEY = "turnout"
_MAX_ID = 128


@dataclass
class RequestContext:
    """What is known about a request so far; headers are taken from it when the response starts."""

    request_id: str
    started: float = field(default_factory=time.perf_counter)
    route: str | None = None
    variant: str | None = None
    forced: bool = False  # the admin chose the variant (x-turnout-variant): kept out of reports
    extra_headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def headers(self) -> list[tuple[bytes, bytes]]:
        out = [(b"x-request-id", self.request_id.encode())]
        if self.route is not None:
            out.append((b"x-turnout-route", self.route.encode()))
        if self.variant is not None:
            out.append((b"x-turnout-variant", self.variant.encode()))
        return out + self.extra_headers


def context_of(scope: Scope) -> RequestContext:
    """The context the wrapper made (or a fresh one when the app runs unwrapped)."""
    ctx = scope.get(SCOPE_KEY)
    if not isinstance(ctx, RequestContext):
        ctx = scope[SCOPE_KEY] = RequestContext(request_id=_new_id())
    return ctx


def client_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text: str = value.decode("latin-1")
            if 0 < len(text) <= _MAX_ID and text.isascii() and text.isprintable():
                return text
            return None
    return None


def one_authorization(scope: Scope) -> None:
    """Several Authorization headers become one, their values joined by ", " (as HTTP allows
    for list fields; Authorization is none, so the result is no valid credential): a request
    whose credentials are ambiguous gets 401/403, never whichever header a reader takes first
    (a proxy in front may check a different one)."""
    headers = scope.get("headers", ())
    values = [value for name, value in headers if name == b"authorization"]
    if len(values) > 1:
        kept = [(name, value) for name, value in headers if name != b"authorization"]
        scope["headers"] = [*kept, (b"authorization", b", ".join(values))]


def _new_id() -> str:
    return "req_" + os.urandom(16).hex()  # as unique as uuid4().hex, without the UUID object


def with_request_context(app: Any) -> ASGIApp:
    """Wrap the whole app so that every HTTP answer, router 404s included, carries the headers."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        ctx = RequestContext(request_id=client_request_id(scope) or _new_id())
        scope[SCOPE_KEY] = ctx
        one_authorization(scope)

        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v) for k, v in message.get("headers", ()) if not k.startswith(b"x-turnout-")
                ]
                message["headers"] = headers + ctx.headers()
            await send(message)

        await app(scope, receive, stamped)

    return wrapped
