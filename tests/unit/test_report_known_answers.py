"""The experiment report on records with known truths: known-answer simulations over seeds,
a hand-computed break-even, feedback in its metric's direction, shadows paired."""

from __future__ import annotations

import math
import random
from typing import Any

import msgspec
import pytest

from gateway import report as report_module
from gateway.gpu_meter import GpuMeter
from gateway.records import Latency, RequestRecord, Usage
from gateway.report import build_report, route_report
from gateway.settings import FeedbackMetric, Gpu, Price, Route, Variant

SEEDS = range(40)
PER_ARM = 150
RESAMPLES = 400  # the report's default is 1000; fewer keeps 80 reports fast
ERROR_RATE = 0.02
LATENCY_SIGMA = 0.5  # of log seconds


def _variants(**prices: float) -> dict[str, Variant]:
    return {
        name: Variant(upstream="hosted", model=name, price=Price(input_per_mtok=per_mtok))
        for name, per_mtok in prices.items()
    }


def _record(i: int, variant: str, **fields: Any) -> RequestRecord:
    base: dict[str, Any] = {
        "request_id": f"{variant}-{i}",
        "time": float(i),
        "route": "r",
        "variant": variant,
        "upstream": "hosted",
        "tuning": "prompted",
        "endpoint": "chat",
        "stream": False,
        "status": 200,
        "latency": Latency(total=1.0),
    }
    return RequestRecord(**(base | fields))


def _arm(
    rng: random.Random, variant: str, mean_cost: float, median_s: float, n: int = PER_ARM
) -> list[RequestRecord]:
    """Costs gamma-distributed (shape 4) with a known mean, latencies log-normal with a known
    median, 2% server errors."""
    return [
        _record(
            i,
            variant,
            status=500 if rng.random() < ERROR_RATE else 200,
            cost_usd=rng.gammavariate(4.0, mean_cost / 4.0),
            latency=Latency(total=rng.lognormvariate(math.log(median_s), LATENCY_SIGMA)),
        )
        for i in range(n)
    ]


def _simulate(seed: int, cost_b: float, median_b: float) -> dict[str, Any]:
    rng = random.Random(seed)
    records = _arm(rng, "a", 0.001, 1.0) + _arm(rng, "b", cost_b, median_b)
    route = Route(split={"a": 50, "b": 50})
    return route_report(
        "r", route, records, _variants(a=1, b=1), {}, since=0.0, now=3600.0, seed=seed,
        resamples=RESAMPLES,
    )  # fmt: skip


def _contains(interval: dict[str, Any], value: float) -> bool:
    return bool(interval["low"] <= value <= interval["high"])


def test_known_difference_is_found_and_intervals_hold_the_truth() -> None:
    """B truly 30% cheaper and 40% faster at the median, same error rate."""
    truths = {"a": (0.001, 1.0), "b": (0.0007, 0.6)}
    covered = {"cost": 0, "p50": 0, "errors": 0}
    cheaper = faster = switched = 0
    for seed in SEEDS:
        report = _simulate(seed, 0.0007, 0.6)
        for name, (cost, median) in truths.items():
            table = report["variants"][name]
            covered["cost"] += _contains(table["cost_per_request_usd"], cost)
            covered["p50"] += _contains(table["latency_s"]["total"]["p50"], median)
            covered["errors"] += _contains(table["error_rate"], ERROR_RATE)
        (pair,) = report["pairwise"]
        cost_diff, p50_diff = pair["cost_per_request_usd"], pair["latency_p50_total_s"]
        cheaper += cost_diff["significant"] and cost_diff["estimate"] < 0
        faster += p50_diff["significant"] and p50_diff["estimate"] < 0
        switched += report["verdict"]["decision"] == "switch to b"
    arms = 2 * len(SEEDS)
    # Nominal 95% intervals over 80 arm-seeds: below 88% would be a broken interval
    # (binomial: P(coverage <= 88% | 95%) < 1%).
    for figure, count in covered.items():
        assert count / arms >= 0.88, (figure, count)
    assert cheaper >= 0.95 * len(SEEDS)
    assert faster >= 0.95 * len(SEEDS)
    assert switched >= 0.95 * len(SEEDS)


def test_no_true_difference_is_mostly_called_no_difference() -> None:
    quiet = kept = 0
    for seed in SEEDS:
        report = _simulate(1000 + seed, 0.001, 1.0)
        (pair,) = report["pairwise"]
        quiet += not pair["cost_per_request_usd"]["significant"]
        kept += not report["verdict"]["decision"].startswith("switch")
        for name in ("a", "b"):
            assert report["variants"][name]["requests"] == PER_ARM
    assert quiet >= 0.90 * len(SEEDS)
    assert kept >= 0.90 * len(SEEDS)


def test_break_even_by_hand() -> None:
    """One replica = 1 GPU at $2.49/h, two replicas: the fleet costs $4.98/h. The hosted
    variant pays $3/Mtok in and $12/Mtok out for 200 client + 300 injected prompt tokens and
    100 completion tokens: (500 * 3 + 100 * 12) / 1e6 = $0.0027 per request, of which the
    prompt tax is 300 * 3 / 1e6 = $0.0009. Break-even: 4.98 / 0.0027 = 1,844.4 requests/h.
    Capacity: replica 0 served 40 requests of 0.25 s back to back in one 10 s bucket, each
    0.1 * 200 + 100 = 120 weighted tokens: 480 tokens/s, so 480 * 3600 / 120 = 14,400
    requests/h per replica, 28,800 for the fleet, which covers the crossing."""
    gpu = Gpu(hourly_usd=2.49, count=1, prefill_factor=0.1)
    meter = GpuMeter(gpu, replicas=2, clock=lambda: 10.0)
    for i in range(40):
        meter.settle(0, (i * 0.25, (i + 1) * 0.25), 200, 100, running=0)
    price = Price(input_per_mtok=3.0, output_per_mtok=12.0)
    variants = {
        "ft": Variant(upstream="gpu", model="ft"),
        "hosted": Variant(upstream="api", model="gpt", price=price),
    }
    records = [
        # 50 of the 250 prompt tokens came from the prefix cache: 200 computed, as metered.
        _record(i, "ft", usage=Usage(prompt=250, cached=50, completion=100), cost_usd=0.0001)
        for i in range(60)
    ] + [
        _record(
            i,
            "hosted",
            usage=Usage(prompt=500, injected=300, completion=100),
            cost_usd=0.0027,
            prompt_tax_usd=0.0009,
        )
        for i in range(40)
    ]
    route = Route(split={"ft": 60, "hosted": 40})
    report = route_report(
        "r", route, records, variants, {"gpu": meter.figures()}, since=0.0, now=3600.0, resamples=50
    )
    (row,) = report["break_even"]
    assert row["fleet_usd_per_hour"] == pytest.approx(4.98)
    assert row["hosted_cost_per_request_usd"] == pytest.approx(0.0027)
    assert row["break_even_requests_per_hour"] == pytest.approx(1844.444, rel=1e-5)
    assert row["current_requests_per_hour"] == pytest.approx(100.0)
    assert row["fleet_cheaper_now"] is False
    assert row["capacity_tokens_per_s"] == pytest.approx(480.0)
    assert row["capacity_requests_per_hour"] == pytest.approx(14_400.0)
    assert row["fleet_capacity_requests_per_hour"] == pytest.approx(28_800.0)
    assert row["within_capacity"] is True
    tax = report["variants"]["hosted"]["prompt_tax_per_request_usd"]["estimate"]
    assert tax == pytest.approx(0.0009)


def test_feedback_is_judged_in_its_metrics_direction() -> None:
    """B resolves more tickets (good) and takes more follow-ups (bad: lower is better)."""
    rng = random.Random(7)
    records = [_record(i, v) for v in ("a", "b") for i in range(200)]
    feedback: dict[str, dict[str, bool | float]] = {}
    for r in records:
        better = r.variant == "b"
        feedback[r.request_id] = {
            "resolved": rng.random() < (0.8 if better else 0.5),
            "follow_ups": rng.gauss(3.0 if better else 1.0, 0.5),
        }
    del feedback["a-0"]  # a request nobody rated
    route = Route(
        split={"a": 1, "b": 1},
        feedback=[
            FeedbackMetric(name="resolved", type="bool"),
            FeedbackMetric(name="follow_ups", type="float", higher_is_better=False),
        ],
    )
    report = route_report(
        "r", route, records, _variants(a=1, b=1), {}, since=0.0, now=3600.0,
        resamples=200, feedback=feedback,
    )  # fmt: skip
    a = report["variants"]["a"]["feedback"]
    assert a["resolved"]["n"] == 199 and a["follow_ups"]["n"] == 199
    resolved = [feedback[r.request_id]["resolved"] for r in records[1:200]]
    assert a["resolved"]["mean"]["estimate"] == pytest.approx(sum(resolved) / 199)
    (pair,) = report["pairwise"]
    assert pair["feedback"]["resolved"]["significant"] and pair["feedback"]["resolved"]["better"]
    follow = pair["feedback"]["follow_ups"]
    assert follow["significant"] and follow["estimate"] > 0 and not follow["better"]


def test_shadow_pairs_only_with_their_own_primary() -> None:
    primary = [_record(i, "a", latency=Latency(total=1.0), cost_usd=0.002) for i in range(10)]
    shadows = [
        _record(
            i,
            "s",
            request_id=f"s-{i}",
            shadow_of=f"a-{i}",
            latency=Latency(total=1.5),
            cost_usd=0.001,
            comparison={"agreement": "agree" if i < 7 else "disagree"},
        )
        for i in range(9)
    ]
    failed = _record(9, "s", request_id="s-9", shadow_of="a-9", status=502, cost_usd=0.0005,
                     comparison={"agreement": "error"})  # fmt: skip
    orphan = _record(0, "s", request_id="s-x", shadow_of="gone")  # its primary is not here
    route = Route(split={"a": 1})
    report = route_report(
        "r", route, [*primary, *shadows, failed, orphan], _variants(a=1, s=1), {},
        since=0.0, now=3600.0, resamples=100,
    )  # fmt: skip
    (row,) = report["shadow"]
    assert (row["primary"], row["shadow"], row["pairs"], row["shadow_errors"]) == ("a", "s", 10, 1)
    assert row["agreement"]["estimate"] == pytest.approx(7 / 9)
    assert row["latency_delta_s"]["estimate"] == pytest.approx(0.5)
    # Deltas over answered shadows only; what the failed one cost is given apart.
    assert row["cost_delta_usd"]["estimate"] == pytest.approx(-0.001)
    assert row["failed_shadows_cost_usd"] == pytest.approx(0.0005)
    assert report["requests"] == 10 and report["shadow_records_excluded"] == 11


def test_the_report_is_json_and_reproducible() -> None:
    rng = random.Random(3)
    records = _arm(rng, "a", 0.001, 1.0) + _arm(rng, "b", 0.001, 1.0)
    routes = {"r": Route(split={"a": 1, "b": 1})}
    first = build_report(routes, records, _variants(a=1, b=1), {}, since=None, now=10.0)
    again = build_report(routes, records, _variants(a=1, b=1), {}, since=None, now=10.0)
    assert msgspec.json.encode(first) == msgspec.json.encode(again)


def test_a_cheaper_variant_with_worse_feedback_is_not_switched_to() -> None:
    rng = random.Random(11)
    records = _arm(rng, "a", 0.001, 1.0) + _arm(rng, "b", 0.0005, 1.0)
    resolved = {r.request_id: rng.random() < (0.9 if r.variant == "a" else 0.6) for r in records}
    route = Route(split={"a": 1, "b": 1}, feedback=[FeedbackMetric(name="ok", type="bool")])

    def verdict(feedback: dict[str, dict[str, bool | float]]) -> str:
        report = route_report(
            "r", route, records, _variants(a=1, b=1), {}, since=0.0, now=3600.0,
            resamples=200, feedback=feedback,
        )  # fmt: skip
        decision: str = report["verdict"]["decision"]
        return decision

    assert verdict({}) == "switch to b"  # cheaper and nothing else known
    rated: dict[str, dict[str, bool | float]] = {i: {"ok": v} for i, v in resolved.items()}
    assert verdict(rated) in {"keep", "split"}
    report = route_report(
        "r", route, records, _variants(a=1, b=1), {}, since=0.0, now=3600.0,
        resamples=200, feedback=rated,
    )  # fmt: skip
    worse = report["pairwise"][0]["feedback"]["ok"]
    assert worse["significant"] and worse["estimate"] < 0 and not worse["better"]


def test_feedback_of_another_type_is_left_out() -> None:
    """A metric whose type changed in the config: the old values do not count (nor crash)."""
    records = [_record(i, "a") for i in range(4)]
    feedback: dict[str, dict[str, bool | float]] = {
        "a-0": {"ok": True}, "a-1": {"ok": 4.0}, "a-2": {"ok": False}, "a-3": {"ok": 1.0},
    }  # fmt: skip
    route = Route(split={"a": 1}, feedback=[FeedbackMetric(name="ok", type="bool")])
    report = route_report(
        "r", route, records, _variants(a=1), {}, since=0.0, now=3600.0, feedback=feedback
    )
    table = report["variants"]["a"]["feedback"]["ok"]
    assert table["n"] == 2 and table["mean"]["estimate"] == 0.5


def _close(a: dict[str, Any], b: dict[str, Any], share: float) -> bool:
    """Both ends of interval `a` within `share` of `b`'s width of `b`'s ends."""
    width = b["high"] - b["low"]
    return bool(
        abs(a["low"] - b["low"]) < share * width and abs(a["high"] - b["high"]) < share * width
    )


def test_large_samples_get_analytic_intervals_close_to_the_bootstrap() -> None:
    """Above BOOTSTRAP_MAX_N values per arm the intervals are analytic; they agree with the
    bootstrap's (same records, both ways) to within a fraction of their width."""
    rng = random.Random(5)
    records = _arm(rng, "a", 0.001, 1.0, 1200) + _arm(rng, "b", 0.0008, 0.8, 1200)
    route = Route(split={"a": 1, "b": 1})
    analytic = route_report("r", route, records, _variants(a=1, b=1), {}, since=0.0, now=3600.0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report_module, "BOOTSTRAP_MAX_N", 10**9)
        booted = route_report(
            "r", route, records, _variants(a=1, b=1), {}, since=0.0, now=3600.0, resamples=400
        )
    for name in ("a", "b"):
        a, b = analytic["variants"][name], booted["variants"][name]
        assert _close(a["cost_per_request_usd"], b["cost_per_request_usd"], 0.15)
        for q in ("p50", "p95"):
            assert _close(a["latency_s"]["total"][q], b["latency_s"]["total"][q], 0.35)
    for key in ("cost_per_request_usd", "latency_p50_total_s"):
        a, b = analytic["pairwise"][0][key], booted["pairwise"][0][key]
        assert a["significant"] == b["significant"]
        assert _close(a, b, 0.25)
