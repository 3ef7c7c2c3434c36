"""Row 25, sticky A/B under restarts and Redis loss: a subject's variant is a pure function of
(route, subject) and the split's weights (DESIGN.md's sticky draw), so it survives a gateway
restart and Redis going away; only an admin's pin lives in Redis, and while Redis is away the
hash decides for that subject too."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from router.selection import pick_weighted, sticky_draw
from tests.redis_server import RedisServer, private_redis
from tests.reliability.gateway_process import Client, serve

ADMIN_KEY = "admin-key-sticky-0001"
WEIGHTS = [("a", 70.0), ("b", 30.0)]
SUBJECTS = [f"customer-{i}" for i in range(3000)]  # the split: 70/30 within 2 points
CHECKED = SUBJECTS[:400]  # asked again after the restart and without Redis
TOLERANCE = 0.02
PINNED = "vip-customer"
CONCURRENCY = 32


def _config(redis_url: str) -> dict[str, Any]:
    return {
        "admin_key_env": "STICKY_ADMIN_KEY",
        "state": {"redis_url": redis_url, "key_prefix": "sticky:"},
        "upstreams": {"sim": {"kind": "simulated", "ttft_ms": 0, "tokens_per_s": 1e9}},
        "variants": {name: {"upstream": "sim", "model": f"m-{name}"} for name, _ in WEIGHTS},
        "routes": {"ab": {"split": dict(WEIGHTS), "sticky": "user"}},
    }


def _hashed(subject: str) -> str:
    """The variant DESIGN.md's sticky draw gives `subject` on route `ab`."""
    return pick_weighted(WEIGHTS, sticky_draw("ab", subject))


async def _variants(url: str, subjects: list[str]) -> dict[str, str]:
    """The variant each subject was served by (x-turnout-variant), CONCURRENCY at a time."""
    client = Client(url)
    found: dict[str, str] = {}
    queue = list(subjects)

    async def worker() -> None:
        while queue:
            subject = queue.pop()
            body = {
                "model": "ab",
                "messages": [{"role": "user", "content": "hi"}],
                "user": subject,
                "max_tokens": 1,
            }
            reply = await client.request("POST", "/v1/chat/completions", body)
            assert reply.status == 200, reply.body
            found[subject] = reply.headers["x-turnout-variant"]

    try:
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    finally:
        await client.aclose()
    return found


def _served(url: str, subject: str) -> str:
    body = {"model": "ab", "messages": [{"role": "user", "content": "hi"}], "user": subject}
    reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.headers["x-turnout-variant"]


def _pin(url: str, subject: str, variant: str) -> None:
    pin = {"route": "ab", "subject": subject, "variant": variant}
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    answer = httpx.post(url + "/turnout/assignments", json=pin, headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text


def test_same_subject_same_variant_across_a_restart_and_without_redis(tmp_path: Path) -> None:
    """Row 25: 3000 subjects split 70/30 within +-2 points, each exactly as the sticky draw
    says; the same variants after a gateway restart and after Redis is killed (requests still
    served); an admin's pin holds while Redis is up and gives way to the hash while it is not."""
    env = {"STICKY_ADMIN_KEY": ADMIN_KEY}
    opposite = {"a": "b", "b": "a"}[_hashed(PINNED)]
    with private_redis() as redis_server:
        config = _config(redis_server.url)
        with serve(tmp_path, config, env=env) as first:
            before = asyncio.run(_variants(first.url, SUBJECTS))
            _pin(first.url, PINNED, opposite)
            pinned_before = _served(first.url, PINNED)
        with serve(tmp_path, config, env=env) as second:  # a restart: a new process
            restarted = asyncio.run(_variants(second.url, CHECKED))
            pinned_restarted = _served(second.url, PINNED)
            _kill(redis_server)
            without_redis = asyncio.run(_variants(second.url, CHECKED))
            pinned_without_redis = _served(second.url, PINNED)
            ready = httpx.get(second.url + "/readyz").json()
    share = Counter(before.values())["a"] / len(before)
    print(f"split over {len(before)} subjects: a {share:.4f} (weight 0.70)")
    assert abs(share - 0.70) <= TOLERANCE, share
    assert before == {s: _hashed(s) for s in SUBJECTS}
    assert restarted == {s: before[s] for s in CHECKED}
    assert without_redis == {s: before[s] for s in CHECKED}
    assert pinned_before == pinned_restarted == opposite  # the pin lives in Redis
    assert pinned_without_redis == _hashed(PINNED)  # Redis away: the hash decides
    assert ready["status"] == "degraded", ready


def _kill(server: RedisServer) -> None:
    server.kill()
