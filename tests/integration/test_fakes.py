"""Self-tests of the fake OpenAI-compatible upstream, served over a real socket."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.fakes import ERRORS, OK_TEXT, SECRET, Recorder, create_fake_upstream
from tests.servers import serve_app

USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[str, Recorder]]:
    app, recorder = create_fake_upstream()
    with serve_app(app) as base_url:
        yield base_url, recorder


@pytest.fixture
def recorder(upstream: tuple[str, Recorder]) -> Recorder:
    upstream[1].clear()
    return upstream[1]


@pytest.fixture
async def client(upstream: tuple[str, Recorder]) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=upstream[0], trust_env=False, timeout=5) as client:
        yield client


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def events(body: bytes) -> list[bytes]:
    """SSE frames without their `data: ` prefix; the body must end with a blank line."""
    assert body.endswith(b"\n\n")
    frames = body[:-2].split(b"\n\n")
    assert all(frame.startswith(b"data: ") for frame in frames)
    return [frame.removeprefix(b"data: ") for frame in frames]


def chunks(body: bytes) -> list[dict[str, Any]]:
    frames = events(body)
    assert frames[-1] == b"[DONE]"
    return [json.loads(frame) for frame in frames[:-1]]


def chat_text(parsed: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") for c in parsed if c["choices"])


async def test_ok_chat_records_the_request(client: httpx.AsyncClient, recorder: Recorder) -> None:
    headers = {"Authorization": "Bearer sk-upstream", "X-Custom": "1"}
    response = await client.post("/v1/chat/completions", json=chat("ok"), headers=headers)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    answer = response.json()
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": OK_TEXT}
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"] == USAGE
    seen = recorder.last()
    assert (seen.method, seen.path) == ("POST", "/v1/chat/completions")
    assert seen.headers["authorization"] == "Bearer sk-upstream"
    assert seen.headers["x-custom"] == "1"
    assert seen.body == response.request.content
    assert seen.json == chat("ok")
    assert recorder.disconnects == []


async def test_unknown_model_answers_like_ok_on_completions(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/completions", json={"model": "whatever", "prompt": "x"})
    answer = response.json()
    assert answer["object"] == "text_completion"
    assert answer["model"] == "whatever"
    assert answer["choices"][0]["text"] == OK_TEXT
    assert answer["usage"] == USAGE


async def test_ok_stream_with_usage_ends_like_vllm(
    client: httpx.AsyncClient, recorder: Recorder
) -> None:
    body = chat("ok", stream=True, stream_options={"include_usage": True})
    response = await client.post("/v1/chat/completions", json=body)
    assert response.headers["content-type"] == "text/event-stream"
    parsed = chunks(response.content)
    assert [c["choices"][0]["delta"].get("content") for c in parsed[:3]] == [
        "Hel",
        "lo from ",
        "fake",
    ]
    assert parsed[-2]["choices"][0]["finish_reason"] == "stop"
    assert parsed[-1]["choices"] == []
    assert parsed[-1]["usage"] == USAGE
    assert chat_text(parsed) == OK_TEXT
    assert recorder.disconnects == []


async def test_ok_stream_without_usage_and_text_completions(client: httpx.AsyncClient) -> None:
    body = {"model": "ok", "prompt": "x", "stream": True}
    parsed = chunks((await client.post("/v1/completions", json=body)).content)
    assert all("usage" not in c for c in parsed)
    assert "".join(c["choices"][0]["text"] for c in parsed) == OK_TEXT
    assert parsed[-1]["choices"][0]["finish_reason"] == "stop"


async def test_no_usage_ignores_include_usage(client: httpx.AsyncClient) -> None:
    body = chat("no-usage", stream=True, stream_options={"include_usage": True})
    parsed = chunks((await client.post("/v1/chat/completions", json=body)).content)
    assert all("usage" not in c and c["choices"] for c in parsed)
    assert chat_text(parsed) == OK_TEXT


async def test_echo_answers_with_the_body_it_received(client: httpx.AsyncClient) -> None:
    body = chat("echo", top_k=3, guided_json={"type": "object"})
    response = await client.post("/v1/chat/completions", json=body)
    content = response.json()["choices"][0]["message"]["content"]
    assert content == response.request.content.decode()
    assert json.loads(content) == body


@pytest.mark.parametrize("status", sorted(ERRORS))
async def test_error_models(client: httpx.AsyncClient, status: int) -> None:
    for path in ("/v1/chat/completions", "/v1/embeddings"):
        response = await client.post(path, json=chat(f"error-{status}", stream=True))
        assert response.status_code == status
        assert response.headers["content-type"] == "application/json"
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert ("retry-after" in response.headers) == (status == 429)
    if status == 400:
        assert error == {
            "message": f"bad field foo; key {SECRET} leaked",
            "type": "invalid_request_error",
            "param": "foo",
            "code": None,
        }
    if status == 429:
        assert response.headers["retry-after"] == "7"


async def test_garbage_is_not_json(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json=chat("garbage"))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.content == b"not json{{"


async def test_stream_garbage(client: httpx.AsyncClient) -> None:
    first = await client.post("/v1/chat/completions", json=chat("stream-garbage", stream=True))
    assert first.headers["content-type"] == "text/event-stream"
    assert first.content == b"data: {broken\n\ndata: [DONE]\n\n"
    late = await client.post("/v1/chat/completions", json=chat("stream-garbage-late", stream=True))
    frames = events(late.content)
    assert json.loads(frames[0])["choices"][0]["delta"]["content"] == "Hel"
    assert frames[1] == b"{broken"
    assert frames[-1] == b"[DONE]"


async def test_stream_cut_ends_without_done(client: httpx.AsyncClient) -> None:
    body = chat("stream-cut", stream=True, stream_options={"include_usage": True})
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    parsed = [json.loads(frame) for frame in events(response.content)]
    assert chat_text(parsed) == "Hello from "
    assert all(c["choices"][0]["finish_reason"] is None for c in parsed)


async def test_stream_reset_breaks_the_connection(client: httpx.AsyncClient) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        await client.post("/v1/chat/completions", json=chat("stream-reset", stream=True))


async def test_sliced_stream_carries_the_ok_events(client: httpx.AsyncClient) -> None:
    ok = await client.post("/v1/chat/completions", json=chat("ok", stream=True))
    sliced = await client.post("/v1/chat/completions", json=chat("sliced", stream=True))
    assert sliced.content == ok.content.replace(b'"model":"ok"', b'"model":"sliced"')
    plain = await client.post("/v1/completions", json={"model": "sliced", "prompt": "x"})
    assert plain.json()["choices"][0]["text"] == OK_TEXT


async def test_no_trailing_newline(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/chat/completions", json=chat("no-trailing-newline", stream=True)
    )
    assert response.content.endswith(b"\n\ndata: [DONE]")
    assert (
        chat_text([json.loads(f) for f in events(response.content[: -len(b"data: [DONE]")])])
        == OK_TEXT
    )


async def test_slow_first_token_waits_before_headers(client: httpx.AsyncClient) -> None:
    started = time.monotonic()
    async with client.stream(
        "POST", "/v1/chat/completions", json=chat("slow-first-token", stream=True)
    ) as response:
        assert time.monotonic() - started >= 1.9
        parsed = chunks(await response.aread())
    assert chat_text(parsed) == OK_TEXT


async def test_stream_slow_notices_an_early_close(
    client: httpx.AsyncClient, recorder: Recorder
) -> None:
    body = chat("stream-slow", stream=True)
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        async for _ in response.aiter_bytes():
            break
    closed = time.monotonic()
    noticed = await asyncio.to_thread(recorder.wait_disconnect, "stream-slow", 2.0)
    assert noticed is not None
    assert noticed - closed < 0.5


async def test_hang_notices_the_client_giving_up(
    client: httpx.AsyncClient, recorder: Recorder
) -> None:
    with pytest.raises(httpx.ReadTimeout):
        await client.post("/v1/chat/completions", json=chat("hang"), timeout=0.3)
    gave_up = time.monotonic()
    noticed = await asyncio.to_thread(recorder.wait_disconnect, "hang", 2.0)
    assert noticed is not None
    assert noticed - gave_up < 0.5
    assert recorder.last().json == chat("hang")


@pytest.mark.parametrize("encoding", ["float", "base64"])
async def test_embeddings(client: httpx.AsyncClient, encoding: str) -> None:
    body = {"model": "ok", "input": ["a", "b"], "encoding_format": encoding}
    answer = (await client.post("/v1/embeddings", json=body)).json()
    vectors = [item["embedding"] for item in answer["data"]]
    if encoding == "base64":
        vectors = [list(struct.unpack("<2f", base64.b64decode(v))) for v in vectors]
    assert vectors == [[0.25, -0.5], [1.25, -0.5]]
    assert answer["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    single = await client.post("/v1/embeddings", json={"model": "ok", "input": [1, 2, 3]})
    assert len(single.json()["data"]) == 1


async def test_models_and_unknown_paths(client: httpx.AsyncClient) -> None:
    models = (await client.get("/v1/models")).json()
    assert "ok" in [m["id"] for m in models["data"]]
    missing = await client.get("/v1/nope")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/json"
    assert "message" in missing.json()["error"]
    bad = await client.post("/v1/chat/completions", content=b"[1]")
    assert bad.status_code == 400


async def test_openai_client_reads_the_fake(
    upstream: tuple[str, Recorder], recorder: Recorder
) -> None:
    async with openai.AsyncOpenAI(base_url=f"{upstream[0]}/v1", api_key="sk-upstream") as sdk:
        answer = await sdk.chat.completions.create(
            model="ok", messages=[{"role": "user", "content": "hi"}]
        )
        stream = await sdk.chat.completions.create(
            model="ok",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        parts = [chunk async for chunk in stream]
    assert answer.choices[0].message.content == OK_TEXT
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == OK_TEXT
    assert parts[-1].usage is not None and parts[-1].usage.completion_tokens == 3
    assert recorder.last().headers["authorization"] == "Bearer sk-upstream"


def test_recorder_basics() -> None:
    recorder = Recorder()
    with pytest.raises(AssertionError):
        recorder.last()
    started = time.monotonic()
    assert recorder.wait_disconnect("x", 0.05) is None
    assert time.monotonic() - started >= 0.05
    recorder.note_disconnect("x")
    assert recorder.wait_disconnect("x", 0.0) == recorder.disconnects[0][1]
    recorder.clear()
    assert recorder.disconnects == []
