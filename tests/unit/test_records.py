"""Request records: the memory store, the write-behind queue, the JSONL file, cost from prices."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import msgspec
import pytest

from gateway.record_store import JsonlSink, MemoryRecordStore, RecordKeeper, WriteBehind
from gateway.records import Latency, RequestRecord, Usage, token_cost, usage_from
from gateway.settings import Price


def _record(request_id: str, status: int = 200, time: float = 0.0) -> RequestRecord:
    return RequestRecord(
        request_id=request_id, route="r", variant="v", upstream="u", tuning="prompted",
        endpoint="/chat/completions", stream=False, status=status, time=time,
        latency=Latency(total=0.1),
    )  # fmt: skip


def test_memory_store_is_bounded_and_lookups_follow_eviction() -> None:
    store = MemoryRecordStore(capacity=3)
    for i in range(5):
        store.add(_record(f"id-{i}"))
    assert [r.request_id for r in store] == ["id-2", "id-3", "id-4"] and len(store) == 3
    assert store.find("id-1") is None and store.find("id-4") is not None


def test_reused_id_finds_the_newest_and_survives_eviction_of_the_older() -> None:
    store = MemoryRecordStore(capacity=3)
    store.add(_record("same", status=500))
    store.add(_record("other"))
    store.add(_record("same", status=200))
    store.add(_record("third"))  # evicts the first "same"
    found = store.find("same")
    assert found is not None and found.status == 200


async def test_keeper_answers_from_memory_at_once_and_iterates_this_process() -> None:
    keeper = RecordKeeper(MemoryRecordStore(capacity=10))
    keeper.add(_record("a"))
    assert (await keeper.get("a")) is keeper.find("a") is not None
    assert await keeper.get("missing") is None
    assert [r.request_id for r in keeper] == ["a"] and len(keeper) == 1
    await keeper.start()
    await keeper.aclose()


class SlowWriter:
    """A destination that holds every write until released, and can be made to fail."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.release = asyncio.Event()
        self.fail = False

    async def write(self, batch: list[RequestRecord]) -> None:
        await self.release.wait()
        if self.fail:
            raise OSError("disk on fire")
        self.batches.append([r.request_id for r in batch])


async def test_write_behind_drops_the_oldest_when_full_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = SlowWriter()
    writer = WriteBehind("test", sink.write, maxsize=3)
    writer.start()
    writer.put(_record("first"))
    await asyncio.sleep(0)  # the writer takes "first" and waits on the destination
    with caplog.at_level(logging.WARNING, logger="turnout"):
        for i in range(6):
            writer.put(_record(f"id-{i}"))
    assert writer.dropped == 3
    assert len([r for r in caplog.records if "dropped" in r.getMessage()]) == 1
    sink.release.set()
    await writer.aclose()
    assert sink.batches == [["first"], ["id-3", "id-4", "id-5"]]
    assert (writer.written, writer.failed) == (4, 0)


async def test_write_behind_counts_failures_and_keeps_going(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = SlowWriter()
    sink.release.set()
    sink.fail = True
    writer = WriteBehind("test", sink.write)
    writer.start()
    with caplog.at_level(logging.WARNING, logger="turnout"):
        writer.put(_record("a"))
        await asyncio.sleep(0.01)
        writer.put(_record("b"))
        await asyncio.sleep(0.01)
    assert writer.failed == 2 and "disk on fire" in caplog.text
    assert len([r for r in caplog.records if "write failed" in r.getMessage()]) == 1
    sink.fail = False
    writer.put(_record("c"))
    await writer.aclose()
    assert sink.batches == [["c"]]


async def test_jsonl_sink_writes_one_parseable_line_per_record(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_bytes(b'{"earlier": "line"}\n')
    sink = JsonlSink(path)
    await sink.start()
    records = [_record(f"id-{i}", time=float(i)) for i in range(1000)]

    async def add_some(chunk: list[RequestRecord]) -> None:
        for record in chunk:
            sink.add(record)
            await asyncio.sleep(0)

    await asyncio.gather(*(add_some(records[i::4]) for i in range(4)))
    await sink.aclose()  # flushes what is pending
    lines = path.read_bytes().splitlines()
    assert lines[0] == b'{"earlier": "line"}'  # appended, never truncated
    decoded = [msgspec.json.decode(line, type=RequestRecord) for line in lines[1:]]
    assert sorted(decoded, key=lambda r: r.time) == records
    assert sink.writer.dropped == sink.writer.failed == 0
    assert b"content" not in path.read_bytes()  # absent fields are omitted, content included


def test_token_cost_uses_cached_rate_and_output_rate() -> None:
    price = Price(input_per_mtok=2.0, cached_input_per_mtok=0.5, output_per_mtok=8.0)
    usage = Usage(prompt=1000, cached=400, completion=100)
    assert token_cost(price, usage) == pytest.approx((600 * 2 + 400 * 0.5 + 100 * 8) / 1e6)
    assert token_cost(None, usage) == 0.0
    assert token_cost(Price(input_per_mtok=1.0), usage) == pytest.approx(1000 / 1e6)


def test_usage_from_openai_usage_object() -> None:
    usage = usage_from(
        {
            "prompt_tokens": 50,
            "completion_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 8},
        },
        injected=30,
    )
    assert usage == Usage(prompt=50, injected=30, completion=5, cached=8)
    assert usage_from({"prompt_tokens": 10}, injected=30) == Usage(prompt=10, injected=10)
    assert usage_from(None, 0) is None and usage_from({"prompt_tokens": "x"}, 0) is None
