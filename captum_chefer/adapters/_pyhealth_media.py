"""PyHealth's image and text models inside ``PyHealthAdapter``: ``TorchvisionModel`` (ViT) and ``TransformersModel``.

Kept apart from :mod:`captum_chefer.adapters.pyhealth`, which maps code features (sequences, visits, stagenet
times) and would double in size otherwise. ``PyHealthAdapter`` stays the one public class: for these two
models it reads PyHealth's batch dicts and its labels itself and hands everything else to an inner adapter
made here, the generic machinery of :mod:`captum_chefer.adapters.torch` and
:mod:`captum_chefer.adapters.huggingface`:

* ``TorchvisionModel`` with a ViT (``vit_b_16`` ...): the torchvision ``VisionTransformer`` it wraps is a
  :class:`~captum_chefer.adapters.torch.TransformerAdapter` case (pool the class token, one prefix token,
  the model's patch size; the last block computed for the class token alone under Chefer).
* ``TransformersModel``: a ``transformers`` encoder whose ``pooler_output`` ([CLS]) feeds PyHealth's own
  dropout and linear head: a :class:`~captum_chefer.adapters.huggingface.HuggingFaceAdapter` encoder case
  with that head.

PyHealth 2.1's ViT reference ``pyhealth.interpret.methods.chefer._reference_attribute_vit`` (through
``TorchvisionModel.forward_with_attention``) differs from the model in two ways, measured on ``vit_b_16``:
it skips the encoder's ``pos_embedding`` (and its dropout), so it explains a model without position
embeddings (logits 0.1 apart on random weights); and it collects the attention gradients with
``list.insert(layer, grad)`` from hooks that fire last layer first, which pairs layer ``k``'s map with
another layer's gradient from the third layer on (12 layers: gradient order 0, 11, 1, 10, 2, 9, ...).
This adapter follows the model's own forward. The two agree where the reference is right: up to two
encoder blocks with ``pos_embedding`` zero.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from .huggingface import HuggingFaceAdapter
from .torch import TransformerAdapter, logits_of

__all__ = ["media_adapter", "media_batch"]

TOKENIZER_SETTINGS = {"return_tensors": "pt", "padding": True, "truncation": True, "max_length": 256}  # TransformersModel.forward's


def media_adapter(model: nn.Module) -> Optional[TransformerAdapter]:
    """The inner adapter of a ``TorchvisionModel`` ViT or a ``TransformersModel``; ``None`` for other models.

    Raises ``ValueError`` for a ``TorchvisionModel`` without attention over patches (ResNet, DenseNet, Swin).
    """
    from pyhealth.models import TorchvisionModel, TransformersModel

    if isinstance(model, TorchvisionModel):
        network = model.model
        if not (type(network).__name__ == "VisionTransformer" and type(network).__module__.startswith("torchvision.")):
            raise ValueError(
                f"PyHealthAdapter supports TorchvisionModel's ViT variants (vit_b_16, vit_b_32, vit_l_16, vit_l_32, "
                f"vit_h_14); {model.model_name!r} has no attention over patch tokens for Chefer relevance. For ResNet, "
                "DenseNet or Swin use a gradient method on the network, e.g. captum.attr.IntegratedGradients(model.model) "
                "or Saliency(model.model) on the batch's images"
            )
        return TransformerAdapter(
            network, pool="first", prefix_tokens=1, patch_size=int(network.patch_size),
            feature_key=model.feature_keys[0], num_outputs=int(model.get_output_size()),
        )
    if isinstance(model, TransformersModel):
        return _TransformersModelAdapter(model)
    return None


def media_batch(model: nn.Module, batch: Any) -> Any:
    """The inner adapter's batch for a PyHealth batch dict: images as the model sees them, or an encoding."""
    from pyhealth.models import TorchvisionModel

    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a dict from pyhealth.datasets.get_dataloader, got {type(batch).__name__}")
    key = model.feature_keys[0]
    if key not in batch:
        raise KeyError(f"the batch has no feature {key!r}; the model needs {model.feature_keys}, the batch has {sorted(batch)}")
    value = batch[key]
    if isinstance(model, TorchvisionModel):
        if not isinstance(value, Tensor) or value.dim() != 4 or not value.is_floating_point():
            raise TypeError(f"feature {key!r} must be a float image tensor [B, C, H, W], got {getattr(value, 'shape', type(value).__name__)}")
        value = value.to(model.device)
        return value.repeat(1, 3, 1, 1) if value.shape[1] == 1 else value  # as TorchvisionModel.forward does
    texts = [value] if isinstance(value, str) else list(value) if isinstance(value, Iterable) else []
    if not texts or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"feature {key!r} must be a list of texts, got {type(value).__name__}")
    encoding = model.tokenizer(texts, **TOKENIZER_SETTINGS)
    return {k: v.to(model.device) for k, v in encoding.items()}


class _TransformersModelAdapter(HuggingFaceAdapter):
    """``TransformersModel``: its encoder's [CLS] ``pooler_output`` -> PyHealth's dropout and ``fc`` head."""

    def __init__(self, model: nn.Module) -> None:
        encoder = model.model
        TransformerAdapter.__init__(
            self, model, pool="first", prefix_tokens=0, embedding=encoder.get_input_embeddings(),
            pad_id=getattr(model.tokenizer, "pad_token_id", None), mask_arg=0, feature_key=model.feature_keys[0],
            num_outputs=int(model.get_output_size()),
        )
        if getattr(getattr(encoder, "pooler", None), "dense", None) is None:
            raise ValueError(
                f"{type(encoder).__name__} has no pooler: TransformersModel reads pooler_output, which it does not give"
            )
        self.kind = "encoder"
        self.tokenizer = model.tokenizer
        self._carries_ids = False
        self._callee = encoder
        self._takes_token_types = "token_type_ids" in _parameters(encoder.forward)

    def _logits(self, x: Tensor, args: tuple) -> Tensor:
        pooled = self._callee(**self._text_kwargs(x, args)).pooler_output
        return logits_of(self.model.fc(self.model.dropout(pooled)))


def _parameters(function: Any) -> set[str]:
    import inspect

    return set(inspect.signature(function).parameters)
