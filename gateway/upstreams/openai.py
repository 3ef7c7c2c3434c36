"""`kind: openai`: any OpenAI-compatible hosted API, called with a key from the environment."""

from __future__ import annotations

from collections.abc import Mapping

from gateway.settings import OpenAIUpstream
from gateway.upstreams.base import Upstream, make_client, make_pool


def build(name: str, config: OpenAIUpstream, environ: Mapping[str, str]) -> Upstream:
    secret = environ.get(config.api_key_env, "") if config.api_key_env else ""
    headers = dict(config.headers)
    if secret:
        headers["authorization"] = f"Bearer {secret}"
    return Upstream(
        name=name,
        kind="openai",
        roots=[config.base_url.rstrip("/")],
        client=make_client(config.timeouts, config.pool),
        pool=make_pool(config.pool),
        timeouts=config.timeouts,
        headers=headers,
        secrets=(secret,) if secret else (),
        billed=True,
    )
