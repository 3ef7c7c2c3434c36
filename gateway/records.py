"""Request records: what each request cost and how long it took, kept for reports and the demo."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import msgspec

from gateway.settings import Price


class Usage(msgspec.Struct, kw_only=True):
    """Tokens of one request; `injected` is the part of `prompt` that Turnout added."""

    prompt: int = 0
    injected: int = 0
    completion: int = 0
    cached: int = 0
    estimated: bool = False


class RequestRecord(msgspec.Struct, kw_only=True):
    request_id: str
    route: str
    variant: str
    upstream: str
    tuning: str
    endpoint: str
    stream: bool
    status: int
    started_at: float
    duration_s: float
    ttft_s: float | None = None
    usage: Usage = msgspec.field(default_factory=Usage)
    cost_usd: float = 0.0
    error: str | None = None


class RecordLog:
    """The most recent records in memory (bounded)."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._records: deque[RequestRecord] = deque(maxlen=capacity)
        self._by_id: dict[str, RequestRecord] = {}

    def add(self, record: RequestRecord) -> None:
        """Keep `record`; the oldest goes when full. A reused request id finds the newest."""
        if len(self._records) == self._records.maxlen:
            oldest = self._records[0]
            if self._by_id.get(oldest.request_id) is oldest:
                del self._by_id[oldest.request_id]
        self._records.append(record)
        self._by_id[record.request_id] = record

    def get(self, request_id: str) -> RequestRecord | None:
        return self._by_id.get(request_id)

    def __iter__(self) -> Iterator[RequestRecord]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)


def token_cost(price: Price | None, usage: Usage) -> float:
    """Dollars for the tokens of one request at a per-million-token price (0 when unpriced)."""
    if price is None:
        return 0.0
    cached = min(usage.cached, usage.prompt)
    cached_rate = price.cached_input_per_mtok
    if cached_rate is None:
        cached_rate = price.input_per_mtok
    dollars = (
        (usage.prompt - cached) * price.input_per_mtok
        + cached * cached_rate
        + usage.completion * price.output_per_mtok
    )
    return dollars / 1_000_000


def usage_from(payload: object, injected: int) -> Usage | None:
    """Our Usage from an OpenAI `usage` object (None when absent or malformed)."""
    if not isinstance(payload, dict):
        return None
    prompt = payload.get("prompt_tokens")
    completion = payload.get("completion_tokens", 0)
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    details = payload.get("prompt_tokens_details")
    cached = details.get("cached_tokens", 0) if isinstance(details, dict) else 0
    return Usage(
        prompt=prompt,
        injected=min(injected, prompt),
        completion=completion,
        cached=cached if isinstance(cached, int) else 0,
    )
