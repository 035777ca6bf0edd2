"""All of the comparison's metrics for several methods over a batch or a ``DataLoader``, in one call.

:func:`evaluate_methods` runs :func:`~captum_chefer.comparison.methods.compare_methods` per batch, then
every metric of :mod:`captum_chefer.comparison.metrics` on its scores, and returns an :class:`Evaluation`
(per-sample values, curves, time per sample; tables, CSV, JSON).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..adapters.base import LookupDict
from .methods import batch_patient_ids, compare_methods, method_specs
from .metrics import (
    DEFAULT_FRACTIONS,
    DEFAULT_PERCENTAGES,
    attribution_sensitivity,
    comprehensiveness,
    localization_auroc,
    precision_at_k,
    removal_curves,
    sufficiency,
    token_infidelity,
)
from .removal import Output, TokenRemover
from .stats import DEFAULT_LEVEL, DEFAULT_RESAMPLES, Interval, mean_interval, paired_difference
from .tables import read_rows, table_format, write_rows

__all__ = ["Evaluation", "GroundTruth", "Leader", "check_ground_truth", "evaluate_methods"]


@dataclass(frozen=True)
class Leader:
    """The best method on one metric, its runner-up, and whether the gap holds up over the patients.

    Attributes:
        metric: the metric.
        method: the best method by mean; runner_up: the second best (``None`` with one method).
        difference: the mean paired difference ``best - runner-up`` over the patients both have a
            value for, oriented so that positive favours ``method`` (for lower-is-better metrics it is
            ``runner-up - best``), with its bootstrap interval.
        clear: the interval of the difference lies above zero: ``method`` beats ``runner_up`` on
            these patients at the interval's level (a paired percentile bootstrap).
    """

    metric: str
    method: str
    runner_up: Optional[str]
    difference: Optional[Interval]
    clear: bool


@dataclass
class Evaluation:
    """Per-sample metrics of several methods (from :func:`evaluate_methods`).

    Attributes:
        per_sample: ``{method: {metric: [N] tensor}}`` (NaN where a metric does not apply, e.g.
            localization of a sample without true codes).
        curves: ``{method: {"deletion": [N, F], "insertion": [N, F]}}``.
        fractions: the curve grid; percentages: the comprehensiveness / sufficiency fractions.
        seconds_per_sample: wall time of each method's ``attribute`` calls per sample (one
            measurement per method: it has no interval).
        patient_ids: per sample, the batch's ``patient_id`` (``None`` where the batch has none).
        level, n_resamples, seed: the bootstrap behind :meth:`interval` and :meth:`leader`.
    """

    per_sample: dict[str, dict[str, Tensor]]
    curves: dict[str, dict[str, Tensor]]
    fractions: tuple[float, ...]
    percentages: tuple[float, ...]
    seconds_per_sample: dict[str, float] = field(default_factory=dict)
    patient_ids: list[Optional[str]] = field(default_factory=list)
    level: float = DEFAULT_LEVEL
    n_resamples: int = DEFAULT_RESAMPLES
    seed: int = 0

    HIGHER_IS_BETTER = {
        "deletion_aopc": True,
        "insertion_aopc": True,
        "comprehensiveness": True,
        "sufficiency": False,
        "precision_at_k": True,
        "auroc": True,
        "infidelity": False,
        "sensitivity": False,
        "seconds_per_sample": False,
    }

    def __post_init__(self) -> None:
        # a wrong method or metric name says which exist (LookupDict) instead of a bare KeyError
        self.per_sample = LookupDict({k: LookupDict(v, kind="metric") for k, v in self.per_sample.items()}, kind="method")
        self.curves = LookupDict({k: LookupDict(v, kind="curve") for k, v in self.curves.items()}, kind="method")

    @property
    def methods(self) -> list[str]:
        return list(self.per_sample)

    @property
    def n_samples(self) -> int:
        first = next(iter(self.per_sample.values()), {})
        values = next(iter(first.values()), None)
        return 0 if values is None else int(values.shape[0])

    def summary(self, intervals: bool = False) -> list[dict[str, Any]]:
        """One row per method: the mean of each metric over the samples where it applies.

        With ``intervals``, each metric ``m`` also gets ``m_low`` and ``m_high`` (the bootstrap interval
        of :meth:`interval`) and ``m_n`` (the number of patients with a value).
        """
        rows = []
        for name, metrics in self.per_sample.items():
            row: dict[str, Any] = {"method": name}
            for metric, values in metrics.items():
                finite = values[~torch.isnan(values)]
                row[metric] = float(finite.mean()) if finite.numel() else math.nan
                if intervals:
                    interval = self.interval(name, metric)
                    row[f"{metric}_low"], row[f"{metric}_high"], row[f"{metric}_n"] = interval.low, interval.high, interval.n
            row["seconds_per_sample"] = self.seconds_per_sample.get(name, math.nan)
            rows.append(row)
        return rows

    def interval(self, method: str, metric: str) -> Interval:
        """The mean of ``metric`` for ``method`` over the patients and its interval
        (:func:`~captum_chefer.comparison.stats.mean_interval`: Wilson's for 0/1 values, else the bootstrap)."""
        if method not in self.per_sample:
            raise KeyError(f"unknown method {method!r}; known: {self.methods}")
        if metric not in self.per_sample[method]:
            raise KeyError(f"{method!r} has no per-patient values for {metric!r}; known: {sorted(self.per_sample[method])}")
        return mean_interval(self.per_sample[method][metric], level=self.level, n_resamples=self.n_resamples, seed=self.seed)

    def leader(self, metric: str, exclude: Sequence[str] = ("Random",)) -> Leader:
        """The best method on ``metric``, its runner-up, and whether the paired difference clears zero.

        Example (two methods on four patients; "a" is ahead of "b" by 0.1 on every patient):
            >>> per = {"a": {"auroc": torch.tensor([0.9, 0.8, 0.7, 0.6])},
            ...        "b": {"auroc": torch.tensor([0.8, 0.7, 0.6, 0.5])}}
            >>> leader = Evaluation(per, {}, (), ()).leader("auroc")
            >>> leader.method, leader.runner_up, leader.clear
            ('a', 'b', True)
        """
        if metric not in self.HIGHER_IS_BETTER:
            raise KeyError(f"unknown metric {metric!r}; known: {sorted(self.HIGHER_IS_BETTER)}")
        higher = self.HIGHER_IS_BETTER[metric]
        means = {
            r["method"]: r[metric] for r in self.summary()
            if r["method"] not in exclude and not math.isnan(r.get(metric, math.nan))
        }
        if not means:
            raise ValueError(f"no method has a value for {metric!r}")
        ranked = sorted(means, key=lambda m: means[m], reverse=higher)
        best = ranked[0]
        if len(ranked) == 1 or metric == "seconds_per_sample":  # time: one measurement per method, no interval
            return Leader(metric, best, ranked[1] if len(ranked) > 1 else None, None, False)
        runner_up = ranked[1]
        a, b = self.per_sample[best][metric], self.per_sample[runner_up][metric]
        difference = paired_difference(
            a if higher else b, b if higher else a, level=self.level, n_resamples=self.n_resamples, seed=self.seed
        )
        return Leader(metric, best, runner_up, difference, difference.n > 0 and difference.low > 0)

    def columns(self) -> list[str]:
        rows = self.summary()
        return list(rows[0]) if rows else ["method"]

    def table(self, digits: int = 3, markdown: bool = False) -> str:
        """The summary as text (or a Markdown table), one row per method."""
        rows = self.summary()
        columns = self.columns()
        cells = [[_fmt(row.get(c), digits) for c in columns] for row in rows]
        if markdown:
            lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
            lines += ["| " + " | ".join(r) + " |" for r in cells]
            return "\n".join(lines)
        widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
        return "\n".join(lines)

    def best(self, metric: str, exclude: Sequence[str] = ("Random",)) -> str:
        """The method with the best mean ``metric`` (direction from :attr:`HIGHER_IS_BETTER`).

        A best mean need not hold up over the patients: :meth:`leader` says whether it does.
        """
        if metric not in self.HIGHER_IS_BETTER:
            raise KeyError(f"unknown metric {metric!r}; known: {sorted(self.HIGHER_IS_BETTER)}")
        rows = [r for r in self.summary() if r["method"] not in exclude and not math.isnan(r.get(metric, math.nan))]
        if not rows:
            raise ValueError(f"no method has a value for {metric!r}")
        sign = 1 if self.HIGHER_IS_BETTER[metric] else -1
        return max(rows, key=lambda r: sign * r[metric])["method"]

    def to_csv(self, path: str | Path) -> Path:
        """The summary with intervals (:meth:`summary` ``(intervals=True)``), one row per method, as CSV."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = self.summary(intervals=True)
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["method"])
            writer.writeheader()
            writer.writerows(rows)
        return path

    def statistics(self) -> dict[str, Any]:
        """How the intervals and the best methods were computed, and the best method per metric."""
        leaders = {}
        for metric in self.HIGHER_IS_BETTER:
            try:
                leader = self.leader(metric)
            except ValueError:
                continue
            leaders[metric] = {
                "method": leader.method, "runner_up": leader.runner_up, "clear": leader.clear,
                "difference": None if leader.difference is None else leader.difference.as_dict(),
            }
        return {
            "n_patients": self.n_samples,
            "interval": f"{self.level:.0%} interval of the mean over patients: Wilson score interval where every value is 0 "
                        f"or 1, else percentile bootstrap ({self.n_resamples} resamples, seed {self.seed})",
            "best": "the best mean (Random excluded) is marked only where the bootstrap interval of its paired "
                    "difference to the runner-up, over the same patients, lies above zero",
            "leaders": leaders,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the summary with intervals, the statistics, the curves, the per-sample values."""
        return {
            "summary": [{k: _json_number(v) for k, v in row.items()} for row in self.summary(intervals=True)],
            "statistics": self.statistics(),
            "fractions": list(self.fractions),
            "percentages": list(self.percentages),
            "mean_curves": {
                name: {
                    kind: [_json_number(float(v)) for v in c.nanmean(0)] if c.numel() else [] for kind, c in per.items()
                }
                for name, per in self.curves.items()
            },
            "patient_ids": list(self.patient_ids),
            "per_sample": {
                name: {metric: [_json_number(float(v)) for v in values] for metric, values in metrics.items()}
                for name, metrics in self.per_sample.items()
            },
            "curves": {
                name: {kind: [[_json_number(float(v)) for v in row] for row in c] for kind, c in per.items()}
                for name, per in self.curves.items()
            },
            "seconds_per_sample": {k: _json_number(v) for k, v in self.seconds_per_sample.items()},
            "higher_is_better": self.HIGHER_IS_BETTER,
            "level": self.level,
            "n_resamples": self.n_resamples,
            "seed": self.seed,
        }

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    def rows(self) -> list[dict[str, Any]]:
        """One row per (method, patient): ``method``, ``sample``, ``patient_id``, every per-patient
        metric, the curve points (``deletion@<fraction>``, ``insertion@<fraction>``) and the method's
        ``seconds_per_sample``."""
        out = []
        for name, metrics in self.per_sample.items():
            curves = self.curves.get(name, {})
            for i in range(self.n_samples):
                row: dict[str, Any] = {
                    "method": name, "sample": i, "patient_id": self.patient_ids[i] if i < len(self.patient_ids) else None,
                }
                row.update({metric: float(values[i]) for metric, values in metrics.items()})
                for kind in ("deletion", "insertion"):
                    if kind in curves and curves[kind].numel():
                        row.update({f"{kind}@{f!r}": float(v) for f, v in zip(self.fractions, curves[kind][i])})
                row["seconds_per_sample"] = self.seconds_per_sample.get(name, math.nan)
                out.append(row)
        return out

    def save(self, path: str | Path) -> Path:
        """Write the evaluation to ``.csv`` or ``.parquet`` (:meth:`rows`) or ``.json`` (:meth:`to_dict`).

        :meth:`load` reads any of them back, and the ``results.json`` of a report.

        Example:
            >>> import tempfile
            >>> per = {"a": {"auroc": torch.tensor([0.9, 0.7])}}
            >>> curves = {"a": {"deletion": torch.tensor([[1.0, 0.5], [0.8, 0.1]]),
            ...                 "insertion": torch.tensor([[0.0, 1.0], [0.2, 0.8]])}}
            >>> evaluation = Evaluation(per, curves, (0.0, 1.0), (), {"a": 0.01}, ["p1", "p2"])
            >>> for suffix in (".csv", ".json", ".parquet"):
            ...     again = Evaluation.load(evaluation.save(tempfile.mkdtemp() + "/e" + suffix))
            ...     assert again.rows() == evaluation.rows(), suffix
            >>> again.patient_ids, again.fractions
            (['p1', 'p2'], (0.0, 1.0))
        """
        if table_format(path) == ".json":
            return self.to_json(path)
        return write_rows(self.rows(), path)

    @classmethod
    def load(
        cls, path: str | Path, *, level: float | None = None, n_resamples: int | None = None, seed: int | None = None
    ) -> "Evaluation":
        """An evaluation saved by :meth:`save` (CSV, JSON or Parquet) or a report's ``results.json``.

        ``level``, ``n_resamples`` and ``seed`` set the bootstrap of the loaded evaluation. A JSON file keeps the
        ones it was saved with, and these arguments replace them; CSV and Parquet rows hold none, so there the
        defaults apply unless these arguments are given.
        """
        if table_format(path) == ".json":
            data = json.loads(Path(path).read_text())
            if not isinstance(data, dict) or "per_sample" not in data:
                raise ValueError(f"{str(path)!r} holds no per-patient values; write it with Evaluation.save")
            number = lambda v: math.nan if v is None else float(v)  # noqa: E731
            curves = {
                name: {
                    kind: torch.tensor([[number(v) for v in row] for row in c]).reshape(len(c), -1)
                    if c else torch.empty(0)
                    for kind, c in per.items()
                }
                for name, per in data.get("curves", {}).items()
            }
            return cls(
                per_sample={
                    name: {metric: torch.tensor([number(v) for v in values]) for metric, values in metrics.items()}
                    for name, metrics in data["per_sample"].items()
                },
                curves=curves,
                fractions=tuple(float(f) for f in data.get("fractions", ())),
                percentages=tuple(float(p) for p in data.get("percentages", ())),
                seconds_per_sample={k: number(v) for k, v in data.get("seconds_per_sample", {}).items()},
                patient_ids=list(data.get("patient_ids", [])),
                level=float(data.get("level", DEFAULT_LEVEL)) if level is None else level,
                n_resamples=int(data.get("n_resamples", DEFAULT_RESAMPLES)) if n_resamples is None else n_resamples,
                seed=int(data.get("seed", 0)) if seed is None else seed,
            )
        rows = read_rows(path)
        if not rows or "method" not in rows[0] or "sample" not in rows[0]:
            raise ValueError(
                f"{str(path)!r} holds no per-patient rows (a report's results.csv is the summary only); load the "
                "file Evaluation.save wrote, or the report's results.json"
            )
        columns = list(rows[0])
        curve_columns = {kind: [c for c in columns if c.startswith(f"{kind}@")] for kind in ("deletion", "insertion")}
        skip = {"method", "sample", "patient_id", "seconds_per_sample", *curve_columns["deletion"], *curve_columns["insertion"]}
        metrics = [c for c in columns if c not in skip]
        number = lambda v: math.nan if v is None else float(v)  # noqa: E731
        by_method: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_method.setdefault(str(row["method"]), []).append(row)
        n = max(int(r["sample"]) for r in rows) + 1
        patient_ids: list[Optional[str]] = [None] * n
        per_sample, curves, seconds = {}, {}, {}
        for name, mine in by_method.items():
            mine = sorted(mine, key=lambda r: int(r["sample"]))
            per_sample[name] = {m: torch.tensor([number(r.get(m)) for r in mine]) for m in metrics}
            # a method saved without curves has empty curve cells: it gets empty curves back, not NaN ones
            curves[name] = {
                kind: torch.tensor([[number(r[c]) for c in cols] for r in mine]).reshape(len(mine), len(cols))
                if any(r.get(c) is not None for r in mine for c in cols) else torch.empty(0)
                for kind, cols in curve_columns.items()
            }
            seconds[name] = number(mine[0].get("seconds_per_sample"))
            for r in mine:
                patient_ids[int(r["sample"])] = None if r.get("patient_id") is None else str(r["patient_id"])
        percentages = tuple(float(m.split("@", 1)[1]) for m in metrics if m.startswith("comprehensiveness@"))
        return cls(
            per_sample=per_sample,
            curves=curves,
            fractions=tuple(float(c.split("@", 1)[1]) for c in curve_columns["deletion"]),
            percentages=percentages,
            seconds_per_sample=seconds,
            patient_ids=patient_ids if any(p is not None for p in patient_ids) else [],
            level=DEFAULT_LEVEL if level is None else level,
            n_resamples=DEFAULT_RESAMPLES if n_resamples is None else n_resamples,
            seed=0 if seed is None else seed,
        )


def _json_number(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _fmt(value: Any, digits: int) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if value != 0 and abs(value) < 10 ** -(digits):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}f}"
    return str(value)


GroundTruth = Callable[[Mapping[str, Any]], Mapping[str, Tensor]]


def evaluate_methods(
    adapter: Any,
    data: Mapping[str, Any] | Iterable[Mapping[str, Any]],
    methods: Sequence[Any],
    *,
    ground_truth: Optional[GroundTruth] = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    percentages: Sequence[float] = DEFAULT_PERCENTAGES,
    target_mode: Literal["predicted", "label"] = "predicted",
    output: Output = "probability",
    compact: bool = True,
    infidelity_samples: int = 10,
    sensitivity_samples: int = 0,
    sensitivity_max_batch: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> Evaluation:
    """Attribute with several methods and score them on every metric of this module.

    Per batch, :func:`~captum_chefer.comparison.methods.compare_methods` computes the per-code scores and
    the wall time; then the removal metrics, localization (when ``ground_truth`` is given),
    infidelity and, with ``sensitivity_samples > 0``, sensitivity (on the first
    ``sensitivity_max_batch`` samples of each batch: it calls the method again per perturbation).

    Args:
        adapter: a :class:`captum_chefer.PyHealthAdapter`.
        data: a batch dict or an iterable of them (a ``DataLoader``); a progress bar runs over it.
        methods: as for ``compare_methods``: Captum attribution objects on ``adapter`` or
            ``(name, method[, attribute kwargs])`` tuples.
        ground_truth: ``batch -> {feature key: bool mask of truly relevant codes}``, e.g.
            ``cohort.ground_truth`` bound to the adapter (``lambda b: cohort.ground_truth(adapter, b)``).
        fractions: the deletion / insertion grid; percentages: comprehensiveness / sufficiency.
        target_mode: ``"predicted"`` or ``"label"``.
        output: ``"probability"`` or ``"logit"`` of the target.
        compact: see :class:`TokenRemover`.
        infidelity_samples: perturbations per sample for Captum infidelity (0 skips it).
        sensitivity_samples: perturbations per sample for Captum sensitivity (0 skips it).
        seed: seeds tie-breaking, the infidelity perturbations and torch's global generator for the
            duration (NoiseTunnel, sensitivity), whose state is restored afterwards: same seed, same numbers.
        progress: show progress bars.

    Returns:
        An :class:`Evaluation`.
    """
    # NoiseTunnel and sensitivity_max draw from torch's global generator: seed it, and give the caller's state back.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _evaluate_methods(
            adapter, data, methods, ground_truth, fractions, percentages, target_mode, output, compact,
            infidelity_samples, sensitivity_samples, sensitivity_max_batch, seed, progress,
        )


def _evaluate_methods(
    adapter: Any, data: Any, methods: Sequence[Any], ground_truth: Optional[GroundTruth], fractions: Sequence[float],
    percentages: Sequence[float], target_mode: Any, output: Output, compact: bool, infidelity_samples: int,
    sensitivity_samples: int, sensitivity_max_batch: int, seed: int, progress: bool,
) -> Evaluation:
    from tqdm import tqdm

    specs = method_specs(adapter, methods)
    fractions = tuple(float(f) for f in fractions)
    percentages = tuple(float(p) for p in percentages)
    batches = [data] if isinstance(data, Mapping) else data
    per_sample: dict[str, dict[str, list[Tensor]]] = {name: {} for name, _, _ in specs}
    curves: dict[str, dict[str, list[Tensor]]] = {name: {"deletion": [], "insertion": []} for name, _, _ in specs}
    seconds = {name: 0.0 for name, _, _ in specs}
    patient_ids: list[Optional[str]] = []
    n_total = 0
    total = len(batches) if hasattr(batches, "__len__") else None
    for batch in tqdm(batches, desc="evaluating", unit="batch", total=total, disable=not progress):
        comparison = compare_methods(adapter, batch, specs, target_mode=target_mode, progress=False)
        n = comparison.n_samples
        target = adapter.captum_target(batch, mode=target_mode)
        remover = TokenRemover(adapter, batch, target, output=output, compact=compact)
        truth = check_ground_truth(ground_truth(batch), remover.real) if ground_truth is not None else None
        bar = tqdm(comparison.scores.items(), desc="metrics", unit="method", leave=False, disable=not progress)
        for name, scores in bar:
            bar.set_postfix(method=name)
            seconds[name] += comparison.seconds_per_sample[name] * n
            metrics = per_sample[name]
            c = removal_curves(remover, scores, fractions, seed=seed)
            curves[name]["deletion"].append(c.deletion)
            curves[name]["insertion"].append(c.insertion)
            metrics.setdefault("deletion_aopc", []).append(c.deletion_aopc)
            metrics.setdefault("insertion_aopc", []).append(c.insertion_aopc)
            comp = comprehensiveness(remover, scores, percentages, seed=seed)
            suff = sufficiency(remover, scores, percentages, seed=seed)
            metrics.setdefault("comprehensiveness", []).append(comp.mean(1))
            metrics.setdefault("sufficiency", []).append(suff.mean(1))
            for j, p in enumerate(percentages):
                metrics.setdefault(f"comprehensiveness@{p:g}", []).append(comp[:, j])
                metrics.setdefault(f"sufficiency@{p:g}", []).append(suff[:, j])
            if truth is not None:
                metrics.setdefault("precision_at_k", []).append(precision_at_k(scores, truth, remover.real))
                metrics.setdefault("auroc", []).append(localization_auroc(scores, truth, remover.real))
            if infidelity_samples > 0:
                metrics.setdefault("infidelity", []).append(
                    token_infidelity(
                        adapter, batch, scores, target, n_perturb_samples=infidelity_samples, seed=seed, compact=compact
                    )
                )
            if sensitivity_samples > 0:
                method, kwargs = next((m, k) for s, m, k in specs if s == name)
                sub = _head(batch, sensitivity_max_batch, n)
                sens = attribution_sensitivity(
                    adapter, method, sub, None if target is None else target[:sensitivity_max_batch],
                    attribute_kwargs=kwargs, n_perturb_samples=sensitivity_samples,
                )
                metrics.setdefault("sensitivity", []).append(
                    torch.cat([sens, torch.full((n - sens.shape[0],), math.nan)])
                )
        patient_ids.extend(batch_patient_ids(batch, n))
        n_total += n
    if n_total == 0:
        raise ValueError("data holds no samples")
    return Evaluation(
        per_sample={name: {m: torch.cat(v) for m, v in metrics.items()} for name, metrics in per_sample.items()},
        curves={name: {kind: _cat_rows(v) for kind, v in c.items()} for name, c in curves.items()},
        fractions=fractions,
        percentages=percentages,
        seconds_per_sample={name: s / n_total for name, s in seconds.items()},
        patient_ids=patient_ids if any(p is not None for p in patient_ids) else [],
        seed=seed,
    )


def check_ground_truth(truth: Any, real: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``ground_truth``'s answer for one batch, checked against the batch's codes: one boolean mask per feature key.

    Args:
        truth: what ``ground_truth(batch)`` returned.
        real: ``{feature key: True on real codes}`` of the batch (``TokenRemover(adapter, batch).real``).

    Returns:
        ``{feature key: bool mask}`` on the CPU, in the order of ``real``.

    Example:
        >>> real = {"conditions": torch.tensor([[True, False]]), "procedures": torch.tensor([[True, True]])}
        >>> check_ground_truth({"diagnoses": torch.tensor([[True, False]])}, real)
        Traceback (most recent call last):
        ...
        KeyError: "ground_truth returned masks for ['diagnoses'], but the model's feature keys are ['conditions', 'procedures'] (missing ['conditions', 'procedures'], unknown ['diagnoses']); return one bool mask per feature key, all False where no code is relevant"
    """
    if not isinstance(truth, Mapping):
        raise TypeError(
            f"ground_truth must return a dict {{feature key: bool mask of the relevant codes}}, got {type(truth).__name__}"
        )
    keys = list(real)
    missing = [k for k in keys if k not in truth]
    unknown = [k for k in truth if k not in real]
    if missing or unknown:
        raise KeyError(
            f"ground_truth returned masks for {list(truth)}, but the model's feature keys are {keys} (missing {missing}, "
            f"unknown {unknown}); return one bool mask per feature key, all False where no code is relevant"
        )
    out = {}
    for key in keys:
        mask = torch.as_tensor(truth[key])
        if tuple(mask.shape) != tuple(real[key].shape):
            raise ValueError(
                f"ground_truth's mask for {key!r} has shape {tuple(mask.shape)}, but the batch's codes of {key!r} are "
                f"{tuple(real[key].shape)}; return masks shaped like the batch's code ids"
            )
        if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(
                f"ground_truth's mask for {key!r} holds values other than 0 and 1; return a bool mask (True on the "
                "codes that truly matter), not scores"
            )
        out[key] = mask.detach().bool().cpu()
    return LookupDict(out, kind="feature")


def _cat_rows(parts: list[Tensor]) -> Tensor:
    return torch.cat(parts) if parts else torch.empty(0)


def _head(batch: Mapping[str, Any], k: int, n: int) -> dict[str, Any]:
    """The first ``k`` samples of a batch dict (tensors, tuples of tensors and lists are sliced)."""
    if k >= n:
        return dict(batch)

    def cut(value: Any) -> Any:
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n:
            return value[:k]
        if isinstance(value, tuple):
            return tuple(cut(v) for v in value)
        if isinstance(value, list) and len(value) == n:
            return value[:k]
        return value

    return {key: cut(value) for key, value in batch.items()}
