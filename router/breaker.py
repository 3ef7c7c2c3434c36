"""Circuit breakers per (variant, replica): a state machine driven by a clock passed in."""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass

# Outcomes kept per breaker at most, so a flood of requests cannot grow memory without bound;
# past this many in one window the ratio is taken over the newest ones.
MAX_WINDOW_OUTCOMES = 4096


@dataclass(frozen=True)
class BreakerConfig:
    """When a circuit opens and how it recovers (mirrors gateway settings `routing.breaker`)."""

    consecutive_failures: int = 5
    failure_ratio: float = 0.5
    window_s: float = 30.0
    min_requests: int = 10
    cooldown_s: float = 10.0
    half_open_probes: int = 1

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1 or self.min_requests < 1 or self.half_open_probes < 1:
            raise ValueError("breaker counts must be at least 1")
        if not 0 < self.failure_ratio <= 1:
            raise ValueError("failure_ratio must be in (0, 1]")
        if self.window_s <= 0 or self.cooldown_s <= 0:
            raise ValueError("breaker durations must be positive")


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class _Window:
    """Outcomes (time, failed) over the last `span` seconds, with running totals."""

    def __init__(self, span: float) -> None:
        self._span = span
        self._outcomes: deque[tuple[float, bool]] = deque()
        self.failures = 0

    def __len__(self) -> int:
        return len(self._outcomes)

    def add(self, now: float, failed: bool) -> None:
        if len(self._outcomes) >= MAX_WINDOW_OUTCOMES:
            self._drop_oldest()
        self._outcomes.append((now, failed))
        self.failures += failed
        self.expire(now)

    def expire(self, now: float) -> None:
        """Drop outcomes older than `span` seconds before `now`."""
        while self._outcomes and now - self._outcomes[0][0] > self._span:
            self._drop_oldest()

    def clear(self) -> None:
        self._outcomes.clear()
        self.failures = 0

    def _drop_oldest(self) -> None:
        _, failed = self._outcomes.popleft()
        self.failures -= failed


class CircuitBreaker:
    """One circuit. Every method takes the current time (seconds, any monotonic origin).

    Outcomes of attempts allowed before the circuit opened may arrive while it is open; they
    are ignored (a late failure still updates `last_failure_at`). Not thread-safe: meant for
    one event loop.
    """

    def __init__(self, config: BreakerConfig) -> None:
        self._config = config
        self._state = State.CLOSED
        self._opened_at = 0.0
        self._consecutive = 0
        self._probes_out = 0
        self._window = _Window(config.window_s)
        self.last_failure_at: float | None = None

    def state(self, now: float) -> State:
        """The state at `now`: OPEN becomes HALF_OPEN once `cooldown_s` has passed since opening."""
        if self._state is State.OPEN and now - self._opened_at >= self._config.cooldown_s:
            self._state = State.HALF_OPEN
            self._probes_out = 0
        return self._state

    def allow(self, now: float) -> bool:
        """May an attempt start now? In HALF_OPEN a True reserves one of the limited probes."""
        state = self.state(now)
        if state is State.CLOSED:
            return True
        if state is State.HALF_OPEN and self._probes_out < self._config.half_open_probes:
            self._probes_out += 1
            return True
        return False

    def admits(self, now: float) -> bool:
        """Would `allow` say yes now? (Reserves nothing.)"""
        state = self.state(now)
        if state is State.HALF_OPEN:
            return self._probes_out < self._config.half_open_probes
        return state is State.CLOSED

    def success(self, now: float) -> None:
        """An allowed attempt succeeded: closes a half-open circuit, else counts in the window."""
        state = self.state(now)
        if state is State.HALF_OPEN:
            self._close()
        elif state is State.CLOSED:
            self._consecutive = 0
            self._window.add(now, failed=False)

    def failure(self, now: float) -> None:
        """An allowed attempt failed through the upstream's fault: may open the circuit."""
        self.last_failure_at = now
        state = self.state(now)
        if state is State.HALF_OPEN:
            self._open(now)
        elif state is State.CLOSED:
            self._consecutive += 1
            self._window.add(now, failed=True)
            if self._should_open():
                self._open(now)

    def release(self, now: float) -> None:
        """An allowed attempt ended with no verdict: frees a half-open probe, counts nothing."""
        if self.state(now) is State.HALF_OPEN and self._probes_out > 0:
            self._probes_out -= 1

    def _should_open(self) -> bool:
        config = self._config
        if self._consecutive >= config.consecutive_failures:
            return True
        total = len(self._window)
        return total >= config.min_requests and self._window.failures >= (
            config.failure_ratio * total
        )

    def _open(self, now: float) -> None:
        self._state = State.OPEN
        self._opened_at = now
        self._probes_out = 0
        self._consecutive = 0
        self._window.clear()

    def _close(self) -> None:
        self._state = State.CLOSED
        self._probes_out = 0
        self._consecutive = 0
        self._window.clear()


class BreakerBoard:
    """Breakers keyed by (variant, replica index), made on first use."""

    def __init__(self, config: BreakerConfig) -> None:
        self._config = config
        self._breakers: dict[str, dict[int, CircuitBreaker]] = {}

    def breaker(self, variant: str, replica: int) -> CircuitBreaker:
        """The breaker of (variant, replica), made closed if it did not exist yet."""
        replicas = self._breakers.setdefault(variant, {})
        found = replicas.get(replica)
        if found is None:
            found = replicas[replica] = CircuitBreaker(self._config)
        return found

    def is_open(self, variant: str, replica: int, now: float) -> bool:
        """True when that circuit is OPEN (a half-open circuit is not open)."""
        found = self._breakers.get(variant, {}).get(replica)
        return found is not None and found.state(now) is State.OPEN

    def admits(self, variant: str, replica: int, now: float) -> bool:
        """True when that circuit would let an attempt through now (a breaker never made does)."""
        found = self._breakers.get(variant, {}).get(replica)
        return found is None or found.admits(now)

    def variant_available(self, variant: str, replicas: int, now: float) -> bool:
        """True when some replica in range(replicas) of `variant` would let an attempt through
        (not OPEN, and not HALF_OPEN with every probe already out)."""
        return any(self.admits(variant, index, now) for index in range(replicas))

    def last_failure(self, variant: str) -> float:
        """The latest failure time over the variant's replicas; -inf if none ever failed."""
        times = (
            breaker.last_failure_at
            for breaker in self._breakers.get(variant, {}).values()
            if breaker.last_failure_at is not None
        )
        return max(times, default=-math.inf)

    def open_circuits(self, now: float) -> list[tuple[str, int]]:
        """Every (variant, replica) whose circuit is OPEN at `now`, sorted."""
        return sorted(
            (variant, index)
            for variant, replicas in self._breakers.items()
            for index, breaker in replicas.items()
            if breaker.state(now) is State.OPEN
        )
