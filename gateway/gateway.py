"""The gateway's run-time state: settings, keys, upstream clients, variants and records."""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from gateway.auth import KeyRing
from gateway.directory import Directory, MemoryDirectory
from gateway.directory_redis import RedisDirectory
from gateway.errors import scrub
from gateway.gpu_meter import GpuMeter
from gateway.limits import Limiter
from gateway.metrics import MULTIPROC_ENV, Metrics
from gateway.model_watcher import ModelWatcher
from gateway.overload import LoadShedder
from gateway.record_store import RecordKeeper, connect_redis, open_record_store
from gateway.records import RequestRecord, Usage, token_cost
from gateway.rules_config import rules_from_settings
from gateway.scraper import MetricsScraper
from gateway.settings import Route, Settings, SimulatedUpstream, Variant, VllmUpstream
from gateway.shadow import ShadowRunner
from gateway.state_memory import MemoryState
from gateway.state_redis import RedisState
from gateway.tokens import OFFLINE_DEFAULT, REPLY_PRIMING, TokenCounter
from gateway.upstreams import Upstream, build_upstream
from router.bounds import RequestBounds
from router.breaker import BreakerBoard, BreakerConfig
from router.retry_budget import RetryBudget
from router.shaping import shape_chat_messages

log = logging.getLogger("turnout")
WORKERS_ENV = "TURNOUT_WORKERS"
TOKENIZE_TIMEOUT_S = 5.0


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

    @property
    def adapter(self) -> str | None:
        """The served model name on a vLLM upstream (often a LoRA adapter), for replica choice."""
        return self.config.model if self.upstream.kind == "vllm" else None


class Gateway:
    """Everything a request handler needs; made in the app's lifespan, closed at shutdown."""

    def __init__(self, settings: Settings, environ: Mapping[str, str]) -> None:
        self.settings = settings
        self.directory: Directory = MemoryDirectory()  # run-time keys, assignment overrides
        self.keys = KeyRing(settings.keys, self.directory)
        self.admin_key = environ.get(settings.admin_key_env or "") or None
        self.redis: Redis | None = None  # the shared state store, connected by start()
        self.records: RecordKeeper = open_record_store(settings, None)
        self.metrics = Metrics(
            CollectorRegistry(),
            routes=settings.routes,
            upstream_of={name: v.upstream for name, v in settings.variants.items()},
            multiprocess_dir=environ.get(MULTIPROC_ENV) or None,
        )
        self.rand = random.Random()
        self.upstreams = {
            name: build_upstream(name, config, environ)
            for name, config in settings.upstreams.items()
        }
        self.variants = {
            name: _runtime(name, variant, self.upstreams[variant.upstream])
            for name, variant in settings.variants.items()
        }
        self.meters = meters_for(settings)
        self.workers = int(environ.get(WORKERS_ENV, "1") or 1)
        self.limiter = Limiter(
            MemoryState(), settings.state, share=_memory_share(settings, environ)
        )
        self.limiter.on_fallback = self.metrics.state_fallback
        self.keys.on_fallback = self.metrics.state_fallback
        self.background: set[asyncio.Task[None]] = set()
        self.shedder = LoadShedder(settings.server.max_in_flight)  # app.py puts it in front
        self.route_bounds: dict[str, RequestBounds] = {}  # per route, filled by proxy.check_bounds
        self.redis_down = False
        self._redis_checked = -math.inf
        self.rules = {name: rules_from_settings(route) for name, route in settings.routes.items()}
        self.rules_count_tokens = {
            name: any(
                r.when.prompt_tokens_above is not None or r.when.prompt_tokens_below is not None
                for r in route.rules
            )
            for name, route in settings.routes.items()
        }
        self.scrapers = [
            MetricsScraper(u) for u in self.upstreams.values() if u.scrape_interval_s is not None
        ]
        self.watchers = [
            ModelWatcher(self.upstreams[name], config.scrape_interval_s)
            for name, config in settings.upstreams.items()
            if isinstance(config, VllmUpstream) and self.upstreams[name].managed
        ]
        self.shadows = ShadowRunner(self, settings.routing.shadow_concurrency)
        routing = settings.routing
        self.breakers = BreakerBoard(BreakerConfig(**msgspec.structs.asdict(routing.breaker)))
        self.retry_budget = RetryBudget(routing.retry_budget_ratio, routing.retry_budget_min)
        if self.keys.open:
            log.warning(
                "no client keys configured: this gateway is OPEN to anyone who can reach it"
            )
        _warn_inexact_tokenizers(self.variants.values())

    def route(self, name: str) -> Route | None:
        return self.settings.routes.get(name)

    def available(self, variant: str, now: float) -> bool:
        """Some replica of `variant` holds its model (as far as is known) and would let an
        attempt through its circuit now."""
        runtime = self.variants[variant]
        if not runtime.upstream.serves(runtime.config.model):
            return False
        return self.breakers.variant_available(variant, len(runtime.upstream.roots), now)

    def cost(
        self,
        variant: VariantRuntime,
        replica: int | None,
        usage: Usage,
        span: tuple[float, float],
        *,
        settle: bool = True,
    ) -> float:
        """Dollars for one request: tokens times price for priced variants, else its share of
        the GPU time of the replica that served it (`span`: perf_counter start and end; 0.0
        without a `gpu` section). `settle=False` quotes without remembering the request: the
        final figure is settled once, when the request is recorded."""
        if variant.config.price is not None:
            return token_cost(variant.config.price, usage)
        meter = self.meters.get(variant.config.upstream)
        if meter is None or replica is None:
            return 0.0
        # Cached prompt tokens skip prefill. A recorded request has left in_flight already;
        # a quoted one has not.
        prompt = usage.prompt - min(usage.cached, usage.prompt)
        running = variant.upstream.in_flight[replica] - (0 if settle else 1)
        charge = meter.settle if settle else meter.quote
        return charge(replica, span, prompt, usage.completion, running=running)

    def account(self, record: RequestRecord) -> None:
        """Keep a finished request's record (and, from there, its metrics)."""
        self.records.add(record)
        self.metrics.observe(record)

    def account_rejected(self, status: int, route: str | None, variant: str | None) -> None:
        """Count an API call refused before an exchange took it (it leaves no record)."""
        self.metrics.rejected(status, route, variant)

    def degraded(self) -> list[str]:
        """Parts that are not fully working, named for `/readyz`."""
        now = time.monotonic()
        return (
            [
                f"circuit open: variant {variant} replica {replica}"
                for variant, replica in self.breakers.open_circuits(now)
            ]
            + [
                f"upstream {s.upstream.name} replica {i}: metrics stale"
                for s in self.scrapers
                for i in s.upstream.stale_replicas(now)
            ]
            + [
                f"variant {name}: adapter {v.config.model} on no replica of upstream "
                f"{v.upstream.name}"
                for name, v in self.variants.items()
                if not v.upstream.serves(v.config.model)
            ]
            + (
                ["redis: unreachable, limits and budgets on local fallbacks"]
                if self.redis_down or self.limiter.unavailable_since is not None
                else []
            )
        )

    async def check_redis(self) -> None:
        """Ping the shared store (at most once a second) so `/readyz` tells when it is away,
        even on a gateway whose requests never touch it."""
        now = time.monotonic()
        if self.redis is None or now - self._redis_checked < 1.0:
            return
        self._redis_checked = now
        try:
            await self.redis.ping()
        except Exception:
            self.redis_down = True
            return
        self.redis_down = False

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` off the response path; it is awaited (briefly) at shutdown."""
        task = asyncio.get_running_loop().create_task(work)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def start(self) -> None:
        """Connect the shared state store (if configured) and start the record writers."""
        url = self.settings.state.redis_url
        if url is not None:
            self.redis = connect_redis(url)
            state = self.settings.state
            self.limiter.shared = RedisState(self.redis, state.key_prefix, state.timeout_s)
            self.directory = RedisDirectory(self.redis, state.key_prefix, state.timeout_s)
            self.keys.directory = self.directory
            await self.check_redis()
            if self.redis_down:
                log.warning("Redis is unreachable at start: running degraded until it answers")
            self.records = open_record_store(self.settings, self.redis)
        await self.records.start()
        for scraper in self.scrapers:
            scraper.start()
        for watcher in self.watchers:
            await watcher.poll_once()  # routable from the first request, not an interval later
            watcher.start()
        await self._count_injected_on_vllm()

    async def _count_injected_on_vllm(self) -> None:
        """A prompted variant on vLLM: its injected tokens counted by the model's own tokenizer
        and chat template (vLLM's /tokenize: the prompt's messages plus a probe, minus the
        probe alone), not by tiktoken. Kept as estimated when vLLM cannot say."""
        probe = [{"role": "user", "content": "?"}]
        for name, v in list(self.variants.items()):
            if v.upstream.kind != "vllm" or not (v.system or v.examples):
                continue
            shaped = shape_chat_messages([], v.system, v.examples) + probe
            try:
                async with asyncio.timeout(TOKENIZE_TIMEOUT_S):
                    with_prompt = await _tokenize(v.upstream, v.config.model, shaped)
                    alone = await _tokenize(v.upstream, v.config.model, probe)
            except Exception as exc:  # an older vLLM, a replica down: the estimate stays
                reason = scrub(str(exc) or type(exc).__name__, v.upstream.secrets)
                log.info("variant %s: injected tokens stay estimated (%s)", name, reason)
                continue
            if with_prompt > alone:
                self.variants[name] = replace(v, injected_tokens=with_prompt - alone)

    async def aclose(self) -> None:
        try:
            for scraper in self.scrapers:
                await scraper.aclose()
            for watcher in self.watchers:
                await watcher.aclose()
            if self.background:  # settles still under way: give them a moment
                await asyncio.wait(self.background, timeout=5)
            await self.shadows.aclose()  # before the records and clients shadows still use
            await self.records.aclose()  # flushes pending records to Redis and the file
            if self.redis is not None:
                await self.redis.aclose()
            for upstream in self.upstreams.values():
                await upstream.aclose()
        finally:
            self.metrics.close()


async def _tokenize(upstream: Upstream, model: str, messages: list[dict[str, str]]) -> int:
    root = upstream.roots[0].removesuffix("/v1")
    body = {"model": model, "messages": messages, "add_generation_prompt": True}
    response = await upstream.client.post(root + "/tokenize", json=body, headers=upstream.headers)
    response.raise_for_status()
    return int(response.json()["count"])


def _memory_share(settings: Settings, environ: Mapping[str, str]) -> int:
    """With in-process state behind N workers, each enforces 1/N of every limit (said aloud),
    so limits are never silently multiplied by N."""
    workers = int(environ.get(WORKERS_ENV, "1") or 1)
    limited = any(k.rpm or k.tpm or k.budget for k in settings.keys) or any(
        r.budget for r in settings.routes.values()
    )
    if settings.state.redis_url is None and workers > 1 and limited:
        log.warning(
            "%d workers share no state store: each enforces 1/%d of every rate limit and "
            "budget; set state.redis_url for exact shared limits",
            workers,
            workers,
        )
        return workers
    return 1


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


def meters_for(settings: Settings) -> dict[str, GpuMeter]:
    """A GPU meter per upstream that has a `gpu` section, sized to its replicas."""
    meters: dict[str, GpuMeter] = {}
    for name, config in settings.upstreams.items():
        if isinstance(config, VllmUpstream) and config.gpu is not None:
            meters[name] = GpuMeter(config.gpu, len(config.urls))
        elif isinstance(config, SimulatedUpstream) and config.gpu is not None:
            meters[name] = GpuMeter(config.gpu, 1)
    return meters


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
