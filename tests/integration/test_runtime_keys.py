"""Run-time keys and assignment overrides over HTTP: create, use, list, disable (seen by a
second gateway on the same Redis within a second), pin a subject to a variant and unpin it,
and a frozen Redis while a recently used key keeps working from the cache."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.auth import FRESH_S
from router.selection import pick_weighted, sticky_draw
from tests.integration.conftest import ADMIN_KEY, CLIENT_KEY, Upstreams, base_config, running
from tests.integration.conftest import sha256 as hexdigest
from tests.redis_server import RedisServer

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
CHAT = {"model": "ok", "messages": [{"role": "user", "content": "hi"}]}


def config(upstreams: Upstreams, state: dict[str, Any] | None = None) -> dict[str, Any]:
    settings = base_config(upstreams)
    settings["keys"] = [{"name": "app-a", "sha256": hexdigest(CLIENT_KEY)}]
    if state is not None:
        settings["state"] = state
    return settings


@pytest.fixture(params=["memory", "redis"])
def state(request: pytest.FixtureRequest, prefix: str) -> dict[str, Any] | None:
    if request.param == "memory":
        return None
    server: RedisServer = request.getfixturevalue("redis_server")
    return {"redis_url": server.url, "key_prefix": prefix}


@pytest.fixture
def url(upstreams: Upstreams, state: dict[str, Any] | None) -> Iterator[str]:
    with running(config(upstreams, state)) as (url, _):
        yield url


def chat(url: str, token: str, body: dict[str, Any] = CHAT) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=10)


def create(url: str, **fields: Any) -> httpx.Response:
    return httpx.post(f"{url}/turnout/keys", json=fields, headers=ADMIN, timeout=10)


def test_a_created_key_works_is_listed_without_secrets_and_can_be_disabled(url: str) -> None:
    created = create(url, name="app-b", routes=["ok"], rpm=100)
    assert created.status_code == 201, created.text
    token = created.json()["key"]
    assert token.startswith("sk-turnout-") and created.json()["source"] == "runtime"
    assert chat(url, token).status_code == 200
    assert chat(url, token, CHAT | {"model": "echo"}).status_code == 404  # not its route
    listed = httpx.get(f"{url}/turnout/keys", headers=ADMIN).json()["data"]
    assert [(k["name"], k["source"]) for k in listed] == [("app-a", "config"), ("app-b", "runtime")]
    assert token not in str(listed) and hexdigest(token) not in str(listed)
    assert listed[1]["sha256"] == hexdigest(token)[:8] and listed[1]["rpm"] == 100
    disabled = httpx.post(f"{url}/turnout/keys/app-b/disable", headers=ADMIN)
    assert disabled.status_code == 200, disabled.text
    time.sleep(FRESH_S + 0.1)
    refused = chat(url, token)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert chat(url, CLIENT_KEY).status_code == 200  # config keys are untouched


def test_admin_key_checks_and_bad_bodies(url: str) -> None:
    assert httpx.get(f"{url}/turnout/keys").status_code == 403
    denied = httpx.post(
        f"{url}/turnout/keys", json={"name": "x"}, headers={"authorization": f"Bearer {CLIENT_KEY}"}
    )
    assert denied.status_code == 403
    assert create(url, name="app-a").status_code == 400  # a configured key's name
    assert create(url, name="x", routes=["nope"]).status_code == 400
    assert create(url, name="x", colour="red").status_code == 400
    assert create(url, name="dup").status_code == 201
    duplicate = create(url, name="dup")
    assert duplicate.status_code == 400 and duplicate.json()["error"]["param"] == "name"
    assert httpx.post(f"{url}/turnout/keys/nobody/disable", headers=ADMIN).status_code == 404
    assert httpx.post(f"{url}/turnout/keys/app-a/disable", headers=ADMIN).status_code == 400
    assert chat(url, "sk-turnout-unknown").status_code == 401


def test_an_override_pins_a_subject_and_deleting_it_restores_the_hash(url: str) -> None:
    user = "user-7"
    hashed = pick_weighted([("ft", 50), ("prompted", 50)], sticky_draw("split", user))
    other = "prompted" if hashed == "ft" else "ft"
    body = CHAT | {"model": "split", "user": user}

    def served() -> str:
        answer = chat(url, CLIENT_KEY, body)
        assert answer.status_code == 200, answer.text
        return answer.headers["x-turnout-variant"]

    assert served() == hashed
    pin = {"route": "split", "subject": user, "variant": other}
    assert httpx.post(f"{url}/turnout/assignments", json=pin, headers=ADMIN).status_code == 200
    assert [served() for _ in range(3)] == [other] * 3
    unpin = {"route": "split", "subject": user}
    deleted = httpx.request("DELETE", f"{url}/turnout/assignments", json=unpin, headers=ADMIN)
    assert deleted.status_code == 200, deleted.text
    assert served() == hashed
    again = httpx.request("DELETE", f"{url}/turnout/assignments", json=unpin, headers=ADMIN)
    assert again.status_code == 404


@pytest.mark.parametrize(
    "pin",
    [
        {"route": "nope", "subject": "u", "variant": "ft"},
        {"route": "ok", "subject": "u", "variant": "ok"},  # not sticky
        {"route": "split", "subject": "u", "variant": "echo"},  # not in the route
        {"route": "split", "subject": "u"},
        {"route": "split", "subject": "", "variant": "ft"},
    ],
)
def test_bad_assignments_are_refused(url: str, pin: dict[str, str]) -> None:
    answer = httpx.post(f"{url}/turnout/assignments", json=pin, headers=ADMIN)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["type"] == "invalid_request_error"


def test_an_open_gateway_refuses_run_time_keys(upstreams: Upstreams) -> None:
    with running(base_config(upstreams)) as (url, _):
        assert create(url, name="app-b").status_code == 400


def test_a_key_disabled_on_one_gateway_stops_on_another_within_a_second(
    upstreams: Upstreams, redis_server: RedisServer, prefix: str
) -> None:
    state = {"redis_url": redis_server.url, "key_prefix": prefix}
    with (
        running(config(upstreams, state)) as (first, _),
        running(config(upstreams, state)) as (second, _),
    ):
        token = create(first, name="app-b").json()["key"]
        assert chat(second, token).status_code == 200
        assert httpx.post(f"{first}/turnout/keys/app-b/disable", headers=ADMIN).status_code == 200
        disabled_at = time.monotonic()
        while chat(second, token).status_code == 200:
            assert time.monotonic() - disabled_at < 1.0
            time.sleep(0.05)
        assert chat(second, token).status_code == 401


def test_a_recently_used_key_works_from_the_cache_while_redis_is_frozen(
    upstreams: Upstreams, redis_server: RedisServer, prefix: str
) -> None:
    state = {"redis_url": redis_server.url, "key_prefix": prefix}
    with running(config(upstreams, state)) as (url, _):
        token = create(url, name="app-b").json()["key"]
        assert chat(url, token).status_code == 200
        with redis_server.paused():
            time.sleep(FRESH_S + 0.1)  # the cached entry is stale: the store is asked, and fails
            assert chat(url, token).status_code == 200
            unknown = chat(url, "sk-turnout-never-seen")
            assert unknown.status_code == 503
            assert unknown.json()["error"]["code"] == "state_unavailable"
            assert chat(url, CLIENT_KEY).status_code == 200  # config keys need no store
        metrics = httpx.get(f"{url}/metrics").text
        assert 'turnout_state_fallbacks_total{feature="auth"}' in metrics
