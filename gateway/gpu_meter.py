"""The GPU meter of one self-hosted upstream: per replica, recent requests and what each paid."""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from gateway.settings import Gpu
from router.gpu_cost import (
    Served,
    fleet_cost,
    peak_throughput,
    settle_charge,
    usd_per_second,
)

Span = tuple[float, float]


@dataclass(frozen=True)
class Settled:
    """A request the ledger remembers: its work, the busy seconds it added, what it paid."""

    served: Served
    weight: float
    added: float
    paid: float


class ReplicaLedger:
    """One replica's settled requests in the window, the busy time they cover and what they paid.

    Running sums keep a charge cheap (no pass over the window): the unpaid cost is
    `usd_per_s * busy - paid` over the retained requests and the newcomer. A request is retained
    until it ended `window_s` before now (at most `limit` of them); busy time before the
    window's start is forgotten.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.entries: deque[Settled] = deque()
        self.blocks: list[Span] = []  # the union of retained busy time: disjoint, sorted
        self.busy = self.weight = self.paid = 0.0

    def prune(self, low: float) -> None:
        """Forget requests that ended at or before `low`, and busy time that did."""
        while self.entries and self.entries[0].served.end <= low:
            self._forget()
        ended = bisect.bisect_right(self.blocks, low, key=lambda block: block[1])
        del self.blocks[: max(ended, len(self.blocks) - self.limit)]

    def price(
        self, served: Served, weight: float, running: int, usd_per_s: float, low: float
    ) -> tuple[float, float]:
        """(dollars, busy seconds added) for `served` settling now; changes nothing. The
        `running` requests still on the replica are taken to weigh the window's mean."""
        start = max(served.start, low)
        added = max(served.end - start, 0.0) - self._covered(start, served.end)
        unpaid = usd_per_s * (self.busy + added) - self.paid
        mean = (self.weight + weight) / (len(self.entries) + 1)
        return settle_charge(unpaid, weight, running * mean), added

    def keep(self, entry: Settled, low: float) -> None:
        """Remember a settled request and merge its interval into the busy time."""
        if len(self.entries) >= self.limit:
            self._forget()
        self.entries.append(entry)
        self.busy += entry.added
        self.weight += entry.weight
        self.paid += entry.paid
        start, end = max(entry.served.start, low), entry.served.end
        if end <= start:
            return
        first, last = self._touching(start, end)
        if first < last:
            start = min(start, self.blocks[first][0])
            end = max(end, self.blocks[last - 1][1])
        self.blocks[first:last] = [(start, end)]

    def _forget(self) -> None:
        gone = self.entries.popleft()
        self.busy -= gone.added
        self.weight -= gone.weight
        self.paid -= gone.paid
        if not self.entries:  # start again from exact zeros rather than carry rounding
            self.busy = self.weight = self.paid = 0.0

    def _touching(self, start: float, end: float) -> tuple[int, int]:
        """The run of blocks overlapping or touching [start, end], as a slice."""
        first = bisect.bisect_left(self.blocks, start, key=lambda block: block[1])
        last = first
        while last < len(self.blocks) and self.blocks[last][0] <= end:
            last += 1
        return first, last

    def _covered(self, start: float, end: float) -> float:
        first, last = self._touching(start, end)
        return sum(
            max(min(high, end) - max(low, start), 0.0) for low, high in self.blocks[first:last]
        )


@dataclass(frozen=True)
class FleetFigures:
    """What a report reads from a meter, taken at one moment: safe to use off the event loop
    (the meter itself belongs to the loop)."""

    gpu: Gpu
    replicas: int
    peak_tokens_per_s: float

    def fleet_cost(self, seconds: float) -> float:
        return fleet_cost(self.gpu.hourly_usd, self.gpu.count, self.replicas, seconds)

    def capacity(self) -> float:
        return self.peak_tokens_per_s


class GpuMeter:
    """GPU dollars for the requests of one upstream's replicas, from each replica's busy time.

    Busy time (the union of request intervals) is a running tab on each replica; idle time
    is on no request's tab. A request leaving its replica pays its work's part (by
    `Gpu.prefill_factor * prompt + completion`) of the tab so far, shared with the requests
    still running there, counted at the window's mean work; the last to leave pays the rest
    (router.gpu_cost.settle_charge). So the charges of a stretch of busy time add up to
    `usd_per_s * its busy seconds`, never more. Requests that ended over `window_s` ago are
    forgotten. Spans and `clock` share one clock (time.perf_counter). One event loop only.
    """

    def __init__(
        self,
        gpu: Gpu,
        replicas: int,
        *,
        window_s: float = 300.0,
        limit: int = 10_000,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if replicas < 1 or window_s <= 0 or limit < 1:
            raise ValueError("a GPU meter needs replicas >= 1, window_s > 0 and limit >= 1")
        self.gpu = gpu
        self.replicas = replicas
        self.window_s = window_s
        self.usd_per_s = usd_per_second(gpu.hourly_usd, gpu.count)
        self._clock = clock
        self._ledgers = [ReplicaLedger(limit) for _ in range(replicas)]

    def quote(
        self, replica: int, span: Span, prompt: int, completion: int, *, running: int
    ) -> float:
        """What the request would pay if it settled now; nothing is remembered."""
        return self._charge(replica, span, prompt, completion, running, keep=False)

    def settle(
        self, replica: int, span: Span, prompt: int, completion: int, *, running: int
    ) -> float:
        """What the request pays, remembered as paid (once per request, when it is recorded).

        `span`: its start and end; `prompt`: the prompt tokens the replica computed (cached
        ones excluded); `running`: how many other requests are on the replica now. A request
        with no tokens did no work: it pays nothing and is not remembered.
        """
        return self._charge(replica, span, prompt, completion, running, keep=True)

    def history(self, replica: int) -> list[Served]:
        """The replica's requests still in the window, oldest settled first."""
        ledger = self._ledgers[replica]
        ledger.prune(self._clock() - self.window_s)
        return [entry.served for entry in ledger.entries]

    def figures(self) -> FleetFigures:
        return FleetFigures(self.gpu, self.replicas, self.capacity())

    def fleet_cost(self, seconds: float) -> float:
        """Dollars for all replicas over `seconds`, busy or idle."""
        return fleet_cost(self.gpu.hourly_usd, self.gpu.count, self.replicas, seconds)

    def capacity(self, bucket_s: float = 10.0) -> float:
        """Weighted tokens/s of the busiest replica in its busiest bucket of the window: what
        one replica was seen to sustain (a lower bound on what it can)."""
        factor = self.gpu.prefill_factor
        return max(
            peak_throughput(self.history(replica), bucket_s, factor)
            for replica in range(self.replicas)
        )

    def _charge(
        self, replica: int, span: Span, prompt: int, completion: int, running: int, *, keep: bool
    ) -> float:
        if prompt + completion <= 0:
            return 0.0
        ledger = self._ledgers[replica]
        low = self._clock() - self.window_s
        ledger.prune(low)
        served = Served(span[0], span[1], prompt, completion)
        weight = served.weight(self.gpu.prefill_factor)
        paid, added = ledger.price(served, weight, max(running, 0), self.usd_per_s, low)
        if keep:
            ledger.keep(Settled(served, weight, added, paid), low)
        return paid
