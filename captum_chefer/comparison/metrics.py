"""Scoring attributions: faithfulness by removing codes, localization against ground truth, Captum metrics.

Everything works on per-code scores, ``{feature key: [B, L] or [B, V, C]}`` shaped like the batch's
code ids (``adapter.to_feature_dict`` or ``Comparison.scores[method]``), so every method is judged the
same way whatever its input level.

* **Curves** (:func:`removal_curves`): codes are ranked by score, highest first (ties broken by a
  seeded random order, not by position); the *deletion* curve is the explained output after removing
  the top fraction ``f`` of each sample's codes, the *insertion* curve after keeping only them
  (removal through :class:`~captum_chefer.comparison.removal.TokenRemover`).
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
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from captum.attr import Attribution
from captum.log import log_usage
from torch import Tensor

from .methods import ig_baselines, is_ig_like, masked_feature_dict
from .removal import Remover, TokenRemoval

__all__ = [
    "DEFAULT_FRACTIONS",
    "DEFAULT_PERCENTAGES",
    "RandomAttribution",
    "RemovalCurves",
    "attribution_sensitivity",
    "comprehensiveness",
    "localization_auroc",
    "precision_at_k",
    "rank_codes",
    "removal_curves",
    "sufficiency",
    "token_infidelity",
]

Scores = Mapping[str, Tensor]
DEFAULT_FRACTIONS: tuple[float, ...] = tuple(i / 10 for i in range(11))
DEFAULT_PERCENTAGES: tuple[float, ...] = (0.1, 0.2, 0.5)


# ---------------------------------------------------------------------------------------------- ranking


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
        raise KeyError(
            f"no entry for feature(s) {missing}: got entries for {list(scores)}, but the codes' feature keys are "
            f"{list(real)}; pass one entry per feature key (adapter.to_feature_dict, Comparison.scores[method] or a "
            "ground-truth mask)"
        )
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
    batch: Any,
    scores: Scores,
    target: Optional[Tensor] = None,
    *,
    n_perturb_samples: int = 10,
    fraction: float = 0.3,
    seed: int = 0,
    compact: bool = True,
) -> Tensor:
    """``[B]`` Captum ``infidelity`` of per-code scores, perturbing by removing random codes.

    The perturbation and the forward function are :class:`~captum_chefer.comparison.removal.TokenRemoval`
    (each real code removed with probability ``fraction``, the rest moved to the front with ``compact``),
    so every removal metric here removes codes the same way. ``normalize=True``: the scores are
    rescaled by the least-squares factor first, so methods with different scales compare. The output
    compared is the target logit. Lower is better.
    """
    from captum.metrics import infidelity

    tokens, args = adapter.captum_inputs(batch, level="token")
    real = dict(zip(adapter.feature_keys, adapter.token_masks(args, tokens)))
    _check_scores(scores, real)
    attributions = tuple(scores[k].detach().float().to(t.device) for k, t in zip(adapter.feature_keys, tokens))
    removal = TokenRemoval(adapter, fraction, torch.Generator().manual_seed(seed), compact=compact)
    return infidelity(
        removal.forward_func, removal, tokens, attributions,
        additional_forward_args=args, target=target, n_perturb_samples=n_perturb_samples, normalize=True,
    ).detach().cpu()


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

    embeddings, args = adapter.captum_inputs(batch, level="embedding")
    kwargs = dict(attribute_kwargs or {})
    if is_ig_like(method) and "baselines" not in kwargs:
        kwargs["baselines"] = ig_baselines(adapter, embeddings, args, reference=baseline)

    def explain(inputs: Any, target: Any = None, additional_forward_args: Any = None, **kw: Any) -> tuple[Tensor, ...]:
        with warnings.catch_warnings():  # Captum notes that it set requires_grad on the inputs itself
            warnings.filterwarnings("ignore", message=r"Input Tensor \d+ did not already require gradients")
            attributions = method.attribute(inputs, target=target, additional_forward_args=additional_forward_args, **kw)
        masks = adapter.token_masks(additional_forward_args, inputs)
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
