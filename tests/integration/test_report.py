"""GET /turnout/report through a real gateway: a fine-tuned variant on a GPU-costed simulated
upstream against a priced prompted one, split 50/50, with shadows that must stay out."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.app import TurnoutApp
from gateway.records import RequestRecord
from router.stats import diff_of_stats_ci, percentile, wilson
from tests.integration.conftest import ADMIN_KEY, PROMPT, Upstreams, base_config, running

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
PRICE = {"input_per_mtok": 3.0, "output_per_mtok": 12.0}
GPU = {"hourly_usd": 2.49, "count": 2}
REQUESTS = 100
USER = [{"role": "user", "content": "Where is my refund for order 1234?"}]


def _config(upstreams: Upstreams) -> dict[str, Any]:
    config = base_config(upstreams)
    config["upstreams"]["sim"] = {
        "kind": "simulated",
        "ttft_ms": 0,
        "tokens_per_s": 5000,
        "completion_tokens": 5,
        "gpu": GPU,
    }
    config["variants"] |= {
        "sim-ft": {"upstream": "sim", "model": "support-lora"},
        "sim-prompted": {"upstream": "sim", "model": "gpt", "prompt": PROMPT, "price": PRICE},
        "sim-shadow": {"upstream": "sim", "model": "other", "price": PRICE},
    }
    config["routes"]["ab"] = {
        "split": {"sim-ft": 50, "sim-prompted": 50},
        "shadow": {"variant": "sim-shadow", "fraction": 1.0},
    }
    config["routes"]["few"] = {"split": {"sim-prompted": 1}}
    return config


def _primary(app: TurnoutApp, route: str) -> list[RequestRecord]:
    return [r for r in app.gateway.records.local if r.route == route and r.shadow_of is None]


def _shadows(app: TurnoutApp) -> int:
    return sum(1 for r in app.gateway.records.local if r.shadow_of is not None)


@pytest.fixture(scope="module")
def served(upstreams: Upstreams) -> Iterator[tuple[str, TurnoutApp]]:
    with running(_config(upstreams)) as (url, app), httpx.Client(base_url=url) as http:
        for i in range(REQUESTS):
            body: dict[str, Any] = {"model": "ab", "messages": USER}
            if i % 2:
                body |= {"stream": True, "stream_options": {"include_usage": True}}
            assert http.post("/v1/chat/completions", json=body).status_code == 200
        for _ in range(3):
            http.post("/v1/chat/completions", json={"model": "few", "messages": USER})
        deadline = time.monotonic() + 5
        while _shadows(app) < REQUESTS and time.monotonic() < deadline:
            time.sleep(0.02)
        yield url, app


@pytest.fixture(scope="module")
def report(served: tuple[str, TurnoutApp]) -> dict[str, Any]:
    url, _ = served
    response = httpx.get(url + "/turnout/report", params={"route": "ab"}, headers=ADMIN)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()["routes"]["ab"]
    return answer


def _inside(interval: dict[str, Any]) -> None:
    assert interval["low"] <= interval["estimate"] <= interval["high"], interval


def test_counts_and_costs_equal_the_records(
    served: tuple[str, TurnoutApp], report: dict[str, Any]
) -> None:
    _, app = served
    records = _primary(app, "ab")
    assert report["requests"] == len(records) == REQUESTS
    assert report["control"] == "sim-ft"
    assert set(report["variants"]) == {"sim-ft", "sim-prompted"}  # no shadow variant
    assert report["shadow_records_excluded"] == _shadows(app) > 0
    for name, table in report["variants"].items():
        mine = [r for r in records if r.variant == name]
        assert table["requests"] == len(mine) >= 30
        cost = table["cost_per_request_usd"]
        assert cost["estimate"] == pytest.approx(math.fsum(r.cost_usd for r in mine) / len(mine))
        assert table["cost_per_1k_requests_usd"]["estimate"] == pytest.approx(
            1000 * cost["estimate"]
        )
        tax = math.fsum(r.prompt_tax_usd for r in mine) / len(mine)
        assert table["prompt_tax_per_request_usd"]["estimate"] == pytest.approx(tax)
        injected = table["tokens_per_request"]["injected"]["estimate"]
        assert (injected > 0) == (name == "sim-prompted")
        assert table["error_rate"]["estimate"] == 0


def test_intervals_contain_their_estimates(report: dict[str, Any]) -> None:
    for table in report["variants"].values():
        _inside(table["error_rate"])
        _inside(table["cost_per_request_usd"])
        _inside(table["prompt_tax_per_request_usd"])
        for interval in table["tokens_per_request"].values():
            _inside(interval)
        for phase in ("total", "ttft"):
            assert table["latency_s"][phase]["n"] > 0
            _inside(table["latency_s"][phase]["p50"])
            _inside(table["latency_s"][phase]["p95"])
    (pair,) = report["pairwise"]
    assert (pair["control"], pair["variant"]) == ("sim-ft", "sim-prompted")
    for figure in ("cost_per_request_usd", "latency_p50_total_s", "error_rate"):
        _inside(pair[figure])
        assert isinstance(pair[figure]["significant"], bool)
    assert pair["needed_per_arm"] is None or pair["needed_per_arm"] >= 1


def test_break_even_is_fleet_per_hour_over_hosted_cost(
    served: tuple[str, TurnoutApp], report: dict[str, Any]
) -> None:
    _, app = served
    hosted = [r.cost_usd for r in _primary(app, "ab") if r.variant == "sim-prompted"]
    (row,) = report["break_even"]
    assert (row["fine_tuned"], row["hosted"]) == ("sim-ft", "sim-prompted")
    fleet = GPU["hourly_usd"] * GPU["count"] * 1
    assert row["fleet_usd_per_hour"] == pytest.approx(fleet)
    assert row["break_even_requests_per_hour"] == pytest.approx(
        fleet / (math.fsum(hosted) / len(hosted))
    )
    assert row["current_requests_per_hour"] == report["requests_per_hour"] > 0
    verdict = report["verdict"]
    assert verdict["decision"] in {"keep", "split", "switch to sim-prompted"}
    assert "warning" not in verdict


def test_shadows_are_paired_with_the_requests_they_copied(
    served: tuple[str, TurnoutApp], report: dict[str, Any]
) -> None:
    _, app = served
    primary = {r.request_id: r for r in _primary(app, "ab")}
    shadows = [r for r in app.gateway.records.local if r.shadow_of in primary]
    rows = {(row["primary"], row["shadow"]): row for row in report["shadow"]}
    assert set(rows) == {("sim-ft", "sim-shadow"), ("sim-prompted", "sim-shadow")}
    assert sum(row["pairs"] for row in rows.values()) == len(shadows) > 0
    for (first, _), row in rows.items():
        mine = [s for s in shadows if primary[s.shadow_of or ""].variant == first]
        agree = sum(1 for s in mine if (s.comparison or {}).get("agreement") == "agree")
        assert row["pairs"] == len(mine)
        assert row["shadow_errors"] == 0
        assert row["agreement"]["estimate"] == pytest.approx(agree / len(mine))
        deltas = [s.latency.total - primary[s.shadow_of or ""].latency.total for s in mine]
        assert row["latency_delta_s"]["estimate"] == pytest.approx(math.fsum(deltas) / len(mine))
        costs = [s.cost_usd - primary[s.shadow_of or ""].cost_usd for s in mine]
        assert row["cost_delta_usd"]["estimate"] == pytest.approx(math.fsum(costs) / len(mine))
        for figure in ("agreement", "latency_delta_s", "cost_delta_usd"):
            _inside(row[figure])


def test_report_is_deterministic(served: tuple[str, TurnoutApp], report: dict[str, Any]) -> None:
    url, _ = served
    again = httpx.get(url + "/turnout/report", params={"route": "ab"}, headers=ADMIN).json()
    assert again["routes"]["ab"]["variants"] == report["variants"]
    assert again["routes"]["ab"]["pairwise"] == report["pairwise"]


def test_too_few_data_warns(served: tuple[str, TurnoutApp]) -> None:
    url, _ = served
    answer = httpx.get(url + "/turnout/report", params={"route": "few"}, headers=ADMIN).json()
    verdict = answer["routes"]["few"]["verdict"]
    assert verdict["warning"] == "too few data"
    assert verdict["decision"] == "keep"


def test_admin_key_unknown_route_and_since(served: tuple[str, TurnoutApp]) -> None:
    url, _ = served
    assert httpx.get(url + "/turnout/report", params={"route": "ab"}).status_code == 403
    wrong = {"authorization": "Bearer nope"}
    assert httpx.get(url + "/turnout/report", headers=wrong).status_code == 403
    missing = httpx.get(url + "/turnout/report", params={"route": "nope"}, headers=ADMIN)
    assert missing.status_code == 404
    bad = httpx.get(url + "/turnout/report", params={"since": "x"}, headers=ADMIN)
    assert bad.status_code == 400
    later = {"route": "ab", "since": str(time.time() + 3600)}
    empty = httpx.get(url + "/turnout/report", params=later, headers=ADMIN).json()
    assert empty["routes"]["ab"]["requests"] == 0


def test_diff_of_stats_ci_brackets_a_known_shift() -> None:
    a = [float(i) for i in range(100)]
    b = [x + 50 for x in a]
    d = diff_of_stats_ci(a, b, lambda v: percentile(v, 50), random.Random(1), 500)
    assert d.estimate == 50 and d.low <= 50 <= d.high and d.significant
    assert not diff_of_stats_ci(a, a[:1], lambda v: percentile(v, 50), random.Random(1)).significant


@pytest.mark.parametrize("n", range(1, 200))
def test_wilson_contains_its_estimate_at_the_edges(n: int) -> None:
    for successes in (0, n):
        interval = wilson(successes, n)
        assert interval.low <= interval.estimate <= interval.high
