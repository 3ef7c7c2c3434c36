"""`turnout demo`: fine-tuned vs prompted variants on simulated upstreams, measured side by side."""

from __future__ import annotations

import asyncio
import json
import secrets
import statistics
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import httpx
import openai
from openai.types.chat import ChatCompletionMessageParam
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from gateway.app import create_app
from gateway.config_check import check_settings
from gateway.records import RequestRecord
from gateway.report_cli import render
from gateway.settings import Settings, VllmUpstream
from router.gpu_cost import break_even_rate, fleet_cost
from serving.loopback import on_loopback
from serving.simulated import SimProfile, create_simulated_app

GPU_HOURLY_USD = 2.49
# Tickets and their right labels. The simulated upstreams "know" them (serving/sim_answers.py)
# and answer right with each model's accuracy; simulated users then say whether the answer
# resolved their ticket, which is the route's feedback metric.
TICKETS = {
    "I was charged twice for my subscription this month.": "billing",
    "The export button crashes the app on Android.": "bug",
    "How do I change the email address on my account?": "account",
    "Can you recommend a good book about gardening?": "other",
    "My invoice shows the wrong VAT number.": "billing",
    "After the update the dashboard is blank.": "bug",
    "I forgot my password and the reset mail never arrives.": "account",
    "Please refund the annual plan I bought by mistake.": "billing",
    "The page freezes when I upload a CSV file.": "bug",
    "Is there a student discount?": "other",
}
ACCURACY = {"support-lora": 0.93, "gpt-4o-mini": 0.86, "gpt-4o-nano": 0.72}
ADMIN_ENV = "TURNOUT_DEMO_ADMIN_KEY"


def demo_config(vllm_url: str, hosted_url: str) -> dict[str, object]:
    """A route split 70/30 between a LoRA adapter on vLLM and a prompted hosted model."""
    return {
        "admin_key_env": ADMIN_ENV,
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
            "support-small": {  # a cheaper hosted model, tried in the shadow of live traffic
                "upstream": "hosted",
                "model": "gpt-4o-nano",
                "price": {"input_per_mtok": 0.05, "output_per_mtok": 0.20},
            },
        },
        "routes": {
            "support": {
                "split": {"support-ft": 70, "support-prompted": 30},
                "sticky": "user",
                "shadow": {"variant": "support-small", "fraction": 0.2},
                "feedback": [{"name": "resolved", "type": "bool"}],
            }
        },
    }


Answered = tuple[str, str, str]  # request id, answer, right label


async def _drive(base_url: str, count: int, console: Console) -> tuple[float, list[Answered]]:
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="demo", max_retries=0)
    gate = asyncio.Semaphore(8)
    tickets = _tickets(count)
    answered: list[Answered] = []
    start = time.perf_counter()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("requests through Turnout", total=count)

        async def one(i: int) -> None:
            ticket, label = tickets[i % len(tickets)]
            async with gate:
                request_id, text = await _ask(client, ticket, f"user-{i % 60}", stream=i % 2 == 1)
            answered.append((request_id, text, label))
            progress.advance(task)

        await asyncio.gather(*(one(i) for i in range(count)))
    await client.close()
    return time.perf_counter() - start, answered


def _tickets(count: int) -> list[tuple[str, str]]:
    """`count` distinct tickets (a ticket number makes each one a new question) with labels."""
    base = list(TICKETS.items())
    return [(f"{text} Ticket {i}.", label) for i, (text, label) in enumerate(base * count)][:count]


async def _ask(
    client: openai.AsyncOpenAI, ticket: str, user: str, *, stream: bool
) -> tuple[str, str]:
    """One ticket through the gateway: the request id and the answer's text."""
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": ticket}]
    if not stream:
        raw = await client.chat.completions.with_raw_response.create(
            model="support", messages=messages, user=user, max_tokens=12
        )
        return raw.headers["x-request-id"], raw.parse().choices[0].message.content or ""
    response = await client.chat.completions.with_raw_response.create(
        model="support", messages=messages, user=user, max_tokens=12, stream=True
    )
    text: list[str] = []
    async for chunk in response.parse():
        text.extend(choice.delta.content or "" for choice in chunk.choices)
    return response.headers["x-request-id"], "".join(text)


async def _rate(base_url: str, answered: Sequence[Answered]) -> None:
    """Simulated users: a ticket is resolved when the label the variant gave is right."""
    async with httpx.AsyncClient(base_url=base_url, timeout=30, trust_env=False) as http:
        for request_id, text, label in answered:
            body = {"request_id": request_id, "metric": "resolved", "value": text == label}
            (await http.post("/turnout/feedback", json=body)).raise_for_status()


async def _report(base_url: str, admin_key: str) -> tuple[dict[str, Any], str]:
    """The experiment report as JSON and as the HTML page, from the gateway's own endpoint."""
    headers = {"authorization": f"Bearer {admin_key}"}
    async with httpx.AsyncClient(base_url=base_url, timeout=60, trust_env=False) as http:
        data = await http.get("/turnout/report", params={"route": "support"}, headers=headers)
        page = await http.get(
            "/turnout/report", params={"route": "support", "format": "html"}, headers=headers
        )
    data.raise_for_status()
    page.raise_for_status()
    report: dict[str, Any] = data.json()
    return report, page.text


async def _run(count: int, console: Console, answers: str) -> tuple[int, dict[str, Any], str]:
    """Serve, drive, rate; print the figures and the report; the exit code, report and page."""
    ft = create_simulated_app(
        SimProfile(
            ttft_ms=25, tokens_per_s=400, models=("base", "support-lora"),
            answers=answers, accuracy=ACCURACY, seed=7,
        )
    )  # fmt: skip
    hosted = create_simulated_app(
        SimProfile(ttft_ms=150, tokens_per_s=120, answers=answers, accuracy=ACCURACY, seed=7)
    )
    admin_key = secrets.token_urlsafe(24)
    env = {ADMIN_ENV: admin_key}
    async with (
        on_loopback(ft, lifespan="off") as vllm_url,
        on_loopback(hosted, lifespan="off") as hosted_url,
    ):
        settings, problems = check_settings(demo_config(vllm_url, hosted_url), env)
        assert settings is not None, problems
        app = create_app(settings, env)
        async with on_loopback(app) as gateway_url:
            console.print(
                f"Turnout on {gateway_url}: route [bold]support[/] = 70% support-ft "
                "(LoRA on vLLM) / 30% support-prompted (hosted model + prompt); 20% of "
                "requests shadowed to support-small"
            )
            elapsed, answered = await _drive(gateway_url, count, console)
            await app.gateway.shadows.drain()
            await _rate(gateway_url, answered)
            report, page = await _report(gateway_url, admin_key)
        records = [r for r in app.gateway.records if r.shadow_of is None]
    _print_results(console, settings, records, elapsed)
    console.rule("experiment report (GET /turnout/report)")
    render(console, report)
    failed = [r for r in records if r.status != 200]
    return (1 if failed or len(records) != count else 0), report, page


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
    for name in settings.routes["support"].split:
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


def run_demo(count: int, html: Path = Path("turnout-report.html")) -> int:
    console = Console(width=max(Console().width, 150))
    with tempfile.TemporaryDirectory(prefix="turnout-demo-") as folder:
        answers = Path(folder) / "tickets.jsonl"
        lines = (json.dumps({"prompt": t, "expected": label}) for t, label in _tickets(count))
        answers.write_text("\n".join(lines) + "\n", encoding="utf-8")
        code, _, page = asyncio.run(_run(count, console, str(answers)))
    html.write_text(page, encoding="utf-8")
    console.print(f"The whole report with its charts: [bold]{html}[/] (open it in a browser)")
    return code
