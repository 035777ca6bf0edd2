"""``CheferAttribution``: Chefer et al.'s relevance as a Captum attribution method.

The algorithm depends on a narrow interface, :class:`~captum_chefer.protocol.AttentionModel` (in
:mod:`captum_chefer.protocol`), that a forward function implements to expose its attention; the adapters in
:mod:`captum_chefer.adapters` implement it (this module imports none of them, and they do not import it).
The interface's names are imported here too, where earlier versions defined them.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Literal, Mapping, Optional, Sequence

import torch
from captum.attr import GradientAttribution
from captum.log import log_usage
from torch import Tensor

from .layernorm import FixedScaleLayerNorm
from .protocol import (
    AttentionForward,
    AttentionModel,
    Capabilities,
    DeferredAttention,
    LayerNormMode,
    TargetType,
    check_target_range,
)
from .relevance import (
    HeadReduction,
    dense_increment,
    full_precision,
    pooling_rows,
    propagate_row_increment,
    propagate_weighted_increment,
    read_rows,
    softmax_log_odds,
    split_over_codes,
    weighted_attention,
)

__all__ = [
    "AttentionForward", "AttentionModel", "CheferAttribution", "DeferredAttention", "FixedScaleLayerNorm", "PRESETS",
    "TargetType",
]

Propagation = Literal["row", "dense"]
CodeSplit = Literal["uniform", "gradient"]
Score = Literal["logit", "log_odds"]
Preset = Literal["pyhealth", "recommended"]

#: The keyword settings each ``preset`` stands for (keywords passed to ``attribute`` take precedence).
PRESETS: dict[str, dict[str, Any]] = {
    "pyhealth": {"exclude_self": False, "code_split": "uniform", "layernorm": "exact", "score": "logit"},
    "recommended": {"exclude_self": True, "code_split": "gradient", "layernorm": "detach", "score": "log_odds"},
}


class CheferAttribution(GradientAttribution):
    r"""Gradient-weighted attention relevance (Chefer, Gur and Wolf, ICCV 2021, arXiv 2103.15679).

    For each attention stream, one forward pass captures the attention probabilities ``A_k`` of every
    layer and one backward pass from the target logit gives their gradients; the relevance of the
    position ``p`` the model pools is

    .. math::
        r = e_p^\top (I + \bar A_n) \cdots (I + \bar A_1), \qquad
        \bar A_k = \mathbb{E}_h\big[\max(0, \nabla A_k \odot A_k)\big].

    Only that row is ever formed: it is updated layer by layer inside the backward pass, as each
    layer's attention gradient arrives, so no per-head gradient is kept and no ``L x L`` relevance
    matrix is multiplied. Of the last layer only row ``p`` is read, so the model is asked for that row
    alone (``pooled_row_only``): a PyHealth ``Transformer`` then evaluates its last block for the
    pooled position only. The row is kept as its increment ``d = r - e_p``,
    ``d <- d + (e_p + d) \bar A_k``, and ``e_p`` is added at the end unless ``exclude_self``: with small
    gradients ``\bar A_k`` can lie far below float32's spacing at 1 (``1.2e-7``), and ``e_p + d`` would
    round ``d`` away. The relevance is computed in float32 at least: half-precision maps and gradients
    are upcast before they are weighted, and autocast is off for its products. Gradients are taken with
    ``torch.autograd.grad`` with respect to the attention only; parameter ``.grad`` is never touched. The
    defaults reproduce PyHealth 2.1's ``CheferRelevance``.

    Args:
        forward_func: an :class:`AttentionModel`: an adapter from :mod:`captum_chefer.adapters` (for
            example ``PyHealthAdapter(model)``, or ``adapter_for(model)`` for any supported model).

    Example:
        >>> from captum_chefer import CheferAttribution, PyHealthAdapter
        >>> from captum_chefer.synthetic import toy_model_and_batch
        >>> model, batch = toy_model_and_batch()
        >>> adapter = PyHealthAdapter(model)
        >>> inputs, args = adapter.captum_inputs(batch)
        >>> attributions = CheferAttribution(adapter).attribute(
        ...     inputs, target=adapter.captum_target(batch), additional_forward_args=args)
        >>> [tuple(a.shape) for a in attributions] == [tuple(x.shape) for x in inputs]
        True

    ``preset="recommended"`` finds the codes a model relies on better than the PyHealth default (see
    ``benchmarks/QUALITY.md``); it stands for four keywords of :meth:`attribute`, which still take
    precedence when passed:

        >>> PRESETS["recommended"]
        {'exclude_self': True, 'code_split': 'gradient', 'layernorm': 'detach', 'score': 'log_odds'}
        >>> recommended = CheferAttribution(adapter, preset="recommended").attribute(
        ...     inputs, target=adapter.captum_target(batch), additional_forward_args=args)
        >>> explicit = CheferAttribution(adapter).attribute(
        ...     inputs, target=adapter.captum_target(batch), additional_forward_args=args, **PRESETS["recommended"])
        >>> all(torch.equal(a, b) for a, b in zip(recommended, explicit))
        True
    """

    def __init__(self, forward_func: Callable[..., Tensor], *, preset: Preset = "pyhealth") -> None:
        if not isinstance(forward_func, AttentionModel):
            raise TypeError(
                f"CheferAttribution needs an adapter that exposes the model's attention, got {type(forward_func).__name__}; "
                "wrap the model first: CheferAttribution(captum_chefer.adapter_for(model)), or PyHealthAdapter(model), "
                "HuggingFaceAdapter(model), TransformerAdapter(model)"
            )
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(map(repr, PRESETS))}, got {preset!r}")
        self.preset: Preset = preset
        self._capabilities = Capabilities.of(forward_func)
        if self._capabilities.require_attention is not None:
            self._capabilities.require_attention()  # fail at construction, not at the first call
        super().__init__(forward_func)
        self.model: AttentionModel = forward_func

    @classmethod
    def get_name(cls) -> str:
        return "Chefer"

    @property
    def multiplies_by_inputs(self) -> bool:
        return False

    def has_convergence_delta(self) -> bool:
        return False

    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType = None,
        additional_forward_args: Any = None,
        *,
        exclude_self: Optional[bool] = None,
        code_split: Optional[CodeSplit] = None,
        layernorm: Optional[LayerNormMode] = None,
        score: Optional[Score] = None,
        use_gradients: bool = True,
        clamp: bool = True,
        head_reduction: HeadReduction = "mean",
        layers: Optional[int] = None,
        propagation: Propagation = "row",
    ) -> Tensor | tuple[Tensor, ...]:
        """Relevance of each input position for the ``target`` output.

        Args:
            inputs: a tensor or a tuple of tensors, one per attention stream (feature key), as made by
                ``PyHealthAdapter.captum_inputs``: embeddings ``[B, L, D]`` / ``[B, V, C, D]`` or
                token ids ``[B, L]`` / ``[B, V, C]``.
            target: the output index to explain, as in Captum: an int, a per-sample tensor or list of
                ``B`` ints, or ``None`` for a model with a single output (binary).
            additional_forward_args: the extra forward arguments (masks, times) from
                ``PyHealthAdapter.captum_inputs``; a tensor or a tuple.
            exclude_self: drop the identity term of the pooling position, which otherwise gives that
                position a relevance of at least 1 in every sample. ``None`` (like the next three): the
                preset's value; the ``"pyhealth"`` preset (the default) has ``False``.
            code_split: how a visit's relevance reaches its codes, for nested visits (PyHealth's
                ``[B, V, C]`` features); flat features are never split. ``"uniform"`` (PyHealth's): each
                real code gets the visit's relevance. ``"gradient"``: the visit's relevance is split over
                its real codes in proportion to the positive part of gradient x code embedding, their
                first-order shares of the visit embedding (:func:`~captum_chefer.relevance.split_over_codes`;
                evenly where no code has a positive share), so a visit's codes sum to its relevance. For
                ``StageAttentionNet``, whose attended LSTM states each carry every visit up to theirs, the
                stream's relevance is split over the codes of all visits by their contribution through the
                attention's value path (one more vector-Jacobian product). The gradients come from the same
                ``torch.autograd.grad`` call as the attention gradients.
            layernorm: ``"exact"`` (PyHealth's) or ``"detach"``: in this forward pass every layer norm
                divides by its standard deviation held constant for the backward pass (the forward values
                and the prediction are unchanged). LayerNorm's scale invariance otherwise bends the
                gradient away from a dominant input, which hides it from gradient-weighted attention and
                from the code split.
            score: the scalar explained: ``"logit"`` (PyHealth's), the target's logit, or ``"log_odds"``,
                the target's log-odds ``log p / (1 - p)`` under the model's probabilities: the logit itself
                for a sigmoid output, ``logit_t - logsumexp_{j != t} logit_j`` for a softmax, so the
                other classes' evidence counts against the target.
            use_gradients: ``False`` uses the clamped attention alone (an ablation).
            clamp: ``False`` keeps negative gradient-attention products (an ablation).
            head_reduction: ``"mean"`` (the paper) or ``"max"`` over heads.
            layers: use only the last ``layers`` attention layers of each stream (``None``: all).
            propagation: ``"row"`` (default) fuses the row recursion into the backward pass;
                ``"dense"`` forms the full ``L x L`` product as PyHealth does (a reference, slow).

        Returns:
            Attributions shaped like ``inputs`` (a tensor for a tensor, a tuple for a tuple). For
            embeddings each position's relevance is spread evenly over the embedding dimension, so
            summing over it gives the relevance back; nested visits give each visit's relevance to
            every real code of the visit (``code_split="uniform"``) or split it over them
            (``"gradient"``); padding gets zero.
        """
        is_tuple = isinstance(inputs, tuple)
        inputs_tuple = inputs if is_tuple else (inputs,)
        if not inputs_tuple or not all(isinstance(x, Tensor) for x in inputs_tuple):
            raise TypeError("inputs must be a tensor or a non-empty tuple of tensors")
        args = _as_tuple(additional_forward_args)
        if layers is not None and (not isinstance(layers, int) or layers < 1):
            raise ValueError(f"layers must be a positive int or None, got {layers!r}")
        if propagation not in ("row", "dense"):
            raise ValueError(f"propagation must be 'row' or 'dense', got {propagation!r}")
        if head_reduction not in ("mean", "max"):
            raise ValueError(f"head_reduction must be 'mean' or 'max', got {head_reduction!r}")
        reduce = dict(use_gradient=use_gradients, clamp=clamp, head_reduction=head_reduction)
        chosen = dict(PRESETS[self.preset])
        given = {"exclude_self": exclude_self, "code_split": code_split, "layernorm": layernorm, "score": score}
        chosen.update({key: value for key, value in given.items() if value is not None})
        _check_choice("code_split", chosen["code_split"], ("uniform", "gradient"))
        _check_choice("layernorm", chosen["layernorm"], ("exact", "detach"))
        _check_choice("score", chosen["score"], ("logit", "log_odds"))

        # Captum's NoiseTunnel and metrics call attribute() under torch.no_grad().
        with torch.enable_grad():
            pooled = propagation == "row" and self._capabilities.pooled_row_only
            options: dict[str, Any] = {"pooled_row_only": True} if pooled else {}
            fixed_scale = chosen["layernorm"] == "detach"
            if fixed_scale and self._capabilities.layernorm:
                options["layernorm"] = "detach"
            with FixedScaleLayerNorm() if fixed_scale and not self._capabilities.layernorm else nullcontext():
                captured = self.model.attention_forward(inputs_tuple, args, **options)
            logits = captured.logits
            if chosen["score"] == "log_odds":
                softmax = self._capabilities.activation(logits) == "softmax"
                explained = _select_target(logits, target, log_odds=softmax)
            else:
                explained = _select_target(logits, target)
            _check_depth(captured.attention, layers)
            streams = {key: list(maps[-layers:] if layers else maps) for key, maps in captured.attention.items()}
            _check_maps(streams, pooled_allowed=pooled)
            captured.attention = {}  # the propagation below holds the only references and drops them early
            split = _SplitInputs(captured) if chosen["code_split"] == "gradient" else _SplitInputs(None)
            if propagation == "row" and captured.stacked:
                rows, extra = _rows_fused(explained, streams, captured.pool_index, reduce, split.wanted)
            elif propagation == "row":
                rows, extra = _rows_collected(explained, streams, captured.pool_index, reduce, split.wanted)
            else:
                rows, extra = _rows_dense(explained, streams, captured.pool_index, reduce, split.wanted)
            if not chosen["exclude_self"]:  # the published rule's self term, added last (rows hold r - e_p)
                rows = {
                    key: increment + pooling_rows(captured.pool_index[key], increment.shape[1], increment.dtype)
                    for key, increment in rows.items()
                }
            relevance = split.codes(rows, extra)
        out = self.model.relevance_to_inputs(relevance, inputs_tuple, args)
        return out if is_tuple else out[0]

    # Captum's usage logging, which NoiseTunnel relies on (it calls ``attribute.__wrapped__``). Applied
    # by assignment rather than as ``@log_usage()``: mutation testing (``make mutation``) skips decorated
    # functions, and this one holds the option handling.
    attribute = log_usage()(attribute)


def _rows_fused(
    explained: Tensor, streams: dict[str, list[Optional[Tensor]]], pool_index: dict[str, Tensor], reduce: dict,
    extra: Sequence[Tensor] = (),
) -> tuple[dict[str, Tensor], tuple[Optional[Tensor], ...]]:
    """Row recursion inside the backward pass: each layer's hook consumes its gradient on arrival.

    Returns each stream's increment ``r - e_p`` of the pooling row (:func:`_propagate`). ``streams``
    hands over the references to the attention maps: each is dropped once its layer is done, so
    autograd can free it as the backward pass moves down instead of at the end. The gradients of
    ``extra`` (e.g. the embeddings) come from the same ``autograd.grad`` call.
    """
    rows: dict[str, Tensor] = {}
    pending: dict[str, int] = {}
    handles = []

    def make_hook(key: str, depth: int) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            if depth != pending[key]:  # the recursion needs every layer, from the last one down
                raise RuntimeError(
                    f"attention gradients of stream {key!r} did not arrive layer by layer from the last one "
                    f"(layer {depth} came when {pending[key]} was due): the layers are not a stack; "
                    "return AttentionForward(..., stacked=False)"
                )
            layer, streams[key][depth] = streams[key][depth], None
            with torch.no_grad(), full_precision(grad):  # autocast stays on in the backward pass
                if _deferred(layer):
                    rows[key] = _propagate_deferred(rows[key], layer, grad, depth, key, streams, pool_index, reduce)
                else:
                    rows[key] = _propagate(rows[key], layer.detach(), grad, depth, key, streams, pool_index, reduce)
            pending[key] = depth - 1

        return hook

    try:
        wanted = []
        for key, maps in streams.items():
            rows[key] = _no_increment(pool_index[key], maps[0])
            pending[key] = len(maps) - 1
            if not reduce["use_gradient"]:  # attention alone: no backward pass needed
                for depth in reversed(range(len(maps))):
                    rows[key] = _propagate(rows[key], _probabilities(maps[depth]), None, depth, key, streams, pool_index, reduce)
                pending[key] = -1
                continue
            for depth in range(len(maps)):
                handles.append(_graph_tensor(maps[depth]).register_hook(make_hook(key, depth)))
            wanted.append(_graph_tensor(maps[0]))  # the lowest layer used: the backward stops there
        grads = torch.autograd.grad(explained, wanted + list(extra), allow_unused=True) if wanted or extra else ()
    finally:
        for handle in handles:
            handle.remove()
    # A stream no gradient reached keeps r = e_p (d = 0), as in the dense path (A_bar = 0 for every layer).
    return rows, tuple(grads[len(wanted):])


def _no_increment(pool_index: Tensor, first_map: Any) -> Tensor:
    """``d = 0`` ``[B, L]`` for a stream, in float32 or the maps' dtype if wider."""
    dtype = torch.promote_types(first_map.dtype, torch.float32)
    return torch.zeros(pool_index.shape[0], first_map.shape[-1], dtype=dtype, device=pool_index.device)


def _propagate(
    increment: Tensor, attention: Tensor, grad: Optional[Tensor], depth: int, key: str,
    streams: Mapping[str, Sequence[Any]], pool_index: Mapping[str, Tensor], reduce: dict,
) -> Tensor:
    """One layer of the row recursion on the increment ``d = r - e_p``: ``d <- d + (e_p + d) A_bar``.

    The last layer (the first one processed) starts from ``d = 0`` and reads row ``p`` of its maps only.
    """
    top = depth == len(streams[key]) - 1
    return propagate_weighted_increment(
        None if top else increment, attention, grad, pool_index[key], use_gradient=reduce["use_gradient"],
        clamp=reduce["clamp"], head_reduction=reduce["head_reduction"],
    )


# On the CPU a deferred layer's maps are formed a quarter of the heads at a time (its peak memory); on an
# accelerator all at once, where the kernel launches of more groups cost more time than the maps take memory.
DEFERRED_HEAD_CHUNKS = 4


def _propagate_deferred(
    increment: Tensor, layer: Any, grad: Tensor, depth: int, key: str,
    streams: Mapping[str, Sequence[Any]], pool_index: Mapping[str, Tensor], reduce: dict,
) -> Tensor:
    """:func:`_propagate` for a :class:`DeferredAttention`, forming its maps a few heads at a time.

    The head mean of the clamped products is a sum over head groups, the head maximum a maximum over them,
    so the reduced ``[B, L, L]`` matrix is accumulated group by group and never more than a group's
    ``[B, h, L, L]`` maps exist at once (on the CPU; an accelerator forms all heads in one group). The last
    layer (``d = 0`` so far) is formed for the pooled row only. Maps are upcast to float32 at least before
    they are weighted. Only the backward hook of :func:`_rows_fused` calls it, so there is always a gradient.
    """
    top = depth == len(streams[key]) - 1
    batch, heads, _, length = layer.shape
    index = pool_index[key].long()
    rows = index if top else None
    step = -(-heads // DEFERRED_HEAD_CHUNKS) if grad.device.type == "cpu" else heads
    groups = [slice(start, min(heads, start + step)) for start in range(0, heads, step)]
    if reduce["head_reduction"] == "max":
        reduced: Optional[Tensor] = None
        for group in groups:
            weighted = weighted_attention(layer.probabilities(group, rows), layer.gradient(grad, group, rows), **reduce)
            reduced = weighted if reduced is None else torch.maximum(reduced, weighted)  # [B, Q', L]
        assert reduced is not None
        if top:
            return reduced[:, 0]
        return propagate_row_increment(increment, reduced, pooling_rows(index, length, increment.dtype))
    # the head mean, in place: (e_p + d) (1/H) sum_h clamp(A_h dA_h) without forming the head mean
    dtype = torch.promote_types(layer.dtype, torch.float32)
    left = None if top else (pooling_rows(index, length, increment.dtype) + increment).unsqueeze(1)
    total: Optional[Tensor] = None
    for group in groups:
        weighted = layer.probabilities(group, rows).to(dtype).mul_(layer.gradient(grad, group, rows))  # [B, h, Q', L]
        if reduce["clamp"]:
            weighted.clamp_(min=0)
        if left is None:
            part = weighted.sum(dim=1)[:, 0]  # [B, L]
        else:
            spread = left.repeat(1, 1, weighted.shape[1])  # [B, 1, h*L]: e_p + d once per head
            part = torch.bmm(spread, weighted.reshape(batch, -1, length)).squeeze(1)
        total = part if total is None else total.add_(part)
        del weighted
    assert total is not None
    return total / heads if top else increment + total / heads


def _gradients(
    explained: Tensor, streams: Mapping[str, list[Tensor]], reduce: dict, extra: Sequence[Tensor] = ()
) -> tuple[dict[str, list[Optional[Tensor]]], tuple[Optional[Tensor], ...]]:
    """The attention gradients of every layer of every stream, and those of ``extra``, from one ``autograd.grad`` call."""
    flat = [a for maps in streams.values() for a in maps]
    wanted = [_graph_tensor(a) for a in flat] if reduce["use_gradient"] else []
    grads: tuple[Optional[Tensor], ...] = ()
    if wanted or extra:
        grads = torch.autograd.grad(explained, wanted + list(extra), allow_unused=True)
    attention_grads = grads[: len(wanted)] if reduce["use_gradient"] else (None,) * len(flat)
    out, i = {}, 0
    for key, maps in streams.items():
        out[key] = [
            None if g is None else _attention_gradient(a, g).detach() for a, g in zip(maps, attention_grads[i : i + len(maps)])
        ]
        i += len(maps)
    return out, tuple(grads[len(wanted):])


def _rows_collected(
    explained: Tensor, streams: dict[str, list[Tensor]], pool_index: dict[str, Tensor], reduce: dict,
    extra: Sequence[Tensor] = (),
) -> tuple[dict[str, Tensor], tuple[Optional[Tensor], ...]]:
    """The row recursion (on increments ``r - e_p``) from gradients collected first, for attention layers
    that are not a stack."""
    rows = {}
    gradients, extra_grads = _gradients(explained, streams, reduce, extra)
    for key, grads in gradients.items():
        maps = streams[key]
        increment = _no_increment(pool_index[key], maps[0])
        for depth in reversed(range(len(maps))):
            increment = _propagate(increment, _probabilities(maps[depth]), grads[depth], depth, key, streams, pool_index, reduce)
        rows[key] = increment
    return rows, extra_grads


def _rows_dense(
    explained: Tensor, streams: dict[str, list[Tensor]], pool_index: dict[str, Tensor], reduce: dict,
    extra: Sequence[Tensor] = (),
) -> tuple[dict[str, Tensor], tuple[Optional[Tensor], ...]]:
    """The reference: all gradients at once, then the dense product ``R - I``, then read the pooling row."""
    rows = {}
    gradients, extra_grads = _gradients(explained, streams, reduce, extra)
    for key, grads in gradients.items():
        weighted = [weighted_attention(_probabilities(a), g, **reduce) for a, g in zip(streams[key], grads)]
        rows[key] = read_rows(dense_increment(weighted), pool_index[key])
    return rows, extra_grads


class _SplitInputs:
    """What ``code_split="gradient"`` needs from the backward pass, and the split itself.

    Per stream of nested visits (``captured.code_masks`` and ``[B, V, C, D]`` embeddings): the gradient
    at the code embeddings (every code of a visit gets the visit's gradient, as the model sums them);
    for a stream with ``state_values`` also the gradient at that value projection, which a second
    vector-Jacobian product, weighted by each state's relevance, takes back to the codes.
    ``_SplitInputs(None)`` splits nothing.
    """

    def __init__(self, captured: Optional[AttentionForward]) -> None:
        self.keys: list[str] = []
        self.wanted: list[Tensor] = []
        self._captured = captured
        if captured is None:
            return
        for key in captured.code_masks:
            embedding = captured.embeddings.get(key)
            if embedding is None or embedding.dim() != 4 or not embedding.requires_grad:
                raise ValueError(
                    f"code_split='gradient' needs the [B, V, C, D] code embeddings of stream {key!r} in the autograd "
                    f"graph, and attention_forward returned {_describe(embedding)}; return them in "
                    "AttentionForward(embeddings=...), or pass code_split='uniform'"
                )
            self.keys.append(key)
            values = captured.state_values.get(key)
            self.wanted.append(values if values is not None else embedding)

    def codes(self, rows: dict[str, Tensor], grads: Sequence[Optional[Tensor]]) -> dict[str, Tensor]:
        """``rows`` with each split stream's relevance replaced by ``[B, V, C]`` code relevance.

        The second vector-Jacobian product (``state_values``) needs no retained graph: the first backward
        pass stopped at the value projection and never ran the part below it.
        """
        if not self.keys:
            return rows
        captured = self._captured
        assert captured is not None
        out = dict(rows)
        for key, grad in zip(self.keys, grads):
            embedding, mask = captured.embeddings[key], captured.code_masks[key].to(rows[key].device).bool()
            values = captured.state_values.get(key)
            if values is None:
                visits = mask.shape[1]
                row = rows[key][:, :visits]
                if row.shape[1] < visits:  # visits the model truncated away get zero
                    row = torch.nn.functional.pad(row, (0, visits - row.shape[1]))
                shares = None if grad is None else (grad.to(row.dtype) * embedding.detach()).sum(-1)  # float32 at least
                out[key] = split_over_codes(row, shares, mask)
                continue
            # StageAttentionNet: sum_t r_t gV_t . V_t taken back to the codes (weights r_t known only now).
            shares = None
            if grad is not None:
                weights = (grad * rows[key].unsqueeze(-1)).to(values.dtype)
                (back,) = torch.autograd.grad(values, embedding, grad_outputs=weights)
                shares = (back.to(rows[key].dtype) * embedding.detach()).sum(-1).reshape(mask.shape[0], 1, -1)
            flat_mask = mask.reshape(mask.shape[0], 1, -1)
            out[key] = split_over_codes(rows[key].sum(dim=1, keepdim=True), shares, flat_mask).reshape(mask.shape)
        return out


def _check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _check_depth(attention: Mapping[str, Sequence[Tensor]], layers: Optional[int]) -> None:
    """``layers`` may not exceed the number of attention layers of any stream."""
    if layers is None:
        return
    depths = {key: len(maps) for key, maps in attention.items()}
    too_shallow = {key: depth for key, depth in depths.items() if depth < layers}
    if too_shallow:
        listed = ", ".join(f"{key!r} has {depth}" for key, depth in too_shallow.items())
        raise ValueError(
            f"layers={layers} asks for more attention layers than the model has ({listed}); pass layers between 1 "
            f"and {min(depths.values())}, or None for all of them"
        )


def _check_maps(streams: Mapping[str, Sequence[Tensor]], pooled_allowed: bool) -> None:
    """Each layer's attention must be ``[B, (H,) L, L]``; the last may be the pooled row alone when allowed."""
    for key, maps in streams.items():
        if not maps:
            raise ValueError(f"attention_forward returned no attention layers for stream {key!r}")
        length = maps[0].shape[-1]
        for depth, attention in enumerate(maps):
            last = depth == len(maps) - 1
            square = attention.shape[-2:] == (length, length)
            pooled = last and pooled_allowed and attention.shape[-2:] == (1, length)
            if len(attention.shape) not in (3, 4) or not (square or pooled):
                raise ValueError(
                    f"attention of stream {key!r}, layer {depth}, has shape {tuple(attention.shape)}; expected "
                    f"[B, H, {length}, {length}] like the first layer"
                    + (" (or [B, H, 1, L] for the last layer, when asked for the pooled row only)" if pooled_allowed else "")
                )


def _describe(embedding: Optional[Tensor]) -> str:
    if embedding is None:
        return "none"
    return f"a tensor of shape {tuple(embedding.shape)}" + ("" if embedding.requires_grad else " outside the graph")


def _deferred(layer: Any) -> bool:
    return not isinstance(layer, Tensor) and hasattr(layer, "graph_tensor")


def _graph_tensor(layer: Any) -> Tensor:
    """The tensor of a layer that the backward pass reaches: the probabilities, or a deferred layer's output."""
    return layer.graph_tensor if _deferred(layer) else layer


def _probabilities(layer: Any) -> Tensor:
    return layer.probabilities() if _deferred(layer) else layer.detach()


def _attention_gradient(layer: Any, grad: Optional[Tensor]) -> Optional[Tensor]:
    """The gradient of the probabilities, from the gradient of :func:`_graph_tensor`."""
    return layer.gradient(grad) if grad is not None and _deferred(layer) else grad


def _select_target(logits: Tensor, target: TargetType, log_odds: bool = False) -> Tensor:
    """Sum over the batch of each sample's target logit, validating ``target`` as Captum would.

    ``log_odds``: the target's softmax log-odds ``logit_t - logsumexp_{j != t} logit_j`` instead. An empty
    batch, a class outside the logits and a NaN or infinite score are refused with the fix.
    """
    if logits.dim() != 2:
        raise ValueError(f"the model must return logits [B, C]; got shape {tuple(logits.shape)}")
    batch, classes = logits.shape
    if batch == 0:
        raise ValueError("the batch holds no samples (batch size 0); pass inputs with at least one sample")
    if target is None:
        if classes != 1:
            raise ValueError(
                f"target is required: the model has {classes} outputs. Pass an int, a list or tensor of "
                f"{batch} class indices, or adapter.captum_target(batch)."
            )
        index = torch.zeros(batch, dtype=torch.long, device=logits.device)
    elif isinstance(target, bool):
        raise TypeError("target must be an int, a sequence of ints or a tensor, not a bool")
    elif isinstance(target, (int, Tensor, list, tuple)):
        index = torch.as_tensor(target, device=logits.device)
        if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            raise TypeError(f"target must hold integer class indices, got dtype {index.dtype}")
        if index.dim() == 0:
            index = index.expand(batch)
        elif index.dim() == 2 and index.shape[1] == 1:
            index = index[:, 0]
        if index.dim() != 1 or index.shape[0] != batch:
            raise ValueError(
                f"target must be one index for the batch or one per sample ({batch}); got shape "
                f"{tuple(index.shape)}. Multi-dimensional (tuple) targets are not supported."
            )
        index = index.long()
        check_target_range(index, classes)
    else:
        raise TypeError(f"target must be an int, a sequence of ints, a tensor or None; got {type(target).__name__}")
    if log_odds:
        scores = softmax_log_odds(logits, index)
    else:
        scores = logits.gather(1, index.view(-1, 1))[:, 0]
    finite = torch.isfinite(scores.detach())
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise ValueError(
            f"the explained output is NaN or infinite for sample(s) {bad[:10]}{' ...' if len(bad) > 10 else ''}; its "
            "relevance would be NaN too. Check those samples' inputs and the model's weights (a model trained into "
            "NaN, an overflow in half precision)"
        )
    return scores.sum()


def _as_tuple(args: Any) -> tuple:
    if args is None:
        return ()
    return args if isinstance(args, tuple) else (args,)

