"""Load shedding: at most `server.max_in_flight` API calls at once per process, the rest
refused at once with 503 `overloaded` and `Retry-After`, before their bodies are read.

Counted are the OpenAI API calls (`POST /v1/…`) from their first byte to the end of their
answer, streams included; health, readiness, metrics and admin calls never wait behind them
and are never refused. `/readyz` says `overloaded` (503) while calls are being refused and for
`HOLD_S` after the last one, so a load balancer can send new work elsewhere; `/livez` stays up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from gateway.context import ASGIApp, Receive, Scope, Send
from gateway.errors import Overloaded

RETRY_AFTER_S = 1
HOLD_S = 1.0  # readiness says overloaded this long after the last refusal
_BODY = Overloaded(
    "The gateway is at capacity; retry after the time in the Retry-After header."
).body()
_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(_BODY)).encode()),
    (b"retry-after", str(RETRY_AFTER_S).encode()),
]


class LoadShedder:
    """Counts the API calls in flight and refuses those beyond `limit` (None: no limit)."""

    def __init__(self, limit: int | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.in_flight = 0
        self.shed = 0  # calls refused since start
        self._clock = clock
        self._last_shed = -HOLD_S

    def overloaded(self) -> bool:
        """At the limit now, or refused a call within the last HOLD_S."""
        if self.limit is None:
            return False
        return self.in_flight >= self.limit or self._clock() - self._last_shed < HOLD_S

    def wrap(self, app: Any, on_shed: Callable[[], None] = lambda: None) -> ASGIApp:
        """`app` behind the limit; `on_shed` is told of every refused call (for metrics)."""
        inner: ASGIApp = app
        if self.limit is None:
            return inner
        limit = self.limit

        async def gated(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http" or not _is_api_call(scope):
                await inner(scope, receive, send)
                return
            if self.in_flight >= limit:
                self.shed += 1
                self._last_shed = self._clock()
                on_shed()
                await send({"type": "http.response.start", "status": 503, "headers": _HEADERS})
                await send({"type": "http.response.body", "body": _BODY})
                return
            self.in_flight += 1
            try:
                await inner(scope, receive, send)
            finally:
                self.in_flight -= 1

        return gated


def _is_api_call(scope: Scope) -> bool:
    return scope.get("method") == "POST" and str(scope.get("path", "")).startswith("/v1/")
