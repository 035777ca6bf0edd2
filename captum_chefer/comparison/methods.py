"""Running Captum attribution methods side by side on one adapter.

* :func:`compare_methods`: one call runs a list of Captum attribution objects on a batch or a loader
  and returns per-code scores (feature dicts, padding zero) and wall time per sample.
* :func:`ig_baselines`: Integrated Gradients baselines that keep padding as padding.
* :class:`EvaluatorMethod`: runs any Captum method through the adapter for PyHealth's
  ``pyhealth.metrics.interpretability.Evaluator``.

Padding (measured on PyHealth 2.1's ``Transformer``): Chefer never puts relevance on padding.
Gradients reaching flat-sequence padding are exactly zero, because the attention gives padded keys a
probability of exactly zero; in nested (visit x code) streams PyHealth sums the code embeddings of a
visit, so a padded code slot inside a real visit would receive the visit's gradient, and noise put
there (``NoiseTunnel``, ``sensitivity_max``) would change the visit. ``PyHealthAdapter`` therefore
multiplies embedding inputs by the code masks, which makes every gradient on padding exactly zero and
padding noise inert. :func:`compare_methods` and :class:`EvaluatorMethod` still multiply the scores
by the masks, for custom methods whose attribution does not vanish with the gradient (e.g. a baseline
that differs from the input on padding).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Optional, Sequence

import torch
from captum.attr import Attribution, LayerIntegratedGradients, NoiseTunnel
from torch import Tensor

from ..adapters import Adapter, DecodedToken
from ..adapters.base import LookupDict
from .tables import read_rows, write_rows

__all__ = [
    "Comparison",
    "EvaluatorMethod",
    "MethodSpec",
    "attribute_batch",
    "batch_patient_ids",
    "compare_methods",
    "ig_baselines",
    "is_ig_like",
    "masked_feature_dict",
    "method_name",
    "method_specs",
]

Reference = Literal["unk", "zero"]
MethodSpec = Attribution | tuple[str, Attribution] | tuple[str, Attribution, Mapping[str, Any]]

# Methods whose ``attribute`` takes ``baselines`` in the IG sense (a reference point per input).
_IG_LIKE = ("IntegratedGradients", "LayerIntegratedGradients")


# ---------------------------------------------------------------------------------------------- baselines


def ig_baselines(
    adapter: Adapter,
    inputs: tuple[Tensor, ...],
    additional_forward_args: tuple[Tensor, ...],
    reference: Reference = "unk",
) -> tuple[Tensor, ...]:
    """Integrated Gradients baselines for a batch: padding stays padding, real tokens get a reference.

    ``adapter.baselines(inputs, additional_forward_args, reference)``; see the adapter for the references
    it offers (``PyHealthAdapter``: ``"unk"``, the ``<unk>`` code, or ``"zero"``).

    Measured convergence delta (``IntegratedGradients``, Gauss-Legendre, 16 patients of the trained
    two-layer test Transformer, ``|f(x) - f(baseline)|`` median 5.2 logits for ``"unk"``, 2.6 for
    ``"zero"``): ``"unk"`` reaches max ``|delta|`` 0.33 at ``n_steps=50`` (median 1e-6) and 1.4e-5 at
    200; ``"zero"`` only 8.3 / 4.1 / 2.0 at 50 / 200 / 800 steps. PyHealth's Transformer normalises
    each layer's input, so along the straight path from a zero embedding the output barely moves until
    it jumps close to zero, which the quadrature misses: prefer ``"unk"``. See
    ``tests/test_side_by_side.py::test_ig_convergence_delta_is_small``.

    Example:
        >>> from captum.attr import IntegratedGradients
        >>> from captum_chefer import PyHealthAdapter
        >>> from captum_chefer.synthetic import toy_model_and_batch
        >>> model, batch = toy_model_and_batch()
        >>> adapter = PyHealthAdapter(model)
        >>> inputs, args = adapter.captum_inputs(batch)
        >>> baselines = ig_baselines(adapter, inputs, args, reference="unk")
        >>> attributions, delta = IntegratedGradients(adapter).attribute(
        ...     inputs, baselines=baselines, additional_forward_args=args, n_steps=50,
        ...     return_convergence_delta=True)
        >>> bool(delta.abs().max() < 1e-2)
        True
    """
    _require_adapter(adapter, "ig_baselines")
    return adapter.baselines(inputs, additional_forward_args, reference)


# ---------------------------------------------------------------------------------------------- comparison


@dataclass
class Comparison:
    """What :func:`compare_methods` returns.

    Attributes:
        scores: ``{method name: {feature key: per-code scores}}``, each ``[N, L]`` or ``[N, V, C]``
            like the code ids, zero on padding (batches of a loader are padded to a common length).
        seconds_per_sample: ``{method name: wall time of its attribute calls / number of samples}``.
        ids: ``{feature key: code ids}`` of the samples, padded like the scores.
        masks: ``{feature key: True on real codes}``.
        targets: the explained class per sample ``[N]``, or ``None`` for single-logit (binary) models.
        patient_ids: per sample, the batch's ``patient_id`` (``None`` where the batch has none).
        decoded: per sample, its real codes as the adapter decodes them (``adapter.decode(batch)``).
    """

    scores: dict[str, dict[str, Tensor]]
    seconds_per_sample: dict[str, float]
    ids: dict[str, Tensor] = field(default_factory=dict)
    masks: dict[str, Tensor] = field(default_factory=dict)
    targets: Optional[Tensor] = None
    patient_ids: list[Optional[str]] = field(default_factory=list)
    decoded: list[list[DecodedToken]] = field(default_factory=list)

    def __post_init__(self) -> None:
        # a wrong method or feature name says which exist (LookupDict) instead of a bare KeyError
        self.scores = LookupDict({k: LookupDict(v, kind="feature") for k, v in self.scores.items()}, kind="method")
        self.ids = LookupDict(self.ids, kind="feature")
        self.masks = LookupDict(self.masks, kind="feature")

    @property
    def methods(self) -> list[str]:
        return list(self.scores)

    @property
    def n_samples(self) -> int:
        first = next(iter(self.masks.values()), None)
        return 0 if first is None else int(first.shape[0])

    def rows(self) -> list[dict[str, Any]]:
        """One summary row per method: time per sample and, per feature key, the mean ``|score|``
        over real codes and the share of the total ``|score|`` on the top code of each sample."""
        rows = []
        for name, per_key in self.scores.items():
            row: dict[str, Any] = {"method": name, "seconds_per_sample": self.seconds_per_sample[name]}
            total = sum(s.abs().reshape(s.shape[0], -1).sum(1) for s in per_key.values())
            top = torch.stack([s.abs().reshape(s.shape[0], -1).max(1).values for s in per_key.values()]).max(0).values
            for key, s in per_key.items():
                real = self.masks[key]
                row[f"{key}_mean_abs"] = float(s.abs()[real].mean()) if real.any() else 0.0
            row["top_code_share"] = float((top / total.clamp_min(1e-12)).mean())
            rows.append(row)
        return rows

    def code_rows(self) -> list[dict[str, Any]]:
        """Long format, one row per (method, sample, real code): ready for a DataFrame.

        Columns: ``method``, ``sample`` (index in the comparison), ``patient_id``, ``feature``, ``visit``
        (nested streams; ``None`` for flat ones), ``position`` (of the code in the stream, or in its
        visit), ``code_id``, ``code`` (the code as the adapter decodes it, e.g. ``"v2:P7"`` for code P7
        of visit 2), ``score``.
        """
        out = []
        for name, per_key in self.scores.items():
            for sample, tokens in enumerate(self._tokens()):
                patient = self.patient_ids[sample] if sample < len(self.patient_ids) else None
                for token in tokens:
                    index = (sample, *token.index)
                    out.append(
                        {
                            "method": name,
                            "sample": sample,
                            "patient_id": patient,
                            "feature": token.feature,
                            "visit": token.index[0] if len(token.index) == 2 else None,
                            "position": token.index[-1],
                            "code_id": int(self.ids[token.feature][index]),
                            "code": token.text,
                            "score": float(per_key[token.feature][index]),
                        }
                    )
        return out

    def _tokens(self) -> list[list[DecodedToken]]:
        """The decoded codes, or (for a comparison made without them) the real codes shown by id."""
        if self.decoded:
            return self.decoded
        tokens: list[list[DecodedToken]] = [[] for _ in range(self.n_samples)]
        for key, real in self.masks.items():
            for index in real.nonzero().tolist():
                tokens[index[0]].append(DecodedToken(key, f"#{int(self.ids[key][tuple(index)])}", tuple(index[1:])))
        return tokens

    def save(self, path: str | Path) -> Path:
        """Write :meth:`code_rows` (with each row's ``target`` and the method's ``seconds_per_sample``) to
        a ``.csv``, ``.json`` or ``.parquet`` file; :meth:`load` reads it back.

        Example:
            >>> import tempfile
            >>> from captum.attr import Saliency
            >>> from captum_chefer import PyHealthAdapter
            >>> from captum_chefer.synthetic import toy_model_and_batch
            >>> model, batch = toy_model_and_batch()
            >>> adapter = PyHealthAdapter(model)
            >>> result = compare_methods(adapter, batch, [Saliency(adapter)])
            >>> again = Comparison.load(result.save(tempfile.mkdtemp() + "/saliency.parquet"))
            >>> again.code_rows() == result.code_rows()
            True
        """
        targets = None if self.targets is None else self.targets.tolist()
        rows = [
            {**row, "target": None if targets is None else targets[row["sample"]],
             "seconds_per_sample": self.seconds_per_sample.get(row["method"])}
            for row in self.code_rows()
        ]
        columns = ["method", "sample", "patient_id", "feature", "visit", "position", "code_id", "code", "score",
                   "target", "seconds_per_sample"]
        return write_rows(rows, path, columns)

    @classmethod
    def load(cls, path: str | Path) -> "Comparison":
        """A comparison saved by :meth:`save` (CSV, JSON or Parquet).

        Scores, code ids, masks, targets, patient ids and decoded codes come back as they were on every
        real code; each stream is as wide as its longest patient (padding beyond it is not stored).
        """
        rows = read_rows(path)
        if not rows or "score" not in rows[0] or "code_id" not in rows[0]:
            raise ValueError(f"{str(path)!r} holds no comparison rows; write it with Comparison.save")
        n = max(int(r["sample"]) for r in rows) + 1
        features: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            features.setdefault(str(r["feature"]), []).append(r)
        shapes: dict[str, tuple[int, ...]] = {}
        for key, mine in features.items():
            nested = any(r["visit"] is not None for r in mine)
            width = max(int(r["position"]) for r in mine) + 1
            shapes[key] = (n, max(int(r["visit"]) for r in mine) + 1, width) if nested else (n, width)
        methods = list(dict.fromkeys(str(r["method"]) for r in rows))
        scores = {m: {k: torch.zeros(shape) for k, shape in shapes.items()} for m in methods}
        ids = {k: torch.zeros(shape, dtype=torch.long) for k, shape in shapes.items()}
        masks = {k: torch.zeros(shape, dtype=torch.bool) for k, shape in shapes.items()}
        patient_ids: list[Optional[str]] = [None] * n
        targets: list[Optional[int]] = [None] * n
        seconds: dict[str, float] = {}
        decoded: list[list[DecodedToken]] = [[] for _ in range(n)]
        first = methods[0]
        for r in rows:
            key, sample, method = str(r["feature"]), int(r["sample"]), str(r["method"])
            position = (int(r["position"]),) if r["visit"] is None else (int(r["visit"]), int(r["position"]))
            index = (sample, *position)
            scores[method][key][index] = float(r["score"])
            seconds[method] = float(r["seconds_per_sample"]) if r.get("seconds_per_sample") is not None else float("nan")
            if method == first:
                ids[key][index] = int(r["code_id"])
                masks[key][index] = True
                patient_ids[sample] = None if r["patient_id"] is None else str(r["patient_id"])
                targets[sample] = None if r.get("target") is None else int(r["target"])
                decoded[sample].append(DecodedToken(key, str(r["code"]), position))
        return cls(
            scores=scores,
            seconds_per_sample=seconds,
            ids=ids,
            masks=masks,
            targets=None if any(t is None for t in targets) else torch.tensor(targets, dtype=torch.long),
            patient_ids=patient_ids,
            decoded=decoded,
        )

    def table(self, digits: int = 4) -> str:
        """:meth:`rows` as a plain-text table."""
        rows = self.rows()
        if not rows:
            return ""
        columns = list(rows[0])
        cells = [[_fmt(row[c], digits) for c in columns] for row in rows]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
        return "\n".join(lines)


def method_name(method: Attribution) -> str:
    """A readable name: Captum's ``get_name()``, with NoiseTunnel's inner method in brackets."""
    if isinstance(method, NoiseTunnel):
        return f"NoiseTunnel ({method_name(method.attribution_method)})"
    return method.get_name()


def compare_methods(
    adapter: Adapter,
    data: Mapping[str, Any] | Iterable[Mapping[str, Any]],
    methods: Sequence[MethodSpec],
    *,
    target_mode: Literal["predicted", "label"] = "predicted",
    baseline: Reference = "unk",
    progress: bool = True,
) -> Comparison:
    """Run several Captum attribution methods on the same adapter and batches; scores per code.

    Each method gets the same ``target`` and ``additional_forward_args``. ``LayerIntegratedGradients``
    gets token ids (its layers are ``adapter.embedding_layers``); every other method gets embeddings.
    ``IntegratedGradients``/``LayerIntegratedGradients`` (also inside ``NoiseTunnel``) get
    :func:`ig_baselines` with ``baseline`` unless the method's kwargs give ``baselines``. Scores are
    summed over the embedding dimension and multiplied by the code masks, so padding is zero for
    every method (see the module docstring).

    Args:
        adapter: the adapter every method wraps (e.g. a :class:`~captum_chefer.PyHealthAdapter`).
        data: one batch dict, or an iterable of them (a ``DataLoader``).
        methods: Captum attribution objects, or ``(name, method)`` / ``(name, method, kwargs)``
            tuples; ``kwargs`` go to ``method.attribute`` (e.g. ``{"n_steps": 32,
            "internal_batch_size": 64}`` or ``{"nt_samples": 8, "stdevs": 0.1}``).
        target_mode: ``"predicted"`` or ``"label"`` (see ``adapter.captum_target``).
        baseline: the IG reference for :func:`ig_baselines`: ``"unk"`` or ``"zero"``.
        progress: a tqdm bar over the batches of a loader.

    Returns:
        A :class:`Comparison`.

    Example:
        >>> from captum.attr import IntegratedGradients, NoiseTunnel, Saliency
        >>> from captum_chefer import CheferAttribution, PyHealthAdapter
        >>> from captum_chefer.synthetic import toy_model_and_batch
        >>> model, batch = toy_model_and_batch()
        >>> adapter = PyHealthAdapter(model)
        >>> result = compare_methods(adapter, batch, [
        ...     CheferAttribution(adapter), IntegratedGradients(adapter), Saliency(adapter),
        ...     ("SmoothGrad", NoiseTunnel(Saliency(adapter)), {"nt_samples": 4, "stdevs": 0.1})])
        >>> result.methods
        ['Chefer', 'Integrated Gradients', 'Saliency', 'SmoothGrad']
        >>> tuple(result.scores["Saliency"]["procedures"].shape) == tuple(batch["procedures"].shape)
        True
        >>> bool((result.scores["Saliency"]["procedures"][batch["procedures"] == 0] == 0).all())
        True
    """
    _require_adapter(adapter, "compare_methods")
    if target_mode not in ("predicted", "label"):
        raise ValueError(f"target_mode must be 'predicted' or 'label', got {target_mode!r}")
    if baseline not in ("unk", "zero"):
        raise ValueError(f"baseline must be 'unk' or 'zero', got {baseline!r}")
    specs = method_specs(adapter, methods)
    if isinstance(data, Mapping):
        batches: Iterable[Mapping[str, Any]] = [data]
    else:
        batches = data
        if progress:
            from tqdm import tqdm

            batches = tqdm(data, desc="compare_methods", unit="batch")

    scores: dict[str, list[dict[str, Tensor]]] = {name: [] for name, _, _ in specs}
    seconds = {name: 0.0 for name, _, _ in specs}
    ids_parts: list[dict[str, Tensor]] = []
    mask_parts: list[dict[str, Tensor]] = []
    target_parts: list[Tensor] = []
    patient_ids: list[Optional[str]] = []
    decoded: list[list[DecodedToken]] = []
    n = 0
    for batch in batches:
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"data must be a batch dict or an iterable of batch dicts (a DataLoader); got an item of type "
                f"{type(batch).__name__}"
            )
        embeddings, args = adapter.captum_inputs(batch, level="embedding")
        tokens, _ = adapter.captum_inputs(batch, level="token")
        target = adapter.captum_target(batch, mode=target_mode)
        masks = adapter.token_masks(args, tokens)
        for name, method, kwargs in specs:
            scores[name].append(
                attribute_batch(adapter, method, kwargs, embeddings, tokens, args, masks, target, baseline, seconds, name)
            )
        ids_parts.append(dict(zip(adapter.feature_keys, (t.detach().cpu() for t in tokens))))
        mask_parts.append(dict(zip(adapter.feature_keys, (m.detach().cpu() for m in masks))))
        if target is not None:
            target_parts.append(target.detach().cpu())
        size = int(tokens[0].shape[0])
        patient_ids.extend(batch_patient_ids(batch, size))
        decoded.extend(adapter.decode(batch))
        n += size
    if n == 0:
        raise ValueError("data holds no samples")
    return Comparison(
        scores={name: _cat_padded(parts) for name, parts in scores.items()},
        seconds_per_sample={name: s / n for name, s in seconds.items()},
        ids=_cat_padded(ids_parts),
        masks=_cat_padded(mask_parts),
        targets=torch.cat(target_parts) if target_parts else None,
        patient_ids=patient_ids,
        decoded=decoded,
    )


def batch_patient_ids(batch: Mapping[str, Any], size: int) -> list[Optional[str]]:
    """The batch's ``patient_id`` entries as strings, or ``None`` per sample when it has none."""
    ids = batch.get("patient_id")
    if isinstance(ids, (list, tuple)) and len(ids) == size:
        return [None if p is None else str(p) for p in ids]
    return [None] * size


def attribute_batch(
    adapter: Adapter,
    method: Attribution,
    kwargs: Mapping[str, Any],
    embeddings: tuple[Tensor, ...],
    tokens: tuple[Tensor, ...],
    args: tuple[Tensor, ...],
    masks: tuple[Tensor, ...],
    target: Optional[Tensor],
    baseline: Reference,
    seconds: dict[str, float],
    name: str,
) -> dict[str, Tensor]:
    """One method on one batch: attributions -> masked feature dict on the CPU; time added to ``seconds[name]``.

    The step ``compare_methods`` and :func:`captum_chefer.cohort.attribute_dataset` share: ``tokens`` go to
    methods that take code ids (``LayerIntegratedGradients``, Chefer on ids), ``embeddings`` to the others;
    IG-like methods without ``baselines`` in ``kwargs`` get :func:`ig_baselines` from ``baseline``.
    """
    token_level = _token_level(method)
    inputs = tokens if token_level else embeddings
    kwargs = dict(kwargs)
    if is_ig_like(method) and "baselines" not in kwargs:
        kwargs["baselines"] = ig_baselines(adapter, inputs, args, reference=baseline)
    with warnings.catch_warnings():  # Captum notes that it set requires_grad on the inputs itself
        warnings.filterwarnings("ignore", message=r"Input Tensor \d+ did not already require gradients")
        start = time.perf_counter()
        attributions = method.attribute(inputs, target=target, additional_forward_args=args, **kwargs)
        seconds[name] += time.perf_counter() - start
    if isinstance(attributions, tuple) and len(attributions) == 2 and kwargs.get("return_convergence_delta"):
        attributions = attributions[0]
    if isinstance(attributions, list):
        attributions = tuple(attributions)
    return masked_feature_dict(adapter, attributions, masks)


def masked_feature_dict(
    adapter: Adapter, attributions: Tensor | tuple[Tensor, ...], masks: Sequence[Tensor]
) -> dict[str, Tensor]:
    """``adapter.to_feature_dict`` with every score on padding set to zero, on the CPU."""
    scores = adapter.to_feature_dict(attributions)
    out = {}
    for key, mask in zip(adapter.feature_keys, masks):
        s = scores[key]
        if tuple(s.shape) != tuple(mask.shape):
            raise ValueError(f"scores for {key!r} have shape {tuple(s.shape)}, the codes {tuple(mask.shape)}")
        out[key] = (s * mask.to(s.device)).detach().cpu()
    return LookupDict(out, kind="feature")


def method_specs(adapter: Adapter, methods: Sequence[MethodSpec]) -> list[tuple[str, Attribution, dict]]:
    """``(name, method, attribute_kwargs)`` for each entry of a methods list, validated."""
    if isinstance(methods, (Attribution, str)) or not isinstance(methods, Sequence):
        raise TypeError("methods must be a list of Captum attribution objects or (name, method[, kwargs]) tuples")
    if not methods:
        raise ValueError("methods is empty; pass at least one Captum attribution object")
    specs = []
    for item in methods:
        if isinstance(item, Attribution):
            name, method, kwargs = method_name(item), item, {}
        elif isinstance(item, tuple) and len(item) in (2, 3) and isinstance(item[1], Attribution):
            name, method = str(item[0]), item[1]
            kwargs = dict(item[2]) if len(item) == 3 else {}
        else:
            raise TypeError(
                f"each method must be a Captum attribution object or a (name, method[, kwargs]) tuple, got {item!r}"
            )
        if _forward_func(method) is not adapter:
            raise ValueError(
                f"method {name!r} wraps {type(_forward_func(method)).__name__}, not this adapter; build every method "
                "on the same adapter, e.g. IntegratedGradients(adapter)"
            )
        if isinstance(method, NoiseTunnel) and _token_level(method.attribution_method):
            raise ValueError(f"{name!r}: NoiseTunnel adds Gaussian noise, which token ids cannot take")
        for forbidden in ("inputs", "target", "additional_forward_args"):
            if forbidden in kwargs:
                raise ValueError(f"{name!r}: compare_methods sets {forbidden!r} itself; remove it from the kwargs")
        if any(name == s[0] for s in specs):
            suffix = 2
            while any(f"{name} #{suffix}" == s[0] for s in specs):
                suffix += 1
            name = f"{name} #{suffix}"
        specs.append((name, method, kwargs))
    return specs


def _forward_func(method: Attribution) -> Any:
    inner = method.attribution_method if isinstance(method, NoiseTunnel) else method
    return inner.forward_func


def _token_level(method: Attribution) -> bool:
    return isinstance(method, LayerIntegratedGradients)


def is_ig_like(method: Attribution) -> bool:
    """Whether ``method`` (or the method a NoiseTunnel wraps) takes IG-style ``baselines``."""
    inner = method.attribution_method if isinstance(method, NoiseTunnel) else method
    return type(inner).__name__ in _IG_LIKE


def _require_adapter(adapter: Any, caller: str) -> None:
    if not isinstance(adapter, Adapter):
        raise TypeError(
            f"{caller} needs an adapter from captum_chefer.adapters (e.g. PyHealthAdapter(model)), got {type(adapter).__name__}"
        )


def _cat_padded(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Concatenate per-batch dicts along the batch, zero-padding code dims to the largest."""
    if not parts:
        return LookupDict(kind="feature")
    out = {}
    for key in parts[0]:
        tensors = [p[key] for p in parts]
        shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
        padded = []
        for t in tensors:
            pad: list[int] = []
            for d in reversed(range(1, t.dim())):
                pad += [0, shape[d - 1] - t.shape[d]]
            padded.append(torch.nn.functional.pad(t, pad) if any(pad) else t)
        out[key] = torch.cat(padded)
    return LookupDict(out, kind="feature")


def _fmt(value: Any, digits: int) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


# ---------------------------------------------------------------------------------------------- PyHealth


class EvaluatorMethod:
    """Any Captum method as the ``method`` of PyHealth's ``Evaluator.evaluate_attribution``.

    PyHealth's evaluator calls ``method.attribute(**batch)`` and expects ``{feature key: scores}``
    shaped like the batch's code ids. This wrapper makes the Captum inputs, target and additional
    forward args through the adapter, runs the method and returns masked per-code scores.

    Args:
        adapter: the adapter the method wraps.
        method: a Captum attribution object built on ``adapter`` (or ``CheferAttribution(adapter)``).
        target_mode: ``"predicted"`` (what PyHealth's metrics explain) or ``"label"``.
        baseline: the IG reference for IG-like methods without explicit ``baselines``.
        **attribute_kwargs: passed to ``method.attribute``.

    Example:
        >>> from captum.attr import Saliency
        >>> from captum_chefer import PyHealthAdapter
        >>> from captum_chefer.synthetic import toy_model_and_batch
        >>> model, batch = toy_model_and_batch()
        >>> adapter = PyHealthAdapter(model)
        >>> scores = EvaluatorMethod(adapter, Saliency(adapter)).attribute(**batch)
        >>> sorted(scores), tuple(scores["conditions"].shape) == tuple(batch["conditions"].shape)
        (['conditions', 'procedures'], True)
    """

    def __init__(
        self,
        adapter: Adapter,
        method: Attribution,
        *,
        target_mode: Literal["predicted", "label"] = "predicted",
        baseline: Reference = "unk",
        **attribute_kwargs: Any,
    ) -> None:
        self.adapter = adapter
        self.name, self.method, self.kwargs = method_specs(adapter, [("method", method, attribute_kwargs)])[0]
        self.name = method_name(method)
        if target_mode not in ("predicted", "label"):
            raise ValueError(f"target_mode must be 'predicted' or 'label', got {target_mode!r}")
        self.target_mode = target_mode
        self.baseline = baseline

    def attribute(self, **batch: Any) -> dict[str, Tensor]:
        """Per-code scores ``{feature key: [B, L] or [B, V, C]}`` for one batch, on the model's device."""
        embeddings, args = self.adapter.captum_inputs(batch, level="embedding")
        tokens, _ = self.adapter.captum_inputs(batch, level="token")
        target = self.adapter.captum_target(batch, mode=self.target_mode)
        masks = self.adapter.token_masks(args, tokens)
        seconds = {self.name: 0.0}
        scores = attribute_batch(
            self.adapter, self.method, self.kwargs, embeddings, tokens, args, masks, target, self.baseline, seconds,
            self.name,
        )
        device = self.adapter.model.device
        return {key: value.to(device) for key, value in scores.items()}
