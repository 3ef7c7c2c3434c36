"""The report's HTML page from a report built on synthetic records: content, escaping, three
charts per route, nothing fetched from elsewhere."""

from __future__ import annotations

import random
from html.parser import HTMLParser
from typing import Any

import pytest

from gateway.config_check import check_settings
from gateway.gateway import meters_for
from gateway.records import Latency, RequestRecord, Usage
from gateway.report import build_report
from gateway.report_html import render_html

NOW = 1_700_000_000.0
NASTY = '<b>&"x'
CONFIG: dict[str, Any] = {
    "upstreams": {
        "gpu": {"kind": "simulated", "gpu": {"hourly_usd": 2.5, "count": 2}},
        "api": {"kind": "simulated"},
    },
    "variants": {
        "tuned": {"upstream": "gpu", "model": "lora"},
        "hosted": {
            "upstream": "api",
            "model": "gpt",
            "prompt": {"system": "Classify."},
            "price": {"input_per_mtok": 3.0, "output_per_mtok": 12.0},
        },
    },
    "routes": {
        "support/v1": {"split": {"tuned": 1, "hosted": 1}},
        "tiny": {"split": {"hosted": 1}},
    },
}


def _record(i: int, route: str, variant: str, rng: random.Random) -> RequestRecord:
    injected = 200 if variant == "hosted" else 0
    usage = Usage(prompt=100 + injected, injected=injected, completion=rng.randint(5, 30))
    cost = 0.0004 if variant == "tuned" else (usage.prompt * 3 + usage.completion * 12) / 1e6
    total = (0.2 if variant == "tuned" else 0.6) * rng.lognormvariate(0, 0.3)
    return RequestRecord(
        request_id=f"r{i}", time=NOW - 3600 + i, route=route, variant=variant,
        upstream="gpu", tuning="fine-tuned", endpoint="chat", stream=True,
        status=500 if i % 40 == 0 else 200, usage=usage, cost_usd=cost,
        latency=Latency(total=total, ttft=total / 3, tpot=0.01),
    )  # fmt: skip


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    settings, problems = check_settings(CONFIG, {})
    assert settings is not None, problems
    rng = random.Random(7)
    records = [_record(i, "support/v1", ("tuned", "hosted", NASTY)[i % 3], rng) for i in range(150)]
    records += [_record(1000 + i, "tiny", "hosted", rng) for i in range(3)]
    return build_report(
        settings.routes, records, settings.variants, meters_for(settings), since=None, now=NOW
    )


class _Links(HTMLParser):
    """Every src/href attribute and every tag of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.urls += [v or "" for k, v in attrs if k in {"src", "href", "xlink:href"}]


def test_page_has_each_route_verdict_tables_and_charts(report: dict[str, Any]) -> None:
    page = render_html(report)
    assert page.startswith("<!DOCTYPE html>")
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    for name, route in report["routes"].items():
        assert f"Route {name}" in page
        assert f"verdict: {route['verdict']['decision']}" in page
    assert "warning: too few data" in page  # the tiny route
    assert page.count("<svg") == 3 * len(report["routes"])
    assert "How to read this" in page and "Break-even" in page
    assert "break-even, req/h" in page  # the fine-tuned fleet against the hosted variant


def test_names_from_records_are_escaped(report: dict[str, Any]) -> None:
    page = render_html(report)
    assert NASTY in report["routes"]["support/v1"]["variants"]
    assert NASTY not in page
    assert "&lt;b&gt;&amp;&quot;x" in page


def test_nothing_is_loaded_from_elsewhere(report: dict[str, Any]) -> None:
    links = _Links()
    links.feed(render_html(report))
    assert "script" not in links.tags
    assert links.urls and all(u.startswith(("#", "data:")) for u in links.urls), links.urls


def test_optional_sections_only_when_present(report: dict[str, Any]) -> None:
    assert "Shadow comparisons" not in render_html(report)
    route = dict(report["routes"]["support/v1"])
    route["shadow"] = [{
        "primary": "tuned", "shadow": "hosted", "pairs": 12, "shadow_errors": 1,
        "agreement": {"estimate": 0.75, "low": 0.5, "high": 0.9},
        "latency_delta_s": {"estimate": -0.05, "low": -0.1, "high": 0.01},
        "cost_delta_usd": {"estimate": 0.0012, "low": 0.001, "high": 0.0014},
    }]  # fmt: skip
    variants = {k: dict(v) for k, v in route["variants"].items()}
    variants["tuned"]["feedback"] = {"thumbs_up": {"n": 9, "mean": {"estimate": 0.8}}}
    route["variants"] = variants
    page = render_html({"routes": {"r": route}})
    assert "Shadow comparisons" in page and "75.0%" in page and "+$0.0012" in page
    assert "-50 ms" in page
    assert "Feedback" in page and "thumbs_up" in page


def test_sparse_reports_render() -> None:
    assert "No routes" in render_html({})
    page = render_html({"routes": {"r": {}}, "generated_at": None})
    assert page.count("<svg") == 3 and "n/a" in page
    odd = {"routes": {"r": {"variants": {"v": {"error_rate": "?", "latency_s": None}},
                            "break_even": [{"fine_tuned": "f"}], "pairwise": [{}]}}}  # fmt: skip
    assert "Route r" in render_html(odd)
