"""Statistics over patients: bootstrap intervals, a paired comparison, and a binomial test against chance.

Every metric of :mod:`captum_chefer.comparison.metrics` gives one value per patient, so its mean over the
explained patients carries sampling error. Here:

* :func:`bootstrap_interval`: the percentile bootstrap interval of a mean (patients resampled with
  replacement, a seeded generator, NaN values left out).
* :func:`paired_difference`: the same for the mean *difference* of two methods on the same patients.
  Both methods are scored on the same patients, so the between-patient spread cancels in the difference:
  this is how a "best" method is told apart from its runner-up (see ``Evaluation.leader``).
* :func:`wilson_interval`: a proportion ``k / n`` (for example "the planted word ranks first in 7 of 8
  samples") and its Wilson score interval, which, unlike the bootstrap, is not zero-width at ``0 / n`` or
  ``n / n``: eight successes in eight tries do not show a rate of exactly 100%.
* :func:`mean_interval`: the interval the comparison reports for a mean over patients: Wilson's when
  every patient's value is 0 or 1 (the mean is then a count of successes), the bootstrap's otherwise.
* :func:`binomial_tail` and :func:`above_chance`: is a model's accuracy above always predicting the most
  frequent class (one-sided exact binomial test)?

Example:
    >>> import torch
    >>> interval = bootstrap_interval(torch.tensor([0.0, 0.0, 3.0]))
    >>> interval.mean, interval.low, interval.high, interval.n
    (1.0, 0.0, 3.0, 3)
    >>> paired_difference(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 1.5, 2.5])).low
    0.5
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_LEVEL",
    "DEFAULT_RESAMPLES",
    "Interval",
    "above_chance",
    "binomial_tail",
    "bootstrap_interval",
    "mean_interval",
    "paired_difference",
    "wilson_interval",
]

DEFAULT_LEVEL = 0.95
DEFAULT_RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` patients and its interval ``[low, high]`` at ``level``.

    ``kind`` says how it was found: ``"bootstrap"`` (:func:`bootstrap_interval`, :func:`paired_difference`)
    or ``"wilson"`` (:func:`wilson_interval`, a proportion). ``n == 0`` (no finite value): every field is NaN.
    """

    mean: float
    low: float
    high: float
    n: int
    level: float = DEFAULT_LEVEL
    kind: str = "bootstrap"

    def excludes(self, value: float = 0.0) -> bool:
        """Whether ``value`` lies outside the interval (False when there is no interval)."""
        return self.n > 0 and (self.low > value or self.high < value)

    @property
    def degenerate(self) -> bool:
        """A zero-width interval from values that are all equal (or a single value): the bootstrap had no
        spread to resample, so the width says nothing about the uncertainty of the mean.

        Example:
            >>> bootstrap_interval([0.5] * 8).degenerate, bootstrap_interval([0.5, 0.7]).degenerate
            (True, False)
        """
        return self.n > 0 and self.low == self.high

    def as_dict(self) -> dict[str, float | int | str | None]:
        """JSON-ready: NaN becomes ``None``."""
        clean = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v  # noqa: E731
        return {"mean": clean(self.mean), "low": clean(self.low), "high": clean(self.high), "n": self.n, "level": self.level,
                "kind": self.kind}


def _finite(values: Tensor | Sequence[float]) -> Tensor:
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    return v[torch.isfinite(v)]


def _check(level: float, n_resamples: int) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1 (e.g. 0.95), got {level}")
    if not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive int, got {n_resamples!r}")


def _interval(values: Tensor, level: float, n_resamples: int, seed: int) -> Interval:
    n = int(values.numel())
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, level)
    mean = float(values.mean())
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(0, n, (n_resamples, n), generator=generator)
    means = values[index].mean(dim=1)
    tail = (1.0 - level) / 2.0
    low, high = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return Interval(mean, low, high, n, level)


def bootstrap_interval(
    values: Tensor | Sequence[float],
    *,
    level: float = DEFAULT_LEVEL,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """The mean of ``values`` and its percentile bootstrap interval (NaN values are left out).

    The patients are resampled with replacement ``n_resamples`` times from a generator seeded with
    ``seed``; the interval runs between the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the
    resampled means (linear interpolation). Same values and seed, same interval.

    Example (three patients; the 27 equally likely resamples hold the 3 zero to three times, so their
    means are 0, 1, 2 or 3 with probabilities 8/27, 12/27, 6/27 and 1/27: the 2.5% quantile is 0 and,
    since 26/27 < 0.975, the 97.5% quantile is 3):
        >>> bootstrap_interval([0.0, 0.0, 3.0, float("nan")])
        Interval(mean=1.0, low=0.0, high=3.0, n=3, level=0.95, kind='bootstrap')
    """
    _check(level, n_resamples)
    return _interval(_finite(values), level, n_resamples, seed)


def paired_difference(
    a: Tensor | Sequence[float],
    b: Tensor | Sequence[float],
    *,
    level: float = DEFAULT_LEVEL,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """The mean of ``a - b`` over the patients where both are finite, with its bootstrap interval.

    ``a`` and ``b`` are two methods' values on the same patients, in the same order. An interval that
    excludes 0 says the methods differ on these patients at ``level`` (a paired percentile bootstrap).

    Example (b is a everywhere but one patient, where it is higher by 0.3):
        >>> d = paired_difference([0.2, 0.9, 0.4, 0.6], [0.2, 0.9, 0.7, 0.6])
        >>> round(d.mean, 3), d.high, d.excludes(0.0)
        (-0.075, 0.0, False)
    """
    _check(level, n_resamples)
    a = torch.as_tensor(a, dtype=torch.float64).reshape(-1)
    b = torch.as_tensor(b, dtype=torch.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired values need one value per patient in both: got {a.numel()} and {b.numel()}")
    both = torch.isfinite(a) & torch.isfinite(b)
    return _interval((a - b)[both], level, n_resamples, seed)


def wilson_interval(successes: int, n: int, *, level: float = DEFAULT_LEVEL) -> Interval:
    """The proportion ``successes / n`` and its Wilson score interval at ``level``.

    With ``z`` the standard normal quantile of ``(1 + level) / 2`` and ``p = successes / n``, the interval
    is ``(p + z^2 / 2n -/+ z sqrt(p (1 - p) / n + z^2 / 4n^2)) / (1 + z^2 / n)`` (Wilson, 1927). It stays
    inside ``[0, 1]`` and keeps a width at ``0 / n`` and ``n / n``, where a bootstrap interval collapses to
    a point. ``n == 0``: every field is NaN.

    Example (8 of 8: the interval reaches down to 67.6%, not just to 100%):
        >>> interval = wilson_interval(8, 8)
        >>> interval.mean, round(interval.low, 4), interval.high, interval.n
        (1.0, 0.6756, 1.0, 8)
        >>> [round(v, 4) for v in (wilson_interval(1, 8).low, wilson_interval(1, 8).high)]
        [0.0224, 0.4709]
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1 (e.g. 0.95), got {level}")
    if not (isinstance(successes, int) and isinstance(n, int)) or n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need integers 0 <= successes <= n, got successes={successes!r}, n={n!r}")
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, level, "wilson")
    z = float(torch.special.ndtri(torch.tensor((1.0 + level) / 2.0, dtype=torch.float64)))
    p = successes / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    scale = 1 + z * z / n
    low = 0.0 if successes == 0 else (centre - spread) / scale
    high = 1.0 if successes == n else (centre + spread) / scale
    return Interval(p, low, high, n, level, "wilson")


def mean_interval(
    values: Tensor | Sequence[float],
    *,
    level: float = DEFAULT_LEVEL,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """The mean of ``values`` over the patients (NaN left out) and the interval the comparison reports for it.

    * Every value 0 or 1 (a metric that succeeds or fails per patient, e.g. P@k with one planted code,
      or a perfect AUROC everywhere): the mean is the share ``k / n`` of successes, and its interval is
      :func:`wilson_interval` ``(k, n)``. A percentile bootstrap would give ``[1, 1]`` at 8 of 8, as if 8
      patients proved a rate of exactly 100%; Wilson's gives ``[0.676, 1]``.
    * Otherwise: :func:`bootstrap_interval`. It still collapses to a point where every value is equal
      (e.g. 0.5 for all patients) or there is one value; :attr:`Interval.degenerate` is then true, and
      the report marks such a cell rather than print a zero width as if it were a certainty.

    Example (hand-computed: 8 of 8 successes, then 6 of 8; a mean of non-binary values is bootstrapped):
        >>> interval = mean_interval([1.0] * 8)
        >>> interval.kind, interval.mean, round(interval.low, 4), interval.high
        ('wilson', 1.0, 0.6756, 1.0)
        >>> interval = mean_interval([1, 1, 0, 1, 1, 0, 1, 1, float("nan")])
        >>> interval.kind, interval.mean, interval.n, [round(v, 4) for v in (interval.low, interval.high)]
        ('wilson', 0.75, 8, [0.4093, 0.9285])
        >>> mean_interval([0.0, 0.0, 3.0]) == bootstrap_interval([0.0, 0.0, 3.0])
        True
    """
    _check(level, n_resamples)
    finite = _finite(values)
    if finite.numel() and bool(((finite == 0) | (finite == 1)).all()):
        return wilson_interval(int(finite.sum()), int(finite.numel()), level=level)
    return _interval(finite, level, n_resamples, seed)


def binomial_tail(k: int, n: int, p: float) -> float:
    """``P(X >= k)`` for ``X ~ Binomial(n, p)``, summed exactly.

    Example (11 or 12 successes of 12 fair coin flips: (12 + 1) / 4096):
        >>> binomial_tail(11, 12, 0.5) == 13 / 4096
        True
    """
    if not 0 <= p <= 1 or n < 0:
        raise ValueError(f"need n >= 0 and 0 <= p <= 1, got n={n}, p={p}")
    k = max(int(k), 0)
    return float(sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1)))


def above_chance(correct: int, n: int, majority_rate: float, alpha: float = 0.05) -> tuple[bool, float]:
    """Whether ``correct`` of ``n`` predictions beat always predicting the most frequent class.

    One-sided exact binomial test of ``H0: accuracy = majority_rate``.

    Returns:
        ``(above, p_value)``: ``above`` when ``p_value < alpha``.

    Example (12 patients, 7 of the majority class: 11 correct is above chance, 10 is not):
        >>> above_chance(11, 12, 7 / 12)[0], above_chance(10, 12, 7 / 12)[0]
        (True, False)
    """
    if n <= 0:
        raise ValueError("above_chance needs at least one prediction")
    p_value = binomial_tail(correct, n, majority_rate)
    return p_value < alpha, p_value
