"""Captum visualization for PyHealth attributions: text records, an HTML file, a methods-by-codes figure.

* :func:`visualization_records`: one ``captum.attr.visualization.VisualizationDataRecord`` per sample,
  codes decoded through the dataset's processors, so Captum's ``visualize_text`` renders them in a
  notebook.
* :func:`write_html`: the same table as a self-contained HTML file, without IPython.
* :func:`plot_methods`: a matplotlib figure, methods by codes, one heat map per feature stream, for
  one patient.
* :func:`captum_matplotlib_compat` / :func:`visualize_timeseries_attr`: the one place that works
  around Captum 0.9 calling ``matplotlib.cm.get_cmap``, which matplotlib 3.9 removed.
"""

from __future__ import annotations

import contextlib
import html
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Optional, Sequence

import torch
from captum.attr import visualization as captum_viz
from torch import Tensor

VisualizationDataRecord = captum_viz.VisualizationDataRecord

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .pyhealth import PyHealthAdapter
    from .side_by_side import Comparison

__all__ = [
    "captum_matplotlib_compat",
    "decode_tokens",
    "plot_methods",
    "render_html",
    "visualization_records",
    "visualize_timeseries_attr",
    "write_html",
]


# ---------------------------------------------------------------------------------------------- decoding


def _code_names(adapter: "PyHealthAdapter", key: str) -> dict[int, str]:
    vocab = getattr(adapter.model.dataset.input_processors[key], "code_vocab", None)
    if not vocab:
        return {}
    return {int(index): str(code) for code, index in vocab.items()}


def decode_tokens(
    adapter: "PyHealthAdapter", ids: Mapping[str, Tensor], masks: Mapping[str, Tensor], sample: int
) -> dict[str, tuple[list[str], list[tuple[int, ...]]]]:
    """Per feature key, the decoded real codes of one sample and their index positions.

    Flat streams give ``"C3"``; nested (visit x code) streams give ``"v2:P7"`` (visit numbers from 1).
    Ids missing from the vocabulary are shown as ``#<id>``.
    """
    out = {}
    for key in adapter.feature_keys:
        names = _code_names(adapter, key)
        real = masks[key][sample].bool()
        positions = [tuple(p) for p in real.nonzero().tolist()]
        row = ids[key][sample]
        tokens = []
        for position in positions:
            code = names.get(int(row[position]), f"#{int(row[position])}")
            tokens.append(f"v{position[0] + 1}:{code}" if len(position) == 2 else code)
        out[key] = (tokens, positions)
    return out


def _label_names(adapter: "PyHealthAdapter") -> dict[int, str]:
    processor = adapter.model.dataset.output_processors.get(adapter.label_key)
    vocab = getattr(processor, "label_vocab", None) or {}
    return {int(index): str(label) for label, index in vocab.items()}


def _token_view(adapter: "PyHealthAdapter", batch: Mapping[str, Any]) -> tuple[tuple[Tensor, ...], tuple, dict, dict]:

    tokens, args = adapter.captum_inputs(batch, level="token")
    masks = adapter.code_masks(args)
    ids = dict(zip(adapter.feature_keys, tokens))
    return tokens, args, ids, dict(zip(adapter.feature_keys, masks))


def _scores_dict(adapter: "PyHealthAdapter", attributions: Any) -> dict[str, Tensor]:
    if isinstance(attributions, Mapping):
        missing = [k for k in adapter.feature_keys if k not in attributions]
        if missing:
            raise KeyError(f"attributions have no scores for {missing}; expected keys {adapter.feature_keys}")
        return {k: torch.as_tensor(attributions[k]).detach() for k in adapter.feature_keys}
    if isinstance(attributions, list):
        attributions = tuple(attributions)
    if not isinstance(attributions, (Tensor, tuple)):
        raise TypeError(
            "attributions must be a tensor or tuple shaped like the Captum inputs, or a feature dict "
            f"{{feature_key: scores}}; got {type(attributions).__name__}"
        )
    return adapter.to_feature_dict(attributions)


# ---------------------------------------------------------------------------------------------- records


def visualization_records(
    adapter: "PyHealthAdapter",
    batch: Mapping[str, Any],
    attributions: Any,
    target: Optional[int | Sequence[int] | Tensor] = None,
    *,
    delta: Optional[Tensor] = None,
) -> list[VisualizationDataRecord]:
    """One Captum ``VisualizationDataRecord`` per sample of ``batch``.

    Args:
        adapter: the :class:`captum_chefer.PyHealthAdapter`.
        batch: the batch the attributions explain.
        attributions: shaped like the Captum inputs (a tuple, embeddings or token level), or a
            feature dict ``{feature_key: scores}`` such as ``Comparison.scores[method]``.
        target: the class that was explained (int, per-sample sequence or tensor). ``None``: the
            single logit's class (the positive label) for binary models, else the predicted class.
        delta: optional per-sample convergence deltas (e.g. from Integrated Gradients).

    Returns:
        Records whose ``raw_input_ids`` are, per feature stream, a marker ``"<key>"`` (rendered by
        Captum as ``#key``) followed by the sample's decoded real codes (``"v2:P7"`` for visit 2 of a
        nested stream); ``word_attributions`` holds their scores divided by the sample's largest
        ``|score|`` (markers 0), ``attr_score`` the sum of the raw scores, ``pred_prob`` the
        probability of ``pred_class``; classes are the label processor's names.

    Example:
        >>> from captum_chefer import CheferAttribution, PyHealthAdapter
        >>> from captum_chefer.synthetic import toy_model_and_batch
        >>> model, batch = toy_model_and_batch()
        >>> adapter = PyHealthAdapter(model)
        >>> inputs, args = adapter.captum_inputs(batch)
        >>> chefer = CheferAttribution(adapter).attribute(inputs, additional_forward_args=args)
        >>> records = visualization_records(adapter, batch, chefer)
        >>> len(records), records[0].raw_input_ids[0]
        (4, '<conditions>')
        >>> float(records[0].word_attributions.abs().max())
        1.0
    """
    tokens, args, ids, masks = _token_view(adapter, batch)
    scores = _scores_dict(adapter, attributions)
    batch_size = int(tokens[0].shape[0])
    for key, s in scores.items():
        if tuple(s.shape) != tuple(masks[key].shape):
            raise ValueError(
                f"scores for {key!r} have shape {tuple(s.shape)} but the batch's codes are {tuple(masks[key].shape)}; "
                "pass the attributions of this batch"
            )
    with torch.no_grad():
        logits = adapter(*tokens, *args).detach().cpu()
    single = logits.shape[1] == 1
    if single:
        p1 = torch.sigmoid(logits[:, 0])
        pred = (p1 >= 0.5).long()
        pred_prob = torch.where(pred == 1, p1, 1 - p1)
    else:
        probs = torch.sigmoid(logits) if getattr(adapter.model, "mode", None) == "multilabel" else logits.softmax(1)
        pred = probs.argmax(1)
        pred_prob = probs.gather(1, pred.view(-1, 1))[:, 0]
    explained = _explained_classes(target, batch_size, pred, single)
    names = _label_names(adapter)
    true = _true_classes(adapter, batch, batch_size, names)
    deltas = None if delta is None else torch.as_tensor(delta).detach().cpu().reshape(-1)
    if deltas is not None and deltas.numel() != batch_size:
        raise ValueError(f"delta must hold one value per sample ({batch_size}), got {deltas.numel()}")

    records = []
    for i in range(batch_size):
        decoded = decode_tokens(adapter, ids, masks, i)
        words: list[str] = []
        values: list[float] = []
        raw_total = 0.0
        for key in adapter.feature_keys:
            codes, positions = decoded[key]
            words.append(f"<{key}>")
            values.append(0.0)
            row = scores[key][i].detach().float().cpu()
            for code, position in zip(codes, positions):
                words.append(code)
                values.append(float(row[position]))
                raw_total += float(row[position])
        word_scores = torch.tensor(values)
        peak = word_scores.abs().max()
        if peak > 0:
            word_scores = word_scores / peak
        records.append(
            VisualizationDataRecord(
                word_scores,
                float(pred_prob[i]),
                names.get(int(pred[i]), str(int(pred[i]))),
                true[i],
                names.get(explained[i], str(explained[i])),
                raw_total,
                words,
                None if deltas is None else float(deltas[i]),
            )
        )
    return records


def _explained_classes(target: Any, batch_size: int, pred: Tensor, single: bool) -> list[int]:
    if target is None:
        return [1] * batch_size if single else pred.tolist()
    if isinstance(target, bool):
        raise TypeError("target must be an int, a sequence of ints or a tensor, not a bool")
    if isinstance(target, int):
        return [target] * batch_size
    index = torch.as_tensor(target).reshape(-1)
    if index.numel() == 1:
        return [int(index)] * batch_size
    if index.numel() != batch_size:
        raise ValueError(f"target must be one class or one per sample ({batch_size}), got {index.numel()} values")
    return [int(t) for t in index]


def _true_classes(adapter: "PyHealthAdapter", batch: Mapping[str, Any], batch_size: int, names: dict[int, str]) -> list[str]:
    if adapter.label_key not in batch:
        return ["n/a"] * batch_size
    labels = torch.as_tensor(batch[adapter.label_key]).detach().cpu()
    if getattr(adapter.model, "mode", None) == "multilabel":
        return [",".join(names.get(j, str(j)) for j in row.nonzero().flatten().tolist()) for row in labels.reshape(batch_size, -1)]
    return [names.get(int(v), str(int(v))) for v in labels.reshape(batch_size, -1)[:, 0]]


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
    legend_html = ""
    if legend:
        swatches = "".join(
            f'<span style="display:inline-block;width:10px;height:10px;border:1px solid;'
            f'background-color:{captum_viz._get_color(v)}"></span> {label} &nbsp;'
            for v, label in ((-1, "Negative"), (0, "Neutral"), (1, "Positive"))
        )
        legend_html = f'<div style="border-top:1px solid;margin-top:5px;padding-top:5px"><b>Legend: </b>{swatches}</div>'
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
        ...     batch, CheferAttribution(adapter).attribute(inputs, additional_forward_args=args))
        >>> path = write_html(records, tempfile.mkdtemp() + "/chefer.html", title="Chefer")
        >>> "#conditions" in path.read_text()
        True
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(records, title=title, legend=legend), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- figure


def plot_methods(
    adapter: "PyHealthAdapter",
    batch: Optional[Mapping[str, Any]],
    scores: "Mapping[str, Mapping[str, Tensor]] | Comparison",
    sample: int = 0,
    *,
    normalize: bool = True,
    cmap: str = "RdBu_r",
    title: Optional[str] = None,
    figsize: Optional[tuple[float, float]] = None,
) -> "Figure":
    """Methods by codes heat maps for one patient, one panel per feature stream.

    Args:
        adapter: the adapter.
        batch: the batch the scores explain; may be ``None`` when ``scores`` is a ``Comparison``
            (its ids and masks are used).
        scores: ``{method: {feature_key: scores}}`` (e.g. ``Comparison.scores``) or a ``Comparison``.
        sample: the index of the patient in the batch (or comparison).
        normalize: divide each method's row by its largest ``|score|`` over the patient's codes, so
            methods with different scales share one colour scale ``[-1, 1]``.
        cmap: a diverging matplotlib colormap name.
        title: the figure title (default: ``"Patient <sample>"``).
        figsize: the figure size in inches.

    Returns:
        A ``matplotlib.figure.Figure`` (not registered with pyplot; a notebook displays it as the
        cell's value, ``fig.savefig(...)`` writes it).

    Example:
        >>> from captum.attr import Saliency
        >>> from captum_chefer import CheferAttribution, PyHealthAdapter
        >>> from captum_chefer.side_by_side import compare_methods
        >>> from captum_chefer.synthetic import toy_model_and_batch
        >>> model, batch = toy_model_and_batch()
        >>> adapter = PyHealthAdapter(model)
        >>> result = compare_methods(adapter, batch, [CheferAttribution(adapter), Saliency(adapter)])
        >>> fig = plot_methods(adapter, batch, result, sample=0)
        >>> [ax.get_title() for ax in fig.axes if ax.get_title()]
        ['conditions', 'procedures']
    """
    from matplotlib.figure import Figure

    from .side_by_side import Comparison

    if isinstance(scores, Comparison):
        ids, masks, per_method = scores.ids, scores.masks, scores.scores
        if batch is not None:
            _, _, ids, masks = _token_view(adapter, batch)
    else:
        if batch is None:
            raise ValueError("batch is needed to decode the codes unless scores is a Comparison")
        _, _, ids, masks = _token_view(adapter, batch)
        per_method = {name: _scores_dict(adapter, s) for name, s in scores.items()}
    if not per_method:
        raise ValueError("scores holds no methods")
    n = int(next(iter(masks.values())).shape[0])
    if not 0 <= sample < n:
        raise IndexError(f"sample {sample} is out of range for {n} samples")
    decoded = decode_tokens(adapter, ids, masks, sample)
    methods = list(per_method)
    rows = {}
    for key in adapter.feature_keys:
        _, positions = decoded[key]
        matrix = torch.zeros(len(methods), len(positions))
        for m, name in enumerate(methods):
            row = per_method[name][key][sample].detach().float().cpu()
            if positions:
                matrix[m] = torch.stack([row[p] for p in positions])
        rows[key] = matrix
    if normalize:
        peak = torch.stack([m.abs().amax(1) if m.shape[1] else torch.zeros(len(methods)) for m in rows.values()]).amax(0)
        rows = {k: m / peak.clamp_min(1e-12).unsqueeze(1) for k, m in rows.items()}
    limit = 1.0 if normalize else max(float(m.abs().max()) if m.numel() else 0.0 for m in rows.values()) or 1.0

    widths = [max(len(decoded[k][0]), 1) for k in adapter.feature_keys]
    if figsize is None:
        figsize = (min(2.0 + 0.45 * sum(widths) + 1.2 * len(widths), 30.0), 1.0 + 0.45 * len(methods) + 1.2)
    fig = Figure(figsize=figsize, layout="constrained")
    axes = fig.subplots(1, len(widths), squeeze=False, width_ratios=widths)[0]
    image = None
    for ax, key in zip(axes, adapter.feature_keys):
        codes, _ = decoded[key]
        image = ax.imshow(rows[key].numpy(), aspect="auto", cmap=cmap, vmin=-limit, vmax=limit)
        ax.set_title(key)
        ax.set_xticks(range(len(codes)), codes, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(methods)), methods if ax is axes[0] else [""] * len(methods))
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="score / max |score|" if normalize else "score")
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
