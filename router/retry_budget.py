"""Retry budget in the style of Envoy: retries may add only a share on top of live requests."""

from __future__ import annotations

import math

# Absorbs float error in ratio * requests (0.29 * 100 is 28.999999999999996, meant as 29).
_EPSILON = 1e-9


class RetryBudget:
    """Counts client requests and retry attempts in flight, and caps the retries.

    A retry may start while retries_in_flight < max(minimum, floor(ratio * requests_in_flight)),
    so a dead upstream sees at most that many extra attempts at once. Not thread-safe: meant
    for one event loop.
    """

    def __init__(self, ratio: float = 0.2, minimum: int = 3) -> None:
        if ratio < 0 or minimum < 0:
            raise ValueError("retry budget ratio and minimum must not be negative")
        self._ratio = ratio
        self._minimum = minimum
        self._requests = 0
        self._retries = 0

    @property
    def requests_in_flight(self) -> int:
        return self._requests

    @property
    def retries_in_flight(self) -> int:
        return self._retries

    @property
    def limit(self) -> int:
        """How many retries may be in flight at once, given the requests in flight now."""
        return max(self._minimum, math.floor(self._ratio * self._requests + _EPSILON))

    def begin(self) -> None:
        """A client request starts."""
        self._requests += 1

    def end(self) -> None:
        """A client request ends; ValueError if none was in flight."""
        if self._requests <= 0:
            raise ValueError("no request in flight")
        self._requests -= 1

    def acquire(self) -> bool:
        """May one more retry start now? If so it is counted until `release`."""
        if self._retries >= self.limit:
            return False
        self._retries += 1
        return True

    def release(self) -> None:
        """A retry attempt that `acquire` allowed has ended; ValueError if none was in flight."""
        if self._retries <= 0:
            raise ValueError("no retry in flight")
        self._retries -= 1
