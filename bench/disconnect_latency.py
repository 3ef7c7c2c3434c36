"""How fast a client's leaving reaches the upstream: mid-stream and during a unary call.

Run: PYTHONPATH=. .venv/bin/python bench/disconnect_latency.py
"""

from __future__ import annotations

import statistics
import time

import httpx

from tests.fakes import create_fake_upstream
from tests.integration.conftest import Upstreams, base_config, running
from tests.servers import serve_app

USER = [{"role": "user", "content": "x"}]


def main(rounds: int = 20) -> None:
    app, recorder = create_fake_upstream()
    with serve_app(app) as first, serve_app(app) as second:
        config = base_config(Upstreams([first, second], recorder), first_byte=30, total=30)
        with running(config) as (url, _):
            mid, unary = [], []
            for _ in range(rounds):
                recorder.clear()
                body = {"model": "stream-slow", "messages": USER, "stream": True}
                with httpx.stream("POST", url + "/v1/chat/completions", json=body) as response:
                    next(response.iter_raw())
                    left = time.monotonic()
                mid.append(recorder.wait_disconnect("stream-slow", 3) - left)  # type: ignore[operator]
                recorder.clear()
                try:
                    body = {"model": "hang", "messages": USER}
                    httpx.post(url + "/v1/chat/completions", json=body, timeout=0.2)
                except httpx.ReadTimeout:
                    left = time.monotonic()
                unary.append(recorder.wait_disconnect("hang", 3) - left)  # type: ignore[operator]
    for name, values in (("mid-stream", mid), ("unary", unary)):
        print(
            f"{name}: upstream saw the client leave after median "
            f"{statistics.median(values) * 1000:.1f} ms, max {max(values) * 1000:.1f} ms"
        )


if __name__ == "__main__":
    main()
