"""The in-process transport behind `kind: simulated`: streams as sent, cancels on close."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from gateway.upstreams.inprocess import InProcessTransport


def _app(events: list[str], fail_after: int | None = None) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-a", b"1")]})
        try:
            for i in range(10):
                if fail_after is not None and i == fail_after:
                    raise RuntimeError("boom")
                await send(
                    {"type": "http.response.body", "body": f"{i};".encode(), "more_body": True}
                )
                events.append(f"sent {i}")
                await asyncio.sleep(0.05)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            events.append("cancelled")
            raise

    return app


async def test_body_arrives_chunk_by_chunk() -> None:
    events: list[str] = []
    async with (
        httpx.AsyncClient(transport=InProcessTransport(_app(events)), base_url="http://x") as c,
        c.stream("POST", "/", content=b"{}") as response,
    ):
        assert response.headers["x-a"] == "1"
        first = await response.aiter_raw().__anext__()
        assert first == b"0;" and events == ["sent 0"]


async def test_closing_early_cancels_the_app() -> None:
    events: list[str] = []
    async with (
        httpx.AsyncClient(transport=InProcessTransport(_app(events)), base_url="http://x") as c,
        c.stream("POST", "/", content=b"{}") as response,
    ):
        async for _ in response.aiter_raw():
            break
    await asyncio.sleep(0.01)
    assert events[-1] == "cancelled"


async def test_app_failure_mid_body_is_an_error_not_a_short_body() -> None:
    events: list[str] = []
    transport = InProcessTransport(_app(events, fail_after=2))
    async with httpx.AsyncClient(transport=transport, base_url="http://x") as c:
        with pytest.raises(httpx.RemoteProtocolError):
            async with c.stream("POST", "/", content=b"{}") as response:
                async for _ in response.aiter_raw():
                    pass
