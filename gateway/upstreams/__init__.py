"""Upstream kinds, one per module, each a `build(name, config, environ) -> Upstream`."""

from __future__ import annotations

from collections.abc import Mapping

from gateway.settings import OpenAIUpstream, SimulatedUpstream
from gateway.settings import Upstream as UpstreamConfig
from gateway.upstreams import openai, simulated, vllm
from gateway.upstreams.base import Upstream


def build_upstream(name: str, config: UpstreamConfig, environ: Mapping[str, str]) -> Upstream:
    if isinstance(config, OpenAIUpstream):
        return openai.build(name, config, environ)
    if isinstance(config, SimulatedUpstream):
        return simulated.build(name, config, environ)
    return vllm.build(name, config, environ)


__all__ = ["Upstream", "build_upstream"]
