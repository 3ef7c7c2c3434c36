"""Turnout in front of a real vLLM (CPU build, tiny random Llama, LoRA adapters), driven with
the real `openai` client: a fine-tuned vs prompted split, token accounting checked against
vLLM's own usage and `/metrics` counters, replica choice from real `/metrics`, and LoRA
adapters loaded and unloaded at run time through `/turnout/adapters`."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from gateway.app import TurnoutApp
from router.vllm_metrics import parse_samples
from tests.fakes import create_fake_upstream
from tests.integration.conftest import ADMIN_KEY, PROMPT, running
from tests.servers import serve_app
from tests.vllm.conftest import BASE_NAME, RealVllm

pytestmark = pytest.mark.vllm

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
MAX_TOKENS = 8
MESSAGES = [{"role": "user", "content": "Where is my refund for the order I sent back?"}]
TIMEOUTS = {"connect": 5.0, "first_byte": 60.0, "idle": 60.0, "total": 120.0}
PROMPT_TOTAL = "vllm:prompt_tokens_total"
GENERATION_TOTAL = "vllm:generation_tokens_total"
LATE = "other-lora"  # declared with at_start: false, so not on the server until loaded


@dataclass(frozen=True)
class Answer:
    variant: str
    request_id: str
    prompt_tokens: int  # vLLM's own usage, as the client got it
    completion_tokens: int
    text: str


def gateway_config(vllm: RealVllm) -> dict[str, Any]:
    return {
        "admin_key_env": "TURNOUT_ADMIN_KEY",
        "upstreams": {
            "vllm": {
                "kind": "vllm",
                "urls": [vllm.url],
                "serve": vllm.serve,
                "scrape_interval_s": 0.2,
                "timeouts": TIMEOUTS,
            }
        },
        "variants": {
            "ft": {"upstream": "vllm", "model": "support-lora"},
            "prompted": {
                "upstream": "vllm",
                "model": BASE_NAME,
                "prompt": PROMPT,
                "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0},
            },
            "other": {"upstream": "vllm", "model": LATE},
        },
        "routes": {
            "support": {"split": {"ft": 50, "prompted": 50}, "sticky": "user"},
            "other": {"split": {"other": 1}, "fallback": ["prompted"]},
        },
    }


def unload_directly(vllm: RealVllm, name: str) -> None:
    """Unload `name` on vLLM itself (not loaded: fine), so tests never share that state."""
    response = httpx.post(vllm.url + "/v1/unload_lora_adapter", json={"lora_name": name})
    assert response.status_code in (200, 400, 404), response.text


def vllm_models(vllm: RealVllm) -> dict[str, str | None]:
    """Served name -> parent, as vLLM lists them."""
    data = httpx.get(vllm.url + "/v1/models").json()["data"]
    return {m["id"]: m.get("parent") for m in data}


@pytest.fixture(scope="module")
def gateway(real_vllm: RealVllm) -> Iterator[tuple[str, TurnoutApp]]:
    unload_directly(real_vllm, LATE)
    with running(gateway_config(real_vllm)) as served:
        yield served


@pytest.fixture(scope="module")
def client(gateway: tuple[str, TurnoutApp]) -> Iterator[openai.OpenAI]:
    url = gateway[0]
    with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60) as client:
        yield client


def chat(client: openai.OpenAI, route: str, user: str, *, stream: bool = False) -> Answer:
    """One chat request of exactly MAX_TOKENS tokens through Turnout."""
    options: dict[str, Any] = {
        "model": route,
        "messages": MESSAGES,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "user": user,
        "extra_body": {"ignore_eos": True},
    }
    if stream:
        options |= {"stream": True, "stream_options": {"include_usage": True}}
    with client.chat.completions.with_streaming_response.create(**options) as response:
        assert response.status_code == 200
        headers = response.headers
        if stream:
            chunks = list(response.parse())
            last = chunks[-1]
            assert last.choices == [] and last.usage is not None  # vLLM's usage-only chunk
            assert all(c.usage is None for c in chunks[:-1])
            usage = last.usage
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices]
            assert finish[-1] == "length"
        else:
            completion = response.parse()
            assert completion.usage is not None
            usage = completion.usage
            text = completion.choices[0].message.content or ""
            assert completion.choices[0].finish_reason == "length"
    assert usage.completion_tokens == MAX_TOKENS
    assert text.replace("\n", "").isprintable(), text
    return Answer(
        variant=headers["x-turnout-variant"],
        request_id=headers["x-request-id"],
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        text=text,
    )


def record(url: str, request_id: str) -> dict[str, Any]:
    """Turnout's record of a request (written right after the answer; waited for briefly)."""
    deadline = time.monotonic() + 5.0
    while True:
        response = httpx.get(f"{url}/turnout/requests/{request_id}", headers=ADMIN)
        if response.status_code == 200:
            body: dict[str, Any] = response.json()
            return body
        assert response.status_code == 404, response.text
        assert time.monotonic() < deadline, f"no record for {request_id}"
        time.sleep(0.02)


def counters(url: str, names: tuple[str, ...], **labels: str) -> dict[str, float]:
    """Sums of the named series on a Prometheus page (samples with all `labels`)."""
    text = httpx.get(url + "/metrics").text
    totals = dict.fromkeys(names, 0.0)
    seen: set[str] = set()
    for sample in parse_samples(text.splitlines()):
        if sample.name in totals and labels.items() <= sample.labels.items():
            totals[sample.name] += sample.value
            seen.add(sample.name)
    assert seen == set(names), f"missing from {url}/metrics: {set(names) - seen}"
    return totals


def vllm_counters(vllm: RealVllm) -> dict[str, float]:
    return counters(vllm.url, (PROMPT_TOTAL, GENERATION_TOTAL))


def turnout_tokens(url: str) -> dict[str, float]:
    """turnout_tokens_total by kind (prompt, injected, completion) over every series."""
    return {
        kind: counters(url, ("turnout_tokens_total",), kind=kind)["turnout_tokens_total"]
        for kind in ("prompt", "injected", "completion")
    }


def users_by_variant(client: openai.OpenAI) -> dict[str, str]:
    """A user that the sticky split sends to each variant of `support` (found by asking)."""
    found: dict[str, str] = {}
    for i in range(40):
        user = f"user-{i}"
        answer = chat(client, "support", user)
        found.setdefault(answer.variant, user)
        if len(found) == 2:
            return found
    raise AssertionError(f"40 users all went to {set(found)}")


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not in {timeout} s: {what}"
        time.sleep(0.05)


def readyz(url: str) -> dict[str, Any]:
    response = httpx.get(url + "/readyz")
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def test_vllm_runs_the_command_turnout_builds(real_vllm: RealVllm) -> None:
    """The launch flags took: base model under its served name, the at-start adapter only, and
    the adapter changes what the model says."""
    assert vllm_models(real_vllm) == {BASE_NAME: None, "support-lora": BASE_NAME}
    texts = []
    for model in (BASE_NAME, "support-lora"):
        body = {"model": model, "messages": MESSAGES, "max_tokens": 16, "temperature": 0}
        response = httpx.post(real_vllm.url + "/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        texts.append(response.json()["choices"][0]["message"]["content"])
    assert texts[0] != texts[1]


def test_split_answers_from_both_variants_with_vllm_usage_recorded(
    gateway: tuple[str, TurnoutApp], client: openai.OpenAI, real_vllm: RealVllm
) -> None:
    url, _ = gateway
    # The client's own messages, straight to vLLM: what the prompted variant adds is exactly
    # the difference (Turnout counts it at start with vLLM's /tokenize, the model's template).
    direct = {"model": BASE_NAME, "messages": MESSAGES, "max_tokens": 1}
    own = httpx.post(real_vllm.url + "/v1/chat/completions", json=direct, timeout=60)
    own_prompt = own.json()["usage"]["prompt_tokens"]
    users = users_by_variant(client)
    assert set(users) == {"ft", "prompted"}
    for variant, user in users.items():
        for stream in (False, True):
            answer = chat(client, "support", user, stream=stream)
            assert answer.variant == variant  # sticky by user
            rec = record(url, answer.request_id)
            assert (rec["variant"], rec["stream"], rec["status"]) == (variant, stream, 200)
            usage = rec["usage"]
            assert usage["prompt"] == answer.prompt_tokens
            assert usage["completion"] == answer.completion_tokens == MAX_TOKENS
            assert not usage.get("estimated", False)
            if variant == "prompted":
                assert usage["injected"] == answer.prompt_tokens - own_prompt > 0
            else:
                assert usage.get("injected", 0) == 0


def test_vllm_counters_match_recorded_tokens(
    gateway: tuple[str, TurnoutApp], client: openai.OpenAI, real_vllm: RealVllm
) -> None:
    url, _ = gateway
    users = users_by_variant(client)
    vllm_before, turnout_before = vllm_counters(real_vllm), turnout_tokens(url)
    answers = [
        chat(client, "support", users[variant], stream=stream)
        for variant in ("ft", "prompted", "ft", "prompted")
        for stream in (False, True)
    ]
    records = [record(url, a.request_id) for a in answers]
    prompt = sum(r["usage"]["prompt"] for r in records)
    injected = sum(r["usage"].get("injected", 0) for r in records)
    completion = sum(r["usage"]["completion"] for r in records)
    assert completion == MAX_TOKENS * len(answers)
    assert prompt == sum(a.prompt_tokens for a in answers)
    assert injected > 0

    expected = {PROMPT_TOTAL: prompt, GENERATION_TOTAL: completion}

    def vllm_delta() -> dict[str, float]:
        after = vllm_counters(real_vllm)
        return {name: after[name] - vllm_before[name] for name in after}

    wait_for(lambda: vllm_delta() == expected, 5.0, f"vLLM counters {vllm_delta()} {expected}")
    turnout_after = turnout_tokens(url)
    delta = {kind: turnout_after[kind] - turnout_before[kind] for kind in turnout_after}
    # Injected tokens are counted apart: the client's own + injected = what vLLM was sent.
    assert delta == {"prompt": prompt - injected, "injected": injected, "completion": completion}
    for answer, rec in zip(answers, records, strict=True):
        usage = rec["usage"]
        own = usage["prompt"] - usage.get("injected", 0)
        assert own + usage.get("injected", 0) == answer.prompt_tokens
        assert (usage.get("injected", 0) > 0) == (answer.variant == "prompted")
    # The same client messages cost more prompt tokens on the prompted variant.
    by_variant = {a.variant: a.prompt_tokens for a in answers}
    assert by_variant["prompted"] > by_variant["ft"]


def metrics_page_busy() -> str:
    """A vLLM-shaped /metrics page of a replica with a long queue."""
    labels = 'engine="0",model_name="other"'
    return (
        f"vllm:num_requests_running{{{labels}}} 8.0\n"
        f"vllm:num_requests_waiting{{{labels}}} 30.0\n"
        f"vllm:kv_cache_usage_perc{{{labels}}} 0.9\n"
    )


def fake_replica() -> tuple[Any, Any]:
    """tests/fakes.py's upstream plus a busy vLLM /metrics page."""
    app, recorder = create_fake_upstream()
    page = metrics_page_busy().encode()

    async def with_metrics(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/metrics":
            while (await receive()).get("more_body"):
                pass
            headers = [(b"content-type", b"text/plain; version=0.0.4")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": page})
        else:
            await app(scope, receive, send)

    return with_metrics, recorder


@contextlib.contextmanager
def long_request(vllm: RealVllm) -> Iterator[None]:
    """A streamed LoRA request kept running on vLLM (straight to it, in a thread) until the
    block ends; then the thread hangs up, which makes vLLM abort it."""
    body = {"model": "support-lora", "messages": MESSAGES, "max_tokens": 480, "stream": True}
    body |= {"ignore_eos": True}
    done = threading.Event()
    errors: list[BaseException] = []

    def send() -> None:
        try:
            url = vllm.url + "/v1/chat/completions"
            with httpx.stream("POST", url, json=body, timeout=60) as response:
                for _ in response.iter_lines():
                    if done.is_set():
                        return
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(60)
        assert not thread.is_alive() and not errors, errors


def test_replica_choice_reads_real_vllm_metrics(real_vllm: RealVllm) -> None:
    fake, recorder = fake_replica()
    with serve_app(fake) as fake_url:
        config = {
            "admin_key_env": "TURNOUT_ADMIN_KEY",
            "upstreams": {
                "pair": {
                    "kind": "vllm",
                    "urls": [real_vllm.url, fake_url],
                    "scrape_metrics": True,
                    # Loads stay fresh for 3 intervals: long enough for a busy CPU's scrapes.
                    "scrape_interval_s": 0.5,
                    "timeouts": TIMEOUTS,
                }
            },
            "variants": {"pair-ft": {"upstream": "pair", "model": "support-lora"}},
            "routes": {"pair": {"split": {"pair-ft": 1}}},
        }
        with running(config) as (url, app):
            upstream = app.gateway.upstreams["pair"]
            wait_for(lambda: None not in upstream.loads, 10.0, "first scrapes")
            real = upstream.loads[0]
            assert real is not None
            assert (real.running, real.waiting) == (0.0, 0.0)
            assert real.kv_cache is not None and 0.0 <= real.kv_cache < 0.5
            assert real.max_loras == 2  # vLLM's --max-loras, from vllm:lora_requests_info
            assert upstream.loads[1] is not None and upstream.loads[1].waiting == 30.0

            # Scores follow the real page: the idle real replica wins every request.
            with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
                for i in range(6):
                    answer = chat(client, "pair", f"u{i}")
                    assert record(url, answer.request_id)["replica"] == 0
            assert not [r for r in recorder.received if r.path == "/v1/chat/completions"]

            # A request running on the real server shows up in the next scrape, adapter and all.
            with long_request(real_vllm):

                def busy() -> bool:
                    load = upstream.loads[0]
                    running = load.running_adapters if load else frozenset()
                    return load is not None and load.running >= 1 and "support-lora" in running

                wait_for(busy, 60.0, "a scrape showing the running LoRA request")
            assert readyz(url)["degraded"] == []


def test_adapter_loaded_and_unloaded_at_run_time(
    gateway: tuple[str, TurnoutApp], client: openai.OpenAI, real_vllm: RealVllm
) -> None:
    url, _ = gateway

    def named_degraded() -> bool:
        return any(LATE in part for part in readyz(url)["degraded"])

    try:
        # Not on the server: once Turnout has polled /v1/models, /readyz names the adapter
        # and the route's fallback answers.
        assert LATE not in vllm_models(real_vllm)
        wait_for(named_degraded, 5.0, "/readyz naming the missing adapter")
        assert chat(client, "other", "u").variant == "prompted"

        loaded = httpx.post(
            url + "/turnout/adapters", json={"upstream": "vllm", "name": LATE}, headers=ADMIN
        )
        assert loaded.status_code == 200, loaded.text
        assert loaded.json() == {
            "upstream": "vllm",
            "name": LATE,
            "replicas": [{"replica": 0, "loaded": True}],
        }
        assert vllm_models(real_vllm)[LATE] == BASE_NAME
        assert chat(client, "other", "u").variant == "other"  # at once, no poll needed
        assert not named_degraded()
        time.sleep(0.5)  # a few polls later the server still lists it
        assert chat(client, "other", "u", stream=True).variant == "other"

        unloaded = httpx.delete(f"{url}/turnout/adapters/vllm/{LATE}", headers=ADMIN)
        assert unloaded.status_code == 200, unloaded.text
        assert unloaded.json()["replicas"] == [{"replica": 0, "loaded": False}]
        assert LATE not in vllm_models(real_vllm)
        assert chat(client, "other", "u").variant == "prompted"
        assert named_degraded()
    finally:
        unload_directly(real_vllm, LATE)


def test_adapter_admin_needs_the_admin_key(gateway: tuple[str, TurnoutApp]) -> None:
    url, _ = gateway
    body = {"upstream": "vllm", "name": LATE}
    assert httpx.post(url + "/turnout/adapters", json=body).status_code == 403
    assert httpx.delete(f"{url}/turnout/adapters/vllm/{LATE}").status_code == 403


def test_vllm_admin_paths_are_not_reachable_through_turnout(
    gateway: tuple[str, TurnoutApp], real_vllm: RealVllm
) -> None:
    url, _ = gateway
    path = real_vllm.adapter_path(LATE)
    for headers in ({}, ADMIN):
        for endpoint in ("load_lora_adapter", "unload_lora_adapter"):
            body = {"lora_name": "smuggled", "lora_path": path}
            response = httpx.post(f"{url}/v1/{endpoint}", json=body, headers=headers)
            assert response.status_code == 404, response.text
    assert "smuggled" not in vllm_models(real_vllm)
