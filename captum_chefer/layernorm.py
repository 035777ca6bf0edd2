"""Holding LayerNorm's scale fixed for the backward pass, the ``layernorm="detach"`` option, in one place.

LayerNorm divides by the standard deviation of its input. Its scale invariance bends the gradient away from a
dominant input, which hides that input from gradient-weighted attention; with ``"detach"`` every layer norm
divides by its standard deviation held constant for the backward pass (the forward values, and so the
prediction, are unchanged). The math is :func:`captum_chefer.relevance.layer_norm_fixed_scale`;
:class:`FixedScaleLayerNorm` applies it to every ``layer_norm`` call in this thread within the block, whatever
module makes it. :class:`~captum_chefer.attribution.CheferAttribution` uses it around a forward function whose
``attention_forward`` has no ``layernorm`` keyword; an adapter with that keyword may replace its own
``nn.LayerNorm`` modules instead (cheaper: no other torch call is seen).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from .relevance import layer_norm_fixed_scale

__all__ = ["FixedScaleLayerNorm"]


class FixedScaleLayerNorm(TorchFunctionMode):
    """Within the block, in this thread, every ``layer_norm`` holds its standard deviation constant for the backward
    pass.

    What ``CheferAttribution(..., layernorm="detach")`` uses for models whose ``attention_forward`` has no
    ``layernorm`` keyword of its own (an adapter that has one may override only its ``nn.LayerNorm`` layers,
    which costs less than seeing every torch call).

    Example:
        >>> x = torch.tensor([[1.0, 2.0, 4.0]], requires_grad=True)
        >>> with FixedScaleLayerNorm():
        ...     y = torch.nn.functional.layer_norm(x, (3,))
        >>> torch.autograd.grad(y.sum(), x)[0].abs().max().item() < 1e-6  # the centring alone
        True
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.layer_norm:  # torch hands over (input, normalized_shape) by position
            return layer_norm_fixed_scale(*args, **kwargs)
        return func(*args, **kwargs)
