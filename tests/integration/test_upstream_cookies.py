"""One client serves every caller of an upstream: a cookie the upstream sets is never sent on
a later request (it would carry one caller's session to another)."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.integration.conftest import running
from tests.servers import serve_app

ANSWER = {
    "id": "x", "object": "chat.completion", "created": 0, "model": "m",
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "ok"}}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}  # fmt: skip


def test_upstream_cookies_are_never_sent_back() -> None:
    seen: list[dict[str, str]] = []

    async def upstream(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        seen.append({k.decode(): v.decode() for k, v in scope["headers"]})
        headers = [(b"content-type", b"application/json"),
                   (b"set-cookie", b"session=caller-one; Path=/")]  # fmt: skip
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": json.dumps(ANSWER).encode()})

    with serve_app(upstream) as base:
        config = {
            "upstreams": {"u": {"kind": "openai", "base_url": base + "/v1"}},
            "variants": {"v": {"upstream": "u", "model": "m"}},
            "routes": {"r": {"split": {"v": 1}}},
        }
        with running(config) as (url, _):
            body = {"model": "r", "messages": [{"role": "user", "content": "hi"}]}
            for _ in range(3):
                answer = httpx.post(url + "/v1/chat/completions", json=body, timeout=10)
                assert answer.status_code == 200
    assert len(seen) == 3
    assert all("cookie" not in headers for headers in seen)
