"""Row 23, metrics cardinality: 10,000 requests, each with junk of its own (model names, keys,
users, sticky header values, request ids, forced variants, paths, bodies) do not add one
series to /metrics. Label values are only configured names or the bounded fallbacks
("other", "none"); none of the junk appears in the exposition."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.reliability.gateway_process import Served, serve

KEY = "sk-cardinality-client-0001"
JUNK = 10_000
WARM = 30  # of each kind, before the series are counted
CONNECTIONS = 8
PIPELINE = 50  # requests written at once on a connection before reading their answers
MAX_SERIES = 300  # 2 routes x 2 variants (+ "other"/"none"), their histograms' buckets
MARK = "zq"  # every junk value contains it; it must never reach /metrics


def _config() -> dict[str, Any]:
    return {
        "upstreams": {"sim": {"kind": "simulated", "ttft_ms": 0, "tokens_per_s": 1_000_000}},
        "variants": {
            "a": {"upstream": "sim", "model": "m"},
            "b": {"upstream": "sim", "model": "m"},
        },
        "routes": {
            "r": {"split": {"a": 50, "b": 50}, "sticky": "user"},
            "hdr": {"split": {"a": 50, "b": 50}, "sticky": "header:x-tenant"},
        },
        "keys": [{"name": "app", "sha256": hashlib.sha256(KEY.encode()).hexdigest()}],
    }


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve(tmp_path_factory.mktemp("cardinality"), _config()) as served:
        yield served


def junk(i: int, rng: random.Random) -> str:
    """A fresh junk value: printable, some of it shaped like label or exposition injection."""
    shapes = [
        f"{MARK}-model-{i}-{rng.getrandbits(64):x}",
        f'{MARK}"}} 1\\nturnout_requests_total{{route="{i}',
        f"{MARK}/../{i}/%2e%2e/adapter#{i}",
        f"{MARK} é {i} ünïcödé",
        f"{MARK}{'x' * rng.randrange(1, 200)}{i}",
    ]
    return shapes[i % len(shapes)]


def request(i: int, rng: random.Random) -> tuple[bytes, int]:
    """The i-th junk request (as raw HTTP) and the status class it must get."""
    value = junk(i, rng)
    ascii_value = value.encode("ascii", "replace").decode().replace("\\n", "n")
    headers = {
        "authorization": f"Bearer {KEY}",
        "x-request-id": ascii_value[:200],
        "x-tenant": ascii_value,
        "user-agent": ascii_value,
        f"x-{MARK}-{i % 1000}": ascii_value,
    }
    body: dict[str, Any] = {"model": "r", "messages": [{"role": "user", "content": value}]}
    body["user"] = value
    body["max_tokens"] = 2
    path, expect = "/v1/chat/completions", 2
    match i % 8:
        case 0 | 1:  # an unknown model: 404
            body["model"], expect = value, 4
        case 2:  # an unknown key: 401
            headers["authorization"], expect = (
                f"Bearer {value.encode('ascii', 'replace').decode()}",
                4,
            )
        case 3 | 4:  # the sticky-header route, a new tenant each time: 200
            body["model"] = "hdr"
        case 5:  # a forced variant without the admin key: 403
            headers["x-turnout-variant"], expect = ascii_value, 4
        case 6:  # a path that does not exist: 404
            path, expect = f"/v1/{MARK}-{i}", 4
        case _:  # a body Turnout refuses: 400
            body["messages"], body["model"], expect = value, value, 4
    payload = json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.1", "host: gateway", "content-type: application/json"]
    head += [f"{name}: {text}" for name, text in headers.items()]
    head.append(f"content-length: {len(payload)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload, expect


async def _read_answer(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    await reader.readexactly(length)
    return status


async def send_all(served: Served, requests: list[tuple[bytes, int]]) -> list[tuple[int, int]]:
    """Every request, pipelined over CONNECTIONS connections: (status, expected class)."""
    host, port = served.url.removeprefix("http://").split(":")
    results: list[tuple[int, int]] = []

    async def connection(share: list[tuple[bytes, int]]) -> None:
        reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 20)
        try:
            for start in range(0, len(share), PIPELINE):
                batch = share[start : start + PIPELINE]
                writer.write(b"".join(raw for raw, _ in batch))
                for _, expect in batch:
                    results.append((await _read_answer(reader), expect))
        finally:
            writer.close()
            await writer.wait_closed()

    await asyncio.gather(*(connection(requests[i::CONNECTIONS]) for i in range(CONNECTIONS)))
    return results


def series(served: Served) -> tuple[set[tuple[str, tuple[tuple[str, str], ...]]], str]:
    """Every sample (name and labels) /metrics exposes, and the text itself."""
    text = httpx.get(served.url + "/metrics", timeout=10).text
    found = {
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return found, text


def test_ten_thousand_junk_requests_add_no_series(gateway: Served) -> None:
    rng = random.Random(23)
    fresh, _ = series(gateway)
    warm = [request(i, rng) for i in range(WARM * 8)]
    assert all(status // 100 == expect for status, expect in asyncio.run(send_all(gateway, warm)))
    before, _ = series(gateway)
    flood = [request(i, rng) for i in range(WARM * 8, WARM * 8 + JUNK)]
    answers = asyncio.run(send_all(gateway, flood))
    assert len(answers) == JUNK
    wrong = [(status, expect) for status, expect in answers if status // 100 != expect]
    assert wrong == []
    after, text = series(gateway)
    added = after - before
    print(
        f"series: {len(fresh)} fresh, {len(before)} after {WARM * 8} warm-up requests, "
        f"{len(after)} after {JUNK} more junk requests (+{len(added)}); "
        f"/metrics {len(text)} bytes"
    )
    assert added == set()  # the delta: 0 series for 10,000 distinct junk values
    assert len(after) - len(fresh) <= MAX_SERIES  # all of it: the configured names' series
    assert MARK not in text
    labels: dict[str, set[str]] = {}
    for _, pairs in after:
        for name, value in pairs:
            labels.setdefault(name, set()).add(value)
    assert labels["route"] <= {"r", "hdr", "other"}
    assert labels["variant"] <= {"a", "b", "none"}
    assert labels["upstream"] <= {"sim", "none"}
    assert labels["status_class"] <= {"1xx", "2xx", "3xx", "4xx", "5xx", "client_closed"}
    assert len(text) < 200_000
