"""`x-turnout-variant`: the admin key may choose a route's variant (what `turnout eval` does);
no one else may, the variant is tried alone, and its records stay out of the A/B report."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import TurnoutApp
from tests.fakes import Recorder
from tests.integration.conftest import (
    ADMIN_KEY,
    CLIENT_KEY,
    Upstreams,
    base_config,
    running,
    sha256,
)

USER = [{"role": "user", "content": "hi"}]
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def served(upstreams: Upstreams) -> Iterator[tuple[str, TurnoutApp]]:
    config = base_config(upstreams)
    config["keys"] = [{"name": "app-a", "sha256": sha256(CLIENT_KEY)}]
    config["routes"]["guarded"] = {
        "split": {"error-500": 1},
        "fallback": ["ok"],
        "shadow": {"variant": "echo", "fraction": 1.0},
    }
    with running(config) as served:
        yield served


def _forced(url: str, variant: str, key: str = ADMIN_KEY, route: str = "split") -> httpx.Response:
    return httpx.post(
        url + "/v1/chat/completions",
        json={"model": route, "messages": USER, "user": "u-1"},
        headers={"authorization": f"Bearer {key}", "x-turnout-variant": variant},
        timeout=10,
    )


def _error(response: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = response.json()["error"]
    return body


def test_admin_forces_each_variant_of_a_split(served: tuple[str, TurnoutApp]) -> None:
    url, _ = served
    for variant in ("ft", "prompted", "ft", "prompted"):
        response = _forced(url, variant)
        assert response.status_code == 200
        assert response.headers["x-turnout-variant"] == variant
        record = httpx.get(
            f"{url}/turnout/requests/{response.headers['x-request-id']}", headers=ADMIN
        ).json()
        assert record["variant"] == variant and record["forced"] is True
        assert "key" not in record


def test_forced_records_stay_out_of_the_report(served: tuple[str, TurnoutApp]) -> None:
    url, app = served
    client = openai.OpenAI(base_url=url + "/v1", api_key=CLIENT_KEY, max_retries=0)
    for user in ("a", "b", "c"):
        client.chat.completions.create(model="split", messages=USER, user=user)  # type: ignore[arg-type]
    _forced(url, "prompted")
    report = httpx.get(
        url + "/turnout/report",
        params={"route": "split"},
        headers={"authorization": f"Bearer {ADMIN_KEY}"},
    ).json()["routes"]["split"]
    forced = sum(1 for r in app.gateway.records.local if r.route == "split" and r.forced)
    assert report["forced_records_excluded"] == forced >= 1
    assert report["requests"] == sum(
        1 for r in app.gateway.records.local if r.route == "split" and not r.forced
    )


def test_a_forced_variant_is_tried_alone_and_never_shadowed(
    served: tuple[str, TurnoutApp], recorder: Recorder
) -> None:
    url, app = served
    failed = _forced(url, "error-500", route="guarded")
    assert failed.status_code >= 500  # no fallback to `ok` for an evaluation
    assert failed.headers["x-turnout-variant"] == "error-500"
    assert all(sent.json["model"] == "error-500" for sent in recorder.received)
    shadowed = _forced(url, "ok", route="guarded")  # the fallback variant may be forced
    assert shadowed.status_code == 200
    assert not any(
        r.shadow_of == shadowed.headers["x-request-id"] for r in app.gateway.records.local
    )


def test_a_variant_not_on_the_route_is_400(served: tuple[str, TurnoutApp]) -> None:
    response = _forced(served[0], "echo", route="split")
    assert response.status_code == 400
    assert _error(response)["param"] == "x-turnout-variant"
    assert "split" in _error(response)["message"]


def test_only_the_admin_key_may_force(served: tuple[str, TurnoutApp], recorder: Recorder) -> None:
    url, _ = served
    for key in (CLIENT_KEY, "nonsense"):
        response = _forced(url, "prompted", key=key)
        assert response.status_code == 403
        assert _error(response)["type"] == "permission_error"
        assert _error(response)["param"] == "x-turnout-variant"
        assert "admin key" in _error(response)["message"]
    assert recorder.received == []


def test_forced_requests_are_spend_not_traffic_in_metrics(served: tuple[str, TurnoutApp]) -> None:
    """Like shadows: their tokens and cost count, not as requests clients made."""
    url, _ = served

    def figures() -> tuple[float, float]:
        text = httpx.get(url + "/metrics").text
        requests = tokens = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.labels.get("variant") != "prompted":
                    continue
                if sample.name == "turnout_requests_total":
                    requests += sample.value
                if sample.name == "turnout_tokens_total":
                    tokens += sample.value
        return requests, tokens

    before = figures()
    assert _forced(url, "prompted").status_code == 200
    after = figures()
    assert after[0] == before[0] and after[1] > before[1]
