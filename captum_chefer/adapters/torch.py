"""``TransformerAdapter``: any PyTorch transformer classifier as one Captum ``forward_func``.

The model is called as it is: ``model(x, *model_args)`` returns the logits ``[B, C]`` (or an object with
``.logits``, or a tuple whose first item is the logits), where ``x`` is what the model takes:

* token ids ``[B, L]`` (integers);
* embeddings ``[B, L, D]`` (floats);
* images ``[B, C, H, W]`` (floats), cut into ``patch_size`` patches by the model.

Captum arguments:

* ``inputs``: ``(x,)``. For a model that takes ids, ``level="embedding"`` gives the output of its token
  embedding module instead (``embedding=``), and the model then runs with that module's output replaced
  by the given embeddings (for this call and thread only).
* ``additional_forward_args``: the model's own arguments, in order; for a model given ``embedding=``,
  followed by the token ids, so that an embedding-level call can still hand the model its ids (a model
  that reads its padding from the ids keeps reading it from the real ids).

Which tokens are real: ``mask_arg=k`` names the model argument that is a ``[B, L]`` mask (non-zero on
real tokens), or ``pad_id`` marks padding ids; otherwise every token is real (and every patch always).

Chefer relevance: the attention modules (``nn.MultiheadAttention``, PyHealth or HuggingFace attention;
found under the model or given as a list) are captured by :class:`captum_chefer.capture.AttentionCapture`,
first layer to last; the row of the pooled position (``pool``) is propagated, and the positions the model
prepends to its input (``prefix_tokens``, for example a learned class token) are dropped when the
relevance is mapped back to the input tokens or patches.
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any, Callable, Literal, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..capture import AttentionCapture, evaluation_mode, find_attention_modules
from ..protocol import AttentionForward
from .base import (
    PACKAGE_FILES,
    Adapter,
    DecodedToken,
    LookupDict,
    check_devices,
    spread_over_patches,
    sum_over_patches,
)

__all__ = ["Pool", "TransformerAdapter", "blurred_images", "logits_of"]

Level = Literal["embedding", "token"]
Pool = Union[Literal["first", "last"], int, Callable[[tuple, tuple], Tensor]]
TargetMode = Literal["predicted", "label"]
InputKind = Literal["ids", "embeddings", "images"]


class TransformerAdapter(Adapter):
    """A transformer classifier built from PyTorch modules as a Captum forward function.

    ``adapter(*inputs, *additional_forward_args)`` returns the logits ``[B, C]``, so the adapter serves
    :class:`captum_chefer.CheferAttribution`, ``IntegratedGradients``, ``Saliency``, ``NoiseTunnel`` and
    ``LayerIntegratedGradients`` (on ``adapter.embedding_layers``) alike.

    Args:
        model: the classifier; ``model(x, *model_args)`` gives the logits (see the module docstring).
        pool: the position whose output the model classifies, in the attention sequence (prefix
            included): ``"first"``, ``"last"`` (each sample's last real token), an int (negative counts
            from the end), or a callable ``pool(inputs, additional_forward_args) -> [B]`` positions.
        prefix_tokens: how many positions the model puts before the input tokens or patches (a class
            token: 1); their relevance is dropped when mapping back to the inputs.
        attention: the attention modules, first layer to last; default: every capturable attention
            module under ``model`` in registration order.
        patch_size: the patch size of an image model (an int or ``(height, width)``); read from
            ``model.patch_size`` when the model has it (torchvision's ``VisionTransformer``).
        embedding: the token embedding module of a model that takes ids (enables ``level="embedding"``
            and is ``embedding_layers`` for ``LayerIntegratedGradients``).
        pad_id: the padding id of a model that takes ids.
        mask_arg: index of the model argument that is the token mask (``[B, L]``, non-zero on real
            tokens), if the model takes one.
        feature_key: the name of the one input feature (``to_feature_dict`` key).
        num_outputs: the number of logits; default: ``out_features`` of the model's last ``nn.Linear``.
        vocabulary: id -> text (a sequence or a mapping) for ``decode``; default ``"#<id>"``.

    The adapter reads the model's modules when it is made; wrap the model again after replacing any of
    them. Calls from several threads on one model are safe (see :mod:`captum_chefer.capture`).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from captum_chefer import CheferAttribution, TransformerAdapter
        >>> class Classifier(nn.Module):  # [CLS] + tokens -> nn.TransformerEncoder -> [CLS] -> 2 logits
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.embed = nn.Embedding(20, 16, padding_idx=0)
        ...         self.cls = nn.Parameter(torch.randn(1, 1, 16))
        ...         layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        ...         self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        ...         self.head = nn.Linear(16, 2)
        ...     def forward(self, ids):
        ...         x = torch.cat([self.cls.expand(len(ids), -1, -1), self.embed(ids)], dim=1)
        ...         padding = torch.cat([torch.ones_like(ids[:, :1]), ids], dim=1) == 0  # [CLS] is real
        ...         return self.head(self.encoder(x, src_key_padding_mask=padding)[:, 0])
        >>> _ = torch.manual_seed(0)
        >>> model = Classifier().eval()
        >>> adapter = TransformerAdapter(model, pool="first", prefix_tokens=1, embedding=model.embed, pad_id=0)
        >>> ids = torch.tensor([[3, 5, 7, 2], [4, 6, 0, 0]])
        >>> inputs, args = adapter.captum_inputs(ids, level="token")
        >>> (scores,) = CheferAttribution(adapter).attribute(inputs, target=1, additional_forward_args=args)
        >>> tuple(scores.shape), bool((scores[1, 2:] == 0).all())  # one score per token, none on padding
        ((2, 4), True)
    """

    def __init__(
        self,
        model: nn.Module,
        pool: Pool = "first",
        prefix_tokens: int = 0,
        *,
        attention: Optional[Sequence[nn.Module]] = None,
        patch_size: Optional[int | tuple[int, int]] = None,
        embedding: Optional[nn.Module] = None,
        pad_id: Optional[int] = None,
        mask_arg: Optional[int] = None,
        feature_key: str = "input",
        num_outputs: Optional[int] = None,
        vocabulary: Optional[Sequence[str] | Mapping[int, str]] = None,
    ) -> None:
        super().__init__()
        if isinstance(model, Adapter):
            raise TypeError("model is already an adapter; pass it to the attribution method directly")
        if not isinstance(model, nn.Module):
            raise TypeError(f"TransformerAdapter needs a torch model (nn.Module), got {type(model).__name__}")
        _check_pool(pool)
        if not isinstance(prefix_tokens, int) or isinstance(prefix_tokens, bool) or prefix_tokens < 0:
            raise ValueError(f"prefix_tokens must be a non-negative int, got {prefix_tokens!r}")
        if embedding is not None and not isinstance(embedding, nn.Module):
            raise TypeError(f"embedding must be the model's token embedding module, got {type(embedding).__name__}")
        self.model = model
        self.pool: Pool = pool
        self.prefix_tokens = prefix_tokens
        self.feature_keys: list[str] = [feature_key]
        self.embedding = embedding
        self._carries_ids = embedding is not None  # the ids travel last in the args (see the module docstring)
        self.pad_id = pad_id
        self.mask_arg = mask_arg
        self.vocabulary = vocabulary
        self._num_outputs = num_outputs
        self._mask_warned = False
        if patch_size is None and isinstance(getattr(model, "patch_size", None), int):
            patch_size = int(model.patch_size)
        self.patch_size = patch_size
        self._attention_modules: list[nn.Module] = list(attention) if attention is not None else find_attention_modules(model)
        # Read once: walking the module tree costs milliseconds per call, and methods call the model often.
        self._model_modules: tuple[nn.Module, ...] = tuple(model.modules())

    # ------------------------------------------------------------------ model description

    @property
    def embedding_layers(self) -> list[nn.Module]:
        """The token embedding module, for ``LayerIntegratedGradients`` (empty when none was given)."""
        return [self.embedding] if self.embedding is not None else []

    @property
    def num_outputs(self) -> int:
        """Number of logits (given, or ``out_features`` of the model's last ``nn.Linear``)."""
        if self._num_outputs is not None:
            return int(self._num_outputs)
        linears = [m for m in self._model_modules if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"cannot tell how many outputs {type(self.model).__name__} has; pass num_outputs=")
        return int(linears[-1].out_features)

    @property
    def pad_ids(self) -> tuple[int, ...]:
        """The padding id of the input (``-1``, matching no id, when it has none)."""
        return (self.pad_id if self.pad_id is not None else -1,)

    # ------------------------------------------------------------------ batch <-> Captum

    def captum_inputs(self, batch: Any, level: Level = "embedding") -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """``(inputs, additional_forward_args)`` for a batch.

        Args:
            batch: the model's input ``x``, a tuple ``(x, *model_args)``, or a dict with ``"input"``,
                optionally ``"args"`` (a tuple) and ``"labels"``.
            level: for a model that takes ids: ``"embedding"`` (the token embedding module's output,
                for gradient methods; needs ``embedding=``) or ``"token"`` (the ids, for
                ``LayerIntegratedGradients``, token removal and Chefer). Embeddings and images are
                returned as they are at either level.

        Returns:
            ``inputs = (x,)`` and ``additional_forward_args`` = the model's arguments (then the ids, for a
            model given ``embedding=``); see the module docstring.
        """
        if level not in ("embedding", "token"):
            raise ValueError(f"level must be 'embedding' or 'token', got {level!r}")
        x, model_args, _ = self._read_batch(batch)
        x = x.to(self._device())
        model_args = tuple(a.to(x.device) if isinstance(a, Tensor) else a for a in model_args)
        kind = self._kind(x)
        if kind != "ids":
            if self.embedding is not None:
                raise ValueError(
                    "this adapter was given embedding= (a model that takes token ids), but the batch holds "
                    f"{tuple(x.shape)} floats; pass the token ids"
                )
            self._check_inputs(x, model_args, samples_with_tokens=True)
            return (x,), model_args
        args = model_args + ((x,) if self._carries_ids else ())
        self._check_inputs(x, args, samples_with_tokens=True)
        self._warn_if_padding_unknown(x, model_args)
        if level == "token":
            return (x,), args
        if self.embedding is None:
            raise ValueError(
                "level='embedding' needs the model's token embedding module: TransformerAdapter(model, "
                "embedding=model.<embedding>); or use level='token'"
            )
        with torch.no_grad():
            embedded = self.embedding(x).detach()
        return (embedded,), args

    def captum_target(self, batch: Any, mode: TargetMode = "predicted") -> Optional[Tensor]:
        """The Captum ``target``: each sample's arg-max class (``"predicted"``) or ``batch["labels"]``
        (``"label"``); ``None`` for a single-logit model."""
        if mode not in ("predicted", "label"):
            raise ValueError(f"target mode must be 'predicted' or 'label', got {mode!r}")
        _, _, labels = self._read_batch(batch)
        if mode == "label":
            if labels is None:
                raise ValueError("target mode 'label' needs a dict batch with 'labels'; use mode='predicted' or pass target=")
            if self.num_outputs == 1:
                return None
            labels = torch.as_tensor(labels)
            if labels.dim() == 2 and labels.shape[1] > 1:
                raise ValueError("the labels hold several classes per sample (multi-label); pass target=<class index>")
            return labels.reshape(-1).long().to(self._device())
        inputs, args = self.captum_inputs(batch, level="token")
        with torch.no_grad():
            logits = self(*inputs, *args)
        return None if logits.shape[1] == 1 else logits.argmax(dim=1)

    def to_feature_dict(self, attributions: Tensor | tuple[Tensor, ...]) -> dict[str, Tensor]:
        """``{feature_key: scores}``: ``[B, L]`` per token (embeddings summed over ``D``), ``[B, N]`` per
        patch (pixels and channels summed, patches row-major)."""
        attributions = tuple(attributions) if isinstance(attributions, (tuple, list)) else (attributions,)
        if len(attributions) != 1 or not isinstance(attributions[0], Tensor):
            raise ValueError(f"expected one attribution tensor (feature {self.feature_keys[0]!r}), got {len(attributions)} items")
        (a,) = attributions
        if a.dim() == 2:
            scores = a
        elif a.dim() == 3:
            scores = a.sum(dim=-1)
        elif a.dim() == 4:
            scores = sum_over_patches(a, self._patch_size())
        else:
            raise ValueError(f"attributions have shape {tuple(a.shape)}; expected [B, L], [B, L, D] or [B, C, H, W]")
        return LookupDict({self.feature_keys[0]: scores.detach()}, kind="feature")

    def token_masks(self, additional_forward_args: Any, inputs: Optional[tuple[Tensor, ...]] = None) -> tuple[Tensor, ...]:
        """``(mask,)``: ``True`` on real tokens ``[B, L]`` (every patch of an image ``[B, N]``).

        Args:
            additional_forward_args: from :meth:`captum_inputs`.
            inputs: the matching inputs (needed where no argument carries a mask: images, or tokens
                without a mask argument).
        """
        args = _as_tuple(additional_forward_args)
        x = None if inputs is None else _as_tuple(inputs)[0]
        return (self._token_mask(x, args),)

    def baselines(
        self, inputs: tuple[Tensor, ...], additional_forward_args: tuple[Tensor, ...], reference: str = "zero"
    ) -> tuple[Tensor, ...]:
        """Integrated Gradients baselines: padding stays padding, real tokens (or pixels) get a reference.

        Args:
            inputs: from :meth:`captum_inputs` (any level).
            additional_forward_args: the matching arguments.
            reference: ``"zero"`` (a zero embedding; the padding id at token level; a black image) or
                ``"blur"`` (images: a Gaussian blur of the image, sigma a quarter of the patch size).
        """
        (x,) = _as_tuple(inputs)
        args = _as_tuple(additional_forward_args)
        kind = self._kind(x)
        if kind == "images":
            if reference == "zero":
                return (torch.zeros_like(x),)
            if reference == "blur":
                return (blurred_images(x, max(self._patch_size()) / 4.0),)
            raise ValueError(f"image baselines are 'zero' or 'blur', got {reference!r}")
        if reference != "zero":
            raise ValueError(f"TransformerAdapter baselines are 'zero' (or 'blur' for images), got {reference!r}")
        mask = self._token_mask(x, args).to(x.device)
        if kind == "ids":
            if self.pad_id is None:
                raise ValueError("token-level baselines need the padding id: TransformerAdapter(..., pad_id=)")
            return (torch.where(mask, torch.full_like(x, self.pad_id), x),)
        return (torch.where(mask.unsqueeze(-1), torch.zeros_like(x), x),)

    def remove_tokens(
        self, tokens: tuple[Tensor, ...], additional_forward_args: tuple[Tensor, ...], keep: Mapping[str, Tensor], *, compact: bool = True
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """Inputs and arguments with the tokens (patches) outside ``keep`` removed.

        A removed token id becomes ``pad_id`` and the mask argument (``mask_arg``) zero there; with
        ``compact``, the kept tokens move to the front in their order (the mask and every argument shaped
        ``[B, L, ...]`` with them), as the input would look without the removed tokens. Embeddings are
        zeroed. A removed patch becomes black (zero pixels); images are never compacted.
        """
        (x,) = _as_tuple(tokens)
        args = list(_as_tuple(additional_forward_args))
        kept = keep[self.feature_keys[0]].to(x.device).bool()
        kind = self._kind(x)
        if kind == "images":
            pixels = spread_over_patches(kept.to(x.dtype), (x.shape[0], 1, *x.shape[2:]), self._patch_size())
            return (x * (pixels > 0).to(x.dtype),), tuple(args)
        if kind == "ids" and self.pad_id is None and self.mask_arg is None:
            raise ValueError("removing tokens needs to know what padding is: pass pad_id= or mask_arg= to TransformerAdapter")
        kept = kept & self._token_mask(x, tuple(args)).to(x.device)
        if kind == "ids":
            if self.pad_id is not None:
                x = torch.where(kept, x, torch.full_like(x, self.pad_id))
            if self._carries_ids:
                args[-1] = x
        else:
            x = x * kept.unsqueeze(-1).to(x.dtype)
        if self.mask_arg is not None:
            args[self.mask_arg] = kept.to(args[self.mask_arg].dtype)
        if compact:
            order = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)
            x = _gather_positions(x, order)
            args = [_gather_positions(a, order) if _aligned(a, kept) else a for a in args]
        return (x,), tuple(args)

    # ------------------------------------------------------------------ display

    def decode(self, batch: Any) -> list[list[DecodedToken]]:
        """Each sample's real tokens as text (``vocabulary``, or ``"#<id>"``; ``"t<i>"`` for embeddings),
        or its patches as ``"patch <row>,<column>"``."""
        x, model_args, _ = self._read_batch(batch)
        args = model_args + ((x,) if self._carries_ids and self._kind(x) == "ids" else ())
        mask = self._token_mask(x, args).cpu()
        kind = self._kind(x)
        columns = x.shape[-1] // self._patch_size()[1] if kind == "images" else 0
        out: list[list[DecodedToken]] = []
        for i in range(mask.shape[0]):
            tokens = []
            for j in mask[i].nonzero().flatten().tolist():
                if kind == "images":
                    text = f"patch {j // columns},{j % columns}"
                elif kind == "ids":
                    text = self._token_text(int(x[i, j]))
                else:
                    text = f"t{j}"
                tokens.append(DecodedToken(self.feature_keys[0], text, (j,)))
            out.append(tokens)
        return out

    def _token_text(self, token_id: int) -> str:
        if self.vocabulary is not None:
            try:
                return str(self.vocabulary[token_id])
            except (KeyError, IndexError):
                pass
        return f"#{token_id}"

    # ------------------------------------------------------------------ forward

    def forward(self, *inputs_and_args: Tensor) -> Tensor:
        """Logits ``[B, C]`` from ``(*inputs, *additional_forward_args)``, with dropout off."""
        inputs, args = self.split_inputs(inputs_and_args)
        self._check_inputs(inputs[0], args)
        with evaluation_mode(self.model, self._model_modules):
            logits = self._logits(inputs[0], args)
        self._check_captum_target(logits)
        return logits

    def split_inputs(self, inputs_and_args: tuple) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """``(*inputs, *additional_forward_args)`` -> ``(inputs, additional_forward_args)``."""
        if not inputs_and_args or not isinstance(inputs_and_args[0], Tensor):
            raise ValueError("expected the input tensor first, then the additional forward args; make both with adapter.captum_inputs(batch)")
        return tuple(inputs_and_args[:1]), tuple(inputs_and_args[1:])

    def _logits(self, x: Tensor, args: tuple) -> Tensor:
        """The model's logits for one input (ids, embeddings or images) and its arguments."""
        if self.embedding is None:
            return logits_of(self.model(x, *args))
        if not args or not isinstance(args[-1], Tensor) or args[-1].is_floating_point():
            last = args[-1] if args else None
            got = "nothing" if not args else "a float tensor" if isinstance(last, Tensor) else type(last).__name__
            raise ValueError(
                f"the last additional forward arg must be the token ids (an integer tensor), got {got}; make the args "
                "with adapter.captum_inputs(batch)"
            )
        model_args, ids = args[:-1], args[-1]
        if not x.is_floating_point():
            return logits_of(self.model(x, *model_args))
        if tuple(x.shape[:2]) != tuple(ids.shape):
            raise ValueError(f"embeddings {tuple(x.shape)} do not match the token ids {tuple(ids.shape)} they stand for")
        with AttentionCapture({}, overrides={self.embedding: _returning(x)}, detach_parameters=False):
            return logits_of(self.model(ids, *model_args))

    # ------------------------------------------------------------------ AttentionModel

    def require_attention(self) -> None:
        """Raise ``ValueError`` unless the model has attention modules Chefer relevance can propagate."""
        if not self._attention_modules:
            raise ValueError(
                f"{type(self.model).__name__} has no attention module this package can capture "
                "(torch.nn.MultiheadAttention, PyHealth's or HuggingFace attention); pass attention=[...] if it has "
                "one, or use a gradient method such as IntegratedGradients(adapter)"
            )

    def attention_forward(
        self, inputs: tuple[Tensor, ...], additional_forward_args: tuple, *, pooled_row_only: bool = False
    ) -> AttentionForward:
        """One forward pass in evaluation mode capturing each layer's attention in the graph.

        With ``pooled_row_only``, a torchvision ``VisionTransformer`` pooling its class token evaluates its
        last ``EncoderBlock`` for that token alone (it reads nothing else of it); elsewhere every layer is
        computed in full (always correct).
        """
        self.require_attention()
        (x,) = _as_tuple(inputs)
        args = _as_tuple(additional_forward_args)
        self._check_inputs(x, args)
        tracked: dict[str, Tensor] = {}
        overrides = self._pooled_row_overrides(pooled_row_only)
        detach = True
        if x.is_floating_point():
            x = x.detach().requires_grad_(True)
            tracked["leaf"] = x
        elif self._embedding_module() is not None:
            overrides[self._embedding_module()] = partial(_tracked_output, tracked)
        else:  # ids and no known embedding: let the parameters carry the graph
            detach = False
        capture = AttentionCapture(  # deferred: transformers layers keep their maps out of memory until the backward
            {self.feature_keys[0]: self._attention_modules}, overrides=overrides, model=self.model,
            model_modules=self._model_modules, detach_parameters=detach, deferred=True,
        )
        with capture:
            logits = self._logits(x, args)
        maps = capture.attention[self.feature_keys[0]]
        if not maps:
            raise RuntimeError(
                f"none of the {len(self._attention_modules)} attention modules ran in the forward pass of "
                f"{type(self.model).__name__}; pass the modules the model calls as attention=[...]"
            )
        pool = self._pool_index((x,), args, maps[0].shape[-1]).to(logits.device)
        embeddings = {self.feature_keys[0]: tracked["leaf"]} if "leaf" in tracked else {}
        return AttentionForward(logits=logits, attention=capture.attention, pool_index={self.feature_keys[0]: pool}, embeddings=embeddings)

    def relevance_to_inputs(
        self, relevance: Mapping[str, Tensor], inputs: tuple[Tensor, ...], additional_forward_args: tuple
    ) -> tuple[Tensor, ...]:
        """Relevance over the attention sequence ``[B, P + L]`` -> a tensor shaped like the input.

        The ``P`` prefix positions are dropped; tokens get their relevance (spread evenly over ``D`` for
        embeddings, zero on padding), images spread each patch's relevance over its pixels and channels.
        """
        (x,) = _as_tuple(inputs)
        row = relevance[self.feature_keys[0]].to(x.device)
        kind = self._kind(x)
        count = self._token_count(x)
        prefix = self._prefix(row.shape[1], count)
        if row.shape[1] - prefix != count:
            raise ValueError(
                f"the attention covers {row.shape[1]} positions but the input has {count} "
                f"{'patches' if kind == 'images' else 'tokens'}"
                + (f"; pass prefix_tokens={row.shape[1] - count} (the positions the model puts before them, e.g. a class token)"
                   if row.shape[1] > count else
                   "; the model drops or merges positions, so its attention cannot be mapped to these inputs")
                + (f" (prefix_tokens is {prefix})" if prefix else "")
            )
        row = row[:, prefix:]
        if kind == "images":
            return (spread_over_patches(row, x.shape, self._patch_size()).to(x.dtype).detach(),)
        row = row * self._token_mask(x, _as_tuple(additional_forward_args)).to(row.device)
        if kind == "embeddings":
            return ((row / x.shape[-1]).unsqueeze(-1).expand(x.shape).contiguous().to(x.dtype).detach(),)
        return (row.detach(),)

    def _pooled_row_overrides(self, enabled: bool) -> dict[nn.Module, Callable[..., Any]]:
        """torchvision's ViT reads only ``x[:, 0]`` after its encoder: its last block can compute that row alone."""
        if not enabled or self.pool != "first" or not _is_torchvision_vit(self.model):
            return {}
        last = self.model.encoder.layers[-1]
        if type(last).__name__ != "EncoderBlock" or getattr(last, "self_attention", None) is not self._attention_modules[-1]:
            return {}
        return {last: partial(_first_row_encoder_block, last)}

    # ------------------------------------------------------------------ internals

    def _embedding_module(self) -> Optional[nn.Module]:
        return self.embedding

    def _check_inputs(self, x: Tensor, args: tuple, *, samples_with_tokens: bool = False) -> None:
        """Refuse, before the model runs, what would give a wrong or unreadable result.

        An empty batch or sequence; an input on another device than the model; a per-sample argument
        (:meth:`_per_sample_args`) with another batch size; NaN or infinite input values; token ids beyond
        the embedding. With ``samples_with_tokens`` (a batch being read), also a sample without a real
        token: the model's output for it would read padding only (removal metrics do make such samples
        on purpose, so calls of the model do not check this).
        """
        name = self.feature_keys[0]
        if not isinstance(x, Tensor):
            raise TypeError(f"the input must be a tensor (ids, embeddings or images), got {type(x).__name__}")
        kind = self._kind(x)
        if x.shape[0] == 0 or (kind != "images" and x.shape[1] == 0):
            raise ValueError(
                f"the input {name!r} has shape {tuple(x.shape)}: no {'samples' if x.shape[0] == 0 else 'tokens'}; "
                "pass at least one sample with at least one token"
            )
        check_devices([(f"input {name!r}", x)], self._device())  # arguments are moved where they are used
        per_sample = self._per_sample_args(args)
        sizes = {f"input {name!r}": int(x.shape[0])}
        sizes.update({arg: int(a.shape[0]) for arg, a in per_sample if a.dim() > 0})
        if len(set(sizes.values())) > 1:
            listed = ", ".join(f"{arg} {size}" for arg, size in sizes.items())
            raise ValueError(
                f"inputs and additional_forward_args have different batch sizes ({listed}); make them with one "
                "adapter.captum_inputs(batch) call and slice all of them together"
            )
        if x.is_floating_point():
            finite = torch.isfinite(x)
            if not bool(finite.all()):
                raise ValueError(
                    f"the input {name!r} holds {int((~finite).sum())} NaN or infinite value(s); attributions of it "
                    "would be NaN. Check what made the inputs (a baseline or noise with NaN/inf), and pass the inputs "
                    "from adapter.captum_inputs(batch)"
                )
        elif (size := getattr(self._embedding_module(), "num_embeddings", None)) is not None:
            low, high = int(x.min()), int(x.max())
            if low < 0 or high >= size:
                raise ValueError(
                    f"the input {name!r} holds token id {high if high >= size else low}, outside the model's "
                    f"vocabulary of {size} tokens (ids 0..{size - 1}); tokenize with the model's own tokenizer"
                )
        if samples_with_tokens and kind != "images":
            empty = (~self._token_mask(x, args).any(dim=1)).nonzero().flatten().tolist()
            if empty:
                raise ValueError(
                    f"sample(s) {empty[:10]} of the batch have no real token (all padding): the model's output for "
                    "them reads padding only, and there is nothing to attribute; drop them from the batch"
                )

    def _warn_if_padding_unknown(self, x: Tensor, model_args: tuple) -> None:
        """Warn (once per adapter) when the batch shows padding the adapter was not told of: ids equal to the
        embedding's ``padding_idx``, or a model argument that looks like a padding mask.

        Without ``mask_arg`` or ``pad_id`` every token counts as real: padding would get scores, count as
        codes in the removal metrics, and ``pool="last"`` would pool the padded last position.
        """
        if self.mask_arg is not None or self.pad_id is not None or self._mask_warned:
            return
        padding_idx = getattr(self._embedding_module(), "padding_idx", None)
        if padding_idx is not None and bool((x == padding_idx).any()):
            self._mask_warned = True
            warnings.warn(
                f"the token ids hold {padding_idx}, the padding_idx of the model's embedding, but TransformerAdapter was "
                "told of no padding, so every token counts as real (scores and removal on padding, pool='last' at a "
                f"padded position); pass pad_id={padding_idx} if it marks padding",
                skip_file_prefixes=PACKAGE_FILES,
            )
            return
        for k, a in enumerate(model_args):
            if not isinstance(a, Tensor) or tuple(a.shape) != tuple(x.shape[:2]):
                continue
            zero_one = a.dtype == torch.bool or bool(((a == 0) | (a == 1)).all())
            if zero_one and bool(a.bool().any()) and not bool(a.bool().all()):
                self._mask_warned = True
                warnings.warn(
                    f"model argument {k} is shaped like the tokens {tuple(x.shape[:2])} and holds 0/1 values, as a padding "
                    f"mask does, but TransformerAdapter was told of no padding, so every token counts as real (scores and "
                    f"removal on padding, pool='last' at a padded position). If it is a mask that is non-zero on real "
                    f"tokens, pass mask_arg={k}; if padding is a token id, pass pad_id=",
                    skip_file_prefixes=PACKAGE_FILES,
                )
                return

    def _per_sample_args(self, args: tuple) -> list[tuple[str, Tensor]]:
        """The additional forward args known to hold one row per sample: the mask argument, the carried ids."""
        out = []
        if self.mask_arg is not None and self.mask_arg < len(args) and isinstance(args[self.mask_arg], Tensor):
            out.append((f"the mask (additional forward arg {self.mask_arg})", args[self.mask_arg]))
        if self._carries_ids and args and isinstance(args[-1], Tensor) and not args[-1].is_floating_point():
            out.append(("the token ids (last additional forward arg)", args[-1]))
        return out

    def _read_batch(self, batch: Any) -> tuple[Tensor, tuple, Any]:
        labels = None
        if isinstance(batch, Mapping):
            if "input" not in batch:
                raise KeyError(f"a dict batch needs the model input under 'input'; it has {sorted(batch)}")
            unknown = sorted(k for k in batch if k not in ("input", "args", "labels"))
            if unknown:
                raise KeyError(
                    f"the batch has keys {unknown} that TransformerAdapter does not read, so the model would run "
                    "without them; a dict batch holds 'input', 'args' (the model's other arguments, in order) and "
                    "'labels' only"
                )
            x, model_args, labels = batch["input"], tuple(batch.get("args", ())), batch.get("labels")
        elif isinstance(batch, (tuple, list)):
            if not batch:
                raise ValueError("the batch is empty")
            x, model_args = batch[0], tuple(batch[1:])
        else:
            x, model_args = batch, ()
        if not isinstance(x, Tensor):
            raise TypeError(f"the model input must be a tensor (ids, embeddings or images), got {type(x).__name__}")
        self._kind(x)  # validates
        return x, model_args, labels

    def _kind(self, x: Tensor) -> InputKind:
        if not x.is_floating_point():
            if x.dim() != 2 or x.dtype == torch.bool:
                raise ValueError(f"token ids must be an integer tensor [B, L], got {x.dtype} {tuple(x.shape)}")
            return "ids"
        if x.dim() == 3:
            if self.patch_size is not None and self.embedding is None:
                raise ValueError(
                    f"this adapter explains an image model (patch_size={self.patch_size}), whose input is images "
                    f"[B, C, H, W]; got {tuple(x.shape)}. For one image add the batch dimension: image[None]"
                )
            return "embeddings"
        if x.dim() == 4:
            return "images"
        raise ValueError(f"inputs must be ids [B, L], embeddings [B, L, D] or images [B, C, H, W]; got {tuple(x.shape)}")

    def _patch_size(self) -> tuple[int, int]:
        if self.patch_size is None:
            raise ValueError("images need the model's patch size: TransformerAdapter(model, patch_size=16)")
        return (self.patch_size, self.patch_size) if isinstance(self.patch_size, int) else tuple(self.patch_size)  # type: ignore[return-value]

    def _token_count(self, x: Tensor) -> int:
        if self._kind(x) == "images":
            ph, pw = self._patch_size()
            return (x.shape[2] // ph) * (x.shape[3] // pw)
        return int(x.shape[1])

    def _prefix(self, length: int, count: int) -> int:
        return self.prefix_tokens

    def _token_mask(self, x: Optional[Tensor], args: tuple) -> Tensor:
        """``[B, L]`` True on real tokens (``[B, N]`` all True for patches)."""
        if x is not None and self._kind(x) == "images":
            return torch.ones(x.shape[0], self._token_count(x), dtype=torch.bool, device=x.device)
        if self.mask_arg is not None:
            if self.mask_arg >= len(args):
                raise ValueError(f"mask_arg={self.mask_arg}, but the additional forward args hold {len(args)} items")
            if not isinstance(args[self.mask_arg], Tensor):
                raise ValueError(
                    f"mask_arg={self.mask_arg} names additional forward arg {self.mask_arg}, which is a "
                    f"{type(args[self.mask_arg]).__name__}, not the attention mask tensor; pass the index of the mask"
                )
            return args[self.mask_arg] != 0
        ids = None
        if x is not None and not x.is_floating_point():
            ids = x
        elif self._carries_ids and args and isinstance(args[-1], Tensor) and not args[-1].is_floating_point():
            ids = args[-1]
        if ids is not None and self.pad_id is not None:
            return ids != self.pad_id
        reference = x if x is not None else ids
        if reference is None:
            raise ValueError("this adapter's masks need the inputs: token_masks(additional_forward_args, inputs)")
        return torch.ones(reference.shape[0], reference.shape[1], dtype=torch.bool, device=reference.device)

    def _pool_index(self, inputs: tuple, args: tuple, length: int) -> Tensor:
        """``[B]`` pooled positions in the attention sequence of ``length`` positions."""
        x = inputs[0]
        batch = x.shape[0]
        if callable(self.pool):
            index = torch.as_tensor(self.pool(inputs, args)).long().reshape(-1)
            if index.numel() != batch or bool(((index < 0) | (index >= length)).any()):
                raise ValueError(f"pool(...) must give {batch} positions in 0..{length - 1}, got {index.tolist()}")
            return index
        if self.pool == "first":
            return torch.zeros(batch, dtype=torch.long, device=x.device)
        if self.pool == "last":
            if self._kind(x) == "images":
                return torch.full((batch,), length - 1, dtype=torch.long, device=x.device)
            mask = self._token_mask(x, args).to(x.device)
            positions = torch.arange(mask.shape[1], device=x.device)
            last = (positions * mask.long()).amax(dim=1)  # the rightmost real token, left or right padding
            return last + self._prefix(length, mask.shape[1])
        position = int(self.pool)
        if not -length <= position < length:
            raise ValueError(f"pool={position} is outside the attention sequence of {length} positions")
        return torch.full((batch,), position % length, dtype=torch.long, device=x.device)

    def _device(self) -> torch.device:
        parameter = next(iter(self.model.parameters()), None)
        return parameter.device if parameter is not None else torch.device("cpu")


# ---------------------------------------------------------------------------------------------- helpers


def logits_of(output: Any) -> Tensor:
    """The logits in a model's output: the tensor itself, ``output.logits``, or the first item of a tuple."""
    if isinstance(output, Tensor):
        logits = output
    elif hasattr(output, "logits"):
        logits = output.logits
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        logits = output[0]
    elif isinstance(output, Mapping) and isinstance(output.get("logit"), Tensor):
        logits = output["logit"]
    else:
        raise TypeError(
            "the model must return logits [B, C] (a tensor, .logits, a tuple starting with them, or a dict with a "
            f"'logit' tensor); got {type(output).__name__}"
        )
    if logits.dim() != 2:
        raise ValueError(f"the model must return logits [B, C]; got shape {tuple(logits.shape)}")
    return logits


def blurred_images(images: Tensor, sigma: float) -> Tensor:
    """A separable Gaussian blur of ``[B, C, H, W]`` images (reflect padding), an IG reference image.

    Example:
        >>> image = torch.zeros(1, 1, 11, 11)
        >>> image[0, 0, 5, 5] = 1.0
        >>> blurred = blurred_images(image, 1.0)  # the mass is kept away from the border
        >>> round(float(blurred.sum()), 4), bool(blurred[0, 0, 5, 5] < 0.2)
        (1.0, True)
    """
    radius = max(1, int(round(3 * sigma)))
    radius = min(radius, images.shape[-1] - 1, images.shape[-2] - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    out = torch.nn.functional.pad(images, (radius, radius, 0, 0), mode="reflect")
    out = torch.nn.functional.conv2d(out, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    out = torch.nn.functional.pad(out, (0, 0, radius, radius), mode="reflect")
    return torch.nn.functional.conv2d(out, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def _check_pool(pool: Any) -> None:
    if callable(pool) or pool in ("first", "last") or (isinstance(pool, int) and not isinstance(pool, bool)):
        return
    raise ValueError(f"pool must be 'first', 'last', an int or a callable giving [B] positions; got {pool!r}")


def _as_tuple(value: Any) -> tuple:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _aligned(value: Any, mask: Tensor) -> bool:
    return isinstance(value, Tensor) and value.dim() >= 2 and tuple(value.shape[:2]) == tuple(mask.shape)


def _gather_positions(value: Tensor, order: Tensor) -> Tensor:
    index = order.view(*order.shape, *([1] * (value.dim() - 2))).expand_as(value)
    return value.gather(1, index)


def _returning(value: Tensor) -> Callable[..., Tensor]:
    """An override handler that returns ``value`` instead of running the module."""

    def handler(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Tensor:
        return value

    return handler


def _tracked_output(tracked: dict[str, Tensor], original: Callable[..., Any], *args: Any, **kwargs: Any) -> Tensor:
    """Run the embedding module and make its output the leaf the graph grows from (the first call's)."""
    output = original(*args, **kwargs)
    if "leaf" in tracked:
        return output
    leaf = output.detach().requires_grad_(True)
    tracked["leaf"] = leaf
    return leaf


def _is_torchvision_vit(model: nn.Module) -> bool:
    cls = type(model)
    return cls.__name__ == "VisionTransformer" and cls.__module__.startswith("torchvision.")


def _first_row_encoder_block(block: nn.Module, original: Callable[..., Tensor], input: Tensor) -> Tensor:
    """torchvision's ``EncoderBlock.forward`` for the class token alone: ``[B, L, D]`` -> ``[B, 1, D]``.

    The same pre-norm residual block with the first position as the only query: its attention row over
    every key, then the MLP of that one row. ``VisionTransformer`` normalises the encoder output and reads
    ``x[:, 0]``, nothing else.
    """
    x = block.ln_1(input)
    attended, _ = block.self_attention(x[:, :1], x, x, need_weights=False)
    x = block.dropout(attended) + input[:, :1]
    return x + block.mlp(block.ln_2(x))
