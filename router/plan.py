"""Attempt plans: which variants to try in order, and what a failed attempt allows next."""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime


class Failure(enum.Enum):
    """Why an attempt failed, as classified once at the upstream adapter."""

    CONNECT = "connect"  # nothing reached the upstream (refused, DNS, connect/pool timeout)
    FIRST_BYTE_TIMEOUT = "first_byte_timeout"
    RATE_LIMITED = "rate_limited"  # 429
    SERVER = "server"  # 500, 502, 503, 504
    REQUEST = "request"  # 400, 413, 422, context length: the request's own fault
    SETUP = "setup"  # 401, 403, 404: the variant's own set-up
    BROKEN = "broken"  # reset/garbage after the request may have been accepted, before any byte


class Stage(enum.Enum):
    """How far an attempt got. A 429/5xx status answer means the upstream refused the work,
    so it is NOT_SENT; a timeout or reset after sending is MAYBE_ACCEPTED."""

    NOT_SENT = "not_sent"
    MAYBE_ACCEPTED = "maybe_accepted"
    RESPONDING = "responding"  # a byte already went to the client


@dataclass(frozen=True)
class Decision:
    retry: bool  # may try again (the same variant on another replica, or the next in the plan)
    same_variant: bool  # may the next attempt use the same variant
    breaker_failure: bool  # does this count as a failure for the (variant, replica) circuit


# Failures of the upstream itself, which a circuit counts. A 429 is not one: the upstream is
# healthy but throttling (often the whole API key), Retry-After paces it, and opening circuits
# on quota would turn a brief limit into a cool-down-long outage. REQUEST is the client's fault.
_BREAKER_FAILURES = frozenset(
    {Failure.CONNECT, Failure.FIRST_BYTE_TIMEOUT, Failure.SERVER, Failure.BROKEN, Failure.SETUP}
)
# Failures another replica of the same variant may well not have.
_SAME_VARIANT_RETRYABLE = frozenset(
    {Failure.CONNECT, Failure.FIRST_BYTE_TIMEOUT, Failure.SERVER, Failure.BROKEN}
)
# Failures that allow another attempt somewhere (SETUP and RATE_LIMITED: elsewhere only).
_RETRYABLE = _SAME_VARIANT_RETRYABLE | {Failure.RATE_LIMITED, Failure.SETUP}


def decide(failure: Failure, stage: Stage, *, billed: bool) -> Decision:
    """What a failed attempt allows next.

    Another attempt only in stage NOT_SENT, or MAYBE_ACCEPTED when the upstream is not
    `billed` (self-hosted: a repeat costs nothing); never once responding to the client.
    Whether the circuit counts the failure depends on the failure alone.
    """
    resendable = stage is Stage.NOT_SENT or (stage is Stage.MAYBE_ACCEPTED and not billed)
    retry = resendable and failure in _RETRYABLE
    return Decision(
        retry=retry,
        same_variant=retry and failure in _SAME_VARIANT_RETRYABLE,
        breaker_failure=failure in _BREAKER_FAILURES,
    )


def attempt_plan(
    chosen: str,
    fallbacks: Sequence[str],
    available: Callable[[str], bool],
    last_failure: Callable[[str], float],
) -> list[str]:
    """The variants to try in order: `chosen`, then `fallbacks`, without duplicates, skipping
    those not `available` (circuit open on every replica).

    If none is available, the single least-recently-failed variant (smallest `last_failure`;
    ties to the earlier one), so a route whose circuits are all open still tries something.
    """
    candidates = list(dict.fromkeys([chosen, *fallbacks]))
    plan = [variant for variant in candidates if available(variant)]
    return plan or [min(candidates, key=last_failure)]


_DELTA_SECONDS = re.compile(r"\d+(?:\.\d+)?")


def retry_after_seconds(value: str | None, now_epoch: float) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP-date.

    A date in the past gives 0.0; an absent, empty or unparseable value gives None.
    Fractional seconds are accepted though the RFC only allows integers.
    """
    if value is None or not (text := value.strip()):
        return None
    if _DELTA_SECONDS.fullmatch(text):
        seconds = float(text)
        return seconds if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now_epoch)
