"""Row 15, SSRF: whatever a client sends (body fields naming URLs or keys, model and adapter
names with `#`, `%23`, `@`, `//`, `..`, Host and X-Forwarded-* headers, absolute request
targets), Turnout connects only to its configured upstreams. A canary TCP port on 127.0.0.1
counts every connection it gets; it must get none. An upstream's redirect aimed at the canary
is not followed either. Each answer is the normal one (from the configured upstream) or an
OpenAI-shaped 4xx."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.fakes import create_fake_upstream, read_body
from tests.integration.conftest import ADMIN_KEY, build_app
from tests.reliability.canary import CanaryPort, no_connections, raw_http
from tests.servers import serve_app

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
ENDPOINTS = ("chat/completions", "completions", "embeddings")
REDIRECTS = (301, 302, 303, 307, 308)
# "{c}" is the canary's URL (http://127.0.0.1:PORT), "{hp}" its host:port.
MODEL_NAMES = (
    "{c}", "{c}/v1", "{c}/v1/chat/completions", "ok#{c}", "ok%23{c}", "ok#", "ok%23",
    "ok@{hp}", "user:pw@{hp}/v1", "ok@{c}", "//{hp}/v1", "//{hp}", "../ok", "ok/../ok", "ok/..",
    "..", "/ok", "ok/", "ok?", "ok?api_base={c}", "ok\\..\\x", "ok\r\nHost: {hp}", "ok\x00",
    "OK", " ok", "ok ", "echo/../ok", "%2e%2e/ok", "ok%2F..%2F{hp}", "ok\t{c}", "{hp}",
    "http:{hp}", "file:///etc/passwd", "ok#@{hp}", "ok%40{hp}",
)  # fmt: skip
ADAPTER_NAMES = (
    "lora-a#", "lora-a%23", "lora-a@{hp}", "../lora-a", "lora-a/..", "//{hp}/", "{c}",
    "lora-a/../../{hp}", "lora-a?x={c}", "LORA-A",
)  # fmt: skip


@dataclass
class Seen:
    method: str
    path: str
    host: str
    body: Any


class Upstream:
    """The fake upstream (tests/fakes.py) behind a recorder of every request it gets, plus
    what the fake lacks: vLLM's adapter admin paths (200) and models `redirect-<status>`
    that answer with a redirect to `location`."""

    def __init__(self) -> None:
        self.fake, _ = create_fake_upstream()
        self.seen: list[Seen] = []
        self.location = ""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.fake(scope, receive, send)
            return
        raw = await read_body(receive) or b""
        body = json.loads(raw) if raw else None
        host = dict(scope["headers"]).get(b"host", b"").decode()
        self.seen.append(Seen(scope["method"], scope["path"], host, body))
        model = body.get("model") if isinstance(body, dict) else None
        if scope["path"] in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            await _answer(send, 200, b"Success", [])
        elif isinstance(model, str) and model.startswith("redirect-"):
            where = (b"location", (self.location + scope["path"]).encode())
            await _answer(send, int(model.removeprefix("redirect-")), b"", [where])
        else:
            replayed = False

            async def replay() -> dict[str, Any]:
                nonlocal replayed
                if replayed:
                    return dict(await receive())
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}

            await self.fake(scope, replay, send)

    def calls(self) -> list[Seen]:
        """What it got, less the model watcher's polls of /v1/models (one a second)."""
        return [s for s in self.seen if (s.method, s.path) != ("GET", "/v1/models")]

    def paths(self) -> set[str]:
        return {s.path for s in self.calls()}


async def _answer(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    length = (b"content-length", str(len(body)).encode())
    await send({"type": "http.response.start", "status": status, "headers": [length, *headers]})
    await send({"type": "http.response.body", "body": body})


@dataclass
class Setup:
    url: str
    canary: CanaryPort
    upstream: Upstream
    upstream_host: str
    http: httpx.Client  # on the gateway

    def fill(self, template: str) -> str:
        return template.format(c=self.canary.url, hp=self.canary.url.removeprefix("http://"))


def _config(upstream_url: str) -> dict[str, Any]:
    limits = {"connect": 2.0, "first_byte": 5.0, "idle": 5.0, "total": 10.0}
    variants: dict[str, Any] = {
        "ok": {"upstream": "hosted", "model": "ok"},
        "echo": {"upstream": "hosted", "model": "echo"},
        "ft": {"upstream": "vllm", "model": "ok"},
    }
    variants |= {
        f"redirect-{s}": {"upstream": "hosted", "model": f"redirect-{s}"} for s in REDIRECTS
    }
    variants |= {
        f"ft-redirect-{s}": {"upstream": "vllm-plain", "model": f"redirect-{s}"} for s in REDIRECTS
    }
    return {
        "admin_key_env": "TURNOUT_ADMIN_KEY",
        "upstreams": {
            "hosted": {
                "kind": "openai",
                "base_url": upstream_url + "/v1",
                "api_key_env": "FAKE_KEY",
                "timeouts": limits,
            },
            "vllm": {
                "kind": "vllm",
                "urls": [upstream_url],
                "timeouts": limits,
                "serve": {"base_model": "ok", "adapters": {"lora-a": "/adapters/a"}},
            },
            "vllm-plain": {"kind": "vllm", "urls": [upstream_url], "timeouts": limits},
        },
        "variants": variants,
        "routes": {name: {"split": {name: 1}} for name in variants},
    }


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    upstream = Upstream()
    with CanaryPort() as canary, serve_app(upstream) as upstream_url:
        upstream.location = canary.url
        canary.probe()  # it counts what reaches it; from now on nothing else may
        app = build_app(_config(upstream_url))
        with (
            serve_app(app, lifespan="on") as url,
            httpx.Client(base_url=url, timeout=10) as http,
        ):
            yield Setup(url, canary, upstream, upstream_url.removeprefix("http://"), http)
        assert canary.connections == 1, canary.first_bytes


@pytest.fixture
def gw(setup: Setup) -> Iterator[Setup]:
    """The module's gateway, with the upstream's log emptied; the canary must stay silent."""
    setup.upstream.seen.clear()
    with no_connections(setup.canary):
        yield setup


def _assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return dict(error)


def _body(kind: str, model: str, **extra: Any) -> dict[str, Any]:
    if kind == "chat/completions":
        payload: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}
    elif kind == "completions":
        payload = {"prompt": "hi"}
    else:
        payload = {"input": "hi"}
    return {"model": model, **payload, **extra}


def _url_fields(c: str) -> dict[str, Any]:
    """Fields other gateways and SDKs read as where to send a request, or with what key."""
    return {
        "api_base": c,
        "base_url": c + "/v1",
        "api_key": "sk-aimed-at-the-canary",
        "azure_endpoint": c,
        "api_version": "2024-01-01",
        "endpoint": c,
        "url": c,
        "host": c.removeprefix("http://"),
        "proxy": c,
        "extra_headers": {"Host": c.removeprefix("http://"), "X-Forwarded-Host": c},
        "extra_query": {"url": c},
        "extra_body": {"api_base": c, "base_url": c},
        "metadata": {"callback_url": c, "webhook": c + "/hook", "nested": [{"url": c}]},
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "fetch",
                    "description": f"GET {c}/admin",
                    "parameters": {"$ref": c + "/schema.json", "type": "object"},
                },
            }
        ],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"$ref": c + "/schema.json"}},
        },
    }


def _aimed_headers(c: str) -> dict[str, str]:
    hp = c.removeprefix("http://")
    return {
        "host": hp,
        "x-forwarded-host": hp,
        "x-forwarded-for": "127.0.0.1",
        "x-forwarded-proto": "http",
        "x-forwarded-port": hp.split(":")[1],
        "forwarded": f"host={hp};proto=http",
        "x-original-url": c + "/v1/chat/completions",
        "x-rewrite-url": c + "/v1/chat/completions",
        "x-real-ip": "127.0.0.1",
        "x-turnout-upstream": c,
        "x-turnout-base-url": c,
        "x-turnout-url": c,
        "x-turnout-route": c,
        "referer": c,
        "origin": c,
    }


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("route", ["echo", "ft"])
@pytest.mark.parametrize("stream", [False, True])
def test_client_fields_and_headers_never_choose_the_upstream(
    gw: Setup, endpoint: str, route: str, stream: bool
) -> None:
    if stream and endpoint == "embeddings":
        pytest.skip("embeddings do not stream")
    body = _body(endpoint, route, **_url_fields(gw.canary.url)) | {"stream": stream}
    answer = gw.http.post(f"/v1/{endpoint}", json=body, headers=_aimed_headers(gw.canary.url))
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-turnout-route"] == route
    if stream:
        assert answer.text.rstrip().endswith("data: [DONE]")
    # One call, to the configured upstream, on the endpoint's own path, with its own Host;
    # the fields went along untouched (they mean nothing to an OpenAI-compatible upstream).
    assert [(s.method, s.path, s.host) for s in gw.upstream.calls()] == [
        ("POST", f"/v1/{endpoint}", gw.upstream_host)
    ]
    sent = gw.upstream.calls()[0].body
    assert sent["api_base"] == gw.canary.url
    assert sent["extra_headers"] == body["extra_headers"]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_model_names_aimed_elsewhere_are_unknown_routes(gw: Setup, endpoint: str) -> None:
    for template in MODEL_NAMES:
        model = gw.fill(template)
        answer = gw.http.post(f"/v1/{endpoint}", json=_body(endpoint, model))
        error = _assert_openai_error(answer, 404)
        assert error["code"] == "model_not_found", model
    assert gw.upstream.calls() == []


def test_the_forced_variant_header_names_only_a_route_variant(gw: Setup) -> None:
    body = _body("chat/completions", "ok")
    for template in ("{c}", "//{hp}/v1", "ok#{c}", "ok@{hp}", "../ok", "echo"):
        aimed = {"x-turnout-variant": gw.fill(template)}
        as_client = gw.http.post("/v1/chat/completions", json=body, headers=aimed)
        _assert_openai_error(as_client, 403)
        as_admin = gw.http.post("/v1/chat/completions", json=body, headers=aimed | ADMIN)
        _assert_openai_error(as_admin, 400)
    assert gw.upstream.calls() == []


@pytest.mark.parametrize(
    "target",
    [
        "POST {c}/v1/chat/completions",  # absolute form, aimed at the canary
        "POST http://{up}/v1/chat/completions",  # absolute form, the upstream itself
        "POST //{hp}/v1/chat/completions",
        "POST /v1/chat/completions?api_base={c}&base_url={c}",
        "POST /v1/chat/completions/../../{hp}",
        "POST /v1/../v1/chat/completions",
        "POST /v1/chat%2Fcompletions",
        "POST /v1/%2e%2e/v1/chat/completions",
        "POST /v1/chat/completions#{c}",
        "POST /v1/chat/completions%23{c}",
        "POST /{c}/v1/chat/completions",
        "POST /v1/load_lora_adapter",
        "POST /tokenize",
        "GET /metrics/../v1/models",
    ],
)
def test_request_targets_aimed_elsewhere(gw: Setup, target: str) -> None:
    """Raw requests (httpx would normalise these): the target and Host never pick a server."""
    line = target.format(
        c=gw.canary.url, hp=gw.canary.url.removeprefix("http://"), up=gw.upstream_host
    )
    body = json.dumps(_body("chat/completions", "ok")).encode()
    headers = [
        b"Host: " + gw.canary.url.removeprefix("http://").encode(),
        b"Content-Type: application/json",
    ]
    answer = raw_http(gw.url, line.encode(), headers, body)
    assert answer.status < 500, answer.raw
    if answer.status == 200:
        assert gw.upstream.paths() == {"/v1/chat/completions"}
        assert all(s.host == gw.upstream_host for s in gw.upstream.seen)
    else:
        assert 400 <= answer.status < 500
        error = json.loads(answer.body)["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert gw.upstream.calls() == []


@pytest.mark.parametrize("route", ["redirect-", "ft-redirect-"])
@pytest.mark.parametrize("stream", [False, True])
def test_upstream_redirects_are_not_followed(gw: Setup, route: str, stream: bool) -> None:
    for status in REDIRECTS:
        body = _body("chat/completions", f"{route}{status}") | {"stream": stream}
        answer = gw.http.post("/v1/chat/completions", json=body)
        _assert_openai_error(answer, 502)
        assert "location" not in answer.headers
    assert len(gw.upstream.calls()) == len(REDIRECTS)  # one attempt each, none elsewhere


def test_admin_adapter_calls_reach_only_configured_replicas(gw: Setup) -> None:
    post = "/turnout/adapters"
    # The admin may give a path; vLLM resolves it (Turnout passes it on, and contacts no one).
    aimed = {"upstream": "vllm", "name": "lora-a", "path": gw.canary.url + "/adapter"}
    assert gw.http.post(post, json=aimed).status_code == 403
    assert gw.upstream.calls() == []
    loaded = gw.http.post(post, json=aimed, headers=ADMIN)
    assert loaded.status_code == 200, loaded.text
    load = gw.upstream.calls()
    assert [(s.path, s.host) for s in load] == [("/v1/load_lora_adapter", gw.upstream_host)]
    assert load[0].body == {"lora_name": "lora-a", "lora_path": gw.canary.url + "/adapter"}
    gw.upstream.seen.clear()

    for template in ADAPTER_NAMES:
        name = gw.fill(template)
        answer = gw.http.post(post, json={"upstream": "vllm", "name": name}, headers=ADMIN)
        _assert_openai_error(answer, 400)
        gone = gw.http.delete(f"{post}/vllm/{urllib.parse.quote(name, safe='')}", headers=ADMIN)
        assert gone.status_code in (400, 404), (name, gone.text)
        assert set(gone.json()["error"]) == {"message", "type", "param", "code"}
    for upstream in (gw.canary.url, "hosted", "../vllm", "vllm/..", "vllm#", "vllm%23", "VLLM"):
        answer = gw.http.post(post, json={"upstream": upstream, "name": "lora-a"}, headers=ADMIN)
        _assert_openai_error(answer, 404)
    extra = {"upstream": "vllm", "name": "lora-a", "url": gw.canary.url}
    _assert_openai_error(gw.http.post(post, json=extra, headers=ADMIN), 400)
    assert gw.upstream.calls() == []

    gone = gw.http.delete(f"{post}/vllm/lora-a", headers=ADMIN)
    assert gone.status_code == 200, gone.text
    assert gw.upstream.paths() == {"/v1/unload_lora_adapter"}


def test_other_endpoints_take_urls_as_plain_names(gw: Setup) -> None:
    c = gw.canary.url
    feedback = gw.http.post(
        "/turnout/feedback", json={"request_id": c, "metric": "m", "value": True}
    )
    _assert_openai_error(feedback, 404)
    for request_id in (c, f"..%2F..%2F{c}", "%2F%2F127.0.0.1"):
        record = gw.http.get(f"/turnout/requests/{request_id}", headers=ADMIN)
        assert record.status_code == 404, record.text
    report = gw.http.get("/turnout/report", params={"route": c}, headers=ADMIN)
    _assert_openai_error(report, 404)
    models = gw.http.get("/v1/models", headers=_aimed_headers(c))
    assert models.status_code == 200
    keys = gw.http.post("/turnout/keys", json={"name": "k", "routes": [c]}, headers=ADMIN)
    _assert_openai_error(keys, 400)
    assert gw.upstream.calls() == []
    assert all(s.host == gw.upstream_host for s in gw.upstream.seen)
