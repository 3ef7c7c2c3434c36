"""Issue #9, row 9: the client goes away — before the first token, mid-stream, during a
non-streaming call — and Turnout lets go of everything it held for it.

The upstream connection runs through tests/reliability/faultproxy.py (passing traffic), which
sees the moment Turnout closes it. The client holds a key with a tokens-per-minute limit and a
dollar budget that one request's hold nearly fills, so a hold that was not given back shows as
a 429 on the next request. Records and metrics are read through Turnout's own API.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Upstreams, base_config, running
from tests.reliability.faultproxy import (
    USER,
    FaultProxy,
    chat,
    fake_upstreams,
    get,
    metric,
    record_of,
)

KEY = "sk-client-disconnects-0001"
PRICE = {"input_per_mtok": 100.0, "output_per_mtok": 100.0}
MAX_TOKENS = 2000  # held for each request: 2000 of the key's 3000 tokens a minute, and
TPM = 3000  # about $0.20 of its $0.30 budget: two holds at once do not fit
BUDGET_USD = 0.30
LONG = {"connect": 2.0, "first_byte": 30.0, "idle": 30.0, "total": 30.0}
CLOSED_WITHIN_S = 1.0
GIVE_UP_S = 0.4  # the client's patience before the first token / the answer

# case -> (upstream model behind the proxy, streamed?)
CASES = {
    "before-first-token": ("slow-first-token", True),
    "mid-stream": ("stream-slow", True),
    "non-streaming": ("hang", False),
}


@pytest.fixture(scope="module")
def fake() -> Iterator[Upstreams]:
    with fake_upstreams() as upstreams:
        yield upstreams


def _config(fake: Upstreams, proxy_url: str) -> dict[str, Any]:
    config = base_config(fake, **LONG)
    config["upstreams"]["proxied"] = {
        "kind": "openai", "base_url": proxy_url + "/v1", "timeouts": LONG
    }  # fmt: skip
    for case, (model, _) in CASES.items():
        config["variants"][case] = {"upstream": "proxied", "model": model, "price": PRICE}
        config["routes"][case] = {"split": {case: 1}}
    config["variants"]["after"] = {"upstream": "hosted", "model": "ok", "price": PRICE}
    config["routes"]["after"] = {"split": {"after": 1}}
    sha = hashlib.sha256(KEY.encode()).hexdigest()
    config["keys"] = [
        {"name": "app", "sha256": sha, "tpm": TPM, "budget": {"usd": BUDGET_USD, "per": "day"}}
    ]
    return config


def _leave(url: str, case: str, request_id: str) -> float:
    """Send the case's request and go away as the case says; the monotonic time it left."""
    _, streamed = CASES[case]
    headers = {"authorization": f"Bearer {KEY}", "x-request-id": request_id}
    body = {"model": case, "messages": USER, "stream": streamed, "max_tokens": MAX_TOKENS}
    with httpx.Client(headers=headers, timeout=10) as client:
        if case == "mid-stream":
            with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                parts = response.iter_raw()
                next(parts)
                next(parts)
                # While this request holds its share, another that needs as much is refused:
                # the holds are big enough to show whether they are given back.
                held = {"model": "after", "messages": USER, "max_tokens": MAX_TOKENS}
                auth = {"authorization": f"Bearer {KEY}"}
                assert chat(url, held, headers=auth).response.status_code == 429
                time.sleep(0.2)  # a few more tokens are generated and relayed meanwhile
        else:
            with pytest.raises(httpx.ReadTimeout):
                client.post(url + "/v1/chat/completions", json=body, timeout=GIVE_UP_S)
    return time.monotonic()


def _admitted_again(url: str) -> float:
    """Seconds until a request needing a whole hold is admitted (429 while one is held)."""
    started = time.monotonic()
    body = {"model": "after", "messages": USER, "max_tokens": MAX_TOKENS}
    auth = {"authorization": f"Bearer {KEY}"}
    while (response := chat(url, body, headers=auth).response).status_code == 429:
        assert time.monotonic() - started < 2.0, f"the hold was never given back: {response.text}"
        time.sleep(0.05)
    assert response.status_code == 200, response.text
    return time.monotonic() - started


@pytest.mark.parametrize("case", list(CASES))
def test_row09_client_disconnect_closes_upstream_releases_holds_recorded_as_499(
    fake: Upstreams, case: str
) -> None:
    """Row 9: a client that leaves before the first token, mid-stream, or during a
    non-streaming call. Turnout closes the upstream connection within 1 s; gives back the
    key's token and budget holds (the next request that needs them is admitted); records the
    request as a client disconnect (499, status class client_closed), not as an upstream
    failure (no failed attempt counted, no circuit touched); and accounts the tokens actually
    generated: the prompt, and on a stream what was relayed, at the variant's price."""
    request_id = f"row9-{uuid.uuid4().hex[:12]}"
    with FaultProxy(fake.urls[0]) as proxy:
        with running(_config(fake, proxy.url)) as (url, _):
            left = _leave(url, case, request_id)
            closed = proxy.wait_open(0, timeout=CLOSED_WITHIN_S + 2.0)
            record = record_of(url, request_id)
            readmitted = _admitted_again(url)
            closed_class = metric(
                url, "turnout_requests_total", variant=case, status_class="client_closed"
            )
            failed = sum(
                metric(url, "turnout_upstream_attempts_total", upstream="proxied", outcome=o)
                for o in ("error", "timeout", "rejected")
            )
            degraded = get(url + "/readyz").json()["degraded"]
        assert proxy.connections == 1
    assert closed is not None, "the upstream connection was never closed"
    assert closed - left < CLOSED_WITHIN_S, f"closed {closed - left:.2f} s after the client left"
    assert record["status"] == 499 and record["variant"] == case
    assert closed_class == 1 and failed == 0 and degraded == []
    usage = record["usage"]
    assert usage["prompt"] > 0
    tokens = usage["prompt"] + usage.get("completion", 0)
    assert record["cost_usd"] == pytest.approx(tokens * 100.0 / 1e6)
    if case == "mid-stream":
        assert usage["completion"] >= 2 and usage["estimated"]  # the events relayed, counted
    else:
        assert usage.get("completion", 0) == 0  # nothing was generated before it left
    print(
        f"FIGURE row 9: {case}: upstream closed {closed - left:+.3f} s after the client left; "
        f"499 recorded, {usage.get('completion', 0)} completion tokens accounted, "
        f"holds back in {readmitted:.2f} s"
    )
