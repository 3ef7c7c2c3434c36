"""Serve an ASGI app on a free loopback port inside the running event loop (demo, benchmarks)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, Literal

import uvicorn


@contextlib.asynccontextmanager
async def on_loopback(app: Any, *, lifespan: Literal["on", "off"] = "on") -> AsyncIterator[str]:
    """Yield "http://127.0.0.1:PORT" while uvicorn serves `app` as a task of this loop."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, lifespan=lifespan, log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("server stopped before it started")
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
