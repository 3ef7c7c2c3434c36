"""The request flow of DESIGN.md: auth, body, route, variant, shape; then the exchange."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

from litestar import Request, Response

from gateway import body as bodies
from gateway.auth import may_call
from gateway.context import Receive, context_of
from gateway.errors import BadRequest, ClientDisconnected, ModelNotFound
from gateway.exchange import Exchange
from gateway.gateway import Gateway, VariantRuntime
from router.selection import choose_variant, sticky_subject
from router.shaping import PromptShapeError, shape_chat_messages, shape_completion

# request.state key: EDGE while proxy() checks a call, EXCHANGE once an Exchange records it.
# The error renderer counts the calls that failed at the edge (they leave no record).
STAGE = "turnout_stage"
EDGE, EXCHANGE = "edge", "exchange"


async def proxy(gw: Gateway, request: Request[Any, Any, Any], endpoint: str) -> Response[Any]:
    """Handle one OpenAI API call end to end."""
    request.state[STAGE] = EDGE
    ctx = context_of(request.scope)  # type: ignore[arg-type]
    key = gw.keys.authenticate(request.headers.get("authorization"))
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
    subject = sticky_subject(
        route.sticky,
        user=client.user,
        key_name=key.name if key else None,
        headers=request.headers,
    )
    name = choose_variant(client.model, list(route.split.items()), subject, gw.rand.random)
    ctx.variant = name
    variant = gw.variants[name]
    sent = shape(client, variant)
    exchange = Exchange(gw, ctx, client, variant, sent, receive, key.name if key else None)
    request.state[STAGE] = EXCHANGE
    return await exchange.run()


async def _body_chunks(receive: Receive) -> AsyncIterator[bytes]:
    """The raw request body; a client that leaves while sending it is a disconnect, not a 500."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("The client closed the connection while sending the body.")
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


def shape(client: bodies.ClientRequest, variant: VariantRuntime) -> dict[str, Any]:
    """The body sent upstream: the client's, with the variant's model and prompt applied."""
    body = dict(client.body)
    body["model"] = variant.config.model
    if client.stream:
        options = body.get("stream_options")
        body["stream_options"] = {**(options if isinstance(options, dict) else {})}
        body["stream_options"]["include_usage"] = True
    else:
        body.pop("stream_options", None)
    if not (variant.system or variant.examples):
        return body
    if client.endpoint == bodies.CHAT:
        body["messages"] = shape_chat_messages(body["messages"], variant.system, variant.examples)
    elif client.endpoint == bodies.COMPLETIONS:
        try:
            body["prompt"] = shape_completion(body["prompt"], variant.system, variant.examples)
        except PromptShapeError as exc:
            raise BadRequest(str(exc), param="prompt") from None
    return body
