"""Evaluating attributions: faithfulness by removing codes, localization against ground truth, Captum metrics.

Everything works on per-code scores, ``{feature key: [B, L] or [B, V, C]}`` shaped like the batch's
code ids (``adapter.to_feature_dict`` or ``Comparison.scores[method]``), so every method is judged the
same way whatever its input level.

* **Removal** (:class:`TokenRemover`): removing a code makes it padding (its id the pad id, its mask
  ``False``) and, by default, the remaining codes are moved to the front (``compact=True``), as the
  batch would look had the patient never had the code. PyHealth's ``Transformer`` pools its *first*
  position; without compaction, removing the first code makes the model pool a padding position,
  which changes the output for a reason unrelated to the code (compare both in notebook 03).
* **Curves** (:func:`removal_curves`): codes are ranked by score, highest first (ties broken by a
  seeded random order, not by position); the *deletion* curve is the explained output after removing
  the top fraction ``f`` of each sample's codes, the *insertion* curve after keeping only them.
  ``k = ceil(f * n)`` codes of a sample with ``n`` real codes. AOPC (Samek et al. 2017) is the mean
  over the fraction grid of ``full - deletion(f)`` and of ``insertion(f) - empty``: higher is better
  for both.
* **Comprehensiveness / sufficiency** (DeYoung et al. 2020, ERASER) at chosen fractions:
  ``full - deletion(f)`` (higher better) and ``full - insertion(f)`` (lower better).
* **Localization** against planted ground truth: :func:`precision_at_k` (the expected precision
  under random tie-breaking, ``k`` = number of true codes by default) and :func:`localization_auroc`
  (probability that a true code outscores a false one, ties counting half).
* **Captum metrics**: :func:`token_infidelity` (``captum.metrics.infidelity`` with token removal) and
  :func:`attribution_sensitivity` (``captum.metrics.sensitivity_max`` on the embeddings).
* :class:`RandomAttribution`: a random baseline that every metric should beat.
* :func:`evaluate_methods`: all of the above for several methods over a batch or a ``DataLoader``,
  with wall time per sample, returned as an :class:`Evaluation` (tables, CSV, JSON).

The explained output is the *probability* of the target (``sigmoid`` of the single logit of a binary
model, ``softmax[target]`` otherwise), or the logit with ``output="logit"``.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Optional, Protocol, Sequence

import torch
from captum.attr import Attribution
from captum.log import log_usage
from torch import Tensor

__all__ = [
    "DEFAULT_FRACTIONS",
    "DEFAULT_PERCENTAGES",
    "Evaluation",
    "RandomAttribution",
    "RemovalCurves",
    "Remover",
    "TokenRemover",
    "attribution_sensitivity",
    "comprehensiveness",
    "evaluate_methods",
    "localization_auroc",
    "precision_at_k",
    "rank_codes",
    "removal_curves",
    "sufficiency",
    "token_infidelity",
]

Output = Literal["probability", "logit"]
Scores = Mapping[str, Tensor]
DEFAULT_FRACTIONS: tuple[float, ...] = tuple(i / 10 for i in range(11))
DEFAULT_PERCENTAGES: tuple[float, ...] = (0.1, 0.2, 0.5)


# ---------------------------------------------------------------------------------------------- removal


class Remover(Protocol):
    """What the removal metrics need: which codes are real, and the explained output once some are removed.

    ``real``: ``{feature key: bool tensor}`` shaped like the code ids. Calling it with ``keep`` (a
    dict of the same shapes, ``True`` on codes to keep) returns the explained output per sample ``[B]``.
    """

    real: dict[str, Tensor]

    def __call__(self, keep: Mapping[str, Tensor]) -> Tensor: ...


def _explained_output(logits: Tensor, target: Optional[Tensor], output: Output) -> Tensor:
    if logits.shape[1] == 1:
        if target is not None and bool((torch.as_tensor(target) != 0).any()):
            raise ValueError("a single-logit (binary) model explains its one output: target must be None or 0")
        value = logits[:, 0]
        return torch.sigmoid(value) if output == "probability" else value
    if target is None:
        raise ValueError(f"target is required for a model with {logits.shape[1]} outputs")
    index = torch.as_tensor(target, device=logits.device).long().reshape(-1)
    if index.numel() == 1:
        index = index.expand(logits.shape[0])
    values = logits.softmax(dim=1) if output == "probability" else logits
    return values.gather(1, index.view(-1, 1))[:, 0]


class TokenRemover:
    """Remove codes from a batch through a :class:`~captum_chefer.PyHealthAdapter`; read the explained output.

    Args:
        adapter: the adapter of the model.
        batch: a batch dict from ``pyhealth.datasets.get_dataloader``.
        target: the explained class, as for Captum (``None`` for a binary model; a ``[B]`` tensor
            or an int otherwise), e.g. ``adapter.captum_target(batch)``.
        output: ``"probability"`` (default) or ``"logit"``.
        compact: move the kept codes (flat streams) or the non-empty visits (nested streams) to the
            front, so the model pools a real code whenever one is left (see the module docstring).

    Example:
        >>> from captum_chefer import PyHealthAdapter
        >>> from captum_chefer.synthetic import toy_model_and_batch
        >>> model, batch = toy_model_and_batch()
        >>> remover = TokenRemover(PyHealthAdapter(model), batch)
        >>> keep_all = {key: mask.clone() for key, mask in remover.real.items()}
        >>> torch.allclose(remover(keep_all), remover.full)
        True
    """

    def __init__(
        self,
        adapter: Any,
        batch: Mapping[str, Any],
        target: Optional[Tensor | int] = None,
        *,
        output: Output = "probability",
        compact: bool = True,
    ) -> None:
        if output not in ("probability", "logit"):
            raise ValueError(f"output must be 'probability' or 'logit', got {output!r}")
        self.adapter = adapter
        self.target = target
        self.output: Output = output
        self.compact = compact
        tokens, args = adapter.captum_inputs(batch, level="token")
        self._tokens = tokens
        self._args = args
        self.real: dict[str, Tensor] = {key: args[m].bool() for key, m, _, _ in _layout(adapter)}
        with torch.no_grad():
            self.full = self(self.real)
            self.empty = self({k: torch.zeros_like(v) for k, v in self.real.items()})

    def __call__(self, keep: Mapping[str, Tensor]) -> Tensor:
        for key, real in self.real.items():
            if key not in keep:
                raise KeyError(f"keep has no mask for feature {key!r}")
            if tuple(keep[key].shape) != tuple(real.shape):
                raise ValueError(f"keep[{key!r}] has shape {tuple(keep[key].shape)}, the codes {tuple(real.shape)}")
        tokens, args = _remove_codes(self.adapter, self._tokens, self._args, keep, self.compact)
        with torch.no_grad():
            logits = self.adapter(*tokens, *args)
        return _explained_output(logits, self.target, self.output).detach().cpu()


def _layout(adapter: Any) -> list[tuple[str, int, Optional[int], int]]:
    """Per feature: (key, index of its mask in the args, index of its times or None, pad id)."""
    layout, position = [], 0
    for feature in adapter.features:
        layout.append((feature.key, position, position + 1 if feature.temporal else None, feature.pad_id))
        position += 2 if feature.temporal else 1
    return layout


def _remove_codes(
    adapter: Any, tokens: Sequence[Tensor], args: Sequence[Tensor], keep: Mapping[str, Tensor], compact: bool
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Token inputs and args with the codes outside ``keep`` made padding (and, with ``compact``,
    the kept codes / non-empty visits moved to the front, in their order)."""
    tokens, args = list(tokens), list(args)
    for i, (key, m, t, pad) in enumerate(_layout(adapter)):
        kept = keep[key].to(tokens[i].device).bool() & args[m].bool()
        ids = torch.where(kept, tokens[i], torch.full_like(tokens[i], pad))
        times = args[t] if t is not None else None
        if compact:
            step = kept.any(dim=-1) if kept.dim() == 3 else kept
            order = torch.argsort((~step).to(torch.int8), dim=1, stable=True)
            gather = order.view(*order.shape, *([1] * (kept.dim() - 2))).expand_as(kept)
            ids, kept = ids.gather(1, gather), kept.gather(1, gather)
            if times is not None:
                times = times.gather(1, order)
        tokens[i], args[m] = ids, kept
        if t is not None:
            args[t] = times
    return tuple(tokens), tuple(args)


def _flatten(tensors: Mapping[str, Tensor], keys: Sequence[str]) -> Tensor:
    return torch.cat([tensors[k].reshape(tensors[k].shape[0], -1) for k in keys], dim=1)


def _unflatten(flat: Tensor, like: Mapping[str, Tensor], keys: Sequence[str]) -> dict[str, Tensor]:
    out, start = {}, 0
    for k in keys:
        size = math.prod(like[k].shape[1:])
        out[k] = flat[:, start : start + size].reshape(like[k].shape)
        start += size
    return out


def _check_scores(scores: Scores, real: Mapping[str, Tensor]) -> None:
    missing = [k for k in real if k not in scores]
    if missing:
        raise KeyError(f"scores have no entry for feature(s) {missing}; expected {sorted(real)}")
    for k, mask in real.items():
        if tuple(scores[k].shape) != tuple(mask.shape):
            raise ValueError(
                f"scores[{k!r}] has shape {tuple(scores[k].shape)} but the codes are {tuple(mask.shape)}; "
                "pass per-code scores of the same batch (adapter.to_feature_dict or Comparison.scores[method])"
            )


def rank_codes(scores: Scores, real: Mapping[str, Tensor], *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Rank each sample's real codes by score, highest first, all feature streams together.

    Ties are broken by a random order drawn from ``seed`` (not by position, which PyHealth's
    ``Transformer`` treats specially).

    Returns:
        ``(rank, n_real)``: ``rank`` ``[B, N]`` over the flattened codes of all streams (0 = the most
        relevant; padding ranks after every real code), ``n_real`` ``[B]``.

    Example:
        >>> rank, n = rank_codes({"x": torch.tensor([[0.1, 0.9, 0.5, 0.0]])},
        ...                      {"x": torch.tensor([[True, True, True, False]])})
        >>> rank.tolist(), n.tolist()
        ([[2, 0, 1, 3]], [3])
    """
    _check_scores(scores, real)
    keys = list(real)
    s = _flatten({k: scores[k].detach().float().cpu() for k in keys}, keys)
    r = _flatten({k: real[k].bool().cpu() for k in keys}, keys)
    s = torch.where(r, s, torch.full_like(s, -math.inf))
    s = torch.nan_to_num(s, nan=-math.inf, posinf=math.inf)
    generator = torch.Generator().manual_seed(seed)
    order = torch.argsort(torch.rand(s.shape, generator=generator), dim=1)  # random order: the tie-breaker
    order = order.gather(1, torch.argsort(s.gather(1, order), dim=1, descending=True, stable=True))
    order = order.gather(1, torch.argsort((~r).gather(1, order).to(torch.int8), dim=1, stable=True))  # padding last
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order).contiguous())
    return rank, r.sum(dim=1)


def _top_k(f: float, n_real: Tensor) -> Tensor:
    return torch.ceil(f * n_real.double() - 1e-9).clamp(min=0).long().minimum(n_real)


@dataclass
class RemovalCurves:
    """Deletion and insertion curves of a batch.

    Attributes:
        fractions: the grid ``[F]`` of removed (deletion) or kept (insertion) fractions.
        full: ``[B]`` the output with every code; ``empty``: with none.
        deletion: ``[B, F]`` after removing the top ``f`` of the codes; insertion: ``[B, F]`` after
            keeping only them.
    """

    fractions: Tensor
    full: Tensor
    empty: Tensor
    deletion: Tensor
    insertion: Tensor

    @property
    def deletion_aopc(self) -> Tensor:
        """``[B]``: mean over the grid of ``full - deletion(f)`` (higher: the top codes matter more)."""
        return (self.full.unsqueeze(1) - self.deletion).mean(dim=1)

    @property
    def insertion_aopc(self) -> Tensor:
        """``[B]``: mean over the grid of ``insertion(f) - empty`` (higher: the top codes suffice sooner)."""
        return (self.insertion - self.empty.unsqueeze(1)).mean(dim=1)


def _masks_at(rank: Tensor, n_real: Tensor, f: float, real_flat: Tensor) -> tuple[Tensor, Tensor]:
    top = rank < _top_k(f, n_real).unsqueeze(1)
    return real_flat & ~top, real_flat & top  # (deletion keep, insertion keep)


def removal_curves(
    remover: Remover, scores: Scores, fractions: Sequence[float] = DEFAULT_FRACTIONS, *, seed: int = 0
) -> RemovalCurves:
    """Deletion and insertion curves (and their AOPC) of ``scores`` on the remover's batch.

    Example (an additive "model" whose output is the sum of the kept codes' weights):
        >>> class Additive:
        ...     real = {"x": torch.tensor([[True, True, True, True]])}
        ...     def __call__(self, keep):
        ...         return (keep["x"].float() * torch.tensor([[4.0, 3.0, 2.0, 1.0]])).sum(1)
        >>> curves = removal_curves(Additive(), {"x": torch.tensor([[4.0, 3.0, 2.0, 1.0]])},
        ...                         fractions=[0, 0.25, 0.5, 0.75, 1])
        >>> curves.deletion.tolist(), curves.insertion.tolist()
        ([[10.0, 6.0, 3.0, 1.0, 0.0]], [[0.0, 4.0, 7.0, 9.0, 10.0]])
        >>> float(curves.deletion_aopc[0]), float(curves.insertion_aopc[0])
        (6.0, 6.0)
    """
    fractions = [float(f) for f in fractions]
    if not fractions or any(not 0.0 <= f <= 1.0 for f in fractions):
        raise ValueError(f"fractions must be a non-empty list of numbers in [0, 1], got {fractions}")
    real = remover.real
    keys = list(real)
    rank, n_real = rank_codes(scores, real, seed=seed)
    real_flat = _flatten({k: real[k].bool().cpu() for k in keys}, keys)
    full = remover({k: v.clone() for k, v in real.items()})
    empty = remover({k: torch.zeros_like(v) for k, v in real.items()})
    deletion, insertion = [], []
    for f in fractions:
        delete_keep, insert_keep = _masks_at(rank, n_real, f, real_flat)
        deletion.append(remover(_unflatten(delete_keep, real, keys)))
        insertion.append(remover(_unflatten(insert_keep, real, keys)))
    return RemovalCurves(
        torch.tensor(fractions), full.float(), empty.float(), torch.stack(deletion, 1).float(), torch.stack(insertion, 1).float()
    )


def comprehensiveness(
    remover: Remover, scores: Scores, percentages: Sequence[float] = DEFAULT_PERCENTAGES, *, seed: int = 0
) -> Tensor:
    """``[B, P]``: the drop of the output when the top ``p`` of the codes are removed (higher: more faithful).

    Example:
        >>> class Additive:
        ...     real = {"x": torch.tensor([[True, True, True, True]])}
        ...     def __call__(self, keep):
        ...         return (keep["x"].float() * torch.tensor([[4.0, 3.0, 2.0, 1.0]])).sum(1)
        >>> comprehensiveness(Additive(), {"x": torch.tensor([[1.0, 2.0, 3.0, 4.0]])}, [0.25, 0.5]).tolist()
        [[1.0, 3.0]]
    """
    curves = removal_curves(remover, scores, percentages, seed=seed)
    return curves.full.unsqueeze(1) - curves.deletion


def sufficiency(
    remover: Remover, scores: Scores, percentages: Sequence[float] = DEFAULT_PERCENTAGES, *, seed: int = 0
) -> Tensor:
    """``[B, P]``: the drop of the output when only the top ``p`` of the codes are kept (lower: more sufficient).

    Example:
        >>> class Additive:
        ...     real = {"x": torch.tensor([[True, True, True, True]])}
        ...     def __call__(self, keep):
        ...         return (keep["x"].float() * torch.tensor([[4.0, 3.0, 2.0, 1.0]])).sum(1)
        >>> sufficiency(Additive(), {"x": torch.tensor([[4.0, 3.0, 2.0, 1.0]])}, [0.25, 0.5]).tolist()
        [[6.0, 3.0]]
    """
    curves = removal_curves(remover, scores, percentages, seed=seed)
    return curves.full.unsqueeze(1) - curves.insertion


# ---------------------------------------------------------------------------------------------- localization


def _localization_inputs(scores: Scores, truth: Mapping[str, Tensor], real: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    _check_scores(scores, real)
    _check_scores(truth, real)
    keys = list(real)
    s = _flatten({k: scores[k].detach().float().cpu() for k in keys}, keys)
    t = _flatten({k: truth[k].bool().cpu() for k in keys}, keys)
    r = _flatten({k: real[k].bool().cpu() for k in keys}, keys)
    return s, t & r, r


def precision_at_k(
    scores: Scores, truth: Mapping[str, Tensor], real: Mapping[str, Tensor], k: Optional[int] = None
) -> Tensor:
    """``[B]``: share of true codes among the ``k`` highest-scored real codes (NaN without a true code).

    ``k=None`` uses each sample's number of true codes (R-precision). Ties at the cut-off are resolved
    in expectation over random tie-breaking: a score tied with the ``k``-th contributes the tied
    group's share of true codes, so methods that give many codes one value are not flattered by an
    arbitrary order.

    Example:
        >>> real = {"x": torch.tensor([[True, True, True, True]])}
        >>> truth = {"x": torch.tensor([[True, False, True, False]])}
        >>> precision_at_k({"x": torch.tensor([[0.9, 0.1, 0.8, 0.2]])}, truth, real).tolist()
        [1.0]
        >>> precision_at_k({"x": torch.tensor([[0.1, 0.9, 0.2, 0.8]])}, truth, real).tolist()
        [0.0]
        >>> precision_at_k({"x": torch.tensor([[1.0, 1.0, 1.0, 1.0]])}, truth, real).tolist()
        [0.5]
    """
    if k is not None and (not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be a positive int or None, got {k!r}")
    s, t, r = _localization_inputs(scores, truth, real)
    out = torch.full((s.shape[0],), math.nan)
    for i in range(s.shape[0]):
        si, ti = s[i][r[i]], t[i][r[i]]
        n_true = int(ti.sum())
        if n_true == 0 or si.numel() == 0:
            continue
        kk = min(k if k is not None else n_true, si.numel())
        threshold = torch.sort(si, descending=True).values[kk - 1]
        above, tied = si > threshold, si == threshold
        hits = float(ti[above].sum()) + (kk - int(above.sum())) * float(ti[tied].float().mean())
        out[i] = hits / kk
    return out


def localization_auroc(scores: Scores, truth: Mapping[str, Tensor], real: Mapping[str, Tensor]) -> Tensor:
    """``[B]``: AUROC of the scores separating true from other real codes (NaN unless both exist).

    Example:
        >>> real = {"x": torch.tensor([[True, True, True, False]])}
        >>> truth = {"x": torch.tensor([[True, False, False, False]])}
        >>> localization_auroc({"x": torch.tensor([[3.0, 1.0, 2.0, 9.0]])}, truth, real).tolist()
        [1.0]
        >>> localization_auroc({"x": torch.tensor([[1.0, 1.0, 2.0, 0.0]])}, truth, real).tolist()
        [0.25]
    """
    s, t, r = _localization_inputs(scores, truth, real)
    out = torch.full((s.shape[0],), math.nan)
    for i in range(s.shape[0]):
        pos, neg = s[i][t[i]], s[i][r[i] & ~t[i]]
        if pos.numel() == 0 or neg.numel() == 0:
            continue
        diff = pos.unsqueeze(1) - neg.unsqueeze(0)
        out[i] = float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())
    return out


# ---------------------------------------------------------------------------------------------- Captum metrics


def token_infidelity(
    adapter: Any,
    batch: Mapping[str, Any],
    scores: Scores,
    target: Optional[Tensor] = None,
    *,
    n_perturb_samples: int = 10,
    fraction: float = 0.3,
    seed: int = 0,
    compact: bool = True,
) -> Tensor:
    """``[B]`` Captum ``infidelity`` of per-code scores, perturbing by removing random codes.

    The perturbation is :func:`captum_chefer.side_by_side.token_removal_perturbation` (each real code
    removed with probability ``fraction``, its id made padding); the forward function treats padding
    ids as removed and, with ``compact``, moves the remaining codes to the front as
    :class:`TokenRemover` does, so every removal metric here removes codes the same way.
    ``normalize=True``: the scores are rescaled by the least-squares factor first, so methods with
    different scales compare. The output compared is the target logit. Lower is better.
    """
    from captum.metrics import infidelity

    from .side_by_side import token_removal_perturbation

    tokens, args = adapter.captum_inputs(batch, level="token")
    real = dict(zip(adapter.feature_keys, (args[i].bool() for i in _mask_positions(adapter))))
    _check_scores(scores, real)
    attributions = tuple(scores[k].detach().float().to(t.device) for k, t in zip(adapter.feature_keys, tokens))
    removal = token_removal_perturbation(adapter, fraction, torch.Generator().manual_seed(seed))
    layout = _layout(adapter)

    def forward(*inputs_and_args: Tensor) -> Tensor:
        ids, extra = adapter.split_inputs(inputs_and_args)
        keep = {key: ids[i] != pad for i, (key, _, _, pad) in enumerate(layout)}
        kept_ids, kept_args = _remove_codes(adapter, ids, extra, keep, compact)
        return adapter(*kept_ids, *kept_args)

    return infidelity(
        forward, removal, tokens, attributions,
        additional_forward_args=args, target=target, n_perturb_samples=n_perturb_samples, normalize=True,
    ).detach().cpu()


def _mask_positions(adapter: Any) -> list[int]:
    positions, p = [], 0
    for feature in adapter.features:
        positions.append(p)
        p += 2 if feature.temporal else 1
    return positions


def attribution_sensitivity(
    adapter: Any,
    method: Attribution,
    batch: Mapping[str, Any],
    target: Optional[Tensor] = None,
    *,
    attribute_kwargs: Optional[Mapping[str, Any]] = None,
    n_perturb_samples: int = 5,
    perturb_radius: float = 0.02,
    baseline: str = "unk",
) -> Tensor:
    """``[B]`` Captum ``sensitivity_max`` of a method: the largest relative change of its per-code
    scores when the code embeddings move by uniform noise of radius ``perturb_radius`` (lower: more
    stable). Scores are compared per code (summed over the embedding, padding zero), relative to the
    norm of the unperturbed scores, so methods with different scales compare."""
    from captum.metrics import sensitivity_max

    from .side_by_side import ig_baselines, is_ig_like, masked_feature_dict

    embeddings, args = adapter.captum_inputs(batch, level="embedding")
    kwargs = dict(attribute_kwargs or {})
    if is_ig_like(method) and "baselines" not in kwargs:
        kwargs["baselines"] = ig_baselines(adapter, embeddings, args, reference=baseline)

    def explain(inputs: Any, target: Any = None, additional_forward_args: Any = None, **kw: Any) -> tuple[Tensor, ...]:
        with warnings.catch_warnings():  # Captum notes that it set requires_grad on the inputs itself
            warnings.filterwarnings("ignore", message=r"Input Tensor \d+ did not already require gradients")
            attributions = method.attribute(inputs, target=target, additional_forward_args=additional_forward_args, **kw)
        masks = adapter.code_masks(additional_forward_args)
        return tuple(masked_feature_dict(adapter, attributions, masks).values())

    return sensitivity_max(
        explain, embeddings, perturb_radius=perturb_radius, n_perturb_samples=n_perturb_samples,
        target=target, additional_forward_args=args, **kwargs,
    ).detach().cpu()


# ---------------------------------------------------------------------------------------------- random baseline


class RandomAttribution(Attribution):
    """Random per-code scores: the baseline every method should beat.

    Each code gets an independent uniform score in ``[0, 1)`` (spread evenly over the embedding
    dimension for embedding inputs, as Chefer's are), from a generator seeded once, so a run is
    reproducible.

    Example:
        >>> from captum_chefer import PyHealthAdapter
        >>> from captum_chefer.synthetic import toy_model_and_batch
        >>> model, batch = toy_model_and_batch()
        >>> adapter = PyHealthAdapter(model)
        >>> inputs, args = adapter.captum_inputs(batch)
        >>> scores = RandomAttribution(adapter, seed=0).attribute(inputs, additional_forward_args=args)
        >>> [tuple(s.shape) for s in scores] == [tuple(x.shape) for x in inputs]
        True
    """

    def __init__(self, forward_func: Callable[..., Tensor], seed: int = 0) -> None:
        super().__init__(forward_func)
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def get_name(cls) -> str:
        return "Random"

    def has_convergence_delta(self) -> bool:
        return False

    @log_usage()
    def attribute(self, inputs: Tensor | tuple[Tensor, ...], target: Any = None, additional_forward_args: Any = None) -> Tensor | tuple[Tensor, ...]:
        """Random scores shaped like ``inputs`` (``target`` and ``additional_forward_args`` are ignored)."""
        is_tuple = isinstance(inputs, tuple)
        out = []
        for x in inputs if is_tuple else (inputs,):
            if x.is_floating_point():
                codes = torch.rand(x.shape[:-1], generator=self.generator)
                out.append((codes / x.shape[-1]).unsqueeze(-1).expand(x.shape).to(x.device, x.dtype))
            else:
                out.append(torch.rand(x.shape, generator=self.generator).to(x.device))
        return tuple(out) if is_tuple else out[0]


# ---------------------------------------------------------------------------------------------- all together


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

    Per batch, :func:`captum_chefer.side_by_side.compare_methods` computes the per-code scores and
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

    from .side_by_side import compare_methods, method_specs

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
