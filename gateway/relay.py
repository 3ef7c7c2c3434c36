"""Relay an upstream SSE stream to the client event by event, keeping the upstream's bytes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import msgspec

from gateway.call import Deadline, Opened, transport_error
from gateway.errors import TurnoutError, UpstreamError, redact, scrub
from gateway.records import Usage, usage_from
from gateway.sse import DONE, event_data, iter_event_batches
from router.plan import Failure, Stage

_USAGE_MARK = b'"usage"'
_ERROR_MARK = b'"error"'
# After [DONE], read the body's end briefly so the pooled connection can be reused.
DRAIN_S = 0.25


class StreamRelay:
    """Reads events from an opened upstream stream; strips the usage chunk unless it was asked for.

    `first()` is awaited before response headers are sent; iterating yields the buffered
    events and then the rest, the events that arrived in one read joined into one write
    (bytes unchanged). A failure after the first event becomes a final SSE error event,
    with no `[DONE]`. `on_finish` runs exactly once, when the stream ends for any reason.
    When the client asked for usage, the usage chunk gains `usage.cost_usd` from `cost_of`.
    """

    def __init__(
        self,
        opened: Opened,
        deadline: Deadline,
        *,
        client_wants_usage: bool,
        injected: int,
        on_finish: Callable[[StreamRelay], None],
        cost_of: Callable[[Usage], float],
    ) -> None:
        self.opened = opened
        self.deadline = deadline
        self.client_wants_usage = client_wants_usage
        self.injected = injected
        self.usage: Usage | None = None
        self.relayed: list[bytes] = []  # data payloads sent, for counting when usage is missing
        self.done = False
        self.error: TurnoutError | None = None
        self.client_gone = False
        self.first_event_at: float | None = None
        self.last_event_at: float | None = None
        self._on_finish = on_finish
        self._cost_of = cost_of
        self._finished = False
        self._batches = iter_event_batches(opened.response.aiter_bytes())
        self._pending: list[bytes] = []

    async def first(self) -> None:
        """Wait for the first data event (within the first-byte deadline) and check it."""
        try:
            async with asyncio.timeout(max(self.opened.first_byte_left(), 0)):
                while self.first_event_at is None:
                    for event in await self._batches.__anext__():
                        data = event_data(event)
                        if data and self.first_event_at is None:
                            _raise_if_error(data, self.opened.upstream.secrets)
                            self.first_event_at = time.perf_counter()
                        if (kept := self._keep(event, data)) is not None:
                            self._pending.append(kept)
                        if self.done:
                            break
        except StopAsyncIteration:
            ended = UpstreamError("The upstream ended the stream before sending any event.")
            raise ended.tagged(Failure.BROKEN, Stage.MAYBE_ACCEPTED) from None
        except BaseException as exc:
            raise transport_error(exc, self.opened.upstream) from None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            if self._pending:
                yield b"".join(self._pending)
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
                    batch = await self._batches.__anext__()
            except StopAsyncIteration:
                self.error = UpstreamError("The upstream stream ended before it was complete.")
                break
            except Exception as exc:
                mapped = transport_error(exc, self.opened.upstream)
                self.error = mapped if isinstance(mapped, TurnoutError) else UpstreamError(str(exc))
                break
            self.last_event_at = time.perf_counter()
            kept = []
            for event in batch:
                if (one := self._keep(event, event_data(event))) is not None:
                    kept.append(one)
                if self.done:  # what follows [DONE] is drained, not relayed
                    break
            if kept:
                yield b"".join(kept)
        if self.error is not None:
            yield b"data: " + _error_json(self.error) + b"\n\n"

    def _keep(self, event: bytes, data: bytes) -> bytes | None:
        """The event to forward, or None to drop it (the usage chunk the client did not ask for)."""
        if data == DONE:
            self.done = True
            return event
        if not data:
            return event
        if _ERROR_MARK in data and self.opened.upstream.secrets:  # it may echo Turnout's key
            event = _redacted(event, self.opened.upstream.secrets)
            data = event_data(event)
        if _USAGE_MARK in data and (found := self._usage_of(data)) is not None:
            self.usage, chunk = found
            if chunk.get("choices") == []:
                if not self.client_wants_usage:
                    return None
                return self._with_cost(event, chunk, self.usage)
        self.relayed.append(data)
        return event

    def _usage_of(self, data: bytes) -> tuple[Usage, dict[str, Any]] | None:
        try:
            chunk = msgspec.json.decode(data)
        except msgspec.DecodeError:
            return None
        if not isinstance(chunk, dict):
            return None
        usage = usage_from(chunk.get("usage"), self.injected)
        return None if usage is None else (usage, chunk)

    def _with_cost(self, event: bytes, chunk: dict[str, Any], usage: Usage) -> bytes:
        """The usage chunk re-encoded with `cost_usd` added to its usage object."""
        chunk["usage"]["cost_usd"] = round(self._cost_of(usage), 10)
        ending = event[len(event.rstrip(b"\r\n")) :] or b"\n\n"
        return b"data: " + msgspec.json.encode(chunk) + ending

    async def close(self) -> None:
        """Close the upstream (shielded from the client's cancellation) and finish once."""
        with anyio.CancelScope(shield=True):
            if self.done and not self.client_gone:
                await self._drain()
            await self.opened.aclose()
        if not self._finished:
            self._finished = True
            if not self.done and self.error is None:  # stopped while paused at a yield
                self.client_gone = True
            self._on_finish(self)

    async def _drain(self) -> None:
        try:
            async with asyncio.timeout(DRAIN_S):
                async for _ in self._batches:
                    pass
        except (TimeoutError, Exception):
            return


def _raise_if_error(data: bytes, secrets: tuple[str, ...]) -> None:
    """An upstream that reports a failure as its first event has failed before the stream began."""
    if _ERROR_MARK not in data:
        return
    try:
        chunk = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return
    if isinstance(chunk, dict) and isinstance(error := chunk.get("error"), dict):
        message = error.get("message")
        detail = scrub(message, secrets) if isinstance(message, str) else "no message"
        failed = UpstreamError(f"The upstream reported an error: {detail}")
        raise failed.tagged(Failure.SERVER, Stage.MAYBE_ACCEPTED)


def _redacted(event: bytes, secrets: tuple[str, ...]) -> bytes:
    text = event.decode("utf-8", "replace")
    clean = redact(text, secrets)
    return event if clean == text else clean.encode()


def _error_json(error: TurnoutError) -> bytes:
    return msgspec.json.encode(
        {"error": {"message": error.message, "type": error.type, "param": None, "code": error.code}}
    )
