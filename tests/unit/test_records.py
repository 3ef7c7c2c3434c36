"""Request records: bounded, looked up by id, cost from prices."""

from __future__ import annotations

import pytest

from gateway.records import Latency, RecordLog, RequestRecord, Usage, token_cost, usage_from
from gateway.settings import Price


def _record(request_id: str, status: int = 200) -> RequestRecord:
    return RequestRecord(
        request_id=request_id, route="r", variant="v", upstream="u", tuning="prompted",
        endpoint="/chat/completions", stream=False, status=status, time=0.0,
        latency=Latency(total=0.1),
    )  # fmt: skip


def test_log_is_bounded_and_lookups_follow_eviction() -> None:
    log = RecordLog(capacity=3)
    for i in range(5):
        log.add(_record(f"id-{i}"))
    assert [r.request_id for r in log] == ["id-2", "id-3", "id-4"]
    assert log.get("id-1") is None and log.get("id-4") is not None


def test_reused_id_finds_the_newest_and_survives_eviction_of_the_older() -> None:
    log = RecordLog(capacity=3)
    log.add(_record("same", status=500))
    log.add(_record("other"))
    log.add(_record("same", status=200))
    log.add(_record("third"))  # evicts the first "same"
    found = log.get("same")
    assert found is not None and found.status == 200


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
