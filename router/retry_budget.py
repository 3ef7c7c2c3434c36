"""Retry budget: retries may add only a share on top of client requests, at once and in all."""

from __future__ import annotations

import math

# Absorbs float error in ratio * requests (0.29 * 100 is 28.999999999999996, meant as 29).
_EPSILON = 1e-9


class RetryBudget:
    """Counts client requests and retry attempts, and caps the retries two ways.

    At once (as Envoy): a retry may start while
    retries_in_flight < max(minimum, floor(ratio * requests_in_flight)).

    In all (as Finagle): every client request earns `ratio` of a retry and every retry spends
    one, from a balance that starts at `minimum`. So over any stretch of an outage, retries
    <= ratio * requests + what was saved before it; the saving is capped at
    minimum + ratio * requests_in_flight, so healthy traffic does not bank retries for the
    next outage (a quiet gateway keeps `minimum` of them for an odd failure). Without this,
    quick failures keep few retries in flight at any moment, the first cap never binds, and a
    dead upstream sees every request `max_attempts` times.

    Not thread-safe: meant for one event loop.
    """

    def __init__(self, ratio: float = 0.2, minimum: int = 3) -> None:
        if ratio < 0 or minimum < 0:
            raise ValueError("retry budget ratio and minimum must not be negative")
        self._ratio = ratio
        self._minimum = minimum
        self._requests = 0
        self._retries = 0
        self._balance = float(minimum)

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

    @property
    def balance(self) -> float:
        """Retries that may still start in all (the in-flight cap aside)."""
        return self._balance

    def begin(self) -> None:
        """A client request starts: it earns `ratio` of a retry."""
        self._requests += 1
        cap = self._minimum + self._ratio * self._requests
        self._balance = min(self._balance + self._ratio, cap)

    def end(self) -> None:
        """A client request ends; ValueError if none was in flight."""
        if self._requests <= 0:
            raise ValueError("no request in flight")
        self._requests -= 1

    def acquire(self) -> bool:
        """May one more retry start now? If so it is counted until `release`, and spent."""
        if self._retries >= self.limit or self._balance < 1 - _EPSILON:
            return False
        self._retries += 1
        self._balance -= 1
        return True

    def release(self) -> None:
        """A retry attempt that `acquire` allowed has ended; ValueError if none was in flight."""
        if self._retries <= 0:
            raise ValueError("no retry in flight")
        self._retries -= 1
