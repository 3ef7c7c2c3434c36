"""POST /turnout/feedback: who may post, what is checked, where it is kept (memory and Redis)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.config_check import check_settings
from tests.integration.conftest import (
    ADMIN_KEY,
    CLIENT_KEY,
    ENV,
    Upstreams,
    base_config,
    running,
    sha256,
)

OTHER_KEY = "sk-client-app-b-0002"
FEEDBACK = [
    {"name": "resolved", "type": "bool"},
    {"name": "rating", "type": "float", "higher_is_better": True},
]
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
CLIENT = {"authorization": f"Bearer {CLIENT_KEY}"}
OTHER = {"authorization": f"Bearer {OTHER_KEY}"}


def _config(upstreams: Upstreams, state: dict[str, Any] | None) -> dict[str, Any]:
    config = base_config(upstreams)
    config["routes"]["ok"]["feedback"] = FEEDBACK
    config["keys"] = [
        {"name": "app-a", "sha256": sha256(CLIENT_KEY)},
        {"name": "app-b", "sha256": sha256(OTHER_KEY)},
    ]
    if state is not None:
        config["state"] = state
    return config


@pytest.fixture(params=["memory", "redis"])
def served(request: pytest.FixtureRequest, upstreams: Upstreams) -> Iterator[str]:
    state = None
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        state = {"redis_url": server.url, "key_prefix": request.getfixturevalue("prefix")}
    with running(_config(upstreams, state)) as (url, _):
        yield url


def _chat(client: httpx.Client, route: str = "ok") -> str:
    body = {"model": route, "messages": [{"role": "user", "content": "hi"}]}
    response = client.post("/v1/chat/completions", json=body, headers=CLIENT)
    assert response.status_code == 200, response.text
    return response.headers["x-request-id"]


def test_feedback_is_checked_stored_and_shown(served: str) -> None:
    with httpx.Client(base_url=served, timeout=10) as client:
        request_id = _chat(client)

        def post(headers: dict[str, str], **body: Any) -> httpx.Response:
            return client.post("/turnout/feedback", json={"request_id": request_id} | body,
                               headers=headers)  # fmt: skip

        answer = post(CLIENT, metric="resolved", value=True, comment="fixed it")
        assert answer.status_code == 200, answer.text
        assert answer.json()["feedback"]["resolved"]["value"] is True
        assert answer.json()["feedback"]["resolved"]["comment"] == "fixed it"

        answer = post(ADMIN, metric="rating", value=4)
        assert answer.status_code == 200, answer.text
        assert answer.json()["feedback"].keys() == {"resolved", "rating"}
        assert answer.json()["feedback"]["rating"]["value"] == 4.0

        # Another key: 404, like an unknown request (ids do not leak between keys).
        assert post(OTHER, metric="resolved", value=False).status_code == 404
        assert post({}, metric="resolved", value=False).status_code == 401
        unknown = {"request_id": "nope", "metric": "resolved", "value": True}
        unknown_answer = client.post("/turnout/feedback", json=unknown, headers=ADMIN)
        assert unknown_answer.status_code == 404

        for metric, value in [
            ("undeclared", True),  # not declared on the route
            ("resolved", 1.0),  # a number for a bool metric
            ("rating", True),  # a bool for a float metric
            ("rating", "5"),  # a string
        ]:
            answer = post(CLIENT, metric=metric, value=value)
            assert answer.status_code == 400, (metric, value, answer.text)
        assert post(CLIENT, metric="resolved", value=True, extra=1).status_code == 400

        # Posting again replaces the value; the record shows the feedback.
        assert post(CLIENT, metric="resolved", value=False).status_code == 200
        record = client.get(f"/turnout/requests/{request_id}", headers=ADMIN).json()
        assert record["request_id"] == request_id
        assert record["feedback"]["resolved"]["value"] is False
        assert record["feedback"]["rating"]["value"] == 4.0


def test_the_report_summarises_feedback_per_variant(served: str) -> None:
    with httpx.Client(base_url=served, timeout=10) as client:
        ids = [_chat(client) for _ in range(6)]
        for i, request_id in enumerate(ids):
            for metric, value in (("resolved", i % 3 != 0), ("rating", float(i))):
                body = {"request_id": request_id, "metric": metric, "value": value}
                assert (
                    client.post("/turnout/feedback", json=body, headers=CLIENT).status_code == 200
                )
        answer = client.get("/turnout/report", params={"route": "ok"}, headers=ADMIN)
        assert answer.status_code == 200, answer.text
        table = answer.json()["routes"]["ok"]["variants"]["ok"]["feedback"]
    assert table["resolved"]["n"] == table["rating"]["n"] == 6  # a fresh gateway per test
    assert table["resolved"]["mean"]["estimate"] == pytest.approx(4 / 6)
    assert table["rating"]["mean"]["estimate"] == pytest.approx(2.5)
    interval = table["resolved"]["mean"]
    assert 0 <= interval["low"] <= interval["estimate"] <= interval["high"] <= 1


def test_a_route_without_metrics_refuses_feedback(served: str) -> None:
    with httpx.Client(base_url=served, timeout=10) as client:
        request_id = _chat(client, "echo")
        body = {"request_id": request_id, "metric": "resolved", "value": True}
        answer = client.post("/turnout/feedback", json=body, headers=CLIENT)
        assert answer.status_code == 400
        assert "declared: none" in answer.json()["error"]["message"]
        record = client.get(f"/turnout/requests/{request_id}", headers=ADMIN).json()
        assert "feedback" not in record


def test_open_gateway_accepts_anyone(upstreams: Upstreams) -> None:
    config = base_config(upstreams)
    config["routes"]["ok"]["feedback"] = FEEDBACK
    with running(config) as (url, _), httpx.Client(base_url=url, timeout=10) as client:
        body = {"model": "ok", "messages": [{"role": "user", "content": "hi"}]}
        request_id = client.post("/v1/chat/completions", json=body).headers["x-request-id"]
        answer = client.post(
            "/turnout/feedback", json={"request_id": request_id, "metric": "rating", "value": 0.5}
        )
        assert answer.status_code == 200, answer.text


def test_metric_names_are_unique_per_route(upstreams: Upstreams) -> None:
    config = base_config(upstreams)
    config["routes"]["ok"]["feedback"] = [*FEEDBACK, {"name": "rating", "type": "bool"}]
    settings, problems = check_settings(config, ENV)
    assert settings is None
    assert [p.path for p in problems if p.severity == "error"] == ["routes.ok.feedback[2].name"]
    config["routes"]["ok"]["feedback"] = [{"name": "x", "type": "int"}]
    assert check_settings(config, ENV)[0] is None
