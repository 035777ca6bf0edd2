"""Bootstrap intervals, the paired comparison and the chance test, against hand-computed cases and theory."""

from __future__ import annotations

import math

import pytest
import torch

from captum_chefer.comparison.stats import (
    Interval,
    above_chance,
    binomial_tail,
    bootstrap_interval,
    paired_difference,
)


def test_constant_values_give_a_point_interval():
    interval = bootstrap_interval([0.25] * 7)
    assert (interval.mean, interval.low, interval.high, interval.n) == (0.25, 0.25, 0.25, 7)
    assert bootstrap_interval([2.0]) == Interval(2.0, 2.0, 2.0, 1)


def test_two_patients_by_hand():
    # resampled means: a (1/4), (a + b) / 2 (1/2), b (1/4): both 2.5% tails sit on the data points
    interval = bootstrap_interval([1.0, 5.0], n_resamples=4000, seed=3)
    assert (interval.mean, interval.low, interval.high) == (3.0, 1.0, 5.0)


def test_three_patients_by_exact_enumeration():
    # all 27 resamples of (0, 0, 3) are equally likely; the mean is the number of 3s drawn
    values = torch.tensor([0.0, 0.0, 3.0])
    means = sorted(float(values[[i, j, k]].mean()) for i in range(3) for j in range(3) for k in range(3))
    assert [means.count(m) for m in (0.0, 1.0, 2.0, 3.0)] == [8, 12, 6, 1]
    # P(mean <= 2) = 26/27 = 0.963 < 0.975, so the upper 2.5% quantile is 3; P(mean = 0) = 0.30 > 0.025
    interval = bootstrap_interval(values)
    assert (interval.low, interval.high) == (0.0, 3.0)
    # at level 0.80 the tails are 10%: P(mean = 0) = 0.30 > 0.10 -> low 0; P(mean >= 2) = 7/27 = 0.26 > 0.10 -> high 2
    narrow = bootstrap_interval(values, level=0.80)
    assert (narrow.low, narrow.high) == (0.0, 2.0)


def test_large_sample_matches_the_normal_interval():
    values = torch.randn(400, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 + 1
    interval = bootstrap_interval(values, n_resamples=4000)
    half = 1.959964 * float(values.std()) / math.sqrt(400)  # normal theory, independent of the bootstrap
    assert interval.mean == pytest.approx(float(values.mean()))
    assert interval.low == pytest.approx(interval.mean - half, abs=0.1 * half)
    assert interval.high == pytest.approx(interval.mean + half, abs=0.1 * half)


def test_nan_values_are_left_out_and_no_value_gives_nan():
    assert bootstrap_interval([1.0, float("nan"), 1.0]).n == 2
    empty = bootstrap_interval([float("nan")])
    assert empty.n == 0 and math.isnan(empty.mean) and not empty.excludes(0.0)
    assert empty.as_dict() == {"mean": None, "low": None, "high": None, "n": 0, "level": 0.95, "kind": "bootstrap"}


def test_seeded():
    values = torch.rand(30, generator=torch.Generator().manual_seed(1))
    assert bootstrap_interval(values, seed=5) == bootstrap_interval(values, seed=5)
    assert bootstrap_interval(values, seed=5) != bootstrap_interval(values, seed=6)


def test_paired_difference_by_hand():
    # every patient gains exactly 0.1: the interval is the point 0.1, which excludes 0
    a = torch.tensor([0.3, 0.5, 0.9, 0.2])
    d = paired_difference(a + 0.1, a)
    assert d.n == 4 and d.low == pytest.approx(0.1) and d.high == pytest.approx(0.1) and d.excludes(0.0)
    # gains of +1 and -1 on two patients each: resampled means -1, -0.5, 0, 0.5, 1 -> the interval holds 0
    d = paired_difference([1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0])
    assert d.mean == 0.0 and d.low == -1.0 and d.high == 1.0 and not d.excludes(0.0)
    # a NaN in either leaves that patient out of the pair
    assert paired_difference([1.0, float("nan"), 3.0], [0.0, 0.0, float("nan")]).n == 1


def test_paired_comparison_separates_what_overlapping_intervals_cannot():
    # large between-patient spread, a small but consistent gain: the marginal intervals overlap, the paired one clears 0
    base = torch.linspace(0.0, 1.0, 40, dtype=torch.float64)
    better = base + 0.02
    a, b = bootstrap_interval(better), bootstrap_interval(base)
    assert a.low < b.high  # overlapping
    assert paired_difference(better, base).low == pytest.approx(0.02)


def test_binomial_tail_by_hand():
    assert binomial_tail(0, 5, 0.3) == pytest.approx(1.0)
    assert binomial_tail(12, 12, 0.5) == pytest.approx(1 / 4096)
    assert binomial_tail(2, 3, 0.5) == pytest.approx(0.5)  # 3/8 + 1/8
    assert binomial_tail(4, 3, 0.5) == 0.0


def test_above_chance():
    assert above_chance(6, 12, 0.5) == (False, pytest.approx(binomial_tail(6, 12, 0.5)))
    assert above_chance(12, 12, 0.5)[0]
    # 12 of 12 correct when 11 of 12 share a class is not evidence of learning anything
    assert not above_chance(12, 12, 11 / 12)[0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="level"):
        bootstrap_interval([1.0], level=95)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_interval([1.0], n_resamples=0)
    with pytest.raises(ValueError, match="one value per patient"):
        paired_difference([1.0, 2.0], [1.0])


def test_wilson_interval_by_hand():
    from captum_chefer.comparison.stats import wilson_interval

    z = 1.959963984540054  # the 97.5% standard normal quantile
    for n in (1, 8, 40):  # n of n: the lower end is n / (n + z^2) (the formula at p = 1), the upper end 1
        interval = wilson_interval(n, n)
        assert interval.mean == 1.0 and interval.high == 1.0 and interval.n == n
        assert abs(interval.low - n / (n + z * z)) < 1e-12
        assert interval.low < 1.0  # not zero-width, unlike a bootstrap of eight ones
        empty = wilson_interval(0, n)
        assert empty.low == 0.0 and abs(empty.high - z * z / (n + z * z)) < 1e-12
    half = wilson_interval(5, 10)  # symmetric about 1/2: 1/2 -/+ z sqrt(1/40 + z^2/400) / (1 + z^2/10)
    width = z * math.sqrt(0.025 + z * z / 400) / (1 + z * z / 10)
    assert abs(half.low - (0.5 - width)) < 1e-12 and abs(half.high - (0.5 + width)) < 1e-12
    narrow = wilson_interval(40, 80, level=0.5)
    assert half.low < narrow.low < 0.5 < narrow.high < half.high
    assert math.isnan(wilson_interval(0, 0).mean)


@pytest.mark.parametrize("args", [(9, 8), (-1, 8), (1.0, 8), (1, -1)])
def test_wilson_interval_refuses_impossible_counts(args):
    from captum_chefer.comparison.stats import wilson_interval

    with pytest.raises(ValueError, match="0 <= successes <= n"):
        wilson_interval(*args)


Z = 1.959963984540054  # the 97.5% standard normal quantile


def _wilson_by_hand(k: int, n: int) -> tuple[float, float]:
    """Wilson's score interval written out from the formula, for the checks below."""
    p = k / n
    centre, spread = p + Z * Z / (2 * n), Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
    return (centre - spread) / (1 + Z * Z / n), (centre + spread) / (1 + Z * Z / n)


def test_mean_interval_of_0_1_values_is_wilson_on_the_count():
    from captum_chefer.comparison.stats import mean_interval

    # P@k = 1 for all 8 patients: a bootstrap collapses to [1, 1]; the count 8 of 8 gives [8 / (8 + z^2), 1]
    assert bootstrap_interval([1.0] * 8).degenerate
    eight = mean_interval(torch.ones(8))
    assert (eight.kind, eight.mean, eight.n, eight.high) == ("wilson", 1.0, 8, 1.0) and not eight.degenerate
    assert abs(eight.low - 8 / (8 + Z * Z)) < 1e-12 and abs(eight.low - 0.6756) < 1e-4
    nothing = mean_interval([0.0] * 5)
    assert nothing.low == 0.0 and abs(nothing.high - Z * Z / (5 + Z * Z)) < 1e-12
    # 6 of 8, NaN (a patient without the metric) left out: (0.409, 0.929) by the formula
    mixed = mean_interval([1, 1, 0, 1, float("nan"), 1, 0, 1, 1])
    low, high = _wilson_by_hand(6, 8)
    assert (mixed.kind, mixed.mean, mixed.n) == ("wilson", 0.75, 8)
    assert abs(mixed.low - low) < 1e-12 and abs(mixed.high - high) < 1e-12
    assert (round(low, 3), round(high, 3)) == (0.409, 0.929)
    assert mean_interval([1.0] * 8, level=0.5).low > eight.low  # the level is passed on


def test_mean_interval_of_other_values_is_the_bootstrap_and_flags_a_zero_width():
    from captum_chefer.comparison.stats import mean_interval

    values = [0.0, 0.5, 1.0, 1.0, 0.5]
    assert mean_interval(values, seed=4) == bootstrap_interval(values, seed=4)
    assert mean_interval(values).kind == "bootstrap" and not mean_interval(values).degenerate
    same = mean_interval([0.5] * 8)  # every patient 0.5: nothing to resample
    assert (same.kind, same.low, same.high, same.n) == ("bootstrap", 0.5, 0.5, 8) and same.degenerate
    assert mean_interval([0.3]).degenerate and not mean_interval([float("nan")]).degenerate
    assert mean_interval([float("nan")]).n == 0
