"""The metrics scraper: polls each vLLM replica's `/metrics` and keeps its load on the upstream."""

from __future__ import annotations

import asyncio
import logging

import httpx

from gateway.poller import ReplicaPoller
from gateway.upstreams import Upstream
from router.vllm_metrics import ReplicaLoad, parse_load

log = logging.getLogger("turnout")

MAX_TIMEOUT_S = 2.0  # a scrape never waits longer than this, whatever the interval
MIN_TIMEOUT_S = 0.5
MAX_BYTES = 8 * 1024 * 1024  # vLLM's page is ~100 KB; anything far larger is not it


class ScrapeError(Exception):
    """A replica's `/metrics` could not be read or understood."""


class MetricsScraper(ReplicaPoller):
    """One asyncio task per upstream that scrapes every replica each `scrape_interval_s`.

    A failed scrape keeps the replica's previous load, which turns stale (and stops steering
    traffic) after a few intervals. Uses the upstream's own client and credentials.
    """

    kind = "scrape"

    def __init__(self, upstream: Upstream) -> None:
        if upstream.scrape_interval_s is None or len(upstream.metrics_urls) != len(upstream.roots):
            raise ValueError(f"upstream {upstream.name} has no metrics to scrape")
        super().__init__(upstream, upstream.scrape_interval_s)
        self.timeout = min(MAX_TIMEOUT_S, max(MIN_TIMEOUT_S, self.interval))
        self._failing = [False] * len(upstream.roots)

    def start(self) -> None:
        if self._task is None:
            self.upstream.scraping_since = self.upstream.clock()
        super().start()

    async def _poll(self, index: int) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                load = await self._fetch(self.upstream.metrics_urls[index])
        except Exception as exc:  # one replica's failure must not stop the others or the task
            self._failing[index] = True
            self._log_failure(
                index,
                "upstream %s replica %d: metrics scrape failed (%s); its load goes stale",
                _describe(exc),
            )
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


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
