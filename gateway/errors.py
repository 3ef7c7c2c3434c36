"""Every error Turnout answers with, and the one place that renders them in OpenAI's shape.

TurnoutError                       (status, type, code; message safe to show)
├── BadRequest            400      invalid_request_error
├── Unauthorized          401      invalid_request_error / invalid_api_key
├── Forbidden             403      permission_error
├── ModelNotFound         404      invalid_request_error / model_not_found
├── NotFound              404      invalid_request_error / not_found
├── MethodNotAllowed      405      invalid_request_error / method_not_allowed
├── RequestTimeout        408      invalid_request_error / request_timeout
├── PayloadTooLarge       413      invalid_request_error / request_too_large
├── HeadersTooLarge       431      invalid_request_error / request_header_fields_too_large
├── RateLimited           429      rate_limit_error (optional Retry-After)
├── ServiceUnavailable    503      server_error / state_unavailable
│   └── Overloaded        503      server_error / overloaded
├── ClientDisconnected    499      (never sent: the client has gone)
└── UpstreamError         502/504  upstream failures, made once at the adapter
    ├── UpstreamRejected  502      upstream refused Turnout's credentials or config
    ├── UpstreamBadRequest 400     upstream said the request was invalid
    ├── UpstreamRateLimited 429    upstream said slow down
    └── UpstreamTimeout   504      a deadline passed
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import msgspec

from router.plan import Failure, Stage


class TurnoutError(Exception):
    """An error with a status and a message that is safe to show to the client."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> bytes:
        """The OpenAI error object as JSON bytes."""
        return msgspec.json.encode(
            {
                "error": {
                    "message": self.message,
                    "type": self.type,
                    "param": self.param,
                    "code": self.code,
                }
            }
        )


class BadRequest(TurnoutError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(TurnoutError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(TurnoutError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class ModelNotFound(TurnoutError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model `{model}` does not exist or you do not have access to it.",
            param="model",
        )


class NotFound(TurnoutError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(TurnoutError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class _Closing(TurnoutError):
    """Answered with `connection: close`: the rest of the request is never read, so the
    connection cannot carry another one (and a client still sending is stopped)."""

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.headers = {"connection": "close", **self.headers}


class RequestTimeout(_Closing):
    """The request did not arrive in time (server.header_timeout_s, server.receive_timeout_s)."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLarge(_Closing):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class HeadersTooLarge(_Closing):
    """The request line and headers passed server.max_header_bytes (sent by the connection
    guard in gateway.serve, before the app sees the request)."""

    status = 431
    type = "invalid_request_error"
    code = "request_header_fields_too_large"


class RateLimited(TurnoutError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class ServiceUnavailable(TurnoutError):
    """A part of the gateway itself (the shared state store) cannot be reached."""

    status = 503
    type = "server_error"
    code = "state_unavailable"


class Overloaded(ServiceUnavailable):
    """More API calls in flight than `server.max_in_flight`: refused at once, Retry-After."""

    code = "overloaded"


class ClientDisconnected(TurnoutError):
    """The client went away; recorded as 499, never rendered."""

    status = 499
    type = "client_disconnected"


class ConnectionGone(OSError):
    """Raised by `send` once the client's connection is closed (as ASGI 2.4 asks of servers;
    uvicorn's httptools protocol drops the message silently, so a stream whose upstream has
    data ready would be relayed into the void at full speed). Raised by gateway.serve's
    connection guard, swallowed by the app (there is no one left to answer)."""


class UpstreamError(TurnoutError):
    """The upstream failed: reset, 5xx, garbage. 502 to the client.

    `failure` and `stage` say what went wrong and how far the request got (router.plan's
    words), which decides whether another attempt is allowed; `retry_after` is the upstream's
    Retry-After in seconds, when it sent one.
    """

    status = 502
    type = "upstream_error"
    code = "upstream_error"
    # Unless tagged otherwise, assume the worst: the upstream may have accepted the request.
    failure = Failure.BROKEN
    stage = Stage.MAYBE_ACCEPTED
    retry_after: float | None = None
    verdict = True  # False: nothing reached the upstream (no replica admitted, no time left)

    def tagged(self, failure: Failure, stage: Stage, *, verdict: bool = True) -> UpstreamError:
        self.failure, self.stage, self.verdict = failure, stage, verdict
        return self


class UpstreamRejected(UpstreamError):
    """The upstream refused Turnout's credentials or configuration (401/403/404)."""

    code = "upstream_rejected"


class UpstreamBadRequest(UpstreamError):
    """The upstream judged the request invalid (400/413/422): the client's fault."""

    status = 400
    type = "invalid_request_error"
    code = "upstream_bad_request"


class UpstreamRateLimited(UpstreamError):
    status = 429
    type = "rate_limit_error"
    code = "upstream_rate_limited"


class UpstreamTimeout(UpstreamError):
    status = 504
    type = "timeout_error"
    code = "upstream_timeout"


_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._\-~+/=]{8,}")
_KEYLIKE = re.compile(r"\b(sk|key|tok|api)[-_][A-Za-z0-9._\-]{8,}\b")
_MAX_MESSAGE = 1000


_PIECE = 8  # a run this long of a secret is redacted too: a masked or cut key still leaks


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove secrets, bearer tokens and key-like strings from text meant for a client."""
    text = redact(text[: 4 * _MAX_MESSAGE], secrets)  # bounded work; cut again below
    text = _BEARER.sub(r"\1[redacted]", text)
    text = _KEYLIKE.sub("[redacted]", text)
    if len(text) > _MAX_MESSAGE:
        text = text[:_MAX_MESSAGE] + "…"
    return text


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret, and every run of 8 or more characters of one (a key shown
    masked, `sk-proj-****…abcd`, or cut short), replaced by `[redacted]`."""
    for secret in secrets:
        if not secret:
            continue
        text = text.replace(secret, "[redacted]")
        pieces = {secret[i : i + _PIECE] for i in range(len(secret) - _PIECE + 1)}
        if not any(piece in text for piece in pieces):
            continue
        spans: list[list[int]] = []  # [start, end) of runs made of pieces, merged
        for start in range(len(text) - _PIECE + 1):
            if text[start : start + _PIECE] in pieces:
                if spans and start <= spans[-1][1]:
                    spans[-1][1] = start + _PIECE
                else:
                    spans.append([start, start + _PIECE])
        for start, end in reversed(spans):
            text = text[:start] + "[redacted]" + text[end:]
    return text
