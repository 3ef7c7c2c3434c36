"""The request flow of DESIGN.md: auth, body, route, variant, shape; then the exchange."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, cast

import msgspec
from litestar import Request, Response

from gateway import body as bodies
from gateway.auth import check_admin, may_call
from gateway.context import Receive, context_of
from gateway.errors import BadRequest, ClientDisconnected, Forbidden, ModelNotFound
from gateway.estimate import prompt_tokens
from gateway.exchange import Exchange
from gateway.gateway import Gateway
from gateway.rules_config import request_facts
from gateway.settings import DEFAULT_MAX_TOKENS, Route, VllmUpstream
from gateway.settings import Upstream as UpstreamConfig
from gateway.state import StateUnavailable
from router.bounds import RequestBounds, tightest, violation
from router.plan import attempt_plan
from router.rules import first_match
from router.selection import choose_variant, sticky_subject

# request.state key: EDGE while proxy() checks a call, EXCHANGE once an Exchange records it.
# The error renderer counts the calls that failed at the edge (they leave no record).
STAGE = "turnout_stage"
EDGE, EXCHANGE = "edge", "exchange"
FORCE_HEADER = "x-turnout-variant"  # request header: the admin picks the variant


async def proxy(gw: Gateway, request: Request[Any, Any, Any], endpoint: str) -> Response[Any]:
    """Handle one OpenAI API call end to end."""
    request.state[STAGE] = EDGE
    ctx = context_of(request.scope)  # type: ignore[arg-type]
    forced = request.headers.get(FORCE_HEADER)
    if forced is None:
        key = await gw.keys.authenticate(request.headers.get("authorization"))
    else:  # only the admin may choose the variant (offline evaluation); it calls as no key
        try:
            check_admin(request.headers.get("authorization"), gw.admin_key)
        except Forbidden:
            raise Forbidden(f"`{FORCE_HEADER}` needs the admin key.", param=FORCE_HEADER) from None
        key = None
    receive = cast(Receive, request.receive)
    raw = await bodies.read_limited(
        _body_chunks(receive),
        request.headers.get("content-length"),
        gw.settings.server.max_body_bytes,
    )
    client = bodies.parse(endpoint, raw)
    route = gw.route(client.model)
    if route is None or not may_call(key, client.model):
        raise ModelNotFound(client.model)
    ctx.route = client.model
    check_bounds(gw, client.model, route, client.body)
    if forced is None:
        name = await choose(gw, route, client, key.name if key else None, request.headers)
        attempts = plan(gw, route, name)
    else:
        name, attempts = _forced(route, client.model, forced), [forced]
        ctx.forced = True
    ctx.variant = name
    exchange = Exchange(gw, ctx, client, attempts, receive, key)
    request.state[STAGE] = EXCHANGE
    return await exchange.run()


async def choose(
    gw: Gateway,
    route: Route,
    client: bodies.ClientRequest,
    key: str | None,
    headers: Mapping[str, str],
) -> str:
    """The variant for this request: the sticky subject's override, else the first matching
    rule's, else a draw from the split (sticky when the route says so; a rule's own split uses
    the same draw)."""
    subject = sticky_subject(route.sticky, user=client.user, key_name=key, headers=headers)
    pinned = await _override(gw, client.model, route, subject)
    if pinned is not None:
        return pinned
    split = route.split
    rules = gw.rules[client.model]
    if rules:
        counter = gw.variants[next(iter(split))].counter
        tokens = prompt_tokens(counter, client.body) if gw.rules_count_tokens[client.model] else 0
        rule = first_match(rules, request_facts(client, headers, key, tokens))
        if rule is not None and rule.variant is not None:
            return rule.variant
        if rule is not None and rule.split is not None:
            split = dict(rule.split)
    now = time.monotonic()
    failing = [v for v in split if not gw.available(v, now)]
    return choose_variant(client.model, list(split.items()), subject, gw.rand.random, failing)


async def _override(gw: Gateway, name: str, route: Route, subject: str | None) -> str | None:
    """The variant an admin pinned `subject` to on this route, if it is still one of the route's.
    A store that is away means no override: the sticky hash decides, as it always does."""
    if subject is None:
        return None
    if not gw.limiter.use_shared():  # the store is away: no lookup at all, the hash decides
        gw.metrics.state_fallback("assignment")
        return None
    try:
        variant = await gw.directory.get_assignment(name, subject)
    except StateUnavailable:
        gw.limiter.fell_back("assignment")
        return None
    gw.limiter.recovered()
    return variant if variant in route.split or variant in route.fallback else None


def _forced(route: Route, name: str, variant: str) -> str:
    """The variant the admin named, if it is one of the route's (split, fallback, shadow or a
    rule's); it is tried alone: an evaluation must not be answered by a fallback."""
    if variant not in route_variants(route):
        raise BadRequest(
            f"Variant `{variant}` is not one of route `{name}`'s variants.", param=FORCE_HEADER
        )
    return variant


def route_variants(route: Route) -> set[str]:
    """Every variant a route may send a request to."""
    names = set(route.split) | set(route.fallback)
    if route.shadow is not None:
        names.add(route.shadow.variant)
    for rule in route.rules:
        names.update([rule.variant] if rule.variant is not None else rule.split or ())
    return names


def check_bounds(gw: Gateway, name: str, route: Route, body: Mapping[str, Any]) -> None:
    """400 naming the parameter when the request asks more than the route allows (`n`,
    `max_tokens`, logprobs, structured-output schemas: see settings.Bounds)."""
    bounds = gw.route_bounds.get(name)
    if bounds is None:  # computed once per route
        bounds = gw.route_bounds[name] = route_bounds(gw, route)
    problem = violation(body, bounds)
    if problem is not None:
        raise BadRequest(problem.message, param=problem.param, code=problem.code)


def route_bounds(gw: Gateway, route: Route) -> RequestBounds:
    """The tightest bounds of the upstreams of every variant `route` may call (shadow too)."""
    upstreams = {gw.settings.variants[v].upstream for v in route_variants(route)}
    return tightest(upstream_bounds(gw.settings.upstreams[u]) for u in sorted(upstreams))


def upstream_bounds(upstream: UpstreamConfig) -> RequestBounds:
    """An upstream's bounds; unset `max_tokens`: the default, or a vLLM upstream's context
    length (serve.max_model_len) if smaller, as no request asking more can be served."""
    bounds = msgspec.structs.asdict(upstream.bounds)
    if bounds["max_tokens"] is None:
        serve = upstream.serve if isinstance(upstream, VllmUpstream) else None
        model_len = serve.max_model_len if serve is not None else None
        bounds["max_tokens"] = min(DEFAULT_MAX_TOKENS, model_len or DEFAULT_MAX_TOKENS)
    return RequestBounds(**bounds)


def plan(gw: Gateway, route: Route, chosen: str) -> list[str]:
    """The variants to try: the chosen one, then the fallbacks, skipping open circuits."""
    now = time.monotonic()
    if not route.fallback and gw.available(chosen, now):
        return [chosen]
    return attempt_plan(
        chosen, route.fallback, lambda v: gw.available(v, now), gw.breakers.last_failure
    )


async def _body_chunks(receive: Receive) -> AsyncIterator[bytes]:
    """The raw request body; a client that leaves while sending it is a disconnect, not a 500."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("The client closed the connection while sending the body.")
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return
