"""GET /metrics after a known workload: counts, tokens, cost, histograms; junk never adds series."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import TurnoutApp
from gateway.records import RequestRecord
from tests.fakes import OK_PIECES, PROMPT_TOKENS
from tests.integration.conftest import CLIENT_KEY, Upstreams, base_config, running, sha256

USER = [{"role": "user", "content": "hi"}]
Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]
PRICE_IN, PRICE_OUT = 1.0, 2.0  # the `prompted` variant's $/Mtok in base_config


@pytest.fixture(scope="module")
def metered(upstreams: Upstreams) -> Iterator[tuple[str, TurnoutApp]]:
    """A fresh gateway: its metrics start empty."""
    with running(base_config(upstreams)) as served:
        yield served


def _scrape(url: str) -> Samples:
    response = httpx.get(url + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            assert sample.name.startswith("turnout_"), sample.name
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _select(samples: Samples, name: str, **match: str) -> dict[Labels, float]:
    return {
        labels: value
        for (sample, labels), value in samples.items()
        if sample == name and set(match.items()) <= set(labels)
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _workload(url: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=10)
    for _ in range(5):
        client.chat.completions.create(model="ok", messages=USER)  # type: ignore[arg-type]
    for usage in (True, True, True, False, False, False):
        options = {"include_usage": True} if usage else None
        chunks = client.chat.completions.create(
            model="ok",
            messages=USER,  # type: ignore[arg-type]
            stream=True,
            stream_options=options,  # type: ignore[arg-type]
        )
        assert len(list(chunks)) == len(OK_PIECES) + 1 + usage
    for _ in range(3):
        client.chat.completions.create(model="prompted", messages=USER)  # type: ignore[arg-type]
    list(client.chat.completions.create(model="no-usage", messages=USER, stream=True))  # type: ignore[arg-type]
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="error-500", messages=USER)  # type: ignore[arg-type]
    for name in ("nope", "gpt-4o", "../etc/passwd", "ok "):
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=name, messages=USER)  # type: ignore[arg-type]
    chat = url + "/v1/chat/completions"
    assert httpx.post(chat, content=b"{not json").status_code == 400
    assert httpx.post(chat, content=b"x" * (64 * 1024 + 1)).status_code == 413
    # A shaping error after the variant was chosen: counted on its route, with no record.
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="prompted", prompt=[1, 2, 3])
    assert httpx.post(url + "/v1/nothing-here", json={}).status_code == 404  # not an API call


def _series(record: RequestRecord) -> tuple[str, str, str]:
    return record.route, record.variant, record.upstream


def test_metrics_after_a_known_workload(metered: tuple[str, TurnoutApp]) -> None:
    url, app = metered
    _workload(url)
    samples = _scrape(url)
    records = list(app.gateway.records)
    assert len(records) == 5 + 6 + 3 + 1 + 2

    requests = _select(samples, "turnout_requests_total")
    hosted = {"upstream": "hosted"}
    assert requests == {
        _labels(route="ok", variant="ok", status_class="2xx", **hosted): 11.0,
        _labels(route="prompted", variant="prompted", status_class="2xx", **hosted): 3.0,
        _labels(route="prompted", variant="prompted", status_class="4xx", **hosted): 1.0,
        _labels(route="no-usage", variant="no-usage", status_class="2xx", **hosted): 1.0,
        _labels(route="error-500", variant="error-500", status_class="5xx", **hosted): 2.0,
        _labels(route="other", variant="none", upstream="none", status_class="4xx"): 6.0,
    }

    by_series = Counter(_series(r) for r in records)
    for (route, variant, upstream), count in by_series.items():
        labels = {"route": route, "variant": variant, "upstream": upstream}
        mine = [r for r in records if _series(r) == (route, variant, upstream)]
        assert _value(samples, "turnout_request_duration_seconds_count", **labels) == count
        total = sum(r.latency.total for r in mine)
        assert _value(samples, "turnout_request_duration_seconds_sum", **labels) == pytest.approx(
            total, abs=1e-9
        )
        assert _value(samples, "turnout_request_duration_seconds_bucket", le="+Inf", **labels) == (
            count
        )
        streams = sum(r.stream for r in mine)
        assert _value(samples, "turnout_time_to_first_token_seconds_count", **labels) == streams
        tpot = sum(r.latency.tpot is not None for r in mine)
        assert _value(samples, "turnout_time_per_output_token_seconds_count", **labels) == tpot
        assert _value(samples, "turnout_overhead_seconds_count", route=route) == count
        _check_tokens(samples, labels, mine)
        cost = _value(samples, "turnout_cost_usd_total", **labels)
        assert cost == pytest.approx(sum(r.cost_usd for r in mine), abs=1e-12)

    ok = {"route": "ok", "variant": "ok", "upstream": "hosted"}
    assert _value(samples, "turnout_time_per_output_token_seconds_count", **ok) == 6
    assert _value(samples, "turnout_tokens_total", kind="completion", **ok) == 11 * len(OK_PIECES)
    prompted = {"route": "prompted", "variant": "prompted", "upstream": "hosted"}
    expected_cost = 3 * (PROMPT_TOKENS * PRICE_IN + len(OK_PIECES) * PRICE_OUT) / 1e6
    assert _value(samples, "turnout_cost_usd_total", **prompted) == pytest.approx(
        expected_cost, abs=1e-12
    )
    assert _value(samples, "turnout_tokens_total", kind="injected", **prompted) > 0
    assert _select(samples, "turnout_estimated_usage_total") == {
        _labels(route=r, variant=r): float(r == "no-usage")
        for r in ("ok", "prompted", "no-usage", "error-500")
    }
    assert not _select(samples, "turnout_requests_total", route="nothing-here")


def _check_tokens(samples: Samples, labels: dict[str, str], mine: list[RequestRecord]) -> None:
    """prompt (the client's own) + injected = the upstream's prompt_tokens, per series."""
    prompt = _value(samples, "turnout_tokens_total", kind="prompt", **labels)
    injected = _value(samples, "turnout_tokens_total", kind="injected", **labels)
    completion = _value(samples, "turnout_tokens_total", kind="completion", **labels)
    assert prompt + injected == sum(r.usage.prompt for r in mine)
    assert injected == sum(r.usage.injected for r in mine)
    assert completion == sum(r.usage.completion for r in mine)
    served = [r for r in mine if r.status == 200 and not r.usage.estimated]
    if served and len(served) == len(mine):
        assert prompt + injected == PROMPT_TOKENS * len(mine)


def _labels(**labels: str) -> Labels:
    return tuple(sorted(labels.items()))


JUNK_REQUESTS = 10_000


def test_junk_model_names_add_no_series(metered: tuple[str, TurnoutApp]) -> None:
    url, _ = metered
    other = _labels(route="other", variant="none", upstream="none", status_class="4xx")
    with httpx.Client(base_url=url, timeout=10) as client:  # keep-alive: the fast path
        _junk(client, 1)
        before = _scrape(url)
        _junk(client, JUNK_REQUESTS)
    after = _scrape(url)
    assert after.keys() == before.keys(), "junk model names created series"
    counter = ("turnout_requests_total", other)
    assert after[counter] == before[counter] + JUNK_REQUESTS
    changed = {key for key in after if after[key] != before[key]}
    assert changed == {counter}


def _junk(client: httpx.Client, count: int) -> None:
    for _ in range(count):
        body = {"model": uuid.uuid4().hex, "messages": USER}
        assert client.post("/v1/chat/completions", json=body).status_code == 404


def test_key_rejections_count_as_other(upstreams: Upstreams) -> None:
    config = base_config(upstreams)
    config["keys"] = [{"name": "app-a", "sha256": sha256(CLIENT_KEY), "routes": ["ok"]}]
    with running(config) as (url, _):
        chat = url + "/v1/chat/completions"
        body = {"model": "echo", "messages": USER}
        assert httpx.post(chat, json=body).status_code == 401
        bearer = {"authorization": f"Bearer {CLIENT_KEY}"}
        assert httpx.post(chat, json=body, headers=bearer).status_code == 404  # not its route
        assert httpx.get(url + "/v1/models").status_code == 401  # not an API call: not counted
        assert httpx.post(chat, json=body | {"model": "ok"}, headers=bearer).status_code == 200
        assert _select(_scrape(url), "turnout_requests_total") == {
            _labels(route="other", variant="none", upstream="none", status_class="4xx"): 2.0,
            _labels(route="ok", variant="ok", upstream="hosted", status_class="2xx"): 1.0,
        }
