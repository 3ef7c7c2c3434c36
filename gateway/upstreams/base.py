"""What every upstream kind provides: endpoints, credentials and one pooled HTTP client."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import httpx

from gateway.settings import Pool, Timeouts
from router.replicas import least_outstanding


@dataclass
class Upstream:
    """One configured upstream: its replicas' API roots (ending in /v1) and one shared client.

    `headers` carry Turnout's own credentials; `secrets` are the values to scrub from anything
    that reaches a client or a log line.
    """

    name: str
    kind: str
    roots: list[str]
    client: httpx.AsyncClient
    timeouts: Timeouts
    headers: dict[str, str] = field(default_factory=dict)
    secrets: tuple[str, ...] = ()
    billed: bool = True
    in_flight: list[int] = field(init=False)
    _ticks: itertools.count[int] = field(init=False, default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.in_flight = [0] * len(self.roots)

    def acquire(self) -> int:
        """Choose the replica with the fewest requests in flight and count one more on it."""
        index = least_outstanding(self.in_flight, next(self._ticks) % len(self.roots))
        self.in_flight[index] += 1
        return index

    def release(self, index: int) -> None:
        self.in_flight[index] -= 1

    def url(self, index: int, path: str) -> str:
        return self.roots[index] + path

    async def aclose(self) -> None:
        await self.client.aclose()


def make_client(
    timeouts: Timeouts, pool: Pool, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """An httpx client with explicit pool limits; idle = read timeout between chunks."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(
            connect=timeouts.connect, read=timeouts.idle, write=timeouts.idle, pool=timeouts.connect
        ),
        limits=httpx.Limits(
            max_connections=pool.max_connections, max_keepalive_connections=pool.max_keepalive
        ),
        transport=transport,
        trust_env=False,
        follow_redirects=False,
    )
