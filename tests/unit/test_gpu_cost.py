"""GPU cost: busy time, its split by work, fleet cost, capacity, break-even, and the meter."""

from __future__ import annotations

import math

import pytest

from gateway.gpu_meter import GpuMeter
from gateway.settings import Gpu
from router.gpu_cost import (
    Served,
    attribute,
    break_even_rate,
    busy_seconds,
    cost_at_capacity,
    fleet_cost,
    peak_throughput,
    settle_charge,
    usd_per_second,
)

RATE = 0.01  # $/s: hourly_usd 36, count 1
EVERYTHING = (-math.inf, math.inf)


def served(start: float, end: float, prompt: int = 0, completion: int = 10) -> Served:
    return Served(start, end, prompt, completion)


@pytest.mark.parametrize(
    ("intervals", "window", "expected"),
    [
        ([], (0, 10), 0.0),
        ([(1, 3)], (0, 10), 2.0),
        ([(1, 3), (2, 5)], (0, 10), 4.0),  # overlap counts once
        ([(1, 3), (5, 6)], (0, 10), 3.0),  # the gap is idle
        ([(1, 9), (2, 3), (4, 5)], (0, 10), 8.0),  # nested
        ([(4, 5), (1, 2), (1.5, 4.5)], (0, 10), 4.0),  # unsorted, chained
        ([(-5, 2), (8, 15)], (0, 10), 4.0),  # clipped at both ends
        ([(-5, -1), (11, 12)], (0, 10), 0.0),  # wholly outside
        ([(3, 3)], (0, 10), 0.0),  # an instant
        ([(1, 2), (2, 3)], (0, 10), 2.0),  # touching
    ],
)
def test_busy_seconds(
    intervals: list[tuple[float, float]], window: tuple[float, float], expected: float
) -> None:
    assert busy_seconds(intervals, window) == pytest.approx(expected)


SHAPES = {
    "overlapping": [served(0, 4, 100, 10), served(1, 5, 50, 40), served(2, 3, 0, 5)],
    "sequential": [served(0, 1), served(1, 3, 20, 7), served(3, 3.5, 5, 1)],
    "idle gaps": [served(0, 1), served(10, 12, 8, 8), served(30, 31, 1, 100)],
    "zero weight": [served(0, 2, 0, 0), served(1, 4, 10, 10), served(5, 6, 0, 0)],
    "all zero weight": [served(0, 2, 0, 0), served(1, 4, 0, 0)],
    "straddling": [served(-5, 5, 10, 10), served(4, 8, 3, 3), served(9, 20, 1, 1)],
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("factor", [0.0, 0.1, 1.0])
def test_attribute_sums_to_the_busy_cost(shape: list[Served], factor: float) -> None:
    window = (0.0, 10.0)
    costs = attribute(shape, RATE, factor, window)
    busy = busy_seconds([(r.start, r.end) for r in shape], window)
    assert len(costs) == len(shape)
    assert sum(costs) == pytest.approx(RATE * busy, abs=1e-12)
    assert all(cost >= 0 for cost in costs)


def test_attribute_is_proportional_to_weight() -> None:
    costs = attribute([served(0, 10, 0, 10), served(0, 2, 0, 20)], RATE, 0.1, (0, 10))
    assert costs[1] == pytest.approx(2 * costs[0])
    assert sum(costs) == pytest.approx(RATE * 10)


def test_prefill_factor_weighs_prompt_tokens() -> None:
    long_prompt, long_answer = served(0, 5, 1000, 10), served(0, 5, 10, 100)
    ignored = attribute([long_prompt, long_answer], RATE, 0.0, (0, 10))
    assert ignored[1] == pytest.approx(10 * ignored[0])  # 10 vs 100 completion tokens
    weighed = attribute([long_prompt, long_answer], RATE, 0.1, (0, 10))
    assert weighed[0] == pytest.approx(weighed[1] * 110 / 101)  # 0.1*1000+10 vs 0.1*10+100
    assert sum(weighed) == pytest.approx(sum(ignored))


def test_zero_weight_requests_pay_nothing_unless_all_are_zero() -> None:
    mixed = attribute(SHAPES["zero weight"], RATE, 0.1, (0, 10))
    assert mixed[0] == mixed[2] == 0.0
    assert mixed[1] == pytest.approx(RATE * 5)  # busy 0-4 and 5-6
    by_seconds = attribute(SHAPES["all zero weight"], RATE, 0.1, (0, 10))
    assert by_seconds == pytest.approx([RATE * 4 * 2 / 5, RATE * 4 * 3 / 5])


def test_requests_outside_the_window_pay_nothing_and_straddlers_pay_for_their_part() -> None:
    costs = attribute([served(-5, -1), served(0, 2), served(8, 12)], RATE, 0.1, (0, 10))
    assert costs[0] == 0.0
    assert costs[2] == pytest.approx(costs[1] / 2)  # half its tokens fall in the window


def test_settle_charge() -> None:
    assert settle_charge(1.0, 10, 0) == 1.0  # nothing else running: the rest of the tab
    assert settle_charge(1.0, 10, 30) == pytest.approx(0.25)  # its part of the shared tab
    assert settle_charge(1.0, 0, 30) == 0.0
    assert settle_charge(-1.0, 10, 0) == 0.0


def test_fleet_cost_counts_every_gpu_of_every_replica() -> None:
    assert usd_per_second(36.0, 1) == pytest.approx(0.01)
    assert fleet_cost(2.0, 4, 3, 3600) == pytest.approx(24.0)
    assert fleet_cost(36.0, 1, 2, 60) == pytest.approx(1.2)


def test_peak_throughput_takes_the_busiest_bucket() -> None:
    requests = [served(0, 10, 0, 100), served(10, 20, 0, 300), served(12, 14, 0, 100)]
    assert peak_throughput(requests, bucket_s=10) == pytest.approx(40.0)
    assert peak_throughput(requests, bucket_s=20) == pytest.approx(25.0)
    assert peak_throughput([], bucket_s=10) == 0.0


def test_peak_throughput_spreads_tokens_and_weighs_prompts() -> None:
    assert peak_throughput([served(5, 15, 0, 100)], bucket_s=10) == pytest.approx(5.0)
    assert peak_throughput([served(3, 3, 0, 50)], bucket_s=10) == pytest.approx(5.0)
    prompt_heavy = [served(0, 10, 1000, 0)]
    assert peak_throughput(prompt_heavy, bucket_s=10) == 0.0
    assert peak_throughput(prompt_heavy, bucket_s=10, prefill_factor=0.1) == pytest.approx(10.0)
    with pytest.raises(ValueError):
        peak_throughput([], bucket_s=0)


def test_cost_at_capacity() -> None:
    assert cost_at_capacity(RATE, 500.0, 250.0) == pytest.approx(0.005)
    assert cost_at_capacity(RATE, 0.0, 1.0) == math.inf
    assert cost_at_capacity(RATE, 0.0, 0.0) == 0.0


def test_break_even_rate() -> None:
    assert break_even_rate(2.49, 0.0005) == pytest.approx(4980.0)
    assert break_even_rate(0.0, 0.001) == 0.0
    assert break_even_rate(1.0, 0.0) == math.inf
    with pytest.raises(ValueError):
        break_even_rate(-1.0, 0.1)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def meter(clock: Clock, replicas: int = 1, window_s: float = 300.0, **gpu: float) -> GpuMeter:
    settings = Gpu(hourly_usd=gpu.get("hourly_usd", 36.0), prefill_factor=gpu.get("pf", 0.1))
    return GpuMeter(settings, replicas, window_s=window_s, clock=clock)


def settle(
    gpu: GpuMeter, clock: Clock, request: Served, running: int = 0, replica: int = 0
) -> float:
    clock.now = max(clock.now, request.end)
    span = (request.start, request.end)
    prompt, completion = request.prompt_tokens, request.completion_tokens
    return gpu.settle(replica, span, prompt, completion, running=running)


def test_meter_sequential_requests_pay_their_own_time_and_no_idle() -> None:
    clock = Clock()
    gpu = meter(clock)
    requests = [served(0, 1, 7, 3), served(5, 8, 70, 30), served(20, 20.5, 1, 1)]
    costs = [settle(gpu, clock, r) for r in requests]
    assert costs == pytest.approx([0.01, 0.03, 0.005])
    assert sum(costs) == pytest.approx(RATE * 4.5, abs=1e-12)  # the 16 idle seconds are free
    assert gpu.history(0) == requests


def test_meter_overlapping_requests_sum_to_the_busy_cost() -> None:
    clock = Clock()
    gpu = meter(clock)
    batch = [served(0, 3, 100, 10), served(1, 4, 10, 50), served(2, 6, 40, 40), served(2, 7)]
    costs = [settle(gpu, clock, r, running=len(batch) - i - 1) for i, r in enumerate(batch)]
    assert sum(costs) == pytest.approx(RATE * 7, abs=1e-12)
    assert all(cost > 0 for cost in costs)
    later = [served(10, 12, 5, 5), served(11, 13, 5, 50)]
    costs += [settle(gpu, clock, r, running=1 - i) for i, r in enumerate(later)]
    assert sum(costs) == pytest.approx(RATE * 10, abs=1e-12)


def test_meter_charges_never_exceed_the_busy_cost_while_others_run() -> None:
    clock = Clock()
    gpu = meter(clock)
    paid = 0.0
    for i in range(50):
        request = served(i * 0.5, i * 0.5 + 3, 20 + i, 5 + i % 7)
        paid += settle(gpu, clock, request, running=5)
        assert 0 < paid <= RATE * (i * 0.5 + 3) + 1e-12


def test_meter_shares_the_tab_by_work() -> None:
    clock = Clock()
    gpu = meter(clock, pf=0.0)
    for i in range(4):  # history: requests of 10 tokens, so running ones count as 10
        settle(gpu, clock, served(i, i + 1, 0, 10))
    clock.now = 10.0
    light = gpu.quote(0, (8.0, 10.0), 0, 10, running=1)
    heavy = gpu.quote(0, (8.0, 10.0), 0, 30, running=1)
    assert light == pytest.approx(RATE * 2 * 10 / (10 + 10))
    assert heavy == pytest.approx(RATE * 2 * 30 / (30 + 14))  # the mean counts it: 70 / 5
    assert heavy > light


def test_meter_steady_batches_pay_their_time_per_token() -> None:
    """Four at a time, one leaving and one arriving every second: each held the GPU 4 s with
    three others, so each costs one second of the replica."""
    clock = Clock()
    gpu = meter(clock)
    costs = [settle(gpu, clock, served(i, i + 4, 0, 8), running=3) for i in range(40)]
    assert costs == pytest.approx([RATE] * 40)


def test_quote_remembers_nothing() -> None:
    clock = Clock()
    gpu = meter(clock)
    clock.now = 2.0
    assert gpu.quote(0, (0.0, 2.0), 10, 10, running=0) == pytest.approx(0.02)
    assert gpu.quote(0, (0.0, 2.0), 10, 10, running=0) == pytest.approx(0.02)
    assert gpu.history(0) == []


def test_meter_old_requests_drop_out_of_the_window() -> None:
    clock = Clock()
    gpu = meter(clock, window_s=60.0)
    settle(gpu, clock, served(0, 10))
    settle(gpu, clock, served(30, 40))
    clock.now = 75.0
    assert [r.start for r in gpu.history(0)] == [30]
    clock.now = 100.0
    assert gpu.history(0) == []
    assert settle(gpu, clock, served(100, 101, 5, 5)) == pytest.approx(0.01)


def test_meter_forgets_busy_time_before_the_window() -> None:
    clock = Clock()
    gpu = meter(clock, window_s=10.0)
    settle(gpu, clock, served(0, 5))
    clock.now = 20.0
    assert settle(gpu, clock, served(2, 20)) == pytest.approx(RATE * 10)  # only 10-20 counts


def test_meter_requests_without_tokens_pay_nothing_and_leave_no_trace() -> None:
    clock = Clock()
    gpu = meter(clock)
    assert settle(gpu, clock, served(0, 1, 0, 0)) == 0.0
    assert gpu.history(0) == []


def test_meter_replicas_are_separate_and_fleet_and_capacity() -> None:
    clock = Clock()
    gpu = meter(clock, replicas=2)
    assert settle(gpu, clock, served(0, 10, 0, 100), replica=0) == pytest.approx(0.1)
    assert settle(gpu, clock, served(0, 10, 0, 300), replica=1) == pytest.approx(0.1)
    assert gpu.fleet_cost(3600) == pytest.approx(72.0)
    assert gpu.capacity() == pytest.approx(30.0)
    with pytest.raises(ValueError):
        GpuMeter(Gpu(hourly_usd=1.0), 0)


def test_meter_bounds_its_history() -> None:
    clock = Clock()
    gpu = GpuMeter(Gpu(hourly_usd=36.0), 1, limit=3, clock=clock)
    for i in range(5):
        settle(gpu, clock, served(i, i + 1))
    assert [r.start for r in gpu.history(0)] == [2, 3, 4]
