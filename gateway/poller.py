"""A task per upstream that polls each of its replicas every interval (the base of the
metrics scraper and the model watcher): one replica's failure never stops the others or the
task, and failures are logged at most once a minute per replica."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math

from gateway.errors import scrub
from gateway.upstreams import Upstream

log = logging.getLogger("turnout")

LOG_EVERY_S = 60.0


class ReplicaPoller:
    """Subclasses say what one replica's poll is (`_poll`) and name the task (`kind`)."""

    kind = "poll"

    def __init__(self, upstream: Upstream, interval_s: float) -> None:
        self.upstream = upstream
        self.interval = interval_s
        self._task: asyncio.Task[None] | None = None
        self._logged_at = [-math.inf] * len(upstream.roots)

    def start(self) -> None:
        if self._task is None:
            name = f"{self.kind} {self.upstream.name}"
            self._task = asyncio.create_task(self._run(), name=name)

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def poll_once(self) -> None:
        """Poll every replica once, concurrently."""
        await asyncio.gather(*(self._poll(i) for i in range(len(self.upstream.roots))))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            await self.poll_once()
            await asyncio.sleep(max(self.interval - (loop.time() - began), 0.0))

    async def _poll(self, index: int) -> None:
        raise NotImplementedError

    def _log_failure(self, index: int, message: str, reason: str) -> None:
        """`message` with %s for the upstream, %d for the replica and %s for the (scrubbed)
        reason; at most once a minute per replica."""
        now = self.upstream.clock()
        if now - self._logged_at[index] >= LOG_EVERY_S:
            self._logged_at[index] = now
            reason = scrub(reason, self.upstream.secrets)
            log.warning(message, self.upstream.name, index, reason)
