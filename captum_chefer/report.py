"""The side-by-side comparison as one call, written as a self-contained HTML report with figures, CSV and JSON.

:func:`run_comparison` takes a trained PyHealth model (or its adapter) and a batch or ``DataLoader``,
runs :func:`default_methods` (or yours), scores them with
:func:`captum_chefer.comparison.evaluate_methods` and, with ``out=...``, writes:

* ``report.html``: the results table, the figures (embedded), and for a few patients the codes each
  method highlights, in Captum's ``visualize_text`` colours (true codes, when known, in brackets);
* ``deletion_insertion.png``, ``metrics.png``, ``time.png``, ``patient_<i>.png``;
* ``results.csv`` (one row per method: means, 95% bootstrap intervals, numbers of patients),
  ``curves.csv`` and ``results.json`` (summary with intervals, statistics, curves, per-patient values,
  settings, the check of the model against chance; ``Evaluation.load`` reads it back).

``python -m captum_chefer compare`` is this function on the embedded synthetic cohort.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .adapters import adapter_for
from .comparison import (
    DEFAULT_FRACTIONS,
    DEFAULT_PERCENTAGES,
    ChanceLevelWarning,
    Evaluation,
    ModelCheck,
    RandomAttribution,
    check_model,
    compare_methods,
    evaluate_methods,
    warn_if_chance_level,
)
from .comparison.evaluate import check_ground_truth
from .visualization import method_colors, plot_methods

__all__ = [
    "CHEFER_PYHEALTH",
    "CHEFER_PYHEALTH_EXCLUDE_SELF",
    "CHEFER_RECOMMENDED",
    "ChanceLevelWarning",
    "ComparisonReport",
    "ModelCheck",
    "check_model",
    "cohort_page",
    "cohort_section",
    "curves_figure",
    "default_methods",
    "headline_table",
    "metrics_figure",
    "run_comparison",
    "time_figure",
    "write_report",
]

# Columns of the headline table, in order, with their labels.
HEADLINE = (
    ("deletion_aopc", "Deletion AOPC ↑"),
    ("insertion_aopc", "Insertion AOPC ↑"),
    ("comprehensiveness", "Compr. ↑"),
    ("sufficiency", "Suff. ↓"),
    ("precision_at_k", "P@k ↑"),
    ("auroc", "AUROC ↑"),
    ("infidelity", "Infidelity ↓"),
    ("sensitivity", "Sensitivity ↓"),
    ("seconds_per_sample", "ms / sample ↓"),
)

# One line per metric: what it measures, its direction and its scale (shown under the results table).
METRIC_NOTES = {
    "deletion_aopc": "mean drop of the target probability as the top-ranked codes are removed (fractions 0 to 1); "
                     "higher is better; probability units, -1 to 1; removing any codes moves the output, so read it "
                     "against the Random row",
    "insertion_aopc": "mean gain of the target probability over the empty record as only the top-ranked codes are "
                      "kept; higher is better; probability units, -1 to 1; read it against the Random row",
    "comprehensiveness": "drop of the target probability when the top {percentages} of the codes are removed, averaged; "
                         "higher is better; -1 to 1",
    "sufficiency": "drop of the target probability when only the top {percentages} of the codes are kept, averaged; "
                   "lower is better; -1 to 1, negative when the kept codes alone give a higher probability than the "
                   "whole record (the removed codes argued against the class)",
    "precision_at_k": "share of the planted codes among each patient's k top-scored codes (k = number of planted "
                      "codes); higher is better; 0 to 1; patients with planted codes only",
    "auroc": "chance that a planted code outscores a non-planted code of the same patient; higher is better; 0 to 1, "
             "0.5 is random; patients with planted and other codes only",
    "infidelity": "Captum infidelity: squared error between the change of the target logit when random codes (30%) "
                  "are removed and the summed scores of those codes, after the best rescaling of the scores; lower "
                  "is better; squared logits, so its size follows the model's logit scale: compare methods within one "
                  "report, not across models",
    "sensitivity": "Captum sensitivity_max: the largest relative change of the per-code scores when the code "
                   "embeddings move by noise of radius 0.02; lower is better; 0 is perfectly stable",
    "seconds_per_sample": "wall time of the method's attribute calls per patient; lower is better; one measurement "
                          "per run (no interval), it varies with the machine and its load",
}


#: The names of the Chefer settings in :func:`default_methods`, the report and the ``cohort`` command.
CHEFER_RECOMMENDED = "Chefer (recommended)"
CHEFER_PYHEALTH = "Chefer (PyHealth)"
CHEFER_PYHEALTH_EXCLUDE_SELF = "Chefer (PyHealth, exclude_self)"


def default_methods(adapter: Any, *, ig_steps: int = 50, nt_samples: int = 10, nt_stdev: float = 0.1, seed: int = 0) -> list[tuple]:
    """The compared methods, as ``(name, method, kwargs)``: Chefer in the recommended setting first, then
    PyHealth's setting with and without its self term, Integrated Gradients, Saliency, NoiseTunnel
    (SmoothGrad over Saliency) and a random baseline.

    * ``"Chefer (recommended)"``: ``CheferAttribution(adapter, preset="recommended")``, the setting to use;
    * ``"Chefer (PyHealth)"``: ``CheferAttribution(adapter)``, the published rule as PyHealth's
      ``CheferRelevance`` computes it (compatibility);
    * ``"Chefer (PyHealth, exclude_self)"``: the same without the pooled position's self term.

    Example:
        >>> from captum_chefer import PyHealthAdapter
        >>> from captum_chefer.synthetic import toy_model_and_batch
        >>> [name for name, _, _ in default_methods(PyHealthAdapter(toy_model_and_batch()[0]))]
        ['Chefer (recommended)', 'Chefer (PyHealth)', 'Chefer (PyHealth, exclude_self)', 'Integrated Gradients', 'Saliency', 'NoiseTunnel (SmoothGrad)', 'Random']
    """
    from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

    from .attribution import CheferAttribution

    if ig_steps < 1 or nt_samples < 1:
        raise ValueError(f"ig_steps and nt_samples must be >= 1, got {ig_steps}, {nt_samples}")
    return [
        (CHEFER_RECOMMENDED, CheferAttribution(adapter, preset="recommended"), {}),
        (CHEFER_PYHEALTH, CheferAttribution(adapter), {}),
        (CHEFER_PYHEALTH_EXCLUDE_SELF, CheferAttribution(adapter), {"exclude_self": True}),
        ("Integrated Gradients", IntegratedGradients(adapter), {"n_steps": ig_steps}),
        ("Saliency", Saliency(adapter), {}),
        ("NoiseTunnel (SmoothGrad)", NoiseTunnel(Saliency(adapter)), {"nt_type": "smoothgrad", "nt_samples": nt_samples, "stdevs": nt_stdev}),
        ("Random", RandomAttribution(adapter, seed=seed), {}),
    ]


@dataclass
class ComparisonReport:
    """What :func:`run_comparison` returns: the evaluation, the files written, the settings, the model check."""

    evaluation: Evaluation
    files: dict[str, Path] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    model_check: Optional[ModelCheck] = None

    @property
    def html_path(self) -> Optional[Path]:
        return self.files.get("report")

    def table(self, markdown: bool = False, intervals: bool = True, time: bool = True) -> str:
        """The headline table (see :func:`headline_table`)."""
        return headline_table(self.evaluation, markdown=markdown, intervals=intervals, time=time)


def run_comparison(
    model: Any,
    data: Mapping[str, Any] | Iterable[Mapping[str, Any]],
    *,
    methods: Optional[Sequence[Any]] = None,
    ground_truth: Optional[Callable[[Mapping[str, Any]], Mapping[str, Tensor]]] = None,
    out: Optional[str | Path] = None,
    title: str = "Chefer relevance side by side",
    show_patients: int = 4,
    ig_steps: int = 50,
    nt_samples: int = 10,
    infidelity_samples: int = 10,
    sensitivity_samples: int = 3,
    sensitivity_max_batch: int = 16,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    percentages: Sequence[float] = DEFAULT_PERCENTAGES,
    target_mode: str = "predicted",
    settings: Optional[Mapping[str, Any]] = None,
    describe_patient: Optional[Callable[[Mapping[str, Any], int], str]] = None,
    seed: int = 0,
    device: Optional[str | torch.device] = None,
    progress: bool = True,
    cohort: Optional[Any] = None,
) -> ComparisonReport:
    """Compare attribution methods on a model and data in one call; optionally write the report.

    Args:
        model: a trained PyHealth ``Transformer`` / ``StageAttentionNet`` or its ``PyHealthAdapter``.
        data: a batch dict or a ``DataLoader`` of the patients to explain.
        methods: ``(name, method, kwargs)`` tuples on the adapter; default :func:`default_methods`.
        ground_truth: ``batch -> {feature key: bool mask}`` of truly relevant codes, for localization.
        out: a folder for ``report.html``, figures, CSV and JSON; ``None`` writes nothing.
        show_patients: how many patients of the first batch the report shows code by code.
        ig_steps, nt_samples: Integrated Gradients steps and NoiseTunnel samples of the default methods.
        infidelity_samples, sensitivity_samples, sensitivity_max_batch: see ``evaluate_methods``.
        settings: extra key/values shown in the report and saved in the JSON.
        describe_patient: ``(batch, index) -> text`` shown above a patient's codes (e.g. the rule).
        seed: seeds the random baseline, tie-breaking, the perturbations and the bootstrap intervals.
        device: run on this device (``"cuda"``, ``"cuda:1"``, ``"cpu"``); the model is moved there for the
            run and back afterwards. ``None``: where the model is. Batches follow the model.
        cohort: a :class:`captum_chefer.cohort.CohortSummary` shown as the report's cohort section.

    Returns:
        A :class:`ComparisonReport`. Its ``model_check`` compares the model's accuracy on ``data`` with
        always predicting the most frequent class.

    Warns:
        ChanceLevelWarning: the model is not better than always predicting the most frequent class on
            ``data`` (one-sided binomial test at 5%); the report's page says it too.

    Example (two methods on the toy model, to stay fast; leave ``methods`` out for all of
    :func:`default_methods`):
        >>> import tempfile
        >>> from captum.attr import Saliency
        >>> from captum_chefer import CheferAttribution, PyHealthAdapter
        >>> from captum_chefer.synthetic import toy_model_and_batch
        >>> model, batch = toy_model_and_batch()
        >>> adapter = PyHealthAdapter(model)
        >>> methods = [("Chefer (recommended)", CheferAttribution(adapter, preset="recommended"), {}),
        ...            ("Saliency", Saliency(adapter), {})]
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always", ChanceLevelWarning)
        ...     result = run_comparison(adapter, batch, out=tempfile.mkdtemp(), show_patients=1, methods=methods,
        ...                             sensitivity_samples=0, infidelity_samples=2, progress=False)
        >>> result.html_path.name, result.evaluation.methods
        ('report.html', ['Chefer (recommended)', 'Saliency'])
        >>> [str(w.message)[:56] for w in caught if w.category is ChanceLevelWarning]  # the toy model is untrained
        ['The model is not better than chance on the explained pat']
    """
    adapter = adapter_for(model)
    target_device = _device(device)
    with _on_device(adapter, target_device):
        specs = list(methods) if methods is not None else default_methods(adapter, ig_steps=ig_steps, nt_samples=nt_samples, seed=seed)
        start = time.perf_counter()
        evaluation = evaluate_methods(
            adapter, data, specs, ground_truth=ground_truth, fractions=fractions, percentages=percentages,
            target_mode=target_mode, infidelity_samples=infidelity_samples, sensitivity_samples=sensitivity_samples,
            sensitivity_max_batch=sensitivity_max_batch, seed=seed, progress=progress,
        )
        model_check = check_model(adapter, data)
        info = dict(settings or {})
        info.setdefault("model", type(adapter.model).__name__)
        info.setdefault("feature keys", ", ".join(adapter.feature_keys))
        if model_check is not None:
            info.setdefault("model on the explained patients", model_check.describe())
        info.setdefault("device", str(next(adapter.parameters(), torch.empty(0)).device))
        info["evaluation seconds"] = round(time.perf_counter() - start, 1)
        report = ComparisonReport(evaluation, settings=info, model_check=model_check)
        warn_if_chance_level(model_check, stacklevel=2)
        if out is not None:
            first = data if isinstance(data, Mapping) else next(iter(data))
            report.files = write_report(
                out, adapter, evaluation, first, specs, title=title, settings=info, ground_truth=ground_truth,
                show_patients=show_patients, target_mode=target_mode, describe_patient=describe_patient,
                model_check=model_check, cohort=cohort,
            )
    return report


def _device(device: Optional[str | torch.device]) -> Optional[torch.device]:
    """``device`` as a ``torch.device``, checked before any work is done."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device {device!r} is not a torch device; pass e.g. 'cpu', 'cuda' or 'cuda:1' ({error})") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: torch sees no CUDA device here; pass device='cpu' or leave it out")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: torch sees {torch.cuda.device_count()} CUDA device(s), 0 to "
                             f"{torch.cuda.device_count() - 1}")
    return parsed


@contextmanager
def _on_device(adapter: Any, device: Optional[torch.device]) -> Iterator[None]:
    """Move the model to ``device`` for the duration and back to where it was."""
    first = next(adapter.parameters(), None)
    if device is None or first is None or first.device == device:
        yield
        return
    original = first.device
    adapter.to(device)
    try:
        yield
    finally:
        adapter.to(original)


# ---------------------------------------------------------------------------------------------- writing


def headline_table(
    evaluation: Evaluation, markdown: bool = False, digits: int = 3, intervals: bool = True, time: bool = True
) -> str:
    """The headline metrics, one row per method (``ms / sample`` in milliseconds), with a note below.

    Each cell is the mean over the patients, with its 95% interval when ``intervals``
    (``Evaluation.interval``: Wilson's where every patient's value is 0 or 1, else the bootstrap's; a
    bootstrap interval of values that are all equal has no width and is marked ``†``). The best
    mean of a column (the random baseline excluded) is bold (Markdown) or starred (text) only where the
    paired bootstrap interval of its difference to the runner-up lies above zero. A column's header gives
    its number of patients when it differs from the total. ``time=False`` leaves the wall-time column out
    (the only column that is not seeded).
    """
    rows = evaluation.summary()
    present = [
        (k, label) for k, label in HEADLINE
        if any(k in r and not _isnan(r[k]) for r in rows) and (time or k != "seconds_per_sample")
    ]
    leaders = _leaders(evaluation, [k for k, _ in present])
    total = evaluation.n_samples
    header = ["Method"] + [_header(evaluation, k, label, total) for k, label in present]
    cells = []
    for r in rows:
        line = [r["method"]]
        for k, _ in present:
            line.append(_cell(evaluation, r, k, digits, intervals, leaders.get(k) == r["method"], markdown))
        cells.append(line)
    note = _table_note(evaluation, intervals, "bold" if markdown else "*", time, [k for k, _ in present])
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(present)) + "|"]
        return "\n".join(out + ["| " + " | ".join(c) + " |" for c in cells] + ["", note])
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    return "\n".join(out + ["  ".join(v.ljust(w) for v, w in zip(c, widths)) for c in cells] + [note])


def _leaders(evaluation: Evaluation, metrics: Sequence[str]) -> dict[str, str]:
    """``{metric: method}`` for the columns whose best method clears its runner-up over the patients."""
    out = {}
    for metric in metrics:
        try:
            leader = evaluation.leader(metric)
        except (ValueError, KeyError):
            continue
        if leader.clear:
            out[metric] = leader.method
    return out


def _header(evaluation: Evaluation, metric: str, label: str, total: int) -> str:
    if metric == "seconds_per_sample":
        return label
    counts = {evaluation.interval(m, metric).n for m in evaluation.methods if metric in evaluation.per_sample[m]}
    return label if counts <= {total} else f"{label} (n={max(counts)})"


def _cell(evaluation: Evaluation, row: Mapping[str, Any], metric: str, digits: int, intervals: bool, best: bool, markdown: bool) -> str:
    value = row.get(metric, math.nan)
    if metric == "seconds_per_sample":
        return _num(value * 1000, digits)
    text = _num(value, digits)
    if best:
        text = f"**{text}**" if markdown else f"{text}*"
    if intervals:
        text += _interval_text(evaluation, row["method"], metric, digits, " ")
    return text


def _interval_text(evaluation: Evaluation, method: str, metric: str, digits: int = 3, space: str = " ") -> str:
    """``space + "[low, high]"`` (``†`` after a zero-width bootstrap interval), or ``""`` without an interval."""
    if metric == "seconds_per_sample" or metric not in evaluation.per_sample.get(method, {}):
        return ""
    interval = evaluation.interval(method, metric)
    if not interval.n:
        return ""
    return f"{space}[{_num(interval.low, digits)}, {_num(interval.high, digits)}]" + ("†" if interval.degenerate else "")


def _any_degenerate(evaluation: Evaluation, metrics: Sequence[str]) -> bool:
    return any(
        evaluation.interval(m, k).degenerate for m in evaluation.methods for k in metrics
        if k != "seconds_per_sample" and k in evaluation.per_sample[m]
    )


def _table_note(
    evaluation: Evaluation, intervals: bool, mark: str, time: bool = True, metrics: Sequence[str] = ()
) -> str:
    note = f"Means over n = {evaluation.n_samples} patients"
    if intervals:
        note += (f"; [low, high]: {evaluation.level:.0%} interval over patients, Wilson's score interval where every "
                 f"patient's value is 0 or 1 (a share of patients), else the percentile bootstrap "
                 f"({evaluation.n_resamples} resamples, seed {evaluation.seed})")
        if _any_degenerate(evaluation, metrics):
            note += ("; †: every patient has the same value, so the bootstrap has no spread to resample and the "
                     "interval's zero width is no certainty")
    return note + (f". {mark.capitalize() if mark != '*' else 'A star'}: the best mean of a column (Random excluded), "
                   "marked only where the bootstrap interval of its paired difference to the runner-up, on the same "
                   "patients, lies above zero." + (" Time is one measurement." if time else ""))


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _num(v: Any, digits: int = 3) -> str:
    if not isinstance(v, (int, float)) or _isnan(v):
        return "n/a"
    if v != 0 and abs(v) < 10 ** (-digits):
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}f}"


def _png(fig: Any, path: Path) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    path.write_bytes(buffer.getvalue())
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def curves_figure(evaluation: Evaluation) -> Any:
    """The mean deletion and insertion curves of every method, as a matplotlib ``Figure``.

    Each method has its colour of :func:`captum_chefer.visualization.method_colors` (Random: grey, dashed).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8), layout="constrained")
    axes = fig.subplots(1, 2)
    x = list(evaluation.fractions)
    colors = method_colors(evaluation.curves)
    for name, curves in evaluation.curves.items():
        style = {"linestyle": "--"} if name == "Random" else {}
        for ax, kind in zip(axes, ("deletion", "insertion")):
            ax.plot(x, curves[kind].nanmean(0).tolist(), marker="o", markersize=3, label=name, color=colors[name], **style)
    axes[0].set(title="Deletion: top codes removed\n(a lower curve is better: higher Deletion AOPC ↑)",
                xlabel="fraction of codes removed", ylabel="target probability")
    axes[1].set(title="Insertion: only the top codes kept\n(a higher curve is better: higher Insertion AOPC ↑)",
                xlabel="fraction of codes kept", ylabel="target probability")
    axes[1].legend(fontsize=8, loc="lower right")
    return fig


def metrics_figure(evaluation: Evaluation, metrics: Optional[Sequence[str]] = None, title: Optional[str] = None) -> Any:
    """The per-patient metrics of the headline table as grouped bars, one colour per method
    (:func:`captum_chefer.visualization.method_colors`), each bar with its 95% interval
    (``Evaluation.interval``, the interval the table prints) as an error bar.

    Args:
        evaluation: from :func:`captum_chefer.comparison.evaluate_methods`.
        metrics: the metric keys to show (e.g. ``["precision_at_k", "auroc"]``); default: the first six
            of the headline table that the evaluation has.
        title: the figure's title; default: what the bars and error bars are.
    """
    from matplotlib.figure import Figure

    rows = evaluation.summary()
    labels = dict(HEADLINE)
    if metrics is not None:
        unknown = [k for k in metrics if k not in labels]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; use some of {[k for k, _ in HEADLINE[:8]]}")
    chosen = [k for k, _ in HEADLINE[:6]] if metrics is None else list(metrics)
    metrics = [(k, labels[k]) for k in chosen if any(not _isnan(r.get(k, math.nan)) for r in rows)]
    colors = method_colors(r["method"] for r in rows)
    fig = Figure(figsize=(10, 4.0), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(len(rows), 1)
    for i, r in enumerate(rows):
        values = [r.get(k, math.nan) for k, _ in metrics]
        low, high = [], []
        for (k, _), v in zip(metrics, values):
            interval = evaluation.interval(r["method"], k) if k in evaluation.per_sample.get(r["method"], {}) else None
            ok = interval is not None and interval.n > 0 and not _isnan(v)
            low.append(max(v - interval.low, 0.0) if ok else 0.0)
            high.append(max(interval.high - v, 0.0) if ok else 0.0)
        ax.bar([j + i * width for j in range(len(metrics))], values, width, label=r["method"], color=colors[r["method"]],
               yerr=[low, high], error_kw={"elinewidth": 0.9, "capsize": 2, "ecolor": "#333333"})
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(metrics))], [label for _, label in metrics])
    ax.set_title(title or f"Faithfulness and localization: means over the explained patients, error bars: {evaluation.level:.0%} intervals")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.legend(fontsize=8, ncols=min(len(rows), 4), loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    return fig


def time_figure(evaluation: Evaluation) -> Any:
    """Wall time per explained patient, one bar per method in its colour. Each method's time is one
    measurement (its ``attribute`` calls over the run), so the bars have no interval."""
    from matplotlib.figure import Figure

    names = list(evaluation.seconds_per_sample)
    values = [evaluation.seconds_per_sample[n] * 1000 for n in names]
    colors = method_colors(names)
    fig = Figure(figsize=(10, 2.8), layout="constrained")
    ax = fig.subplots()
    ax.barh(names, values, color=[colors[n] for n in names])
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set(title="Wall time per explained patient (one measurement per method: no interval)",
           xlabel="milliseconds (log scale)")
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.2f} ms", va="center", fontsize=8)
    return fig


def _select(batch: Mapping[str, Any], indices: Sequence[int], n: int) -> dict[str, Any]:
    """Samples ``indices`` of a batch dict, keeping its padded shapes."""
    index = torch.tensor(list(indices), dtype=torch.long)

    def cut(value: Any) -> Any:
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n:
            return value[index]
        if isinstance(value, tuple):
            return tuple(cut(v) for v in value)
        if isinstance(value, list) and len(value) == n:
            return [value[i] for i in indices]
        return value

    return {key: cut(value) for key, value in batch.items()}


def _patient_rows(
    adapter: Any, batch: Mapping[str, Any], scores: Mapping[str, Mapping[str, Tensor]], truth: Optional[Mapping[str, Tensor]], index: int
) -> tuple[str, str]:
    """One patient, one row per method: Captum's word-importance cells (true codes outlined, in brackets)."""

    n = int(next(iter(adapter.captum_inputs(batch, level="token")[0])).shape[0])
    one = _select(batch, [index], n)
    marks: Optional[list[bool]] = None
    if truth is not None:
        marks = []
        tokens = adapter.decode(one)[0]
        for key in adapter.feature_keys:
            if len(adapter.feature_keys) > 1:
                marks.append(False)  # the stream marker
            marks.extend(bool(truth[key][index][t.index]) for t in tokens if t.feature == key)
    rows = []
    record = None
    for name, per_key in scores.items():
        sub = {k: v[index : index + 1] for k, v in per_key.items()}
        record = adapter.visualization_records(one, sub)[0]
        words = [str(w) for w in record.raw_input_ids]
        row_marks = marks if marks is not None and len(marks) == len(words) else [False] * len(words)
        importances = torch.as_tensor(record.word_attributions, dtype=torch.float).reshape(-1).tolist()
        rows.append(
            f"<tr><td class='method'>{html.escape(name)}</td><td>{record.attr_score:.3f}</td>"
            + _word_cells(words, importances, row_marks)
            + "</tr>"
        )
    head = ""
    if record is not None:
        head = (
            f"true label <b>{html.escape(str(record.true_class))}</b>, predicted <b>{html.escape(str(record.pred_class))}</b> "
            f"({record.pred_prob:.2f}), explained class <b>{html.escape(str(record.attr_class))}</b>"
        )
    return head, "<table class='codes'><tr><th>Method</th><th>Sum of scores</th><th>Codes (colour: score / max |score| of the row)</th></tr>" + "".join(rows) + "</table>"


def _word_cells(words: Sequence[str], importances: Sequence[float], marks: Sequence[bool]) -> str:
    """One table cell of codes in Captum's ``visualize_text`` colours; marked codes outlined, bold, in brackets."""
    from captum.attr import visualization as captum_viz

    out = []
    for word, importance, marked in zip(words, importances, marks):
        text = html.escape(captum_viz.format_special_tokens(word))
        style = f"background-color: {captum_viz._get_color(importance)}; opacity:1.0; line-height:1.75"
        if marked:
            out.append(f"<mark class='planted' style='{style}'><font color='black'> [{text}] </font></mark>")
        else:
            out.append(f"<mark style='{style}'><font color='black'> {text} </font></mark>")
    return "<td>" + "".join(out) + "</td>"


def _pick_patients(batch: Mapping[str, Any], truth: Optional[Mapping[str, Tensor]], n_batch: int, k: int) -> list[int]:
    """Prefer patients with true codes, then the rest, in batch order."""
    if k <= 0:
        return []
    if truth is None:
        return list(range(min(k, n_batch)))
    has = torch.zeros(n_batch, dtype=torch.bool)
    for t in truth.values():
        has |= t.reshape(n_batch, -1).any(1).cpu()
    with_truth = [i for i in range(n_batch) if has[i]]
    without = [i for i in range(n_batch) if not has[i]]
    chosen = with_truth[: max(k - 1, 1)] if without else with_truth[:k]
    return (chosen + without)[:k] if len(chosen) < k else chosen[:k]


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1150px;color:#222;background:#fff}
h1{font-size:1.6em} h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:1.6em}
table.results{border-collapse:collapse;font-size:0.92em} table.results td,table.results th{border:1px solid #ccc;padding:4px 8px;text-align:right}
table.results td:first-child,table.results th:first-child{text-align:left} td.best{font-weight:bold;background:#e8f4e8}
table.codes{border-collapse:collapse;margin-bottom:8px} table.codes td,table.codes th{border-bottom:1px solid #eee;padding:3px 6px;text-align:left;vertical-align:top}
td.method{white-space:nowrap;font-weight:600} img{max-width:100%;border:1px solid #eee}
.small{color:#555;font-size:0.88em} dl.settings{display:grid;grid-template-columns:max-content auto;gap:2px 14px} dl.settings dt{font-weight:600}
span.ci{color:#666;font-size:0.85em;white-space:nowrap} dl.metrics{font-size:0.9em} dl.metrics dt{font-weight:600;margin-top:4px}
dl.metrics dd{margin-left:18px} div.warning{border:2px solid #c33;background:#fdecea;padding:10px 14px;margin:12px 0}
mark.planted{outline:2px solid #000;outline-offset:-1px;font-weight:bold}
"""


def write_report(
    out: str | Path,
    adapter: Any,
    evaluation: Evaluation,
    batch: Mapping[str, Any],
    methods: Sequence[Any],
    *,
    title: str = "Chefer relevance side by side",
    settings: Optional[Mapping[str, Any]] = None,
    ground_truth: Optional[Callable[[Mapping[str, Any]], Mapping[str, Tensor]]] = None,
    show_patients: int = 4,
    target_mode: str = "predicted",
    describe_patient: Optional[Callable[[Mapping[str, Any], int], str]] = None,
    model_check: Optional[ModelCheck] = None,
    cohort: Optional[Any] = None,
) -> dict[str, Path]:
    """Write ``report.html``, the PNG figures, ``results.csv``, ``curves.csv`` and ``results.json`` to ``out``.

    With ``cohort`` (a :class:`captum_chefer.cohort.CohortSummary`), the page has a cohort section
    (:func:`cohort_section`).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    images: dict[str, str] = {}
    for name, make in (("deletion_insertion", curves_figure), ("metrics", metrics_figure), ("time", time_figure)):
        files[name] = out / f"{name}.png"
        images[name] = _png(make(evaluation), files[name])

    # Patients shown code by code: scores of the first batch (recomputed: cheap next to the evaluation).
    tokens, token_args = adapter.captum_inputs(batch, level="token")
    n_batch = int(tokens[0].shape[0])
    real = dict(zip(adapter.feature_keys, adapter.token_masks(token_args, tokens)))
    truth = check_ground_truth(ground_truth(batch), real) if ground_truth is not None else None
    shown = _pick_patients(batch, truth, n_batch, show_patients)
    patients_html = []
    if shown:
        sub = _select(batch, shown, n_batch)
        sub_truth = None if truth is None else {k: v[torch.tensor(shown)] for k, v in truth.items()}
        comparison = compare_methods(adapter, sub, methods, target_mode=target_mode, progress=False)  # type: ignore[arg-type]
        for j, i in enumerate(shown):
            head, table = _patient_rows(adapter, sub, comparison.scores, sub_truth, j)
            files[f"patient_{i}"] = out / f"patient_{i}.png"
            pid = batch.get("patient_id", [None] * n_batch)[i] if isinstance(batch.get("patient_id"), list) else None
            fig = plot_methods(adapter, sub, comparison.scores, sample=j, title=f"Patient {pid or i}: scores per method",
                               planted=sub_truth)
            image = _png(fig, files[f"patient_{i}"])
            extra = html.escape(describe_patient(batch, i)) if describe_patient is not None else ""
            patients_html.append(
                f"<h3>Patient {html.escape(str(pid or i))}</h3><p class='small'>{head}{'; ' + extra if extra else ''}</p>{table}"
                f"<img alt='scores of patient {i}' src='data:image/png;base64,{image}'>"
            )

    files["csv"] = evaluation.to_csv(out / "results.csv")
    files["curves_csv"] = out / "curves.csv"
    with files["curves_csv"].open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "curve", "fraction", "mean_output"])
        for name, curves in evaluation.curves.items():
            for kind, values in curves.items():
                for x, y in zip(evaluation.fractions, values.nanmean(0).tolist()):
                    writer.writerow([name, kind, x, y])
    info = {k: v for k, v in (settings or {}).items()}
    payload = evaluation.to_dict()
    payload["settings"] = {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in info.items()}
    if model_check is not None:
        payload["model_check"] = model_check.as_dict()
    files["json"] = out / "results.json"
    files["json"].write_text(json.dumps(payload, indent=2))

    # Results table: means with intervals; bold only where the paired difference to the runner-up clears zero.
    rows = evaluation.summary()
    present = [(k, label) for k, label in HEADLINE if any(not _isnan(r.get(k, math.nan)) for r in rows)]
    leaders = _leaders(evaluation, [k for k, _ in present])
    total = evaluation.n_samples
    header = "<tr><th>Method</th>" + "".join(
        f"<th>{html.escape(_header(evaluation, k, label, total))}</th>" for k, label in present
    ) + "</tr>"
    body = []
    for r in rows:
        cells = [f"<td>{html.escape(r['method'])}</td>"]
        for k, _ in present:
            v = r.get(k, math.nan)
            text = _num(v * 1000 if k == "seconds_per_sample" else v)
            interval = _interval_text(evaluation, r["method"], k, space="")
            if interval:
                text += f"<br><span class='ci'>{html.escape(interval)}</span>"
            cells.append(f"<td class='{'best' if leaders.get(k) == r['method'] else ''}'>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    percentages = " / ".join(f"{p:.0%}" for p in evaluation.percentages)
    notes = "".join(
        f"<dt>{html.escape(label)}</dt><dd>{html.escape(METRIC_NOTES[k].format(percentages=percentages))}</dd>"
        for k, label in present if k in METRIC_NOTES
    )
    banner = ""
    if model_check is not None and not model_check.above_chance:
        banner = f"<div class='warning'><b>Warning.</b> {html.escape(model_check.warning())}</div>"
    planted_legend = ""
    if truth is not None:
        planted_legend = (
            "<br><mark class='planted' style='background-color: hsl(0, 75%, 100%)'><font color='black'> [code] </font>"
            "</mark> a planted code (the cohort's ground truth): outlined, bold and in brackets in the tables; outlined, "
            "bold and starred (<b>*code</b>) in the figures."
        )
    settings_html = "".join(f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(str(v))}</dd>" for k, v in info.items())
    legend = "".join(
        f"<span style='display:inline-block;width:12px;height:12px;border:1px solid #999;background:{c}'></span> {t} &nbsp; "
        for c, t in (("hsl(0, 75%, 60%)", "negative"), ("hsl(0, 75%, 100%)", "neutral"), ("hsl(120, 75%, 50%)", "positive"))
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="small">Generated by <code>captum_chefer</code> on {html.escape(time.strftime('%Y-%m-%d %H:%M:%S'))}
(Python {platform.python_version()}, torch {torch.__version__}). Every number below was computed in this run.</p>
{banner}
<h2>Settings</h2><dl class="settings">{settings_html}</dl>
<h2>Results</h2>
<table class="results">{header}{''.join(body)}</table>
<p class="small">{html.escape(_table_note(evaluation, True, "bold", True, [k for k, _ in present]))}</p>
<h3>How to read the table</h3>
<dl class="metrics">{notes}</dl>
<ul class="small">
<li>Removal metrics remove codes through the model: a removed code becomes padding and the remaining codes move to the
front (PyHealth's Transformer pools its first position). The curves run over the fractions
{', '.join(f'{f:g}' for f in evaluation.fractions)}.</li>
<li>The <b>target probability</b> is the probability of the explained class. A binary model has one logit, and it is
explained for every patient: its target probability is P(label = 1) whatever the patient's class, so for a negative
patient the top codes are those that push towards 1. A multiclass model explains each patient's predicted class.</li>
<li><b>Sufficiency</b> can be negative: keeping only the top codes can give a higher target probability than the whole
record, when the removed codes argued against the class.</li>
<li><b>Infidelity</b> is in squared logits, so its size depends on the model (how large its logits are), not only on
the method: compare methods within one report, never numbers across reports or models.</li>
<li><b>Chefer (recommended)</b> is <code>CheferAttribution(adapter, preset="recommended")</code>, the setting to use:
no self term, each visit's relevance split over its codes by their gradient x embedding share, LayerNorm's scale held
constant in the backward pass, and the target's log-odds explained (benchmarks/QUALITY.md in the package's repository
measures it across cohorts). <b>Chefer (PyHealth)</b> is <code>CheferAttribution(adapter)</code>, the published rule as
PyHealth's <code>CheferRelevance</code> computes it (compatibility): it starts its propagation from the identity, so the
position the model pools (PyHealth's Transformer: the first code) gets a relevance of at least 1 in every patient,
whatever the code, and every code of a visit gets the visit's score; <b>Chefer (PyHealth, exclude_self)</b> drops that
self term.</li>
</ul>
<h2>Deletion and insertion curves</h2>
<img alt="deletion and insertion curves" src="data:image/png;base64,{images['deletion_insertion']}">
<h2>Metrics</h2>
<img alt="metrics by method" src="data:image/png;base64,{images['metrics']}">
<h2>Time</h2>
<img alt="time per patient" src="data:image/png;base64,{images['time']}">
{cohort_section(cohort) if cohort is not None else ''}
<h2>Highlighted codes</h2>
<p class="small">Per patient and method, each code coloured by its score divided by the row's largest |score|
(Captum's <code>visualize_text</code> colours). <code>v2:P007</code> is code P007 of visit 2. Legend: {legend}
{planted_legend}</p>
<ul class="small">
<li>The <b>sum of scores</b> is in each method's own units (Chefer: relevance, at least 1 on the pooled code in PyHealth's setting;
Integrated Gradients: logits, summing to the change from the baseline; Saliency: gradient sizes), so it cannot be compared
across methods. Compare the colours within a row.</li>
<li>In <b>Chefer (PyHealth)</b> every code of a visit has the same colour: PyHealth's Transformer sums the code embeddings
of a visit into one position, its attention runs over visits, and Chefer's relevance is a visit's relevance. The
recommended setting splits it over the visit's codes by their gradient x embedding share; gradient methods score each
code of a visit separately.</li>
</ul>
{''.join(patients_html) or '<p>No patients shown.</p>'}
</body></html>
"""
    files["report"] = out / "report.html"
    files["report"].write_text(page, encoding="utf-8")
    return files


# ---------------------------------------------------------------------------------------------- cohort


def cohort_section(summary: Any, *, top: Optional[int] = None) -> str:
    """A :class:`captum_chefer.cohort.CohortSummary` as an HTML section: the model against chance (a
    warning box when it is no better), each method's top codes side by side (mean score, samples), the
    agreement between methods, and the figure (embedded, in the methods' colours)."""
    k = top or summary.top_k
    check = getattr(summary, "model_check", None)
    model = ""
    if check is not None and not check.above_chance:
        model = f"<div class='warning'><b>Warning.</b> {html.escape(check.warning())}</div>"
    elif check is not None:
        model = f"<p class='small'>Model on these samples: {html.escape(check.describe())}.</p>"
    tops = {m: summary.top(m, k) for m in summary.methods}
    several = summary.codes["feature"].n_unique() > 1
    header = "<tr><th>Rank</th>" + "".join(f"<th>{html.escape(m)}</th>" for m in summary.methods) + "</tr>"
    body = []
    for i in range(k):
        cells = [f"<td>{i + 1}</td>"]
        for m in summary.methods:
            if i < tops[m].height:
                row = tops[m].row(i, named=True)
                name = f"{row['feature']}:{row['code']}" if several else row["code"]
                cells.append(f"<td>{html.escape(name)} <span class='small'>{_num(row['mean_score'])} (n={row['samples']})</span></td>")
            else:
                cells.append("<td></td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    agreement = "".join(
        f"<tr><td>{html.escape(r['method_a'])}</td><td>{html.escape(r['method_b'])}</td><td>{_num(r['spearman'])}</td>"
        f"<td>{_num(r['top_k_overlap'], 2)}</td><td>{r['codes']}</td></tr>"
        for r in summary.agreement.iter_rows(named=True)
    )
    buffer = io.BytesIO()
    summary.figure(k, colors=method_colors(summary.methods)).savefig(buffer, format="png", dpi=110)
    image = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"""<h2>Cohort: the codes each method ranks highest</h2>
{model}
<p class="small">{summary.n_samples} samples ({summary.n_patients} patients), {summary.n_rows} rows (one per code, sample and
method). A code's score in a sample is summed over its occurrences there; its mean score is averaged over the samples that
have it (n). Agreement: Spearman rank correlation of the per-code mean scores, and the share of top-{summary.top_k} codes two
methods have in common.</p>
<table class="results">{header}{''.join(body)}</table>
{'<h3>Agreement between methods</h3><table class="results"><tr><th>Method A</th><th>Method B</th><th>Spearman</th><th>Top-' + str(summary.top_k) + ' overlap</th><th>Codes</th></tr>' + agreement + '</table>' if agreement else ''}
<img alt="top codes per method" src="data:image/png;base64,{image}">
"""


def cohort_page(summary: Any, *, title: str = "Cohort attribution summary") -> str:
    """:func:`cohort_section` as a self-contained HTML page."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{CSS}</style></head>
<body><h1>{html.escape(title)}</h1>
{cohort_section(summary)}
</body></html>
"""
