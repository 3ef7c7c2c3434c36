"""Replica choice: least outstanding requests, or load scores and power-of-two-choices.

Scores are in "requests' worth" of expected delay (lower is better). Without scraped metrics a
replica's score is just this gateway's requests in flight on it. With a fresh `ReplicaLoad`:

    in_flight + running + 2 * waiting + 8 * kv_cache**2
      + 4 if the requested adapter is not resident (+ 4 more if its LoRA slots are all taken)

Waiting requests weigh double: a queue means the batch is full and a new request waits behind
all of it. KV-cache use counts with its square, so moderate use barely matters and a nearly
full cache (preemptions ahead) costs as much as a long queue. `in_flight` partly repeats what
vLLM already counts; it stands for what was sent since the last scrape.
"""

from __future__ import annotations

from collections.abc import Sequence

from router.vllm_metrics import ReplicaLoad

IN_FLIGHT_WEIGHT = 1.0
RUNNING_WEIGHT = 1.0
WAITING_WEIGHT = 2.0
KV_CACHE_WEIGHT = 8.0
ADAPTER_MISS = 4.0  # loading an adapter from CPU or disk delays the request
ADAPTER_NO_SLOT = 4.0  # ... and with every LoRA slot busy, it waits for one to free up


def least_outstanding(in_flight: Sequence[int], start: int) -> int:
    """Index of the replica with the fewest requests in flight.

    Ties go to the first tied index at or after `start` (taken modulo the length, wrapping),
    so a caller that advances `start` per request spreads load over equal replicas.
    Raises ValueError on an empty sequence.
    """
    if not in_flight:
        raise ValueError("no replicas to pick from")
    count = len(in_flight)
    order = ((start + step) % count for step in range(count))
    return min(order, key=lambda index: in_flight[index])


def score(load: ReplicaLoad | None, in_flight: int, adapter: str | None) -> float:
    """A replica's expected delay in requests' worth (lower is better; see the module doc).

    `load` None (not scraped, or stale) scores this gateway's requests in flight alone.
    `adapter` is the LoRA adapter the request names, None for none or the base model.
    """
    total = IN_FLIGHT_WEIGHT * in_flight
    if load is None:
        return total
    total += RUNNING_WEIGHT * load.running + WAITING_WEIGHT * load.waiting
    if load.kv_cache is not None:
        total += KV_CACHE_WEIGHT * load.kv_cache**2
    if adapter is not None and adapter not in load.adapters:
        total += ADAPTER_MISS
        if load.max_loras is not None and len(load.running_adapters) >= load.max_loras:
            total += ADAPTER_NO_SLOT
    return total


def scores(
    loads: Sequence[ReplicaLoad | None], in_flight: Sequence[int], model: str | None
) -> list[float]:
    """The score of each replica for a request naming `model`.

    `model` counts as an adapter only if some replica reports it as one: a base model's name
    (or an adapter resident nowhere) would penalise every replica alike, or, with full LoRA
    slots, wrongly favour some.
    """
    resident = any(load is not None and model in load.adapters for load in loads)
    adapter = model if resident else None
    return [score(load, n, adapter) for load, n in zip(loads, in_flight, strict=True)]


def pick_two(scores: Sequence[float], u1: float, u2: float) -> int:
    """Power of two choices: draw two distinct replicas from the uniforms `u1`, `u2` in [0, 1)
    and return the index of the lower score (the first drawn on a tie).

    Choosing the better of two random replicas, not the best of all, keeps many gateways
    that see the same scores from all sending their next request to the same server.
    One replica → 0; raises ValueError on none.
    """
    count = len(scores)
    if count == 0:
        raise ValueError("no replicas to pick from")
    if count == 1:
        return 0
    first = min(max(int(u1 * count), 0), count - 1)
    second = min(max(int(u2 * (count - 1)), 0), count - 2)
    if second >= first:
        second += 1
    return second if scores[second] < scores[first] else first
