"""An httpx transport that calls an ASGI app in this process and streams its body as sent.

httpx's own ASGITransport buffers whole bodies; this one hands each `http.response.body`
message to the reader as it comes, and tells the app the client left when the reader closes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import httpx

Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [
        MutableMapping[str, Any],
        Callable[[], Awaitable[Message]],
        Callable[[Message], Awaitable[None]],
    ],
    Awaitable[None],
]


class _BodyStream(httpx.AsyncByteStream):
    def __init__(
        self,
        queue: asyncio.Queue[bytes | BaseException | None],
        task: asyncio.Task[None],
        gone: asyncio.Event,
    ) -> None:
        self._queue, self._task, self._gone = queue, task, gone

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (chunk := await self._queue.get()) is not None:
            if isinstance(chunk, BaseException):
                raise chunk
            yield chunk

    async def aclose(self) -> None:
        self._gone.set()
        if not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


class InProcessTransport(httpx.AsyncBaseTransport):
    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        start: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        gone = asyncio.Event()
        sent_request = False

        async def receive() -> Message:
            nonlocal sent_request
            if not sent_request:
                sent_request = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                start.set_result(message)
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    queue.put_nowait(message["body"])
                if not message.get("more_body", False):
                    queue.put_nowait(None)

        task = asyncio.create_task(self._run(_scope(request), receive, send, start, queue))
        try:
            message = await start
        except BaseException:
            task.cancel()
            raise
        headers = [
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])
        ]
        return httpx.Response(
            message["status"],
            headers=headers,
            stream=_BodyStream(queue, task, gone),
            request=request,
        )

    async def _run(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
        start: asyncio.Future[Message],
        queue: asyncio.Queue[bytes | BaseException | None],
    ) -> None:
        try:
            await self._app(scope, receive, send)
        except Exception as exc:
            failure = httpx.RemoteProtocolError(f"in-process upstream failed: {exc!r}")
            if not start.done():
                start.set_exception(failure)
            queue.put_nowait(failure)  # a body cut short must not read as complete
        finally:
            if not start.done():
                start.set_exception(
                    httpx.RemoteProtocolError("in-process upstream sent no response")
                )
            queue.put_nowait(None)


def _scope(request: httpx.Request) -> MutableMapping[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": request.url.scheme,
        "path": request.url.path,
        "raw_path": request.url.raw_path,
        "query_string": request.url.query,
        "root_path": "",
        "headers": [(k.lower(), v) for k, v in request.headers.raw],
        "client": ("127.0.0.1", 0),
        "server": ("turnout-simulated", 80),
    }
