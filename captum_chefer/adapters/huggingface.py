"""``HuggingFaceAdapter``: a ``transformers`` classifier as one Captum ``forward_func``.

Covered: sequence classification with an encoder (BERT, RoBERTa, DistilBERT, ...: the head reads [CLS])
or a decoder (GPT-2 and Llama-style models: the head reads the last real token), and image
classification (ViT, DeiT, ...: the head reads the class token).

Captum arguments, from a tokenizer's ``BatchEncoding`` (or a dict of ``input_ids`` and
``attention_mask``) or an image processor's ``pixel_values``:

* ``inputs``: ``(input_ids,)`` at ``level="token"``; ``(inputs_embeds,)`` (the word embeddings, before the
  model adds positions) at ``level="embedding"``; ``(pixel_values,)`` for images.
* ``additional_forward_args``: ``(attention_mask,)``, then ``token_type_ids`` when the encoding has
  them and the model takes them; nothing for images.

Attention is captured by :class:`captum_chefer.capture.AttentionCapture`: a model on SDPA or flash
attention runs the model file's eager attention for the capturing call only, and its setting is as found
afterwards. This module reuses the generic machinery of :class:`captum_chefer.adapters.torch.TransformerAdapter`
(pooling, masks, removal, the mapping back to tokens and patches) and adds what is particular to
``transformers``: reading encodings, calling the model with keywords, the pooled position of each
architecture, the tokenizer's tokens for display and its special tokens as IG references.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Literal, Mapping, Optional

import torch
from torch import Tensor, nn

from .._optional import extra
from .base import MethodRecord
from .torch import Pool, TransformerAdapter, blurred_images, logits_of

__all__ = ["HuggingFaceAdapter"]

Kind = Literal["encoder", "decoder", "image"]
Reference = Literal["unk", "pad", "mask", "zero", "blur"]

# What a tokenizer may return beside the model's inputs; nothing a classifier's forward reads.
_TOKENIZER_EXTRAS = ("special_tokens_mask", "offset_mapping", "length", "overflow_to_sample_mapping")

# Heads that read more than one position: following the class token alone would explain half the head.
_MULTI_POSITION_HEADS = {
    "DeiTForImageClassificationWithTeacher": "averages a [CLS] head and a distillation-token head",
    "Dinov2ForImageClassification": "reads [CLS] and the mean of the patch tokens",
    "Dinov2WithRegistersForImageClassification": "reads [CLS] and the mean of the patch tokens",
}


class HuggingFaceAdapter(TransformerAdapter):
    """A ``transformers`` model with a classification head as a Captum forward function.

    ``adapter(*inputs, *additional_forward_args)`` returns the logits ``[B, C]``; the same adapter serves
    :class:`captum_chefer.CheferAttribution`, ``IntegratedGradients``, ``Saliency``, ``NoiseTunnel`` and
    ``LayerIntegratedGradients`` (on ``adapter.embedding_layers``: the word embeddings).

    Args:
        model: a ``*ForSequenceClassification`` or ``*ForImageClassification`` model.
        tokenizer: the model's tokenizer, for ``decode`` / ``visualization_records`` (word pieces) and
            the ``"unk"`` / ``"mask"`` IG references (optional).
        pool: the position Chefer follows; default read from the architecture: [CLS] (position 0) for
            encoders and image models, the last real token (``"last"``: the last position the attention
            mask marks real, whether padding is on the left or the right) for decoder classifiers. Also
            an int or a callable (see :class:`~captum_chefer.adapters.torch.TransformerAdapter`).

    Every layer is computed in full under Chefer: a ``transformers`` layer computes its queries inside its
    attention module from the whole sequence, so evaluating the last layer for the pooled row alone would
    mean rewriting each architecture's layer (the shortcut applies to PyHealth's ``Transformer`` and
    torchvision's ViT, whose blocks are small and known).

    Decoder classifiers: ``transformers`` pools the last token that is not ``pad_token_id`` (and, given
    ``inputs_embeds``, the last position, padding or not); this adapter pools the last token the
    attention mask marks real, at the token and the embedding level alike, so both levels give the
    logits the model gives for its ids. The two rules differ only where a real token equals the pad
    token (GPT-2 with ``pad_token_id = eos_token_id`` and an eos inside the text).

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> from captum_chefer import CheferAttribution, HuggingFaceAdapter
        >>> _ = torch.manual_seed(0)
        >>> config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        ...                     intermediate_size=32, num_labels=2)
        >>> model = BertForSequenceClassification(config).eval()   # SDPA attention, as loaded
        >>> encoding = {"input_ids": torch.tensor([[2, 7, 9, 3], [2, 8, 3, 0]]),
        ...             "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])}
        >>> adapter = HuggingFaceAdapter(model)
        >>> inputs, args = adapter.captum_inputs(encoding, level="token")
        >>> (scores,) = CheferAttribution(adapter).attribute(
        ...     inputs, target=adapter.captum_target(encoding), additional_forward_args=args)
        >>> tuple(scores.shape), float(scores[1, 3]), model.config._attn_implementation
        ((2, 4), 0.0, 'sdpa')
    """

    def __init__(self, model: nn.Module, *, tokenizer: Any = None, pool: Optional[Pool] = None) -> None:
        kind = self._classifier_kind(model)
        name = type(model).__name__
        if pool is None and name in _MULTI_POSITION_HEADS:
            raise ValueError(
                f"{name}'s head {_MULTI_POSITION_HEADS[name]}; Chefer follows one position. Pass pool=0 to follow "
                "the [CLS] token (part of the head only), or use a gradient method such as IntegratedGradients(adapter)"
            )
        config = model.config
        text = kind != "image"
        patch_size = getattr(config, "patch_size", None) if not text else None
        if isinstance(patch_size, (list, tuple)):
            patch_size = tuple(int(p) for p in patch_size)
        pad_id = _text_config_value(config, "pad_token_id")
        if pad_id is None and tokenizer is not None:
            pad_id = getattr(tokenizer, "pad_token_id", None)
        super().__init__(
            model,
            pool=pool if pool is not None else ("last" if kind == "decoder" else "first"),
            prefix_tokens=0,
            patch_size=patch_size,
            embedding=model.get_input_embeddings() if text else None,
            pad_id=pad_id,
            mask_arg=0 if text else None,
            feature_key="input_ids" if text else "pixel_values",
            num_outputs=int(config.num_labels),
        )
        self.kind: Kind = kind
        self.tokenizer = tokenizer
        self._carries_ids = False  # transformers models take inputs_embeds themselves
        self._callee = getattr(model, model.base_model_prefix) if kind == "decoder" else model
        self._takes_token_types = "token_type_ids" in inspect.signature(self._callee.forward).parameters
        if kind == "decoder" and not isinstance(getattr(model, "score", None), nn.Module):
            raise TypeError(
                f"{name} pools its last token but has no `score` head this adapter knows how to apply; "
                "use TransformerAdapter(model, pool='last', ...) with your own forward"
            )

    @staticmethod
    def _classifier_kind(model: nn.Module) -> Kind:
        """``"encoder"``, ``"decoder"`` or ``"image"``; raise for models without a classification head."""
        with extra("huggingface"):
            from transformers import PreTrainedModel
            from transformers.models.auto import modeling_auto

        if not isinstance(model, PreTrainedModel):
            raise TypeError(f"HuggingFaceAdapter needs a transformers model (PreTrainedModel), got {type(model).__name__}")
        name = type(model).__name__

        def names(mapping: Mapping[str, Any]) -> set[str]:
            out: set[str] = set()
            for value in mapping.values():
                out.update((value,) if isinstance(value, str) else value)
            return out

        # a subclass of a transformers classifier (a custom loss, say) is the classifier it extends
        lineage = [k.__name__ for k in type(model).__mro__]
        image, sequence = (names(modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES),
                           names(modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES))
        if any(k in image or k.endswith("ForImageClassification") for k in lineage):
            return "image"
        if any(k in sequence or k.endswith("ForSequenceClassification") for k in lineage):
            return "decoder" if _pools_last_token(type(model)) else "encoder"
        raise TypeError(
            f"{name} has no classification head: HuggingFaceAdapter explains a classifier's logits. Load the model "
            "with AutoModelForSequenceClassification or AutoModelForImageClassification (or wrap your own head with "
            "TransformerAdapter)"
        )

    # ------------------------------------------------------------------ model description

    @property
    def embedding_layers(self) -> list[nn.Module]:
        """The word embeddings (text) or the patch embedding (images), for ``LayerIntegratedGradients``."""
        return [self.embedding] if self.embedding is not None else [self.model.get_input_embeddings()]

    # ------------------------------------------------------------------ batch <-> Captum

    def captum_inputs(self, batch: Any, level: str = "embedding") -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """``(inputs, additional_forward_args)`` for a ``BatchEncoding`` (or dict), or for ``pixel_values``.

        Args:
            batch: a tokenizer's ``BatchEncoding`` / a dict with ``input_ids`` (and ``attention_mask``,
                ``token_type_ids``, ``labels``), or an image processor's output / a dict with
                ``pixel_values``, or the ``pixel_values`` tensor itself.
            level: ``"embedding"`` (word embeddings, for gradient methods) or ``"token"`` (ids, for
                ``LayerIntegratedGradients``, token removal and Chefer); images give pixels at either.
        """
        return super().captum_inputs(batch, level)  # type: ignore[arg-type]

    def baselines(
        self, inputs: tuple[Tensor, ...], additional_forward_args: tuple[Tensor, ...], reference: Reference = "unk"
    ) -> tuple[Tensor, ...]:
        """Integrated Gradients baselines: padding stays padding, every real token gets a reference token.

        Args:
            inputs: ``captum_inputs(...)[0]`` at either level.
            additional_forward_args: the matching arguments (the attention mask is read).
            reference: text: ``"unk"`` (the tokenizer's unknown token), ``"mask"`` ([MASK]), ``"pad"``
                (the pad token) or ``"zero"`` (a zero embedding; the pad id at token level); images:
                ``"zero"`` (black) or ``"blur"`` (a Gaussian blur, sigma a quarter of the patch size).
        """
        (x,) = tuple(inputs)
        if self.kind == "image":
            if reference == "zero":
                return (torch.zeros_like(x),)
            if reference == "blur":
                return (blurred_images(x, max(self._patch_size()) / 4.0),)
            raise ValueError(f"image baselines are 'zero' or 'blur', got {reference!r}")
        if reference not in ("unk", "pad", "mask", "zero"):
            raise ValueError(f"text baselines are 'unk', 'mask', 'pad' or 'zero', got {reference!r}")
        mask = self._token_mask(x, tuple(additional_forward_args)).to(x.device)
        if reference == "zero" and x.is_floating_point():
            return (torch.where(mask.unsqueeze(-1), torch.zeros_like(x), x),)
        token = self._reference_id("pad" if reference == "zero" else reference)
        if not x.is_floating_point():
            return (torch.where(mask, torch.full_like(x, token), x),)
        with torch.no_grad():
            embedded = self.embedding(torch.tensor([[token]], device=x.device)).to(x.dtype)
        return (torch.where(mask.unsqueeze(-1), embedded.expand_as(x), x),)

    def _reference_id(self, reference: str) -> int:
        if reference == "pad":
            if self.pad_id is None:
                raise ValueError(f"{type(self.model).__name__} has no pad token; use reference='zero' or pass a tokenizer with one")
            return int(self.pad_id)
        attribute = f"{reference}_token_id"
        value = getattr(self.tokenizer, attribute, None) if self.tokenizer is not None else None
        if value is None:
            raise ValueError(
                f"reference {reference!r} needs the tokenizer's {attribute}: HuggingFaceAdapter(model, tokenizer=...), "
                "or use reference='pad' or 'zero'"
            )
        return int(value)

    # ------------------------------------------------------------------ display

    def class_names(self) -> dict[int, str]:
        """``config.id2label``."""
        return {int(i): str(label) for i, label in (getattr(self.model.config, "id2label", None) or {}).items()}

    def true_classes(self, batch: Any) -> Optional[list[str]]:
        """Each sample's ``labels`` as text, or ``None`` when the batch has none."""
        labels = batch.get("labels") if isinstance(batch, Mapping) else None
        if labels is None:
            return None
        names = self.class_names()
        rows = torch.as_tensor(labels).detach().cpu().reshape(len(labels), -1)
        if rows.shape[1] > 1:  # multi-label
            return [",".join(names.get(j, str(j)) for j in row.nonzero().flatten().tolist()) for row in rows]
        return [names.get(int(v), str(int(v))) for v in rows[:, 0]]

    def probabilities(self, logits: Tensor) -> Tensor:
        """Softmax, or sigmoid for multi-label models and a single logit."""
        if getattr(self.model.config, "problem_type", None) == "multi_label_classification" or logits.shape[1] == 1:
            return torch.sigmoid(logits)
        return logits.softmax(dim=1)

    def visualization_records(
        self, batch: Any, attributions: Any, target: Any = None, *, method: Optional[str] = None,
        delta: Optional[Tensor] = None, tokenizer: Any = None,
    ) -> list[MethodRecord]:
        """:meth:`Adapter.visualization_records <captum_chefer.adapters.base.Adapter.visualization_records>`,
        with the word pieces of ``tokenizer`` (default: the one the adapter was given)."""
        adapter = self
        if tokenizer is not None and tokenizer is not self.tokenizer:
            adapter = copy.copy(self)  # shares the model; only the tokenizer differs
            adapter.tokenizer = tokenizer
        return super(HuggingFaceAdapter, adapter).visualization_records(batch, attributions, target, method=method, delta=delta)

    def _token_text(self, token_id: int) -> str:
        if self.tokenizer is not None:
            return str(self.tokenizer.convert_ids_to_tokens(token_id))
        return f"#{token_id}"

    # ------------------------------------------------------------------ forward

    def _logits(self, x: Tensor, args: tuple) -> Tensor:
        if self.kind == "image":
            if args:
                raise ValueError(f"image models take no additional forward args, got {len(args)}")
            return logits_of(self.model(pixel_values=x))
        kwargs = self._text_kwargs(x, args)
        if self.kind == "encoder":
            return logits_of(self.model(**kwargs))
        hidden = self._callee(**kwargs, use_cache=False).last_hidden_state
        mask = args[0] != 0
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (positions * mask.long()).amax(dim=1)  # the rightmost real token, left or right padding
        return self.model.score(hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)])

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _text_kwargs(x: Tensor, args: tuple) -> dict[str, Any]:
        """The keywords of a text model: ids or embeddings, the attention mask, the token type ids if any."""
        if not args:
            raise ValueError(
                "expected the attention mask as the first additional forward arg; make it with adapter.captum_inputs(...)"
            )
        kwargs: dict[str, Any] = {"attention_mask": args[0].to(x.device)}  # a mask kept on the CPU is moved
        if len(args) > 1:
            kwargs["token_type_ids"] = args[1].to(x.device)
        kwargs["inputs_embeds" if x.is_floating_point() else "input_ids"] = x
        return kwargs

    def _read_batch(self, batch: Any) -> tuple[Tensor, tuple, Any]:
        if isinstance(batch, Tensor):
            if self.kind != "image":
                raise TypeError("pass the tokenizer's encoding (input_ids and attention_mask), not a bare tensor")
            batch = {"pixel_values": batch}  # checked as the image processor's output is
        if not isinstance(batch, Mapping):
            raise TypeError(f"batch must be a tokenizer's BatchEncoding or a dict (or pixel_values), got {type(batch).__name__}")
        self._refuse_unknown_keys(batch)
        labels = batch.get("labels")
        if self.kind == "image":
            if "pixel_values" not in batch:
                raise KeyError(f"an image batch needs 'pixel_values'; it has {sorted(batch)}")
            pixels = batch["pixel_values"]
            if not isinstance(pixels, Tensor) or pixels.dim() != 4:
                raise ValueError(
                    f"pixel_values must be a tensor [B, C, H, W], got {getattr(pixels, 'shape', type(pixels).__name__)}"
                    + ("; for one image add the batch dimension: pixels[None]" if isinstance(pixels, Tensor) and pixels.dim() == 3 else "")
                )
            return pixels, (), labels
        if "input_ids" not in batch:
            raise KeyError(f"a text batch needs 'input_ids' (a tokenizer's output); it has {sorted(batch)}")
        ids = torch.as_tensor(batch["input_ids"])
        if ids.dim() == 1:
            raise ValueError("input_ids must be [B, L]; tokenize a list of texts, or add a batch dimension")
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask)
        if tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
        args: tuple = (mask.to(ids.device),)
        token_types = batch.get("token_type_ids")
        if token_types is not None and self._takes_token_types:
            args += (torch.as_tensor(token_types).to(ids.device),)
        return ids, args, labels

    def _refuse_unknown_keys(self, batch: Mapping[str, Any]) -> None:
        """An encoding key this adapter would not pass on (``mask`` for ``attention_mask``, ``position_ids``)
        is refused: the model would silently run without it."""
        if self.kind == "image":
            read = ["pixel_values", "labels"]
        else:
            read = ["input_ids", "attention_mask", *(["token_type_ids"] if self._takes_token_types else []), "labels"]
        ignored = () if self.kind == "image" else ("token_type_ids", *_TOKENIZER_EXTRAS)
        unknown = [k for k in batch if k not in read and k not in ignored]
        if not unknown:
            return
        hints = [f"{k!r} -> {_likely_key(str(k))!r}" for k in unknown if _likely_key(str(k)) in read and _likely_key(str(k)) not in batch]
        raise KeyError(
            f"the batch has keys {unknown} that HuggingFaceAdapter does not pass to {type(self.model).__name__}, which "
            f"would run without them; it reads {read}. Rename or drop them"
            + (f" ({', '.join(hints)})" if hints else "")
        )

    def _per_sample_args(self, args: tuple) -> list[tuple[str, Tensor]]:
        """Every additional forward arg of a text model holds one row per sample (attention mask, token types)."""
        names = ("the attention_mask", "the token_type_ids")
        return [(names[i] if i < len(names) else f"additional forward arg {i}", a) for i, a in enumerate(args) if isinstance(a, Tensor)]

    def _prefix(self, length: int, count: int) -> int:
        """Text: none. Images: the positions before the patches ([CLS], a distillation token, registers)."""
        return max(0, length - count) if self.kind == "image" else 0


def _likely_key(key: str) -> Optional[str]:
    """The encoding key an unknown key probably stands for (``mask`` -> ``attention_mask``), if any."""
    key = key.lower()
    if "mask" in key:
        return "attention_mask"
    if "type" in key or "segment" in key:
        return "token_type_ids"
    if "label" in key or "target" in key:
        return "labels"
    if key in ("ids", "input", "inputs", "tokens", "token_ids"):
        return "input_ids"
    if "pixel" in key or "image" in key:
        return "pixel_values"
    return None


def _text_config_value(config: Any, name: str) -> Any:
    getter = getattr(config, "get_text_config", None)
    text = getter() if callable(getter) else config
    return getattr(text, name, None)


def _pools_last_token(cls: type) -> bool:
    """Whether a sequence classifier's forward pools the last non-pad token (decoder classifiers).

    Read from the compiled ``forward`` (its names, not its text, so comments do not count). A ``forward``
    that hands over to ``super()`` pools as its parent's does (transformers' own Gemma3 and Qwen3.5
    classifiers, or a user's subclass with a custom loss), so the search goes up the classes until a
    ``forward`` that either pools the last token or does not call its parent's.
    """
    for klass in cls.__mro__:
        forward = vars(klass).get("forward")
        if forward is None:
            continue
        code = getattr(inspect.unwrap(forward), "__code__", None)
        if code is None:
            return False
        if "last_non_pad_token" in code.co_varnames + code.co_names:
            return True
        if "super" not in code.co_names:
            return False
    return False  # no class defines a forward
