"""Every error status Turnout produces, each in OpenAI's shape, in DESIGN.md's order."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx
import pytest

from tests.fakes import SECRET
from tests.integration.conftest import CLIENT_KEY, UPSTREAM_KEY, Upstreams, base_config, running

USER = [{"role": "user", "content": "hi"}]


def _assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code
    assert "x-request-id" in response.headers
    return error


def _chat(url: str, **fields: object) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json={"messages": USER, **fields}, timeout=10)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": USER}, "model"),
        ({"model": "ok"}, "messages"),
        ({"model": "ok", "messages": "hi"}, "messages"),
        ({"model": "ok", "messages": [{"content": "x"}]}, "messages[0]"),
        ({"model": "ok", "messages": USER, "n": 0}, "n"),
        ({"model": "ok", "messages": USER, "n": 10_000}, "n"),
        ({"model": "ok", "messages": USER, "max_tokens": -1}, "max_tokens"),
        ({"model": "ok", "messages": USER, "max_tokens": True}, "max_tokens"),
        ({"model": "ok", "messages": USER, "stream": "yes"}, "stream"),
        ({"model": "ok", "messages": USER, "temperature": 9}, "temperature"),
        ({"model": "ok", "messages": USER, "user": 5}, "user"),
        ({"model": "ok", "messages": USER, "stream_options": {"include_usage": 1}},
         "stream_options.include_usage"),
    ],
)  # fmt: skip
def test_bad_fields_are_400_naming_the_param(url: str, body: dict, param: str) -> None:
    response = httpx.post(url + "/v1/chat/completions", json=body)
    error = _assert_openai_error(response, 400)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", b"\xff\xfe"])
def test_bad_json_is_400(url: str, raw: bytes) -> None:
    response = httpx.post(url + "/v1/chat/completions", content=raw)
    _assert_openai_error(response, 400)


def test_bad_completion_and_embedding_inputs(url: str) -> None:
    for path, body in [
        ("/v1/completions", {"model": "ok"}),
        ("/v1/completions", {"model": "ok", "prompt": [1, "a"]}),
        ("/v1/embeddings", {"model": "ok", "input": []}),
        ("/v1/embeddings", {"model": "ok", "input": {"a": 1}}),
    ]:
        _assert_openai_error(httpx.post(url + path, json=body), 400)


def test_unknown_route_is_404_model_not_found(url: str) -> None:
    error = _assert_openai_error(_chat(url, model="no-such-route"), 404, "model_not_found")
    assert error["param"] == "model"


def test_unknown_path_and_method(url: str) -> None:
    _assert_openai_error(httpx.get(url + "/v1/nothing"), 404)
    _assert_openai_error(httpx.get(url + "/v1/chat/completions"), 405)


def test_body_over_limit_is_413_with_and_without_content_length(url: str) -> None:
    big = b'{"model": "ok", "messages": [], "pad": "' + b"x" * 70_000 + b'"}'
    _assert_openai_error(httpx.post(url + "/v1/chat/completions", content=big), 413)

    def chunked() -> Iterator[bytes]:
        for i in range(0, len(big), 4096):
            yield big[i : i + 4096]

    response = httpx.post(url + "/v1/chat/completions", content=chunked())
    assert "content-length" not in response.request.headers
    _assert_openai_error(response, 413)


@pytest.mark.parametrize(
    ("model", "status", "code"),
    [
        ("error-401", 502, "upstream_rejected"),
        ("error-403", 502, "upstream_rejected"),
        ("error-404", 502, "upstream_rejected"),
        ("error-500", 502, "upstream_error"),
        ("error-503", 502, "upstream_error"),
        ("garbage", 502, "upstream_error"),
        ("error-422", 400, "upstream_bad_request"),
    ],
)
def test_upstream_failures_are_mapped(url: str, model: str, status: int, code: str) -> None:
    response = _chat(url, model=model)
    error = _assert_openai_error(response, status, code)
    assert response.headers["x-turnout-variant"] == model
    assert SECRET not in response.text and UPSTREAM_KEY not in response.text
    assert error["type"] != "server_error"


def test_upstream_400_passes_its_message_with_secrets_scrubbed(url: str) -> None:
    error = _assert_openai_error(_chat(url, model="error-400"), 400, "upstream_bad_request")
    assert "bad field foo" in error["message"]
    assert SECRET not in error["message"]


def test_upstream_429_keeps_retry_after(url: str) -> None:
    response = _chat(url, model="error-429")
    _assert_openai_error(response, 429)
    assert response.headers["retry-after"] == "7"


def test_upstream_deadlines_are_504(url: str) -> None:
    # The fixture's limits: first byte 1 s, total 5 s; slow-first-token waits 2 s.
    _assert_openai_error(_chat(url, model="hang"), 504, "upstream_timeout")
    _assert_openai_error(_chat(url, model="slow-first-token", stream=True), 504)
    # A non-streaming answer arrives whole, so only the total deadline applies to it.
    assert _chat(url, model="slow-first-token").status_code == 200


def test_keys_401_and_404_for_routes_the_key_may_not_call(keyed_gateway: str) -> None:
    url = keyed_gateway
    _assert_openai_error(_chat(url, model="ok"), 401, "invalid_api_key")
    wrong = httpx.post(
        url + "/v1/chat/completions",
        json={"model": "ok", "messages": USER},
        headers={"authorization": "Bearer sk-wrong"},
    )
    _assert_openai_error(wrong, 401)
    good = {"authorization": f"Bearer {CLIENT_KEY}"}
    ok = httpx.post(
        url + "/v1/chat/completions", json={"model": "ok", "messages": USER}, headers=good
    )
    assert ok.status_code == 200
    forbidden = httpx.post(
        url + "/v1/chat/completions", json={"model": "prompted", "messages": USER}, headers=good
    )
    _assert_openai_error(forbidden, 404, "model_not_found")
    models = httpx.get(url + "/v1/models", headers=good).json()
    assert {m["id"] for m in models["data"]} == {"ok", "echo"}
    _assert_openai_error(httpx.get(url + "/v1/models"), 401)


def test_error_order_401_before_413_before_400(keyed_gateway: str) -> None:
    url = keyed_gateway
    big = b"{" + b" " * 70_000
    _assert_openai_error(httpx.post(url + "/v1/chat/completions", content=big), 401)
    good = {"authorization": f"Bearer {CLIENT_KEY}"}
    _assert_openai_error(httpx.post(url + "/v1/chat/completions", content=big, headers=good), 413)
    bad = httpx.post(url + "/v1/chat/completions", content=b"{", headers=good)
    _assert_openai_error(bad, 400)


def test_provider_key_never_logged(upstreams: Upstreams, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with running(base_config(upstreams)) as (url, _):
        for model in ("error-400", "error-401", "error-500", "garbage", "ok"):
            _chat(url, model=model)
    assert UPSTREAM_KEY not in caplog.text
    assert SECRET not in caplog.text
