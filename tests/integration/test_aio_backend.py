"""The asyncio network backend under httpx: the errors httpcore expects, and a pooled
connection the server closed is noticed instead of reused."""

from __future__ import annotations

import asyncio
import socket

import httpcore
import pytest

from gateway.upstreams.aio_backend import AsyncioBackend


async def test_connect_refused_and_read_timeout() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = AsyncioBackend()
    with pytest.raises(httpcore.ConnectError):
        await backend.connect_tcp("127.0.0.1", port, timeout=2)

    done = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(1)  # never answers; returns when the client leaves
        finally:
            writer.close()
            done.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        stream = await backend.connect_tcp("127.0.0.1", port, timeout=2)
        with pytest.raises(httpcore.ReadTimeout):
            await stream.read(10, timeout=0.05)
        await stream.aclose()
        await asyncio.wait_for(done.wait(), 2)


async def test_a_connection_the_server_closed_reads_as_readable() -> None:
    closed = asyncio.Event()

    async def echo_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read(5))
        await writer.drain()
        writer.close()
        closed.set()

    server = await asyncio.start_server(echo_once, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        stream = await AsyncioBackend().connect_tcp("127.0.0.1", port, timeout=2)
        assert stream.get_extra_info("is_readable") is False
        await stream.write(b"hello", timeout=2)
        assert await stream.read(5, timeout=2) == b"hello"
        await closed.wait()
        for _ in range(100):  # the EOF reaches the reader on a later loop turn
            if stream.get_extra_info("is_readable"):
                break
            await asyncio.sleep(0.01)
        assert stream.get_extra_info("is_readable") is True
        assert stream.get_extra_info("server_addr")[1] == port
        await stream.aclose()
