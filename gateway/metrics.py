"""Prometheus metrics: every series Turnout exports, declared here on one registry per gateway.

Labels are bounded: `route` is a configured route name or "other", `variant` a configured
variant or "none", `upstream` a configured upstream or "none", `status_class` one of 1xx…5xx
or "client_closed" (499: the client left). A name that is not in the configuration never
becomes a label value, whoever sent it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from gateway.records import RequestRecord

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
OTHER = "other"  # the route of a request rejected before a configured route was known
NONE = "none"  # its variant and upstream
CLIENT_CLOSED = "client_closed"

Outcome = Literal["ok", "error", "timeout", "rejected", "rate_limited", "client_closed"]
Agreement = Literal["agree", "disagree", "error"]

# Whole requests: a few ms (a cached embedding) to ten minutes (a long generation).
DURATION_BUCKETS = (
    *(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    *(10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0),
)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
TPOT_BUCKETS = (
    *(0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03),
    *(0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.0),
)
# Turnout's own time per request: tens of microseconds to a tenth of a second.
OVERHEAD_BUCKETS = (
    *(50e-6, 100e-6, 250e-6, 500e-6, 0.001, 0.0025),
    *(0.005, 0.01, 0.025, 0.05, 0.1),
)

SERIES = ("route", "variant", "upstream")


def status_class(status: int) -> str:
    """The status class label of an HTTP status: 1xx…5xx, or client_closed for 499."""
    if status == 499:
        return CLIENT_CLOSED
    return f"{min(max(status // 100, 1), 5)}xx"


@dataclass(frozen=True)
class _Series:
    """The children of one (route, variant, upstream): looked up once, reused per request."""

    duration: Histogram
    ttft: Histogram
    tpot: Histogram
    overhead: Histogram
    prompt: Counter
    injected: Counter
    completion: Counter
    cost: Counter
    prompt_tax: Counter
    estimated: Counter


class Metrics:
    """Turnout's metrics on `registry`, updated from request records.

    With `multiprocess_dir` (uvicorn workers, PROMETHEUS_MULTIPROC_DIR set before
    prometheus_client was first imported) every worker writes its own files there and
    `render` merges them all, so any worker answers a scrape for the whole server.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        routes: Iterable[str],
        upstream_of: Mapping[str, str],
        multiprocess_dir: str | None = None,
    ) -> None:
        self._routes = frozenset(routes)
        self._upstream_of = dict(upstream_of)
        self._upstreams = frozenset(upstream_of.values())
        self._series: dict[tuple[str, str, str], _Series] = {}
        self.multiprocess_dir = multiprocess_dir
        self._exposed: Collector = registry
        if multiprocess_dir is not None:
            # Metrics must not be registered where the merged files are collected (doubles).
            self._exposed = CollectorRegistry()
            MultiProcessCollector(self._exposed, path=multiprocess_dir)  # type: ignore[no-untyped-call]
        self._declare_traffic(registry)
        self._declare_routing(registry)

    def _declare_traffic(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "turnout_requests",
            "API calls answered, by status class (2xx, 4xx, 5xx, client_closed = 499). Calls "
            'rejected before a route was known count as route="other", variant="none".',
            [*SERIES, "status_class"],
            registry=registry,
        )
        self.duration = _histogram(
            registry, "turnout_request_duration_seconds",
            "Seconds from arrival until the answer was complete (a stream: until it ended).",
            DURATION_BUCKETS,
        )  # fmt: skip
        self.ttft = _histogram(
            registry, "turnout_time_to_first_token_seconds",
            "Seconds from arrival until a stream's first event reached the client.",
            TTFT_BUCKETS,
        )  # fmt: skip
        self.tpot = _histogram(
            registry, "turnout_time_per_output_token_seconds",
            "Seconds per completion token after the first (streams of two or more tokens).",
            TPOT_BUCKETS,
        )  # fmt: skip
        self.overhead = Histogram(
            "turnout_overhead_seconds",
            "Turnout's own time per request: total minus the time spent waiting on the upstream.",
            ["route"],
            buckets=OVERHEAD_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "turnout_tokens",
            "Tokens by kind: prompt = the client's own prompt tokens, injected = the prompt "
            "tokens Turnout added for a prompted variant (prompt + injected = the upstream's "
            "prompt_tokens), completion = generated tokens (reasoning included).",
            [*SERIES, "kind"],
            registry=registry,
        )
        self.cost = Counter(
            "turnout_cost_usd",
            "Dollars per request as recorded: tokens x price, or a GPU-billed variant's share.",
            SERIES,
            registry=registry,
        )
        self.prompt_tax = Counter(
            "turnout_prompt_tax_usd",
            "The part of turnout_cost_usd paid for prompt tokens Turnout injected (prompted "
            "variants' system prompt and examples).",
            SERIES,
            registry=registry,
        )
        self.estimated = Counter(
            "turnout_estimated_usage",
            "Requests whose tokens were counted with tiktoken because the upstream gave no usage.",
            ["route", "variant"],
            registry=registry,
        )

    def _declare_routing(self, registry: CollectorRegistry) -> None:
        self.attempts = Counter(
            "turnout_upstream_attempts",
            "Calls to an upstream by outcome: ok, error, timeout, rejected, rate_limited, "
            "client_closed (a request with fallbacks makes several).",
            ["upstream", "outcome"],
            registry=registry,
        )
        self.fallbacks = Counter(
            "turnout_fallbacks",
            "Requests answered by a fallback variant after the first choice failed.",
            ["route"],
            registry=registry,
        )
        self.circuit_open = Gauge(
            "turnout_circuit_open",
            "1 while the variant's circuit breaker is open (with workers: open in any of them).",
            ["variant"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.state_fallbacks = Counter(
            "turnout_state_fallbacks",
            "Decisions made without the shared state store (it was away), by feature: "
            "rate_limit (a local share of the limit), budget (refused, or a local allowance), "
            "auth (the local key cache) or assignment (the sticky hash, no override).",
            ["feature"],
            registry=registry,
        )
        self.shadow = Counter(
            "turnout_shadow",
            "Shadow requests compared with their primary, by agreement: agree, disagree, error.",
            ["route", "agreement"],
            registry=registry,
        )

    def observe(self, record: RequestRecord) -> None:
        """Count one finished request. A shadow copy, or a forced one (`turnout eval`), adds its
        tokens, cost (real spend) and estimate flag but not a request or latencies: those
        describe what clients saw."""
        route, variant, upstream = self._labels(record.route, record.variant, record.upstream)
        series = self._series_of(route, variant, upstream)
        usage, latency = record.usage, record.latency
        series.prompt.inc(max(usage.prompt - usage.injected, 0))
        series.injected.inc(usage.injected)
        series.completion.inc(usage.completion)
        series.cost.inc(max(record.cost_usd, 0.0))
        series.prompt_tax.inc(max(record.prompt_tax_usd, 0.0))
        if usage.estimated:
            series.estimated.inc()
        if record.shadow_of is not None or record.forced:
            return
        self.requests.labels(route, variant, upstream, status_class(record.status)).inc()
        series.duration.observe(latency.total)
        series.overhead.observe(latency.overhead)
        if latency.ttft is not None:
            series.ttft.observe(latency.ttft)
        if latency.tpot is not None:
            series.tpot.observe(latency.tpot)

    def rejected(self, status: int, route: str | None = None, variant: str | None = None) -> None:
        """Count an API call refused before an exchange recorded it (401, 413, 400, 404, …)."""
        upstream = self._upstream_of.get(variant or "", NONE)
        labels = self._labels(route or OTHER, variant or NONE, upstream)
        self.requests.labels(*labels, status_class(status)).inc()

    def attempt(self, upstream: str, outcome: Outcome) -> None:
        self.attempts.labels(upstream if upstream in self._upstreams else NONE, outcome).inc()

    def fallback(self, route: str) -> None:
        self.fallbacks.labels(route if route in self._routes else OTHER).inc()

    def circuit(self, variant: str, is_open: bool) -> None:
        if variant in self._upstream_of:
            self.circuit_open.labels(variant).set(1.0 if is_open else 0.0)

    def shadowed(self, route: str, agreement: Agreement) -> None:
        self.shadow.labels(route if route in self._routes else OTHER, agreement).inc()

    def state_fallback(self, feature: str) -> None:
        known = feature in ("budget", "auth", "assignment")
        self.state_fallbacks.labels(feature if known else "rate_limit").inc()

    def render(self) -> tuple[bytes, str]:
        """The text exposition (every worker's, merged, in multiprocess mode) and its type."""
        return generate_latest(_WithoutCreated(self._exposed)), CONTENT_TYPE_PLAIN_0_0_4

    def close(self) -> None:
        """At a worker's shutdown: drop its live gauges (counters stay in the merged totals)."""
        if self.multiprocess_dir is not None:
            mark_process_dead(os.getpid(), self.multiprocess_dir)  # type: ignore[no-untyped-call]

    def _labels(self, route: str, variant: str, upstream: str) -> tuple[str, str, str]:
        return (
            route if route in self._routes else OTHER,
            variant if variant in self._upstream_of else NONE,
            upstream if upstream in self._upstreams else NONE,
        )

    def _series_of(self, route: str, variant: str, upstream: str) -> _Series:
        key = (route, variant, upstream)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series(
                duration=self.duration.labels(*key),
                ttft=self.ttft.labels(*key),
                tpot=self.tpot.labels(*key),
                overhead=self.overhead.labels(route),
                prompt=self.tokens.labels(*key, "prompt"),
                injected=self.tokens.labels(*key, "injected"),
                completion=self.tokens.labels(*key, "completion"),
                cost=self.cost.labels(*key),
                prompt_tax=self.prompt_tax.labels(*key),
                estimated=self.estimated.labels(route, variant),
            )
        return series


def _histogram(
    registry: CollectorRegistry, name: str, doc: str, buckets: tuple[float, ...]
) -> Histogram:
    return Histogram(name, doc, SERIES, buckets=buckets, registry=registry)


class _WithoutCreated:
    """A collector without the `_created` samples: in the plain text format each would be one
    more series per child, and the multiprocess merge has none, so both modes look alike."""

    def __init__(self, source: Collector) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        for metric in self._source.collect():
            created = metric.name + "_created"
            metric.samples = [s for s in metric.samples if s.name != created]
            yield metric
