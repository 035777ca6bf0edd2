"""Captum visualization from scores and decoded tokens: an HTML file, a methods-by-codes figure.

Records come from the adapters (``adapter.visualization_records(batch, attributions, method=...)``: one
Captum ``VisualizationDataRecord`` per sample, tokens decoded by the adapter); this module knows no model
library: it reads records, scores and ``adapter.decode(batch)``.

* :func:`write_html`: the table Captum's ``visualize_text`` shows, as a self-contained HTML file, without
  IPython.
* :func:`render_methods_html` / :func:`write_methods_html`: several methods' records on one page, one
  table per patient with a row per method (:func:`records_by_method` makes the records of a comparison).
* :func:`plot_methods`: a matplotlib figure, methods by codes, one heat map per feature stream, for
  one patient (planted or known codes outlined).
* :func:`method_colors` / :data:`METHOD_COLORS`: one colour per method, the same in every figure of the
  report and in the notebooks.
* :func:`captum_matplotlib_compat` / :func:`visualize_timeseries_attr`: the one place that works
  around Captum 0.9 calling ``matplotlib.cm.get_cmap``, which matplotlib 3.9 removed.
"""

from __future__ import annotations

import contextlib
import html
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Optional, Sequence

import torch
from captum.attr import visualization as captum_viz
from torch import Tensor

VisualizationDataRecord = captum_viz.VisualizationDataRecord

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "METHOD_COLORS",
    "captum_matplotlib_compat",
    "method_color",
    "method_colors",
    "plot_methods",
    "records_by_method",
    "render_html",
    "render_methods_html",
    "visualize_timeseries_attr",
    "write_html",
    "write_methods_html",
]


# ---------------------------------------------------------------------------------------------- colours

#: The colour of each method the package names (``report.default_methods``, ``compare_methods``'s default
#: names of Captum's methods), as matplotlib colour strings. The random baseline is grey everywhere.
METHOD_COLORS: dict[str, str] = {
    "Chefer (recommended)": "#d62728",  # red
    "Chefer (PyHealth)": "#ff7f0e",  # orange
    "Chefer (PyHealth, exclude_self)": "#8c564b",  # brown
    "Integrated Gradients": "#1f77b4",  # blue
    "Saliency": "#2ca02c",  # green
    "NoiseTunnel (SmoothGrad)": "#17becf",  # cyan
    "Input X Gradient": "#9467bd",  # purple
    "Layer Integrated Gradients": "#bcbd22",  # olive
    "Random": "#7f7f7f",  # grey
}

# Other spellings of the same methods (compared lower-case): CheferAttribution's own name is the published
# rule, which PyHealth's setting reproduces.
_ALIASES = {
    "chefer": "Chefer (PyHealth)",
    "chefer (exclude_self)": "Chefer (PyHealth, exclude_self)",
    "chefer (pyhealth)": "Chefer (PyHealth)",
    "chefer recommended": "Chefer (recommended)",
    "ig": "Integrated Gradients",
    "lig": "Layer Integrated Gradients",
    "smoothgrad": "NoiseTunnel (SmoothGrad)",
    "noisetunnel": "NoiseTunnel (SmoothGrad)",
    "input x gradient": "Input X Gradient",
    "random": "Random",
}
_KNOWN = {name.lower(): name for name in METHOD_COLORS}

# Colours for methods the package does not name: none of them is one of METHOD_COLORS.
_OTHER_COLORS = (
    "#393b79", "#e377c2", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1",
    "#636363", "#9c9ede", "#cedb9c", "#e7cb94", "#e7969c", "#de9ed6",
)


def _known(name: str) -> Optional[str]:
    key = str(name).strip().lower()
    return _KNOWN.get(key) or _ALIASES.get(key)


def method_color(name: str) -> str:
    """The colour of one method: :data:`METHOD_COLORS` for the methods the package names (and their short
    names: ``"Chefer"`` is PyHealth's setting, ``"IG"``, ``"SmoothGrad"``), grey for anything called
    Random, otherwise a colour picked from the name's CRC-32, the same in every run and on every machine.

    Example:
        >>> method_color("Chefer (recommended)"), method_color("IG"), method_color("Random")
        ('#d62728', '#1f77b4', '#7f7f7f')
        >>> method_color("My method") == method_color("My method") and method_color("My method") not in METHOD_COLORS.values()
        True
    """
    known = _known(name)
    if known is not None:
        return METHOD_COLORS[known]
    if str(name).strip().lower().startswith("random"):
        return METHOD_COLORS["Random"]
    return _OTHER_COLORS[zlib.crc32(str(name).encode("utf-8")) % len(_OTHER_COLORS)]


def method_colors(names: Iterable[str]) -> dict[str, str]:
    """``{name: colour}`` for the methods of one figure, in order: use it for every figure, so that a
    method keeps its colour across the report's curves, bars and time chart and across notebooks.

    Each name gets :func:`method_color`; where two methods the package does not name would share a
    colour, the later one (in sorted order of names, so the order of ``names`` does not matter) takes the
    next free colour. The colours are matplotlib colour strings: pass them as ``color=``.

    Example (in a notebook: ``colors = method_colors(evaluation.methods)``, then
    ``ax.plot(x, y, color=colors[name])``):
        >>> colors = method_colors(["Chefer (recommended)", "Chefer (PyHealth)", "Integrated Gradients", "Random"])
        >>> colors["Chefer (recommended)"], colors["Chefer (PyHealth)"], colors["Random"]
        ('#d62728', '#ff7f0e', '#7f7f7f')
        >>> many = method_colors([f"variant {i}" for i in range(8)])
        >>> len(set(many.values()))
        8
        >>> method_colors(reversed(list(many))) == many  # the same colours whatever the order
        True
    """
    names = list(dict.fromkeys(str(n) for n in names))
    colors = {name: method_color(name) for name in names}
    unknown = sorted(n for n in names if _known(n) is None and not n.strip().lower().startswith("random"))
    taken: set[str] = set()
    for name in unknown:
        color = colors[name]
        if color in taken and len(taken) < len(_OTHER_COLORS):
            start = _OTHER_COLORS.index(color)
            color = next(c for i in range(len(_OTHER_COLORS)) if (c := _OTHER_COLORS[(start + i) % len(_OTHER_COLORS)]) not in taken)
        colors[name] = color
        taken.add(color)
    return {name: colors[name] for name in names}


# ---------------------------------------------------------------------------------------------- HTML


def render_html(records: Iterable[VisualizationDataRecord], title: str = "Attributions", legend: bool = True) -> str:
    """A self-contained HTML page with the table Captum's ``visualize_text`` shows (no IPython)."""
    rows = [
        "<tr><th>True Label</th><th>Predicted Label</th><th>Attribution Label</th>"
        "<th>Attribution Score</th><th>Word Importance</th></tr>"
    ]
    for record in records:
        if not isinstance(record, VisualizationDataRecord):
            raise TypeError(f"records must be VisualizationDataRecord objects, got {type(record).__name__}")
        # Captum's own cell formatters, so colours match visualize_text; text is escaped first.
        words = [html.escape(captum_viz.format_special_tokens(str(w))) for w in record.raw_input_ids]
        importances = torch.as_tensor(record.word_attributions, dtype=torch.float).reshape(-1).tolist()
        rows.append(
            "<tr>"
            + captum_viz.format_classname(html.escape(str(record.true_class)))
            + captum_viz.format_classname(html.escape(f"{record.pred_class} ({record.pred_prob:.2f})"))
            + captum_viz.format_classname(html.escape(str(record.attr_class)))
            + captum_viz.format_classname(f"{record.attr_score:.2f}")
            + captum_viz.format_word_importances(words, importances)
            + "</tr>"
        )
    legend_html = _legend() if legend else ""
    safe_title = html.escape(title)
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{safe_title}</title>"
        "<style>body{font-family:sans-serif} td,th{padding:4px;vertical-align:top;text-align:left}</style>"
        f"</head><body><h2>{safe_title}</h2>{legend_html}<table>{''.join(rows)}</table></body></html>\n"
    )


def write_html(
    records: Iterable[VisualizationDataRecord], path: str | Path, title: str = "Attributions", legend: bool = True
) -> Path:
    """Write :func:`render_html` of ``records`` to ``path`` (parents created); returns the path.

    Example:
        >>> import tempfile
        >>> from captum_chefer import CheferAttribution, PyHealthAdapter
        >>> from captum_chefer.synthetic import toy_model_and_batch
        >>> model, batch = toy_model_and_batch()
        >>> adapter = PyHealthAdapter(model)
        >>> inputs, args = adapter.captum_inputs(batch)
        >>> records = adapter.visualization_records(
        ...     batch, CheferAttribution(adapter).attribute(inputs, additional_forward_args=args), method="Chefer")
        >>> path = write_html(records, tempfile.mkdtemp() + "/chefer.html", title="Chefer")
        >>> "#conditions" in path.read_text()
        True
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(records, title=title, legend=legend), encoding="utf-8")
    return path


def records_by_method(adapter: Any, batch: Any, scores: Any, target: Any = None) -> dict[str, list[VisualizationDataRecord]]:
    """``{method: one record per sample}`` from ``{method: feature dict}`` or a ``Comparison`` of this batch.

    Each method's records come from ``adapter.visualization_records(batch, scores[method], target,
    method=method)``, so they carry the method's name.
    """
    per_method = getattr(scores, "scores", scores)
    if not isinstance(per_method, Mapping) or not per_method:
        raise ValueError("scores must map method names to feature dicts {feature_key: scores}, or be a Comparison")
    return {
        name: adapter.visualization_records(batch, feature_dict, target, method=name)
        for name, feature_dict in per_method.items()
    }


def _group_by_method(records: Any) -> dict[str, list[VisualizationDataRecord]]:
    if isinstance(records, Mapping):
        grouped = {str(name): list(rows) for name, rows in records.items()}
    else:
        grouped = {}
        for record in records:
            name = getattr(record, "method", None)
            if name is None:
                raise ValueError(
                    "a record carries no method name; make records with adapter.visualization_records(..., method=name) "
                    "or pass {method: records}"
                )
            grouped.setdefault(str(name), []).append(record)
    sizes = {name: len(rows) for name, rows in grouped.items()}
    if not grouped or len(set(sizes.values())) != 1:
        raise ValueError(f"every method needs one record per sample, in the same order; got {sizes or 'no records'}")
    for rows in grouped.values():
        for record in rows:
            if not isinstance(record, VisualizationDataRecord):
                raise TypeError(f"records must be VisualizationDataRecord objects, got {type(record).__name__}")
    return grouped


def render_methods_html(
    records: Any, title: str = "Attributions by method", sample_names: Optional[Sequence[Any]] = None, legend: bool = True
) -> str:
    """Several methods' records on one self-contained page: per sample a table, one row per method.

    Args:
        records: ``{method: records}`` (one record per sample, the same samples in the same order), or a
            flat list of records that carry their method's name (``adapter.visualization_records(...,
            method=name)``), grouped by it in order.
        title: the page title.
        sample_names: a heading per sample (e.g. ``batch["patient_id"]``); default ``"Sample <i>"``.
        legend: show Captum's colour legend.

    Example:
        >>> from captum.attr import Saliency
        >>> from captum_chefer import CheferAttribution, PyHealthAdapter, compare_methods
        >>> from captum_chefer.synthetic import toy_model_and_batch
        >>> model, batch = toy_model_and_batch()
        >>> adapter = PyHealthAdapter(model)
        >>> result = compare_methods(adapter, batch, [CheferAttribution(adapter), Saliency(adapter)])
        >>> page = render_methods_html(records_by_method(adapter, batch, result), sample_names=batch["patient_id"])
        >>> page.count("<td class='method'>Chefer</td>"), page.count("<td class='method'>Saliency</td>")
        (4, 4)
    """
    grouped = _group_by_method(records)
    n = len(next(iter(grouped.values())))
    names = list(sample_names) if sample_names is not None else [f"Sample {i}" for i in range(n)]
    if len(names) != n:
        raise ValueError(f"sample_names has {len(names)} names for {n} samples")
    sections = []
    for i in range(n):
        first = next(iter(grouped.values()))[i]
        rows = []
        for method, method_records in grouped.items():
            record = method_records[i]
            words = [html.escape(captum_viz.format_special_tokens(str(w))) for w in record.raw_input_ids]
            importances = torch.as_tensor(record.word_attributions, dtype=torch.float).reshape(-1).tolist()
            rows.append(
                f"<tr><td class='method'>{html.escape(method)}</td>"
                + captum_viz.format_classname(html.escape(str(record.attr_class)))
                + captum_viz.format_classname(f"{record.attr_score:.2f}")
                + captum_viz.format_word_importances(words, importances)
                + "</tr>"
            )
        sections.append(
            f"<h3>{html.escape(str(names[i]))}</h3><p>true label <b>{html.escape(str(first.true_class))}</b>, predicted "
            f"<b>{html.escape(str(first.pred_class))}</b> ({first.pred_prob:.2f})</p><table><tr><th>Method</th>"
            "<th>Attribution Label</th><th>Sum of scores</th><th>Codes (colour: score / max |score| of the row)</th></tr>"
            + "".join(rows) + "</table>"
        )
    safe_title = html.escape(title)
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{safe_title}</title>"
        "<style>body{font-family:sans-serif} td,th{padding:4px;vertical-align:top;text-align:left} "
        "td.method{font-weight:600;white-space:nowrap}</style>"
        f"</head><body><h2>{safe_title}</h2>{_legend() if legend else ''}"
        "<p>The sum of scores is in each method's own units: compare colours within a row, not sums across rows.</p>"
        f"{''.join(sections)}</body></html>\n"
    )


def write_methods_html(
    records: Any, path: str | Path, title: str = "Attributions by method", sample_names: Optional[Sequence[Any]] = None,
    legend: bool = True,
) -> Path:
    """Write :func:`render_methods_html` to ``path`` (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_methods_html(records, title=title, sample_names=sample_names, legend=legend), encoding="utf-8")
    return path


def _legend() -> str:
    swatches = "".join(
        f'<span style="display:inline-block;width:10px;height:10px;border:1px solid;'
        f'background-color:{captum_viz._get_color(v)}"></span> {label} &nbsp;'
        for v, label in ((-1, "Negative"), (0, "Neutral"), (1, "Positive"))
    )
    return f'<div style="border-top:1px solid;margin-top:5px;padding-top:5px"><b>Legend: </b>{swatches}</div>'


# ---------------------------------------------------------------------------------------------- figure


def plot_methods(
    adapter: Any,
    batch: Any,
    scores: Any,
    sample: int = 0,
    *,
    normalize: bool = True,
    cmap: str = "RdBu_r",
    title: Optional[str] = None,
    figsize: Optional[tuple[float, float]] = None,
    planted: Optional[Mapping[str, Tensor]] = None,
    planted_label: str = "planted code (ground truth)",
) -> "Figure":
    """Methods by codes heat maps for one patient, one panel per feature stream.

    Args:
        adapter: the adapter (its ``feature_keys`` and ``decode(batch)`` are read).
        batch: the batch the scores explain.
        scores: ``{method: {feature_key: scores}}`` (e.g. ``Comparison.scores``) or an object with such
            a ``scores`` attribute (a ``Comparison``).
        sample: the index of the patient in the batch.
        normalize: divide each method's row by its largest ``|score|`` over the patient's codes, so
            methods with different scales share one colour scale ``[-1, 1]``.
        cmap: a diverging matplotlib colormap name.
        title: the figure title (default: ``"Patient <sample>"``).
        figsize: the figure size in inches.
        planted: ``{feature_key: bool mask shaped like the batch's codes}`` (what a ``ground_truth``
            function returns, e.g. ``cohort.ground_truth(adapter, batch)`` of the synthetic cohort): the
            codes marked True get a black outline over every method's row and a bold label with a ``*``,
            and the figure a legend line ``planted_label`` (which says so when the sample has none).
        planted_label: the legend line of the outlined codes.

    Returns:
        A ``matplotlib.figure.Figure`` (not registered with pyplot; a notebook displays it as the
        cell's value, ``fig.savefig(...)`` writes it).

    Example:
        >>> from captum.attr import Saliency
        >>> from captum_chefer import CheferAttribution, PyHealthAdapter, compare_methods
        >>> from captum_chefer.synthetic import toy_model_and_batch
        >>> model, batch = toy_model_and_batch()
        >>> adapter = PyHealthAdapter(model)
        >>> result = compare_methods(adapter, batch, [CheferAttribution(adapter), Saliency(adapter)])
        >>> fig = plot_methods(adapter, batch, result, sample=0)
        >>> [ax.get_title() for ax in fig.axes if ax.get_title()]
        ['conditions', 'procedures']
        >>> marked = {key: batch[key] == batch[key][0].reshape(-1)[0] for key in adapter.feature_keys}  # any mask
        >>> fig = plot_methods(adapter, batch, result, sample=0, planted=marked)
        >>> fig.legends[0].get_texts()[0].get_text()
        'outlined *code: planted code (ground truth)'
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    per_method = getattr(scores, "scores", scores)
    if not isinstance(per_method, Mapping) or not per_method:
        raise ValueError("scores must map method names to feature dicts {feature_key: scores} and hold at least one method")
    decoded = adapter.decode(batch)
    if not 0 <= sample < len(decoded):
        raise IndexError(f"sample {sample} is out of range for {len(decoded)} samples")
    tokens = decoded[sample]
    methods = list(per_method)
    rows, labels, marks = {}, {}, {}
    for key in adapter.feature_keys:
        mine = [t for t in tokens if t.feature == key]
        labels[key] = [t.text for t in mine]
        marks[key] = [False] * len(mine)
        if planted is not None:
            if key not in planted:
                raise KeyError(
                    f"planted has no mask for feature {key!r}; it has {sorted(planted)}, and needs one bool mask "
                    f"per feature of the adapter ({list(adapter.feature_keys)}), shaped like the batch's codes"
                )
            mask = torch.as_tensor(planted[key])[sample].detach().cpu()
            marks[key] = [bool(mask[t.index]) for t in mine]
        matrix = torch.zeros(len(methods), len(mine))
        for m, name in enumerate(methods):
            row = torch.as_tensor(per_method[name][key][sample]).detach().float().cpu()
            if mine:
                matrix[m] = torch.stack([row[t.index] for t in mine])
        rows[key] = matrix
    if normalize:
        peak = torch.stack([m.abs().amax(1) if m.shape[1] else torch.zeros(len(methods)) for m in rows.values()]).amax(0)
        rows = {k: m / peak.clamp_min(1e-12).unsqueeze(1) for k, m in rows.items()}
    limit = 1.0 if normalize else max(float(m.abs().max()) if m.numel() else 0.0 for m in rows.values()) or 1.0

    widths = [max(len(labels[k]), 1) for k in adapter.feature_keys]
    if figsize is None:
        figsize = (min(2.0 + 0.45 * sum(widths) + 1.2 * len(widths), 30.0), 1.0 + 0.45 * len(methods) + 1.2)
    fig = Figure(figsize=figsize, layout="constrained")
    axes = fig.subplots(1, len(widths), squeeze=False, width_ratios=widths)[0]
    image = None
    for ax, key in zip(axes, adapter.feature_keys):
        image = ax.imshow(rows[key].numpy(), aspect="auto", cmap=cmap, vmin=-limit, vmax=limit)
        ax.set_title(key)
        ax.set_xticks(range(len(labels[key])), labels[key], rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(methods)), methods if ax is axes[0] else [""] * len(methods))
        if any(marks[key]):
            ax.set_xticks(range(len(labels[key])), [f"*{t}" if m else t for t, m in zip(labels[key], marks[key])],
                          rotation=60, ha="right", fontsize=8)
            for column, (marked, tick) in enumerate(zip(marks[key], ax.get_xticklabels())):
                if marked:
                    tick.set_fontweight("bold")
                    ax.add_patch(Rectangle((column - 0.5, -0.5), 1.0, len(methods), fill=False, edgecolor="black",
                                           linewidth=2.2, clip_on=False))
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="score / max |score|" if normalize else "score")
    if planted is not None:
        label = f"outlined *code: {planted_label}" + ("" if any(any(m) for m in marks.values()) else "; none in this sample")
        fig.legend(handles=[Rectangle((0, 0), 1, 1, fill=False, edgecolor="black", linewidth=2.2, label=label)],
                   loc="outside lower left", fontsize=8, frameon=False)
    fig.suptitle(title if title is not None else f"Patient {sample}")
    return fig


# ---------------------------------------------------------------------------------------------- Captum fixes


@contextlib.contextmanager
def captum_matplotlib_compat() -> Iterator[None]:
    """Provide ``matplotlib.cm.get_cmap`` (removed in matplotlib 3.9) while Captum's plotting runs.

    Captum 0.9's ``visualize_timeseries_attr`` calls ``matplotlib.cm.get_cmap(cmap)``. Inside this
    context the name resolves through ``matplotlib.colormaps``; it is removed again afterwards, and
    nothing is changed where matplotlib still has it.
    """
    import matplotlib
    import matplotlib.cm as cm

    if hasattr(cm, "get_cmap"):
        yield
        return

    def get_cmap(name: Any = None, lut: Optional[int] = None) -> Any:
        if name is None:
            name = matplotlib.rcParams["image.cmap"]
        cmap = name if isinstance(name, matplotlib.colors.Colormap) else matplotlib.colormaps[name]
        return cmap.resampled(lut) if lut is not None else cmap

    cm.get_cmap = get_cmap  # type: ignore[attr-defined]
    try:
        yield
    finally:
        del cm.get_cmap


def visualize_timeseries_attr(*args: Any, **kwargs: Any) -> Any:
    """Captum's ``visualize_timeseries_attr`` that works with matplotlib >= 3.9 (same arguments).

    Useful for per-visit scores of one patient (visits as the time axis, feature streams as channels).

    Example:
        >>> import numpy as np
        >>> fig, axes = visualize_timeseries_attr(np.random.rand(6, 2), np.random.rand(6, 2),
        ...                                       method="overlay_individual", use_pyplot=False)
        >>> len(axes)
        2
    """
    with captum_matplotlib_compat():
        return captum_viz.visualize_timeseries_attr(*args, **kwargs)
