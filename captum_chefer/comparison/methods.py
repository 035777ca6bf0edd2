"""Chefer side by side with Captum's own methods, on one ``PyHealthAdapter``.

* :func:`compare_methods`: one call runs a list of Captum attribution objects on a batch or a loader
  and returns per-code scores (feature dicts, padding zero) and wall time per sample.
* :func:`ig_baselines`: Integrated Gradients baselines that keep padding as padding.
* :func:`token_removal_perturbation`: a ``perturb_func`` (and matching forward function) for
  ``captum.metrics.infidelity`` at token level: removed codes become padding.
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
from typing import Any, Iterable, Literal, Mapping, Optional, Sequence

import torch
from captum.attr import Attribution, LayerIntegratedGradients, NoiseTunnel
from torch import Tensor

from .pyhealth import PyHealthAdapter

__all__ = [
    "Comparison",
    "EvaluatorMethod",
    "TokenRemoval",
    "compare_methods",
    "ig_baselines",
    "is_ig_like",
    "masked_feature_dict",
    "method_name",
    "method_specs",
    "token_removal_perturbation",
]

Reference = Literal["unk", "zero"]
MethodSpec = Attribution | tuple[str, Attribution] | tuple[str, Attribution, Mapping[str, Any]]

# Methods whose ``attribute`` takes ``baselines`` in the IG sense (a reference point per input).
_IG_LIKE = ("IntegratedGradients", "LayerIntegratedGradients")


# ---------------------------------------------------------------------------------------------- baselines


def ig_baselines(
    adapter: PyHealthAdapter,
    inputs: tuple[Tensor, ...],
    additional_forward_args: tuple[Tensor, ...],
    reference: Reference = "unk",
) -> tuple[Tensor, ...]:
    """Integrated Gradients baselines for a batch: padding stays padding, real codes get a reference.

    Args:
        adapter: the adapter the inputs came from.
        inputs: ``adapter.captum_inputs(batch, level=...)[0]``: embeddings or token ids.
        additional_forward_args: the matching ``additional_forward_args`` (the code masks are read).
        reference: what a real code becomes: ``"unk"`` (the ``<unk>`` code's embedding, or its id at
            token level) or ``"zero"`` (a zero embedding; at token level the padding id, whose
            embedding is zero, while the mask still marks the position as real).

    Returns:
        One baseline per input, shaped like it. At padding positions the baseline equals the input,
        so ``inputs - baselines`` is zero there and IG gives padding nothing.

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
    if reference not in ("unk", "zero"):
        raise ValueError(f"reference must be 'unk' or 'zero', got {reference!r}")
    inputs = _as_inputs(adapter, inputs)
    masks = adapter.code_masks(additional_forward_args)
    out = []
    for feature, x, mask in zip(adapter.features, inputs, masks):
        mask = mask.to(x.device).bool()
        unk_id = int(getattr(adapter.model.dataset.input_processors[feature.key], "code_vocab", {}).get("<unk>", 1))
        if x.is_floating_point():
            if tuple(x.shape[:-1]) != tuple(mask.shape):
                raise ValueError(
                    f"input for {feature.key!r} has shape {tuple(x.shape)} but its mask is {tuple(mask.shape)}; "
                    "pass inputs and additional_forward_args from the same adapter.captum_inputs call"
                )
            if reference == "unk":
                with torch.no_grad():
                    ids = torch.full((1,) * mask.dim(), unk_id, dtype=torch.long, device=x.device)
                    ref = adapter.model.embedding_model({feature.key: ids})[feature.key].to(x.dtype)
            else:
                ref = torch.zeros((), dtype=x.dtype, device=x.device)
            out.append(torch.where(mask.unsqueeze(-1), ref.expand_as(x), x).detach())
        else:
            if tuple(x.shape) != tuple(mask.shape):
                raise ValueError(
                    f"token input for {feature.key!r} has shape {tuple(x.shape)} but its mask is {tuple(mask.shape)}"
                )
            ref_id = unk_id if reference == "unk" else feature.pad_id
            out.append(torch.where(mask, torch.full_like(x, ref_id), x))
    return tuple(out)


# ---------------------------------------------------------------------------------------------- infidelity


class TokenRemoval:
    """Token removal for ``captum.metrics.infidelity``: removed codes become padding.

    ``infidelity`` perturbs only ``inputs``; the masks travel in ``additional_forward_args``, so the
    plain adapter would still treat a removed code as a real code with the padding embedding.
    :attr:`forward_func` therefore ands each mask with ``ids != <pad>``: the model then treats removed
    codes as absent, exactly as if the batch had never held them. Use both together, at token level.

    Calling the object is the ``perturb_func``: each real code is removed independently with
    probability ``fraction`` (at least one real code of each sample and stream is kept); it returns
    ``(perturbations, perturbed_inputs)`` with ``perturbations`` ``1.0`` on removed codes, so
    infidelity compares the attribution mass of the removed codes with the drop of the output.

    Args:
        adapter: the adapter.
        fraction: probability that a real code is removed, in ``(0, 1)``.
        generator: a ``torch.Generator`` for reproducible draws.
    """

    def __init__(self, adapter: PyHealthAdapter, fraction: float = 0.3, generator: Optional[torch.Generator] = None):
        if not isinstance(adapter, PyHealthAdapter):
            raise TypeError(f"TokenRemoval needs a PyHealthAdapter, got {type(adapter).__name__}")
        if not 0.0 < float(fraction) < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
        self.adapter = adapter
        self.fraction = float(fraction)
        self.generator = generator

    def forward_func(self, *inputs_and_args: Tensor) -> Tensor:
        """The adapter's logits, with each code mask anded with ``ids != <pad>`` (token level only)."""
        inputs, args = self.adapter.split_inputs(inputs_and_args)
        args = list(args)
        position = 0
        for feature, ids in zip(self.adapter.features, inputs):
            if ids.is_floating_point():
                raise TypeError(
                    f"TokenRemoval works on token ids; input for {feature.key!r} is {ids.dtype}. "
                    "Use adapter.captum_inputs(batch, level='token')."
                )
            args[position] = args[position].bool() & (ids != feature.pad_id)
            position += 2 if feature.temporal else 1
        return self.adapter(*inputs, *args)

    def __call__(self, inputs: Tensor | tuple[Tensor, ...]) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        inputs_tuple = inputs if isinstance(inputs, tuple) else (inputs,)
        perturbations, perturbed = [], []
        for feature, ids in zip(self.adapter.features, inputs_tuple):
            if ids.is_floating_point():
                raise TypeError(f"TokenRemoval perturbs token ids; input for {feature.key!r} is {ids.dtype}")
            real = ids != feature.pad_id
            draw = torch.rand(ids.shape, generator=self.generator, device="cpu").to(ids.device)
            remove = real & (draw < self.fraction)
            flat_real, flat_remove = real.reshape(real.shape[0], -1), remove.reshape(real.shape[0], -1)
            emptied = flat_real.any(dim=1) & ~(flat_real & ~flat_remove).any(dim=1)
            if emptied.any():  # keep the first real code of a sample that would lose all of them
                first = flat_real.float().argmax(dim=1)
                flat_remove[emptied, first[emptied]] = False
            remove = flat_remove.reshape(ids.shape)
            perturbations.append(remove.float())
            perturbed.append(torch.where(remove, torch.full_like(ids, feature.pad_id), ids))
        return tuple(perturbations), tuple(perturbed)


def token_removal_perturbation(
    adapter: PyHealthAdapter, fraction: float = 0.3, generator: Optional[torch.Generator] = None
) -> TokenRemoval:
    """A :class:`TokenRemoval`: ``perturb_func`` for ``captum.metrics.infidelity`` at token level.

    Pass ``removal.forward_func`` as infidelity's ``forward_func`` and ``removal`` as its
    ``perturb_func``; inputs, attributions and ``additional_forward_args`` at token level.

    Example:
        >>> import torch
        >>> from captum.metrics import infidelity
        >>> from captum_chefer import CheferAttribution, PyHealthAdapter
        >>> from captum_chefer.synthetic import toy_model_and_batch
        >>> model, batch = toy_model_and_batch()
        >>> adapter = PyHealthAdapter(model)
        >>> tokens, args = adapter.captum_inputs(batch, level="token")
        >>> chefer = CheferAttribution(adapter).attribute(tokens, additional_forward_args=args)
        >>> removal = token_removal_perturbation(adapter, 0.3, torch.Generator().manual_seed(0))
        >>> scores = infidelity(removal.forward_func, removal, tokens, chefer,
        ...                     additional_forward_args=args, n_perturb_samples=4, normalize=True)
        >>> tuple(scores.shape), bool(torch.isfinite(scores).all())
        ((4,), True)
    """
    return TokenRemoval(adapter, fraction, generator)


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
    """

    scores: dict[str, dict[str, Tensor]]
    seconds_per_sample: dict[str, float]
    ids: dict[str, Tensor] = field(default_factory=dict)
    masks: dict[str, Tensor] = field(default_factory=dict)
    targets: Optional[Tensor] = None

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
        """Long format, one row per (method, sample, feature key, real code): ready for a DataFrame."""
        out = []
        for name, per_key in self.scores.items():
            for key, s in per_key.items():
                real = self.masks[key]
                for index in real.nonzero().tolist():
                    out.append(
                        {
                            "method": name,
                            "sample": index[0],
                            "feature": key,
                            "position": tuple(index[1:]) if len(index) > 2 else index[1],
                            "code_id": int(self.ids[key][tuple(index)]),
                            "score": float(s[tuple(index)]),
                        }
                    )
        return out

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
    adapter: PyHealthAdapter,
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
        adapter: the :class:`PyHealthAdapter` every method wraps.
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
    if not isinstance(adapter, PyHealthAdapter):
        raise TypeError(f"compare_methods needs a PyHealthAdapter, got {type(adapter).__name__}")
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
            from tqdm.auto import tqdm

            batches = tqdm(data, desc="compare_methods", unit="batch")

    scores: dict[str, list[dict[str, Tensor]]] = {name: [] for name, _, _ in specs}
    seconds = {name: 0.0 for name, _, _ in specs}
    ids_parts: list[dict[str, Tensor]] = []
    mask_parts: list[dict[str, Tensor]] = []
    target_parts: list[Tensor] = []
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
        masks = adapter.code_masks(args)
        for name, method, kwargs in specs:
            scores[name].append(
                _attribute_one(adapter, method, kwargs, embeddings, tokens, args, masks, target, baseline, seconds, name)
            )
        ids_parts.append(dict(zip(adapter.feature_keys, (t.detach().cpu() for t in tokens))))
        mask_parts.append(dict(zip(adapter.feature_keys, (m.detach().cpu() for m in masks))))
        if target is not None:
            target_parts.append(target.detach().cpu())
        n += int(tokens[0].shape[0])
    if n == 0:
        raise ValueError("data holds no samples")
    return Comparison(
        scores={name: _cat_padded(parts) for name, parts in scores.items()},
        seconds_per_sample={name: s / n for name, s in seconds.items()},
        ids=_cat_padded(ids_parts),
        masks=_cat_padded(mask_parts),
        targets=torch.cat(target_parts) if target_parts else None,
    )


def _attribute_one(
    adapter: PyHealthAdapter,
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
    """One method on one batch: attributions -> masked feature dict on the CPU; time added to ``seconds``."""
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
    adapter: PyHealthAdapter, attributions: Tensor | tuple[Tensor, ...], masks: Sequence[Tensor]
) -> dict[str, Tensor]:
    """``adapter.to_feature_dict`` with every score on padding set to zero, on the CPU."""
    scores = adapter.to_feature_dict(attributions)
    out = {}
    for key, mask in zip(adapter.feature_keys, masks):
        s = scores[key]
        if tuple(s.shape) != tuple(mask.shape):
            raise ValueError(f"scores for {key!r} have shape {tuple(s.shape)}, the codes {tuple(mask.shape)}")
        out[key] = (s * mask.to(s.device)).detach().cpu()
    return out


def method_specs(adapter: PyHealthAdapter, methods: Sequence[MethodSpec]) -> list[tuple[str, Attribution, dict]]:
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
                "on the same PyHealthAdapter, e.g. IntegratedGradients(adapter)"
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


def _as_inputs(adapter: PyHealthAdapter, inputs: Any) -> tuple[Tensor, ...]:
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    if len(inputs) != len(adapter.feature_keys) or not all(isinstance(x, Tensor) for x in inputs):
        raise ValueError(
            f"expected {len(adapter.feature_keys)} input tensors (one per feature key {adapter.feature_keys}); "
            "make them with adapter.captum_inputs(batch)"
        )
    return inputs


def _cat_padded(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Concatenate per-batch dicts along the batch, zero-padding code dims to the largest."""
    if not parts:
        return {}
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
    return out


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
        adapter: PyHealthAdapter,
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
        masks = self.adapter.code_masks(args)
        seconds = {self.name: 0.0}
        scores = _attribute_one(
            self.adapter, self.method, self.kwargs, embeddings, tokens, args, masks, target, self.baseline, seconds,
            self.name,
        )
        device = self.adapter.model.device
        return {key: value.to(device) for key, value in scores.items()}
