"""Statistics for experiment reports: intervals for rates, means, percentiles and differences.

Pure functions over plain numbers; randomness (for the bootstrap) is a `random.Random` passed
in, so a report is reproducible from its seed. Differences are always `b - a`: `a` is the
control, `b` the variant compared with it. Standard library only.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

Statistic = Callable[[Sequence[float]], float]
_NORMAL = NormalDist()


@dataclass(frozen=True)
class Interval:
    """A confidence interval `[low, high]` around a point `estimate` (NaN when undefined)."""

    low: float
    high: float
    estimate: float

    def as_json(self) -> dict[str, object]:
        """{estimate, low, high} for JSON, which has no NaN or infinity: those become null."""
        return {
            "estimate": finite(self.estimate),
            "low": finite(self.low),
            "high": finite(self.high),
        }

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    @property
    def width(self) -> float:
        return self.high - self.low


@dataclass(frozen=True)
class Difference(Interval):
    """An interval of `b - a`; `significant` when it excludes 0 and the data can say so."""

    significant: bool

    def as_json(self) -> dict[str, object]:
        return super().as_json() | {"significant": self.significant}


def finite(value: object) -> float | None:
    """A finite number as a float; None for NaN, infinity, None, a bool or anything else:
    what JSON and a drawing can hold."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _z(level: float) -> float:
    """The two-sided normal quantile for confidence `level` (0.95 -> 1.959964...)."""
    if not 0 < level < 1:
        raise ValueError("level must be between 0 and 1")
    return _NORMAL.inv_cdf(0.5 + level / 2)


def mean(values: Sequence[float]) -> float:
    """The arithmetic mean (exactly rounded sum); NaN for no values."""
    if not values:
        return math.nan
    return math.fsum(values) / len(values)


def _sorted_percentile(ordered: Sequence[float], q: float) -> float:
    position = (len(ordered) - 1) * q / 100
    below = math.floor(position)
    if below + 1 >= len(ordered):
        return ordered[-1]
    return ordered[below] + (position - below) * (ordered[below + 1] - ordered[below])


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`th percentile (0-100) by linear interpolation between closest ranks, as
    `numpy.percentile`'s default; NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError("q must be between 0 and 100")
    if not values:
        return math.nan
    return _sorted_percentile(sorted(values), q)


def wilson(successes: int, n: int, z: float = 1.96) -> Interval:
    """Wilson score interval for a rate of `successes` in `n`; estimate `successes / n`.

    With no trials nothing is known: `(0, 1)` around a NaN estimate.
    """
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError("need 0 <= successes <= n")
    if n == 0:
        return Interval(0.0, 1.0, math.nan)
    p = successes / n
    scale = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / scale
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / scale
    # It always contains p; the clamps stop float noise (0 or n successes) from excluding it.
    return Interval(min(max(centre - half, 0.0), p), max(min(centre + half, 1.0), p), p)


def bootstrap(
    values: Sequence[float],
    stat: Statistic,
    rng: random.Random,
    resamples: int = 2000,
    level: float = 0.95,
) -> Interval:
    """Percentile bootstrap interval of `stat` over `values`; estimate `stat(values)`.

    No values: a NaN interval. One value: the degenerate interval at `stat` of it (resampling
    one value cannot show spread, so callers should treat it as too few data).
    """
    if resamples < 1:
        raise ValueError("resamples must be positive")
    _z(level)
    if not values:
        return Interval(math.nan, math.nan, math.nan)
    estimate = stat(values)
    if len(values) == 1:
        return Interval(estimate, estimate, estimate)
    draws = sorted(stat(rng.choices(values, k=len(values))) for _ in range(resamples))
    return _percentile_interval(draws, estimate, level)


def _percentile_interval(ordered: Sequence[float], estimate: float, level: float) -> Interval:
    tail = (1 - level) / 2 * 100
    return Interval(
        _sorted_percentile(ordered, tail), _sorted_percentile(ordered, 100 - tail), estimate
    )


def _significant(interval: Interval) -> bool:
    return interval.low > 0 or interval.high < 0


def diff_of_means_ci(
    a: Sequence[float],
    b: Sequence[float],
    rng: random.Random,
    resamples: int = 2000,
    level: float = 0.95,
) -> Difference:
    """Bootstrap interval of `mean(b) - mean(a)` for independent samples (see diff_of_stats_ci)."""
    return diff_of_stats_ci(a, b, mean, rng, resamples, level)


def diff_of_stats_ci(
    a: Sequence[float],
    b: Sequence[float],
    stat: Statistic,
    rng: random.Random,
    resamples: int = 2000,
    level: float = 0.95,
) -> Difference:
    """Bootstrap interval of `stat(b) - stat(a)` (e.g. a percentile) for independent samples,
    each resampled apart. Never significant with fewer than two values in either sample; NaN
    if one is empty."""
    if resamples < 1:
        raise ValueError("resamples must be positive")
    _z(level)
    if not a or not b:
        return Difference(math.nan, math.nan, math.nan, significant=False)
    estimate = stat(b) - stat(a)
    draws = sorted(
        stat(rng.choices(b, k=len(b))) - stat(rng.choices(a, k=len(a))) for _ in range(resamples)
    )
    interval = _percentile_interval(draws, estimate, level)
    enough = len(a) >= 2 and len(b) >= 2
    return Difference(interval.low, interval.high, estimate, enough and _significant(interval))


def diff_of_proportions_ci(sa: int, na: int, sb: int, nb: int, z: float = 1.96) -> Difference:
    """Newcombe's hybrid score interval (1998, method 10) for `sb/nb - sa/na`, built from the
    two Wilson intervals. With no trials in either arm: `(-1, 1)` around NaN, not significant.
    """
    wa, wb = wilson(sa, na, z), wilson(sb, nb, z)
    if na == 0 or nb == 0:
        return Difference(-1.0, 1.0, math.nan, significant=False)
    pa, pb = wa.estimate, wb.estimate
    estimate = pb - pa
    low = estimate - math.hypot(pb - wb.low, wa.high - pa)
    high = estimate + math.hypot(wb.high - pb, pa - wa.low)
    interval = Interval(max(low, -1.0), min(high, 1.0), estimate)
    return Difference(interval.low, interval.high, estimate, _significant(interval))


def mean_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Normal-approximation interval of the mean, `mean ± z * sd / sqrt(n)`: for large samples,
    where the central limit theorem holds and a bootstrap would cost O(n * resamples) for the
    same answer. Under two values: a NaN or degenerate interval, as `bootstrap`."""
    z = _z(level)
    if len(values) < 2:
        estimate = mean(values)
        return Interval(estimate, estimate, estimate)
    estimate = mean(values)
    spread = math.fsum((v - estimate) ** 2 for v in values) / (len(values) - 1)
    half = z * math.sqrt(spread / len(values))
    return Interval(estimate - half, estimate + half, estimate)


def percentile_interval(values: Sequence[float], q: float, level: float = 0.95) -> Interval:
    """Distribution-free interval of the `q`th percentile from order statistics: the ranks
    `n p ± z sqrt(n p (1 - p))` of the sorted sample (normal approximation to the binomial
    count of values below the true percentile). One sort, any n; estimate as `percentile`."""
    z = _z(level)
    if not values:
        return Interval(math.nan, math.nan, math.nan)
    ordered = sorted(values)
    n, p = len(ordered), q / 100
    half = z * math.sqrt(n * p * (1 - p))
    low = min(max(math.floor(n * p - half), 0), n - 1)
    high = min(max(math.ceil(n * p + half), 0), n - 1)
    estimate = _sorted_percentile(ordered, q)
    return Interval(min(ordered[low], estimate), max(ordered[high], estimate), estimate)


def normal_difference(a: Interval, b: Interval, level: float = 0.95) -> Difference:
    """`b - a` for independent estimates whose intervals are (near) normal: the standard
    errors are read back from the intervals' widths and added in quadrature."""
    _z(level)
    estimate = b.estimate - a.estimate
    if math.isnan(estimate):
        return Difference(math.nan, math.nan, math.nan, significant=False)
    half = math.hypot(a.width, b.width) / 2
    interval = Interval(estimate - half, estimate + half, estimate)
    return Difference(interval.low, interval.high, estimate, _significant(interval))


def _power_z(alpha: float, power: float) -> tuple[float, float]:
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise ValueError("alpha and power must be between 0 and 1")
    return _NORMAL.inv_cdf(1 - alpha / 2), _NORMAL.inv_cdf(power)


def _per_arm(n: float) -> int:
    # A hair below an integer is that integer: float noise must not add a request.
    return max(math.ceil(n - 1e-9), 1)


def sample_size_for_proportions(
    p_control: float, min_effect: float, alpha: float = 0.05, power: float = 0.8
) -> int:
    """Requests per arm for a two-sided test at `alpha` to detect, with `power`, a rate moving
    from `p_control` by `min_effect` (absolute, either sign), by the normal approximation with
    the pooled variance under the null (Fleiss, no continuity correction)."""
    p_other = p_control + min_effect
    if min_effect == 0 or not 0 <= p_control <= 1 or not 0 <= p_other <= 1:
        raise ValueError("need a non-zero effect with both rates between 0 and 1")
    z_alpha, z_beta = _power_z(alpha, power)
    pooled = (p_control + p_other) / 2
    spread = z_alpha * math.sqrt(2 * pooled * (1 - pooled)) + z_beta * math.sqrt(
        p_control * (1 - p_control) + p_other * (1 - p_other)
    )
    return _per_arm(spread * spread / (min_effect * min_effect))


def sample_size_for_means(
    sd: float, min_effect: float, alpha: float = 0.05, power: float = 0.8
) -> int:
    """Requests per arm for a two-sided test at `alpha` to detect, with `power`, a difference
    of means of `min_effect` when each arm has standard deviation `sd` (normal approximation:
    `2 * (z_alpha + z_beta)^2 * sd^2 / effect^2`)."""
    if sd < 0 or min_effect == 0:
        raise ValueError("need sd >= 0 and a non-zero effect")
    z_alpha, z_beta = _power_z(alpha, power)
    return _per_arm(2 * (z_alpha + z_beta) ** 2 * sd * sd / (min_effect * min_effect))


def diff_of_paired_proportions_ci(
    both: int, only_a: int, only_b: int, neither: int, z: float = 1.96
) -> Difference:
    """Newcombe's score interval (1998, "Improved confidence intervals for the difference
    between binomial proportions based on paired data", method 10) for `p_b - p_a` when `a`
    and `b` were observed on the same items: `both` right in both, `only_a` right in `a`
    only, and so on. The two Wilson intervals of the marginal rates are combined as for
    independent rates, less twice the correlation `phi` of the pairs (Newcombe's corrected
    phi: `ad - bc` less `n / 2` when positive, 0 if that goes below 0; 0 when a margin is
    empty). With no pairs: `(-1, 1)` around NaN, not significant."""
    cells = (both, only_a, only_b, neither)
    if any(c < 0 for c in cells):
        raise ValueError("paired counts must not be negative")
    n = sum(cells)
    if n == 0:
        return Difference(-1.0, 1.0, math.nan, significant=False)
    wa, wb = wilson(both + only_a, n, z), wilson(both + only_b, n, z)
    pa, pb = wa.estimate, wb.estimate
    estimate = (only_b - only_a) / n
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    association = both * neither - only_a * only_b
    if margins == 0:
        phi = 0.0
    elif association > 0:
        phi = max(association - n / 2, 0.0) / math.sqrt(margins)
    else:
        phi = association / math.sqrt(margins)
    below_b, above_a = pb - wb.low, wa.high - pa
    above_b, below_a = wb.high - pb, pa - wa.low
    delta = math.sqrt(max(below_b**2 - 2 * phi * below_b * above_a + above_a**2, 0.0))
    epsilon = math.sqrt(max(above_b**2 - 2 * phi * above_b * below_a + below_a**2, 0.0))
    interval = Interval(
        min(max(estimate - delta, -1.0), estimate),
        max(min(estimate + epsilon, 1.0), estimate),
        estimate,
    )
    return Difference(interval.low, interval.high, estimate, _significant(interval))
