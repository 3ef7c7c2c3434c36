"""Experiment report: per route, per variant statistics from request records, with 95%
confidence intervals, pairwise comparisons with the control, break-even rates and a verdict.

Conventions:
- Shadow records (`shadow_of` set) and forced ones (the admin chose the variant, as `turnout
  eval` does) are left out of the per-variant figures; only their counts are given. Shadows
  have their own paired comparison with the primary they copied.
- An *error* is a record with status >= 500 (the gateway or upstream failed; 4xx and the
  client's own 499 are not the variant's fault). A *success* has status < 400.
- Latency and tokens are over successes; cost is over every record (what was paid per
  request served, failures included).
- Means and percentiles get percentile-bootstrap intervals up to BOOTSTRAP_MAX_N values;
  above it, where the central limit theorem holds and a bootstrap would cost O(n x resamples)
  for the same answer, analytic ones: the normal interval of a mean, order-statistic intervals
  of a percentile, and differences with the two standard errors added in quadrature.
  Bootstrap draws use a `random.Random` seeded per (seed, variant, figure): the same records
  give the same report.
- Differences are `variant - control`; the control is the first variant of the route's split.
- Feedback (`feedback`: request id -> {metric: value}) is summarised per declared metric of
  the route: a rate with a Wilson interval for bool metrics, a bootstrap mean for float ones;
  its pairwise difference says `better` in the metric's own direction (`higher_is_better`).
- Shadows are paired with the primary request they copied (when it is in the records): the
  agreement rate of their answers (router.compare; failed shadow calls counted apart) and the
  mean latency and cost differences `shadow - primary` on the same requests (answered
  shadows only; what failed shadows cost is given apart).
- Break-even: the request rate per hour above which the self-hosted fleet (a fixed cost per
  hour) is cheaper than the hosted variant's measured cost per request (prompt tax included).
  Beside it the capacity one replica was seen to sustain, in requests per hour of this route's
  mix (a lower bound: the busiest 10 s of the window), and whether the fleet's measured
  capacity reaches the crossing.

Verdict (per route, documented in the answer as `rule`):
- "switch to X": X is the cheapest variant whose cost per request is significantly lower
  than the control's, whose error rate is not significantly higher, whose feedback is
  significantly worse on no declared metric, and whose p95 total latency is at most 20%
  above the control's.
- "split": no switch yet, but some variant's cost difference is not significant and the
  sample size needed per arm (to detect the route's `min_effect`, 10% by default, in mean
  cost) exceeds what it has: keep the experiment running.
- "keep": otherwise (the control stays).
A `warning: "too few data"` is added when any variant has fewer than 30 successes.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.gpu_meter import FleetFigures
from gateway.records import RequestRecord, Usage
from gateway.settings import FeedbackMetric, Route, Variant
from router.gpu_cost import break_even_rate
from router.stats import (
    Difference,
    Interval,
    bootstrap,
    diff_of_proportions_ci,
    diff_of_stats_ci,
    finite,
    mean,
    mean_interval,
    normal_difference,
    percentile,
    percentile_interval,
    sample_size_for_means,
    wilson,
)

MIN_SUCCESSES = 30
LATENCY_SLACK = 1.20  # a switch may not make p95 latency worse than this ratio
RESAMPLES = 1000
BOOTSTRAP_MAX_N = 500  # above this many values, analytic intervals (CLT, order statistics)
QUANTILES = tuple(range(0, 101, 5))  # the latency distribution drawn by the HTML report

Json = dict[str, Any]
Feedback = Mapping[str, Mapping[str, bool | float]]  # request id -> metric -> value


def _p(q: float) -> Callable[[Sequence[float]], float]:
    return lambda values: percentile(values, q)


@dataclass
class _Arm:
    """One variant's records on the route, split into the samples the report needs."""

    name: str
    records: list[RequestRecord]
    seed: int
    resamples: int
    feedback: Feedback

    def feedback_values(self, metric: FeedbackMetric) -> list[float]:
        """The metric's values posted on this arm's requests (bools as 0/1); values of another
        type (posted before the metric's type was changed in the config) are left out."""
        found = (self.feedback.get(r.request_id, {}).get(metric.name) for r in self.records)
        flag = metric.type == "bool"
        return [float(v) for v in found if v is not None and isinstance(v, bool) == flag]

    @property
    def ok(self) -> list[RequestRecord]:
        return [r for r in self.records if r.status < 400]

    @property
    def errors(self) -> int:
        return sum(1 for r in self.records if r.status >= 500)

    @property
    def costs(self) -> list[float]:
        return [r.cost_usd for r in self.records]

    def latencies(self, phase: str) -> list[float]:
        values = (getattr(r.latency, phase) for r in self.ok)
        return [float(v) for v in values if v is not None]

    def rng(self, figure: str) -> random.Random:
        return random.Random(f"{self.seed}:{self.name}:{figure}")

    def mean_ci(self, values: Sequence[float], figure: str) -> Interval:
        return _mean_ci(values, self.rng(figure), self.resamples)

    def pct_ci(self, values: Sequence[float], q: float, figure: str) -> Interval:
        if len(values) > BOOTSTRAP_MAX_N:
            return percentile_interval(values, q)
        return bootstrap(values, _p(q), self.rng(figure), self.resamples)


def _mean_ci(values: Sequence[float], rng: random.Random, resamples: int) -> Interval:
    if len(values) > BOOTSTRAP_MAX_N:
        return mean_interval(values)
    return bootstrap(values, mean, rng, resamples)


def _diff_ci(
    a: Sequence[float], b: Sequence[float], q: float | None, rng: random.Random, resamples: int
) -> Difference:
    """`b - a` of the mean (`q` None) or of the `q`th percentile."""
    if min(len(a), len(b)) > BOOTSTRAP_MAX_N:
        if q is None:
            return normal_difference(mean_interval(a), mean_interval(b))
        return normal_difference(percentile_interval(a, q), percentile_interval(b, q))
    return diff_of_stats_ci(a, b, mean if q is None else _p(q), rng, resamples)


def _feedback_table(arm: _Arm, metrics: Sequence[FeedbackMetric]) -> Json:
    table: Json = {}
    for metric in metrics:
        values = arm.feedback_values(metric)
        if metric.type == "bool":
            value = wilson(int(sum(values)), len(values))
        else:
            value = arm.mean_ci(values, f"feedback-{metric.name}")
        table[metric.name] = {"n": len(values), "mean": value.as_json()}
    return table


def _feedback_pairs(control: _Arm, arm: _Arm, metrics: Sequence[FeedbackMetric]) -> Json:
    pairs: Json = {}
    for metric in metrics:
        a, b = control.feedback_values(metric), arm.feedback_values(metric)
        if metric.type == "bool":
            d = diff_of_proportions_ci(int(sum(a)), len(a), int(sum(b)), len(b))
        else:
            d = _diff_ci(a, b, None, arm.rng(f"feedback-{metric.name}"), arm.resamples)
        up = d.estimate > 0 if metric.higher_is_better else d.estimate < 0
        pairs[metric.name] = d.as_json() | {"better": d.significant and up}
    return pairs


def _variant_table(arm: _Arm, metrics: Sequence[FeedbackMetric]) -> Json:
    ok = arm.ok
    latency: Json = {}
    for phase in ("total", "ttft", "tpot"):
        values = arm.latencies(phase)
        latency[phase] = {
            "n": len(values),
            "p50": arm.pct_ci(values, 50, f"{phase}-p50").as_json(),
            "p95": arm.pct_ci(values, 95, f"{phase}-p95").as_json(),
            "p99": finite(percentile(values, 99)),
            "quantiles": [finite(percentile(values, q)) for q in QUANTILES],
        }
    kinds = {
        "client_prompt": [float(r.usage.prompt - r.usage.injected) for r in ok],
        "injected": [float(r.usage.injected) for r in ok],
        "completion": [float(r.usage.completion) for r in ok],
    }
    cost = arm.mean_ci(arm.costs, "cost")
    per_1k = Interval(cost.low * 1000, cost.high * 1000, cost.estimate * 1000)
    taxes = [r.prompt_tax_usd for r in arm.records]
    return {
        "requests": len(arm.records),
        "successes": len(ok),
        "errors": arm.errors,
        "error_rate": wilson(arm.errors, len(arm.records)).as_json(),
        "latency_s": latency,
        "tokens_per_request": {
            kind: arm.mean_ci(values, f"tokens-{kind}").as_json() for kind, values in kinds.items()
        },
        "cost_per_request_usd": cost.as_json(),
        "cost_per_1k_requests_usd": per_1k.as_json(),
        "prompt_tax_per_request_usd": arm.mean_ci(taxes, "prompt-tax").as_json(),
        "feedback": _feedback_table(arm, metrics),
    }


def _needed_per_arm(control: _Arm, min_effect: float) -> int | None:
    costs = control.costs
    if len(costs) < 2 or mean(costs) <= 0:
        return None
    return sample_size_for_means(statistics.stdev(costs), min_effect * mean(costs))


def _pairwise(control: _Arm, arm: _Arm, route: Route) -> Json:
    rng = arm.rng(f"vs-{control.name}")
    cost = _diff_ci(control.costs, arm.costs, None, rng, arm.resamples)
    p50 = _diff_ci(control.latencies("total"), arm.latencies("total"), 50, rng, arm.resamples)
    errors = diff_of_proportions_ci(
        control.errors, len(control.records), arm.errors, len(arm.records)
    )
    needed = _needed_per_arm(control, route.min_effect)
    have = min(len(control.records), len(arm.records))
    return {
        "variant": arm.name,
        "control": control.name,
        "cost_per_request_usd": cost.as_json(),
        "latency_p50_total_s": p50.as_json(),
        "error_rate": errors.as_json(),
        "feedback": _feedback_pairs(control, arm, route.feedback),
        "needed_per_arm": needed,
        "still_needed_per_arm": None if needed is None else max(needed - have, 0),
        "min_effect": f"{route.min_effect:.0%} of the control's mean cost per request",
    }


def _shadows(
    primary: Sequence[RequestRecord], own: Sequence[RequestRecord], seed: int
) -> list[Json]:
    """Each (primary variant, shadow variant) pair: agreement and paired deltas."""
    by_id = {r.request_id: r for r in primary}
    groups: dict[tuple[str, str], list[tuple[RequestRecord, RequestRecord]]] = {}
    for shadow in own:
        first = by_id.get(shadow.shadow_of or "")
        if first is not None:
            groups.setdefault((first.variant, shadow.variant), []).append((first, shadow))
    found: list[Json] = []
    for (first_variant, shadow_variant), pairs in sorted(groups.items()):
        verdicts = [(s.comparison or {}).get("agreement") for _, s in pairs]
        compared = [v for v in verdicts if v in ("agree", "disagree")]
        answered = [(p, s) for p, s in pairs if s.status < 400]
        latency = [s.latency.total - p.latency.total for p, s in answered]
        cost = [s.cost_usd - p.cost_usd for p, s in answered]
        failed_cost = math.fsum(s.cost_usd for _, s in pairs if s.status >= 400)
        rng = random.Random(f"{seed}:shadow:{first_variant}:{shadow_variant}")
        found.append(
            {
                "primary": first_variant,
                "shadow": shadow_variant,
                "pairs": len(pairs),
                "shadow_errors": len(pairs) - len(compared),
                "agreement": wilson(compared.count("agree"), len(compared)).as_json(),
                "latency_delta_s": _mean_ci(latency, rng, RESAMPLES).as_json(),
                "cost_delta_usd": _mean_ci(cost, rng, RESAMPLES).as_json(),
                "failed_shadows_cost_usd": failed_cost,
            }
        )
    return found


def _break_even(
    arms: Mapping[str, _Arm],
    variants: Mapping[str, Variant],
    meters: Mapping[str, FleetFigures],
    rate: float | None,
) -> list[Json]:
    found: list[Json] = []
    for ft_name in arms:
        ft = variants.get(ft_name)
        if ft is None or ft.is_prompted or ft.upstream not in meters:
            continue
        meter = meters[ft.upstream]
        fleet_per_hour = meter.fleet_cost(3600.0)
        weight = mean([_weight(r.usage, meter.gpu.prefill_factor) for r in arms[ft_name].ok])
        peak = meter.capacity()
        per_replica = peak * 3600 / weight if peak > 0 and weight > 0 else None
        fleet_capacity = None if per_replica is None else per_replica * meter.replicas
        for hosted_name, hosted_arm in arms.items():
            hosted = variants.get(hosted_name)
            if hosted is None or hosted.price is None or not hosted_arm.records:
                continue
            hosted_cost = mean(hosted_arm.costs)
            crossing = break_even_rate(fleet_per_hour, hosted_cost)
            found.append(
                {
                    "fine_tuned": ft_name,
                    "hosted": hosted_name,
                    "fleet_usd_per_hour": fleet_per_hour,
                    "hosted_cost_per_request_usd": hosted_cost,
                    "break_even_requests_per_hour": finite(crossing),
                    "current_requests_per_hour": rate,
                    "fleet_cheaper_now": None if rate is None else rate > crossing,
                    "replicas": meter.replicas,
                    "capacity_tokens_per_s": peak,
                    "capacity_requests_per_hour": per_replica,
                    "fleet_capacity_requests_per_hour": fleet_capacity,
                    "within_capacity": None
                    if fleet_capacity is None
                    else crossing <= fleet_capacity,
                }
            )
    return found


def _weight(usage: Usage, prefill_factor: float) -> float:
    """A request's work as the GPU meter weighs it (cached prompt tokens were not computed)."""
    computed = usage.prompt - min(usage.cached, usage.prompt)
    return prefill_factor * computed + usage.completion


def _verdict(control: _Arm, arms: Mapping[str, _Arm], pairs: Mapping[str, Json]) -> Json:
    verdict: Json
    control_p95 = percentile(control.latencies("total"), 95)
    switch: list[tuple[float, str, Json]] = []
    undecided: list[tuple[str, int, int]] = []
    for name, pair in pairs.items():
        cost, errors = pair["cost_per_request_usd"], pair["error_rate"]
        p95 = percentile(arms[name].latencies("total"), 95)
        ratio = p95 / control_p95 if control_p95 > 0 else math.nan
        cheaper = cost["significant"] and (cost["estimate"] or 0.0) < 0
        worse_errors = errors["significant"] and (errors["estimate"] or 0.0) > 0
        worse_feedback = any(
            f["significant"] and not f["better"] for f in pair["feedback"].values()
        )
        fine = not worse_errors and not worse_feedback
        if cheaper and fine and (math.isnan(ratio) or ratio <= LATENCY_SLACK):
            numbers = {"cost_difference_per_request_usd": cost, "p95_latency_ratio": finite(ratio)}
            switch.append((mean(arms[name].costs), name, numbers))
        needed = pair["needed_per_arm"]
        have = min(len(control.records), len(arms[name].records))
        if not cost["significant"] and needed is not None and needed > have:
            undecided.append((name, needed, have))
    if switch:
        _, name, numbers = min(switch)
        verdict = {"decision": f"switch to {name}", "numbers": numbers}
    elif undecided:
        name, needed, have = undecided[0]
        verdict = {
            "decision": "split",
            "numbers": {"variant": name, "needed_per_arm": needed, "have_per_arm": have},
        }
    else:
        verdict = {
            "decision": "keep",
            "numbers": {"control_cost_per_request_usd": finite(mean(control.costs))},
        }
    verdict["rule"] = (
        "switch to the cheapest variant significantly cheaper than the control whose error "
        "rate is not significantly higher, whose feedback is significantly worse on no metric "
        "and whose p95 latency is at most 20% higher; else split while more data could decide "
        "the cost difference; else keep"
    )
    if any(len(arm.ok) < MIN_SUCCESSES for arm in arms.values()):
        verdict["warning"] = "too few data"
    return verdict


def route_report(
    route_name: str,
    route: Route,
    records: Sequence[RequestRecord],
    variants: Mapping[str, Variant],
    meters: Mapping[str, FleetFigures],
    *,
    since: float | None,
    now: float,
    seed: int = 0,
    resamples: int = RESAMPLES,
    feedback: Feedback | None = None,
) -> Json:
    """The report of one route from its records (those of other routes are ignored)."""
    own = [r for r in records if r.route == route_name]
    primary = [r for r in own if r.shadow_of is None and not r.forced]
    names = list(route.split) + sorted({r.variant for r in primary} - set(route.split))
    arms = {
        name: _Arm(name, [r for r in primary if r.variant == name], seed, resamples, feedback or {})
        for name in names
    }
    control = arms[names[0]]
    start = since if since is not None else min((r.time for r in primary), default=now)
    hours = (now - start) / 3600
    rate = len(primary) / hours if hours > 0 else None
    pairs = {
        name: _pairwise(control, arm, route) for name, arm in arms.items() if arm is not control
    }
    shadows = [r for r in own if r.shadow_of is not None]
    return {
        "route": route_name,
        "control": control.name,
        "since": since,
        "window_hours": hours,
        "requests": len(primary),
        "requests_per_hour": rate,
        "shadow_records_excluded": sum(1 for r in own if r.shadow_of is not None),
        "forced_records_excluded": sum(1 for r in own if r.forced and r.shadow_of is None),
        "variants": {name: _variant_table(arm, route.feedback) for name, arm in arms.items()},
        "pairwise": list(pairs.values()),
        "shadow": _shadows(primary, shadows, seed),
        "break_even": _break_even(arms, variants, meters, rate),
        "verdict": _verdict(control, arms, pairs),
    }


def build_report(
    routes: Mapping[str, Route],
    records: Sequence[RequestRecord],
    variants: Mapping[str, Variant],
    meters: Mapping[str, FleetFigures],
    *,
    since: float | None,
    now: float | None = None,
    seed: int = 0,
    feedback: Feedback | None = None,
) -> Json:
    """The report of every route in `routes` (pure: `meters` are figures taken beforehand)."""
    at = time.time() if now is None else now
    return {
        "generated_at": at,
        "seed": seed,
        "level": 0.95,
        "routes": {
            name: route_report(
                name,
                route,
                records,
                variants,
                meters,
                since=since,
                now=at,
                seed=seed,
                feedback=feedback,
            )
            for name, route in routes.items()
        },
    }
