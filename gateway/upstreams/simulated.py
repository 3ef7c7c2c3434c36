"""`kind: simulated`: the built-in stand-in upstream, called in process without a socket."""

from __future__ import annotations

from collections.abc import Mapping

from gateway.settings import SimulatedUpstream
from gateway.upstreams.base import Upstream, make_client
from gateway.upstreams.inprocess import InProcessTransport
from serving.simulated import SimProfile, create_simulated_app


def build(name: str, config: SimulatedUpstream, environ: Mapping[str, str]) -> Upstream:
    profile = SimProfile(
        ttft_ms=config.ttft_ms,
        tokens_per_s=config.tokens_per_s,
        failure_rate=config.failure_rate,
        completion_tokens=config.completion_tokens,
        models=tuple(config.models),
        answers=config.answers,
        accuracy=dict(config.accuracy),
    )
    transport = InProcessTransport(create_simulated_app(profile))
    return Upstream(
        name=name,
        kind="simulated",
        roots=["http://simulated.invalid/v1"],
        client=make_client(config.timeouts, config.pool, transport),
        timeouts=config.timeouts,
        billed=config.gpu is None,
    )
