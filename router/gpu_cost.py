"""GPU cost of self-hosted variants: busy time, its split among requests, fleet cost, capacity.

A replica costs `hourly_usd * count / 3600` dollars a second, busy or idle. Requests pay for
its busy time only (the union of their intervals); idle time is the fleet's, reported apart
(`fleet_cost`). Busy time is shared by work: a generated token weighs 1, a prompt token
`prefill_factor` (prefill runs batched and is far cheaper per token than decoding).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Window = tuple[float, float]


@dataclass(frozen=True)
class Served:
    """One finished request on one replica: its interval in seconds (any one clock) and tokens."""

    start: float
    end: float
    prompt_tokens: int
    completion_tokens: int

    def weight(self, prefill_factor: float) -> float:
        """The request's work: `prefill_factor * prompt + completion` tokens."""
        return prefill_factor * self.prompt_tokens + self.completion_tokens

    @property
    def seconds(self) -> float:
        return max(self.end - self.start, 0.0)


def usd_per_second(hourly_usd: float, count: int) -> float:
    """What one replica with `count` GPUs at `hourly_usd` each costs per second."""
    return hourly_usd * count / 3600


def busy_seconds(intervals: Iterable[tuple[float, float]], window: Window) -> float:
    """Length of the union of `intervals` clipped to `window` (overlaps count once)."""
    low, high = window
    clipped = sorted(
        (max(s, low), min(e, high)) for s, e in intervals if min(e, high) > max(s, low)
    )
    total, reach = 0.0, low
    for start, end in clipped:
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def inside(request: Served, window: Window) -> float:
    """The fraction of `request`'s interval inside `window` (an instant: 1 inside, 0 outside)."""
    low, high = window
    if request.end <= request.start:
        return 1.0 if low <= request.end <= high else 0.0
    overlap = min(request.end, high) - max(request.start, low)
    return max(overlap, 0.0) / (request.end - request.start)


def _split(total: float, weights: Sequence[float], seconds: Sequence[float]) -> list[float]:
    """`total` shared in proportion to `weights`; when they are all zero, to `seconds` (a
    request with no tokens still held the replica); when those are all zero too, nobody pays
    (the total is then zero too, for a busy cost: no request held the replica at all)."""
    shares = weights if sum(weights) > 0 else seconds
    whole = sum(shares)
    if whole <= 0:
        return [0.0] * len(shares)
    return [total * share / whole for share in shares]


def attribute(
    requests: Sequence[Served], usd_per_s: float, prefill_factor: float, window: Window
) -> list[float]:
    """Each request's dollars of the replica's busy cost in `window`; they sum to that cost.

    The busy cost is `usd_per_s * busy_seconds` of the requests' intervals. It is shared by the
    tokens processed in the window: each request's weight times the fraction of its interval
    inside the window (tokens taken as spread evenly over it). A zero-weight request gets
    nothing while any other has weight; if all weights are zero the cost is shared by seconds
    inside the window.
    """
    busy = usd_per_s * busy_seconds([(r.start, r.end) for r in requests], window)
    fractions = [inside(r, window) for r in requests]
    weights = [r.weight(prefill_factor) * f for r, f in zip(requests, fractions, strict=True)]
    seconds = [r.seconds * f for r, f in zip(requests, fractions, strict=True)]
    return _split(busy, weights, seconds)


def settle_charge(unpaid: float, weight: float, running_weight: float) -> float:
    """What a request pays as it leaves its replica, when costs are settled one by one.

    `unpaid`: the replica's busy cost that no earlier request has paid, this request's own
    time included; `running_weight`: the (estimated) work of the requests still running there,
    which shared that time. The request pays its work's part of the unpaid cost; the last to
    leave (nothing running) pays all of it, so the charges of a stretch of busy time add up to
    its cost. Never negative, never more than `unpaid`.
    """
    unpaid = max(unpaid, 0.0)
    if running_weight <= 0:
        return unpaid
    if weight <= 0:
        return 0.0
    return unpaid * weight / (weight + running_weight)


def fleet_cost(hourly_usd: float, count: int, replicas: int, seconds: float) -> float:
    """Dollars for `replicas` replicas of `count` GPUs for `seconds`, busy or idle."""
    return usd_per_second(hourly_usd, count) * replicas * seconds


def peak_throughput(
    requests: Iterable[Served], bucket_s: float = 10.0, prefill_factor: float = 0.0
) -> float:
    """Tokens per second in the busiest `bucket_s` bucket (buckets start at multiples of it).

    Tokens are weighted (`prefill_factor * prompt + completion`; the default 0 counts
    generated tokens only, like vLLM's generation throughput) and spread evenly over each
    request's interval; an instant request's land at its end. 0.0 with no requests.
    """
    if bucket_s <= 0:
        raise ValueError("bucket_s must be positive")
    buckets: dict[int, float] = {}
    for request in requests:
        weight = request.weight(prefill_factor)
        if request.seconds <= 0:
            index = math.floor(request.end / bucket_s)
            buckets[index] = buckets.get(index, 0.0) + weight
            continue
        rate = weight / request.seconds
        for index in range(math.floor(request.start / bucket_s), math.ceil(request.end / bucket_s)):
            low, high = index * bucket_s, (index + 1) * bucket_s
            overlap = min(request.end, high) - max(request.start, low)
            buckets[index] = buckets.get(index, 0.0) + rate * max(overlap, 0.0)
    return max(buckets.values(), default=0.0) / bucket_s


def cost_at_capacity(usd_per_s: float, tokens_per_s: float, weight: float) -> float:
    """Dollars for a request of `weight` on a replica running flat out at `tokens_per_s`
    (weighted tokens, see `peak_throughput`); infinite when no capacity was measured."""
    if tokens_per_s <= 0:
        return math.inf if weight > 0 else 0.0
    return usd_per_s * weight / tokens_per_s


def break_even_rate(fleet_usd_per_hour: float, hosted_cost_per_request: float) -> float:
    """Requests per hour above which the fleet (a fixed cost) is cheaper than paying the hosted
    variant per request: `fleet_usd_per_hour / hosted_cost_per_request`. Infinite when the
    hosted variant costs nothing per request (the fleet never wins), 0 when the fleet is free.
    """
    if fleet_usd_per_hour < 0 or hosted_cost_per_request < 0:
        raise ValueError("costs must not be negative")
    if fleet_usd_per_hour == 0:
        return 0.0
    if hosted_cost_per_request == 0:
        return math.inf
    return fleet_usd_per_hour / hosted_cost_per_request
