"""`turnout demo`: fine-tuned vs prompted variants on simulated upstreams, measured side by side."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterable, Sequence

import openai
from openai.types.chat import ChatCompletionMessageParam
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from gateway.app import create_app
from gateway.config_check import check_settings
from gateway.records import RequestRecord
from gateway.settings import Settings, VllmUpstream
from router.gpu_cost import break_even_rate, fleet_cost
from serving.loopback import on_loopback
from serving.simulated import SimProfile, create_simulated_app

GPU_HOURLY_USD = 2.49
TICKETS = [
    "I was charged twice for my subscription this month.",
    "The export button crashes the app on Android.",
    "How do I change the email address on my account?",
    "Can you recommend a good book about gardening?",
    "My invoice shows the wrong VAT number.",
    "After the update the dashboard is blank.",
    "I forgot my password and the reset mail never arrives.",
]


def demo_config(vllm_url: str, hosted_url: str) -> dict[str, object]:
    """A route split 70/30 between a LoRA adapter on vLLM and a prompted hosted model."""
    return {
        "upstreams": {
            "ft-vllm": {"kind": "vllm", "urls": [vllm_url], "gpu": {"hourly_usd": GPU_HOURLY_USD}},
            "hosted": {"kind": "openai", "base_url": hosted_url + "/v1"},
        },
        "variants": {
            "support-ft": {"upstream": "ft-vllm", "model": "support-lora"},
            "support-prompted": {
                "upstream": "hosted",
                "model": "gpt-4o-mini",
                "price": {"input_per_mtok": 0.15, "output_per_mtok": 0.60},
                "prompt": {
                    "system": (
                        "You classify customer support tickets. Answer with exactly one of: "
                        "billing, bug, account, other. Billing covers charges, invoices, "
                        "refunds and VAT. Bug covers crashes, blank screens and errors. "
                        "Account covers passwords, e-mail addresses and sign-in."
                    ),
                    "examples": [
                        {"user": "I was charged twice", "assistant": "billing"},
                        {"user": "The app crashes when I open settings", "assistant": "bug"},
                        {"user": "I cannot log in to my account", "assistant": "account"},
                    ],
                },
            },
        },
        "routes": {
            "support": {"split": {"support-ft": 70, "support-prompted": 30}, "sticky": "user"}
        },
    }


async def _drive(base_url: str, count: int, console: Console) -> float:
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="demo", max_retries=0)
    gate = asyncio.Semaphore(8)
    start = time.perf_counter()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("requests through Turnout", total=count)

        async def one(i: int) -> None:
            async with gate:
                await _ask(client, TICKETS[i % len(TICKETS)], f"user-{i % 60}", stream=i % 2 == 1)
            progress.advance(task)

        await asyncio.gather(*(one(i) for i in range(count)))
    await client.close()
    return time.perf_counter() - start


async def _ask(client: openai.AsyncOpenAI, ticket: str, user: str, *, stream: bool) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": ticket}]
    if not stream:
        await client.chat.completions.create(
            model="support", messages=messages, user=user, max_tokens=12
        )
        return
    chunks = await client.chat.completions.create(
        model="support", messages=messages, user=user, max_tokens=12, stream=True
    )
    async for _ in chunks:
        pass


async def _run(count: int, console: Console) -> int:
    ft = create_simulated_app(
        SimProfile(ttft_ms=25, tokens_per_s=400, models=("base", "support-lora"))
    )
    hosted = create_simulated_app(SimProfile(ttft_ms=150, tokens_per_s=120))
    async with (
        on_loopback(ft, lifespan="off") as vllm_url,
        on_loopback(hosted, lifespan="off") as hosted_url,
    ):
        settings, problems = check_settings(demo_config(vllm_url, hosted_url), {})
        assert settings is not None, problems
        app = create_app(settings, {})
        async with on_loopback(app) as gateway_url:
            console.print(
                f"Turnout on {gateway_url}: route [bold]support[/] = 70% support-ft "
                "(LoRA on vLLM) / 30% support-prompted (hosted model + prompt)"
            )
            elapsed = await _drive(gateway_url, count, console)
        records = list(app.gateway.records)
    _print_results(console, settings, records, elapsed)
    failed = [r for r in records if r.status != 200]
    return 1 if failed or len(records) != count else 0


def _print_results(
    console: Console, settings: Settings, records: Sequence[RequestRecord], elapsed: float
) -> None:
    table = Table(title=f"{len(records)} requests in {elapsed:.1f} s")
    for column in (
        "variant",
        "tuning",
        "requests",
        "p50 ms",
        "p95 ms",
        "prompt tok/req",
        "injected tok/req",
        "completion tok/req",
        "cost / 1k req",
        "prompt tax / 1k",
        "fleet / 1k req",
    ):
        table.add_column(column, justify="right")
    per_request: dict[str, float] = {}
    for name in settings.variants:
        rows = [r for r in records if r.variant == name]
        if not rows:
            continue
        cost = _mean(r.cost_usd for r in rows)
        per_request[name] = cost
        fleet = _fleet_per_request(settings, name, rows, elapsed)
        durations = sorted(r.latency.total * 1000 for r in rows)
        table.add_row(
            name,
            rows[0].tuning,
            str(len(rows)),
            f"{statistics.median(durations):.0f}",
            f"{durations[int(0.95 * (len(durations) - 1))]:.0f}",
            f"{_mean(r.usage.prompt - r.usage.injected for r in rows):.1f}",
            f"{_mean(r.usage.injected for r in rows):.1f}",
            f"{_mean(r.usage.completion for r in rows):.1f}",
            f"${cost * 1000:.4f}",
            f"${_mean(r.prompt_tax_usd for r in rows) * 1000:.4f}",
            "-" if fleet is None else f"${fleet * 1000:.4f}",
        )
    console.print(table)
    hosted = per_request.get("support-prompted")
    if hosted:
        break_even = break_even_rate(GPU_HOURLY_USD, hosted)
        rate = len(records) / elapsed * 3600
        console.print(
            "Fine-tuned cost per request is its share of the GPU's busy time; the fleet column "
            "spreads the\nwhole fleet's cost over the run (idle time included) over its requests.\n"
            f"Fine-tuned fleet costs ${GPU_HOURLY_USD}/h whether busy or not; the prompted variant "
            f"costs ${hosted * 1000:.4f} per 1k requests (prompt tax included).\n"
            f"Break-even: above [bold]{break_even:,.0f} requests/hour[/] the GPU fleet is cheaper; "
            f"this run sent {rate:,.0f} requests/hour."
        )


def _fleet_per_request(
    settings: Settings, name: str, rows: Sequence[RequestRecord], elapsed: float
) -> float | None:
    """For a GPU-backed variant: the fleet's cost over the run (busy or idle) per request."""
    upstream = settings.upstreams[settings.variants[name].upstream]
    if not isinstance(upstream, VllmUpstream) or upstream.gpu is None:
        return None
    gpu = upstream.gpu
    return fleet_cost(gpu.hourly_usd, gpu.count, len(upstream.urls), elapsed) / len(rows)


def _mean(values: Iterable[float]) -> float:
    items = list(values)
    return sum(items) / len(items) if items else 0.0


def run_demo(count: int) -> int:
    console = Console(width=max(Console().width, 150))
    return asyncio.run(_run(count, console))
