"""Which models (base and LoRA adapters) each replica of a managed vLLM upstream holds.

One task per upstream polls every replica's `/v1/models` (vLLM lists adapters there with
`parent` = the base model) each `scrape_interval_s` and keeps the names on `Upstream.held`. A
replica that cannot be read keeps what it listed last; failures are logged once a minute.
"""

from __future__ import annotations

import asyncio

import msgspec

from gateway.poller import ReplicaPoller

POLL_TIMEOUT_S = 2.0
MAX_BYTES = 1024 * 1024


class _Models(msgspec.Struct):
    data: list[_Model]


class _Model(msgspec.Struct):
    id: str


_decode_models = msgspec.json.Decoder(_Models).decode


class ModelWatcher(ReplicaPoller):
    """One task per managed upstream: every replica's /v1/models, each interval."""

    kind = "models"

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
            self._log_failure(
                index,
                "upstream %s replica %d: /v1/models unreadable (%s); keeping what it listed last",
                str(exc) or type(exc).__name__,
            )
            return
        upstream.held[index] = frozenset(m.id for m in models.data)
