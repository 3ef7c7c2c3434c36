"""The app factory uvicorn workers import: settings from the file named in TURNOUT_CONFIG."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from gateway.app import TurnoutApp, create_app
from gateway.config_check import load_settings
from gateway.errors import ConnectionGone, HeadersTooLarge, RequestTimeout, TurnoutError
from gateway.metrics import MULTIPROC_ENV
from gateway.settings import Server

CONFIG_ENV = "TURNOUT_CONFIG"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging() -> None:
    """Plain timestamped lines on stderr for Turnout's own loggers (every worker calls this)."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    # One line per upstream call would flood the log and cost time on every request.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def app_from_env() -> TurnoutApp:
    configure_logging()
    settings = load_settings(os.environ[CONFIG_ENV], os.environ)
    ConnectionGuard.limits = settings.server  # this worker's connections, from now on
    logging.getLogger("turnout").info(
        "serving routes %s over upstreams %s (pid %d)",
        ", ".join(settings.routes),
        ", ".join(f"{name} ({u.__struct_config__.tag})" for name, u in settings.upstreams.items()),
        os.getpid(),
    )
    return create_app(settings, os.environ)


@contextlib.contextmanager
def shared_metrics(workers: int) -> Iterator[None]:
    """With several workers, a fresh PROMETHEUS_MULTIPROC_DIR that they all write their metrics
    to (so one scrape of any worker shows them all), removed at exit.

    It is set before uvicorn spawns the workers: each imports prometheus_client afresh, which
    picks its value store from that variable at import. A directory the operator set already
    is used as it is; like prometheus_client says, it should be emptied between runs.
    """
    log = logging.getLogger("turnout")
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        if any(Path(given).glob("*.db")):
            log.warning("%s=%s holds files from an earlier run", MULTIPROC_ENV, given)
        yield
        return
    if workers == 1:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="turnout-metrics-") as path:
        os.environ[MULTIPROC_ENV] = path
        log.info("metrics of %d workers merged through %s", workers, path)
        try:
            yield
        finally:
            del os.environ[MULTIPROC_ENV]


def uvicorn_options(server: Server) -> dict[str, Any]:
    """uvicorn's settings for `turnout serve`: the connection guard below as its HTTP protocol,
    idle keep-alive connections closed after server.keep_alive_s."""
    return {
        "http": ConnectionGuard,
        "timeout_keep_alive": server.keep_alive_s,
    }


class ConnectionGuard(HttpToolsProtocol):
    """uvicorn's httptools protocol with the deadlines and limits it lacks, per connection:

    - a request's head (request line and headers) must arrive within server.header_timeout_s
      of its first byte, or of the connection opening (slowloris): else 408 and closed, or
      just closed when nothing of a request came;
    - the head may be at most server.max_header_bytes: else 431 and closed, read no further;
    - a response the client stops reading (the socket's buffers full, writes paused) for
      server.write_timeout_s: the connection is dropped, which the app sees as the client
      leaving (its upstream call is cancelled).

    The body's deadline (server.receive_timeout_s) is the app's (gateway.app.body_deadline),
    so that it is answered with a 408 in the API's error shape. The settings are read from the
    class attribute `limits`, set by app_from_env in each worker.
    """

    limits: ClassVar[Server] = Server()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limits = self.limits
        self._in_head = True  # the bytes arriving belong to a request's head
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        # Still in a head that began (a head that arrived whole in `data` costs no timer).
        if not self._in_head or self._head_bytes == 0 or self.transport.is_closing():
            return
        limit = self._limits.max_header_bytes
        if self._head_bytes > limit:
            self._refuse(HeadersTooLarge(f"The request head is larger than {limit} bytes."))
        else:
            self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        super().on_headers_complete()
        cycle = self.cycle  # the app's task starts later: it gets this `send`
        if cycle is not None:  # (None: an upgrade uvicorn handles itself)
            cycle.send = _raising_when_gone(cycle)  # type: ignore[method-assign, assignment]

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head_bytes = True, 0  # what follows is the next request's head

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(
                self._limits.write_timeout_s, self._write_timed_out
            )

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(
                self._limits.header_timeout_s, self._head_timed_out
            )

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _cancel_timers(self) -> None:
        self._cancel_head_timer()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _responding(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._responding():  # a pipelined head: timed from its next byte, or keep-alive
            return
        if self._head_bytes == 0:  # nothing of a request: an idle connection, closed
            self._refused = True
            self.transport.close()
            return
        seconds = self._limits.header_timeout_s
        self._refuse(RequestTimeout(f"The request head did not arrive within {seconds:g} s."))

    def _write_timed_out(self) -> None:
        self._write_timer = None
        logging.getLogger("turnout").info(
            "closing a connection whose client read nothing for %g s",
            self._limits.write_timeout_s,
        )
        self.transport.abort()  # connection_lost follows: the app sees the client leave

    def _refuse(self, error: TurnoutError) -> None:
        """Answer `error` (OpenAI's shape) and close, reading no more of this connection."""
        self._refused = True
        self._cancel_head_timer()
        if self._responding():  # an answer is under way: no second one in its bytes
            self.transport.abort()
            return
        body = error.body()
        head = [
            STATUS_LINE[error.status],
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"x-request-id: req_%s\r\n" % os.urandom(16).hex().encode(),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()


def _raising_when_gone(cycle: RequestResponseCycle) -> Callable[[Any], Awaitable[None]]:
    """The cycle's `send`, raising ConnectionGone once the connection is closed."""
    send = cycle.send

    async def guarded(message: Any) -> None:
        if cycle.disconnected:
            raise ConnectionGone("the client's connection is closed")
        await send(message)

    return guarded
