"""Row 20, slow clients: slowloris (a request head one byte at a time), slow POST (the body
trickled) and a slow reader (a stream nobody reads). Request-receipt deadlines close the first
two (408), the write deadline drops the third and cancels its upstream stream, and while
hundreds of them attack, healthy clients' p99 latency stays within 2x of the unloaded p99.

The gateway is `turnout serve` in its own process (uvicorn + the connection guard of
gateway.serve); the attackers of the p99 test run in a process of their own too, so neither
competes with the measuring client for one interpreter."""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import random
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.fakes import Receive, Scope, Send
from tests.reliability.gateway_process import Served, serve
from tests.servers import serve_app

HEAD_S = 1.0  # server.header_timeout_s
BODY_S = 1.0  # server.receive_timeout_s
WRITE_S = 1.0  # server.write_timeout_s
KEEP_ALIVE_S = 2.0  # server.keep_alive_s
EARLY_S = 0.05  # a deadline runs from the accept, a moment before the client's clock starts
SLACK_S = 1.0  # each deadline is kept to within this
UPSTREAM_S = 0.05  # the simulated upstream's time to first token: the healthy latency
CHAT = {"model": "r", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
EVENT_BYTES = 64 * 1024  # the firehose's events


@dataclass
class Firehose:
    """An upstream that streams 64 KiB events until its client goes; what it saw."""

    sent: int = 0
    started: threading.Event = field(default_factory=threading.Event)
    gone: threading.Event = field(default_factory=threading.Event)
    gone_at: float | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body", False):
            pass
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        watcher = asyncio.ensure_future(self._watch(receive))
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "fire"}
        delta = {"index": 0, "delta": {"content": "a" * EVENT_BYTES}, "finish_reason": None}
        event = b"data: " + json.dumps(chunk | {"choices": [delta]}).encode() + b"\n\n"
        self.started.set()
        while not watcher.done():
            await send({"type": "http.response.body", "body": event, "more_body": True})
            self.sent += len(event)
            await asyncio.sleep(0)

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone_at = time.monotonic()
        self.gone.set()


def _config(firehose_url: str) -> dict[str, Any]:
    return {
        "server": {
            "header_timeout_s": HEAD_S,
            "receive_timeout_s": BODY_S,
            "write_timeout_s": WRITE_S,
            "keep_alive_s": KEEP_ALIVE_S,
        },
        "upstreams": {
            "sim": {"kind": "simulated", "ttft_ms": UPSTREAM_S * 1000, "tokens_per_s": 100_000},
            "long": {
                "kind": "simulated",
                "ttft_ms": 1,
                "tokens_per_s": 50,  # a model's pace: slow readers hold streams
                "completion_tokens": 1_000_000,
            },
            "fire": {"kind": "openai", "base_url": firehose_url + "/v1"},
        },
        "variants": {
            "v": {"upstream": "sim", "model": "m"},
            "long": {"upstream": "long", "model": "m"},
            "fire": {"upstream": "fire", "model": "fire"},
        },
        "routes": {
            "r": {"split": {"v": 1}},
            "long": {"split": {"long": 1}},
            "fire": {"split": {"fire": 1}},
        },
    }


@pytest.fixture(scope="module")
def firehose() -> Iterator[tuple[str, Firehose]]:
    app = Firehose()
    with serve_app(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, firehose: tuple[str, Firehose]
) -> Iterator[Served]:
    with serve(tmp_path_factory.mktemp("slow"), _config(firehose[0])) as served:
        yield served


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _json_head(path: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


@dataclass
class Ending:
    after: float  # seconds from the connection's start until the gateway closed it
    answer: bytes  # what the gateway sent before closing


async def trickle(
    url: str, data: bytes, every_s: float, prefix: bytes = b"", limit_s: float = 10.0
) -> Ending:
    """Send `prefix` at once, then `data` one byte every `every_s`, until the gateway closes
    the connection."""
    reader, writer = await asyncio.open_connection(*_address(url))
    started = time.monotonic()
    writer.write(prefix)
    answer = b""

    async def drip() -> None:
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()
            await asyncio.sleep(every_s)
        await asyncio.sleep(limit_s)

    dripping = asyncio.ensure_future(drip())
    try:
        async with asyncio.timeout(limit_s):
            while chunk := await reader.read(65536):
                answer += chunk
    except ConnectionResetError:
        pass
    finally:
        dripping.cancel()
        writer.close()
    return Ending(time.monotonic() - started, answer)


def _status(answer: bytes) -> int | None:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None


def _error_code(answer: bytes) -> str:
    body = answer.partition(b"\r\n\r\n")[2]
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return str(error["code"])


async def test_slowloris_head_is_answered_408_and_closed(gateway: Served) -> None:
    body = json.dumps(CHAT).encode()
    head = _json_head("/v1/chat/completions", len(body))
    ending = await trickle(gateway.url, head, every_s=0.05)
    assert HEAD_S - EARLY_S <= ending.after <= HEAD_S + SLACK_S
    assert _status(ending.answer) == 408
    assert _error_code(ending.answer) == "request_timeout"


async def test_a_connection_that_sends_nothing_is_closed(gateway: Served) -> None:
    ending = await trickle(gateway.url, b"", every_s=0.05)
    assert HEAD_S - EARLY_S <= ending.after <= HEAD_S + SLACK_S
    assert ending.answer == b""  # nothing of a request came: closed without an answer


async def test_an_idle_keep_alive_connection_is_closed(gateway: Served) -> None:
    reader, writer = await asyncio.open_connection(*_address(gateway.url))
    body = json.dumps(CHAT).encode()
    writer.write(_json_head("/v1/chat/completions", len(body)) + body)
    answer = await asyncio.wait_for(reader.read(65536), 5)
    answered = time.monotonic()
    assert _status(answer) == 200
    while await asyncio.wait_for(reader.read(65536), KEEP_ALIVE_S + SLACK_S + 5):
        pass
    writer.close()
    assert KEEP_ALIVE_S - EARLY_S <= time.monotonic() - answered <= KEEP_ALIVE_S + SLACK_S


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/turnout/feedback"])
async def test_slow_post_is_answered_408_and_closed(gateway: Served, path: str) -> None:
    body = json.dumps(CHAT).encode()  # the head at once, then the body byte by byte
    ending = await trickle(gateway.url, body, every_s=0.05, prefix=_json_head(path, len(body)))
    assert BODY_S - EARLY_S <= ending.after <= BODY_S + SLACK_S
    assert _status(ending.answer) == 408
    assert _error_code(ending.answer) == "request_timeout"


async def test_a_slow_but_steady_body_within_the_deadline_is_served(gateway: Served) -> None:
    body = json.dumps(CHAT).encode()
    third = len(body) // 3 + 1
    reader, writer = await asyncio.open_connection(*_address(gateway.url))
    writer.write(_json_head("/v1/chat/completions", len(body)))
    for part in (body[:third], body[third : 2 * third], body[2 * third :]):
        await asyncio.sleep(BODY_S / 4)
        writer.write(part)
    answer = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    assert _status(answer) == 200


def test_a_slow_readers_upstream_stream_is_cancelled_past_the_write_timeout(
    gateway: Served, firehose: tuple[str, Firehose]
) -> None:
    """The client reads the head and stops. Once the sockets' buffers are full the gateway's
    writes cannot proceed; WRITE_S later the connection is dropped and the upstream stream
    closed, so the upstream stops generating for nobody."""
    fire = firehose[1]
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(_address(gateway.url))
        body = json.dumps({**CHAT, "model": "fire", "stream": True}).encode()
        sock.sendall(_json_head("/v1/chat/completions", len(body)) + body)
        sock.settimeout(10)
        assert _status(sock.recv(4096)) == 200
        assert fire.started.wait(5)
        stopped_reading = time.monotonic()
        assert fire.gone.wait(WRITE_S + 10), "the upstream stream was never cancelled"
        assert fire.gone_at is not None
        cancelled_after = fire.gone_at - stopped_reading
        sent = fire.sent
        time.sleep(0.2)
        assert fire.sent == sent  # and it stays stopped
        # The client's connection was dropped too: its buffered bytes, then the end (an
        # orderly one or a reset; a connection still open would time out here).
        with contextlib.suppress(ConnectionResetError):
            while sock.recv(1 << 20):
                pass
    print(
        f"upstream stream cancelled {cancelled_after:.2f} s after the reader stalled "
        f"(write timeout {WRITE_S:g} s), after {sent / 1e6:.1f} MB"
    )
    # The buffers fill within a fraction of a second at the firehose's rate.
    assert cancelled_after <= WRITE_S + SLACK_S + 1.0
    assert sent < 256 * 1024 * 1024  # generation stopped when the reader stalled


# --- healthy clients during an attack -------------------------------------------------------

HEALTHY_CLIENTS = 8
ATTEMPTS = 3
ROUNDS = 3  # quiet and attacked windows alternate, so both see the machine's drifting load
QUIET_S = 1.0
RAMP_S = HEAD_S  # after the attack is switched on, before measuring: every attacker arrived
ATTACKED_S = 1.5
SLOWLORIS = 200
SLOW_POSTS = 50
SLOW_READERS = 4
DRIP_S = 0.5  # an attacker's pace: 2 bytes a second


async def healthy(url: str, seconds: float) -> list[float]:
    """HEALTHY_CLIENTS clients sending one request after another; their latencies."""
    latencies: list[float] = []
    stop_at = time.monotonic() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        while time.monotonic() < stop_at:
            started = time.monotonic()
            response = await http.post("/v1/chat/completions", json=CHAT)
            assert response.status_code == 200, response.text
            latencies.append(time.monotonic() - started)

    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        await asyncio.gather(*(client(http) for _ in range(HEALTHY_CLIENTS)))
    return latencies


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


async def _attack(url: str, on: Any, stop: Any) -> dict[str, int]:
    """While `on` is set: slowloris and slow POST connections, each reconnecting when the
    gateway drops it, and slow readers holding a stream each (reading nothing) for 3 s at a
    time. While it is clear, no attack connection is open. Until `stop` is set."""
    dropped = {"slowloris": 0, "slow_post": 0, "slow_reader": 0}
    body = json.dumps(CHAT).encode()
    stream = json.dumps({**CHAT, "model": "long", "stream": True, "max_tokens": 30_000})
    loris = _json_head("/v1/chat/completions", len(body))
    reader_head = _json_head("/v1/chat/completions", len(stream)) + stream.encode()

    async def one(kind: str, head: bytes, drip: bytes) -> None:
        while not stop.is_set():
            if not on.is_set():
                await asyncio.sleep(0.05)
                continue
            await asyncio.sleep(random.uniform(0, HEAD_S))  # attackers arrive spread out
            reader, writer = await asyncio.open_connection(*_address(url))
            try:
                writer.write(head)
                if kind == "slow_reader":
                    await reader.read(1024)  # the head of the answer, then nothing more
                    for _ in range(60):  # held for 3 s, or until the attack is off
                        if not on.is_set():
                            break
                        await asyncio.sleep(0.05)
                for i in range(len(drip)):
                    if not on.is_set():
                        break
                    writer.write(drip[i : i + 1])
                    await writer.drain()
                    await asyncio.sleep(DRIP_S)
                    if writer.transport.is_closing():
                        dropped[kind] += 1
                        break
            except OSError:
                dropped[kind] += 1
            finally:
                writer.transport.abort()

    tasks = [one("slowloris", b"", loris) for _ in range(SLOWLORIS)]
    tasks += [one("slow_post", loris, body) for _ in range(SLOW_POSTS)]
    tasks += [one("slow_reader", reader_head, b"") for _ in range(SLOW_READERS)]
    await asyncio.gather(*tasks)
    return dropped


def _attack_process(url: str, on: Any, stop: Any, results: Any) -> None:
    results.put(asyncio.run(_attack(url, on, stop)))


def test_healthy_clients_p99_within_2x_of_baseline_under_attack(gateway: Served) -> None:
    """Quiet and attacked windows alternate; the p99 of all attacked samples is compared with
    the p99 of all quiet ones. The attackers run in a process of their own. The machine is
    shared (other tests, benchmarks): a measurement whose ratio is over is taken again, at
    most ATTEMPTS times in all; a gateway the attack really slows fails every one."""
    context = multiprocessing.get_context("spawn")
    on, stop, results = context.Event(), context.Event(), context.Queue()
    attacker = context.Process(
        target=_attack_process, args=(gateway.url, on, stop, results), daemon=True
    )
    attacker.start()
    ratios: list[float] = []
    try:
        for _ in range(ATTEMPTS):
            quiet, attacked = _measure(gateway.url, on)
            ratios.append(p99(attacked) / p99(quiet))
            print(
                f"healthy p99 {p99(quiet) * 1000:.1f} ms quiet -> "
                f"{p99(attacked) * 1000:.1f} ms under attack ({ratios[-1]:.2f}x; "
                f"{len(quiet)}/{len(attacked)} requests)"
            )
            if ratios[-1] <= 2.0:
                break
        stop.set()
        dropped = results.get(timeout=15)
    finally:
        stop.set()
        attacker.join(10)
        if attacker.is_alive():
            attacker.kill()
    print(f"attack connections dropped by the gateway's deadlines: {dropped}")
    assert min(ratios) <= 2.0, ratios
    # The attack was real: its connections were dropped by the deadlines and came back (the
    # tests above time each drop).
    assert dropped["slowloris"] >= SLOWLORIS
    assert dropped["slow_post"] >= SLOW_POSTS
    assert gateway.proc.poll() is None


def _measure(url: str, on: Any) -> tuple[list[float], list[float]]:
    quiet: list[float] = []
    attacked: list[float] = []
    for _ in range(ROUNDS):
        quiet += asyncio.run(healthy(url, QUIET_S))
        on.set()
        time.sleep(RAMP_S)
        attacked += asyncio.run(healthy(url, ATTACKED_S))
        on.clear()
        time.sleep(0.2)  # the attackers hang up
    return quiet, attacked
