"""One call to an upstream: send with deadlines, and map every failure to one error type, once."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx
import msgspec

from gateway.errors import (
    UpstreamBadRequest,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    scrub,
)
from gateway.upstreams import Upstream, h1
from gateway.upstreams.base import UpstreamResponse
from router.plan import Failure, Stage, retry_after_seconds

_MAX_ERROR_BODY = 64 * 1024


@dataclass
class Deadline:
    """One deadline for the whole request, measured on the monotonic clock."""

    total_s: float
    start: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.total_s - (time.monotonic() - self.start)

    def within(self, phase_s: float) -> float:
        """A phase's timeout: its own limit or the time left overall, whichever is shorter."""
        left = self.left()
        if left <= 0:
            raise UpstreamTimeout("The upstream did not finish within the request deadline.")
        return min(phase_s, left)


@dataclass
class Opened:
    """An upstream response whose status and headers have arrived; body not yet read."""

    upstream: Upstream
    replica: int
    response: UpstreamResponse
    first_byte_by: float  # monotonic time by which a stream's first event must have come
    closed: bool = False

    def first_byte_left(self) -> float:
        return self.first_byte_by - time.monotonic()

    async def aclose(self) -> None:
        """Close the upstream connection and free the replica slot; safe to call twice."""
        if self.closed:
            return
        self.closed = True
        self.upstream.release(self.replica)
        await self.response.aclose()


async def open_call(
    upstream: Upstream,
    replica: int,
    path: str,
    payload: bytes,
    deadline: Deadline,
    *,
    stream: bool,
) -> Opened:
    """Send the request to a replica the caller acquired; return once a successful status
    arrives, else release the replica and raise an UpstreamError tagged with what failed.

    A stream's headers must come within the first-byte limit; a non-streaming answer's headers
    come only when the whole answer is ready, so they get the total deadline.
    """
    timeouts = upstream.timeouts
    try:
        wait = deadline.within(timeouts.first_byte if stream else timeouts.total)
    except UpstreamTimeout as exc:
        upstream.release(replica)
        raise exc.tagged(Failure.FIRST_BYTE_TIMEOUT, Stage.NOT_SENT, verdict=False) from None
    first_byte_by = time.monotonic() + wait
    try:
        async with asyncio.timeout(wait):
            response = await upstream.post(replica, path, payload, wait=wait)
    except BaseException as exc:
        upstream.release(replica)
        raise transport_error(exc, upstream) from None
    opened = Opened(upstream, replica, response, first_byte_by)
    if response.status_code >= 400:
        try:
            body = await _read_error_body(response, deadline)
        finally:
            await opened.aclose()
        raise status_error(response.status_code, body, response.headers, upstream)
    return opened


async def read_body(opened: Opened, deadline: Deadline) -> bytes:
    """The whole (non-streaming) body within the request deadline."""
    try:
        async with asyncio.timeout(deadline.within(opened.upstream.timeouts.total)):
            return await opened.response.aread()
    except BaseException as exc:
        raise transport_error(exc, opened.upstream) from None


async def _read_error_body(response: UpstreamResponse, deadline: Deadline) -> bytes:
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(min(deadline.left(), 5.0)):
            async for chunk in response.aiter_bytes():
                chunks.append(chunk)
                size += len(chunk)
                if size >= _MAX_ERROR_BODY:
                    break
    except (TimeoutError, httpx.HTTPError, h1.ConnectionBroken):
        pass
    return b"".join(chunks)


_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, h1.ConnectFailed)


def transport_error(exc: BaseException, upstream: Upstream) -> BaseException:
    """The one mapping from transport failures to Turnout errors (cancellation passes through).

    Connect failures reached nobody; anything later may have been accepted upstream.
    """
    if isinstance(exc, UpstreamError) or not isinstance(exc, Exception):
        return exc
    if isinstance(exc, _NOT_SENT):
        error = UpstreamError(f"The upstream for this model is unreachable ({_what(exc)}).")
        return error.tagged(Failure.CONNECT, Stage.NOT_SENT)
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        timeout = UpstreamTimeout(
            f"The upstream for this model did not answer in time ({_what(exc)})."
        )
        return timeout.tagged(Failure.FIRST_BYTE_TIMEOUT, Stage.MAYBE_ACCEPTED)
    if isinstance(exc, httpx.HTTPError | h1.ConnectionBroken):
        error = UpstreamError(f"The upstream for this model failed: {_what(exc)}.")
        return error.tagged(Failure.BROKEN, Stage.MAYBE_ACCEPTED)
    return exc


def _what(exc: BaseException) -> str:
    return type(exc).__name__


def status_error(
    status: int, body: bytes, headers: h1.Headers | httpx.Headers, upstream: Upstream
) -> UpstreamError:
    """The one mapping from an upstream's error status to the error the client gets.

    An error status means the upstream did not do the work: nothing was accepted.
    """
    if status in (400, 413, 422):
        message, code = _upstream_message(body)
        bad = UpstreamBadRequest(
            scrub(message, upstream.secrets) or f"The upstream rejected the request ({status}).",
            code=code if code in _PASSED_CODES else None,
        )
        return bad.tagged(Failure.REQUEST, Stage.NOT_SENT)
    if status == 429:
        retry = headers.get("retry-after")
        limited = UpstreamRateLimited(
            "The upstream for this model is rate limited; retry later.",
            headers={"retry-after": retry} if retry and retry.isdigit() else None,
        )
        limited.retry_after = retry_after_seconds(retry, time.time())
        return limited.tagged(Failure.RATE_LIMITED, Stage.NOT_SENT)
    if status in (401, 403, 404):
        rejected = UpstreamRejected(
            f"The upstream refused Turnout's request ({status}); check the gateway's "
            "upstream credentials and model names."
        )
        return rejected.tagged(Failure.SETUP, Stage.NOT_SENT)
    error = UpstreamError(f"The upstream for this model failed with status {status}.")
    return error.tagged(Failure.SERVER, Stage.NOT_SENT)


# Upstream error codes an app may act on, passed on as they are (any other: our own code).
_PASSED_CODES = frozenset({"context_length_exceeded", "content_policy_violation", "content_filter"})


def _upstream_message(body: bytes) -> tuple[str, str | None]:
    """The message and code of an OpenAI-shaped (or `{"message": ...}`) error body."""
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return "", None
    if not isinstance(data, dict):
        return "", None
    error = data.get("error", data)
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        code = error.get("code")
        return str(error["message"]), code if isinstance(code, str) else None
    if isinstance(data.get("message"), str):
        return str(data["message"]), None
    return "", None
