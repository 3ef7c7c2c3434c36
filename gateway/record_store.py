"""Where request records are kept: a memory ring buffer, Redis, and a JSON-lines file.

`add` never waits on Redis or the disk: those writes go through a bounded queue drained by a
background task (`WriteBehind`), so a slow or stalled store costs records, never latency.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.errors import ServiceUnavailable
from gateway.records import RequestRecord
from gateway.settings import Settings

log = logging.getLogger("turnout")

QUEUE_SIZE = 10_000  # records waiting for Redis or the file, per destination
BATCH_SIZE = 256
CLOSE_TIMEOUT_S = 5.0  # how long shutdown waits for pending writes
WARN_EVERY_S = 60.0
LOCAL_CACHE = 10_000  # with Redis: this process's newest records, for instant lookups
READ_PAGE = 1_000  # stream entries per XREVRANGE: each call stays well inside the socket timeout
CLOCK_SKEW_S = 60.0  # `recent(since=…)` reads this much further back in a Redis stream

_encode = msgspec.json.Encoder().encode
_decoder = msgspec.json.Decoder(RequestRecord)


class RecordStore(Protocol):
    """Keeps request records. `add` returns at once; `recent` lists the newest last."""

    def add(self, record: RequestRecord) -> None: ...

    async def get(self, request_id: str) -> RequestRecord | None: ...

    async def recent(self, limit: int, since: float | None = None) -> list[RequestRecord]: ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


class MemoryRecordStore:
    """The most recent `capacity` records of this process; a reused id finds the newest."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._records: deque[RequestRecord] = deque(maxlen=capacity)
        self._by_id: dict[str, RequestRecord] = {}

    def add(self, record: RequestRecord) -> None:
        if len(self._records) == self._records.maxlen:
            oldest = self._records[0]
            if self._by_id.get(oldest.request_id) is oldest:
                del self._by_id[oldest.request_id]
        self._records.append(record)
        self._by_id[record.request_id] = record

    def find(self, request_id: str) -> RequestRecord | None:
        return self._by_id.get(request_id)

    async def get(self, request_id: str) -> RequestRecord | None:
        return self.find(request_id)

    async def recent(self, limit: int, since: float | None = None) -> list[RequestRecord]:
        picked: list[RequestRecord] = []
        for record in reversed(self._records):
            if len(picked) >= limit:
                break
            if since is None or record.time >= since:
                picked.append(record)
        picked.reverse()
        return picked

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    def __iter__(self) -> Iterator[RequestRecord]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)


class WriteBehind:
    """A bounded queue of records drained by one task that writes them in batches.

    `put` never waits: when the queue is full the oldest pending record is dropped. Drops and
    failed writes are counted (`dropped`, `failed`) and logged at most once a minute each;
    they never reach the caller.
    """

    def __init__(
        self,
        name: str,
        write: Callable[[list[RequestRecord]], Awaitable[None]],
        maxsize: int = QUEUE_SIZE,
    ) -> None:
        self.name = name
        self.written = self.dropped = self.failed = 0
        self._write = write
        self._queue: asyncio.Queue[RequestRecord] = asyncio.Queue(maxsize)
        self._task: asyncio.Task[None] | None = None
        self._warned_at: dict[str, float] = {}

    def put(self, record: RequestRecord) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self._queue.task_done()
            self.dropped += 1
            self._warn(
                "drop", "%s: writes fall behind; %d records dropped", self.name, self.dropped
            )
        self._queue.put_nowait(record)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"turnout {self.name} writer")

    async def aclose(self) -> None:
        """Write what is pending (waiting at most CLOSE_TIMEOUT_S), then stop."""
        if self._task is None and self._queue.empty():
            return
        self.start()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self._queue.join()
        except TimeoutError:
            self.dropped += self._queue.qsize()
            log.warning("%s: %d records not written at shutdown", self.name, self._queue.qsize())
        finally:
            assert self._task is not None
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < BATCH_SIZE and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._write(batch)
                self.written += len(batch)
            except Exception as exc:  # a store failure must never stop the writer
                self.failed += len(batch)
                why = _why(exc)
                self._warn(
                    "fail", "%s: write failed (%s); %d records lost", self.name, why, self.failed
                )
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _warn(self, kind: str, message: str, *args: object) -> None:
        """Log at most once a minute per kind of trouble (the counters keep the full tally)."""
        now = time.monotonic()
        if now - self._warned_at.get(kind, -WARN_EVERY_S) >= WARN_EVERY_S:
            self._warned_at[kind] = now
            log.warning(message, *args)


def _why(exc: BaseException) -> str:
    """An exception named for a log line; Redis errors carry host:port at most, never the URL."""
    return f"{type(exc).__name__}: {exc}"


class RedisRecordStore:
    """Records shared by every replica: a capped stream `{prefix}records` (XADD MAXLEN ~) read
    newest first, and `{prefix}record:{id}` keys (expiring after `lookup_ttl_s`) for get-by-id.
    Values are the record as JSON, as in the file. Needs Redis ≥ 6.2."""

    def __init__(
        self,
        client: Redis,
        prefix: str = "turnout:",
        capacity: int = 100_000,
        lookup_ttl_s: int = 86_400,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        self.capacity = capacity
        self.stream = f"{prefix}records"
        self._redis = client
        self._id_prefix = f"{prefix}record:"
        self._ttl = lookup_ttl_s
        self.writer = WriteBehind("redis records", self._write, queue_size)

    def add(self, record: RequestRecord) -> None:
        self.writer.put(record)

    async def get(self, request_id: str) -> RequestRecord | None:
        try:
            data = await self._redis.get(self._id_prefix + request_id)
        except RedisError as exc:
            raise _unavailable(exc) from None
        return None if data is None else _decode(data)

    async def recent(self, limit: int, since: float | None = None) -> list[RequestRecord]:
        """The newest `limit` records (at most `capacity`) with `time >= since`, oldest first.

        Stream ids are Redis's clock at write time, never before a record's arrival, so the
        scan can stop at `since` (less CLOCK_SKEW_S for a gateway clock ahead of Redis's)."""
        want = min(limit, self.capacity)
        low = "-" if since is None else str(max(int((since - CLOCK_SKEW_S) * 1000), 0))
        high, found = "+", list[RequestRecord]()
        try:
            while len(found) < want:
                count = min(want - len(found), READ_PAGE)
                page = await self._redis.xrevrange(self.stream, high, low, count=count)
                for _, fields in page:
                    record = _decode(fields.get(b"r", b""))
                    if record is not None and (since is None or record.time >= since):
                        found.append(record)
                if len(page) < count:
                    break
                high = "(" + page[-1][0].decode()
        except RedisError as exc:
            raise _unavailable(exc) from None
        found.reverse()
        return found

    async def start(self) -> None:
        self.writer.start()

    async def aclose(self) -> None:
        await self.writer.aclose()

    async def _write(self, batch: list[RequestRecord]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for record in batch:
                data = _encode(record)
                pipe.xadd(self.stream, {"r": data}, maxlen=self.capacity, approximate=True)
                pipe.set(self._id_prefix + record.request_id, data, ex=self._ttl)
            await pipe.execute()


def _decode(data: bytes) -> RequestRecord | None:
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError:
        return None  # written by an incompatible version: skipped, not fatal


def _unavailable(exc: RedisError) -> ServiceUnavailable:
    log.warning("record store: Redis read failed (%s)", _why(exc))
    return ServiceUnavailable("The record store is unavailable.")


class JsonlSink:
    """Appends each record as one JSON object per line to `path`, in batches off the loop.

    The file is opened unbuffered in append mode, so each batch is one write(2) with O_APPEND:
    lines from several worker processes do not interleave on a local file system."""

    def __init__(self, path: str | Path, queue_size: int = QUEUE_SIZE) -> None:
        self.path = Path(path)
        self.writer = WriteBehind("records file", self._write, queue_size)
        self._file: BinaryIO | None = None
        self._lock = threading.Lock()  # a timed-out write may still run while we close

    def add(self, record: RequestRecord) -> None:
        self.writer.put(record)

    async def start(self) -> None:
        if self._file is None:
            self._file = await asyncio.to_thread(self.path.open, "ab", buffering=0)
        self.writer.start()

    async def aclose(self) -> None:
        await self.writer.aclose()
        await asyncio.to_thread(self._close)

    async def _write(self, batch: list[RequestRecord]) -> None:
        await asyncio.to_thread(self._append, b"".join(_encode(r) + b"\n" for r in batch))

    def _append(self, data: bytes) -> None:
        with self._lock:
            if self._file is None:
                raise RuntimeError("the records file is closed")
            view = memoryview(data)
            while view:
                view = view[self._file.write(view) :]

    def _close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


class RecordKeeper:
    """The gateway's records: this process's newest in memory (always, so a record can be read
    back the moment its response is sent), plus an optional shared store and file sink.

    `get` looks in memory first, then in the shared store; `recent` asks the shared store when
    there is one (every replica's records), else memory. Iterating gives this process's."""

    def __init__(
        self,
        local: MemoryRecordStore,
        shared: RecordStore | None = None,
        sink: JsonlSink | None = None,
    ) -> None:
        self.local, self.shared, self.sink = local, shared, sink

    def add(self, record: RequestRecord) -> None:
        self.local.add(record)
        if self.shared is not None:
            self.shared.add(record)
        if self.sink is not None:
            self.sink.add(record)

    def find(self, request_id: str) -> RequestRecord | None:
        """A record of this process, at once (for tests and the demo)."""
        return self.local.find(request_id)

    async def get(self, request_id: str) -> RequestRecord | None:
        record = self.local.find(request_id)
        if record is None and self.shared is not None:
            record = await self.shared.get(request_id)
        return record

    async def recent(self, limit: int, since: float | None = None) -> list[RequestRecord]:
        return await (self.shared or self.local).recent(limit, since)

    async def start(self) -> None:
        for part in (self.shared, self.sink):
            if part is not None:
                await part.start()

    async def aclose(self) -> None:
        """Flush pending writes to the shared store and the file (concurrently)."""
        parts = [part for part in (self.shared, self.sink) if part is not None]
        await asyncio.gather(*(part.aclose() for part in parts))

    def __iter__(self) -> Iterator[RequestRecord]:
        return iter(self.local)

    def __len__(self) -> int:
        return len(self.local)


def open_record_store(settings: Settings, redis: Redis | None) -> RecordKeeper:
    """The record keeper `settings` ask for: Redis-backed when a client is given, plus the file
    sink when `records.file` is set. Call `start()` inside the event loop before use."""
    records = settings.records
    shared = None
    if redis is not None:
        prefix = settings.state.key_prefix
        shared = RedisRecordStore(redis, prefix, records.capacity, records.lookup_ttl_s)
    local = MemoryRecordStore(
        records.capacity if shared is None else min(records.capacity, LOCAL_CACHE)
    )
    sink = JsonlSink(records.file) if records.file else None
    return RecordKeeper(local, shared, sink)


def connect_redis(url: str) -> Redis:
    """A Redis client for the state store: short timeouts, no retries, bytes in and out.
    Connects lazily; close it with `aclose()`."""
    client: Redis = Redis.from_url(
        url,
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        retry_on_timeout=False,
        decode_responses=False,
    )
    return client
