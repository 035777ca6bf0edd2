"""Pure tensor math of Chefer et al.'s relevance propagation for self-attention.

Chefer, Gur and Wolf, "Generic Attention-model Explainability for Interpreting Bi-Modal and
Encoder-Decoder Transformers", ICCV 2021 (arXiv 2103.15679), rule (6) for self-attention:

    A_bar_k = E_h[ max(0, grad A_k * A_k) ]          (gradient-weighted attention, heads averaged)
    R      <- R + A_bar_k @ R                          (for k = 1 .. n, R starting at the identity)

so that ``R = (I + A_bar_n) ... (I + A_bar_1)``. A classifier only reads one row of ``R``, the row
``p`` of the position it pools, and that row is ``e_p^T (I + A_bar_n) ... (I + A_bar_1)``: a vector
times matrices, taken from the last layer down. That costs ``O(L^2)`` per layer instead of the
``O(L^3)`` of the dense product, and the last layer's gradient is also the first the backward pass
delivers, so the row can be updated as gradients arrive.

Every recursion here tracks the increment over the identity, ``D = R - I`` (for the row,
``d = r - e_p``), never ``R`` itself:

    d <- d + (e_p + d) A_bar_k  =  d + A_bar_k[p] + d A_bar_k      (row, :func:`propagate_row_increment`)
    D <- D + A_bar_k (I + D)    =  D + A_bar_k + A_bar_k D          (dense, :func:`dense_increment`)

and the identity is added only where a result includes it, at the very end. The reason is precision:
``A_bar`` is a product of attention and gradient, and with small gradients (small logits, long
sequences, deep models) its entries can be ``1e-8`` and below. Stored as ``1 + x``, such an increment
is rounded away in float32 (whose spacing at 1 is ``1.2e-7``), and what the rules take away again
(the self term with ``exclude_self``, the ``R - I`` of the normalisation below) comes back as zero or
noise; kept apart from the identity it keeps all its digits. ``e_p + d`` is still formed, but only as a
factor of a product, where its rounding costs a relative ``1e-7`` of that product. Products run in
float32 at least: half-precision maps and gradients are upcast before they are weighted, and autocast
is switched off for the products (:func:`full_precision`).

For encoder-decoder models (a decoder of query tokens ``q`` that cross-attends to input tokens ``i``)
the paper keeps three matrices, ``R_ii`` (inputs on inputs), ``R_qq`` (queries on queries) and ``R_qi``
(inputs on queries), starting at ``I``, ``I`` and ``0``. The encoder's self-attention layers update
``R_ii`` with rule (6); then each decoder layer, in forward order, applies rules (6)-(7) of its
self-attention to the pair ``(R_qq, R_qi)`` and rule (10) of its cross-attention to ``R_qi``:

    R_qq <- R_qq + A_bar R_qq,   R_qi <- R_qi + A_bar R_qi                   (6), (7)
    R_qi <- R_qi + norm(R_qq)^T A_bar_cross norm(R_ii)                       (10)
    norm(R) = (R - I) / rowsum(R - I) + I                                    (8), (9)

In increment form ``D_qq <- D_qq + A_bar (I + D_qq)`` and ``norm(R) = D / rowsum(D) + I``
(:func:`normalize_increment`); ``R_qi`` starts at zero and holds no identity. The dense computation is
:func:`dense_encoder_decoder_relevance`. Only a few rows of ``R_qi`` are read, one per explained
output position, and :func:`encoder_decoder_rows` computes them with matrix-vector products only.

Nothing here knows about ``nn.Module``, Captum or PyHealth: tensors in, tensors out.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Literal, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

HeadReduction = Literal["mean", "max"]

__all__ = [
    "HeadReduction",
    "weighted_attention",
    "full_precision",
    "propagate_row",
    "propagate_row_increment",
    "propagate_weighted_row",
    "propagate_weighted_increment",
    "pooling_rows",
    "dense_relevance",
    "dense_increment",
    "read_rows",
    "split_over_codes",
    "softmax_log_odds",
    "layer_norm_fixed_scale",
    "mask_padding",
    "normalize_relevance",
    "normalize_increment",
    "propagate_column",
    "propagate_column_increment",
    "propagate_self_attention",
    "propagate_self_attention_increment",
    "propagate_cross_attention",
    "propagate_cross_attention_increment",
    "EncoderDecoderRelevance",
    "dense_encoder_decoder_relevance",
    "EncoderDecoderRows",
    "encoder_decoder_rows",
]


def full_precision(reference: Tensor) -> AbstractContextManager:
    """A context in which autocast is off on the device of ``reference``, so products keep their dtype.

    Autocast (``torch.autocast``) runs matrix products in bfloat16 or float16, and it stays on inside
    the hooks of a backward pass started under it. The relevance's products are taken in it; on a
    device where autocast is off or unknown this is a context that does nothing.

    Example:
        >>> with torch.autocast("cpu", dtype=torch.bfloat16), full_precision(torch.ones(1)):
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.float32
    """
    kind = reference.device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return nullcontext()


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype the relevance is computed in: float32 at least (bfloat16 and float16 keep 8 and 11 bits)."""
    return torch.promote_types(dtype, torch.float32)


def _bmm(left: Tensor, right: Tensor) -> Tensor:
    """``torch.bmm`` in the wider dtype of the two (float32 at least), autocast or not."""
    dtype = _wide(torch.promote_types(left.dtype, right.dtype))
    with full_precision(left):
        return torch.bmm(left.to(dtype), right.to(dtype))


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
        ``[B, L, L]``, in float32 at least: half-precision maps and gradients are upcast first.

    Example:
        >>> a = torch.tensor([[[0.5, 0.5], [0.0, 1.0]]])
        >>> g = torch.tensor([[[2.0, -2.0], [1.0, 1.0]]])
        >>> weighted_attention(a, g)
        tensor([[[1., 0.],
                 [0., 1.]]])
        >>> weighted_attention(a.bfloat16(), g.bfloat16()).dtype
        torch.float32
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
    attention = attention.to(_wide(attention.dtype))
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

    For the pooling row, whose start ``e_p`` dwarfs small increments, use
    :func:`propagate_row_increment`.

    Args:
        row: ``[B, L]``, the pooling row of the layers above (``e_p`` before the last layer).
        weighted: ``[B, L, L]`` from :func:`weighted_attention`.

    Returns:
        ``[B, L]``.

    Example:
        >>> propagate_row(torch.tensor([[1.0, 0.0]]), torch.tensor([[[0.5, 0.5], [0.0, 1.0]]]))
        tensor([[1.5000, 0.5000]])
    """
    return row + _bmm(row.unsqueeze(1), weighted).squeeze(1)


def propagate_row_increment(increment: Tensor, weighted: Tensor, start: Tensor) -> Tensor:
    """One layer of the row recursion in increment form: ``d <- d + (s + d) A_bar``.

    A row ``r = s + d`` is kept as its start ``s`` (``e_p`` for the pooling row) and the increment ``d``
    that the layers added; ``r (I + A_bar) = s + d + (s + d) A_bar``, so the increment is updated on its
    own and ``s`` is never added to it. (``s + d`` is formed as the factor of the product only.)

    Args:
        increment: ``[B, L]``, ``d`` of the layers above (zero before the last layer).
        weighted: ``[B, L, L]`` from :func:`weighted_attention`.
        start: ``[B, L]``, ``s`` (e.g. :func:`pooling_rows`).

    Returns:
        ``[B, L]``, the new increment; the row is ``start`` plus it.

    Example:
        >>> unit, a = torch.tensor([[1.0, 0.0]]), torch.tensor([[[1e-9, 2e-9], [0.0, 1.0]]])
        >>> propagate_row_increment(torch.zeros(1, 2), a, unit)  # A_bar[0], where 1 + 1e-9 rounds to 1
        tensor([[1.0000e-09, 2.0000e-09]])
        >>> propagate_row(unit, a) - unit  # the row form loses it
        tensor([[0.0000e+00, 2.0000e-09]])
    """
    return increment + _bmm((start + increment).unsqueeze(1), weighted).squeeze(1)


def _maps_with_heads(attention: Tensor, gradient: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """``attention`` and ``gradient`` as ``[B, H, Q, L]`` (a head dimension added to ``[B, Q, L]``), checked."""
    if attention.dim() not in (3, 4) or (gradient is not None and gradient.shape != attention.shape):
        raise ValueError(
            f"attention and gradient must both be [B, H, L, L] or [B, L, L]; got {tuple(attention.shape)} and "
            f"{None if gradient is None else tuple(gradient.shape)}"
        )
    if attention.dim() == 3:
        return attention.unsqueeze(1), None if gradient is None else gradient.unsqueeze(1)
    return attention, gradient


def _add_weighted_product(
    base: Tensor, left: Tensor, attention: Tensor, gradient: Optional[Tensor], *, use_gradient: bool, clamp: bool,
    head_reduction: HeadReduction,
) -> Tensor:
    """``base + left A_bar`` for square maps ``[B, H, L, L]``, the head mean folded into one ``baddbmm``."""
    batch, heads, _, length = attention.shape
    if head_reduction != "mean" or not use_gradient:
        weighted = weighted_attention(attention, gradient, use_gradient=use_gradient, clamp=clamp, head_reduction=head_reduction)
        return base + _bmm(left.unsqueeze(1), weighted).squeeze(1)
    weighted = attention.to(_wide(attention.dtype)) * gradient
    if clamp:
        weighted.clamp_(min=0)
    dtype = torch.promote_types(weighted.dtype, base.dtype)
    left = left.to(dtype).unsqueeze(1)
    spread = left if heads == 1 else left.repeat(1, 1, heads)  # [B, 1, H*L]: the left row once per head
    stacked = weighted.to(dtype).reshape(batch, heads * length, length)  # [B, H*L, L]: the heads one below the other
    with full_precision(base):
        product = torch.baddbmm(base.to(dtype).unsqueeze(1), spread, stacked, alpha=1.0 / heads)
    return product.squeeze(1)


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

    It avoids forming ``A_bar``: the product ``A * grad`` is clamped in place and the head mean is folded
    into one ``baddbmm`` (``r A_bar = (1/H) sum_h r W_h``). Where ``row`` is still the unit row ``e_p``
    (the last layer, the first one the backward pass reaches), ``unit_index`` gives ``p`` and only row
    ``p`` of each head is read: ``e_p (I + A_bar) = e_p + A_bar[p]``. That layer's attention may then be
    given for row ``p`` alone (``[B, H, 1, L]``), as a model computes it when it evaluates its last layer
    for the pooled position only. For the pooling row below the last layer use
    :func:`propagate_weighted_increment`, which keeps small increments that ``e_p`` would round away.

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
    if unit_index is not None:
        increment = propagate_weighted_increment(
            None, attention, gradient, unit_index, use_gradient=use_gradient, clamp=clamp, head_reduction=head_reduction
        )
        return pooling_rows(unit_index.to(increment.device), increment.shape[1], increment.dtype) + increment
    if row is None:
        raise ValueError("propagate_weighted_row needs a row, or unit_index for the unit row e_p")
    attention, gradient = _maps_with_heads(attention, gradient)
    if attention.shape[-2] != attention.shape[-1]:
        raise ValueError(
            f"attention of shape {tuple(attention.shape)} is not square: only the last layer may be given for the "
            "pooled row alone"
        )
    if use_gradient and gradient is None:  # no gradient reached the layer: A_bar = 0
        return row
    return _add_weighted_product(
        row, row, attention, gradient, use_gradient=use_gradient, clamp=clamp, head_reduction=head_reduction
    )


def propagate_weighted_increment(
    increment: Optional[Tensor],
    attention: Tensor,
    gradient: Optional[Tensor],
    pool_index: Tensor,
    *,
    use_gradient: bool = True,
    clamp: bool = True,
    head_reduction: HeadReduction = "mean",
) -> Tensor:
    """One layer of the pooling row's recursion in increment form, from a layer's attention and gradient.

    ``d <- d + (e_p + d) A_bar = d + A_bar[p] + d A_bar`` for the increment ``d = r - e_p`` of the
    pooling row ``r``, without forming ``A_bar`` (as :func:`propagate_weighted_row`). ``increment=None``
    stands for ``d = 0``, the start of the recursion at the model's last layer: the result is
    ``A_bar[p]``, only row ``p`` of each head is read, and the maps may be given for that row alone
    (``[B, H, 1, L]``).

    Args:
        increment: ``[B, L]``, ``d`` of the layers above, or ``None`` at the last layer.
        attention: ``[B, H, L, L]`` (or ``[B, L, L]``) attention probabilities (not modified); with
            ``increment=None`` also ``[B, H, 1, L]`` (or ``[B, 1, L]``): each sample's row ``p`` alone.
        gradient: their gradient, same shape (not modified); ``None`` where no gradient reached the
            layer (it then adds nothing) or with ``use_gradient=False``.
        pool_index: ``[B]``, each sample's pooling position ``p``.
        use_gradient, clamp, head_reduction: as in :func:`propagate_weighted_row`.

    Returns:
        ``[B, L]``, the new increment (float32 at least); the pooling row is ``e_p`` plus it.

    Example (gradients of ``1e-9``: ``e_p`` plus the increment rounds to ``e_p`` in float32):
        >>> a = torch.tensor([[[[0.5, 0.5], [0.0, 1.0]]]])
        >>> g = torch.tensor([[[[2e-9, -2e-9], [1e-9, 1e-9]]]])
        >>> last = propagate_weighted_increment(None, a, g, torch.tensor([0]))  # A_bar[0]
        >>> last
        tensor([[1.0000e-09, 0.0000e+00]])
        >>> propagate_weighted_increment(last, a, g, torch.tensor([0]))  # d + (e_0 + d) A_bar
        tensor([[2.0000e-09, 0.0000e+00]])
    """
    attention, gradient = _maps_with_heads(attention, gradient)
    batch, _, queries, length = attention.shape
    index = pool_index.long().to(attention.device)
    missing = use_gradient and gradient is None  # no gradient reached the layer: A_bar = 0
    if increment is None:
        if queries not in (1, length):
            raise ValueError(f"attention must be [B, H, L, L] or [B, H, 1, L] (row p alone); got {tuple(attention.shape)}")
        if missing:
            return attention.new_zeros(batch, length, dtype=_wide(attention.dtype))
        if queries == length:
            rows: tuple = (torch.arange(batch, device=attention.device), slice(None), index)
        else:
            rows = (slice(None), slice(None), 0)
        picked = attention[rows].unsqueeze(2)  # [B, H, 1, L]: row p of each head
        gradient = None if gradient is None else gradient[rows].unsqueeze(2)
        reduced = weighted_attention(picked, gradient, use_gradient=use_gradient, clamp=clamp, head_reduction=head_reduction)
        return reduced[:, 0]
    if queries != length:
        raise ValueError(
            f"attention of shape {tuple(attention.shape)} is not square: only the last layer may be given for the "
            "pooled row alone"
        )
    if missing:
        return increment
    unit = pooling_rows(index, length, _wide(increment.dtype))  # e_p + d in float32 at least: a half d would round away
    return _add_weighted_product(
        increment, unit + increment, attention, gradient, use_gradient=use_gradient, clamp=clamp,
        head_reduction=head_reduction,
    )


def pooling_rows(pool_index: Tensor, length: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The unit rows ``e_p`` ``[B, L]`` for each sample's pooling position ``p`` (``[B]``)."""
    rows = torch.zeros(pool_index.shape[0], length, dtype=dtype, device=pool_index.device)
    rows.scatter_(1, pool_index.long().view(-1, 1), 1.0)
    return rows


def dense_relevance(weighted_layers: Sequence[Tensor]) -> Tensor:
    """The full relevance matrix ``R = (I + A_bar_n) ... (I + A_bar_1)``, ``[B, L, L]``.

    The dense ``O(L^3)`` computation of the paper (and of PyHealth's ``CheferRelevance``), kept as the
    reference that the row recursion is tested against: :func:`dense_increment` plus the identity.

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
    increment = dense_increment(weighted_layers)
    return increment + torch.eye(increment.shape[-1], dtype=increment.dtype, device=increment.device)


def dense_increment(weighted_layers: Sequence[Tensor]) -> Tensor:
    """``R - I`` for ``R = (I + A_bar_n) ... (I + A_bar_1)``, ``[B, L, L]``, formed without the identity.

    ``D <- D + A_bar (I + D) = D + A_bar + A_bar D``, starting at ``D = A_bar_1``; float32 at least.

    Args:
        weighted_layers: ``A_bar_k`` of each layer, first (closest to the input) to last.

    Example:
        >>> a = torch.tensor([[[0.5, 0.5], [0.0, 1.0]]])
        >>> dense_increment([a, a])  # (I + a)^2 - I = 2 a + a^2
        tensor([[[1.2500, 1.7500],
                 [0.0000, 3.0000]]])
    """
    if not weighted_layers:
        raise ValueError("dense_increment needs at least one layer")
    first = weighted_layers[0]
    increment = first.to(_wide(first.dtype), copy=True)
    for weighted in weighted_layers[1:]:
        increment = increment + weighted + _bmm(weighted, increment)
    return increment


def read_rows(relevance: Tensor, pool_index: Tensor) -> Tensor:
    """Row ``pool_index[b]`` of ``relevance[b]`` for each sample: ``[B, L, L]`` -> ``[B, L]``."""
    batch = torch.arange(relevance.shape[0], device=relevance.device)
    return relevance[batch, pool_index.long().to(relevance.device)]


# --- Encoder-decoder rules (paper, Eq. 6-10) ------------------------------------------------------


def split_over_codes(visit_relevance: Tensor, shares: Optional[Tensor], mask: Tensor) -> Tensor:
    """Each visit's relevance split over its real codes in proportion to their positive shares.

    Attention over visits scores a visit as a whole; a visit embedding that is the sum of its code
    embeddings ``e_vc`` has, to first order, the parts ``g_v . e_vc`` (``g_v`` the gradient of the
    explained output at the visit). Code ``c`` of visit ``v`` gets

        R_vc = R_v * max(0, s_vc) / sum_c' max(0, s_vc')

    and a visit none of whose real codes has a positive share gives each of its ``n_v`` real codes
    ``R_v / n_v``. Padding slots get zero, and a visit's codes always sum to its relevance (a visit
    without any real code gets nothing).

    Args:
        visit_relevance: ``[B, V]`` relevance of each visit.
        shares: ``[B, V, C]`` each code's share (e.g. ``g_v . e_vc``); only its positive part counts.
            ``None`` (no gradient reached the codes): the even split.
        mask: ``[B, V, C]`` ``True`` (or 1) on real codes.

    Returns:
        ``[B, V, C]``.

    Example (one visit of three real codes and a padding slot; relevance 2):
        >>> import torch
        >>> r = torch.tensor([[2.0]])
        >>> mask = torch.tensor([[[True, True, True, False]]])
        >>> split_over_codes(r, torch.tensor([[[3.0, 1.0, -4.0, 5.0]]]), mask).tolist()
        [[[1.5, 0.5, 0.0, 0.0]]]
        >>> split_over_codes(r, torch.tensor([[[-1.0, 0.0, -2.0, 5.0]]]), mask).tolist()  # none positive: even
        [[[0.6666666865348816, 0.6666666865348816, 0.6666666865348816, 0.0]]]
    """
    if (shares is not None and shares.shape != mask.shape) or tuple(visit_relevance.shape) != tuple(mask.shape[:2]):
        raise ValueError(
            f"split_over_codes needs visit_relevance [B, V] and shares, mask [B, V, C] of the same B, V; got "
            f"{tuple(visit_relevance.shape)}, {None if shares is None else tuple(shares.shape)}, {tuple(mask.shape)}"
        )
    real = mask.to(visit_relevance.dtype)
    even = real / real.sum(dim=-1, keepdim=True).clamp(min=1)
    if shares is None:
        return visit_relevance.unsqueeze(-1) * even
    positive = (shares.to(visit_relevance.dtype) * real).clamp(min=0)
    total = positive.sum(dim=-1, keepdim=True)
    fraction = torch.where(total > 0, positive / total.clamp(min=torch.finfo(total.dtype).tiny), even)
    return visit_relevance.unsqueeze(-1) * fraction


def softmax_log_odds(logits: Tensor, index: Tensor) -> Tensor:
    """Each sample's log-odds of class ``index[b]`` under a softmax: ``log p_t / (1 - p_t)``.

    Equals ``logit_t - logsumexp_{j != t} logit_j``, computed without forming ``p`` (no loss of
    precision, and no vanishing gradient, for a confident prediction).

    Args:
        logits: ``[B, C]``, ``C >= 2``.
        index: ``[B]`` class indices.

    Returns:
        ``[B]``.

    Example:
        >>> import math, torch
        >>> logits = torch.tensor([[2.0, 0.0, 0.0]])
        >>> p = logits.softmax(dim=1)[0, 0].item()
        >>> abs(softmax_log_odds(logits, torch.tensor([0])).item() - math.log(p / (1 - p))) < 1e-6
        True
    """
    chosen = logits.gather(1, index.view(-1, 1))
    others = logits.scatter(1, index.view(-1, 1), float("-inf")).logsumexp(dim=1, keepdim=True)
    return (chosen - others).squeeze(1)


def layer_norm_fixed_scale(
    x: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    """Layer normalisation whose standard deviation is a constant of the backward pass.

    The forward values are those of ``torch.nn.functional.layer_norm``; the gradient treats
    ``1 / std(x)`` as fixed, so it no longer removes the component along ``x`` that LayerNorm's scale
    invariance cancels (with it, the gradient at a dominant input is nearly orthogonal to it and its
    first-order share ``g . x`` nearly zero).

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0, 2.0, 4.0]], requires_grad=True)
        >>> torch.allclose(layer_norm_fixed_scale(x, (3,)), torch.nn.functional.layer_norm(x, (3,)))
        True
        >>> layer_norm_fixed_scale(x, (3,)).sum().backward()  # centring alone: the sum's gradient is 0
        >>> x.grad.abs().max().item() < 1e-6
        True
    """
    return _FixedScaleLayerNorm.apply(x, tuple(normalized_shape), weight, bias, eps)


class _FixedScaleLayerNorm(torch.autograd.Function):
    """``layer_norm`` forward; backward ``dx = (g w - mean(g w)) / std(x)``, the scale a constant.

    (``weight`` and ``bias`` get no gradient: relevance never asks for one.)
    """

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps):  # type: ignore[override]
        dims = tuple(range(-len(normalized_shape), 0))
        variance = torch.var_mean(x, dim=dims, correction=0, keepdim=True)[0]
        ctx.save_for_backward(torch.rsqrt(variance + eps), weight)
        ctx.dims = dims
        return torch.nn.functional.layer_norm(x, normalized_shape, weight, bias, eps)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        inverse_scale, weight = ctx.saved_tensors
        weighted = grad if weight is None else grad * weight
        return (weighted - weighted.mean(dim=ctx.dims, keepdim=True)) * inverse_scale, None, None, None, None


def _as_mask(mask: Optional[Tensor], batch: int, length: int, name: str) -> Optional[Tensor]:
    """``mask`` as a bool ``[B, T]`` tensor (``True`` on real tokens), or ``None``."""
    if mask is None:
        return None
    if tuple(mask.shape) != (batch, length):
        raise ValueError(
            f"{name} must be [B, T] = {(batch, length)} with True on real tokens and False on padding; "
            f"got {tuple(mask.shape)}"
        )
    return mask.bool()


def _inverse_or_zero(total: Tensor) -> Tensor:
    """``1 / total`` where ``total != 0``, else ``0`` (the identity rows of :func:`normalize_relevance`)."""
    nonzero = total != 0
    safe = torch.where(nonzero, total, torch.ones_like(total))
    return torch.where(nonzero, 1.0 / safe, torch.zeros_like(total))


def mask_padding(
    weighted: Tensor, query_mask: Optional[Tensor] = None, key_mask: Optional[Tensor] = None
) -> Tensor:
    """``A_bar`` with the rows of padded queries and the columns of padded keys set to zero.

    Padding then neither receives nor gives relevance. Values at padded positions are replaced, not
    multiplied, so padding that holds ``nan`` or ``inf`` cannot leak into real tokens.

    Args:
        weighted: ``[B, Tq, Tk]`` from :func:`weighted_attention` (self-attention: ``Tq == Tk``).
        query_mask: ``[B, Tq]``, ``True`` on real query tokens; ``None``: no query padding.
        key_mask: ``[B, Tk]``, ``True`` on real key tokens; ``None``: no key padding.

    Returns:
        ``[B, Tq, Tk]`` (``weighted`` itself when both masks are ``None``).

    Example:
        >>> w = torch.tensor([[[0.5, 0.5], [1.0, 2.0]]])
        >>> mask_padding(w, query_mask=torch.tensor([[True, False]]), key_mask=torch.tensor([[True, False]]))
        tensor([[[0.5000, 0.0000],
                 [0.0000, 0.0000]]])
    """
    if weighted.dim() != 3:
        raise ValueError(f"weighted attention must be [B, Tq, Tk], got {tuple(weighted.shape)}")
    batch, queries, keys = weighted.shape
    rows = _as_mask(query_mask, batch, queries, "query_mask")
    columns = _as_mask(key_mask, batch, keys, "key_mask")
    if rows is not None:
        weighted = weighted.masked_fill(~rows.to(weighted.device).unsqueeze(-1), 0.0)
    if columns is not None:
        weighted = weighted.masked_fill(~columns.to(weighted.device).unsqueeze(-2), 0.0)
    return weighted


def normalize_relevance(relevance: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """The paper's normalisation of a self-relevance matrix (Eq. 8-9): ``(R - I) / rowsum(R - I) + I``.

    ``R - I`` is what the layers added on top of the identity; each of its rows is scaled to sum to
    one and the identity is added back, so a token's own weight stays ``1`` and what it gathered from
    the others sums to ``1``. ``R - I`` is only as precise as ``R`` holds it: where the increments are
    far below 1, keep them apart and use :func:`normalize_increment`, which this calls.

    A row whose ``R - I`` sums to zero (no relevance gathered yet, or padding) keeps the identity row
    ``e_m``: the token stands for itself alone. (The authors' code divides ``0 / 0`` there and then
    drops the whole cross-attention update of the layer; keeping the identity is the limit that treats
    the missing share as zero.) With clamped ``A_bar`` every entry of ``R - I`` is non-negative, so a
    zero sum means an all-zero row; with ``clamp=False`` a row can sum to zero with entries that cancel,
    and it is replaced by ``e_m`` as well.

    Args:
        relevance: ``[B, T, T]``, e.g. ``R_qq`` or ``R_ii``.
        mask: ``[B, T]``, ``True`` on real tokens. Entries of ``R - I`` in padded rows or columns are
            dropped first, so padded rows become identity rows and real rows are normalised over real
            columns only. ``None``: no padding.

    Returns:
        ``[B, T, T]``.

    Example:
        >>> r = torch.tensor([[[2.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.25, 1.75]]])
        >>> normalize_relevance(r)  # row 1 sums to zero after - I: it stays the identity row
        tensor([[[1.3333, 0.3333, 0.3333],
                 [0.0000, 1.0000, 0.0000],
                 [0.0000, 0.2500, 1.7500]]])
        >>> normalize_relevance(r, mask=torch.tensor([[True, True, False]]))  # token 2 is padding
        tensor([[[1.5000, 0.5000, 0.0000],
                 [0.0000, 1.0000, 0.0000],
                 [0.0000, 0.0000, 1.0000]]])
    """
    eye = _square_eye(relevance)
    return normalize_increment(relevance - eye, mask) + eye


def normalize_increment(increment: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """``D / rowsum(D)`` for the increment ``D = R - I``: the paper's ``norm(R)`` (Eq. 8-9) is this plus ``I``.

    Rows are scaled to sum to one; a row that sums to zero stays zero (its ``norm(R)`` row is ``e_m``),
    and with ``mask`` padded rows and columns are dropped first, as :func:`normalize_relevance` says.

    Args:
        increment: ``[B, T, T]``, ``R - I``.
        mask: ``[B, T]``, ``True`` on real tokens; ``None``: no padding.

    Returns:
        ``[B, T, T]``, float32 at least.

    Example:
        >>> d = torch.tensor([[[1e-9, 3e-9], [0.0, 0.0]]])  # R = I + d holds nothing of it in float32
        >>> normalize_increment(d)
        tensor([[[0.2500, 0.7500],
                 [0.0000, 0.0000]]])
    """
    if increment.dim() != 3 or increment.shape[-1] != increment.shape[-2]:
        raise ValueError(f"relevance must be square [B, T, T], got {tuple(increment.shape)}")
    gathered = mask_padding(increment.to(_wide(increment.dtype)), mask, mask)
    return gathered * _inverse_or_zero(gathered.sum(dim=-1, keepdim=True))


def _square_eye(relevance: Tensor) -> Tensor:
    """The identity of a square ``[B, T, T]`` relevance (checked), in its dtype and on its device."""
    if relevance.dim() != 3 or relevance.shape[-1] != relevance.shape[-2]:
        raise ValueError(f"relevance must be square [B, T, T], got {tuple(relevance.shape)}")
    return torch.eye(relevance.shape[-1], dtype=relevance.dtype, device=relevance.device)


def propagate_column(column: Tensor, weighted: Tensor) -> Tensor:
    """One layer of the column recursion: ``c <- (I + A_bar) c = c + A_bar c``.

    Applied from the first layer up, it gives ``R c`` for ``R = (I + A_bar_n) ... (I + A_bar_1)``
    without forming ``R``: with ``c = 1`` the row sums of ``R``, with ``c = e_t`` column ``t``.

    Args:
        column: ``[B, L]``.
        weighted: ``[B, L, L]`` from :func:`weighted_attention`.

    Returns:
        ``[B, L]``.

    Example:
        >>> propagate_column(torch.tensor([[1.0, 1.0]]), torch.tensor([[[0.5, 0.5], [0.0, 1.0]]]))
        tensor([[2., 2.]])
    """
    return column + _bmm(weighted, column.unsqueeze(-1)).squeeze(-1)


def propagate_column_increment(increment: Tensor, weighted: Tensor, start: Tensor) -> Tensor:
    """One layer of the column recursion in increment form: ``c <- c + A_bar (s + c)``.

    From the first layer up it gives ``(R - I) s`` for ``R = (I + A_bar_n) ... (I + A_bar_1)``, starting
    at ``c = 0``: with ``s = 1`` the row sums of ``R - I``, which the normalisation divides by.

    Args:
        increment: ``[B, L]`` (or ``[B, L, m]``, ``m`` columns at once), ``c`` of the layers below.
        weighted: ``[B, L, L]`` from :func:`weighted_attention`.
        start: ``s``, shaped like ``increment``.

    Returns:
        The new ``c``, shaped like ``increment``.

    Example:
        >>> a = torch.tensor([[[1e-9, 1e-9], [0.0, 2e-9]]])
        >>> propagate_column_increment(torch.zeros(1, 2), a, torch.ones(1, 2))  # rowsum(R - I) = rowsum(a)
        tensor([[2.0000e-09, 2.0000e-09]])
    """
    if increment.dim() == 3:
        return increment + _bmm(weighted, start + increment)
    return increment + _bmm(weighted, (start + increment).unsqueeze(-1)).squeeze(-1)


def propagate_self_attention(
    r_qq: Tensor, r_qi: Tensor, weighted: Tensor, *, query_mask: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """Rules (6) and (7) of a decoder self-attention layer on the pair ``(R_qq, R_qi)``.

    ``R_qq <- R_qq + A_bar R_qq`` and ``R_qi <- R_qi + A_bar R_qi``: a query token gathers the
    relevance that the tokens it attends to hold, both over queries and over inputs. The increment form,
    which keeps small increments of ``R_qq``, is :func:`propagate_self_attention_increment`.

    Args:
        r_qq: ``[B, Tq, Tq]``, queries on queries (the identity before the first layer).
        r_qi: ``[B, Tq, Ti]``, inputs on queries (zero before the first layer).
        weighted: ``A_bar`` of the layer, ``[B, Tq, Tq]`` from :func:`weighted_attention`.
        query_mask: ``[B, Tq]``, ``True`` on real query tokens; padded rows and columns of ``A_bar``
            are dropped (:func:`mask_padding`), so padding neither gathers nor gives relevance.

    Returns:
        The updated ``(R_qq, R_qi)``, same shapes.

    Example:
        >>> r_qq, r_qi = torch.eye(2).unsqueeze(0), torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]]])
        >>> a = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])
        >>> propagate_self_attention(r_qq, r_qi, a)
        (tensor([[[2.0000, 0.0000],
                 [0.5000, 1.5000]]]), tensor([[[2.0000, 0.0000, 0.0000],
                 [0.5000, 0.0000, 3.0000]]]))
    """
    _self_shapes(r_qq, r_qi, weighted)
    eye = _square_eye(r_qq)
    d_qq, r_qi = propagate_self_attention_increment(r_qq - eye, r_qi, weighted, query_mask=query_mask)
    return d_qq + eye, r_qi


def propagate_self_attention_increment(
    d_qq: Tensor, r_qi: Tensor, weighted: Tensor, *, query_mask: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """Rules (6) and (7) with ``R_qq`` kept as its increment ``D_qq = R_qq - I``.

    ``D_qq <- D_qq + A_bar (I + D_qq)`` and ``R_qi <- R_qi + A_bar R_qi`` (``R_qi`` holds no identity).

    Args:
        d_qq: ``[B, Tq, Tq]``, ``R_qq - I`` (zero before the first layer).
        r_qi, weighted, query_mask: as in :func:`propagate_self_attention`.

    Returns:
        The updated ``(D_qq, R_qi)``.

    Example:
        >>> a = torch.tensor([[[1e-9, 0.0], [0.5e-9, 0.5e-9]]])
        >>> propagate_self_attention_increment(torch.zeros(1, 2, 2), torch.ones(1, 2, 1), a)[0]  # = a
        tensor([[[1.0000e-09, 0.0000e+00],
                 [5.0000e-10, 5.0000e-10]]])
    """
    _self_shapes(d_qq, r_qi, weighted)
    weighted = mask_padding(weighted, query_mask, query_mask)
    return d_qq + weighted + _bmm(weighted, d_qq), r_qi + _bmm(weighted, r_qi)


def _self_shapes(r_qq: Tensor, r_qi: Tensor, weighted: Tensor) -> None:
    """Rules (6)-(7)'s operands must be ``R_qq [B, Tq, Tq]``, ``R_qi [B, Tq, Ti]`` and ``A_bar [B, Tq, Tq]``."""
    if r_qq.dim() != 3 or r_qi.dim() != 3 or weighted.shape != r_qq.shape or r_qi.shape[:2] != r_qq.shape[:2]:
        raise ValueError(
            "expected R_qq [B, Tq, Tq], R_qi [B, Tq, Ti] and A_bar [B, Tq, Tq]; got "
            f"{tuple(r_qq.shape)}, {tuple(r_qi.shape)} and {tuple(weighted.shape)}"
        )


def propagate_cross_attention(
    r_qq: Tensor,
    r_qi: Tensor,
    r_ii: Tensor,
    weighted: Tensor,
    *,
    query_mask: Optional[Tensor] = None,
    input_mask: Optional[Tensor] = None,
) -> Tensor:
    """Rule (10) of a decoder cross-attention layer: ``R_qi <- R_qi + norm(R_qq)^T A_bar norm(R_ii)``.

    ``norm`` is :func:`normalize_relevance` (Eq. 8-9); ``R_qq`` is the decoder's self-relevance after
    this layer's self-attention, ``R_ii`` the encoder's final self-relevance. The transpose on
    ``norm(R_qq)`` is the paper's: row ``t`` of the update collects the cross-attention rows of the
    queries ``m`` weighted by ``norm(R_qq)[m, t]``. The increment form, which keeps small increments of
    ``R_qq`` and ``R_ii``, is :func:`propagate_cross_attention_increment`.

    Args:
        r_qq: ``[B, Tq, Tq]``.
        r_qi: ``[B, Tq, Ti]``.
        r_ii: ``[B, Ti, Ti]``.
        weighted: ``A_bar`` of the cross-attention, ``[B, Tq, Ti]``, gradient-weighted, clamped and
            head-averaged as :func:`weighted_attention` makes it.
        query_mask: ``[B, Tq]``, ``True`` on real query tokens; ``input_mask``: ``[B, Ti]``, ``True`` on
            real input tokens. Padded rows and columns of ``A_bar`` are dropped and both
            normalisations ignore padding, so padded rows and columns of ``R_qi`` receive nothing.

    Returns:
        The updated ``R_qi``, ``[B, Tq, Ti]``.

    Example:
        >>> r_qq = torch.tensor([[[2.0]]])                        # norm: (2 - 1) / 1 + 1 = 2
        >>> r_ii = torch.tensor([[[2.0, 1.0], [0.0, 1.5]]])       # norm: [[1.5, 0.5], [0, 2]]
        >>> propagate_cross_attention(r_qq, torch.zeros(1, 1, 2), r_ii, torch.tensor([[[0.5, 0.5]]]))
        tensor([[[1.5000, 2.5000]]])
    """
    _cross_shapes(r_qq, r_qi, r_ii, weighted)
    return propagate_cross_attention_increment(
        r_qq - _square_eye(r_qq), r_qi, r_ii - _square_eye(r_ii), weighted, query_mask=query_mask, input_mask=input_mask
    )


def propagate_cross_attention_increment(
    d_qq: Tensor,
    r_qi: Tensor,
    d_ii: Tensor,
    weighted: Tensor,
    *,
    query_mask: Optional[Tensor] = None,
    input_mask: Optional[Tensor] = None,
) -> Tensor:
    """Rule (10) from the increments ``D_qq = R_qq - I`` and ``D_ii = R_ii - I``.

    ``norm(R) = D / rowsum(D) + I`` (:func:`normalize_increment`), so no ``R - I`` is ever taken.

    Args:
        d_qq: ``[B, Tq, Tq]``; ``d_ii``: ``[B, Ti, Ti]``.
        r_qi, weighted, query_mask, input_mask: as in :func:`propagate_cross_attention`.

    Returns:
        The updated ``R_qi``, ``[B, Tq, Ti]``.

    Example (``R_ii - I`` of ``1e-9``, which ``R_ii`` itself would round away in float32):
        >>> d_ii = torch.tensor([[[1e-9, 1e-9], [0.0, 0.0]]])  # norm(R_ii) = [[1.5, 0.5], [0, 1]]
        >>> propagate_cross_attention_increment(torch.zeros(1, 1, 1), torch.zeros(1, 1, 2), d_ii,
        ...                                     torch.tensor([[[0.5, 0.5]]]))
        tensor([[[0.7500, 0.7500]]])
    """
    _cross_shapes(d_qq, r_qi, d_ii, weighted)
    weighted = mask_padding(weighted, query_mask, input_mask)
    left = (normalize_increment(d_qq, query_mask) + _square_eye(d_qq)).transpose(1, 2)
    right = normalize_increment(d_ii, input_mask) + _square_eye(d_ii)
    return r_qi + _bmm(left, _bmm(weighted, right))


def _cross_shapes(r_qq: Tensor, r_qi: Tensor, r_ii: Tensor, weighted: Tensor) -> None:
    """Rule (10)'s operands must be ``R_qq [B, Tq, Tq]``, ``R_qi [B, Tq, Ti]``, ``R_ii [B, Ti, Ti]``, ``A_bar [B, Tq, Ti]``."""
    batch, queries, inputs = r_qi.shape
    square = r_qq.shape == (batch, queries, queries) and r_ii.shape == (batch, inputs, inputs)
    if not square or weighted.shape != r_qi.shape:
        raise ValueError(
            "expected R_qq [B, Tq, Tq], R_qi [B, Tq, Ti], R_ii [B, Ti, Ti] and cross-attention A_bar "
            "[B, Tq, Ti]; got "
            f"{tuple(r_qq.shape)}, {tuple(r_qi.shape)}, {tuple(r_ii.shape)} and {tuple(weighted.shape)}"
        )


class EncoderDecoderRelevance(NamedTuple):
    """The three relevance matrices of an encoder-decoder: ``R_ii [B, Ti, Ti]``, ``R_qq [B, Tq, Tq]``,
    ``R_qi [B, Tq, Ti]`` (row ``t`` of ``R_qi``: the relevance of each input token for query ``t``)."""

    r_ii: Tensor
    r_qq: Tensor
    r_qi: Tensor


def _encoder_decoder_shapes(
    encoder_layers: Sequence[Tensor],
    decoder_self_layers: Sequence[Tensor],
    decoder_cross_layers: Sequence[Optional[Tensor]],
) -> tuple[int, int, int]:
    """``(B, Tq, Ti)`` of a stack of layers, after checking that every layer agrees."""
    if not decoder_self_layers or len(decoder_self_layers) != len(decoder_cross_layers):
        raise ValueError(
            "give one self-attention and one cross-attention A_bar per decoder layer (None for a layer "
            f"without cross-attention); got {len(decoder_self_layers)} and {len(decoder_cross_layers)}"
        )
    crosses = [c for c in decoder_cross_layers if c is not None]
    if not crosses:
        raise ValueError(
            "no decoder layer has a cross-attention A_bar: use dense_relevance for a decoder alone"
        )
    batch, queries, inputs = crosses[0].shape
    expected = [((batch, inputs, inputs), "encoder self-attention", encoder_layers),
                ((batch, queries, queries), "decoder self-attention", decoder_self_layers),
                ((batch, queries, inputs), "decoder cross-attention", crosses)]
    for shape, name, layers in expected:
        for k, layer in enumerate(layers):
            if tuple(layer.shape) != shape:
                raise ValueError(
                    f"{name} A_bar of layer {k} is {tuple(layer.shape)}, expected {shape} "
                    "([B, Tq, Ti] from the first cross-attention layer)"
                )
    return batch, queries, inputs


def dense_encoder_decoder_relevance(
    encoder_layers: Sequence[Tensor],
    decoder_self_layers: Sequence[Tensor],
    decoder_cross_layers: Sequence[Optional[Tensor]],
    *,
    input_mask: Optional[Tensor] = None,
    query_mask: Optional[Tensor] = None,
) -> EncoderDecoderRelevance:
    """The paper's encoder-decoder relevance, all three matrices, the dense ``O(T^3)``-per-layer way.

    ``R_ii = I``, ``R_qq = I``, ``R_qi = 0``; the encoder's layers give
    ``R_ii = (I + A_bar_E) ... (I + A_bar_1)`` (rule 6); then per decoder layer, in forward order:
    rules 6-7 (:func:`propagate_self_attention_increment`) and rule 10
    (:func:`propagate_cross_attention_increment`, with the final ``R_ii``). ``R_ii`` and ``R_qq`` are
    kept as their increments over ``I`` throughout, the identity added on return. The reference
    :func:`encoder_decoder_rows` is tested against.

    Args:
        encoder_layers: ``A_bar`` ``[B, Ti, Ti]`` of each encoder self-attention layer, first to last
            (may be empty: the decoder cross-attends to inputs without self-attention, ``R_ii = I``).
        decoder_self_layers: ``A_bar`` ``[B, Tq, Tq]`` of each decoder self-attention layer, first to last.
        decoder_cross_layers: ``A_bar`` ``[B, Tq, Ti]`` of each decoder layer's cross-attention, same
            order and length; ``None`` for a layer without cross-attention.
        input_mask: ``[B, Ti]``, ``True`` on real input tokens; ``query_mask``: ``[B, Tq]``, ``True`` on
            real query tokens. Padded rows and columns of every ``A_bar`` are dropped: padded rows of
            ``R_ii`` and ``R_qq`` stay identity rows, padded rows and columns of ``R_qi`` stay zero, and
            the real block of each sample equals that sample computed alone.

    Returns:
        :class:`EncoderDecoderRelevance` ``(r_ii, r_qq, r_qi)``.

    Example:
        >>> enc = [torch.tensor([[[1.0, 1.0], [0.0, 0.5]]])]
        >>> self_layers, cross_layers = [torch.tensor([[[1.0]]])], [torch.tensor([[[0.5, 0.5]]])]
        >>> r = dense_encoder_decoder_relevance(enc, self_layers, cross_layers)
        >>> r.r_ii, r.r_qq, r.r_qi
        (tensor([[[2.0000, 1.0000],
                 [0.0000, 1.5000]]]), tensor([[[2.]]]), tensor([[[1.5000, 2.5000]]]))
    """
    shapes = _encoder_decoder_shapes(encoder_layers, decoder_self_layers, decoder_cross_layers)
    batch, queries, inputs = shapes
    reference = next(c for c in decoder_cross_layers if c is not None)
    dtype, device = _wide(reference.dtype), reference.device
    if encoder_layers:
        d_ii = dense_increment([mask_padding(w, input_mask, input_mask) for w in encoder_layers])
    else:
        d_ii = torch.zeros(batch, inputs, inputs, dtype=dtype, device=device)
    d_qq = torch.zeros(batch, queries, queries, dtype=dtype, device=device)
    r_qi = torch.zeros(batch, queries, inputs, dtype=dtype, device=device)
    for self_weighted, cross_weighted in zip(decoder_self_layers, decoder_cross_layers):
        d_qq, r_qi = propagate_self_attention_increment(d_qq, r_qi, self_weighted, query_mask=query_mask)
        if cross_weighted is not None:
            r_qi = propagate_cross_attention_increment(
                d_qq, r_qi, d_ii, cross_weighted, query_mask=query_mask, input_mask=input_mask
            )
    return EncoderDecoderRelevance(d_ii + _square_eye(d_ii), d_qq + _square_eye(d_qq), r_qi)


class EncoderDecoderRows(NamedTuple):
    """One row per sample of :class:`EncoderDecoderRelevance`: ``r_qi [B, Ti]`` (input tokens) and
    ``r_qq [B, Tq]`` (query tokens), both for the query position asked for."""

    r_qi: Tensor
    r_qq: Tensor


def encoder_decoder_rows(
    encoder_layers: Sequence[Tensor],
    decoder_self_layers: Sequence[Tensor],
    decoder_cross_layers: Sequence[Optional[Tensor]],
    query_index: Tensor,
    *,
    input_mask: Optional[Tensor] = None,
    query_mask: Optional[Tensor] = None,
) -> EncoderDecoderRows:
    """Row ``query_index[b]`` of ``R_qi`` and of ``R_qq`` for each sample, without any ``T x T`` product.

    Equal to ``dense_encoder_decoder_relevance(...)`` read at those rows. Unrolling the decoder,

        R_qi = sum_k (I + S_n) ... (I + S_k+1) norm(R_qq^(k))^T C_k norm(R_ii)

    (``S_k``, ``C_k``: ``A_bar`` of layer ``k``'s self- and cross-attention; ``R_qq^(k)`` after layer
    ``k``'s self-attention). Row ``p`` of it takes, from the last layer down, the row vectors
    ``u_k = e_p (I + S_n) ... (I + S_k+1)``, kept as ``u_k - e_p`` (:func:`propagate_row_increment`); the
    columns ``D_qq^(k) u_k^T`` and the row sums ``D_qq^(k) 1`` of the increment ``D_qq^(k) = R_qq^(k) - I``
    (:func:`propagate_column_increment`, first layer up) give
    ``w_k = norm(R_qq^(k)) u_k^T = (D_qq^(k) u_k^T) / (D_qq^(k) 1) + u_k^T``; ``z = sum_k w_k C_k`` is a
    row over the inputs, and ``z norm(R_ii) = (z g) D_ii + z`` with ``g = 1 / rowsum(D_ii)`` (``0`` on
    zero sums, the identity rows) takes one more row and column recursion through the encoder, in
    increment form again. No ``R - I`` is ever taken, so increments far below 1 keep their digits. Cost
    per row: ``O(E Ti^2 + n^2 Tq^2 / 2 + n Tq Ti)`` for ``E`` encoder and ``n`` decoder layers, against
    ``O(E Ti^3 + n (Tq^3 + Tq^2 Ti + Tq Ti^2))`` dense.

    Each generated token has its own gradients, hence its own ``A_bar``: stack the targets on the batch
    dimension (one sample per target, its position in ``query_index``).

    Args:
        encoder_layers, decoder_self_layers, decoder_cross_layers: as in
            :func:`dense_encoder_decoder_relevance`.
        query_index: ``[B]``, the query position whose row is read (the logits position that predicts
            the explained token).
        input_mask, query_mask: as in :func:`dense_encoder_decoder_relevance`; the query position must
            be a real token.

    Returns:
        :class:`EncoderDecoderRows` ``(r_qi [B, Ti], r_qq [B, Tq])``.

    Example:
        >>> enc = [torch.tensor([[[1.0, 1.0], [0.0, 0.5]]])]
        >>> self_layers = [torch.tensor([[[2.0, 0.0], [0.5, 0.5]]])]
        >>> cross_layers = [torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])]
        >>> encoder_decoder_rows(enc, self_layers, cross_layers, torch.tensor([1]))
        EncoderDecoderRows(r_qi=tensor([[1.1250, 1.8750]]), r_qq=tensor([[0.5000, 1.5000]]))
        >>> dense_encoder_decoder_relevance(enc, self_layers, cross_layers).r_qi[:, 1]
        tensor([[1.1250, 1.8750]])
    """
    shapes = _encoder_decoder_shapes(encoder_layers, decoder_self_layers, decoder_cross_layers)
    batch, queries, inputs = shapes
    if tuple(query_index.shape) != (batch,):
        raise ValueError(
            f"query_index must be [B] = ({batch},), one query position per sample; "
            f"got {tuple(query_index.shape)}"
        )
    reference = next(c for c in decoder_cross_layers if c is not None)
    dtype, device = _wide(reference.dtype), reference.device
    index = query_index.long().to(device)
    if index.min() < 0 or index.max() >= queries:
        raise ValueError(f"query_index must lie in [0, {queries}); got {index.tolist()}")
    queries_real = _as_mask(query_mask, batch, queries, "query_mask")
    samples = torch.arange(batch, device=device)
    if queries_real is not None and not bool(queries_real.to(device)[samples, index].all()):
        raise ValueError("query_index points at a padded query position: give the position of a real token")
    encoder = [mask_padding(w, input_mask, input_mask) for w in encoder_layers]
    selfs = [mask_padding(w, query_mask, query_mask) for w in decoder_self_layers]
    crosses = [None if c is None else mask_padding(c, query_mask, input_mask) for c in decoder_cross_layers]
    layers = len(selfs)

    # u_k - e_p, u_k = e_p (I + S_n) ... (I + S_k+1), from the last layer down; u_0 is row p of R_qq.
    unit = pooling_rows(index, queries, dtype)
    increments: list[Tensor] = [torch.zeros_like(unit)]
    for weighted in reversed(selfs):
        increments.append(propagate_row_increment(increments[-1], weighted, unit))
    increments.reverse()  # increments[k] = u_k - e_p
    rows = [unit + increment for increment in increments]  # u_k, each used as a factor only

    # From the first layer up: D_qq^(k) u_k for every layer k with cross-attention (pending columns),
    # and D_qq^(k) 1 (the last column), its row sums.
    starts = torch.stack([rows[k + 1] for k in range(layers) if crosses[k] is not None]
                         + [torch.ones(batch, queries, dtype=dtype, device=device)], dim=-1)
    pending = torch.zeros_like(starts)
    gathered = torch.zeros(batch, inputs, dtype=dtype, device=device)  # z
    for k in range(layers):
        pending = propagate_column_increment(pending, selfs[k], starts)
        cross = crosses[k]
        if cross is None:
            continue
        u = rows[k + 1]
        w = _inverse_or_zero(pending[:, :, -1]) * pending[:, :, 0] + u  # norm(R_qq^(k)) u_k
        gathered = gathered + _bmm(w.unsqueeze(1), cross).squeeze(1)
        pending, starts = pending[:, :, 1:], starts[:, :, 1:]

    # z norm(R_ii) = (z g) D_ii + z, D_ii = (I + E_last) ... (I + E_1) - I.
    ones = torch.ones(batch, inputs, dtype=dtype, device=device)
    totals = torch.zeros_like(ones)
    for weighted in encoder:
        totals = propagate_column_increment(totals, weighted, ones)
    scaled = gathered * _inverse_or_zero(totals)
    spread = torch.zeros_like(scaled)  # (z g) D_ii, from the last layer down
    for weighted in reversed(encoder):
        spread = propagate_row_increment(spread, weighted, scaled)
    return EncoderDecoderRows(r_qi=spread + gathered, r_qq=rows[0])
