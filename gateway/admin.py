"""Admin operations on the directory: run-time client keys and sticky assignment overrides.

A new key's token is `sk-turnout-` + 32 random bytes (url-safe base64); only its sha256 is
stored, and the token is returned once, by `create_key`. Listings show a key's hash by its
first `HASH_SHOWN` hex digits only.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any, TypeVar

import msgspec

from gateway.directory import StoredKey
from gateway.errors import BadRequest, NotFound
from gateway.gateway import Gateway
from gateway.settings import Budget, Name, PositiveInt, Route

TOKEN_PREFIX = "sk-turnout-"
HASH_SHOWN = 8
T = TypeVar("T")


class _Body(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Admin request bodies reject unknown fields: a typo must not be silently ignored."""


class NewKey(_Body, frozen=True):
    name: Name
    routes: list[str] | None = None
    rpm: PositiveInt | None = None
    tpm: PositiveInt | None = None
    budget: Budget | None = None


class Assignment(_Body, frozen=True):
    """POST needs all three fields; DELETE only `route` and `subject`."""

    route: str
    subject: str
    variant: str | None = None


def parse(raw: bytes, kind: type[T]) -> T:
    """`raw` as a `kind`, or 400 naming what is wrong."""
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"Invalid request body: {exc}") from None
    except msgspec.DecodeError:
        raise BadRequest("The request body is not valid JSON.") from None


def _needs_shared_state(gw: Gateway) -> None:
    """Several workers without a shared store would each keep their own keys and pins."""
    if gw.workers > 1 and gw.settings.state.redis_url is None:
        raise BadRequest(
            "Run-time keys and assignments need `state.redis_url` when several workers run: "
            "each worker would otherwise keep its own copy."
        )


async def create_key(gw: Gateway, new: NewKey) -> dict[str, Any]:
    """Store a new key and return its description with its token (the only time it is shown)."""
    _needs_shared_state(gw)
    if gw.keys.open:
        raise BadRequest(
            "This gateway is open (no `keys` configured), so a key would protect nothing: "
            "configure at least one key (it may be `disabled: true`) to require keys."
        )
    unknown = [r for r in new.routes or () if r not in gw.settings.routes]
    if unknown:
        raise BadRequest(f"Unknown routes: {', '.join(unknown)}.", param="routes")
    if gw.keys.configured(new.name):
        raise BadRequest(f"A configured key is already called `{new.name}`.", param="name")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    fields = msgspec.structs.asdict(new)
    digest = hashlib.sha256(token.encode()).hexdigest()
    stored = StoredKey(sha256=digest, created=time.time(), **fields)
    if not await gw.directory.put_key(stored):
        raise BadRequest(f"A key is already called `{new.name}`.", param="name")
    return describe(stored, "runtime") | {"key": token}


async def list_keys(gw: Gateway) -> dict[str, Any]:
    """Configured and run-time keys, without tokens and with hashes cut short."""
    configured = [
        describe(StoredKey(**msgspec.structs.asdict(k)), "config") for k in gw.settings.keys
    ]
    runtime = [describe(k, "runtime") for k in await gw.directory.list_keys()]
    return {"object": "list", "data": configured + runtime}


async def disable_key(gw: Gateway, name: str) -> dict[str, Any]:
    _needs_shared_state(gw)
    if gw.keys.configured(name):
        raise BadRequest(
            f"`{name}` is a configured key: disable it in the configuration.", param="name"
        )
    if not await gw.directory.disable_key(name):
        raise NotFound(f"No run-time key is called `{name}`.", param="name")
    return {"name": name, "disabled": True}


async def assign(gw: Gateway, assignment: Assignment) -> dict[str, Any]:
    """Pin a subject to a variant of the route's split or fallbacks."""
    _needs_shared_state(gw)
    route = _route(gw, assignment)
    variant = assignment.variant
    if variant is None:
        raise BadRequest("An assignment needs a `variant`.", param="variant")
    if variant not in route.split and variant not in route.fallback:
        raise BadRequest(
            f"`{variant}` is not in the split or fallbacks of route `{assignment.route}`.",
            param="variant",
        )
    await gw.directory.set_assignment(assignment.route, assignment.subject, variant)
    return {"route": assignment.route, "subject": assignment.subject, "variant": variant}


async def unassign(gw: Gateway, assignment: Assignment) -> dict[str, Any]:
    _route(gw, assignment)
    if not await gw.directory.delete_assignment(assignment.route, assignment.subject):
        raise NotFound("No assignment for this route and subject.", param="subject")
    return {"route": assignment.route, "subject": assignment.subject, "deleted": True}


def describe(key: StoredKey, source: str) -> dict[str, Any]:
    shown = msgspec.structs.asdict(key) | {"sha256": key.sha256[:HASH_SHOWN], "source": source}
    if shown["budget"] is not None:
        shown["budget"] = msgspec.to_builtins(key.budget)
    return shown


def _route(gw: Gateway, assignment: Assignment) -> Route:
    route = gw.route(assignment.route)
    if route is None:
        raise BadRequest(f"Unknown route `{assignment.route}`.", param="route")
    if route.sticky is None:
        raise BadRequest(
            f"Route `{assignment.route}` is not sticky: it has no subjects to pin.", param="route"
        )
    if not assignment.subject:
        raise BadRequest("An assignment needs a non-empty `subject`.", param="subject")
    return route
