"""Pure tensor math of Chefer et al.'s relevance propagation for self-attention.

Chefer, Gur and Wolf, "Generic Attention-model Explainability for Interpreting Bi-Modal and
Encoder-Decoder Transformers", ICCV 2021 (arXiv 2103.15679), rule (6) for self-attention:

    A_bar_k = E_h[ max(0, grad A_k * A_k) ]          (gradient-weighted attention, heads averaged)
    R      <- R + A_bar_k @ R                          (for k = 1 .. n, R starting at the identity)

so that ``R = (I + A_bar_n) ... (I + A_bar_1)``. A classifier only reads one row of ``R``, the row
``p`` of the position it pools, and that row is ``e_p^T (I + A_bar_n) ... (I + A_bar_1)``: a vector
times matrices, taken from the last layer down. That costs ``O(L^2)`` per layer instead of the
``O(L^3)`` of the dense product, and the last layer's gradient is also the first the backward pass
delivers, so the row can be updated as gradients arrive (:func:`propagate_row`).

Nothing here knows about ``nn.Module``, Captum or PyHealth: tensors in, tensors out.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch
from torch import Tensor

HeadReduction = Literal["mean", "max"]

__all__ = [
    "HeadReduction",
    "weighted_attention",
    "propagate_row",
    "propagate_weighted_row",
    "pooling_rows",
    "dense_relevance",
    "read_rows",
]


def weighted_attention(
    attention: Tensor,
    gradient: Optional[Tensor],
    *,
    use_gradient: bool = True,
    clamp: bool = True,
    head_reduction: HeadReduction = "mean",
) -> Tensor:
    """Gradient-weighted, clamped, head-reduced attention ``A_bar`` of one layer.

    Args:
        attention: attention probabilities ``[B, H, L, L]`` (or ``[B, L, L]``, one head).
        gradient: gradient of the explained logit with respect to ``attention``, same shape, or
            ``None`` where no gradient reached the layer (it then contributes nothing).
        use_gradient: ``False`` drops the gradient weighting (attention only; an ablation).
        clamp: ``False`` keeps negative products (an ablation; the paper clamps at zero).
        head_reduction: ``"mean"`` (the paper) or ``"max"`` over heads.

    Returns:
        ``[B, L, L]``.

    Example:
        >>> a = torch.tensor([[[0.5, 0.5], [0.0, 1.0]]])
        >>> g = torch.tensor([[[2.0, -2.0], [1.0, 1.0]]])
        >>> weighted_attention(a, g)
        tensor([[[1., 0.],
                 [0., 1.]]])
    """
    if gradient is not None and gradient.shape != attention.shape:
        raise ValueError(
            f"attention {tuple(attention.shape)} and its gradient {tuple(gradient.shape)} differ in shape"
        )
    if attention.dim() == 3:
        attention = attention.unsqueeze(1)
        gradient = None if gradient is None else gradient.unsqueeze(1)
    if attention.dim() != 4:
        raise ValueError(f"attention must be [B, H, L, L] or [B, L, L], got {tuple(attention.shape)}")
    if use_gradient:
        if gradient is None:
            return attention.new_zeros(attention.shape[0], *attention.shape[2:])
        weighted = attention * gradient
    else:
        weighted = attention
    if clamp:
        weighted = weighted.clamp(min=0)
    if head_reduction == "mean":
        return weighted.mean(dim=1)
    if head_reduction == "max":
        return weighted.amax(dim=1)
    raise ValueError(f"head_reduction must be 'mean' or 'max', got {head_reduction!r}")


def propagate_row(row: Tensor, weighted: Tensor) -> Tensor:
    """One layer of the row recursion: ``r <- r (I + A_bar) = r + r A_bar``.

    Args:
        row: ``[B, L]``, the pooling row of the layers above (``e_p`` before the last layer).
        weighted: ``[B, L, L]`` from :func:`weighted_attention`.

    Returns:
        ``[B, L]``.

    Example:
        >>> propagate_row(torch.tensor([[1.0, 0.0]]), torch.tensor([[[0.5, 0.5], [0.0, 1.0]]]))
        tensor([[1.5000, 0.5000]])
    """
    return row + torch.bmm(row.unsqueeze(1), weighted).squeeze(1)


def propagate_weighted_row(
    row: Optional[Tensor],
    attention: Tensor,
    gradient: Optional[Tensor],
    *,
    use_gradient: bool = True,
    clamp: bool = True,
    head_reduction: HeadReduction = "mean",
    unit_index: Optional[Tensor] = None,
) -> Tensor:
    """``propagate_row(row, weighted_attention(attention, gradient))`` with less memory traffic.

    The fused backward pass calls this once per layer, so it avoids forming ``A_bar``: the product
    ``A * grad`` is clamped in place and the head mean is folded into one ``baddbmm``
    (``r A_bar = (1/H) sum_h r W_h``). Where ``row`` is still the unit row ``e_p`` (the last layer,
    the first one the backward pass reaches), ``unit_index`` gives ``p`` and only row ``p`` of each
    head is read: ``e_p (I + A_bar) = e_p + A_bar[p]``. That layer's attention may then be given for
    row ``p`` alone (``[B, H, 1, L]``), as a model computes it when it evaluates its last layer for the
    pooled position only.

    Args:
        row: ``[B, L]``; ignored (taken as ``e_p``) when ``unit_index`` is given.
        attention: ``[B, H, L, L]`` (or ``[B, L, L]``) attention probabilities (not modified); with
            ``unit_index``, also ``[B, H, 1, L]`` (or ``[B, 1, L]``): each sample's row ``p`` alone.
        gradient: their gradient, same shape (not modified); ``None`` where no gradient reached the
            layer (it then adds nothing) or with ``use_gradient=False``.
        use_gradient: ``False`` weights by the attention alone (an ablation).
        clamp: clamp negative products at zero (the paper).
        head_reduction: ``"mean"`` or ``"max"`` over heads.
        unit_index: ``[B]`` positions ``p`` if ``row`` is ``e_p``.

    Returns:
        ``[B, L]``, equal to ``propagate_row(row, weighted_attention(attention, gradient, ...))``.

    Example:
        >>> a = torch.tensor([[[[0.5, 0.5], [0.0, 1.0]]]])
        >>> g = torch.tensor([[[[2.0, -2.0], [1.0, 1.0]]]])
        >>> propagate_weighted_row(torch.tensor([[0.5, 1.0]]), a, g)
        tensor([[1., 2.]])
        >>> propagate_weighted_row(None, a, g, unit_index=torch.tensor([0]))
        tensor([[2., 0.]])
        >>> propagate_weighted_row(None, a[:, :, :1], g[:, :, :1], unit_index=torch.tensor([0]))  # row p alone
        tensor([[2., 0.]])
    """
    if attention.dim() not in (3, 4) or (gradient is not None and gradient.shape != attention.shape):
        raise ValueError(
            f"attention and gradient must both be [B, H, L, L] or [B, L, L]; got {tuple(attention.shape)} and "
            f"{None if gradient is None else tuple(gradient.shape)}"
        )
    if attention.dim() == 3:
        attention = attention.unsqueeze(1)
        gradient = None if gradient is None else gradient.unsqueeze(1)
    batch, heads, queries, length = attention.shape
    if use_gradient and gradient is None:  # no gradient reached the layer: A_bar = 0
        return pooling_rows(unit_index, length, attention.dtype) if unit_index is not None else row
    if unit_index is not None:
        index = unit_index.long().to(attention.device)
        if queries not in (1, length):
            raise ValueError(f"attention must be [B, H, L, L] or [B, H, 1, L] (row p alone); got {tuple(attention.shape)}")
        if queries == length:
            rows: tuple = (torch.arange(batch, device=attention.device), slice(None), index)
        else:
            rows = (slice(None), slice(None), 0)
        attention = attention[rows]  # [B, H, L]: row p of each head
        gradient = None if gradient is None else gradient[rows]
        weighted = attention * gradient if use_gradient else attention
        if clamp:
            weighted = weighted.clamp(min=0)
        reduced = weighted.mean(dim=1) if head_reduction == "mean" else weighted.amax(dim=1)
        return pooling_rows(index, length, reduced.dtype) + reduced
    if queries != length:
        raise ValueError(
            f"attention of shape {tuple(attention.shape)} is not square: only the last layer may be given for the "
            "pooled row alone"
        )
    if head_reduction != "mean" or not use_gradient:
        weighted = weighted_attention(attention, gradient, use_gradient=use_gradient, clamp=clamp, head_reduction=head_reduction)
        return propagate_row(row, weighted)
    weighted = attention * gradient
    if clamp:
        weighted.clamp_(min=0)
    left = row.unsqueeze(1)
    spread = left if heads == 1 else left.repeat(1, 1, heads)  # [B, 1, H*L]: r once per head
    product = torch.baddbmm(left, spread, weighted.reshape(batch, heads * length, length), alpha=1.0 / heads)
    return product.squeeze(1)


def pooling_rows(pool_index: Tensor, length: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The unit rows ``e_p`` ``[B, L]`` for each sample's pooling position ``p`` (``[B]``)."""
    rows = torch.zeros(pool_index.shape[0], length, dtype=dtype, device=pool_index.device)
    rows.scatter_(1, pool_index.long().view(-1, 1), 1.0)
    return rows


def dense_relevance(weighted_layers: Sequence[Tensor]) -> Tensor:
    """The full relevance matrix ``R = (I + A_bar_n) ... (I + A_bar_1)``, ``[B, L, L]``.

    The dense ``O(L^3)`` computation of the paper (and of PyHealth's ``CheferRelevance``), kept as the
    reference that the row recursion is tested against.

    Args:
        weighted_layers: ``A_bar_k`` of each layer, first (closest to the input) to last.

    Example:
        >>> a = torch.tensor([[[0.5, 0.5], [0.0, 1.0]]])
        >>> dense_relevance([a, a])
        tensor([[[2.2500, 1.7500],
                 [0.0000, 4.0000]]])
    """
    if not weighted_layers:
        raise ValueError("dense_relevance needs at least one layer")
    first = weighted_layers[0]
    batch, length = first.shape[0], first.shape[-1]
    relevance = torch.eye(length, dtype=first.dtype, device=first.device).expand(batch, length, length)
    for weighted in weighted_layers:
        relevance = relevance + torch.bmm(weighted, relevance)
    return relevance


def read_rows(relevance: Tensor, pool_index: Tensor) -> Tensor:
    """Row ``pool_index[b]`` of ``relevance[b]`` for each sample: ``[B, L, L]`` -> ``[B, L]``."""
    batch = torch.arange(relevance.shape[0], device=relevance.device)
    return relevance[batch, pool_index.long().to(relevance.device)]
