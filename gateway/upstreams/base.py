"""What every upstream kind provides: endpoints, credentials and one pooled HTTP client."""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import httpx

from gateway.settings import Pool, Timeouts
from gateway.upstreams import h1
from router.replicas import least_outstanding, pick_two, scores
from router.vllm_metrics import ReplicaLoad

# What `Upstream.post` returns: the lean client's response, or httpx's (in-process upstreams).
UpstreamResponse = h1.Response | httpx.Response

FRESH_INTERVALS = 3  # a scraped load is used for this many scrape intervals, then it is stale


@dataclass
class Upstream:
    """One configured upstream: its replicas' API roots (ending in /v1) and one shared client.

    `headers` carry Turnout's own credentials; `secrets` are the values to scrub from anything
    that reaches a client or a log line. With `metrics_urls` and `scrape_interval_s` set (vLLM
    with `scrape_metrics: true`), a scraper fills `loads` and `load_at` (monotonic seconds)
    and replica choice weighs queues and adapters; otherwise it is least outstanding.
    """

    name: str
    kind: str
    roots: list[str]
    client: httpx.AsyncClient
    timeouts: Timeouts
    headers: dict[str, str] = field(default_factory=dict)
    # The request path's client (gateway/upstreams/h1.py); None: requests go through `client`
    # (an in-process upstream). `client` also serves the off-path calls (metrics, models, admin).
    pool: h1.Pool | None = None
    secrets: tuple[str, ...] = ()
    billed: bool = True
    metrics_urls: list[str] = field(default_factory=list)
    scrape_interval_s: float | None = None
    # vLLM with a `serve` section: the adapters it names; `held` is what each replica's
    # /v1/models listed last (None until known), kept by gateway.adapters.ModelWatcher.
    managed: frozenset[str] = frozenset()
    rand: random.Random = field(default_factory=random.Random)
    clock: Callable[[], float] = time.monotonic
    in_flight: list[int] = field(init=False)
    loads: list[ReplicaLoad | None] = field(init=False)
    load_at: list[float] = field(init=False)
    held: list[frozenset[str] | None] = field(init=False)
    scraping_since: float | None = field(init=False, default=None)
    _ticks: itertools.count[int] = field(init=False, default_factory=itertools.count)
    _sent: dict[str, str] = field(init=False, default_factory=dict)  # headers of every call
    _encoded: bytes = field(init=False, default=b"")  # the same, encoded for h1

    def __post_init__(self) -> None:
        self._sent = {**self.headers, "content-type": "application/json"}
        self._encoded = h1.encode_headers(self._sent)
        self.in_flight = [0] * len(self.roots)
        self.loads = [None] * len(self.roots)
        self.load_at = [-math.inf] * len(self.roots)
        self.held = [None] * len(self.roots)

    def acquire(self, adapter: str | None = None, *, exclude: Collection[int] = ()) -> int:
        """Choose a replica for a request naming `adapter` and count one more in flight on it.

        Replicas in `exclude` are skipped unless that leaves none. When every candidate has a
        fresh scraped load: the better of two random candidates by `router.replicas.score`;
        otherwise the one with the fewest requests in flight (ties in turn).
        """
        if adapter in self.managed:  # never a replica known to be without it
            exclude = {*exclude, *self.lacking(adapter)}
        candidates = [i for i in range(len(self.roots)) if i not in exclude]
        candidates = candidates or list(range(len(self.roots)))
        fresh = self._fresh_loads(candidates)
        if fresh is not None:
            in_flight = [self.in_flight[i] for i in candidates]
            ranked = scores(fresh, in_flight, adapter)
            chosen = pick_two(ranked, self.rand.random(), self.rand.random())
        else:
            counts = [self.in_flight[i] for i in candidates]
            chosen = least_outstanding(counts, next(self._ticks) % len(candidates))
        index = candidates[chosen]
        self.in_flight[index] += 1
        return index

    def lacking(self, model: str) -> list[int]:
        """Replicas known (from their /v1/models) not to serve `model` now."""
        return [i for i, held in enumerate(self.held) if held is not None and model not in held]

    def serves(self, model: str) -> bool:
        """False only when `model` is a managed adapter that every replica is known to lack."""
        return model not in self.managed or len(self.lacking(model)) < len(self.roots)

    def release(self, index: int) -> None:
        self.in_flight[index] -= 1

    def record_load(self, index: int, load: ReplicaLoad, now: float) -> None:
        """Keep replica `index`'s scraped load, taken at monotonic time `now`."""
        self.loads[index] = load
        self.load_at[index] = now

    def stale_replicas(self, now: float) -> list[int]:
        """Replicas whose load has not been scraped for FRESH_INTERVALS intervals (counted
        from the scraper's start, so none is stale before its first scrape is due)."""
        if self.scrape_interval_s is None or self.scraping_since is None:
            return []
        cutoff = now - FRESH_INTERVALS * self.scrape_interval_s
        since = self.scraping_since
        return [i for i, at in enumerate(self.load_at) if max(at, since) < cutoff]

    def _fresh_loads(self, candidates: list[int]) -> list[ReplicaLoad] | None:
        """The candidates' loads if every one is fresh, else None."""
        if self.scrape_interval_s is None:
            return None
        cutoff = self.clock() - FRESH_INTERVALS * self.scrape_interval_s
        loads = [self.loads[i] for i in candidates]
        if any(self.load_at[i] < cutoff for i in candidates):
            return None
        fresh = [load for load in loads if load is not None]
        return fresh if len(fresh) == len(loads) else None

    def url(self, index: int, path: str) -> str:
        return self.roots[index] + path

    async def post(self, index: int, path: str, payload: bytes, *, wait: float) -> UpstreamResponse:
        """POST JSON to replica `index`; return once the status and headers arrived. The caller
        bounds the whole wait (`wait` also bounds the connect and httpx's own reads)."""
        connect = min(self.timeouts.connect, wait)
        if self.pool is not None:
            return await self.pool.request(
                b"POST", self.roots[index] + path, self._encoded, payload, connect_timeout=connect
            )
        request = self.client.build_request(
            "POST",
            self.roots[index] + path,
            content=payload,
            headers=self._sent,
            timeout=httpx.Timeout(
                connect=connect, read=max(wait, self.timeouts.idle), write=self.timeouts.idle,
                pool=connect,
            ),
        )  # fmt: skip
        return await self.client.send(request, stream=True)

    async def aclose(self) -> None:
        if self.pool is not None:
            await self.pool.aclose()
        await self.client.aclose()


def make_pool(pool: Pool) -> h1.Pool:
    return h1.Pool(max_connections=pool.max_connections, max_keepalive=pool.max_keepalive)


def make_client(
    timeouts: Timeouts, pool: Pool, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """An httpx client with explicit pool limits; idle = read timeout between chunks."""
    limits = httpx.Limits(
        max_connections=pool.max_connections, max_keepalive_connections=pool.max_keepalive
    )
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(
            connect=timeouts.connect, read=timeouts.idle, write=timeouts.idle, pool=timeouts.connect
        ),
        limits=limits,
        transport=transport,
        trust_env=False,
        follow_redirects=False,
    )
    client._cookies = _NoCookies()  # the setter would wrap it in a plain (storing) jar
    return client


class _NoCookies(httpx.Cookies):
    """One client serves every caller of an upstream: a cookie an upstream sets must never
    ride along on another caller's request. Nothing is stored (and nothing is parsed)."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None
