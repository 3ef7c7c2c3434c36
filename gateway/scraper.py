"""The metrics scraper: polls each vLLM replica's `/metrics` and keeps its load on the upstream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math

import httpx

from gateway.errors import scrub
from gateway.upstreams import Upstream
from router.vllm_metrics import ReplicaLoad, parse_load

log = logging.getLogger("turnout")

MAX_TIMEOUT_S = 2.0  # a scrape never waits longer than this, whatever the interval
MIN_TIMEOUT_S = 0.5
MAX_BYTES = 8 * 1024 * 1024  # vLLM's page is ~100 KB; anything far larger is not it
LOG_EVERY_S = 60.0


class ScrapeError(Exception):
    """A replica's `/metrics` could not be read or understood."""


class MetricsScraper:
    """One asyncio task per upstream that scrapes every replica each `scrape_interval_s`.

    A failed scrape keeps the replica's previous load, which turns stale (and stops steering
    traffic) after a few intervals. Failures are logged at most once a minute per replica; the
    task never dies of one. Uses the upstream's own client and credentials.
    """

    def __init__(self, upstream: Upstream) -> None:
        if upstream.scrape_interval_s is None or len(upstream.metrics_urls) != len(upstream.roots):
            raise ValueError(f"upstream {upstream.name} has no metrics to scrape")
        self.upstream = upstream
        self.interval = upstream.scrape_interval_s
        self.timeout = min(MAX_TIMEOUT_S, max(MIN_TIMEOUT_S, self.interval))
        self._task: asyncio.Task[None] | None = None
        self._logged_at = [-math.inf] * len(upstream.roots)
        self._failing = [False] * len(upstream.roots)

    def start(self) -> None:
        if self._task is None:
            self.upstream.scraping_since = self.upstream.clock()
            self._task = asyncio.create_task(self._run(), name=f"scrape {self.upstream.name}")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def scrape_once(self) -> None:
        """Scrape every replica once, concurrently."""
        await asyncio.gather(*(self._scrape(i) for i in range(len(self.upstream.roots))))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            await self.scrape_once()
            await asyncio.sleep(max(self.interval - (loop.time() - began), 0.0))

    async def _scrape(self, index: int) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                load = await self._fetch(self.upstream.metrics_urls[index])
        except Exception as exc:  # one replica's failure must not stop the others or the task
            self._failed(index, _describe(exc))
            return
        self.upstream.record_load(index, load, self.upstream.clock())
        if self._failing[index]:
            self._failing[index] = False
            log.info("upstream %s replica %d: metrics back", self.upstream.name, index)

    async def _fetch(self, url: str) -> ReplicaLoad:
        upstream = self.upstream
        request = upstream.client.build_request(
            "GET", url, headers=upstream.headers, timeout=httpx.Timeout(self.timeout)
        )
        response = await upstream.client.send(request, stream=True)
        try:
            if response.status_code != 200:
                raise ScrapeError(f"HTTP {response.status_code}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_BYTES:
                    raise ScrapeError(f"page larger than {MAX_BYTES} bytes")
        finally:
            await response.aclose()
        load = parse_load(body.decode("utf-8", errors="replace"))
        if load is None:
            raise ScrapeError("no vllm:num_requests_* series in the page")
        return load

    def _failed(self, index: int, reason: str) -> None:
        self._failing[index] = True
        now = self.upstream.clock()
        if now - self._logged_at[index] >= LOG_EVERY_S:
            self._logged_at[index] = now
            log.warning(
                "upstream %s replica %d: metrics scrape failed (%s); its load goes stale",
                self.upstream.name,
                index,
                scrub(reason, self.upstream.secrets),
            )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
