"""Adapters: one per model library, each a Captum ``forward_func`` that also exposes the model's attention.

Every adapter offers the same methods under the same names (see :mod:`captum_chefer.adapters.base`), so
comparison, visualization and cohort code work with any of them. :func:`adapter_for` picks the adapter
for a model.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import Adapter, DecodedToken, MethodRecord, uncompiled
from .huggingface import HuggingFaceAdapter
from .pyhealth import FeatureSpec, PyHealthAdapter
from .torch import TransformerAdapter

__all__ = [
    "Adapter", "DecodedToken", "FeatureSpec", "HuggingFaceAdapter", "MethodRecord", "PyHealthAdapter",
    "TransformerAdapter", "adapter_for",
]


def adapter_for(model: Any, **kwargs: Any) -> Adapter:
    """The adapter for ``model``: an adapter is returned as is, a PyHealth model gets a ``PyHealthAdapter``, a
    ``transformers`` model a ``HuggingFaceAdapter`` (it needs a classification head); any other model is
    refused with a pointer to ``TransformerAdapter``, which needs to be told how the model pools.

    Args:
        model: a trained model (or an adapter).
        **kwargs: passed to the adapter's constructor.

    Example:
        >>> from captum_chefer.synthetic import toy_model_and_batch
        >>> model, _ = toy_model_and_batch()
        >>> type(adapter_for(model)).__name__
        'PyHealthAdapter'
    """
    if isinstance(model, Adapter):
        if kwargs:
            raise TypeError("model is already an adapter; pass options when you make it, not to adapter_for")
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"adapter_for needs a torch model (nn.Module), got {type(model).__name__}")
    if _is_pyhealth(uncompiled(model)):
        return PyHealthAdapter(model, **kwargs)
    if _is_transformers(model):
        return HuggingFaceAdapter(model, **kwargs)
    raise TypeError(
        f"no adapter is picked automatically for {type(model).__name__}; automatic: PyHealth models (PyHealthAdapter) "
        "and transformers classifiers (HuggingFaceAdapter). For any other transformer classifier use "
        "TransformerAdapter(model, pool='first' | 'last' | position, prefix_tokens=...); gradient methods such as "
        "captum.attr.IntegratedGradients work on any forward function."
    )


def _is_pyhealth(model: nn.Module) -> bool:
    return any(cls.__module__.startswith("pyhealth.") and cls.__name__ == "BaseModel" for cls in type(model).__mro__)


def _is_transformers(model: nn.Module) -> bool:
    return any(cls.__module__ == "transformers.modeling_utils" and cls.__name__ == "PreTrainedModel" for cls in type(model).__mro__)
