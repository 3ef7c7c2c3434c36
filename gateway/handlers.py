"""HTTP handlers: each parses, calls one function, returns."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get, post

from gateway import body as bodies
from gateway.auth import may_call
from gateway.gateway import Gateway
from gateway.proxy import proxy

AnyRequest = Request[Any, Any, Any]


@post("/v1/chat/completions", status_code=200)
async def chat_completions(request: AnyRequest, gw: Gateway) -> Response[Any]:
    return await proxy(gw, request, bodies.CHAT)


@post("/v1/completions", status_code=200)
async def completions(request: AnyRequest, gw: Gateway) -> Response[Any]:
    return await proxy(gw, request, bodies.COMPLETIONS)


@post("/v1/embeddings", status_code=200)
async def embeddings(request: AnyRequest, gw: Gateway) -> Response[Any]:
    return await proxy(gw, request, bodies.EMBEDDINGS)


@get("/v1/models")
async def models(request: AnyRequest, gw: Gateway) -> dict[str, Any]:
    """The routes this key may call, in OpenAI's list shape."""
    key = gw.keys.authenticate(request.headers.get("authorization"))
    data = [
        {"id": name, "object": "model", "created": 0, "owned_by": "turnout"}
        for name in gw.settings.routes
        if may_call(key, name)
    ]
    return {"object": "list", "data": data}


@get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz")
async def readyz(gw: Gateway) -> Response[dict[str, Any]]:
    degraded = gw.degraded()
    status = "degraded" if degraded else "ready"
    return Response({"status": status, "degraded": degraded}, status_code=200)


ROUTES = [chat_completions, completions, embeddings, models, healthz, readyz]
