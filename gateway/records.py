"""Request records: what each request cost and how long it took (kept by gateway.record_store)."""

from __future__ import annotations

import msgspec

from gateway.settings import Price


class Usage(msgspec.Struct, kw_only=True, gc=False):
    """Tokens of one request. `injected` is the part of `prompt` that Turnout added, `cached`
    the part the upstream served from its prompt cache; `reasoning` is part of `completion`.
    `estimated` is true when the upstream gave no usage and tiktoken counted instead."""

    prompt: int = 0
    injected: int = 0
    completion: int = 0
    cached: int = 0
    reasoning: int = 0
    estimated: bool = False


class Latency(msgspec.Struct, kw_only=True, gc=False):
    """Seconds. `upstream`: from sending upstream to its last byte; `overhead` = total - upstream.
    `ttft`: until the first event reached the client (streams); `tpot`: per output token after
    the first (streams with two or more completion tokens)."""

    total: float
    upstream: float = 0.0
    overhead: float = 0.0
    ttft: float | None = None
    tpot: float | None = None


class RequestRecord(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """One request, compact; never prompts, answers or keys (only the key's name) unless
    `records.content` is on, in which case `content` holds {"request": …, "response": …}."""

    request_id: str
    time: float  # unix seconds at arrival
    route: str
    variant: str
    upstream: str
    tuning: str
    endpoint: str
    stream: bool
    status: int
    latency: Latency
    key: str | None = None
    replica: int | None = None
    usage: Usage = msgspec.field(default_factory=Usage)
    cost_usd: float = 0.0
    prompt_tax_usd: float = 0.0  # the part of cost_usd paid for injected prompt tokens
    error: str | None = None
    attempts: int = 1  # upstream calls made for it (retries and fallbacks included)
    shadow_of: str | None = None  # set on a shadow request: the primary's request_id
    forced: bool = False  # the admin chose the variant (offline eval): not part of the A/B
    content: dict[str, object] | None = None
    # On a shadow: {exact, similarity, json_equal, agreement} vs the primary's answer
    # (router.compare), or just {agreement: "error"} when the shadow call failed.
    comparison: dict[str, object] | None = None


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
    return Usage(
        prompt=prompt,
        injected=min(injected, prompt),
        completion=completion,
        cached=_detail(payload, "prompt_tokens_details", "cached_tokens"),
        reasoning=_detail(payload, "completion_tokens_details", "reasoning_tokens"),
    )


def _detail(payload: dict[str, object], group: str, name: str) -> int:
    details = payload.get(group)
    value = details.get(name, 0) if isinstance(details, dict) else 0
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def prompt_tax(price: Price | None, usage: Usage) -> float:
    """Dollars paid for the prompt tokens Turnout injected (at the uncached input rate)."""
    return 0.0 if price is None else usage.injected * price.input_per_mtok / 1_000_000
