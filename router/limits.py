"""Rate-limit and budget-period arithmetic: GCRA over a clock passed in, UTC calendar periods.

GCRA (the generic cell rate algorithm) keeps one number per key, the *theoretical arrival
time* (TAT): the moment at which the key's bucket would be empty again. "`limit` units per
`window_s`" means each unit pushes the TAT `window_s / limit` seconds further; a request is
admitted while the TAT it would leave is at most `window_s` ahead of now. A burst of `limit`
units is admitted from an idle key, then units come back at a steady rate. A cost weighs a
request (1 for requests per minute, its tokens for tokens per minute).

The Redis store runs the same arithmetic inside a Lua script; the tests hold both to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

# Slack when comparing times: float TATs near the epoch (~1.7e9 s) carry rounding of ~1e-7 s
# per addition, so an exact burst of `limit` could otherwise lose its last unit. Admitting up
# to 100 µs early lets through at most `rate * 1e-4` extra units at a moment, never cumulative.
TOLERANCE_S = 1e-4

Period = Literal["minute", "hour", "day", "month"]
PERIOD_SECONDS = {"minute": 60, "hour": 3_600, "day": 86_400}


@dataclass(frozen=True, slots=True)
class GcraResult:
    """One GCRA decision.

    `new_tat` is the TAT to store (unchanged from the old one, or `now`, when refused).
    `retry_after_s` is how long until this same request would be admitted (0 when allowed;
    `math.inf` when `too_large`: the cost exceeds the whole limit and never fits).
    `remaining` is the units that could still be admitted at once after this decision.
    """

    allowed: bool
    new_tat: float
    retry_after_s: float
    remaining: float
    too_large: bool = False


def gcra(tat: float | None, now: float, cost: float, limit: float, window_s: float) -> GcraResult:
    """Admit `cost` units at `now` against "`limit` units per `window_s`", given the stored
    TAT (None for a key never seen or expired)."""
    check_rate(cost, limit, window_s)
    interval = window_s / limit
    start = now if tat is None else max(tat, now)
    if cost > limit:
        return GcraResult(False, start, math.inf, _units(start, now, interval, window_s), True)
    new_tat = start + cost * interval
    ahead = new_tat - now
    if ahead > window_s + TOLERANCE_S:
        return GcraResult(False, start, ahead - window_s, _units(start, now, interval, window_s))
    return GcraResult(True, new_tat, 0.0, _units(new_tat, now, interval, window_s))


def gcra_give_back(
    tat: float | None, now: float, cost: float, limit: float, window_s: float
) -> float | None:
    """The TAT after returning `cost` units (never earlier than `now`); None when the key holds
    nothing any more (its TAT is not in the future), so it may be forgotten."""
    check_rate(cost, limit, window_s)
    if tat is None or tat <= now:
        return None
    back = tat - cost * (window_s / limit)
    return back if back > now else None


def _units(tat: float, now: float, interval: float, window_s: float) -> float:
    """Units admissible at once when the TAT is `tat`."""
    return max(0.0, (window_s - (tat - now)) / interval)


def check_rate(cost: float, limit: float, window_s: float) -> None:
    """Refuse arguments no rate limit can mean (ValueError)."""
    if not (0 < limit < math.inf and 0 < window_s < math.inf):
        raise ValueError("a rate limit needs a positive, finite limit and window")
    if not 0 <= cost < math.inf:
        raise ValueError("a cost must be finite and not negative")


def period_bounds(per: Period, now_epoch: float) -> tuple[float, float]:
    """The UTC calendar period holding `now_epoch`: (start, end) in epoch seconds, end excluded.
    Minutes, hours and days are fixed lengths (POSIX time has no leap seconds); months are
    calendar months."""
    if per == "month":
        moment = datetime.fromtimestamp(now_epoch, tz=UTC)
        start = datetime(moment.year, moment.month, 1, tzinfo=UTC)
        year, month = divmod(moment.month, 12)  # month is 1..12: Dec -> (1, 0) -> next January
        end = datetime(moment.year + year, month + 1, 1, tzinfo=UTC)
        return start.timestamp(), end.timestamp()
    if per not in PERIOD_SECONDS:
        raise ValueError(f"unknown budget period {per!r}")
    length = PERIOD_SECONDS[per]
    start_s = math.floor(now_epoch / length) * length
    return float(start_s), float(start_s + length)
