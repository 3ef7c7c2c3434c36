"""Serve an ASGI app over a real socket on 127.0.0.1, port 0, in a background thread."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn

STARTUP_TIMEOUT_S = 10.0


@contextlib.contextmanager
def serve_app(app: Any, **config: Any) -> Iterator[str]:
    """Yield the base URL ("http://127.0.0.1:PORT") of a uvicorn server running `app`.

    The server runs in a daemon thread with its own event loop and is shut down on exit.
    Extra keyword arguments go to `uvicorn.Config`.
    """
    options: dict[str, Any] = {"port": 0, "lifespan": "off", "log_level": "warning"}
    options.update(config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", **options))
    thread = threading.Thread(target=_run, args=(server,), daemon=True)
    thread.start()
    try:
        _wait_started(server, thread)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(STARTUP_TIMEOUT_S)


def _run(server: uvicorn.Server) -> None:
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(server.serve())
    finally:
        loop.close()


def _wait_started(server: uvicorn.Server, thread: threading.Thread) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn server thread exited before starting")
        if time.monotonic() > deadline:
            raise TimeoutError("uvicorn server did not start in time")
        time.sleep(0.005)


def request_framing(head: bytes) -> tuple[int, bool]:
    """(Content-Length, chunked) of a raw HTTP/1.1 request head, for raw-socket servers."""
    length, chunked = 0, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
        elif name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    return length, chunked
