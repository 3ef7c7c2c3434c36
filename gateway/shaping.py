"""The body sent upstream for a variant: the client's, with the variant's model and prompt."""

from __future__ import annotations

from typing import Any

from gateway import body as bodies
from gateway.errors import BadRequest
from gateway.gateway import VariantRuntime
from router.shaping import PromptShapeError, shape_chat_messages, shape_completion


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
