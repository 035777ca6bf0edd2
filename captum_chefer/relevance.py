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

For encoder-decoder models (a decoder of query tokens ``q`` that cross-attends to input tokens ``i``)
the paper keeps three matrices, ``R_ii`` (inputs on inputs), ``R_qq`` (queries on queries) and ``R_qi``
(inputs on queries), starting at ``I``, ``I`` and ``0``. The encoder's self-attention layers update
``R_ii`` with rule (6); then each decoder layer, in forward order, applies rules (6)-(7) of its
self-attention to the pair ``(R_qq, R_qi)`` and rule (10) of its cross-attention to ``R_qi``:

    R_qq <- R_qq + A_bar R_qq,   R_qi <- R_qi + A_bar R_qi                   (6), (7)
    R_qi <- R_qi + norm(R_qq)^T A_bar_cross norm(R_ii)                       (10)
    norm(R) = (R - I) / rowsum(R - I) + I                                    (8), (9)

(:func:`dense_encoder_decoder_relevance`). Only a few rows of ``R_qi`` are read, one per explained
output position, and :func:`encoder_decoder_rows` computes them with matrix-vector products only.

Nothing here knows about ``nn.Module``, Captum or PyHealth: tensors in, tensors out.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Optional, Sequence

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
    "split_over_codes",
    "softmax_log_odds",
    "layer_norm_fixed_scale",
    "mask_padding",
    "normalize_relevance",
    "propagate_column",
    "propagate_self_attention",
    "propagate_cross_attention",
    "EncoderDecoderRelevance",
    "dense_encoder_decoder_relevance",
    "EncoderDecoderRows",
    "encoder_decoder_rows",
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
    the others sums to ``1``.

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
    if relevance.dim() != 3 or relevance.shape[-1] != relevance.shape[-2]:
        raise ValueError(f"relevance must be square [B, T, T], got {tuple(relevance.shape)}")
    length = relevance.shape[-1]
    eye = torch.eye(length, dtype=relevance.dtype, device=relevance.device)
    gathered = mask_padding(relevance - eye, mask, mask)
    return gathered * _inverse_or_zero(gathered.sum(dim=-1, keepdim=True)) + eye


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
    return column + torch.bmm(weighted, column.unsqueeze(-1)).squeeze(-1)


def propagate_self_attention(
    r_qq: Tensor, r_qi: Tensor, weighted: Tensor, *, query_mask: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """Rules (6) and (7) of a decoder self-attention layer on the pair ``(R_qq, R_qi)``.

    ``R_qq <- R_qq + A_bar R_qq`` and ``R_qi <- R_qi + A_bar R_qi``: a query token gathers the
    relevance that the tokens it attends to hold, both over queries and over inputs.

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
    if r_qq.dim() != 3 or r_qi.dim() != 3 or weighted.shape != r_qq.shape or r_qi.shape[:2] != r_qq.shape[:2]:
        raise ValueError(
            "expected R_qq [B, Tq, Tq], R_qi [B, Tq, Ti] and A_bar [B, Tq, Tq]; got "
            f"{tuple(r_qq.shape)}, {tuple(r_qi.shape)} and {tuple(weighted.shape)}"
        )
    weighted = mask_padding(weighted, query_mask, query_mask)
    return r_qq + torch.bmm(weighted, r_qq), r_qi + torch.bmm(weighted, r_qi)


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
    queries ``m`` weighted by ``norm(R_qq)[m, t]``.

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
    batch, queries, inputs = r_qi.shape
    square = r_qq.shape == (batch, queries, queries) and r_ii.shape == (batch, inputs, inputs)
    if not square or weighted.shape != r_qi.shape:
        raise ValueError(
            "expected R_qq [B, Tq, Tq], R_qi [B, Tq, Ti], R_ii [B, Ti, Ti] and cross-attention A_bar "
            "[B, Tq, Ti]; got "
            f"{tuple(r_qq.shape)}, {tuple(r_qi.shape)}, {tuple(r_ii.shape)} and {tuple(weighted.shape)}"
        )
    weighted = mask_padding(weighted, query_mask, input_mask)
    left = normalize_relevance(r_qq, query_mask).transpose(1, 2)
    right = normalize_relevance(r_ii, input_mask)
    return r_qi + torch.bmm(left, torch.bmm(weighted, right))


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
    :func:`propagate_self_attention` (rules 6-7) and :func:`propagate_cross_attention` (rule 10, with
    the final ``R_ii``). The reference :func:`encoder_decoder_rows` is tested against.

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
    dtype, device = reference.dtype, reference.device
    if encoder_layers:
        r_ii = dense_relevance([mask_padding(w, input_mask, input_mask) for w in encoder_layers])
    else:
        r_ii = torch.eye(inputs, dtype=dtype, device=device).expand(batch, inputs, inputs).clone()
    r_qq = torch.eye(queries, dtype=dtype, device=device).expand(batch, queries, queries)
    r_qi = torch.zeros(batch, queries, inputs, dtype=dtype, device=device)
    for self_weighted, cross_weighted in zip(decoder_self_layers, decoder_cross_layers):
        r_qq, r_qi = propagate_self_attention(r_qq, r_qi, self_weighted, query_mask=query_mask)
        if cross_weighted is not None:
            r_qi = propagate_cross_attention(
                r_qq, r_qi, r_ii, cross_weighted, query_mask=query_mask, input_mask=input_mask
            )
    return EncoderDecoderRelevance(r_ii, r_qq, r_qi)


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
    ``u_k = e_p (I + S_n) ... (I + S_k+1)`` (:func:`propagate_row`); the columns
    ``R_qq^(k) u_k^T`` and the row sums ``R_qq^(k) 1`` (:func:`propagate_column`, first layer up) give
    ``w_k = norm(R_qq^(k)) u_k^T``; ``z = sum_k w_k C_k`` is a row over the inputs, and
    ``z norm(R_ii) = (z g)(R_ii - I) + z`` with ``g = 1 / rowsum(R_ii - I)`` (``0`` on zero sums, the
    identity rows) takes one more row and column recursion through the encoder. Cost per row:
    ``O(E Ti^2 + n^2 Tq^2 / 2 + n Tq Ti)`` for ``E`` encoder and ``n`` decoder layers, against
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
    dtype, device = reference.dtype, reference.device
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

    # u_k = e_p (I + S_n) ... (I + S_k+1), from the last layer down; u_0 is row p of R_qq.
    rows: list[Tensor] = [pooling_rows(index, queries, dtype)]
    for weighted in reversed(selfs):
        rows.append(propagate_row(rows[-1], weighted))
    rows.reverse()  # rows[k] = u_k

    # From the first layer up: R_qq^(k) u_k for every layer k with cross-attention (pending columns),
    # and R_qq^(k) 1 (the last column) for its row sums.
    pending = torch.stack([rows[k + 1] for k in range(layers) if crosses[k] is not None]
                          + [torch.ones(batch, queries, dtype=dtype, device=device)], dim=-1)
    gathered = torch.zeros(batch, inputs, dtype=dtype, device=device)  # z
    for k in range(layers):
        pending = pending + torch.bmm(selfs[k], pending)
        cross = crosses[k]
        if cross is None:
            continue
        u = rows[k + 1]
        scale = _inverse_or_zero(pending[:, :, -1] - 1.0)  # 1 / rowsum(R_qq^(k) - I)
        w = scale * (pending[:, :, 0] - u) + u  # norm(R_qq^(k)) u_k
        gathered = gathered + torch.bmm(w.unsqueeze(1), cross).squeeze(1)
        pending = pending[:, :, 1:]

    # z norm(R_ii) = (z g) (R_ii - I) + z, R_ii = (I + E_last) ... (I + E_1).
    totals = torch.ones(batch, inputs, dtype=dtype, device=device)
    for weighted in encoder:
        totals = propagate_column(totals, weighted)
    scaled = gathered * _inverse_or_zero(totals - 1.0)
    row = scaled
    for weighted in reversed(encoder):
        row = propagate_row(row, weighted)
    return EncoderDecoderRows(r_qi=row - scaled + gathered, r_qq=rows[0])
