"""``PyHealthAdapter``: a PyHealth model as one Captum ``forward_func``.

PyHealth models take a batch dict; Captum methods take ``inputs`` (a tuple of tensors they perturb or
differentiate), a ``target`` and ``additional_forward_args`` (passed along untouched, repeated along
the batch when Captum expands it). The adapter maps one to the other and back:

* ``inputs``: one tensor per feature key, in ``model.feature_keys`` order: the embedded codes
  (``level="embedding"``, ``[B, L, D]`` or ``[B, V, C, D]`` for nested visits) or the code ids
  (``level="token"``, ``[B, L]`` or ``[B, V, C]``).
* ``additional_forward_args``: a flat tuple of tensors: per feature key, the code mask (shaped like
  the ids, ``True`` on real codes) and, for temporal (``stagenet``) features, the time intervals.
  Masks come from the batch, never from embedding values, so a zero baseline is not mistaken for
  padding.

The adapter also implements :class:`captum_chefer.protocol.AttentionModel`, the interface
``CheferAttribution`` needs, for PyHealth's ``Transformer`` and ``StageAttentionNet``, with attention
captured by :class:`captum_chefer.capture.AttentionCapture` (scoped to the call and the thread).

PyHealth's image and text models, ``TorchvisionModel`` (ViT variants) and ``TransformersModel``, go
through the same class: it reads their batches and labels and hands the rest to the generic machinery
(:mod:`captum_chefer.adapters._pyhealth_media`, which also records where PyHealth's own ViT reference
differs from the model).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Literal, Mapping, Optional

import torch
from torch import Tensor, nn

from ..capture import AttentionCapture, evaluation_mode
from ..layernorm import FixedScaleLayerNorm
from ..protocol import AttentionForward
from ..relevance import layer_norm_fixed_scale
from ._pyhealth_media import media_adapter, media_batch
from .base import Adapter, DecodedToken, LookupDict, check_devices, uncompiled

__all__ = ["FeatureSpec", "PyHealthAdapter"]

Level = Literal["embedding", "token"]
Reference = Literal["unk", "zero"]
TargetMode = Literal["predicted", "label"]
Pooling = Literal["first", "last"]


@dataclass(frozen=True)
class FeatureSpec:
    """How one feature key enters the model (``PyHealthAdapter.features``, in input order)."""

    key: str
    token_dims: int  # 2: [B, L] codes; 3: [B, V, C] nested visits
    temporal: bool  # carries time intervals (stagenet)
    value_index: int  # position of the codes in the batch tuple (temporal features)
    time_index: Optional[int]
    pad_id: int


class PyHealthAdapter(Adapter):
    """A PyHealth ``Transformer``, ``StageAttentionNet``, ``TorchvisionModel`` (ViT) or ``TransformersModel``
    as a Captum forward function.

    ``adapter(*inputs, *additional_forward_args)`` returns the logits ``[B, C]``, so the same adapter
    serves :class:`captum_chefer.CheferAttribution`, ``IntegratedGradients``, ``Saliency``,
    ``NoiseTunnel`` and ``LayerIntegratedGradients`` (on ``adapter.embedding_layers``).

    Args:
        model: a PyHealth ``BaseModel`` whose features are code sequences (``sequence``,
            ``nested_sequence`` or ``stagenet`` codes), or a ``TorchvisionModel`` with a ViT, or a
            ``TransformersModel``.

    Images (``TorchvisionModel`` ViT): ``captum_inputs(batch)`` gives the images ``[B, C, H, W]`` as the
    model sees them (one channel repeated to three, as the model does) and no additional args; Chefer
    follows the class token and drops it; attributions are shaped like the images, each patch's
    relevance spread evenly over its pixels and channels; ``to_feature_dict`` gives ``[B, N]`` per patch
    (row-major). IG baselines: ``"zero"`` or ``"blur"``. Other torchvision models (ResNet, DenseNet, Swin)
    are refused: they have no attention over patch tokens.

    Text (``TransformersModel``): the texts are tokenized with the model's tokenizer and the settings of
    its ``forward`` (padding, truncation at 256 tokens); ``level="token"`` gives the ids,
    ``level="embedding"`` the word embeddings (the model adds positions); the attention mask (then the
    token type ids) travel as additional args; Chefer follows [CLS], which ``pooler_output`` reads;
    ``to_feature_dict`` gives ``[B, T]`` per word piece. IG baselines: ``"unk"``, ``"mask"``, ``"pad"``,
    ``"zero"``.
        pooling: which position the model pools for its prediction: ``"first"`` (``Transformer``) or
            ``"last"`` valid step (``StageAttentionNet``). Needed only for other attention models.

    A ``torch.compile``'d model is accepted: the adapter runs the original module it wraps (the same
    parameters), so attributions equal the uncompiled model's; attention capture needs eager execution.

    The adapter reads the model's modules when it is made; wrap the model again after replacing any of
    its submodules. Training mode and weights may change freely: each call reads them. Calls from several
    threads on one model are safe: each attribution call captures its own attention only, and the model is
    in evaluation mode while any call runs and as found afterwards.

    Example:
        >>> from captum_chefer import CheferAttribution, PyHealthAdapter
        >>> from captum_chefer.synthetic import toy_model_and_batch
        >>> model, batch = toy_model_and_batch()
        >>> adapter = PyHealthAdapter(model)
        >>> inputs, args = adapter.captum_inputs(batch)
        >>> _ = model.eval()  # the adapter always runs the model with dropout off
        >>> torch.allclose(adapter(*inputs, *args), model(**batch)["logit"])
        True
        >>> attributions = CheferAttribution(adapter).attribute(
        ...     inputs, target=adapter.captum_target(batch), additional_forward_args=args)
        >>> scores = adapter.to_feature_dict(attributions)
        >>> sorted(scores) == sorted(model.feature_keys)
        True
    """

    def __init__(self, model: nn.Module, *, pooling: Optional[Pooling] = None) -> None:
        super().__init__()
        from pyhealth.models import BaseModel, StageAttentionNet

        model = uncompiled(model)
        if isinstance(model, PyHealthAdapter):
            raise TypeError("model is already a PyHealthAdapter; pass it to the attribution method directly")
        if not isinstance(model, BaseModel):
            raise TypeError(
                f"PyHealthAdapter needs a PyHealth model (pyhealth.models.BaseModel), got {type(model).__name__}. "
                "Train a pyhealth.models.Transformer or StageAttentionNet, or give Captum your own forward function."
            )
        if len(model.label_keys) != 1:
            raise ValueError(f"PyHealthAdapter supports models with one label key, got {model.label_keys}")
        self.model = model
        self.feature_keys: list[str] = list(model.feature_keys)
        self.label_key: str = model.label_keys[0]
        self._media = media_adapter(model)  # the inner adapter of an image or text model, else None
        if self._media is None:
            _require_runnable(model)
        else:
            self.features: tuple[FeatureSpec, ...] = ()
            self._attention_modules: dict[str, list[nn.Module]] = {}
            self._model_modules: tuple[nn.Module, ...] = tuple(model.modules())
            self.pooling: Optional[Pooling] = "first"
            return
        self.features = tuple(self._describe_feature(key) for key in self.feature_keys)
        self._attention_modules = self._find_attention(model)
        # Read once, like the attention modules: walking the module tree costs milliseconds per call,
        # and attribution methods call the model over and over. Wrap again after replacing submodules.
        self._model_modules: tuple[nn.Module, ...] = tuple(model.modules())
        self.pooling: Optional[Pooling] = pooling or self._default_pooling(model)
        self._stagenet = isinstance(model, StageAttentionNet)

    # ------------------------------------------------------------------ model description

    def _describe_feature(self, key: str) -> FeatureSpec:
        from pyhealth.processors import NestedSequenceProcessor, SequenceProcessor, StageNetProcessor

        processor = self.model.dataset.input_processors[key]
        _require_embedding_model(self.model, key)
        schema = tuple(processor.schema())
        pad_id = int(getattr(processor, "code_vocab", {}).get("<pad>", 0))
        if isinstance(processor, SequenceProcessor):
            return FeatureSpec(key, 2, False, 0, None, pad_id)
        if isinstance(processor, NestedSequenceProcessor):
            return FeatureSpec(key, 3, False, 0, None, pad_id)
        if isinstance(processor, StageNetProcessor):
            dims = 3 if getattr(processor, "_is_nested", False) else 2
            return FeatureSpec(key, dims, True, schema.index("value"), schema.index("time"), pad_id)
        raise ValueError(
            f"feature {key!r} uses {type(processor).__name__}; PyHealthAdapter supports code features "
            "('sequence', 'nested_sequence', 'stagenet' codes)."
        )

    @staticmethod
    def _find_attention(model: nn.Module) -> dict[str, list[nn.Module]]:
        """The attention modules of each feature stream, first layer to last."""
        from pyhealth.models.transformer import Attention

        keys = list(model.feature_keys)
        for container in model.children():
            if isinstance(container, nn.ModuleDict) and all(k in container for k in keys):
                found = {k: [m for m in container[k].modules() if isinstance(m, Attention)] for k in keys}
                if all(found.values()):
                    return found
        return {}

    def _default_pooling(self, model: nn.Module) -> Optional[Pooling]:
        from pyhealth.models import StageAttentionNet, Transformer

        if isinstance(model, StageAttentionNet):
            return "last"
        if isinstance(model, Transformer):
            return "first"
        return None

    @property
    def embedding_layers(self) -> list[nn.Module]:
        """The embedding layer of each feature key, in input order (for ``LayerIntegratedGradients``)."""
        if self._media is not None:
            return self._media.embedding_layers
        return [self.model.embedding_model.embedding_layers[key] for key in self.feature_keys]

    @property
    def num_outputs(self) -> int:
        """Number of logits: 1 for binary models, the number of classes otherwise."""
        return int(self.model.get_output_size())

    @property
    def pad_ids(self) -> tuple[int, ...]:
        """The padding id of each feature key, in input order."""
        if self._media is not None:
            return self._media.pad_ids
        return tuple(feature.pad_id for feature in self.features)

    # ------------------------------------------------------------------ batch <-> Captum

    def captum_inputs(self, batch: Mapping[str, Any], level: Level = "embedding") -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """``(inputs, additional_forward_args)`` for a batch from ``pyhealth.datasets.get_dataloader``.

        Args:
            batch: the batch dict.
            level: ``"embedding"`` (float embeddings, for gradient methods) or ``"token"`` (code ids,
                for ``LayerIntegratedGradients``, token removal and Chefer).

        Returns:
            ``inputs``: one tensor per feature key; ``additional_forward_args``: per feature key its
            code mask, then its time intervals for temporal features (ones where the batch has none).
        """
        if level not in ("embedding", "token"):
            raise ValueError(f"level must be 'embedding' or 'token', got {level!r}")
        if self._media is not None:
            return self._media.captum_inputs(media_batch(self.model, batch), level)
        ids, times = self._read_batch(batch)
        device = self.model.device
        inputs, args = [], []
        for feature, codes, time in zip(self.features, ids, times):
            codes = codes.to(device)
            args.append(codes != feature.pad_id)
            if feature.temporal:
                args.append(time.to(device).float() if time is not None else torch.ones(codes.shape[:2], device=device))
            if level == "embedding":
                with torch.no_grad():
                    inputs.append(self.model.embedding_model({feature.key: codes})[feature.key].detach())
            else:
                inputs.append(codes)
        return tuple(inputs), tuple(args)

    def captum_target(self, batch: Mapping[str, Any], mode: TargetMode = "predicted") -> Optional[Tensor]:
        """The Captum ``target`` for a batch.

        Args:
            batch: the batch dict.
            mode: ``"predicted"`` (each sample's arg-max class) or ``"label"`` (its true class).

        Returns:
            ``None`` for single-logit (binary) models, whose one logit is explained whatever the class,
            as PyHealth does; else a ``[B]`` tensor of class indices.
        """
        if mode not in ("predicted", "label"):
            raise ValueError(f"target mode must be 'predicted' or 'label', got {mode!r}")
        if mode == "label":
            if self.label_key not in batch:
                raise ValueError(
                    f"target mode 'label' needs the label {self.label_key!r} in the batch, which has only "
                    f"{sorted(batch)}; use mode='predicted' or a batch with labels"
                )
            labels = torch.as_tensor(batch[self.label_key])
            if self.num_outputs == 1:
                return None
            if self.model.mode == "multilabel":
                raise ValueError("a multilabel model has several true classes per sample; pass target=class index")
            return labels.view(-1).long().to(self.model.device)
        if self.num_outputs == 1:
            self._read_batch(batch) if self._media is None else media_batch(self.model, batch)  # still validate it
            return None
        inputs, args = self.captum_inputs(batch, level="token")
        with torch.no_grad():
            return self(*inputs, *args).argmax(dim=1)

    def to_feature_dict(self, attributions: Tensor | tuple[Tensor, ...]) -> dict[str, Tensor]:
        """``{feature_key: per-code scores}`` from attributions shaped like the inputs.

        Embedding-level attributions are summed over the embedding dimension, so the result is shaped
        like the batch's code ids (``[B, L]`` or ``[B, V, C]``) for every method. Images give ``[B, N]`` per
        patch, texts ``[B, T]`` per word piece.
        """
        if self._media is not None:
            return self._media.to_feature_dict(attributions)
        attributions = attributions if isinstance(attributions, tuple) else (attributions,)
        if len(attributions) != len(self.features):
            raise ValueError(
                f"expected {len(self.features)} attribution tensors (one per feature key {self.feature_keys}), "
                f"got {len(attributions)}"
            )
        scores: dict[str, Tensor] = {}
        for feature, attribution in zip(self.features, attributions):
            if attribution.dim() == feature.token_dims + 1:
                attribution = attribution.sum(dim=-1)
            elif attribution.dim() != feature.token_dims:
                raise ValueError(
                    f"attributions for {feature.key!r} have shape {tuple(attribution.shape)}; expected "
                    f"{feature.token_dims} dims (codes) or {feature.token_dims + 1} (embeddings)"
                )
            scores[feature.key] = attribution.detach()
        return LookupDict(scores, kind="feature")

    def baselines(
        self, inputs: tuple[Tensor, ...], additional_forward_args: tuple[Tensor, ...], reference: Reference = "unk"
    ) -> tuple[Tensor, ...]:
        """Integrated Gradients baselines for a batch: padding stays padding, real codes get a reference.

        Args:
            inputs: ``captum_inputs(batch, level=...)[0]``: embeddings or token ids.
            additional_forward_args: the matching ``additional_forward_args`` (the code masks are read).
            reference: what a real code becomes: ``"unk"`` (the ``<unk>`` code's embedding, or its id at
                token level) or ``"zero"`` (a zero embedding; at token level the padding id, whose
                embedding is zero, while the mask still marks the position as real).

        Returns:
            One baseline per input, shaped like it, equal to the input on padding (so IG gives padding
            nothing). Prefer ``"unk"``: PyHealth's Transformer normalises each layer's input, so along the
            straight path from a zero embedding the output barely moves until it jumps close to zero,
            which IG's quadrature misses.
        """
        if self._media is not None:
            return self._media.baselines(inputs, additional_forward_args, reference)  # type: ignore[arg-type]
        if reference not in ("unk", "zero"):
            raise ValueError(f"reference must be 'unk' or 'zero', got {reference!r}")
        inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        if len(inputs) != len(self.features) or not all(isinstance(x, Tensor) for x in inputs):
            raise ValueError(
                f"expected {len(self.features)} input tensors (one per feature key {self.feature_keys}); "
                "make them with adapter.captum_inputs(batch)"
            )
        out = []
        for feature, x, mask in zip(self.features, inputs, self.token_masks(additional_forward_args)):
            mask = mask.to(x.device).bool()
            unk_id = int(getattr(self.model.dataset.input_processors[feature.key], "code_vocab", {}).get("<unk>", 1))
            if x.is_floating_point():
                if tuple(x.shape[:-1]) != tuple(mask.shape):
                    raise ValueError(
                        f"input for {feature.key!r} has shape {tuple(x.shape)} but its mask is {tuple(mask.shape)}; "
                        "pass inputs and additional_forward_args from the same adapter.captum_inputs call"
                    )
                if reference == "unk":
                    with torch.no_grad():
                        ids = torch.full((1,) * mask.dim(), unk_id, dtype=torch.long, device=x.device)
                        ref = self.model.embedding_model({feature.key: ids})[feature.key].to(x.dtype)
                else:
                    ref = torch.zeros((), dtype=x.dtype, device=x.device)
                out.append(torch.where(mask.unsqueeze(-1), ref.expand_as(x), x).detach())
            else:
                if tuple(x.shape) != tuple(mask.shape):
                    raise ValueError(f"token input for {feature.key!r} has shape {tuple(x.shape)} but its mask is {tuple(mask.shape)}")
                ref_id = unk_id if reference == "unk" else feature.pad_id
                out.append(torch.where(mask, torch.full_like(x, ref_id), x))
        return tuple(out)

    def remove_tokens(
        self, tokens: tuple[Tensor, ...], additional_forward_args: tuple[Tensor, ...], keep: Mapping[str, Tensor], *, compact: bool = True
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """Token inputs and args with the codes outside ``keep`` made padding (id and mask).

        With ``compact``, the kept codes of flat streams (the non-empty visits of nested streams, with
        their times) move to the front in their order, so the model pools a real code whenever one is left.
        Text: removed word pieces are masked out (the same compaction); images: removed patches turn black.
        """
        if self._media is not None:
            return self._media.remove_tokens(tokens, additional_forward_args, keep, compact=compact)
        tokens, args = list(tokens), list(additional_forward_args)
        position = 0
        for i, feature in enumerate(self.features):
            m, t = position, (position + 1 if feature.temporal else None)
            position += 2 if feature.temporal else 1
            kept = keep[feature.key].to(tokens[i].device).bool() & args[m].bool()
            ids = torch.where(kept, tokens[i], torch.full_like(tokens[i], feature.pad_id))
            times = args[t] if t is not None else None
            if compact:
                step = kept.any(dim=-1) if kept.dim() == 3 else kept
                order = torch.argsort((~step).to(torch.int8), dim=1, stable=True)
                gather = order.view(*order.shape, *([1] * (kept.dim() - 2))).expand_as(kept)
                ids, kept = ids.gather(1, gather), kept.gather(1, gather)
                if times is not None:
                    times = times.gather(1, order)
            tokens[i], args[m] = ids, kept
            if t is not None:
                args[t] = times
        return tuple(tokens), tuple(args)

    # ------------------------------------------------------------------ display

    def decode(self, batch: Mapping[str, Any]) -> list[list[DecodedToken]]:
        """Each sample's real codes as text, feature by feature: ``"C3"``, or ``"v2:P7"`` for code P7 of visit 2
        (its ``code`` is ``"P7"``).

        Codes are decoded through the dataset's processors; an id missing from the vocabulary shows as
        ``#<id>``.

        Example:
            >>> from captum_chefer.synthetic import toy_model_and_batch
            >>> model, batch = toy_model_and_batch()
            >>> [t.text for t in PyHealthAdapter(model).decode(batch)[0]][:2]
            ['C6', 'C0']
        """
        if self._media is not None:
            return self._media.decode(media_batch(self.model, batch))
        ids, _ = self._read_batch(batch)
        out: list[list[DecodedToken]] = [[] for _ in range(int(ids[0].shape[0]))]
        for feature, codes in zip(self.features, ids):
            names = self._code_names(feature.key)
            real = codes != feature.pad_id
            for index in real.nonzero().tolist():
                sample, position = index[0], tuple(index[1:])
                code = int(codes[tuple(index)])
                name = names.get(code, f"#{code}")
                text = f"v{position[0] + 1}:{name}" if len(position) == 2 else name
                out[sample].append(DecodedToken(feature.key, text, position, code=name))
        return out

    def class_names(self) -> dict[int, str]:
        """The label processor's class names (index -> name)."""
        processor = self.model.dataset.output_processors.get(self.label_key)
        vocab = getattr(processor, "label_vocab", None) or {}
        return {int(index): str(label) for label, index in vocab.items()}

    def true_classes(self, batch: Mapping[str, Any]) -> Optional[list[str]]:
        """Each sample's label as text (classes joined by commas for multilabel), or ``None`` without labels."""
        if self.label_key not in batch:
            return None
        names = self.class_names()
        labels = torch.as_tensor(batch[self.label_key]).detach().cpu()
        rows = labels.reshape(labels.shape[0], -1)
        if self.model.mode == "multilabel":
            return [",".join(names.get(j, str(j)) for j in row.nonzero().flatten().tolist()) for row in rows]
        return [names.get(int(v), str(int(v))) for v in rows[:, 0]]

    def probabilities(self, logits: Tensor) -> Tensor:
        """Class probabilities as the model's ``y_prob``: sigmoid (binary, multilabel) or softmax."""
        return torch.sigmoid(logits) if self.model.mode in ("binary", "multilabel") else logits.softmax(dim=1)

    def _code_names(self, key: str) -> dict[int, str]:
        vocab = getattr(self.model.dataset.input_processors[key], "code_vocab", None) or {}
        return {int(index): str(code) for code, index in vocab.items()}

    def _read_batch(self, batch: Mapping[str, Any]) -> tuple[list[Tensor], list[Optional[Tensor]]]:
        if not isinstance(batch, Mapping):
            raise TypeError(f"batch must be a dict from pyhealth.datasets.get_dataloader, got {type(batch).__name__}")
        ids, times = [], []
        for feature in self.features:
            if feature.key not in batch:
                raise KeyError(
                    f"the batch has no feature {feature.key!r}; the model needs {self.feature_keys}, the batch has "
                    f"{sorted(batch)}"
                )
            value = batch[feature.key]
            time = None
            if feature.temporal:
                if not isinstance(value, (tuple, list)) or len(value) < 2:
                    raise TypeError(
                        f"feature {feature.key!r} must be a (time, codes) tuple as the stagenet processor makes it, "
                        f"got {type(value).__name__}"
                    )
                time, value = value[feature.time_index], value[feature.value_index]
            if not isinstance(value, Tensor) or value.is_floating_point() or value.dtype == torch.bool:
                raise TypeError(
                    f"feature {feature.key!r} must be a tensor of code ids, got "
                    f"{type(value).__name__}{'' if not isinstance(value, Tensor) else ' of ' + str(value.dtype)}"
                )
            if value.dim() != feature.token_dims:
                raise ValueError(
                    f"feature {feature.key!r} must have {feature.token_dims} dims, got shape {tuple(value.shape)}"
                )
            if time is not None and (not isinstance(time, Tensor) or tuple(time.shape) != tuple(value.shape[:2])):
                raise ValueError(
                    f"times of {feature.key!r} must be a tensor shaped {tuple(value.shape[:2])}, got "
                    f"{getattr(time, 'shape', type(time).__name__)}"
                )
            self._check_code_ids(feature, value)
            ids.append(value)
            times.append(time)
        sizes = {x.shape[0] for x in ids}
        if len(sizes) > 1:
            raise ValueError(f"features of the batch have different batch sizes: {sorted(sizes)}")
        if sizes == {0}:
            raise ValueError("the batch is empty")
        return ids, times

    # ------------------------------------------------------------------ forward

    def forward(self, *inputs_and_args: Tensor) -> Tensor:
        """Logits ``[B, C]`` from ``(*inputs, *additional_forward_args)``, with dropout off.

        Attribution methods call this many times and compare the outputs, so the model always runs in
        evaluation mode here (its own training flags are restored afterwards).
        """
        if self._media is not None:
            logits = self._media(*inputs_and_args)
        else:
            inputs, args = self.split_inputs(inputs_and_args)
            self._warn_if_zero_baseline()
            with evaluation_mode(self.model, self._model_modules):
                logits = self.model.forward_from_embedding(**self._model_kwargs(inputs, args, track=False)[0])["logit"]
        self._check_captum_target(logits)
        return logits

    def split_inputs(self, inputs_and_args: tuple) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """``(*inputs, *additional_forward_args)`` -> ``(inputs, additional_forward_args)``, checking counts."""
        if self._media is not None:
            return self._media.split_inputs(inputs_and_args)
        n_inputs = len(self.features)
        n_args = n_inputs + sum(f.temporal for f in self.features)
        if len(inputs_and_args) != n_inputs + n_args:
            raise ValueError(
                f"expected {n_inputs} input tensors (one per feature key {self.feature_keys}) and {n_args} additional "
                f"forward args (masks, times), got {len(inputs_and_args)} tensors in all; "
                "make both with adapter.captum_inputs(batch)"
            )
        return tuple(inputs_and_args[:n_inputs]), tuple(inputs_and_args[n_inputs:])

    def token_masks(self, additional_forward_args: Any, inputs: Optional[tuple[Tensor, ...]] = None) -> tuple[Tensor, ...]:
        """The code mask of each feature key (``True`` on real codes) from ``additional_forward_args``.

        ``inputs`` (the matching Captum inputs) is read only by adapters whose masks no argument carries
        (images: every patch is real).

        Example:
            >>> from captum_chefer.synthetic import toy_model_and_batch
            >>> model, batch = toy_model_and_batch()
            >>> adapter = PyHealthAdapter(model)
            >>> _, args = adapter.captum_inputs(batch)
            >>> torch.equal(adapter.token_masks(args)[0], batch["conditions"] != 0)
            True
        """
        if self._media is not None:
            return self._media.token_masks(additional_forward_args, inputs)
        args = additional_forward_args if isinstance(additional_forward_args, tuple) else (additional_forward_args,)
        expected = len(self.features) + sum(f.temporal for f in self.features)
        if len(args) != expected or not all(isinstance(a, Tensor) for a in args):
            raise ValueError(
                f"expected {expected} additional forward args (per feature key its mask, then times for temporal "
                "features); make them with adapter.captum_inputs(batch)"
            )
        masks, position = [], 0
        for feature in self.features:
            masks.append(args[position].bool())
            position += 2 if feature.temporal else 1
        return tuple(masks)

    def _model_kwargs(
        self, inputs: tuple[Tensor, ...], args: tuple[Tensor, ...], track: bool
    ) -> tuple[dict[str, tuple[Tensor, ...]], list[Tensor]]:
        """forward_from_embedding keyword arguments, and each stream's step mask ``[B, L]``."""
        kwargs: dict[str, tuple[Tensor, ...]] = {}
        step_masks = []
        _check_batch_sizes(self.features, inputs, args)
        # the inputs must be where the model is; masks and times are moved to them below
        check_devices([(f"input {f.key!r}", x) for f, x in zip(self.features, inputs)], self.model.device)
        arg_iter = iter(args)
        for feature, x in zip(self.features, inputs):
            mask = next(arg_iter)
            time = next(arg_iter) if feature.temporal else None
            if not isinstance(x, Tensor) or not isinstance(mask, Tensor):
                raise TypeError(f"inputs and additional forward args must be tensors (feature {feature.key!r})")
            codes_shape = tuple(mask.shape)
            if len(codes_shape) != feature.token_dims:
                raise ValueError(f"mask of {feature.key!r} must have {feature.token_dims} dims, got {codes_shape}")
            if x.is_floating_point():
                _check_embedding_input(feature, x, codes_shape)
                value = x
                expected = codes_shape + (self.model.embedding_model.embedding_dim,)
            else:
                self._check_code_ids(feature, x)
                value = self.model.embedding_model({feature.key: x})[feature.key]
                expected = codes_shape
            if tuple(x.shape) != expected:
                raise ValueError(
                    f"input for {feature.key!r} has shape {tuple(x.shape)} but its mask implies {expected}; "
                    "inputs and additional_forward_args must come from the same captum_inputs call"
                )
            if x.is_floating_point():  # padding carries nothing, whatever a method puts there (noise, IG paths)
                value = value * mask.to(value.device).unsqueeze(-1).to(value.dtype)
            if track:
                value = value.detach().requires_grad_(True)
            mask = mask.to(value.device).bool()
            step_mask = mask.any(dim=-1) if feature.token_dims == 3 else mask
            step_masks.append(step_mask)
            if feature.temporal:
                kwargs[feature.key] = self._temporal_feature(feature, value, time, mask)
            elif self._stagenet:  # plain codes: (value, trailing code mask), as StageAttentionNet reads them
                kwargs[feature.key] = (value, mask.int())
            else:
                kwargs[feature.key] = (value, self._transformer_mask(step_mask))
        return kwargs, step_masks

    def _check_code_ids(self, feature: FeatureSpec, ids: Tensor) -> None:
        """Code ids must index the feature's embedding (a batch encoded by another dataset would not)."""
        size = getattr(self.model.embedding_model.embedding_layers[feature.key], "num_embeddings", None)
        if size is None or ids.numel() == 0:
            return
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= size:
            raise ValueError(
                f"feature {feature.key!r} holds code id {high if high >= size else low}, outside the model's "
                f"vocabulary of {size} codes (ids 0..{size - 1}); encode the samples with the dataset the model was "
                "built on (its input processors), not another dataset's"
            )

    def _transformer_mask(self, step_mask: Tensor) -> Tensor:
        """The attention mask PyHealth's Transformer would infer: truncated, and never all False."""
        max_len = getattr(self.model, "max_seq_len", None)
        if max_len is not None:
            step_mask = step_mask[:, :max_len]
        step_mask = step_mask.clone()
        step_mask[~step_mask.any(dim=1), 0] = True
        return step_mask

    @staticmethod
    def _temporal_feature(feature: FeatureSpec, value: Tensor, time: Optional[Tensor], mask: Tensor) -> tuple[Tensor, ...]:
        parts: list[Optional[Tensor]] = [None, None]
        parts[feature.value_index] = value
        parts[feature.time_index] = time
        return (*parts, mask.int())  # a trailing mask, as StageAttentionNet accepts it

    # ------------------------------------------------------------------ AttentionModel

    def require_attention(self) -> None:
        """Raise ``ValueError`` unless the model has attention layers Chefer relevance can propagate."""
        if self._media is not None:
            return self._media.require_attention()
        if not self._attention_modules:
            raise ValueError(
                f"{type(self.model).__name__} has no attention layers for Chefer relevance to propagate; use a "
                "pyhealth.models.Transformer or StageAttentionNet, or a gradient method such as IntegratedGradients"
            )
        if self.pooling is None:
            raise ValueError(f"pass pooling='first' or 'last' to PyHealthAdapter for {type(self.model).__name__}")

    def attention_forward(
        self, inputs: tuple[Tensor, ...], additional_forward_args: tuple, *, pooled_row_only: bool = False,
        layernorm: str = "exact",
    ) -> AttentionForward:
        """One forward pass in evaluation mode that captures each layer's attention in the graph.

        ``layernorm="detach"``: the model's ``nn.LayerNorm`` layers hold their standard deviation constant
        for the backward pass (``CheferAttribution``'s ``layernorm`` option; only this call's thread).

        With ``pooled_row_only`` (what the row propagation asks for), a ``Transformer``'s last block is
        evaluated for the first position alone: the model reads nothing else of it (its ``cls_emb``), so
        the logits are the same and that block's attention comes back as ``[B, H, 1, L]``; so does a
        ``TorchvisionModel`` ViT's last encoder block, for the class token.
        """
        if layernorm not in ("exact", "detach"):
            raise ValueError(f"layernorm must be 'exact' or 'detach', got {layernorm!r}")
        if self._media is not None:
            with FixedScaleLayerNorm() if layernorm == "detach" else nullcontext():
                return self._media.attention_forward(inputs, additional_forward_args, pooled_row_only=pooled_row_only)
        self.require_attention()
        args = tuple(additional_forward_args)
        self.split_inputs(tuple(inputs) + args)  # validates the counts before touching the model
        state_values: dict[str, Tensor] = {}
        overrides = self._pooled_row_overrides(pooled_row_only)
        overrides.update(self._state_value_overrides(state_values))
        if layernorm == "detach":
            norms = [m for m in self._model_modules if type(m) is nn.LayerNorm and m not in overrides]
            overrides.update({m: partial(_fixed_scale_norm, m) for m in norms})
        capture = AttentionCapture(
            self._attention_modules, overrides=overrides, model=self.model, model_modules=self._model_modules,
        )
        with capture:
            kwargs, step_masks = self._model_kwargs(tuple(inputs), args, track=True)
            logits = self.model.forward_from_embedding(**kwargs)["logit"]
        pool_index = {}
        for feature, step_mask in zip(self.features, step_masks):
            if self.pooling == "first":
                pool_index[feature.key] = torch.zeros(step_mask.shape[0], dtype=torch.long, device=step_mask.device)
            else:
                pool_index[feature.key] = (step_mask.long().sum(dim=1) - 1).clamp(min=0)
        embeddings = {feature.key: _tracked_value(kwargs[feature.key], feature) for feature in self.features}
        code_masks = {
            feature.key: mask for feature, mask in zip(self.features, self.token_masks(args)) if feature.token_dims == 3
        }
        return AttentionForward(
            logits=logits, attention=capture.attention, pool_index=pool_index, embeddings=embeddings,
            code_masks=code_masks, state_values=state_values,
        )

    def relevance_to_inputs(
        self, relevance: Mapping[str, Tensor], inputs: tuple[Tensor, ...], additional_forward_args: tuple
    ) -> tuple[Tensor, ...]:
        """Token relevance ``[B, L_attention]`` per stream -> tensors shaped like ``inputs``."""
        if self._media is not None:
            return self._media.relevance_to_inputs(relevance, inputs, additional_forward_args)
        out = []
        arg_iter = iter(additional_forward_args)
        for feature, x in zip(self.features, inputs):
            mask = next(arg_iter).to(x.device).bool()
            if feature.temporal:
                next(arg_iter)
            row = relevance[feature.key].to(x.device)
            steps = mask.shape[1]
            if row.shape[1] < steps:  # positions the model truncated away get zero
                row = torch.nn.functional.pad(row, (0, steps - row.shape[1]))
            row = row[:, :steps]
            if feature.token_dims == 3 and row.dim() == 2:  # visit relevance: every real code gets it
                row = row.unsqueeze(-1).expand(mask.shape)
            codes = row * mask  # padding gets nothing
            if x.is_floating_point():
                codes = (codes / x.shape[-1]).unsqueeze(-1).expand(x.shape).contiguous().to(x.dtype)
            out.append(codes.detach())
        return tuple(out)

    def _state_value_overrides(self, store: dict[str, Tensor]) -> dict[nn.Module, Callable[..., Any]]:
        """``StageAttentionNet``: keep each stream's attention value projection (``AttentionForward.state_values``)."""
        if not self._stagenet:
            return {}
        overrides: dict[nn.Module, Callable[..., Any]] = {}
        for key in self.feature_keys:
            projection = self.model.stagenet[key].mha.linear_layers[2]
            overrides[projection] = partial(_keep_output, store, key)
        return overrides

    def _pooled_row_overrides(self, enabled: bool) -> dict[nn.Module, Callable[..., Any]]:
        """Each stream's last ``TransformerBlock`` computes its first position only (for this call's thread)."""
        from pyhealth.models import Transformer
        from pyhealth.models.transformer import TransformerBlock

        overrides: dict[nn.Module, Callable[..., Any]] = {}
        if enabled and self.pooling == "first" and isinstance(self.model, Transformer):
            for key in self.feature_keys:
                last = self.model.transformer[key].transformer[-1]
                if type(last) is TransformerBlock:
                    overrides[last] = partial(_first_row_block_forward, last)
        return overrides


# ---------------------------------------------------------------------- validation (messages name the fix)


def _require_runnable(model: nn.Module) -> None:
    """Refuse, when wrapped, a PyHealth model the adapter cannot run: it needs ``forward_from_embedding``."""
    if not callable(getattr(model, "forward_from_embedding", None)):
        raise TypeError(
            f"{type(model).__name__} cannot be explained through PyHealthAdapter: it has no forward_from_embedding(), "
            "which every attribution method runs it through (Chefer, Integrated Gradients, Saliency, ...). Use a "
            f"PyHealth model that has one ({', '.join(_runnable_models()) or 'Transformer, StageAttentionNet'}), a "
            "TorchvisionModel with a ViT or a TransformersModel, or give Captum your own forward function of the "
            "embedded inputs."
        )


def _require_embedding_model(model: nn.Module, key: str) -> None:
    if getattr(model, "embedding_model", None) is None:
        raise TypeError(
            f"{type(model).__name__} has no embedding_model, which PyHealthAdapter needs to embed the codes of "
            f"feature {key!r}; use a PyHealth model built on pyhealth.models.EmbeddingModel (Transformer, "
            "StageAttentionNet)"
        )


def _runnable_models() -> list[str]:
    """PyHealth model classes that have ``forward_from_embedding`` (for the error message)."""
    try:
        import pyhealth.models as models
        from pyhealth.models import BaseModel
    except ImportError:  # pragma: no cover
        return []
    found = {
        name for name, cls in vars(models).items()
        if isinstance(cls, type) and issubclass(cls, BaseModel) and callable(getattr(cls, "forward_from_embedding", None))
    }
    return sorted(found)


def _check_batch_sizes(features: tuple[FeatureSpec, ...], inputs: tuple, args: tuple) -> None:
    """All inputs and additional forward args must share the batch size (checked before any shape)."""
    sizes: dict[str, int] = {}
    arg_iter = iter(args)
    for feature, x in zip(features, inputs):
        parts = [(f"input {feature.key!r}", x), (f"mask of {feature.key!r}", next(arg_iter, None))]
        if feature.temporal:
            parts.append((f"times of {feature.key!r}", next(arg_iter, None)))
        for name, tensor in parts:
            if isinstance(tensor, Tensor) and tensor.dim() > 0:
                sizes[name] = int(tensor.shape[0])
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name} {size}" for name, size in sizes.items())
        raise ValueError(
            f"inputs and additional_forward_args have different batch sizes ({listed}); make them with one "
            "adapter.captum_inputs(batch) call and slice all of them together"
        )
    if sizes and set(sizes.values()) == {0}:
        raise ValueError("the inputs hold no samples (batch size 0); pass at least one sample")


def _check_embedding_input(feature: FeatureSpec, x: Tensor, codes_shape: tuple[int, ...]) -> None:
    """Float inputs must be embeddings (not code ids turned into floats), and finite."""
    if tuple(x.shape) == codes_shape:
        raise ValueError(
            f"the input for {feature.key!r} has the shape of its code ids {codes_shape} but holds floats: a gradient "
            "method (e.g. IntegratedGradients) was given code ids, which it cannot differentiate. Give it the "
            "embeddings, adapter.captum_inputs(batch) (level='embedding', the default), or use "
            "LayerIntegratedGradients(adapter, adapter.embedding_layers) on the code ids"
        )
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(
            f"the input for {feature.key!r} holds {bad} NaN or infinite value(s); attributions of it would be NaN. "
            "Check what made the inputs (a model with NaN weights, a baseline or noise with NaN/inf), and pass the "
            "embeddings from adapter.captum_inputs(batch)"
        )


def _tracked_value(value: tuple[Tensor, ...], feature: FeatureSpec) -> Tensor:
    """The embedded codes of a feature as ``forward_from_embedding`` receives them (the tracked leaf)."""
    return value[feature.value_index] if feature.temporal else value[0]


def _fixed_scale_norm(module: nn.LayerNorm, original: Callable[..., Tensor], x: Tensor) -> Tensor:
    """``module``'s layer norm with its standard deviation a constant of the backward pass."""
    return layer_norm_fixed_scale(x, module.normalized_shape, module.weight, module.bias, module.eps)


def _keep_output(store: dict[str, Tensor], key: str, original: Callable[..., Tensor], *args: Any, **kwargs: Any) -> Tensor:
    """Run a module and keep its output under ``key``."""
    output = original(*args, **kwargs)
    store[key] = output
    return output


def _first_row_block_forward(
    block: nn.Module, original: Callable[..., Tensor], x: Tensor, mask: Optional[Tensor] = None, register_hook: bool = False
) -> Tensor:
    """PyHealth's ``TransformerBlock.forward`` for the first position alone: ``[B, L, D]`` -> ``[B, 1, D]``.

    The same pre-norm residual block, with the first position as the only query: its attention row
    over all keys, then the feed-forward of that one row. ``TransformerLayer`` returns ``x[:, 0]`` of
    the last block as ``cls_emb``, the only part of it ``Transformer`` reads.
    """
    row_mask = None if mask is None else mask[:, :1]
    attend, feed = block.input_sublayer, block.output_sublayer
    normed = attend.norm(x)
    attended = block.attention(normed[:, :1], normed, normed, mask=row_mask, register_hook=register_hook)
    x = x[:, :1] + attend.dropout(attended)
    x = feed(x, lambda y: block.feed_forward(y, mask=row_mask))
    return block.dropout(x)
