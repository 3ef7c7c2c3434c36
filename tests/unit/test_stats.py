"""Statistics for reports: Wilson, bootstrap, percentiles, differences and sample sizes."""

from __future__ import annotations

import math
import random

import pytest

from router.stats import (
    Difference,
    Interval,
    bootstrap,
    diff_of_means_ci,
    diff_of_proportions_ci,
    mean,
    mean_interval,
    normal_difference,
    percentile,
    percentile_interval,
    sample_size_for_means,
    sample_size_for_proportions,
    wilson,
)

SE_MEAN_200 = 2 / math.sqrt(200)  # standard error of the mean of 200 draws with sd 2


def normal_draws(seed: int, n: int, mu: float = 10.0, sd: float = 2.0) -> list[float]:
    rng = random.Random(seed)
    return [rng.gauss(mu, sd) for _ in range(n)]


def is_nan_interval(interval: Interval) -> bool:
    return all(math.isnan(x) for x in (interval.low, interval.high, interval.estimate))


# Wilson


def test_wilson_matches_the_textbook_value() -> None:
    interval = wilson(8, 10)
    assert interval.estimate == 0.8
    assert interval.low == pytest.approx(0.4902, abs=1e-4)
    assert interval.high == pytest.approx(0.9433, abs=1e-4)


def test_wilson_newcombe_values() -> None:
    # Newcombe (1998), table I: 81/263 -> 0.2553 to 0.3662.
    interval = wilson(81, 263)
    assert (interval.low, interval.high) == pytest.approx((0.2553, 0.3662), abs=1e-4)


def test_wilson_all_or_nothing_stays_inside_zero_one() -> None:
    none, every = wilson(0, 10), wilson(10, 10)
    assert none.low == 0.0 and 0 < none.high < 0.35
    assert every.high == 1.0 and 0.65 < every.low < 1
    assert none.high == pytest.approx(1 - every.low)


def test_wilson_with_no_trials_knows_nothing() -> None:
    interval = wilson(0, 0)
    assert (interval.low, interval.high) == (0.0, 1.0)
    assert math.isnan(interval.estimate)


def test_wilson_widens_with_z() -> None:
    assert wilson(30, 100, z=2.576).width > wilson(30, 100).width > wilson(30, 100, z=1.0).width


@pytest.mark.parametrize(("successes", "n"), [(-1, 10), (11, 10), (0, -1)])
def test_wilson_refuses_impossible_counts(successes: int, n: int) -> None:
    with pytest.raises(ValueError):
        wilson(successes, n)


# Percentile and mean


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([1, 2, 3, 4], 50, 2.5),
        ([1, 2, 3, 4], 25, 1.75),
        ([1, 2, 3, 4], 90, 3.7),
        ([10, 7, 4, 3, 2, 1], 50, 3.5),
        ([10, 7, 4, 3, 2, 1], 75, 6.25),
        ([10, 7, 4, 3, 2, 1], 99, 9.85),
        ([3, 1, 2], 0, 1),
        ([3, 1, 2], 100, 3),
        ([5], 37, 5),
    ],
)
def test_percentile_matches_numpy_linear(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == pytest.approx(expected)


def test_percentile_of_nothing_is_nan_and_q_is_checked() -> None:
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1, 2], 101)
    with pytest.raises(ValueError):
        percentile([1, 2], -1)


def test_mean() -> None:
    assert mean([1, 2, 3, 4]) == 2.5
    assert mean([0.1] * 10) == 0.1
    assert math.isnan(mean([]))


# Bootstrap


def test_bootstrap_of_the_mean_covers_the_truth_with_the_expected_width() -> None:
    interval = bootstrap(normal_draws(1, 200), mean, random.Random(7))
    assert interval.contains(10.0)
    assert interval.width == pytest.approx(2 * 1.96 * SE_MEAN_200, rel=0.2)
    assert interval.low < interval.estimate < interval.high


def test_bootstrap_covers_the_mean_in_most_of_40_seeds() -> None:
    rng = random.Random(11)
    covered = sum(
        bootstrap(normal_draws(seed, 50), mean, rng, resamples=400).contains(10.0)
        for seed in range(40)
    )
    assert covered >= 34


def test_bootstrap_of_a_percentile() -> None:
    values = normal_draws(2, 400)
    interval = bootstrap(values, lambda v: percentile(v, 50), random.Random(3), resamples=500)
    assert interval.contains(10.0)
    assert interval.estimate == percentile(values, 50)


def test_bootstrap_is_reproducible_from_its_seed() -> None:
    values = normal_draws(4, 30)
    assert bootstrap(values, mean, random.Random(5), 300) == bootstrap(
        values, mean, random.Random(5), 300
    )


def test_bootstrap_edge_cases() -> None:
    rng = random.Random(0)
    assert is_nan_interval(bootstrap([], mean, rng))
    assert bootstrap([4.0], mean, rng) == Interval(4.0, 4.0, 4.0)
    assert bootstrap([2.0, 2.0, 2.0], mean, rng) == Interval(2.0, 2.0, 2.0)
    with pytest.raises(ValueError):
        bootstrap([1.0, 2.0], mean, rng, resamples=0)
    with pytest.raises(ValueError):
        bootstrap([1.0, 2.0], mean, rng, level=1.0)


def test_a_wider_level_gives_a_wider_bootstrap_interval() -> None:
    values = normal_draws(6, 100)
    narrow = bootstrap(values, mean, random.Random(1), 1000, level=0.8)
    wide = bootstrap(values, mean, random.Random(1), 1000, level=0.99)
    assert wide.width > narrow.width


# Differences


def test_diff_of_means_finds_a_real_difference() -> None:
    a, b = normal_draws(1, 200), normal_draws(2, 200, mu=11.0)
    diff = diff_of_means_ci(a, b, random.Random(3))
    assert isinstance(diff, Difference)
    assert diff.significant
    assert diff.contains(1.0)
    assert diff.estimate == pytest.approx(mean(b) - mean(a))
    assert diff.width == pytest.approx(2 * 1.96 * math.sqrt(2) * SE_MEAN_200, rel=0.2)


def test_diff_of_means_is_b_minus_a() -> None:
    a, b = normal_draws(1, 100, mu=12.0), normal_draws(2, 100)
    diff = diff_of_means_ci(a, b, random.Random(3), resamples=500)
    assert diff.significant and diff.high < 0


def test_diff_of_means_without_a_difference_is_not_significant() -> None:
    diff = diff_of_means_ci(normal_draws(1, 200), normal_draws(2, 200), random.Random(3))
    assert not diff.significant
    assert diff.contains(0.0)


def test_diff_of_means_with_too_few_data() -> None:
    rng = random.Random(0)
    empty = diff_of_means_ci([], [1.0, 2.0], rng)
    assert is_nan_interval(empty) and not empty.significant
    single = diff_of_means_ci([1.0], [5.0], rng, resamples=10)
    assert single == Difference(4.0, 4.0, 4.0, significant=False)


def test_newcombe_published_example() -> None:
    # Newcombe (1998), example (a) for method 10: 56/70 - 48/80 = 0.2, 0.0524 to 0.3339.
    diff = diff_of_proportions_ci(48, 80, 56, 70)
    assert diff.estimate == pytest.approx(0.2)
    assert (diff.low, diff.high) == pytest.approx((0.0524, 0.3339), abs=1e-4)
    assert diff.significant


def test_newcombe_reversed_arms_mirror_the_interval() -> None:
    diff = diff_of_proportions_ci(56, 70, 48, 80)
    assert (diff.low, diff.high) == pytest.approx((-0.3339, -0.0524), abs=1e-4)
    assert diff.significant


def test_newcombe_other_published_examples() -> None:
    # Newcombe (1998), method 10: 9/10 - 3/10 = 0.6, 0.1705 to 0.8090; 5/56 - 0/29, -0.0381
    # to 0.1926.
    first = diff_of_proportions_ci(3, 10, 9, 10)
    assert (first.low, first.high) == pytest.approx((0.1705, 0.8090), abs=1e-4)
    second = diff_of_proportions_ci(0, 29, 5, 56)
    assert (second.low, second.high) == pytest.approx((-0.0381, 0.1926), abs=1e-4)
    assert not second.significant


def test_newcombe_without_trials() -> None:
    diff = diff_of_proportions_ci(0, 0, 3, 10)
    assert (diff.low, diff.high) == (-1.0, 1.0)
    assert math.isnan(diff.estimate) and not diff.significant


# Sample sizes


def test_sample_size_for_proportions_textbook() -> None:
    n = sample_size_for_proportions(0.5, 0.1)
    assert 385 <= n <= 388
    assert sample_size_for_proportions(0.6, -0.1) == n


def test_sample_size_for_proportions_grows_with_power_and_strictness() -> None:
    base = sample_size_for_proportions(0.2, 0.05)
    assert sample_size_for_proportions(0.2, 0.05, power=0.9) > base
    assert sample_size_for_proportions(0.2, 0.05, alpha=0.01) > base
    assert sample_size_for_proportions(0.2, 0.1) < base


def test_sample_size_for_means_textbook() -> None:
    assert sample_size_for_means(1.0, 0.5) == 63
    assert sample_size_for_means(2.0, 1.0) == 63
    assert sample_size_for_means(1.0, -0.5) == 63
    assert sample_size_for_means(0.0, 0.5) == 1


@pytest.mark.parametrize(
    ("p_control", "effect", "alpha", "power"),
    [(0.5, 0.0, 0.05, 0.8), (0.95, 0.1, 0.05, 0.8), (0.5, 0.1, 0.0, 0.8), (0.5, 0.1, 0.05, 1.0)],
)
def test_sample_size_refuses_bad_inputs(
    p_control: float, effect: float, alpha: float, power: float
) -> None:
    with pytest.raises(ValueError):
        sample_size_for_proportions(p_control, effect, alpha, power)


def test_sample_size_for_means_refuses_bad_inputs() -> None:
    with pytest.raises(ValueError):
        sample_size_for_means(1.0, 0.0)
    with pytest.raises(ValueError):
        sample_size_for_means(-1.0, 0.5)


def test_mean_interval_is_the_textbook_normal_interval() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 5.0]  # mean 3, sd sqrt(2.5)
    interval = mean_interval(values)
    half = 1.959963984540054 * math.sqrt(2.5 / 5)
    assert interval.estimate == 3.0
    assert interval.low == pytest.approx(3 - half) and interval.high == pytest.approx(3 + half)
    assert math.isnan(mean_interval([]).estimate)
    assert mean_interval([2.0]) == mean_interval([2.0, 2.0])


@pytest.mark.parametrize("q", [5, 50, 95])
def test_percentile_interval_covers_the_true_percentile(q: float) -> None:
    """Exponential(1): the true qth percentile is -ln(1 - q/100). Nominal 95% over 200 draws
    of 600 values: at least 90% must cover it (binomial: fewer is < 1% likely)."""
    rng = random.Random(q)
    truth = -math.log(1 - q / 100)
    covered = sum(
        percentile_interval([rng.expovariate(1.0) for _ in range(600)], q).contains(truth)
        for _ in range(200)
    )
    assert covered >= 180


def test_percentile_interval_edges() -> None:
    assert math.isnan(percentile_interval([], 50).estimate)
    one = percentile_interval([3.0], 99)
    assert (one.low, one.estimate, one.high) == (3.0, 3.0, 3.0)
    tail = percentile_interval([float(i) for i in range(10)], 100)
    assert tail.low <= tail.estimate == 9.0 <= tail.high


def test_normal_difference_adds_standard_errors_in_quadrature() -> None:
    a = mean_interval([float(i % 7) for i in range(700)])
    b = mean_interval([float(i % 7) + 1 for i in range(700)])
    d = normal_difference(a, b)
    assert d.estimate == pytest.approx(1.0) and d.significant
    assert d.width == pytest.approx(math.hypot(a.width, b.width))
    same = normal_difference(a, a)
    assert same.estimate == 0 and not same.significant
    assert not normal_difference(mean_interval([]), a).significant
