"""Row 16, key leakage: canary provider keys (an `openai` and a `vllm` upstream's, from the
environment), canary client keys (configured and run-time) and a canary admin key. Upstreams
echo the credentials they get everywhere they can: in 4xx/5xx error bodies (raw, as `Bearer
…`, and masked the way OpenAI masks keys), in headers, in garbage bodies, in SSE error events
before and after the first event, in broken HTTP (a mirrored request, a header line, a status
line, a chunk size). The gateway runs with Turnout's and uvicorn's loggers at DEBUG and
uvicorn's access log on (logging set up as `turnout serve` does, which keeps the HTTP client
library's own loggers at WARNING: httpcore at DEBUG prints upstream response headers), records
kept in memory and a file, or in Redis, with prompts and answers recorded.

Pass: no run of 8 characters of any canary appears in any response body or header, log
line (tracebacks included), /metrics, record (read through the API, the report, the records
file) or Redis key or value under the gateway's prefix."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.config_check import check_settings
from gateway.record_store import connect_redis
from tests.fakes import read_body
from tests.integration.conftest import sha256
from tests.redis_server import RedisServer
from tests.reliability.canary import LeakScanner, LogCapture, RawUpstream, raw_http, redis_dump
from tests.servers import serve_app

PROVIDER_KEY = "sk-provcanary-Vq3Zt8Lm2Xw7Kp9Rj4Ny6Bs"
VLLM_KEY = "vllmcanary-Hd5Fg2Jk8Lq3Wz7Xc4VbN1"
CLIENT_KEY = "sk-clientcanary-Mn6Bv1Cx9Zl5Ak3Sd7Fg"
ADMIN_KEY = "admincanary-Qw8Er3Ty6Ui1Op4As9DfG2"
ENV = {
    "CANARY_PROVIDER_KEY": PROVIDER_KEY,
    "CANARY_VLLM_KEY": VLLM_KEY,
    "TURNOUT_ADMIN_KEY": ADMIN_KEY,
}
CLIENT = {"authorization": f"Bearer {CLIENT_KEY}"}
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
USER = [{"role": "user", "content": "Where is my refund?"}]

# Upstream behaviour (by model) -> what the client gets, unary and streamed.
HOSTED = {
    "ok": 200,
    **{f"e{s}": 400 for s in (400, 413, 422)},
    "e400text": 400,
    **{f"e{s}": 502 for s in (401, 403, 404, 500, 502, 503)},
    "e429": 429,
    "garbage": 502,
    "garbage-list": 502,
    "slow": 504,
    "stream-first-error": 502,  # unary: the fake answers it like `ok`
}
RAW = ("raw-mirror", "raw-bad-header", "raw-bad-status", "raw-short-body", "raw-bad-chunk",
       "raw-reset", "raw-late-bad-chunk")  # fmt: skip


def _masked(key: str) -> str:
    """How OpenAI shows a wrong key in its 401: the start, stars, the last four."""
    return f"{key[:8]}{'*' * 20}{key[-4:]}"


def _echo(auth: str) -> str:
    key = auth.removeprefix("Bearer ")
    return f"Incorrect API key provided: {_masked(key)}. Sent: {auth!r}; key={key}."


@dataclass
class Leaky:
    """An OpenAI/vLLM-like upstream (ASGI, behaviour by model) that echoes what it got."""

    auth_seen: set[str] = field(default_factory=set)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        raw = await read_body(receive) or b""
        auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        self.auth_seen.add(auth)
        body = json.loads(raw) if raw else {}
        key = auth.removeprefix("Bearer ")
        headers = [
            (b"x-echo-authorization", auth.encode()),
            (b"www-authenticate", f'Bearer realm="{key}"'.encode()),
            (b"set-cookie", f"session={key}".encode()),
            (b"openai-organization", _masked(key).encode()),
        ]
        path = scope["path"]
        if path == "/v1/models":
            models = [{"id": name, "object": "model"} for name in ("base", "lora-leak")]
            await _send(send, 200, {"object": "list", "data": models}, headers)
        elif path == "/metrics":
            await _send(send, 200, f'# {auth}\nnot_metrics{{key="{key}"}} 1\n', headers)
        elif path == "/tokenize":
            await _send(send, 401, {"error": {"message": _echo(auth)}}, headers)
        elif path.endswith("_lora_adapter"):
            await _send(send, 400, f"bad adapter: {_echo(auth)}", headers)
        else:
            await self._answer(send, path, body, auth, headers)

    async def _answer(
        self, send: Any, path: str, body: dict[str, Any], auth: str, headers: list[Any]
    ) -> None:
        model, key = str(body.get("model")), auth.removeprefix("Bearer ")
        error = {"message": _echo(auth), "type": key, "param": auth, "code": _masked(key)}
        if model.startswith("e") and model[1:4].isdigit():
            status = int(model[1:4])
            if model.endswith("text"):
                await _send(send, status, _echo(auth), headers)
                return
            extra = [(b"retry-after", b"30")] if status == 429 else []
            await _send(send, status, {"error": error, "detail": auth}, headers + extra)
        elif model == "garbage":
            await _send(send, 200, f"not json {{{{ {_echo(auth)}", headers, "application/json")
        elif model == "garbage-list":
            await _send(send, 200, [auth, _masked(key)], headers)
        elif model == "slow":
            await asyncio.sleep(3)
            await _send(send, 200, {}, headers)
        elif body.get("stream") is True:
            await self._stream(send, model, error, headers)
        elif path == "/v1/embeddings":
            data = [{"object": "embedding", "index": 0, "embedding": [0.5, -0.5]}]
            usage = {"prompt_tokens": 3, "total_tokens": 3}
            await _send(send, 200, {"object": "list", "data": data, "usage": usage}, headers)
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": "A refund."}}
            answer: dict[str, Any] = {"id": "c1", "object": "chat.completion", "model": model}
            usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
            answer |= {"choices": [choice | {"finish_reason": "stop"}], "usage": usage}
            await _send(send, 200, answer, headers)

    async def _stream(
        self, send: Any, model: str, error: dict[str, Any], headers: list[Any]
    ) -> None:
        start = {"type": "http.response.start", "status": 200}
        sse = [(b"content-type", b"text/event-stream"), *headers]
        await send(start | {"headers": sse})

        async def event(data: Any, more: bool = True) -> None:
            payload = b"data: " + json.dumps(data).encode() + b"\n\n"
            await send({"type": "http.response.body", "body": payload, "more_body": more})

        chunk = {"id": "c1", "object": "chat.completion.chunk", "model": model}
        if model == "stream-first-error":
            await event({"error": error}, more=False)
            return
        for text in ("A ", "refund."):
            await event(chunk | {"choices": [{"index": 0, "delta": {"content": text}}]})
        if model == "stream-mid-error":
            await event({"error": error}, more=False)
            return
        await event(chunk | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
        await event(chunk | {"choices": [], "usage": usage})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


async def _send(
    send: Any, status: int, data: Any, headers: list[Any], kind: str | None = None
) -> None:
    if isinstance(data, str):
        payload, kind = data.encode(), kind or "text/plain"
    else:
        payload, kind = json.dumps(data).encode(), "application/json"
    all_headers = [(b"content-type", kind.encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": payload})


def _raw_answer(request: bytes) -> bytes | None:
    """Broken HTTP carrying the credentials it got, by the model in the request."""
    head, _, body = request.partition(b"\r\n\r\n")
    auth = next(
        (line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
         if line.lower().startswith(b"authorization:")),
        b"",
    )  # fmt: skip
    model = json.loads(body).get("model", "") if body.startswith(b"{") else ""
    ok = b"HTTP/1.1 200 OK\r\n"
    sse = b"Content-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    first = b'data: {"choices":[{"index":0,"delta":{"content":"A"}}]}\n\n'
    answers = {
        "raw-mirror": request,
        "raw-bad-header": ok + b"Content-Type: application/json\r\n" + auth + b"\r\n\r\n{}",
        "raw-bad-status": b"HTTP/1.1 2" + auth + b" OK\r\nContent-Length: 0\r\n\r\n",
        "raw-short-body": ok + b'Content-Length: 4096\r\n\r\n{"auth": "' + auth,
        "raw-bad-chunk": ok + b"Transfer-Encoding: chunked\r\n\r\n" + auth + b"\r\n",
        "raw-late-bad-chunk": ok + sse + b"%x\r\n" % len(first) + first + b"\r\n" + auth + b"\r\n",
    }
    return answers.get(model)  # None (raw-reset): the connection is reset


@dataclass
class Drive:
    """Every answer the gateway gave, and the request ids it named."""

    http: httpx.Client
    scanner: LeakScanner
    request_ids: list[str] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    redacted: int = 0

    def call(self, method: str, path: str, where: str, **kwargs: Any) -> httpx.Response:
        answer = self.http.request(method, path, **kwargs)
        self.look(where, answer)
        return answer

    def look(self, where: str, answer: httpx.Response) -> None:
        assert answer.status_code != 500, (where, answer.text)
        self.statuses[where] = answer.status_code
        self.scanner.scan(f"{where} body", answer.content)
        self.scanner.scan(f"{where} headers", repr(answer.headers.multi_items()))
        self.redacted += answer.text.count("[redacted]")
        if "x-request-id" in answer.headers:
            self.request_ids.append(answer.headers["x-request-id"])
        if answer.status_code >= 400 and "json" in answer.headers.get("content-type", ""):
            assert set(answer.json()["error"]) == {"message", "type", "param", "code"}


def _config(leaky: str, raw: str, state: dict[str, Any] | None, records: Path) -> dict[str, Any]:
    limits = {"connect": 1.0, "first_byte": 1.0, "idle": 1.0, "total": 2.0}
    quick = {"connect": 1.0, "first_byte": 0.3, "idle": 0.3, "total": 0.6}  # for `slow`
    hosted = {"kind": "openai", "api_key_env": "CANARY_PROVIDER_KEY", "timeouts": limits}
    variants: dict[str, Any] = {b: {"upstream": "hosted", "model": b} for b in HOSTED}
    variants["stream-mid-error"] = {"upstream": "hosted", "model": "stream-mid-error"}
    variants["slow"] = {"upstream": "hosted-slow", "model": "slow"}
    variants |= {b: {"upstream": "raw", "model": b} for b in RAW}
    variants |= {f"vllm-{b}": {"upstream": "vllm", "model": b} for b in ("ok", "e401", "e400")}
    variants["managed"] = {"upstream": "vllm-managed", "model": "lora-leak"}
    variants["prompted-vllm"] = {
        "upstream": "vllm-managed",
        "model": "base",
        "prompt": {"system": "You answer refunds.", "examples": [{"user": "a", "assistant": "b"}]},
    }
    routes: dict[str, Any] = {name: {"split": {name: 1}} for name in variants}
    routes["ok"]["feedback"] = [{"name": "resolved", "type": "bool"}]
    routes["shadowed"] = {"split": {"ok": 1}, "shadow": {"variant": "e401", "fraction": 1.0}}
    routes["fallen"] = {"split": {"e500": 1}, "fallback": ["e401", "ok"]}
    config: dict[str, Any] = {
        "admin_key_env": "TURNOUT_ADMIN_KEY",
        "upstreams": {
            "hosted": hosted | {"base_url": leaky + "/v1"},
            "raw": hosted | {"base_url": raw + "/v1"},
            "hosted-slow": hosted | {"base_url": leaky + "/v1", "timeouts": quick},
            "vllm": {
                "kind": "vllm",
                "urls": [leaky],
                "api_key_env": "CANARY_VLLM_KEY",
                "timeouts": limits,
                "scrape_metrics": True,
                "scrape_interval_s": 0.1,
            },
            "vllm-managed": {
                "kind": "vllm",
                "urls": [leaky],
                "api_key_env": "CANARY_VLLM_KEY",
                "timeouts": limits,
                "scrape_interval_s": 0.1,
                "serve": {"base_model": "base", "adapters": {"lora-leak": "/adapters/leak"}},
            },
        },
        "variants": variants,
        "routes": routes,
        "keys": [
            {
                "name": "app",
                "sha256": sha256(CLIENT_KEY),
                "rpm": 100_000,
                "tpm": 10_000_000,
                "budget": {"usd": 100.0, "per": "day"},
            }
        ],
        "records": {"file": str(records), "content": True},
    }
    if state is not None:
        config["state"] = state
    return config


@pytest.fixture(params=["memory", "redis"])
def state(request: pytest.FixtureRequest) -> dict[str, Any] | None:
    if request.param == "memory":
        return None
    server: RedisServer = request.getfixturevalue("redis_server")
    return {"redis_url": server.url, "key_prefix": request.getfixturevalue("prefix")}


@pytest.fixture
def upstreams() -> Iterator[tuple[Leaky, str, RawUpstream]]:
    leaky = Leaky()
    with serve_app(leaky) as url, RawUpstream(_raw_answer) as raw:
        yield leaky, url, raw


def test_no_piece_of_any_secret_leaks(
    upstreams: tuple[Leaky, str, RawUpstream], state: dict[str, Any] | None, tmp_path: Path
) -> None:
    leaky, leaky_url, raw = upstreams
    scanner = LeakScanner([PROVIDER_KEY, VLLM_KEY, CLIENT_KEY, ADMIN_KEY])
    records_file = tmp_path / "records.jsonl"
    settings, problems = check_settings(
        _config(leaky_url, raw.url, state, records_file), ENV, strict=True
    )
    assert settings is not None, problems
    with LogCapture() as logs:
        app = create_app(settings, ENV)
        server = serve_app(app, lifespan="on", log_level="debug", access_log=True, log_config=None)
        with server as url, httpx.Client(base_url=url, timeout=10) as http:
            drive = Drive(http, scanner)
            _drive(drive, url)
        time.sleep(0.1)  # the upstreams' last log lines

    # The canaries were in play: the upstreams got them, and echoed them back to be scrubbed.
    assert f"Bearer {PROVIDER_KEY}" in leaky.auth_seen
    assert f"Bearer {VLLM_KEY}" in leaky.auth_seen
    assert all(PROVIDER_KEY.encode() in r for r in raw.requests) and len(raw.requests) >= len(RAW)
    assert drive.redacted >= 6, "the upstreams' echoes should have reached the scrubber"
    assert drive.statuses["unary e401"] == 502 and drive.statuses["unary e400"] == 400

    for number, line in enumerate(logs.lines):
        scanner.scan(f"log line {number}", line)
    assert len(logs.lines) > 50, "DEBUG logging should have produced lines to look at"
    assert any("uvicorn.access" in line for line in logs.lines)
    for number, line in enumerate(records_file.read_text().splitlines()):
        scanner.scan(f"records file line {number}", line)
    if state is not None:
        dumped = asyncio.run(_redis_values(state["redis_url"], state["key_prefix"]))
        assert any(key.endswith("records") for key, _ in dumped)
        for key, value in dumped:
            scanner.scan(f"redis {key}", value)
    scanner.assert_clean()


def _drive(drive: Drive, url: str) -> None:
    call = drive.call

    def chat(where: str, model: str, headers: dict[str, str]) -> httpx.Response:
        body = {"model": model, "messages": USER}
        return call("POST", "/v1/chat/completions", where, json=body, headers=headers)

    for model, status in [*HOSTED.items(), *((m, 502) for m in RAW)]:
        answer = chat(f"unary {model}", model, CLIENT)
        expected = 200 if model.startswith("stream-") else status
        assert answer.status_code == expected, (model, answer.text)
        for usage in (False, True):
            body = {"model": model, "messages": USER, "stream": True}
            body |= {"stream_options": {"include_usage": True}} if usage else {}
            with drive.http.stream("POST", "/v1/chat/completions", json=body, headers=CLIENT) as s:
                s.read()
                drive.look(f"stream {model} usage={usage}", s)
                late = model == "raw-late-bad-chunk"
                assert s.status_code == (200 if late else status), (model, s.text)
                if late:
                    assert '"error"' in s.text and "[DONE]" not in s.text
    routes = ("vllm-ok", "vllm-e401", "vllm-e400", "managed", "prompted-vllm", "shadowed")
    for route in (*routes, "fallen"):
        chat(f"route {route}", route, CLIENT)
    for model in ("ok", "e401", "e400", "garbage", "raw-mirror"):
        body = {"model": model, "prompt": "refund?"}
        call("POST", "/v1/completions", f"completion {model}", json=body, headers=CLIENT)
        body = {"model": model, "input": "refund?"}
        call("POST", "/v1/embeddings", f"embedding {model}", json=body, headers=CLIENT)

    # Wrong and misplaced keys: near misses, the admin key as a client key and back.
    near = CLIENT_KEY[:-1] + ("X" if CLIENT_KEY[-1] != "X" else "Y")
    for where, auth in [
        ("near-miss client", f"Bearer {near}"),
        ("admin as client", ADMIN["authorization"]),
        ("raw client key", CLIENT_KEY),
        ("basic", f"Basic {CLIENT_KEY}"),
    ]:
        assert chat(where, "ok", {"authorization": auth}).status_code == 401
    near_admin = {"authorization": f"Bearer {ADMIN_KEY[:-1]}x"}
    for where, headers in [("near-miss admin", near_admin), ("client as admin", CLIENT)]:
        assert call("GET", "/turnout/report", where, headers=headers).status_code == 403
    assert chat("forced by client", "ok", CLIENT | {"x-turnout-variant": "ok"}).status_code == 403
    for target, odd in [
        (b"POST /v1/chat/completions", b"Bearer " + CLIENT_KEY.encode() + b"\xff"),
        (b"GET /turnout/keys", b"Bearer " + ADMIN_KEY.encode() + b"\xc3\xa9"),
    ]:
        reply = raw_http(url, target, [b"Host: t", b"Authorization: " + odd], b"{}")
        assert reply.status in (401, 403), reply.raw
        drive.scanner.scan(f"raw {target!r}", reply.raw)

    # A run-time key: its token is shown once, by its creation, and never again.
    created = drive.http.post("/turnout/keys", json={"name": "rt", "rpm": 1000}, headers=ADMIN)
    assert created.status_code == 201, created.text
    token = created.json()["key"]
    drive.scanner.add(token.removeprefix("sk-turnout-"))
    for model in ("ok", "e401"):
        chat(f"runtime key {model}", model, {"authorization": f"Bearer {token}"})

    # Feedback, an adapter load the upstream answers with an echo, then everything readable.
    ok_id = drive.request_ids[0]  # the first call: `ok`
    note = {"request_id": ok_id, "metric": "resolved", "value": True, "comment": "thanks"}
    call("POST", "/turnout/feedback", "feedback", json=note, headers=CLIENT)
    load = {"upstream": "vllm-managed", "name": "lora-leak"}
    assert (
        call("POST", "/turnout/adapters", "adapter load", json=load, headers=ADMIN).status_code
        == 502
    )
    time.sleep(0.3)  # shadows and settlements finish, the scraper fails a few times
    for request_id in sorted(set(drive.request_ids)):
        call("GET", f"/turnout/requests/{request_id}", f"record {request_id}", headers=ADMIN)
    readable = ("/turnout/report", "/turnout/report?format=html", "/turnout/keys", "/metrics")
    for path in (*readable, "/readyz", "/healthz", "/v1/models"):
        headers = CLIENT if path == "/v1/models" else ADMIN
        assert call("GET", path, path, headers=headers).status_code == 200


async def _redis_values(redis_url: str, prefix: str) -> list[tuple[str, bytes]]:
    client = connect_redis(redis_url)
    try:
        return await redis_dump(client, prefix)
    finally:
        await client.aclose()


def test_an_error_event_after_the_first_is_scrubbed(
    upstreams: tuple[Leaky, str, RawUpstream], tmp_path: Path
) -> None:
    _, leaky_url, raw = upstreams
    settings, problems = check_settings(
        _config(leaky_url, raw.url, None, tmp_path / "records.jsonl"), ENV, strict=True
    )
    assert settings is not None, problems
    scanner = LeakScanner([PROVIDER_KEY])
    body = {"model": "stream-mid-error", "messages": USER, "stream": True}
    with serve_app(create_app(settings, ENV), lifespan="on") as url:
        answer = httpx.post(url + "/v1/chat/completions", json=body, headers=CLIENT, timeout=10)
    assert answer.status_code == 200
    assert '"error"' in answer.text and "[DONE]" not in answer.text
    assert "[redacted]" in answer.text  # the echo arrived, scrubbed
    scanner.scan("mid-stream error event", answer.text)
    scanner.assert_clean()
