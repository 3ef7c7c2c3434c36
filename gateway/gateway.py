"""The gateway's run-time state: settings, keys, upstream clients, variants and records."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gateway.auth import KeyRing
from gateway.records import RecordLog, RequestRecord, Usage, token_cost
from gateway.settings import Route, Settings, Variant
from gateway.tokens import OFFLINE_DEFAULT, REPLY_PRIMING, TokenCounter
from gateway.upstreams import Upstream, build_upstream
from router.shaping import shape_chat_messages

log = logging.getLogger("turnout")


@dataclass(frozen=True)
class VariantRuntime:
    """A variant with what every request on it needs, computed once at start."""

    name: str
    config: Variant
    upstream: Upstream
    system: str
    examples: tuple[tuple[str, str], ...]
    injected_tokens: int
    counter: TokenCounter

    @property
    def tuning(self) -> str:
        return "prompted" if self.config.is_prompted else "fine-tuned"


class Gateway:
    """Everything a request handler needs; made in the app's lifespan, closed at shutdown."""

    def __init__(self, settings: Settings, environ: Mapping[str, str]) -> None:
        self.settings = settings
        self.keys = KeyRing(settings.keys)
        self.admin_key = environ.get(settings.admin_key_env or "") or None
        self.records = RecordLog()
        self.rand = random.Random()
        self.upstreams = {
            name: build_upstream(name, config, environ)
            for name, config in settings.upstreams.items()
        }
        self.variants = {
            name: _runtime(name, variant, self.upstreams[variant.upstream])
            for name, variant in settings.variants.items()
        }
        if self.keys.open:
            log.warning(
                "no client keys configured: this gateway is OPEN to anyone who can reach it"
            )
        _warn_inexact_tokenizers(self.variants.values())

    def route(self, name: str) -> Route | None:
        return self.settings.routes.get(name)

    def cost(
        self, variant: VariantRuntime, replica: int | None, usage: Usage, span: tuple[float, float]
    ) -> float:
        """Dollars for one request: tokens times price for priced variants, else its share of
        the GPU time of the replica that served it (`span`: perf_counter start and end)."""
        return token_cost(variant.config.price, usage)

    def account(self, record: RequestRecord) -> None:
        """Keep a finished request's record (and, from there, its metrics)."""
        self.records.add(record)

    def degraded(self) -> list[str]:
        """Parts that are not fully working, named for `/readyz` (health checks fill this)."""
        return []

    async def aclose(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.aclose()


def _warn_inexact_tokenizers(variants: Iterable[VariantRuntime]) -> None:
    """Say once which variants are estimated with a tokenizer that is not their model's own."""
    inexact = sorted(v.name for v in variants if v.config.encoding is None)
    if inexact:
        log.warning(
            "token estimates for %s use %s, not their models' own tokenizers (set `encoding` "
            "per variant); estimates are used only when an upstream reports no usage",
            ", ".join(inexact),
            OFFLINE_DEFAULT,
        )


def _runtime(name: str, variant: Variant, upstream: Upstream) -> VariantRuntime:
    prompt = variant.prompt
    system = prompt.system if prompt else ""
    examples = tuple((e.user, e.assistant) for e in prompt.examples) if prompt else ()
    counter = TokenCounter(variant.encoding)
    counter.text("")  # load the encoding now (warning about an unknown name), not on a request
    injected = 0
    if system or examples:
        # What the prompt adds to any conversation: its messages minus the reply priming.
        injected = counter.chat(shape_chat_messages([], system, examples)) - REPLY_PRIMING
    return VariantRuntime(name, variant, upstream, system, examples, injected, counter)
