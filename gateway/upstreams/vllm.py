"""`kind: vllm`: one or more vLLM server roots; Turnout adds `/v1` and picks a replica."""

from __future__ import annotations

from collections.abc import Mapping

from gateway.settings import VllmUpstream
from gateway.upstreams.base import Upstream, make_client, make_pool


def build(name: str, config: VllmUpstream, environ: Mapping[str, str]) -> Upstream:
    secret = environ.get(config.api_key_env, "") if config.api_key_env else ""
    return Upstream(
        name=name,
        kind="vllm",
        roots=[url.rstrip("/") + "/v1" for url in config.urls],
        client=make_client(config.timeouts, config.pool),
        pool=make_pool(config.pool),
        timeouts=config.timeouts,
        headers={"authorization": f"Bearer {secret}"} if secret else {},
        secrets=(secret,) if secret else (),
        billed=False,
        metrics_urls=[url.rstrip("/") + "/metrics" for url in config.urls],
        scrape_interval_s=config.scrape_interval_s if config.scrape_metrics else None,
        managed=frozenset(config.serve.adapters) if config.serve is not None else frozenset(),
    )
