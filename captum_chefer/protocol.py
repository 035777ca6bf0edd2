"""What an attention model offers Chefer's algorithm: the interface between the adapters and the Captum method.

The Captum method (:mod:`captum_chefer.attribution`) and the adapters (:mod:`captum_chefer.adapters`) both
depend on this module and on the math (:mod:`captum_chefer.relevance`), never on each other:

* :class:`AttentionModel`: what a forward function must offer (``attention_forward`` and
  ``relevance_to_inputs``), and :class:`AttentionForward`, what one captured forward pass returns (with
  :class:`DeferredAttention` for attention that is formed only when its gradient is needed);
* :class:`Capabilities`: the optional parts of the interface, read in one place: whether
  ``attention_forward`` takes ``pooled_row_only`` and ``layernorm``, the ``require_attention`` check, and
  the output activation (``probabilities``);
* the options' types (:data:`TargetType`, :data:`LayerNormMode`, :data:`Activation`) and
  :func:`check_target_range`, the check of a target against the model's outputs that every adapter and the
  method share.

An adapter of :mod:`captum_chefer.adapters` implements all of it; a forward function of your own needs only
the two methods of :class:`AttentionModel`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "Activation", "AttentionForward", "AttentionModel", "Capabilities", "DeferredAttention", "LayerNormMode",
    "TargetType", "check_target_range",
]

TargetType = int | Sequence[int] | Tensor | None
#: ``"exact"``: the model's layer norms as they are; ``"detach"``: each holds its standard deviation constant
#: for the backward pass (:mod:`captum_chefer.layernorm`).
LayerNormMode = Literal["exact", "detach"]
#: How a model turns its logits into probabilities: a softmax over the classes, or a sigmoid of each logit.
Activation = Literal["softmax", "sigmoid"]


@dataclass
class AttentionForward:
    """What one forward pass with attention capture returns.

    Attributes:
        logits: ``[B, C]`` model outputs, in the autograd graph.
        attention: per attention stream (a feature key), the attention probabilities of each layer,
            first (closest to the input) to last, each ``[B, H, L, L]`` and in the autograd graph, or a
            :class:`DeferredAttention` that forms them when the backward pass reaches its layer. When
            ``attention_forward`` was called with ``pooled_row_only=True``, the last layer's may be
            ``[B, H, 1, L]``: each sample's row of its pooling position alone.
        pool_index: per stream, ``[B]`` the position whose output the model pools.
        stacked: each layer's attention is computed from the output of the layer below (a transformer
            stack), so the backward pass delivers the gradients from the last layer down and the row can
            be updated as they arrive. ``False`` collects all gradients first.
        embeddings: per stream, the embedded input as the model received it (``[B, L, D]``, or
            ``[B, V, C, D]`` for nested visits), in the graph below the first attention layer; optional
            (gradient-based splits of a position's relevance over its parts read it).
        code_masks: per stream of nested visits, ``[B, V, C]``, ``True`` on real codes. With
            ``embeddings`` it lets ``code_split="gradient"`` split each visit's relevance over its codes.
        state_values: per stream whose attended positions are recurrent states that each carry every
            visit up to theirs (``StageAttentionNet``'s LSTM states), the first attention layer's value
            projection ``[B, L, D_v]`` in the graph. ``code_split="gradient"`` then splits the stream's
            relevance over the codes of all visits by their contribution through that value path.
    """

    logits: Tensor
    attention: dict[str, list[Any]]
    pool_index: dict[str, Tensor]
    stacked: bool = True
    embeddings: dict[str, Tensor] = field(default_factory=dict)
    code_masks: dict[str, Tensor] = field(default_factory=dict)
    state_values: dict[str, Tensor] = field(default_factory=dict)


@runtime_checkable
class DeferredAttention(Protocol):
    """A layer's attention kept out of the autograd graph until its gradient is needed.

    A model that computes attention without materialising the probabilities (SDPA, flash attention) keeps
    each layer's ``[B, H, L, L]`` map out of memory; the relevance needs the map and its gradient for one
    layer at a time, as the backward pass reaches it. ``graph_tensor`` is a tensor of the layer in the
    graph (its output ``A V``); ``gradient`` maps the gradient of ``graph_tensor`` to the gradient of the
    probabilities; ``probabilities`` forms them. Both take a slice of ``heads`` and, optionally, one query
    row per sample (``rows``, ``[B]``; the result is then ``[B, H, 1, K]``), so that the relevance forms
    them a few heads at a time and, for the last layer, the pooled row alone. ``shape`` and ``dtype`` are
    the probabilities'.
    """

    shape: torch.Size
    dtype: torch.dtype
    graph_tensor: Tensor

    def probabilities(self, heads: slice | None = None, rows: Tensor | None = None) -> Tensor: ...

    def gradient(self, output_gradient: Tensor, heads: slice | None = None, rows: Tensor | None = None) -> Tensor: ...


@runtime_checkable
class AttentionModel(Protocol):  # pragma: no mutate block (an interface: no code to mutate)
    """What ``CheferAttribution`` needs from its forward function, besides being callable.

    ``attention_forward`` runs the model in evaluation mode with attention capture and leaves the
    model exactly as it found it when it returns or raises. With ``pooled_row_only=True`` only the
    pooling position's output of the last attention layer is needed (the row recursion reads nothing
    else of that layer), so a model may compute that layer for the pooling position alone and return its
    attention as ``[B, H, 1, L]``; returning the full map is always correct. With ``layernorm="detach"``
    the model holds its layer norms' standard deviation constant for the backward pass
    (:mod:`captum_chefer.layernorm`). Both keywords are optional: an ``attention_forward`` without one is
    called without it (:class:`Capabilities`), and ``CheferAttribution`` then holds every ``layer_norm`` call's
    scale itself. ``relevance_to_inputs`` maps each stream's token relevance ``[B, L]`` back to tensors shaped
    like ``inputs``; for a stream of nested visits it may be given ``[B, V, C]`` instead, each code's relevance
    (``code_split``).
    """

    def __call__(self, *args: Any) -> Tensor: ...

    def attention_forward(
        self, inputs: tuple[Tensor, ...], additional_forward_args: tuple, *, pooled_row_only: bool = False,
        layernorm: LayerNormMode = "exact",
    ) -> AttentionForward: ...

    def relevance_to_inputs(
        self, relevance: Mapping[str, Tensor], inputs: tuple[Tensor, ...], additional_forward_args: tuple
    ) -> tuple[Tensor, ...]: ...


@dataclass(frozen=True)
class Capabilities:
    """The optional parts of :class:`AttentionModel` that one forward function offers, read once.

    Attributes:
        pooled_row_only: ``attention_forward`` takes ``pooled_row_only`` (it may return the last layer's
            pooled row alone); one written without it is called without it and returns full maps.
        layernorm: ``attention_forward`` takes ``layernorm`` and holds its own layer norms' scale for
            ``"detach"`` (cheaper than :class:`~captum_chefer.layernorm.FixedScaleLayerNorm` around the call).
        require_attention: raises ``ValueError`` when the model has no attention to propagate (``None``:
            the model does not say, and the first call finds out).
        probabilities: the model's class probabilities from its logits (``None``: softmax, or sigmoid of a
            single logit).

    Example:
        >>> class Minimal:
        ...     def __call__(self, x): return x
        ...     def attention_forward(self, inputs, additional_forward_args): ...
        ...     def relevance_to_inputs(self, relevance, inputs, additional_forward_args): ...
        >>> capabilities = Capabilities.of(Minimal())
        >>> capabilities.pooled_row_only, capabilities.layernorm, capabilities.require_attention
        (False, False, None)
        >>> capabilities.activation(torch.zeros(2, 3)), capabilities.activation(torch.zeros(2, 1))
        ('softmax', 'sigmoid')
    """

    pooled_row_only: bool
    layernorm: bool
    require_attention: Callable[[], None] | None
    probabilities: Callable[[Tensor], Tensor] | None

    @classmethod
    def of(cls, model: AttentionModel) -> Capabilities:
        """What ``model`` offers beyond the two methods every :class:`AttentionModel` has."""
        return cls(
            pooled_row_only=_accepts_keyword(model.attention_forward, "pooled_row_only"),
            layernorm=_names_keyword(model.attention_forward, "layernorm"),
            require_attention=getattr(model, "require_attention", None),
            probabilities=getattr(model, "probabilities", None),
        )

    def activation(self, logits: Tensor) -> Activation:
        """Whether the model's probabilities are a softmax of ``logits`` ``[B, C]`` or a sigmoid of each.

        A single logit is always a sigmoid; a model without ``probabilities`` has a softmax over several; a
        model with it is asked, on ``logits`` themselves (multi-label models have several sigmoids).
        """
        if logits.shape[1] == 1:
            return "sigmoid"
        if self.probabilities is None:
            return "softmax"
        probe = logits.detach()
        return "softmax" if bool(torch.allclose(self.probabilities(probe), probe.softmax(dim=1))) else "sigmoid"


def check_target_range(target: Any, classes: int) -> None:
    """Refuse a target (int, ints, integer tensor) that names an output the model does not have.

    Captum's methods index the logits with the target; a class beyond them fails deep inside torch (on a
    GPU as a device-side assert), and a negative one silently counts from the end. A single-logit (binary)
    model has only output 0, the positive class's score, whatever class the user has in mind.

    Example:
        >>> check_target_range(torch.tensor([0, 2]), 3)
        >>> check_target_range(1, 1)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: target 1 is out of range for a model with a single logit (binary): that logit is the ...
    """
    if isinstance(target, bool):
        raise TypeError("target must be an int, a sequence of ints or a tensor, not a bool")
    if isinstance(target, int):
        values = torch.tensor([target])
    elif isinstance(target, Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            return  # not class indices; the caller's own check says so
        values = target.detach().reshape(-1)
    elif isinstance(target, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in target):
        values = torch.tensor(target, dtype=torch.long).reshape(-1)
    else:
        return  # tuples (multi-dimensional targets) and lists of them: Captum's own indexing rules
    if values.numel() == 0 or not bool(((values < 0) | (values >= classes)).any()):
        return
    bad = sorted({int(v) for v in values[(values < 0) | (values >= classes)].cpu()})
    shown = bad[0] if len(bad) == 1 else bad[:10]
    if classes == 1:
        raise ValueError(
            f"target {shown} is out of range for a model with a single logit (binary): that logit is the positive "
            "class's score, explained with target=None (or 0)"
        )
    raise ValueError(
        f"target {shown} is out of range: the model has {classes} outputs, so targets are class indices "
        f"0..{classes - 1}"
    )


def _accepts_keyword(function: Callable[..., Any], name: str) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # no signature to read: do not pass it
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _names_keyword(function: Callable[..., Any], name: str) -> bool:
    """Whether ``function`` has a parameter called ``name`` (``**kwargs`` does not count)."""
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
