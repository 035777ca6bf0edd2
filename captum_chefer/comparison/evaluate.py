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

from .methods import compare_methods, method_specs
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

__all__ = ["Evaluation", "GroundTruth", "evaluate_methods"]


@dataclass
class Evaluation:
    """Per-sample metrics of several methods (from :func:`evaluate_methods`).

    Attributes:
        per_sample: ``{method: {metric: [N] tensor}}`` (NaN where a metric does not apply, e.g.
            localization of a sample without true codes).
        curves: ``{method: {"deletion": [N, F], "insertion": [N, F]}}``.
        fractions: the curve grid; percentages: the comprehensiveness / sufficiency fractions.
        seconds_per_sample: wall time of each method's ``attribute`` calls per sample.
    """

    per_sample: dict[str, dict[str, Tensor]]
    curves: dict[str, dict[str, Tensor]]
    fractions: tuple[float, ...]
    percentages: tuple[float, ...]
    seconds_per_sample: dict[str, float] = field(default_factory=dict)

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

    @property
    def methods(self) -> list[str]:
        return list(self.per_sample)

    def summary(self) -> list[dict[str, Any]]:
        """One row per method: the mean of each metric over the samples where it applies."""
        rows = []
        for name, metrics in self.per_sample.items():
            row: dict[str, Any] = {"method": name}
            for metric, values in metrics.items():
                finite = values[~torch.isnan(values)]
                row[metric] = float(finite.mean()) if finite.numel() else math.nan
            row["seconds_per_sample"] = self.seconds_per_sample.get(name, math.nan)
            rows.append(row)
        return rows

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
        """The method with the best mean ``metric`` (direction from :attr:`HIGHER_IS_BETTER`)."""
        if metric not in self.HIGHER_IS_BETTER:
            raise KeyError(f"unknown metric {metric!r}; known: {sorted(self.HIGHER_IS_BETTER)}")
        rows = [r for r in self.summary() if r["method"] not in exclude and not math.isnan(r.get(metric, math.nan))]
        if not rows:
            raise ValueError(f"no method has a value for {metric!r}")
        sign = 1 if self.HIGHER_IS_BETTER[metric] else -1
        return max(rows, key=lambda r: sign * r[metric])["method"]

    def to_csv(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns())
            writer.writeheader()
            writer.writerows(self.summary())
        return path

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the summary, the mean curves, the settings and the per-sample values."""
        return {
            "summary": [{k: _json_number(v) for k, v in row.items()} for row in self.summary()],
            "fractions": list(self.fractions),
            "percentages": list(self.percentages),
            "mean_curves": {
                name: {kind: [_json_number(float(v)) for v in c.nanmean(0)] for kind, c in curves.items()}
                for name, curves in self.curves.items()
            },
            "per_sample": {
                name: {metric: [_json_number(float(v)) for v in values] for metric, values in metrics.items()}
                for name, metrics in self.per_sample.items()
            },
            "higher_is_better": self.HIGHER_IS_BETTER,
        }

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path


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
    n_total = 0
    total = len(batches) if hasattr(batches, "__len__") else None
    for batch in tqdm(batches, desc="evaluating", unit="batch", total=total, disable=not progress):
        comparison = compare_methods(adapter, batch, specs, target_mode=target_mode, progress=False)
        n = comparison.n_samples
        target = adapter.captum_target(batch, mode=target_mode)
        remover = TokenRemover(adapter, batch, target, output=output, compact=compact)
        truth = ground_truth(batch) if ground_truth is not None else None
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
        n_total += n
    if n_total == 0:
        raise ValueError("data holds no samples")
    return Evaluation(
        per_sample={name: {m: torch.cat(v) for m, v in metrics.items()} for name, metrics in per_sample.items()},
        curves={name: {kind: _cat_rows(v) for kind, v in c.items()} for name, c in curves.items()},
        fractions=fractions,
        percentages=percentages,
        seconds_per_sample={name: s / n_total for name, s in seconds.items()},
    )


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
