"""LoRA adapters on vLLM replicas: which each replica holds, and loading them at run time.

For a `vllm` upstream with a `serve` section, a `ModelWatcher` (gateway/model_watcher.py)
keeps what each replica lists on `Upstream.held`. Replica choice then never sends a managed
adapter's request to a replica known to lack it, and a variant whose adapter is on no replica
is unavailable (its route's fallback answers; `/readyz` names it).

`POST /turnout/adapters` {upstream, name, path?} loads an adapter declared in the upstream's
`serve.adapters` on every replica through vLLM's `/v1/load_lora_adapter` (the server must run
with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True); `DELETE /turnout/adapters/{upstream}/{name}`
unloads it through `/v1/unload_lora_adapter`. vLLM's admin paths themselves are never routed
from Turnout's OpenAI surface.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import msgspec

from gateway.admin import parse
from gateway.errors import BadRequest, NotFound, UpstreamError, scrub
from gateway.gateway import Gateway
from gateway.settings import Serve, VllmUpstream
from gateway.upstreams import Upstream

log = logging.getLogger("turnout")

TIMEOUT_S = 30.0  # loading an adapter reads it from disk (or a hub); vLLM answers in ms here


class LoadBody(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    upstream: str
    name: str
    path: str | None = None  # default: the path in `serve.adapters`


async def load(gw: Gateway, raw: bytes) -> dict[str, Any]:
    body = parse(raw, LoadBody)
    upstream, serve = _managed(gw, body.upstream, body.name)
    path = body.path or serve.adapter_paths()[body.name].path
    payload = {"lora_name": body.name, "lora_path": path}
    return await _on_every_replica(gw, upstream, "/load_lora_adapter", payload, body.name, True)


async def unload(gw: Gateway, upstream_name: str, name: str) -> dict[str, Any]:
    upstream, _ = _managed(gw, upstream_name, name)
    payload = {"lora_name": name}
    return await _on_every_replica(gw, upstream, "/unload_lora_adapter", payload, name, False)


def _managed(gw: Gateway, upstream_name: str, name: str) -> tuple[Upstream, Serve]:
    config = gw.settings.upstreams.get(upstream_name)
    if not isinstance(config, VllmUpstream) or config.serve is None:
        raise NotFound(
            f"No vLLM upstream `{upstream_name}` with a `serve` section.", param="upstream"
        )
    if name not in config.serve.adapters:
        declared = ", ".join(sorted(config.serve.adapters)) or "none"
        raise BadRequest(
            f"Adapter `{name}` is not declared in upstreams.{upstream_name}.serve.adapters "
            f"(declared: {declared}).",
            param="name",
        )
    return gw.upstreams[upstream_name], config.serve


async def _on_every_replica(
    gw: Gateway, upstream: Upstream, path: str, payload: dict[str, str], name: str, loading: bool
) -> dict[str, Any]:
    """Ask every replica; an adapter already (un)loaded counts as done. 502 unless all did."""
    results = await asyncio.gather(
        *(_ask(upstream, i, path, payload) for i in range(len(upstream.roots)))
    )
    replicas: list[dict[str, Any]] = []
    for index, error in enumerate(results):
        if error is None:
            held = upstream.held[index]
            if held is not None:
                upstream.held[index] = held | {name} if loading else held - {name}
        replicas.append(
            {"replica": index, "loaded": loading == (error is None)}
            | ({"error": error} if error else {})
        )
    failed = [r for r in replicas if "error" in r]
    verb = "load" if loading else "unload"
    log.info("adapter %s: %s on upstream %s: %d of %d replicas", name, verb, upstream.name,
             len(replicas) - len(failed), len(replicas))  # fmt: skip
    if failed:
        detail = "; ".join(f"replica {r['replica']}: {r['error']}" for r in failed)
        raise UpstreamError(f"Could not {verb} adapter `{name}` on every replica: {detail}")
    return {"upstream": upstream.name, "name": name, "replicas": replicas}


async def _ask(upstream: Upstream, index: int, path: str, payload: dict[str, str]) -> str | None:
    """None when the replica did it (or had it done already), else why not (scrubbed)."""
    try:
        response = await upstream.client.post(
            upstream.url(index, path),
            json=payload,
            headers=upstream.headers,
            timeout=httpx.Timeout(TIMEOUT_S),
        )
    except httpx.HTTPError as exc:
        return scrub(f"{type(exc).__name__}: {exc}", upstream.secrets)
    if response.status_code == 200:
        return None
    text = scrub(response.text[:300], upstream.secrets)
    if "has already been loaded" in text or "cannot be found" in text:
        return None  # vLLM's words for "loaded already" and "not loaded" (nothing to undo)
    if response.status_code == 404:
        return "not allowed (start vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)"
    return f"HTTP {response.status_code}: {text}"
