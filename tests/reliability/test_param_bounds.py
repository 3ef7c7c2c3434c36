"""Row 18, parameter abuse toward vLLM: requests asking more than an upstream's bounds allow
(`n`, `best_of`, token counts, logprobs, giant or deep structured-output schemas) are refused
with a 400 naming the parameter before anything is sent upstream, and vLLM's own admin and
utility paths are 404 at Turnout: never forwarded.

Bounds are per upstream (`upstreams.<name>.bounds`, defaults in gateway.settings.Bounds); a
route enforces the tightest bounds of every upstream it may send a request to."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from gateway.settings import DEFAULT_MAX_TOKENS, Bounds
from tests.fakes import Recorder, create_fake_upstream
from tests.integration.conftest import running
from tests.servers import serve_app

# The vLLM upstream's bounds: tighter than the defaults, which the hosted upstream keeps.
GPU = {
    "max_n": 4,
    "max_tokens": 1024,
    "max_logprobs": 5,
    "max_schema_bytes": 4096,
    "max_schema_depth": 8,
}
DEFAULT = Bounds()
USER = [{"role": "user", "content": "hello"}]

# vLLM's own endpoints besides the OpenAI API (admin, utility, profiling, other APIs).
VLLM_PATHS = [
    *("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/load_lora_adapter"),
    *("/tokenize", "/detokenize", "/v1/tokenize", "/v1/detokenize"),
    *("/collective_rpc", "/sleep", "/wake_up", "/is_sleeping", "/reset_prefix_cache"),
    *("/reset_mm_cache", "/start_profile", "/stop_profile", "/update_weights"),
    *("/scale_elastic_ep", "/is_scaling_elastic_ep", "/server_info", "/version", "/ping"),
    *("/health", "/load", "/invocations", "/pooling", "/classify", "/score", "/v1/score"),
    *("/rerank", "/v1/rerank", "/v2/rerank", "/v1/responses", "/v1/audio/transcriptions"),
    *("/v1/models/ok", "/v1/chat/completions/render", "/v1/completions/render"),
]
# The same, reached by path tricks (sent raw, as written, so no client normalises them).
TRICK_PATHS = [
    "//v1/load_lora_adapter",
    "/v1//load_lora_adapter",
    "/v1/chat/completions/../load_lora_adapter",
    "/v1/chat/completions/..%2Fload_lora_adapter",
    "/v1%2Fload_lora_adapter",
    "/v1/chat/completions%2F..%2F..%2Ftokenize",
    "/./tokenize",
    "/%74okenize",
    "/v1/load_lora_adapter?x=/v1/chat/completions",
    "/v1/models/../v1/load_lora_adapter",
]


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[str, Recorder]]:
    app, recorder = create_fake_upstream()
    with serve_app(app) as url:
        yield url, recorder


def _config(upstream_url: str) -> dict[str, Any]:
    variants = {
        "ft": {"upstream": "gpu", "model": "ok"},
        "hosted": {"upstream": "hosted", "model": "ok"},
    }
    return {
        "upstreams": {
            "gpu": {"kind": "vllm", "urls": [upstream_url], "bounds": GPU},
            "hosted": {
                "kind": "openai",
                "base_url": upstream_url + "/v1",
                "api_key_env": "FAKE_KEY",
            },
        },
        "variants": variants,
        "routes": {
            "ft": {"split": {"ft": 1}},
            "hosted": {"split": {"hosted": 1}},
            # An A/B test across both: the tighter (vLLM) bounds hold for every draw.
            "ab": {"split": {"ft": 50, "hosted": 50}},
            "fallback": {"split": {"hosted": 1}, "fallback": ["ft"]},
            "shadowed": {"split": {"hosted": 1}, "shadow": {"variant": "ft", "fraction": 1.0}},
        },
    }


@pytest.fixture(scope="module")
def gateway(fake: tuple[str, Recorder]) -> Iterator[str]:
    with running(_config(fake[0])) as (url, _):
        yield url


@pytest.fixture
def recorder(fake: tuple[str, Recorder]) -> Recorder:
    fake[1].clear()
    return fake[1]


Post = Callable[[str, dict[str, Any]], httpx.Response]


@pytest.fixture(scope="module")
def post(gateway: str) -> Iterator[Post]:
    """POST a JSON body to a path of the gateway (one connection pool for the module)."""
    with httpx.Client(base_url=gateway, timeout=10) as http:
        yield lambda path, body: http.post(path, json=body)


def _assert_refused(response: httpx.Response, param: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert param in error["message"]


def _nested_schema(depth: int) -> dict[str, Any]:
    """A JSON schema whose JSON nests `depth` levels (each object level: 2 more)."""
    schema: dict[str, Any] = {"type": "string"}
    while True:
        wrapped = {"type": "object", "properties": {"a": schema}}
        if _depth(wrapped) > depth:
            return _pad(schema, depth)
        schema = wrapped


def _pad(schema: dict[str, Any], depth: int) -> dict[str, Any]:
    while _depth(schema) < depth:
        schema = {"allOf": [schema]} if _depth(schema) + 2 <= depth else {"x": schema}
    return schema


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """`response_format` for `schema`; its own envelope adds 2 levels of nesting."""
    return {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}


def _big_schema(size: int) -> dict[str, Any]:
    """A flat schema of about `size` bytes as JSON."""
    count = size // 30 + 1  # each property is 35 bytes
    return {
        "type": "object",
        "properties": {f"field_{i:08d}": {"type": "string"} for i in range(count)},
    }


CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
# (endpoint, fields past the vLLM upstream's bounds, fields past the defaults); each refusal
# names the first field.
ABUSE = [
    (CHAT, {"n": GPU["max_n"] + 1}, {"n": DEFAULT.max_n + 1}),
    (CHAT, {"n": 1_000_000}, {"n": 128}),
    (COMPLETIONS, {"best_of": GPU["max_n"] + 1}, {"best_of": DEFAULT.max_n + 1}),
    (CHAT, {"max_tokens": GPU["max_tokens"] + 1}, {"max_tokens": DEFAULT_MAX_TOKENS + 1}),
    (
        CHAT,
        {"max_completion_tokens": 10_000_000},
        {"max_completion_tokens": DEFAULT_MAX_TOKENS + 1},
    ),
    (CHAT, {"min_tokens": GPU["max_tokens"] + 1}, {"min_tokens": DEFAULT_MAX_TOKENS + 1}),
    (
        CHAT,
        {"top_logprobs": GPU["max_logprobs"] + 1, "logprobs": True},
        {"top_logprobs": DEFAULT.max_logprobs + 1, "logprobs": True},
    ),
    (COMPLETIONS, {"logprobs": GPU["max_logprobs"] + 1}, {"logprobs": 1000}),
    (CHAT, {"prompt_logprobs": -1}, {"prompt_logprobs": DEFAULT.max_logprobs + 1}),
    (CHAT, {"n": "4"}, {"best_of": 2.5}),
    (
        CHAT,
        {"response_format": _json_schema(_big_schema(GPU["max_schema_bytes"]))},
        {"response_format": _json_schema(_big_schema(DEFAULT.max_schema_bytes))},
    ),
    (
        CHAT,
        {"response_format": _json_schema(_nested_schema(GPU["max_schema_depth"]))},
        {"response_format": _json_schema(_nested_schema(DEFAULT.max_schema_depth))},
    ),
    (
        CHAT,
        {"guided_json": _big_schema(GPU["max_schema_bytes"])},
        {"guided_json": _nested_schema(DEFAULT.max_schema_depth + 1)},
    ),
    (
        CHAT,
        {"guided_regex": "a" * GPU["max_schema_bytes"]},
        {"guided_grammar": "x" * (DEFAULT.max_schema_bytes + 1)},
    ),
    (
        COMPLETIONS,
        {"structured_outputs": {"json": _nested_schema(GPU["max_schema_depth"])}},
        {"guided_choice": [str(i) for i in range(DEFAULT.max_schema_bytes // 6)]},
    ),
]


def _payload(endpoint: str, route: str, extra: dict[str, Any]) -> dict[str, Any]:
    base = {"messages": USER} if endpoint == CHAT else {"prompt": "hello"}
    return {"model": route, **base, **extra}


@pytest.mark.parametrize(("endpoint", "tight", "loose"), ABUSE)
def test_abusive_parameters_are_refused_naming_the_parameter_and_never_forwarded(
    post: Post,
    recorder: Recorder,
    endpoint: str,
    tight: dict[str, Any],
    loose: dict[str, Any],
) -> None:
    """Past the vLLM upstream's bounds: refused on its route and on the A/B route that may
    use it; past the defaults: refused on the hosted route too."""
    for route, extra in (("ft", tight), ("ab", tight), ("hosted", loose), ("ab", loose)):
        response = post(endpoint, _payload(endpoint, route, extra))
        _assert_refused(response, next(iter(extra)))
    assert recorder.received == []


def test_requests_at_the_bounds_pass_through_unchanged(post: Post, recorder: Recorder) -> None:
    at_bounds = {
        "n": GPU["max_n"],
        "max_tokens": GPU["max_tokens"],
        "logprobs": True,
        "top_logprobs": GPU["max_logprobs"],
        "response_format": _json_schema(_nested_schema(GPU["max_schema_depth"] - 2)),
    }
    response = post(CHAT, _payload(CHAT, "ft", at_bounds))
    assert response.status_code == 200, response.text
    sent = recorder.last().json
    assert {k: sent[k] for k in at_bounds} == at_bounds
    hosted = {"n": DEFAULT.max_n, "max_completion_tokens": DEFAULT_MAX_TOKENS}
    assert post(CHAT, _payload(CHAT, "hosted", hosted)).status_code == 200
    assert {k: recorder.last().json[k] for k in hosted} == hosted


def test_every_draw_of_an_ab_test_takes_the_tightest_bounds(post: Post, recorder: Recorder) -> None:
    """Accepted or refused alike whichever arm is drawn: `n` = 5 passes the hosted arm's
    bounds but not the vLLM arm's, so it is refused on every draw (fallbacks and shadows
    count as arms too)."""
    for i in range(20):
        for route in ("ab", "fallback", "shadowed"):
            body = _payload(CHAT, route, {"n": GPU["max_n"] + 1, "user": f"user-{i}"})
            _assert_refused(post(CHAT, body), "n")
    assert recorder.received == []


def test_openai_client_sees_the_parameter(gateway: str, recorder: Recorder) -> None:
    client = openai.OpenAI(base_url=gateway + "/v1", api_key="x", max_retries=0, timeout=10)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="ft", messages=USER, n=100)  # type: ignore[arg-type]
    assert caught.value.status_code == 400
    assert caught.value.param == "n"
    assert caught.value.code == "integer_above_max_value"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="ft", prompt="hi", max_tokens=GPU["max_tokens"] + 1)
    assert caught.value.param == "max_tokens"
    assert recorder.received == []


def _raw_request(url: str, method: str, path: str) -> tuple[int, bytes]:
    """Send `path` exactly as written; the status and body of the answer."""
    host, port = url.removeprefix("http://").split(":")
    body = b'{"model": "ok", "lora_name": "x", "lora_path": "/etc", "prompt": "hi"}'
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE"])
def test_vllm_admin_paths_are_404_and_never_forwarded(
    gateway: str, recorder: Recorder, method: str
) -> None:
    for path in VLLM_PATHS + TRICK_PATHS:
        status, body = _raw_request(gateway, method, path)
        assert status in (404, 405), (method, path, status)
        if status == 404:
            error = httpx.Response(404, content=body).json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
    assert recorder.received == []


def test_metrics_is_turnouts_own_not_an_upstreams(gateway: str, recorder: Recorder) -> None:
    text = httpx.get(gateway + "/metrics").text
    assert "turnout_requests_total" in text
    assert "vllm:" not in text
    assert recorder.received == []


def test_the_gateway_still_serves(post: Post, recorder: Recorder) -> None:
    assert post(CHAT, _payload(CHAT, "ab", {"n": 2})).status_code == 200
    assert len(recorder.received) == 1
