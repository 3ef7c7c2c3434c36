"""Which models (base and LoRA adapters) each replica of a managed vLLM upstream holds.

One task per upstream polls every replica's `/v1/models` (vLLM lists adapters there with
`parent` = the base model) each `scrape_interval_s` and keeps the names on `Upstream.held`. A
replica that cannot be read keeps what it listed last; failures are logged once a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math

import msgspec

from gateway.errors import scrub
from gateway.upstreams import Upstream

log = logging.getLogger("turnout")

POLL_TIMEOUT_S = 2.0
LOG_EVERY_S = 60.0
MAX_BYTES = 1024 * 1024


class _Models(msgspec.Struct):
    data: list[_Model]


class _Model(msgspec.Struct):
    id: str


_decode_models = msgspec.json.Decoder(_Models).decode


class ModelWatcher:
    """One task per managed upstream: every replica's /v1/models, each interval."""

    def __init__(self, upstream: Upstream, interval_s: float) -> None:
        self.upstream = upstream
        self.interval = interval_s
        self._task: asyncio.Task[None] | None = None
        self._logged_at = [-math.inf] * len(upstream.roots)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"models {self.upstream.name}")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll(i) for i in range(len(self.upstream.roots))))

    async def _run(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self.interval)

    async def _poll(self, index: int) -> None:
        upstream = self.upstream
        try:
            async with asyncio.timeout(POLL_TIMEOUT_S):
                response = await upstream.client.get(
                    upstream.url(index, "/models"), headers=upstream.headers
                )
            if response.status_code != 200 or len(response.content) > MAX_BYTES:
                raise ValueError(f"HTTP {response.status_code}")
            models = _decode_models(response.content)
        except Exception as exc:  # keep the last known list; the task must not die
            now = upstream.clock()
            if now - self._logged_at[index] >= LOG_EVERY_S:
                self._logged_at[index] = now
                reason = scrub(str(exc) or type(exc).__name__, upstream.secrets)
                log.warning(
                    "upstream %s replica %d: /v1/models unreadable (%s); keeping what it "
                    "listed last",
                    upstream.name,
                    index,
                    reason,
                )
            return
        upstream.held[index] = frozenset(m.id for m in models.data)
