"""Row 21, overload at 3x capacity: a gateway with `server.max_in_flight` refuses what it has no
room for at once (503 `overloaded` with Retry-After), keeps the requests it admits as fast as
when it is idle, loses none, and says so on /readyz while /livez stays up."""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.reliability.gateway_process import Client, Reply, serve

CAPACITY = 16  # server.max_in_flight: requests in flight one process takes
UPSTREAM_S = 0.3  # the simulated upstream's time to answer (first token; the rest is instant)
CAPACITY_RPS = CAPACITY / UPSTREAM_S  # ~53 requests a second
BODY = {"model": "r", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
SHED_BOUND_S = 0.1  # a refusal comes back this fast (p99)
ADMITTED_RATIO = 1.5  # admitted p99 at most this many times the unloaded p99


def _config() -> dict[str, Any]:
    return {
        "server": {"max_in_flight": CAPACITY},
        "upstreams": {
            "sim": {"kind": "simulated", "ttft_ms": UPSTREAM_S * 1000, "tokens_per_s": 100_000}
        },
        "variants": {"v": {"upstream": "sim", "model": "m"}},
        "routes": {"r": {"split": {"v": 1}}},
    }


async def _open_loop(client: Client, rate: float, seconds: float) -> list[Reply]:
    """Requests sent at `rate` a second for `seconds`, each on schedule whatever the others do
    (an open loop: a slow gateway does not slow the arrivals down)."""

    async def one(at: float) -> Reply:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        return await client.request("POST", "/v1/chat/completions", BODY)

    start = time.monotonic() + 0.05
    count = round(rate * seconds)
    return await asyncio.gather(*(one(start + i / rate) for i in range(count)))


async def _probe(client: Client, until: asyncio.Event) -> list[tuple[str, int, str]]:
    """(path, status, readiness status) of /livez and /readyz, ten times a second."""
    seen: list[tuple[str, int, str]] = []
    while not until.is_set():
        for path in ("/livez", "/readyz"):
            reply = await client.request("GET", path)
            seen.append((path, reply.status, reply.body.get("status", "")))
        await asyncio.sleep(0.1)
    return seen


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) > 1 else values[0]


def _requests_counted(metrics: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(metrics):
        if family.name == "turnout_requests":
            total += sum(s.value for s in family.samples if s.name == "turnout_requests_total")
    return total


async def _run(url: str) -> tuple[list[Reply], list[Reply], list[tuple[str, int, str]]]:
    client, prober = Client(url), Client(url)
    try:
        unloaded = await _open_loop(client, CAPACITY_RPS / 4, 2.0)
        done = asyncio.Event()
        probes = asyncio.create_task(_probe(prober, done))
        loaded = await _open_loop(client, 3 * CAPACITY_RPS, 4.0)
        done.set()
        return unloaded, loaded, await probes
    finally:
        await client.aclose()
        await prober.aclose()


def _check_answer(reply: Reply) -> None:
    if reply.status == 200:
        assert reply.body["choices"][0]["finish_reason"] is not None, reply.body
        return
    assert reply.status == 503, reply.body
    assert set(reply.body["error"]) == {"message", "type", "param", "code"}
    assert reply.body["error"]["code"] == "overloaded"
    assert reply.retry_after is not None and int(reply.retry_after) >= 1


async def _settled_count(url: str, expected: int) -> float:
    """The gateway's request count once every answered request is recorded."""
    async with httpx.AsyncClient() as http:
        for _ in range(50):
            counted = _requests_counted((await http.get(url + "/metrics")).text)
            if counted >= expected:
                return counted
            await asyncio.sleep(0.1)
    return counted


def _seconds_until_ready(url: str) -> float:
    started = time.monotonic()
    while httpx.get(url + "/readyz").status_code != 200:
        assert time.monotonic() - started < 10, "never ready again"
        time.sleep(0.05)
    return time.monotonic() - started


def test_overload_at_three_times_capacity(tmp_path: Path) -> None:
    """Row 21: at 3x capacity, the excess gets 503 + Retry-After in < 100 ms (p99), admitted
    requests keep p99 <= 1.5x the unloaded p99, every request is answered and counted, and
    /livez answers 200 while /readyz says `overloaded` (503), ready again once the load ends."""
    with serve(tmp_path, _config()) as served:
        unloaded, loaded, probes = asyncio.run(_run(served.url))
        ready_again = _seconds_until_ready(served.url)
        counted = asyncio.run(_settled_count(served.url, len(unloaded) + len(loaded)))
    for reply in unloaded + loaded:
        _check_answer(reply)
    assert {r.status for r in unloaded} == {200}
    admitted = [r.latency for r in loaded if r.status == 200]
    shed = [r.latency for r in loaded if r.status == 503]
    # Really overloaded: about two thirds refused; and the admitted ones filled the capacity.
    assert len(shed) > len(loaded) / 3, (len(shed), len(loaded))
    assert len(admitted) > 0.5 * CAPACITY_RPS * 4.0, len(admitted)
    baseline, admitted_p99, shed_p99 = (
        _p99([r.latency for r in unloaded]),
        _p99(admitted),
        _p99(shed),
    )
    figures = (
        f"unloaded p99 {baseline:.3f} s, admitted p99 {admitted_p99:.3f} s, "
        f"shed p99 {shed_p99:.3f} s"
    )
    assert shed_p99 < SHED_BOUND_S, figures
    assert admitted_p99 <= ADMITTED_RATIO * baseline, figures
    # No request lost: each one answered (above) and counted by the gateway, refusals included.
    assert counted == len(unloaded) + len(loaded), (counted, len(unloaded) + len(loaded))
    live = [status for path, status, _ in probes if path == "/livez"]
    ready = [(status, state) for path, status, state in probes if path == "/readyz"]
    assert live and set(live) == {200}, probes
    assert (503, "overloaded") in ready, ready
    assert ready_again < 3.0, ready_again  # refusals stopped: ready after HOLD_S (1 s)
    print(figures, f"{len(admitted)} admitted, {len(shed)} shed")
