"""Relay an upstream SSE stream to the client event by event, keeping the upstream's bytes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import anyio
import msgspec

from gateway.call import Deadline, Opened, transport_error
from gateway.errors import TurnoutError, UpstreamError
from gateway.records import Usage, usage_from
from gateway.sse import DONE, event_data, iter_events

_USAGE_MARK = b'"usage"'


class StreamRelay:
    """Reads events from an opened upstream stream; strips the usage chunk unless it was asked for.

    `first()` is awaited before response headers are sent; iterating yields the buffered first
    event and then the rest. A failure after the first event becomes a final SSE error event,
    with no `[DONE]`. `on_finish` runs exactly once, when the stream ends for any reason.
    """

    def __init__(
        self,
        opened: Opened,
        deadline: Deadline,
        *,
        client_wants_usage: bool,
        injected: int,
        on_finish: Callable[[StreamRelay], None],
    ) -> None:
        self.opened = opened
        self.deadline = deadline
        self.client_wants_usage = client_wants_usage
        self.injected = injected
        self.usage: Usage | None = None
        self.done = False
        self.error: TurnoutError | None = None
        self.client_gone = False
        self.first_event_at: float | None = None
        self._on_finish = on_finish
        self._finished = False
        self._events = iter_events(opened.response.aiter_bytes())
        self._pending: list[bytes] = []

    async def first(self) -> None:
        """Wait for the first event to send to the client (within the first-byte limit)."""
        timeouts = self.opened.upstream.timeouts
        try:
            async with asyncio.timeout(self.deadline.within(timeouts.first_byte)):
                while not self._pending:
                    event = await self._events.__anext__()
                    if (kept := self._keep(event)) is not None:
                        self._pending.append(kept)
        except StopAsyncIteration:
            raise UpstreamError("The upstream ended the stream before sending any event.") from None
        except BaseException as exc:
            raise transport_error(exc, self.opened.upstream) from None
        self.first_event_at = time.perf_counter()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            for event in self._pending:
                yield event
            self._pending.clear()
            async for event in self._rest():
                yield event
        except (asyncio.CancelledError, GeneratorExit):
            self.client_gone = True
            raise
        finally:
            await self.close()

    async def _rest(self) -> AsyncIterator[bytes]:
        idle = self.opened.upstream.timeouts.idle
        while not self.done:
            try:
                async with asyncio.timeout(self.deadline.within(idle)):
                    event = await self._events.__anext__()
            except StopAsyncIteration:
                self.error = UpstreamError("The upstream stream ended before it was complete.")
                break
            except Exception as exc:
                mapped = transport_error(exc, self.opened.upstream)
                self.error = mapped if isinstance(mapped, TurnoutError) else UpstreamError(str(exc))
                break
            if (kept := self._keep(event)) is not None:
                yield kept
        if self.error is not None:
            yield b"data: " + _error_json(self.error) + b"\n\n"

    def _keep(self, event: bytes) -> bytes | None:
        """The event to forward, or None to drop it (the usage chunk the client did not ask for)."""
        data = event_data(event)
        if data == DONE:
            self.done = True
            return event
        if _USAGE_MARK not in data:
            return event
        try:
            chunk = msgspec.json.decode(data)
        except msgspec.DecodeError:
            return event
        if not isinstance(chunk, dict):
            return event
        usage = usage_from(chunk.get("usage"), self.injected)
        if usage is not None:
            self.usage = usage
            if not self.client_wants_usage and chunk.get("choices") == []:
                return None
        return event

    async def close(self) -> None:
        """Close the upstream (shielded from the client's cancellation) and finish once."""
        with anyio.CancelScope(shield=True):
            await self.opened.aclose()
        if not self._finished:
            self._finished = True
            self._on_finish(self)


def _error_json(error: TurnoutError) -> bytes:
    return msgspec.json.encode(
        {"error": {"message": error.message, "type": error.type, "param": None, "code": error.code}}
    )
