"""The report as a page: GET /turnout/report?format=html through a real gateway, loaded in
headless Chromium (no error, nothing fetched, every chart drawn), and `turnout report --html
--png` from a record file."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import yaml

from gateway.records import Latency, RequestRecord, Usage
from tests.chromium import Browser, find_chromium, launch
from tests.integration.conftest import ADMIN_KEY, ENV, PROMPT, Upstreams, base_config, running

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
ROUTE = "support/v1"
USER = [{"role": "user", "content": "Where is my refund?"}]
TURNOUT = str(Path(sys.executable).parent / "turnout")


def _config(upstreams: Upstreams) -> dict[str, Any]:
    config = base_config(upstreams)
    config["upstreams"]["sim"] = {
        "kind": "simulated", "ttft_ms": 0, "tokens_per_s": 5000, "completion_tokens": 5,
        "gpu": {"hourly_usd": 2.49, "count": 2},
    }  # fmt: skip
    config["variants"] |= {
        "sim-ft": {"upstream": "sim", "model": "support-lora"},
        "sim-prompted": {
            "upstream": "sim", "model": "gpt", "prompt": PROMPT,
            "price": {"input_per_mtok": 3.0, "output_per_mtok": 12.0},
        },
    }  # fmt: skip
    config["routes"][ROUTE] = {
        "split": {"sim-ft": 50, "sim-prompted": 50},
        "shadow": {"variant": "sim-prompted", "fraction": 0.5},
    }
    return config


@pytest.fixture(scope="module")
def served(upstreams: Upstreams) -> Iterator[str]:
    with running(_config(upstreams)) as (url, app), httpx.Client(base_url=url) as http:
        for i in range(40):
            body: dict[str, Any] = {"model": ROUTE, "messages": USER, "user": f"u{i}"}
            if i % 2:
                body |= {"stream": True, "stream_options": {"include_usage": True}}
            assert http.post("/v1/chat/completions", json=body).status_code == 200
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(
            r.shadow_of for r in app.gateway.records.local
        ):
            time.sleep(0.02)
        yield url


@pytest.fixture(scope="module")
def page(served: str) -> httpx.Response:
    params = {"route": ROUTE, "format": "html"}
    response = httpx.get(served + "/turnout/report", params=params, headers=ADMIN, timeout=30)
    assert response.status_code == 200, response.text
    return response


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    """Headless Chromium for this module; its process group is killed at the end."""
    binary = find_chromium()
    if binary is None:
        message = "chromium not installed: apt-get install chromium"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    with launch(tmp_path_factory.mktemp("chromium-profile"), binary) as running_browser:
        yield running_browser


def test_html_format_and_its_errors(served: str, page: httpx.Response) -> None:
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["cache-control"] == "no-store"  # admin data
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    assert page.text.startswith("<!DOCTYPE html>")
    assert f"Route {ROUTE}" in page.text and page.text.count("<svg") == 3
    url = served + "/turnout/report"
    as_json = httpx.get(url, params={"route": ROUTE, "format": "json"}, headers=ADMIN)
    assert as_json.headers["content-type"].startswith("application/json")
    assert as_json.json()["routes"][ROUTE]["requests"] == 40
    bad = httpx.get(url, params={"format": "xml"}, headers=ADMIN)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "format"
    assert httpx.get(url, params={"format": "html"}).status_code == 403


def test_page_loads_in_chromium_without_errors_or_fetches(
    page: httpx.Response, browser: Browser, tmp_path: Path
) -> None:
    path = tmp_path / "report.html"
    path.write_bytes(page.content)
    loaded = browser.load(path.as_uri())
    assert loaded.exceptions == []
    assert loaded.errors == []
    assert loaded.requests and all(
        u == path.as_uri() or u.startswith("data:") for u in loaded.requests
    ), loaded.requests
    assert loaded.evaluate("document.querySelectorAll('svg').length") >= 3
    sizes = loaded.evaluate(
        "[...document.querySelectorAll('svg')].map(s => {"
        " const r = s.getBoundingClientRect(); return [r.width, r.height]; })"
    )
    assert sizes and all(w > 0 and h > 0 for w, h in sizes), sizes


def _records(path: Path) -> None:
    encoder = msgspec.json.Encoder()
    with path.open("wb") as out:
        for i in range(60):
            variant = ("sim-ft", "sim-prompted")[i % 2]
            record = RequestRecord(
                request_id=f"r{i}", time=time.time() - 600 + i, route=ROUTE, variant=variant,
                upstream="sim", tuning="prompted", endpoint="chat", stream=False, status=200,
                latency=Latency(total=0.05 + 0.001 * i), usage=Usage(prompt=40, completion=5),
                cost_usd=0.0 if variant == "sim-ft" else 0.00018,
            )  # fmt: skip
            out.write(encoder.encode(record) + b"\n")


def test_cli_writes_the_page_and_a_png_per_chart(upstreams: Upstreams, tmp_path: Path) -> None:
    _records(tmp_path / "records.jsonl")
    (tmp_path / "turnout.yaml").write_text(yaml.safe_dump(_config(upstreams)))
    args = ["--records", str(tmp_path / "records.jsonl"), "-c", str(tmp_path / "turnout.yaml")]
    out = tmp_path / "out" / "report.html"
    args += ["--route", ROUTE, "--html", str(out), "--png", str(tmp_path / "png")]
    result = subprocess.run(
        [TURNOUT, "report", *args],
        capture_output=True, text=True, env={**os.environ, **ENV}, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert out.read_text().count("<svg") == 3
    pngs = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert pngs == ["support_v1-break-even.png", "support_v1-cost-per-1k.png",
                    "support_v1-latency.png"]  # fmt: skip
    assert all((tmp_path / "png" / n).read_bytes().startswith(b"\x89PNG") for n in pngs)
    for written in [out, *(tmp_path / "png" / n for n in pngs)]:
        assert str(written) in result.stdout
