"""Schemathesis against Turnout's own OpenAPI document (GET /openapi.json): valid and invalid
requests generated for every operation, sent to a running gateway over fake upstreams; no
answer is a 5xx, every error is OpenAI-shaped, and the gateway is still serving afterwards."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import response_schema_conformance

from gateway.handlers import ROUTES
from tests.fakes import create_fake_upstream
from tests.integration.conftest import (
    ADMIN_KEY,
    CLIENT_KEY,
    Upstreams,
    base_config,
    running,
    sha256,
)
from tests.servers import serve_app

# Examples per operation and generation mode, more for the three API calls (the big bodies).
EXAMPLES = 25
API_EXAMPLES = 50
# Routes whose fake upstream answers well: any 5xx on them is Turnout's own failure.
HEALTHY = ["ok", "echo", "prompted", "split", "sliced", "no-usage", "detailed-usage"]


@pytest.fixture(scope="module")
def gateway() -> Iterator[str]:
    app, recorder = create_fake_upstream()
    with serve_app(app) as first, serve_app(app) as second:
        config = base_config(Upstreams([first, second], recorder))
        config["keys"] = [{"name": "app", "sha256": sha256(CLIENT_KEY), "routes": HEALTHY}]
        with running(config) as (url, _):
            yield url


def _document(url: str) -> dict[str, Any]:
    """The served document, with `model` drawn from the healthy routes most of the time (route
    names are deliberately not in it) so that generated calls get past routing."""
    document: dict[str, Any] = httpx.get(url + "/openapi.json").json()
    for name in ("ChatRequest", "CompletionRequest", "EmbeddingRequest"):
        properties = document["components"]["schemas"][name]["properties"]
        properties["model"] = {"enum": HEALTHY}
    return document


def _headers(case: Case[Any]) -> dict[str, str]:
    """The client key on the OpenAI API, the admin key on Turnout's own endpoints."""
    key = CLIENT_KEY if case.path.startswith("/v1/") else ADMIN_KEY
    return {"authorization": f"Bearer {key}"}


def _openai_error(response: Any) -> None:
    """Every error answer is JSON in OpenAI's shape."""
    if response.status_code < 400:
        return
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]


def test_documented_paths_are_the_served_paths() -> None:
    """The document describes exactly the handlers' paths and methods."""
    from gateway.openapi import DOCUMENT

    served = {
        (path.replace(":str}", "}"), method.lower())
        for handler in ROUTES
        for path in handler.paths
        for method in handler.http_methods
    }
    documented = {(path, method) for path, item in DOCUMENT["paths"].items() for method in item}
    assert documented == served


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_generated_request_gets_a_server_error(
    gateway: str, mode: GenerationMode, caplog: pytest.LogCaptureFixture
) -> None:
    """Schemathesis: for each operation, up to 25 generated requests, 50 for the API calls
    (valid ones, then ones that break the schema); no 5xx, every error OpenAI-shaped,
    responses as documented, no unhandled exception logged, and the gateway still answers
    afterwards."""
    schema = schemathesis.openapi.from_dict(_document(gateway))
    operations = [result.ok() for result in schema.get_all_operations() if isinstance(result, Ok)]
    assert len(operations) == 19
    if mode is GenerationMode.NEGATIVE:  # only what has inputs to break: a body or parameters
        operations = [op for op in operations if op.body or op.path_parameters or op.query]
    calls = 0
    with httpx.Client(base_url=gateway, timeout=10) as http, caplog.at_level(logging.ERROR):
        for operation in operations:

            @settings(
                max_examples=API_EXAMPLES if operation.path.startswith("/v1/") else EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,  # the same examples on every run: CI stays reproducible
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def fuzz(case: Case[Any]) -> None:
                nonlocal calls
                response = case.call(base_url=gateway, headers=_headers(case), timeout=10)
                calls += 1
                case.validate_response(
                    response, checks=[not_a_server_error, response_schema_conformance]
                )
                _openai_error(response)

            fuzz()
        assert http.get("/healthz").status_code == 200
        assert http.get("/readyz").status_code == 200
    print(f"{mode.value}: {calls} generated calls over {len(operations)} operations")
    assert calls >= len(operations) * 5, calls
    unhandled = [r for r in caplog.records if r.getMessage() == "unhandled error"]
    assert not unhandled, unhandled[0].exc_info
