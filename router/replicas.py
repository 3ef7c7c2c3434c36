"""Replica choice: requests in flight per replica and the least-outstanding pick."""

from __future__ import annotations

from collections.abc import Sequence


class InFlight:
    """Requests in flight per replica index, for one upstream's replicas.

    Not thread-safe: meant for one event loop, where acquire/release never interleave.
    """

    def __init__(self, replicas: int) -> None:
        if replicas < 1:
            raise ValueError("an upstream needs at least one replica")
        self._counts = [0] * replicas

    def __len__(self) -> int:
        return len(self._counts)

    @property
    def counts(self) -> tuple[int, ...]:
        """A snapshot of the in-flight count of each replica, by index."""
        return tuple(self._counts)

    def acquire(self, index: int) -> None:
        """Count one more request in flight on replica `index`."""
        self._counts[index] += 1

    def release(self, index: int) -> None:
        """Count one request on replica `index` as finished; ValueError if none was in flight."""
        if self._counts[index] <= 0:
            raise ValueError(f"replica {index} has no request in flight")
        self._counts[index] -= 1

    def pick(self, start: int) -> int:
        """The least-outstanding replica, ties broken from `start` (see least_outstanding)."""
        return least_outstanding(self._counts, start)


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
