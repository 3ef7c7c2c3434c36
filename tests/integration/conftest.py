"""Fixtures: fake upstreams on real sockets, and gateways built from config dicts."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from gateway.app import TurnoutApp, create_app
from gateway.config_check import check_settings
from tests.fakes import Recorder, create_fake_upstream
from tests.servers import serve_app

UPSTREAM_KEY = "sk-upstream-PROVIDERKEY-0001"
CLIENT_KEY = "sk-client-app-a-0001"
ADMIN_KEY = "admin-key-0001-secret"
ENV = {"FAKE_KEY": UPSTREAM_KEY, "TURNOUT_ADMIN_KEY": ADMIN_KEY}
BEHAVIOURS = [
    "ok", "echo", "error-400", "error-401", "error-403", "error-404", "error-422", "error-429",
    "error-500", "error-503", "garbage", "stream-garbage", "slow-first-token", "hang",
    "stream-slow", "stream-cut", "stream-reset", "stream-garbage-late", "no-usage", "sliced",
    "no-trailing-newline", "slow-first-event", "first-event-error", "keepalive-first",
    "detailed-usage", "stream-empty",
]  # fmt: skip
PROMPT = {
    "system": "You classify tickets.",
    "examples": [
        {"user": "I was charged twice", "assistant": "billing"},
        {"user": "The app crashes", "assistant": "bug"},
    ],
}


class Upstreams:
    """Two replicas of the fake upstream sharing one recorder."""

    def __init__(self, urls: list[str], recorder: Recorder) -> None:
        self.urls = urls
        self.recorder = recorder


@pytest.fixture(scope="session")
def upstreams() -> Iterator[Upstreams]:
    app, recorder = create_fake_upstream()
    with serve_app(app) as first, serve_app(app) as second:
        yield Upstreams([first, second], recorder)


@pytest.fixture
def recorder(upstreams: Upstreams) -> Recorder:
    upstreams.recorder.clear()
    return upstreams.recorder


def base_config(upstreams: Upstreams, **timeouts: float) -> dict[str, Any]:
    """A route per fake behaviour (hosted kind), plus vLLM, prompted and split routes."""
    limits = {"connect": 2.0, "first_byte": 5.0, "idle": 5.0, "total": 20.0} | timeouts
    variants: dict[str, Any] = {b: {"upstream": "hosted", "model": b} for b in BEHAVIOURS}
    variants["ft"] = {"upstream": "vllm", "model": "ok"}
    variants["ft-slow"] = {"upstream": "vllm", "model": "slow-first-token"}
    variants["prompted"] = {
        "upstream": "hosted",
        "model": "ok",
        "prompt": PROMPT,
        "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0},
    }
    routes: dict[str, Any] = {b: {"split": {b: 1}} for b in BEHAVIOURS}
    routes |= {
        "ft": {"split": {"ft": 1}},
        "ft-slow": {"split": {"ft-slow": 1}},
        "prompted": {"split": {"prompted": 1}},
        "split": {"split": {"ft": 50, "prompted": 50}, "sticky": "user"},
        "split-header": {"split": {"ft": 50, "prompted": 50}, "sticky": "header:x-tenant"},
    }
    return {
        "admin_key_env": "TURNOUT_ADMIN_KEY",
        "server": {"max_body_bytes": 64 * 1024},
        "upstreams": {
            "hosted": {
                "kind": "openai",
                "base_url": upstreams.urls[0] + "/v1",
                "api_key_env": "FAKE_KEY",
                "timeouts": limits,
            },
            "vllm": {"kind": "vllm", "urls": upstreams.urls, "timeouts": limits},
        },
        "variants": variants,
        "routes": routes,
    }


def build_app(config: dict[str, Any]) -> TurnoutApp:
    settings, problems = check_settings(config, ENV, strict=True)
    assert settings is not None, problems
    return create_app(settings, ENV)


@contextlib.contextmanager
def running(config: dict[str, Any]) -> Iterator[tuple[str, TurnoutApp]]:
    app = build_app(config)
    with serve_app(app, lifespan="on") as url:
        yield url, app


@pytest.fixture(scope="module")
def gateway(upstreams: Upstreams) -> Iterator[tuple[str, TurnoutApp]]:
    """An open gateway (no keys) over the fakes, with short deadlines."""
    with running(base_config(upstreams, first_byte=1.0, idle=1.0, total=5.0)) as served:
        yield served


@pytest.fixture
def url(gateway: tuple[str, TurnoutApp]) -> str:
    return gateway[0]


@pytest.fixture
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="anything", max_retries=0, timeout=10)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture(scope="module")
def keyed_gateway(upstreams: Upstreams) -> Iterator[str]:
    """A gateway with one client key allowed on `ok` and `echo` only."""
    config = base_config(upstreams)
    config["keys"] = [{"name": "app-a", "sha256": sha256(CLIENT_KEY), "routes": ["ok", "echo"]}]
    with running(config) as (url, _):
        yield url


Chat = Callable[..., Any]
