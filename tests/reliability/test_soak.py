"""Row 22, soak with failures mixed in: a gateway on Redis serves a steady mix of good calls,
upstream errors, cut and garbled streams, silent upstreams and clients that hang up, and once
idle again holds no more file descriptors, event-loop tasks or memory than it did after a
warm-up with the same mix. The short form runs in CI; `make soak` runs the long one
(SOAK_SECONDS, default 600)."""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.context import Receive, Scope, Send
from tests.fakes import Recorder, create_fake_upstream
from tests.integration.conftest import CLIENT_KEY, Upstreams, base_config, build_app, sha256
from tests.redis_server import RedisServer
from tests.servers import serve_app

CONCURRENCY = 16
# The warm-up runs twice as many clients, so that pools (Redis connections) reach the size the
# soak's peaks need before the baseline is taken.
WARM_UP_S = 6.0
SHORT_S = 8.0
IDLE_S = 2.0  # > the fakes' keep-alive (1 s): their idle connections are closed by then
FD_SLACK = 8  # descriptors: a leak per failed request would be hundreds
TASK_SLACK = 0
# Objects the collector tracks (dicts, lists, tasks, records ...) kept after the soak: a few
# for pools that grew to a new peak, and per request at most this many on average (a leak keeps
# at least one per request, or per failure, it leaks on). The long soak is held tighter.
OBJECTS_ALLOWANCE = 100
OBJECTS_PER_REQUEST = {"short": 0.5, "long": 0.05}
RSS_SLACK_MB = 50.0
CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "Where is my refund?"}]
AUTH = {"authorization": f"Bearer {CLIENT_KEY}"}


class LoopSpy:
    """The gateway app, remembering the event loop it runs on (to count its tasks)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.loop = asyncio.get_running_loop()
        await self.app(scope, receive, send)

    def tasks(self) -> int:
        """Tasks alive on the gateway's loop (uvicorn's own included), from another thread."""
        assert self.loop is not None

        async def count() -> int:
            return len(asyncio.all_tasks()) - 1  # not this one

        return asyncio.run_coroutine_threadsafe(count(), self.loop).result(5)


@dataclass
class Usage:
    fds: int
    tasks: int
    objects: int  # objects the collector tracks, after a full collection
    rss_mb: float  # resident set size now

    def __str__(self) -> str:
        return (
            f"{self.fds} fds, {self.tasks} tasks, {self.objects} objects, RSS {self.rss_mb:.0f} MB"
        )


def _usage(spy: LoopSpy) -> Usage:
    gc.collect()
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    rss = pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    return Usage(len(os.listdir("/proc/self/fd")), spy.tasks(), len(gc.get_objects()), rss)


# --- the mix: (route, stream?, what the client does) -------------------------------------------

Call = Callable[[httpx.AsyncClient], Awaitable[str]]


def _plain(model: str, **extra: Any) -> Call:
    async def call(client: httpx.AsyncClient) -> str:
        reply = await client.post(CHAT, json={"model": model, "messages": USER, **extra})
        return str(reply.status_code)

    return call


def _stream(model: str, leave_after_first: bool = False) -> Call:
    async def call(client: httpx.AsyncClient) -> str:
        body = {"model": model, "messages": USER, "stream": True}
        body["stream_options"] = {"include_usage": True}
        async with client.stream("POST", CHAT, json=body) as reply:
            async for _ in reply.aiter_bytes():
                if leave_after_first:
                    return "left mid-stream"
            return f"{reply.status_code} stream"

    return call


def _gives_up(model: str, after_s: float) -> Call:
    """A client that stops waiting for a non-streaming answer (it disconnects)."""

    async def call(client: httpx.AsyncClient) -> str:
        try:
            await client.post(CHAT, json={"model": model, "messages": USER}, timeout=after_s)
        except httpx.TimeoutException:
            return "gave up"
        return "answered"

    return call


async def _bad_json(client: httpx.AsyncClient) -> str:
    reply = await client.post(CHAT, content=b'{"model": "ok", "messages": [', headers=AUTH)
    return str(reply.status_code)


MIX: list[Call] = [
    _plain("ok"),
    _stream("ok"),
    _plain("prompted", max_tokens=5),
    _plain("error-500"),
    _plain("error-429"),
    _plain("garbage"),
    _stream("stream-cut"),
    _stream("stream-reset"),
    _stream("stream-garbage-late"),
    _stream("sliced"),
    _stream("stream-slow", leave_after_first=True),
    _stream("slow-first-event"),  # 504 at the first-byte deadline
    _gives_up("hang", 0.3),
    _plain("no-such-route"),
    _bad_json,
]


async def _load(url: str, seconds: float, clients: int = CONCURRENCY) -> Counter[str]:
    """`clients` clients running through MIX for `seconds`; what they saw, counted."""
    seen: Counter[str] = Counter()
    stop = time.monotonic() + seconds

    async def client(offset: int) -> None:
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=10) as http:
            index = offset
            while time.monotonic() < stop:
                outcome = await MIX[index % len(MIX)](http)
                seen[outcome] += 1
                index += 1

    await asyncio.gather(*(client(i) for i in range(clients)))
    return seen


@pytest.fixture
def fakes() -> Iterator[tuple[Upstreams, Recorder]]:
    """Fake upstreams of this test's own, closing idle connections after 1 s."""
    app, recorder = create_fake_upstream()
    with (
        serve_app(app, timeout_keep_alive=1) as first,
        serve_app(app, timeout_keep_alive=1) as second,
    ):
        yield Upstreams([first, second], recorder), recorder


def _config(upstreams: Upstreams, redis_url: str, prefix: str) -> dict[str, Any]:
    config = base_config(upstreams, first_byte=0.5, idle=0.5, total=3.0)
    config["state"] = {"redis_url": redis_url, "key_prefix": prefix}
    config["keys"] = [
        {"name": "app", "sha256": sha256(CLIENT_KEY), "rpm": 10**6, "budget": {"usd": 10**6}}
    ]
    config["records"] = {"capacity": 50}  # the ring buffer fills during the warm-up
    return config


def _soak(
    fakes: tuple[Upstreams, Recorder],
    redis_server: RedisServer,
    prefix: str,
    seconds: float,
    form: str = "short",
) -> None:
    upstreams, recorder = fakes
    spy = LoopSpy(build_app(_config(upstreams, redis_server.url, prefix)))
    with serve_app(spy, lifespan="on") as url:
        asyncio.run(_load(url, WARM_UP_S, 2 * CONCURRENCY))
        time.sleep(IDLE_S)
        recorder.clear()  # the fake keeps every request it saw: not the gateway's memory
        baseline = _usage(spy)
        seen = asyncio.run(_load(url, seconds))
        time.sleep(IDLE_S)
        recorder.clear()
        after = _usage(spy)
    total = sum(seen.values())
    print(
        f"soak {seconds:.0f} s, {total} requests: {dict(seen)}\n"
        f"  baseline {baseline}\n  after    {after}"
    )
    # Every kind of failure was exercised.
    assert {"200", "502", "429", "404", "400", "gave up", "left mid-stream"} <= set(seen), seen
    assert after.fds <= baseline.fds + FD_SLACK, f"{baseline} -> {after}"
    assert after.tasks <= baseline.tasks + TASK_SLACK, f"{baseline} -> {after}"
    kept = OBJECTS_ALLOWANCE + OBJECTS_PER_REQUEST[form] * total
    assert after.objects - baseline.objects <= kept, f"{baseline} -> {after}"
    assert after.rss_mb - baseline.rss_mb <= RSS_SLACK_MB, f"{baseline} -> {after}"


def test_soak_with_failures_returns_to_baseline(
    fakes: tuple[Upstreams, Recorder], redis_server: RedisServer, prefix: str
) -> None:
    """Row 22 (short form, CI): 8 s of the failure mix at 16 clients, then idle: file
    descriptors, event-loop tasks and live objects back to what they were after a warm-up
    with the same mix (no leak per request, per failure or per disconnect)."""
    _soak(fakes, redis_server, prefix, SHORT_S)


@pytest.mark.long
def test_long_soak_with_failures_returns_to_baseline(
    fakes: tuple[Upstreams, Recorder], redis_server: RedisServer, prefix: str
) -> None:
    """Row 22 (long form, `make soak`): the same for SOAK_SECONDS (default 600)."""
    _soak(fakes, redis_server, prefix, float(os.environ.get("SOAK_SECONDS", "600")), "long")
