"""Row 17, auth abuse: wrong keys of every odd shape (SQL and JSON metacharacters, 64 KB,
non-latin-1 bytes, control bytes, the key's own hash, near misses, other schemes and places),
missing and duplicate Authorization headers; and one key reaching for what is another's:
routes it may not call, admin endpoints, other keys' requests and feedback (also through a
request id the other key chose and this one reuses).

Pass: a generic OpenAI-shaped 401 (key) or 403 (admin) or 404 (a route or request that is
not the caller's, exactly like one that does not exist), never a 5xx, never the key sent or any
configured key (no run of 8 of its characters) in an answer or a log line."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.config_check import check_settings
from tests.fakes import create_fake_upstream
from tests.integration.conftest import Upstreams, base_config, sha256
from tests.redis_server import RedisServer
from tests.reliability.canary import LeakScanner, LogCapture, pieces, raw_http
from tests.servers import serve_app

APP_A = "sk-abuse-a-7Hq2Lw9Zp4Xc8Vn3"  # routes ok, prompted
APP_B = "sk-abuse-b-5Jt6Yr1Ke8Dm2Gs4"  # routes ok, echo
META = "sk-meta-'\";--{}[]\\/$(id)|&<>%*?`~#,=+^!@"  # every route; JSON/SQL/shell characters
ADMIN_KEY = "admin-abuse-3Fp7Nb2Qx9Lr5Tw1"
BIG = "k" * (64 * 1024 - 7)  # with "Bearer ", a 64 KB header value
ENV = {"FAKE_KEY": "sk-fakeprov-Rz8Kd3Wq6Yb1Tn5", "TURNOUT_ADMIN_KEY": ADMIN_KEY}
KEYS = (APP_A, APP_B, META, ADMIN_KEY, ENV["FAKE_KEY"])
USER = [{"role": "user", "content": "hi"}]
CHAT = {"model": "ok", "messages": USER}
GENERIC_401 = {
    "Incorrect API key provided.",
    "Missing API key: send `Authorization: Bearer <key>`.",
}


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


A, B, ADMIN = bearer(APP_A), bearer(APP_B), bearer(ADMIN_KEY)


def _config(upstreams: Upstreams, state: dict[str, Any] | None) -> dict[str, Any]:
    config = base_config(upstreams)
    config["routes"]["ok"]["feedback"] = [{"name": "resolved", "type": "bool"}]
    config["keys"] = [
        {"name": "app-a", "sha256": sha256(APP_A), "routes": ["ok", "prompted"]},
        {"name": "app-b", "sha256": sha256(APP_B), "routes": ["ok", "echo"]},
        {"name": "meta", "sha256": sha256(META)},
        {"name": "big", "sha256": sha256(BIG), "routes": ["ok"]},
        {"name": "off", "sha256": sha256(APP_A + "-off"), "disabled": True},
    ]
    if state is not None:
        config["state"] = state
    return config


@dataclass
class Gateway:
    url: str
    http: httpx.Client
    logs: LogCapture


@pytest.fixture(scope="module")
def upstreams() -> Iterator[Upstreams]:
    app, recorder = create_fake_upstream()
    with serve_app(app) as first, serve_app(app) as second:
        yield Upstreams([first, second], recorder)


def _serve(upstreams: Upstreams, state: dict[str, Any] | None) -> Iterator[Gateway]:
    settings, problems = check_settings(_config(upstreams, state), ENV, strict=True)
    assert settings is not None, problems
    with LogCapture() as logs:
        app = create_app(settings, ENV)
        with (
            # As `turnout serve` runs it: no access log (it would log query strings, and a
            # client may put its key in one).
            serve_app(app, lifespan="on", log_config=None, access_log=False) as url,
            httpx.Client(base_url=url, timeout=10) as http,
        ):
            yield Gateway(url, http, logs)


@pytest.fixture(scope="module")
def memory_gw(upstreams: Upstreams) -> Iterator[Gateway]:
    yield from _serve(upstreams, None)


@pytest.fixture(params=["memory", "redis"])
def any_gw(request: pytest.FixtureRequest, upstreams: Upstreams) -> Iterator[Gateway]:
    """A fresh gateway with its state (run-time keys, records, feedback) in memory or Redis."""
    state = None
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        state = {"redis_url": server.url, "key_prefix": request.getfixturevalue("prefix")}
    yield from _serve(upstreams, state)


class Watch:
    """Every answer of a test, checked as it comes: no 5xx, OpenAI's shape for JSON errors, no
    piece of a configured key, nor of the token the request itself sent; the test's log lines
    are scanned at its end."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.scanner = LeakScanner(KEYS)
        self._first_line = len(gw.logs.lines)
        self.count = 0

    def check(self, where: str, status: int, headers: str, body: bytes, sent: str = "") -> None:
        self.count += 1
        assert status < 500, (where, status, body[:300])
        self.scanner.scan(f"{where} body", body)
        self.scanner.scan(f"{where} headers", headers)
        text = body.decode("utf-8", "replace")
        echoed = [p for p in pieces(sent) if p in text or p in headers] if len(sent) >= 8 else []
        assert not echoed, (where, "the token sent is echoed", echoed[:3])
        if status >= 400 and body.startswith(b"{"):
            assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}

    def http(self, method: str, path: str, sent: str = "", **kwargs: Any) -> httpx.Response:
        answer = self.gw.http.request(method, path, **kwargs)
        headers = repr(answer.headers.multi_items())
        self.check(f"{method} {path}", answer.status_code, headers, answer.content, sent)
        return answer

    def raw(self, target: bytes, headers: list[bytes], body: bytes = b"", sent: str = "") -> int:
        reply = raw_http(self.gw.url, target, [b"Host: t", *headers], body)
        head = repr(reply.headers)
        self.check(f"raw {target!r} {headers[-1][:40]!r}", reply.status, head, reply.body, sent)
        return reply.status

    def finish(self) -> None:
        for number, line in enumerate(self.gw.logs.lines[self._first_line :]):
            self.scanner.scan(f"log line {number}", line)
        self.scanner.assert_clean()


@pytest.fixture
def watch(memory_gw: Gateway) -> Iterator[Watch]:
    watching = Watch(memory_gw)
    yield watching
    watching.finish()


def _generic_401(answer: httpx.Response) -> None:
    assert answer.status_code == 401, answer.text
    error = answer.json()["error"]
    assert error["message"] in GENERIC_401
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "invalid_api_key",
        None,
    )
    assert "www-authenticate" not in answer.headers


WRONG_TOKENS = [
    "' OR '1'='1", "' OR 1=1 --", '" OR ""="', "'; DROP TABLE keys; --", "1; SELECT * FROM keys",
    '{"$ne": null}', '{"$gt": ""}', '","admin":true,"x":"', "[]", "null", "true", "*", "%", ".*",
    "\\", "\\u0000", "../../etc/passwd", "${jndi:ldap://127.0.0.1/x}", "{{7*7}}", "$(id)",
    sha256(APP_A), sha256(APP_A)[:8], APP_A[:-1], APP_A + "x", APP_A.upper(), f"{APP_A} {APP_A}",
    f"{APP_A},{APP_B}", META[:-1], META + "'", APP_A + "-off", BIG[:-1], "k" * 1_000_000 + "x",
]  # fmt: skip
WRONG_SCHEMES = [
    "", "Bearer", APP_A, f"Token {APP_A}", f"Bearer: {APP_A}",
    f"BearerX {APP_A}", f"Bearer\t{APP_A}", f"Basic {base64.b64encode(APP_A.encode()).decode()}",
    f"Basic {base64.b64encode(f'{APP_A}:'.encode()).decode()}", f"Digest {APP_A}",
]  # fmt: skip


@pytest.mark.parametrize("token", WRONG_TOKENS, ids=lambda t: t[:24])
def test_wrong_keys_get_one_generic_401(watch: Watch, token: str) -> None:
    auth = {"authorization": f"Bearer {token}"}
    if len(token) > 64 * 1024:  # 1 MB: past any sane header limit; only "not a 5xx" is asked
        answer = watch.http("POST", "/v1/chat/completions", token, json=CHAT, headers=auth)
        assert answer.status_code in (400, 401, 431)
        return
    _generic_401(watch.http("POST", "/v1/chat/completions", token, json=CHAT, headers=auth))
    _generic_401(watch.http("GET", "/v1/models", token, headers=auth))
    _generic_401(
        watch.http(
            "POST", "/v1/embeddings", token, json={"model": "ok", "input": "x"}, headers=auth
        )
    )
    body = {"request_id": "req_x", "metric": "resolved", "value": True}
    _generic_401(watch.http("POST", "/turnout/feedback", token, json=body, headers=auth))
    forbidden = watch.http("GET", "/turnout/report", token, headers=auth)
    assert forbidden.status_code == 403
    assert forbidden.json()["error"]["message"] == "This endpoint needs the admin key."


@pytest.mark.parametrize("value", WRONG_SCHEMES, ids=lambda v: v[:16])
def test_missing_and_malformed_bearer_get_401(watch: Watch, value: str) -> None:
    answer = watch.http(
        "POST", "/v1/chat/completions", APP_A, json=CHAT, headers={"authorization": value}
    )
    _generic_401(answer)
    assert (
        watch.http("GET", "/turnout/keys", APP_A, headers={"authorization": value}).status_code
        == 403
    )


def test_keys_elsewhere_than_the_authorization_header_do_not_count(watch: Watch) -> None:
    for headers in ({"api-key": APP_A}, {"x-api-key": APP_A}, {"cookie": f"key={APP_A}"},
                    {"proxy-authorization": f"Bearer {APP_A}"}):  # fmt: skip
        _generic_401(watch.http("POST", "/v1/chat/completions", APP_A, json=CHAT, headers=headers))
    for query in ({"api_key": APP_A}, {"key": APP_A}, {"authorization": f"Bearer {APP_A}"}):
        _generic_401(watch.http("POST", "/v1/chat/completions", json=CHAT, params=query))
    _generic_401(watch.http("POST", "/v1/chat/completions", json=CHAT | {"api_key": APP_A}))


def test_odd_but_valid_keys_and_spellings_work(watch: Watch) -> None:
    for auth in (f"Bearer {META}", f"bearer {APP_A}", f"BEARER {APP_A}", f"Bearer  {APP_A}"):
        answer = watch.http(
            "POST", "/v1/chat/completions", json=CHAT, headers={"authorization": auth}
        )
        assert answer.status_code == 200, (auth, answer.text)
    big = watch.http("POST", "/v1/chat/completions", json=CHAT, headers=bearer(BIG))
    assert big.status_code in (200, 431), big.text  # 431: a server header limit under 64 KB
    disabled = watch.http("POST", "/v1/chat/completions", json=CHAT, headers=bearer(APP_A + "-off"))
    _generic_401(disabled)


def test_bytes_httpx_will_not_send(watch: Watch) -> None:
    """Raw requests: non-latin-1 and control bytes, obs-fold, duplicate headers."""
    body = json.dumps(CHAT).encode()
    target = b"POST /v1/chat/completions"
    json_type = b"Content-Type: application/json"
    key_a, key_b = APP_A.encode(), APP_B.encode()
    odd = [
        b"Bearer " + "ключ-κλειδί-鍵".encode(),  # UTF-8: read as latin-1 by the server
        b"Bearer " + key_a + "é".encode(),
        b"Bearer " + key_a[:-1] + b"\xff",
        b"Bearer \xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8",
        b"Bearer " + key_a + b"\x80",
        b"\xef\xbb\xbfBearer " + key_a,  # a byte-order mark before the scheme
    ]
    for value in odd:
        status = watch.raw(target, [json_type, b"Authorization: " + value], body, APP_A)
        assert status == 401
    for value in (b"Bearer ", b"Bearer   ", b"Bearer \t"):  # no key after the scheme
        assert watch.raw(target, [json_type, b"Authorization: " + value], body) == 401
    spaced = b"Authorization: Bearer  " + key_a + b"  "  # whitespace around the key is not in it
    assert watch.raw(target, [json_type, spaced], body) == 200
    # Bytes HTTP forbids in a header: the server's HTTP parser refuses the request (400)
    # before Turnout sees it. Never a 5xx, never the key back.
    forbidden = [
        b"Bearer " + key_a + b"\x00",
        b"Bearer \x01" + key_a,
        b"Bearer " + key_a + b"\x7f\x1b",
    ]
    for value in forbidden:
        status = watch.raw(target, [json_type, b"Authorization: " + value], body, APP_A)
        assert status in (400, 401), value
    folded = watch.raw(target, [json_type, b"Authorization: Bearer", b" " + key_a], body, APP_A)
    assert folded in (400, 401)

    # Two Authorization headers are ambiguous whatever their order: 401 (403 for admin).
    for first, second in [(key_a, b"wrong-key-000000"), (b"wrong-key-000000", key_a),
                          (key_a, key_a), (key_a, key_b), (key_a, b"")]:  # fmt: skip
        pair = [b"Authorization: Bearer " + first, b"Authorization: Bearer " + second]
        assert watch.raw(target, [json_type, *pair], body) == 401, (first, second)
        assert watch.raw(b"GET /v1/models", pair) == 401
    admin = b"Authorization: Bearer " + ADMIN_KEY.encode()
    for pair in ([admin, b"Authorization: Bearer x"], [b"Authorization: Bearer x", admin],
                 [admin, admin]):  # fmt: skip
        assert watch.raw(b"GET /turnout/keys", pair) == 403
    assert watch.raw(b"GET /turnout/keys", [admin]) == 200  # the header alone is fine


def test_a_key_reaches_only_its_own_routes(watch: Watch) -> None:
    listed = watch.http("GET", "/v1/models", headers=A).json()["data"]
    assert sorted(m["id"] for m in listed) == ["ok", "prompted"]
    # Another key's route answers exactly like a route that does not exist.
    for route, unknown in (("echo", "no-such-route"), ("split", "ech0")):
        other = watch.http("POST", "/v1/chat/completions", json=CHAT | {"model": route}, headers=A)
        none = watch.http("POST", "/v1/chat/completions", json=CHAT | {"model": unknown}, headers=A)
        assert other.status_code == none.status_code == 404
        assert (
            other.json()["error"]["message"].replace(route, unknown)
            == none.json()["error"]["message"]
        )
        assert other.json()["error"]["code"] == "model_not_found"
        assert "x-turnout-route" not in other.headers and "x-turnout-variant" not in other.headers
    for body in ({"model": "echo", "input": "x"},):
        answer = watch.http("POST", "/v1/embeddings", json=body, headers=A)
        assert answer.status_code == 404
    assert (
        watch.http(
            "POST", "/v1/chat/completions", json=CHAT | {"model": "echo"}, headers=B
        ).status_code
        == 200
    )

    # Choosing the variant is the admin's; the admin key is no client key.
    forced = A | {"x-turnout-variant": "ok"}
    assert watch.http("POST", "/v1/chat/completions", json=CHAT, headers=forced).status_code == 403
    _generic_401(watch.http("POST", "/v1/chat/completions", json=CHAT, headers=ADMIN))


ADMIN_CALLS = [
    ("GET", "/turnout/report", None), ("GET", "/turnout/report?format=html", None),
    ("GET", "/turnout/keys", None), ("POST", "/turnout/keys", {"name": "mine"}),
    ("POST", "/turnout/keys/app-b/disable", None),
    ("POST", "/turnout/assignments", {"route": "split", "subject": "u", "variant": "ft"}),
    ("DELETE", "/turnout/assignments", {"route": "split", "subject": "u"}),
    ("POST", "/turnout/adapters", {"upstream": "vllm", "name": "x"}),
    ("DELETE", "/turnout/adapters/vllm/x", None),
]  # fmt: skip


def test_a_client_key_gets_403_on_every_admin_endpoint(watch: Watch) -> None:
    own = watch.http("POST", "/v1/chat/completions", json=CHAT, headers=A).headers["x-request-id"]
    calls = [*ADMIN_CALLS, ("GET", f"/turnout/requests/{own}", None)]
    for method, path, body in calls:
        for headers in (A, {"authorization": f"Bearer {META}"}, {}):
            answer = watch.http(method, path, json=body, headers=headers)
            assert answer.status_code == 403, (method, path, answer.text)
            assert answer.json()["error"]["type"] == "permission_error"


def test_one_key_cannot_see_or_touch_anothers_requests(any_gw: Gateway) -> None:
    watch = Watch(any_gw)

    def chat(headers: dict[str, str], **extra: str) -> str:
        answer = watch.http("POST", "/v1/chat/completions", json=CHAT, headers=headers | extra)
        assert answer.status_code == 200, answer.text
        return answer.headers["x-request-id"]

    def feedback(headers: dict[str, str], request_id: str, **extra: Any) -> httpx.Response:
        body = {"request_id": request_id, "metric": "resolved", "value": True} | extra
        return watch.http("POST", "/turnout/feedback", json=body, headers=headers)

    def unknown(answer: httpx.Response, request_id: str) -> None:
        assert answer.status_code == 404, answer.text
        error = answer.json()["error"]
        assert error["message"] == f"No record for request `{request_id}`."
        assert (error["code"], error["param"]) == ("not_found", "request_id")

    mine = chat(A)
    unknown(feedback(B, mine), mine)  # exactly as for an id that never was:
    unknown(feedback(B, "req_" + "0" * 32), "req_" + "0" * 32)
    assert feedback(A, mine, comment="A's private note").status_code == 200
    unknown(feedback(B, mine, value=False), mine)

    # A request id A chose, reused by B: B's request answers to it now, but A's notes on
    # A's request are neither shown to B nor replaced by B.
    chosen = "order-17"
    assert chat(A, **{"x-request-id": chosen}) == chosen
    noted = feedback(A, chosen, value=True, comment="A's note on order 17")
    assert noted.status_code == 200, noted.text
    assert chat(B, **{"x-request-id": chosen}) == chosen
    for value in (True, False):
        reused = feedback(B, chosen, value=value, comment="B was here")
        unknown(reused, chosen)
        assert "A's note" not in reused.text
    record = watch.http("GET", f"/turnout/requests/{chosen}", headers=ADMIN).json()
    assert record["key"] == "app-b" and "A's note" not in json.dumps(record)
    report = watch.http("GET", "/turnout/report", params={"route": "ok"}, headers=ADMIN).json()
    resolved = report["routes"]["ok"]["variants"]["ok"]["feedback"]["resolved"]
    assert resolved["mean"]["estimate"] == 1.0  # every value posted is A's True

    # A run-time key is held to its routes too, and stops working once disabled.
    created = watch.http("POST", "/turnout/keys", json={"name": "rt", "routes": ["echo"]},
                         headers=ADMIN)  # fmt: skip
    assert created.status_code == 201, created.text
    token = created.json()["key"]
    watch.scanner.add(token.removeprefix("sk-turnout-"))
    rt = bearer(token)
    assert watch.http("POST", "/v1/chat/completions", json=CHAT, headers=rt).status_code == 404
    echo = CHAT | {"model": "echo"}
    assert watch.http("POST", "/v1/chat/completions", json=echo, headers=rt).status_code == 200
    unknown(feedback(rt, mine), mine)
    assert watch.http("GET", "/turnout/keys", headers=rt).status_code == 403
    assert watch.http("POST", "/turnout/keys/rt/disable", headers=ADMIN).status_code == 200
    deadline = time.monotonic() + 3.0  # a disabled key stops working within a second
    while (answer := watch.http("POST", "/v1/chat/completions", json=echo, headers=rt)).is_success:
        assert time.monotonic() < deadline, "the disabled key still works"
        time.sleep(0.1)
    _generic_401(answer)
    listed = watch.http("GET", "/turnout/keys", headers=ADMIN)
    assert token not in listed.text and token[11:19] not in listed.text
    watch.finish()
