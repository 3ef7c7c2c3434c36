"""LoRA adapters at run time against two fake vLLM replicas that keep an adapter set and answer
/v1/models, /v1/load_lora_adapter and /v1/unload_lora_adapter as vLLM does: a variant whose
adapter is on no replica falls back and /readyz says so; loading through Turnout makes it
routable; requests go only to replicas holding their adapter; errors are clear."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fakes import read_body
from tests.integration.conftest import ADMIN_KEY, running
from tests.servers import serve_app

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
BASE = "base-model"
USER = [{"role": "user", "content": "hi"}]


class FakeVllm:
    """One replica: the adapters it holds, the admin calls it got, whether loads fail."""

    def __init__(self, adapters: set[str], *, runtime_updates: bool = True) -> None:
        self.adapters = set(adapters)
        self.runtime_updates = runtime_updates
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.served: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive) or b""
        status, answer = self.answer(scope["path"], json.loads(body) if body else {})
        data = answer.encode() if isinstance(answer, str) else json.dumps(answer).encode()
        kind = b"text/plain" if isinstance(answer, str) else b"application/json"
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", kind)]})  # fmt: skip
        await send({"type": "http.response.body", "body": data})

    def answer(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        if path == "/v1/models":
            listed = [{"id": BASE, "object": "model", "parent": None}]
            listed += [{"id": a, "object": "model", "parent": BASE} for a in sorted(self.adapters)]
            return 200, {"object": "list", "data": listed}
        if path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            if not self.runtime_updates:
                return 404, {"detail": "Not Found"}
            self.calls.append((path, body))
            name = body["lora_name"]
            if path.endswith("/load_lora_adapter"):
                if name in self.adapters:
                    return 400, {
                        "error": {"message": f"The lora adapter '{name}' has already been loaded."}
                    }
                self.adapters.add(name)
                return 200, f"Success: LoRA adapter '{name}' added successfully."
            if name not in self.adapters:
                return 404, {"error": {"message": f"The lora adapter '{name}' cannot be found."}}
            self.adapters.discard(name)
            return 200, f"Success: LoRA adapter '{name}' removed successfully."
        if path == "/v1/chat/completions":
            model = body["model"]
            if model != BASE and model not in self.adapters:
                return 404, {"error": {"message": f"The model `{model}` does not exist."}}
            self.served.append(model)
            return 200, {
                "id": "x", "object": "chat.completion", "created": 0, "model": model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "ok"}}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            }  # fmt: skip
        return 404, {"detail": "Not Found"}


def _config(urls: list[str]) -> dict[str, Any]:
    return {
        "admin_key_env": "TURNOUT_ADMIN_KEY",
        "upstreams": {
            "ft": {
                "kind": "vllm",
                "urls": urls,
                "scrape_interval_s": 0.1,
                "serve": {
                    "base_model": BASE,
                    "adapters": {
                        "support-lora": "/adapters/support",
                        "late-lora": {"path": "/adapters/late", "at_start": False},
                    },
                },
            }
        },
        "variants": {
            "support": {"upstream": "ft", "model": "support-lora"},
            "late": {"upstream": "ft", "model": "late-lora"},
            "base": {"upstream": "ft", "model": BASE},
        },
        "routes": {"r": {"split": {"late": 1}, "fallback": ["base"]}},
    }


@pytest.fixture
def replicas() -> Iterator[tuple[list[FakeVllm], list[str]]]:
    fakes = [FakeVllm({"support-lora"}), FakeVllm({"support-lora"})]
    with serve_app(fakes[0]) as first, serve_app(fakes[1]) as second:
        yield fakes, [first, second]


def _ask(url: str, route: str = "r") -> httpx.Response:
    body = {"model": route, "messages": USER}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=10)


def _ready(url: str) -> dict[str, Any]:
    answer: dict[str, Any] = httpx.get(url + "/readyz").json()
    return answer


def test_an_adapter_on_no_replica_falls_back_until_loaded(
    replicas: tuple[list[FakeVllm], list[str]],
) -> None:
    fakes, urls = replicas
    with running(_config(urls)) as (url, _):
        before = _ask(url)
        assert before.status_code == 200 and before.headers["x-turnout-variant"] == "base"
        assert any("late-lora" in part for part in _ready(url)["degraded"])

        loaded = httpx.post(url + "/turnout/adapters", headers=ADMIN,
                            json={"upstream": "ft", "name": "late-lora"})  # fmt: skip
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["replicas"] == [
            {"replica": 0, "loaded": True}, {"replica": 1, "loaded": True},
        ]  # fmt: skip
        for fake in fakes:  # the path comes from the config, never from a client
            assert fake.calls == [
                ("/v1/load_lora_adapter", {"lora_name": "late-lora", "lora_path": "/adapters/late"})
            ]
        after = _ask(url)
        assert after.status_code == 200 and after.headers["x-turnout-variant"] == "late"
        assert not any("late-lora" in part for part in _ready(url)["degraded"])

        # Loading again is no error: vLLM's "already loaded" counts as loaded.
        again = httpx.post(url + "/turnout/adapters", headers=ADMIN,
                           json={"upstream": "ft", "name": "late-lora"})  # fmt: skip
        assert again.status_code == 200

        gone = httpx.delete(url + "/turnout/adapters/ft/late-lora", headers=ADMIN)
        assert gone.status_code == 200, gone.text
        assert all(not r["loaded"] for r in gone.json()["replicas"])
        assert _ask(url).headers["x-turnout-variant"] == "base"
        assert any("late-lora" in part for part in _ready(url)["degraded"])


def test_requests_go_only_to_replicas_holding_their_adapter(
    replicas: tuple[list[FakeVllm], list[str]],
) -> None:
    fakes, urls = replicas
    fakes[1].adapters.add("late-lora")  # loaded on replica 1 only, outside Turnout
    with running(_config(urls)) as (url, _):
        for _ in range(10):
            assert _ask(url).headers["x-turnout-variant"] == "late"
        assert fakes[0].served == [] and fakes[1].served == ["late-lora"] * 10


def test_turnout_notices_adapters_changed_behind_its_back(
    replicas: tuple[list[FakeVllm], list[str]],
) -> None:
    fakes, urls = replicas
    with running(_config(urls)) as (url, _):
        assert _ask(url).headers["x-turnout-variant"] == "base"
        fakes[0].adapters.add("late-lora")
        deadline = time.monotonic() + 5
        while _ask(url).headers["x-turnout-variant"] != "late":
            assert time.monotonic() < deadline, "the /v1/models poll did not see the adapter"
            time.sleep(0.05)


def test_admin_errors(replicas: tuple[list[FakeVllm], list[str]]) -> None:
    fakes, urls = replicas
    with running(_config(urls)) as (url, _):
        post = url + "/turnout/adapters"
        assert httpx.post(post, json={"upstream": "ft", "name": "late-lora"}).status_code == 403
        undeclared = httpx.post(post, headers=ADMIN, json={"upstream": "ft", "name": "x"})
        assert undeclared.status_code == 400
        assert undeclared.json()["error"]["param"] == "name"
        assert "late-lora" in undeclared.json()["error"]["message"]
        unknown = httpx.post(post, headers=ADMIN, json={"upstream": "nope", "name": "x"})
        assert unknown.status_code == 404
        extra = httpx.post(post, headers=ADMIN, json={"upstream": "ft", "name": "late-lora",
                                                      "url": "http://elsewhere"})  # fmt: skip
        assert extra.status_code == 400  # unknown fields are refused, never followed
        fakes[1].runtime_updates = False
        partial = httpx.post(post, headers=ADMIN, json={"upstream": "ft", "name": "late-lora"})
        assert partial.status_code == 502
        assert "replica 1" in partial.json()["error"]["message"]
        assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in partial.json()["error"]["message"]
        # vLLM's own admin paths are not part of Turnout's surface.
        for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            body = {"lora_name": "x", "lora_path": "/etc"}
            assert httpx.post(url + path, json=body).status_code in (404, 405)
