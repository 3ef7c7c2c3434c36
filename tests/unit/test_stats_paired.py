"""Newcombe's interval for the difference of paired proportions (1998, method 10)."""

from __future__ import annotations

import itertools
import math

import pytest

from router.stats import diff_of_paired_proportions_ci, diff_of_proportions_ci


@pytest.mark.parametrize(
    ("both", "only_b", "only_a", "neither", "low", "high"),
    [
        # Newcombe (1998), Table II: (e, f, g, h) -> method 10's 95% limits for (f - g) / n
        (36, 12, 2, 0, 0.0569, 0.3404),
        (18, 12, 2, 18, 0.0562, 0.3290),
        (53, 0, 0, 1, -0.0729, 0.0729),
        (0, 30, 0, 0, 0.8395, 1.0),
    ],
)
def test_newcombe_published_examples(
    both: int, only_b: int, only_a: int, neither: int, low: float, high: float
) -> None:
    d = diff_of_paired_proportions_ci(both, only_a, only_b, neither)
    assert d.estimate == pytest.approx((only_b - only_a) / (both + only_a + only_b + neither))
    assert d.low == pytest.approx(low, abs=1e-4)
    assert d.high == pytest.approx(high, abs=1e-4)


def test_a_negative_difference_from_another_published_table() -> None:
    # Fagerland, Lydersen & Laake (2017), ch. 8, Cavo et al. 2012: 59 6 / 16 80 -> -0.0621
    # (-0.1186 to -0.0046) for p1 - p2, p1 the first row's margin
    d = diff_of_paired_proportions_ci(both=59, only_a=16, only_b=6, neither=80)
    assert d.estimate == pytest.approx(-0.0621, abs=1e-4)
    assert d.low == pytest.approx(-0.1186, abs=1e-4)
    assert d.high == pytest.approx(-0.0046, abs=1e-4)
    assert d.significant


def test_symmetric_data_is_centred_on_zero_and_not_significant() -> None:
    d = diff_of_paired_proportions_ci(both=40, only_a=10, only_b=10, neither=40)
    assert d.estimate == 0.0
    assert d.low == pytest.approx(-d.high)
    assert d.low < 0 < d.high
    assert not d.significant


def test_strongly_discordant_data_is_significant() -> None:
    d = diff_of_paired_proportions_ci(both=50, only_a=2, only_b=30, neither=18)
    assert d.estimate == pytest.approx(0.28)
    assert 0 < d.low < 0.28 < d.high
    assert d.significant
    worse = diff_of_paired_proportions_ci(both=50, only_a=30, only_b=2, neither=18)
    assert worse.significant and worse.high < 0


def test_pairing_narrows_the_interval_of_correlated_answers() -> None:
    """The same margins (70/100 vs 78/100), paired with many concordant items: narrower than
    the independent-samples interval."""
    paired = diff_of_paired_proportions_ci(both=68, only_a=2, only_b=10, neither=20)
    independent = diff_of_proportions_ci(70, 100, 78, 100)
    assert paired.estimate == pytest.approx(independent.estimate)
    assert paired.width < independent.width
    assert paired.significant and not independent.significant


def test_no_correlation_left_after_the_correction_gives_the_independent_interval() -> None:
    # ad - bc = 6*4 - 8*2 = 8 <= n/2 = 10: the corrected phi is 0
    paired = diff_of_paired_proportions_ci(both=6, only_a=8, only_b=2, neither=4)
    independent = diff_of_proportions_ci(14, 20, 8, 20)
    assert (paired.low, paired.high) == pytest.approx((independent.low, independent.high))


def test_every_small_table_is_inside_bounds_contains_its_estimate_and_mirrors() -> None:
    for cells in itertools.product(range(5), repeat=4):
        if sum(cells) == 0:
            continue
        both, only_a, only_b, neither = cells
        d = diff_of_paired_proportions_ci(both, only_a, only_b, neither)
        assert -1.0 <= d.low <= d.estimate <= d.high <= 1.0, cells
        swapped = diff_of_paired_proportions_ci(both, only_b, only_a, neither)
        assert swapped.estimate == pytest.approx(-d.estimate)
        assert swapped.low == pytest.approx(-d.high, abs=1e-12), cells
        assert swapped.high == pytest.approx(-d.low, abs=1e-12), cells
        assert swapped.significant == d.significant


def test_no_pairs_says_nothing_and_negative_counts_are_refused() -> None:
    d = diff_of_paired_proportions_ci(0, 0, 0, 0)
    assert math.isnan(d.estimate)
    assert (d.low, d.high, d.significant) == (-1.0, 1.0, False)
    with pytest.raises(ValueError, match="negative"):
        diff_of_paired_proportions_ci(1, -1, 0, 0)


def test_a_wider_z_gives_a_wider_interval() -> None:
    narrow = diff_of_paired_proportions_ci(30, 5, 12, 53)
    wide = diff_of_paired_proportions_ci(30, 5, 12, 53, z=2.576)
    assert wide.low < narrow.low and wide.high > narrow.high
