"""The OpenAI surface through Turnout, driven by the real `openai` client against fake upstreams."""

from __future__ import annotations

import concurrent.futures

import httpx
import openai

from tests.fakes import OK_TEXT, PROMPT_TOKENS, Recorder
from tests.integration.conftest import PROMPT, UPSTREAM_KEY

USER = [{"role": "user", "content": "hi"}]


def test_chat_non_streaming_returns_upstream_answer_and_headers(
    client: openai.OpenAI, recorder: Recorder
) -> None:
    raw = client.chat.completions.with_raw_response.create(model="ok", messages=USER)
    completion = raw.parse()
    assert completion.choices[0].message.content == OK_TEXT
    assert completion.usage is not None and completion.usage.prompt_tokens == PROMPT_TOKENS
    assert raw.headers["x-turnout-route"] == "ok"
    assert raw.headers["x-turnout-variant"] == "ok"
    assert raw.headers["x-request-id"].startswith("req_")
    assert float(raw.headers["x-turnout-cost-usd"]) == 0.0
    assert recorder.last().path == "/v1/chat/completions"


def test_client_request_id_is_kept(url: str) -> None:
    response = httpx.post(
        url + "/v1/chat/completions",
        json={"model": "ok", "messages": USER},
        headers={"x-request-id": "trace-42"},
    )
    assert response.headers["x-request-id"] == "trace-42"
    bad = httpx.post(
        url + "/v1/chat/completions",
        json={"model": "ok", "messages": USER},
        headers={"x-request-id": "x" * 200},
    )
    assert bad.headers["x-request-id"] != "x" * 200


def test_unknown_fields_reach_upstream_unchanged_and_keys_are_swapped(
    client: openai.OpenAI, recorder: Recorder
) -> None:
    extra = {"top_k": 5, "guided_json": {"type": "object"}, "vendor_thing": [1, {"a": None}]}
    client.chat.completions.create(
        model="ok", messages=USER, temperature=0.3, seed=7, extra_body=extra
    )
    sent = recorder.last()
    for name, value in extra.items():
        assert sent.json[name] == value
    assert sent.json["temperature"] == 0.3 and sent.json["seed"] == 7
    assert sent.json["messages"] == USER
    assert "stream_options" not in sent.json
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


def test_fine_tuned_variant_gets_its_model_name(client: openai.OpenAI, recorder: Recorder) -> None:
    raw = client.chat.completions.with_raw_response.create(model="ft", messages=USER)
    assert raw.headers["x-turnout-variant"] == "ft"
    sent = recorder.last()
    assert sent.json["model"] == "ok"
    assert "authorization" not in sent.headers  # the client's key is never forwarded


def test_prompted_variant_messages_reach_upstream_in_order(
    client: openai.OpenAI, recorder: Recorder
) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where is my refund?"},
        {"role": "assistant", "content": "Checking."},
        {"role": "user", "content": "Thanks"},
    ]
    raw = client.chat.completions.with_raw_response.create(model="prompted", messages=messages)
    sent = recorder.last().json["messages"]
    assert sent == [
        {"role": "system", "content": PROMPT["system"] + "\n\nBe brief."},
        {"role": "user", "content": "I was charged twice"},
        {"role": "assistant", "content": "billing"},
        {"role": "user", "content": "The app crashes"},
        {"role": "assistant", "content": "bug"},
        *messages[1:],
    ]
    # Priced variant: the fake reports 7 prompt and 3 completion tokens at $1 / $2 per Mtok.
    assert float(raw.headers["x-turnout-cost-usd"]) == pytest_approx((7 * 1 + 3 * 2) / 1e6)


def pytest_approx(value: float) -> object:
    import pytest

    return pytest.approx(value, rel=1e-6)


def test_prompted_completion_prompt_is_framed(client: openai.OpenAI, recorder: Recorder) -> None:
    client.completions.create(model="prompted", prompt="Where is my refund?")
    assert recorder.last().json["prompt"] == (
        "You classify tickets.\n\n"
        "User: I was charged twice\nAssistant: billing\n\n"
        "User: The app crashes\nAssistant: bug\n\n"
        "User: Where is my refund?\nAssistant:"
    )


def test_token_array_prompt_on_prompted_variant_is_400(client: openai.OpenAI) -> None:
    try:
        client.completions.create(model="prompted", prompt=[1, 2, 3])
    except openai.BadRequestError as exc:
        assert exc.status_code == 400
        assert exc.body is not None and "token-array" in exc.body["message"]  # type: ignore[index]
    else:
        raise AssertionError("expected a 400")


def test_completions_and_embeddings(client: openai.OpenAI, recorder: Recorder) -> None:
    completion = client.completions.create(model="ok", prompt="Say hi", max_tokens=5)
    assert completion.choices[0].text == OK_TEXT
    embedding = client.embeddings.create(model="ok", input=["a", "b"])
    assert len(embedding.data) == 2 and len(embedding.data[0].embedding) == 2
    assert recorder.last().path == "/v1/embeddings"
    assert recorder.last().json["encoding_format"] == "base64"


def test_models_lists_routes(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"ok", "prompted", "split", "ft"} <= ids


def test_sticky_user_always_gets_the_same_variant(client: openai.OpenAI) -> None:
    seen: dict[str, set[str]] = {}
    for i in range(40):
        user = f"user-{i % 8}"
        raw = client.chat.completions.with_raw_response.create(
            model="split", messages=USER, user=user
        )
        seen.setdefault(user, set()).add(raw.headers["x-turnout-variant"])
    assert all(len(variants) == 1 for variants in seen.values())
    assert set().union(*seen.values()) == {"ft", "prompted"}


def test_sticky_by_header(url: str) -> None:
    variants = set()
    for _ in range(6):
        response = httpx.post(
            url + "/v1/chat/completions",
            json={"model": "split-header", "messages": USER},
            headers={"x-tenant": "acme"},
        )
        variants.add(response.headers["x-turnout-variant"])
    assert len(variants) == 1


def test_vllm_requests_spread_over_replicas(url: str, recorder: Recorder) -> None:
    body = {"model": "ft-slow", "messages": USER}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(
            pool.map(
                lambda _: httpx.post(url + "/v1/chat/completions", json=body, timeout=10), range(4)
            )
        )
    hosts = [r.headers["host"] for r in recorder.received]
    assert len(set(hosts)) == 2 and hosts.count(hosts[0]) == 2


def test_request_record_needs_admin_key(url: str) -> None:
    from tests.integration.conftest import ADMIN_KEY

    response = httpx.post(
        url + "/v1/chat/completions", json={"model": "prompted", "messages": USER}
    )
    request_id = response.headers["x-request-id"]
    path = f"{url}/turnout/requests/{request_id}"
    assert httpx.get(path).status_code == 403
    assert httpx.get(path, headers={"authorization": "Bearer nope"}).status_code == 403
    record = httpx.get(path, headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()
    assert record["variant"] == "prompted" and record["status"] == 200
    assert record["usage"]["prompt"] == PROMPT_TOKENS and record["usage"]["injected"] > 0


def test_health_and_readiness(url: str) -> None:
    assert httpx.get(url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(url + "/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
