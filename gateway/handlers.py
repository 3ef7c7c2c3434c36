"""HTTP handlers: each parses, calls one function, returns."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath

from gateway import adapters, admin, feedback, openapi
from gateway import body as bodies
from gateway import report as reports
from gateway.auth import check_admin, may_call
from gateway.errors import BadRequest, NotFound
from gateway.gateway import Gateway
from gateway.proxy import proxy
from gateway.report_html import render_html

AnyRequest = Request[Any, Any, Any]
GatewayDep = NamedDependency[Gateway]


@post("/v1/chat/completions", status_code=200)
async def chat_completions(request: AnyRequest, gw: GatewayDep) -> Response[Any]:
    return await proxy(gw, request, bodies.CHAT)


@post("/v1/completions", status_code=200)
async def completions(request: AnyRequest, gw: GatewayDep) -> Response[Any]:
    return await proxy(gw, request, bodies.COMPLETIONS)


@post("/v1/embeddings", status_code=200)
async def embeddings(request: AnyRequest, gw: GatewayDep) -> Response[Any]:
    return await proxy(gw, request, bodies.EMBEDDINGS)


@get("/v1/models")
async def models(request: AnyRequest, gw: GatewayDep) -> dict[str, Any]:
    """The routes this key may call, in OpenAI's list shape."""
    key = await gw.keys.authenticate(request.headers.get("authorization"))
    data = [
        {"id": name, "object": "model", "created": 0, "owned_by": "turnout"}
        for name in gw.settings.routes
        if may_call(key, name)
    ]
    return {"object": "list", "data": data}


@get("/turnout/requests/{request_id:str}")
async def request_record(
    request: AnyRequest, gw: GatewayDep, request_id: FromPath[str]
) -> Response[bytes]:
    """One request's record (admin key)."""
    check_admin(request.headers.get("authorization"), gw.admin_key)
    record = await gw.records.get(request_id)
    if record is None:
        raise NotFound(f"No record for request `{request_id}`.", param="request_id")
    answer = msgspec.to_builtins(record)
    if notes := await feedback.feedback_of(gw, record):
        answer["feedback"] = notes
    return Response(msgspec.json.encode(answer), media_type="application/json")


@post("/turnout/feedback", status_code=200)
async def post_feedback(request: AnyRequest, gw: GatewayDep) -> dict[str, Any]:
    """Feedback on a request, by the key that made it or the admin key (see gateway.feedback)."""
    auth = request.headers.get("authorization")
    return await feedback.post_feedback(gw, auth, await request.body())


# The page holds admin data: never cached, never sniffed, nothing fetched (also in its <meta>).
PAGE_HEADERS = {
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:",
}


@get("/turnout/report")
async def report(request: AnyRequest, gw: GatewayDep) -> Response[Any]:
    """The experiment report (admin key): `route` (default every route), `since` (unix s),
    `format` json (default) or html (a self-contained page with charts)."""
    check_admin(request.headers.get("authorization"), gw.admin_key)
    name, since = request.query_params.get("route"), request.query_params.get("since")
    shape = request.query_params.get("format", "json")
    if shape not in {"json", "html"}:
        raise BadRequest("`format` must be `json` or `html`.", param="format")
    routes = gw.settings.routes if name is None else {name: gw.settings.routes.get(name)}
    if name is not None and routes[name] is None:
        raise NotFound(f"No route `{name}`.", param="route")
    try:
        start = None if since is None else float(since)
    except ValueError:
        raise BadRequest("`since` must be unix seconds.", param="since") from None
    records = await gw.records.recent(gw.settings.records.capacity, start)
    chosen = {k: v for k, v in routes.items() if v is not None}
    notes = await feedback.for_report(gw, records, chosen)
    fleets = {name: meter.figures() for name, meter in gw.meters.items()}

    def build() -> Response[Any]:  # CPU work: in a thread, so the loop keeps serving
        result = reports.build_report(
            chosen, records, gw.settings.variants, fleets, since=start, feedback=notes
        )
        if notes is None:
            result["feedback_unavailable"] = True
        if shape == "html":
            return Response(render_html(result), media_type="text/html", headers=PAGE_HEADERS)
        return Response(result)

    return await asyncio.to_thread(build)


@post("/turnout/keys", status_code=201)
async def create_key(request: AnyRequest, gw: GatewayDep) -> dict[str, Any]:
    """A new run-time key; its token is in this answer only (admin key)."""
    check_admin(request.headers.get("authorization"), gw.admin_key)
    return await admin.create_key(gw, admin.parse(await request.body(), admin.NewKey))


@get("/turnout/keys")
async def list_keys(request: AnyRequest, gw: GatewayDep) -> dict[str, Any]:
    check_admin(request.headers.get("authorization"), gw.admin_key)
    return await admin.list_keys(gw)


@post("/turnout/keys/{name:str}/disable", status_code=200)
async def disable_key(request: AnyRequest, gw: GatewayDep, name: FromPath[str]) -> dict[str, Any]:
    check_admin(request.headers.get("authorization"), gw.admin_key)
    return await admin.disable_key(gw, name)


@post("/turnout/assignments", status_code=200)
async def assign(request: AnyRequest, gw: GatewayDep) -> dict[str, Any]:
    check_admin(request.headers.get("authorization"), gw.admin_key)
    return await admin.assign(gw, admin.parse(await request.body(), admin.Assignment))


@delete("/turnout/assignments", status_code=200)
async def unassign(request: AnyRequest, gw: GatewayDep) -> dict[str, Any]:
    check_admin(request.headers.get("authorization"), gw.admin_key)
    return await admin.unassign(gw, admin.parse(await request.body(), admin.Assignment))


@post("/turnout/adapters", status_code=200)
async def load_adapter(request: AnyRequest, gw: GatewayDep) -> dict[str, Any]:
    """Load a declared LoRA adapter on every replica of a vLLM upstream (admin key)."""
    check_admin(request.headers.get("authorization"), gw.admin_key)
    return await adapters.load(gw, await request.body())


@delete("/turnout/adapters/{upstream:str}/{name:str}", status_code=200)
async def unload_adapter(
    request: AnyRequest, gw: GatewayDep, upstream: FromPath[str], name: FromPath[str]
) -> dict[str, Any]:
    """Unload it from every replica; its variants then fall back (admin key)."""
    check_admin(request.headers.get("authorization"), gw.admin_key)
    return await adapters.unload(gw, upstream, name)


@get(["/healthz", "/livez"])
async def healthz() -> dict[str, str]:
    """Alive: the process answers (also while it sheds load)."""
    return {"status": "ok"}


@get("/readyz")
async def readyz(gw: GatewayDep) -> Response[dict[str, Any]]:
    """Ready (200), naming degraded parts; 503 `overloaded` while API calls are being refused
    for lack of room (server.max_in_flight), so a load balancer sends new work elsewhere."""
    await gw.check_redis()
    degraded = gw.degraded()
    if gw.shedder.overloaded():
        body = {"status": "overloaded", "degraded": degraded, "in_flight": gw.shedder.in_flight}
        return Response(body, status_code=503)
    status = "degraded" if degraded else "ready"
    return Response({"status": status, "degraded": degraded}, status_code=200)


@get("/openapi.json")
async def openapi_document() -> Response[bytes]:
    """This API described in OpenAPI 3.1 (gateway/openapi.py)."""
    return Response(openapi.ENCODED, media_type="application/json")


@get("/metrics")
async def metrics(gw: GatewayDep) -> Response[bytes]:
    """Prometheus text, every worker merged. No auth, as usual for /metrics: keep it off the
    public internet (scrape it on an internal port or network policy)."""
    text, content_type = gw.metrics.render()
    return Response(text, headers={"content-type": content_type})  # as is: it has its charset


ROUTES = [
    *(chat_completions, completions, embeddings, models, request_record, post_feedback),
    *(report, create_key, list_keys, disable_key, assign, unassign, load_adapter, unload_adapter),
    *(healthz, readyz, metrics, openapi_document),
]
