"""The simulated upstream: a raw ASGI app that answers like vLLM's OpenAI server."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, MutableMapping
from types import MappingProxyType
from typing import Any

import msgspec

from gateway.tokens import TokenCounter
from serving.sim_answers import Answers, load_answers
from serving.sim_requests import (
    Generation,
    SimError,
    answer_with,
    parse_chat,
    parse_completion,
    parse_embedding,
    parse_object,
)
from serving.sim_responses import completion_body, embedding_body, models_body, stream_steps

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Handler = Callable[[Receive, Send], Awaitable[None]]
Parser = Callable[[dict[str, Any], TokenCounter, int], Generation]

JSON = b"application/json"
SSE = b"text/event-stream; charset=utf-8"
PROMETHEUS = b"text/plain; version=0.0.4; charset=utf-8"


class SimProfile(msgspec.Struct, frozen=True, kw_only=True):
    """How the simulated upstream behaves; bad values are refused at construction."""

    ttft_ms: float = 50.0
    tokens_per_s: float = 200.0
    failure_rate: float = 0.0
    completion_tokens: int = 16
    models: tuple[str, ...] = ()
    seed: int | None = None
    # A task it knows: a JSON-lines file of {"messages"|"prompt", "expected"} (the format of
    # `turnout eval` datasets), and per served model the share of those answered right
    # (a model not listed: all of them). See serving/sim_answers.py.
    answers: str | None = None
    accuracy: dict[str, float] = {}

    def __post_init__(self) -> None:
        if not (math.isfinite(self.ttft_ms) and self.ttft_ms >= 0):
            raise ValueError("ttft_ms must be a finite number >= 0")
        if math.isnan(self.tokens_per_s) or self.tokens_per_s <= 0:
            raise ValueError("tokens_per_s must be > 0 (inf: no delay between tokens)")
        if not 0.0 <= self.failure_rate <= 1.0:
            raise ValueError("failure_rate must be in [0, 1]")
        if self.completion_tokens < 0:
            raise ValueError("completion_tokens must be >= 0")
        for model, share in self.accuracy.items():
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"accuracy of {model!r} must be in [0, 1]")


class _Counters:
    """Totals behind /metrics, one set per app."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.running = 0
        self.success = 0


PROFILES: Mapping[str, SimProfile] = MappingProxyType(
    {
        # A LoRA adapter on a vLLM GPU replica: quick first token, fast decode.
        "vllm-lora": SimProfile(ttft_ms=30.0, tokens_per_s=120.0),
        # A hosted API over the internet: slower first token and decode.
        "hosted": SimProfile(ttft_ms=250.0, tokens_per_s=60.0),
        # No delays at all: for benchmarks, where the upstream must never be the bottleneck.
        "instant": SimProfile(ttft_ms=0.0, tokens_per_s=math.inf),
        # A flaky upstream: one request in ten fails with a 500.
        "flaky": SimProfile(ttft_ms=50.0, tokens_per_s=200.0, failure_rate=0.1),
    }
)


def create_simulated_app(profile: SimProfile) -> ASGIApp:
    """A fresh simulated upstream with its own counters, random draws and tokenizer."""
    return _SimApp(profile)


def run_simulated(profile: SimProfile, host: str, port: int) -> None:
    """Serve the simulated upstream with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(
        create_simulated_app(profile),
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


class _SimApp:
    def __init__(self, profile: SimProfile) -> None:
        self.profile = profile
        self.tokens = TokenCounter()
        self.counters = _Counters()
        self.rng = random.Random(profile.seed)
        self.created = int(time.time())
        self.gap = 1.0 / profile.tokens_per_s
        # Read once, here: a bad file fails the start, never a request.
        self.answers: Answers | None = load_answers(profile.answers) if profile.answers else None
        self.routes: dict[str, tuple[bytes, Handler]] = {
            "/health": (b"GET", self._health),
            "/metrics": (b"GET", self._metrics),
            "/v1/models": (b"GET", self._models),
            "/v1/chat/completions": (b"POST", self._chat),
            "/v1/completions": (b"POST", self._completions),
            "/v1/embeddings": (b"POST", self._embeddings),
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        route = self.routes.get(scope["path"])
        try:
            if route is None:
                raise SimError(404, f"Not found: {scope['path']}")
            if scope["method"].encode() != route[0]:
                raise SimError(405, f"Method {scope['method']} not allowed.")
            await route[1](receive, send)
        except SimError as exc:
            allow = [(b"allow", route[0])] if route and exc.status == 405 else []
            await _respond(send, exc.status, exc.body(), JSON, allow)

    async def _health(self, receive: Receive, send: Send) -> None:
        await _respond(send, 200, b"", JSON)

    async def _models(self, receive: Receive, send: Send) -> None:
        await _respond(send, 200, models_body(self.profile.models, self.created), JSON)

    async def _metrics(self, receive: Receive, send: Send) -> None:
        await _respond(send, 200, self._metrics_text(), PROMETHEUS)

    async def _chat(self, receive: Receive, send: Send) -> None:
        await self._generate(receive, send, self._parse_chat)

    def _parse_chat(
        self, body: dict[str, Any], counter: TokenCounter, default_tokens: int
    ) -> Generation:
        """A chat request; one whose last user message is a known question gets its answer
        (right or wrong by the model's accuracy) instead of pseudo-words."""
        gen = parse_chat(body, counter, default_tokens)
        if self.answers is not None:
            text = self.answers.answer(
                body["messages"], gen.model, self.profile.accuracy, self.profile.seed
            )
            if text is not None:
                answer_with(gen, body, counter, text)
        return gen

    async def _completions(self, receive: Receive, send: Send) -> None:
        await self._generate(receive, send, parse_completion)

    async def _embeddings(self, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
        if body is None:
            return
        request = parse_embedding(parse_object(body), self.tokens)
        self._admit(request.model)
        self.counters.prompt_tokens += sum(count for _, count in request.inputs)
        await _respond(send, 200, embedding_body(request), JSON)
        self.counters.success += 1

    async def _generate(self, receive: Receive, send: Send, parse: Parser) -> None:
        body = await _read_body(receive)
        if body is None:
            return
        gen = parse(parse_object(body), self.tokens, self.profile.completion_tokens)
        self._admit(gen.model)
        self.counters.prompt_tokens += gen.prompt_tokens
        self.counters.running += 1
        try:
            work = self._stream(gen, send) if gen.stream else self._answer(gen, send)
            if self._due(max(_length(gen), 1)) > 0:
                await _until_disconnect(work, receive)
            else:
                await work
        finally:
            self.counters.running -= 1

    def _admit(self, model: str) -> None:
        """404 for a model this profile does not serve; 500 on a failure draw."""
        if self.profile.models and model not in self.profile.models:
            raise SimError(404, f"The model `{model}` does not exist.", param="model")
        rate = self.profile.failure_rate
        if rate > 0 and self.rng.random() < rate:
            raise SimError(500, "Simulated upstream failure.")

    def _due(self, tokens: int) -> float:
        """Seconds from arrival until `tokens` tokens have been generated."""
        if tokens <= 0:
            return 0.0
        return self.profile.ttft_ms / 1000.0 + (tokens - 1) * self.gap

    async def _answer(self, gen: Generation, send: Send) -> None:
        delay = self._due(_length(gen))
        if delay > 0:
            await asyncio.sleep(delay)
        self.counters.generation_tokens += gen.completion_tokens
        await _respond(send, 200, completion_body(gen), JSON)
        self.counters.success += 1

    async def _stream(self, gen: Generation, send: Send) -> None:
        """Send each token step when due; steps already due go out in one write."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        per_step = len(gen.choices) if _length(gen) else 0
        pending = bytearray()
        started = False
        for step, blob in enumerate(stream_steps(gen)):
            wait = start + self._due(step + 1) - loop.time()
            if wait > 0:
                if pending:
                    started = await _send_sse(send, pending, started, more=True)
                await asyncio.sleep(wait)
            pending += blob
            self.counters.generation_tokens += per_step
        await _send_sse(send, pending, started, more=False)
        self.counters.success += 1

    def _metrics_text(self) -> bytes:
        name = self.profile.models[0] if self.profile.models else "turnout-sim"
        escaped = name.replace("\\", "\\\\").replace('"', '\\"')
        label = f'{{model_name="{escaped}"}}'
        c = self.counters
        series = (
            ("vllm:prompt_tokens_total", "counter", "Prefill tokens processed.", c.prompt_tokens),
            ("vllm:generation_tokens_total", "counter", "Generation tokens.", c.generation_tokens),
            ("vllm:request_success_total", "counter", "Finished requests.", c.success),
            ("vllm:num_requests_running", "gauge", "Requests being generated.", c.running),
            ("vllm:num_requests_waiting", "gauge", "Requests waiting.", 0),
        )
        lines = []
        for metric, kind, text, value in series:
            lines += [f"# HELP {metric} {text}", f"# TYPE {metric} {kind}"]
            lines.append(f"{metric}{label} {float(value)}")
        return ("\n".join(lines) + "\n").encode()


def _length(gen: Generation) -> int:
    return len(gen.choices[0]) if gen.choices else 0


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None when the client went away first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _until_disconnect(work: Coroutine[Any, Any, None], receive: Receive) -> None:
    """Run `work` to its end, or cancel it as soon as the client disconnects."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()
        watcher.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if not task.cancelled() and (exc := task.exception()) is not None:
        raise exc


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send(
        {"type": "http.response.start", "status": status, "headers": headers + (extra or [])}
    )
    await send({"type": "http.response.body", "body": body})


async def _send_sse(send: Send, data: bytearray, started: bool, *, more: bool) -> bool:
    """Send `data` (starting the response first if needed) and empty it; returns True."""
    if not started:
        headers = [(b"content-type", SSE), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": bytes(data), "more_body": more})
    data.clear()
    return True
