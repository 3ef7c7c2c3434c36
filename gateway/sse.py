"""Server-sent events: split an upstream byte stream into events without re-encoding them."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")
DONE = b"[DONE]"


class EventSplitter:
    """Feeds raw bytes, yields complete events with their original bytes and terminator."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buffer += chunk
        events: list[bytes] = []
        start = 0
        for match in _BOUNDARY.finditer(self._buffer):
            events.append(self._buffer[start : match.end()])
            start = match.end()
        self._buffer = self._buffer[start:]
        return events

    def flush(self) -> bytes | None:
        """What is left at EOF: a last event the upstream did not terminate, completed with
        as few bytes as make it one event (a last line's own line end is not doubled)."""
        rest, self._buffer = self._buffer, b""
        if not rest.strip():
            return None
        for line_end in (b"\r\n", b"\n", b"\r"):
            if rest.endswith(line_end):
                return rest + line_end
        return rest + b"\n\n"


def event_data(event: bytes) -> bytes:
    """The joined `data:` payload of one event (empty if it has none)."""
    parts = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(parts)


async def iter_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Events from a byte stream, flushing a final unterminated event at EOF."""
    splitter = EventSplitter()
    async for chunk in chunks:
        for event in splitter.feed(chunk):
            yield event
    last = splitter.flush()
    if last is not None:
        yield last


async def iter_event_batches(chunks: AsyncIterator[bytes]) -> AsyncIterator[list[bytes]]:
    """The events of `iter_events`, grouped as they became complete: one list per chunk read
    that completed any (so events that arrived together can be relayed in one write)."""
    splitter = EventSplitter()
    async for chunk in chunks:
        if events := splitter.feed(chunk):
            yield events
    last = splitter.flush()
    if last is not None:
        yield [last]
