"""What every adapter offers, under the same names, doing the same jobs, in the same order in each module.

An adapter wraps one model library's classifier as a Captum ``forward_func`` and maps that library's
batches to Captum's ``(inputs, target, additional_forward_args)`` and back:

1. **Description**: ``feature_keys`` (one input tensor per key, in order), ``num_outputs``, ``pad_ids``,
   ``embedding_layers`` (for ``LayerIntegratedGradients``).
2. **Batch to Captum and back**: ``captum_inputs(batch, level)``, ``captum_target(batch, mode)``,
   ``to_feature_dict(attributions)`` (per-token scores shaped like the token ids, for every method; per
   patch for images), ``token_masks(args, inputs)`` (``True`` on real tokens; ``inputs`` is read where no
   argument carries a mask, as for images), ``baselines(inputs, args, reference)`` (IG references,
   padding kept), ``remove_tokens(tokens, args, keep, compact=...)`` (for the removal metrics).
3. **Display**: ``decode(batch)`` (each sample's real tokens as strings, with their index in the feature
   dict), ``visualization_records(batch, attributions, ...)`` (Captum ``VisualizationDataRecord``s).
4. **Forward**: ``forward(*inputs, *additional_forward_args)`` returns the logits ``[B, C]`` with dropout
   off; ``split_inputs`` undoes the flattening Captum does.
5. **Attention** (:class:`captum_chefer.protocol.AttentionModel`, what ``CheferAttribution`` needs):
   ``require_attention()``, ``attention_forward(inputs, args, ...)``, ``relevance_to_inputs(...)``.

This module holds the parts that are the same for every library: the record builder, and the mapping
between patch relevance and pixels for vision transformers.
"""

from __future__ import annotations

import inspect
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
from captum.attr import visualization as captum_viz
from torch import Tensor, nn

from ..protocol import check_target_range

__all__ = [
    "Adapter",
    "DecodedToken",
    "LookupDict",
    "MethodRecord",
    "ZeroBaselineWarning",
    "check_devices",
    "spread_over_patches",
    "sum_over_patches",
    "uncompiled",
]


#: The package's own files, for ``warnings.warn(..., skip_file_prefixes=PACKAGE_FILES)``: a warning then names
#: the first line outside the package that led to it, however deep the call.
PACKAGE_FILES = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,)


class ZeroBaselineWarning(UserWarning):
    """Integrated Gradients runs through an adapter from an all-zero baseline (Captum's default).

    Shown once per adapter. Filter it with ``warnings.filterwarnings("ignore", category=ZeroBaselineWarning)``
    once you have checked the convergence delta yourself.
    """


class LookupDict(dict):
    """A ``dict`` whose missing keys raise a ``KeyError`` that names the keys it has.

    What :meth:`Adapter.to_feature_dict` and the comparison's results return, so that a wrong feature or
    method name says what to use instead of a bare ``KeyError``.

    Example:
        >>> scores = LookupDict({"conditions": 1, "procedures": 2}, kind="feature")
        >>> scores["diagnoses"]
        Traceback (most recent call last):
        ...
        KeyError: "no feature 'diagnoses' here; use one of ['conditions', 'procedures']"
        >>> scores.get("diagnoses") is None, scores["conditions"]
        (True, 1)
    """

    def __init__(self, *args: Any, kind: str = "key", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kind = kind

    def __missing__(self, key: Any) -> Any:
        raise KeyError(f"no {self.kind} {key!r} here; use one of {list(self)}")

    def __reduce__(self) -> Any:  # pickled (multiprocessing, torch.save) with its kind
        return (type(self), (dict(self),), {"kind": self.kind})


@dataclass(frozen=True)
class DecodedToken:
    """One real token of one sample: its feature, its text for display, its index in the feature dict, and the
    token as its vocabulary spells it.

    ``code`` is ``text`` unless the display adds to it, as a nested code's visit (``text="v2:P7"``,
    ``code="P7"``, ``index=(1, j)``); what a token is, is read from ``code`` and ``index``, never from ``text``.

    Example:
        >>> DecodedToken("procedures", "v2:P7", (1, 0), code="P7").code, DecodedToken("conditions", "C1", (0,)).code
        ('P7', 'C1')
    """

    feature: str
    text: str
    index: tuple[int, ...]  # index into the sample's row of to_feature_dict(...)[feature]
    code: str | None = None  # None: the text

    def __post_init__(self) -> None:
        if self.code is None:
            object.__setattr__(self, "code", self.text)


class MethodRecord(captum_viz.VisualizationDataRecord):
    """Captum's ``VisualizationDataRecord`` that also carries the name of the method it shows.

    Captum's ``visualize_text`` renders it as any record; the attribution label reads ``"<class> (<method>)"``
    so that rows of several methods on one page can be told apart.
    """

    def __init__(self, *args: Any, method: Optional[str] = None) -> None:
        super().__init__(*args)
        self.method = method


class Adapter(nn.Module):
    """Base of the adapters: the record builder shared by all of them (see the module docstring)."""

    feature_keys: list[str]
    _zero_baseline_warned: bool = False

    def decode(self, batch: Any) -> list[list[DecodedToken]]:
        """Each sample's real tokens, in display order."""
        raise NotImplementedError

    def class_names(self) -> dict[int, str]:
        """Readable names of the output classes (index -> name); empty when the model has none."""
        return {}

    def true_classes(self, batch: Any) -> Optional[list[str]]:
        """Each sample's true class as text, or ``None`` when the batch has no labels."""
        return None

    def probabilities(self, logits: Tensor) -> Tensor:
        """Class probabilities from logits: softmax, or sigmoid of a single logit ``[B, 1]``."""
        return torch.sigmoid(logits) if logits.shape[1] == 1 else logits.softmax(dim=1)

    def visualization_records(
        self,
        batch: Any,
        attributions: Any,
        target: Any = None,
        *,
        method: Optional[str] = None,
        delta: Optional[Tensor] = None,
    ) -> list[MethodRecord]:
        """One Captum ``VisualizationDataRecord`` per sample, for ``captum.attr.visualization.visualize_text``.

        Args:
            batch: the batch the attributions explain.
            attributions: shaped like the Captum inputs (a tensor or tuple, any input level), or a feature
                dict ``{feature_key: scores}`` such as ``Comparison.scores[method]``.
            target: the class that was explained (an int, a per-sample sequence or tensor); ``None``: the
                single logit's positive class for binary models, else the predicted class. A single-logit
                model's attributions explain its one logit, the positive class's score, so its records name
                that class whether the target given is ``None``, ``0`` (Captum's index of the logit) or ``1``.
            method: the method's name, carried by the records and shown with the attribution label.
            delta: optional per-sample convergence deltas (e.g. from Integrated Gradients).

        Returns:
            Records whose ``raw_input_ids`` are the decoded tokens (with a ``"<key>"`` marker before each
            feature stream when there are several), ``word_attributions`` their scores divided by the
            sample's largest ``|score|``, ``attr_score`` the sum of the raw scores, ``pred_prob`` the
            probability of ``pred_class``.
        """
        scores = self._scores_dict(attributions)
        decoded = self.decode(batch)
        batch_size = len(decoded)
        inputs, args = self.captum_inputs(batch, level="token")  # type: ignore[attr-defined]
        for key, mask in zip(self.feature_keys, self.token_masks(args, inputs)):  # type: ignore[attr-defined]
            if tuple(scores[key].shape) != tuple(mask.shape):
                raise ValueError(
                    f"scores for {key!r} have shape {tuple(scores[key].shape)} but the batch's tokens are "
                    f"{tuple(mask.shape)}; pass the attributions of this batch"
                )
        with torch.no_grad():
            logits = self(*inputs, *args).detach().float().cpu()
        single = logits.shape[1] == 1
        probabilities = self.probabilities(logits)
        if single:
            predicted = (probabilities[:, 0] >= 0.5).long()
            predicted_probability = torch.where(predicted == 1, probabilities[:, 0], 1 - probabilities[:, 0])
        else:
            predicted = probabilities.argmax(1)
            predicted_probability = probabilities.gather(1, predicted.view(-1, 1))[:, 0]
        explained = _explained_classes(target, batch_size, predicted, logits.shape[1])
        names = self.class_names()
        true = self.true_classes(batch) or ["n/a"] * batch_size
        deltas = None if delta is None else torch.as_tensor(delta).detach().cpu().reshape(-1)
        if deltas is not None and deltas.numel() != batch_size:
            raise ValueError(f"delta must hold one value per sample ({batch_size}), got {deltas.numel()}")
        markers = len(self.feature_keys) > 1
        records = []
        for i, tokens in enumerate(decoded):
            words: list[str] = []
            values: list[float] = []
            for key in self.feature_keys:
                if markers:
                    words.append(f"<{key}>")
                    values.append(0.0)
                row = scores[key][i].detach().float().cpu()
                for token in tokens:
                    if token.feature == key:
                        words.append(token.text)
                        values.append(float(row[token.index]))
            raw_total = sum(values)
            word_scores = torch.tensor(values)
            peak = word_scores.abs().max() if values else torch.tensor(0.0)
            if peak > 0:
                word_scores = word_scores / peak
            attr_class = names.get(explained[i], str(explained[i]))
            records.append(
                MethodRecord(
                    word_scores,
                    float(predicted_probability[i]),
                    names.get(int(predicted[i]), str(int(predicted[i]))),
                    true[i],
                    attr_class if method is None else f"{attr_class} ({method})",
                    raw_total,
                    words,
                    None if deltas is None else float(deltas[i]),
                    method=method,
                )
            )
        return records

    def _warn_if_zero_baseline(self) -> None:
        """Warn once when Captum's Integrated Gradients calls this adapter from an all-zero baseline.

        Adapters call this at the top of ``forward``. It looks up the call stack for Captum's
        ``IntegratedGradients._attribute`` working on this adapter (also inside
        ``LayerIntegratedGradients`` and ``NoiseTunnel``) and reads the baselines it integrates from:
        ``baselines=None`` is Captum's zero. Only the first warning per adapter costs anything beyond a
        walk over a few stack frames.
        """
        if self._zero_baseline_warned:
            return
        baselines = _ig_baselines_on_stack(self)
        if baselines is None or not all(_is_zero(b) for b in baselines):
            return
        self._zero_baseline_warned = True
        warnings.warn(
            f"IntegratedGradients runs through {type(self).__name__} from an all-zero baseline (Captum's default "
            "when baselines is not given). On normalised transformers the integral from zero converges badly "
            "(large convergence delta). Pass baselines=ig_baselines(adapter, inputs, additional_forward_args) "
            "(from captum_chefer import ig_baselines; reference='unk' by default), as compare_methods does.",
            ZeroBaselineWarning,
            stacklevel=2,
        )

    def _check_captum_target(self, logits: Tensor) -> None:
        """Refuse the target of the Captum method calling this adapter when the logits have no such output.

        Adapters call this at the end of ``forward``, once the logits' width is known; without a Captum
        method on the stack it does nothing.
        """
        found = _captum_target_on_stack(self)
        if found is not None and found[0] is not None and logits.dim() == 2:
            check_target_range(found[0], int(logits.shape[1]))

    def _scores_dict(self, attributions: Any) -> dict[str, Tensor]:
        if isinstance(attributions, Mapping):
            missing = [k for k in self.feature_keys if k not in attributions]
            if missing:
                raise KeyError(f"attributions have no scores for {missing}; expected keys {self.feature_keys}")
            return {k: torch.as_tensor(attributions[k]).detach() for k in self.feature_keys}
        if isinstance(attributions, list):
            attributions = tuple(attributions)
        if not isinstance(attributions, (Tensor, tuple)):
            raise TypeError(
                "attributions must be a tensor or tuple shaped like the Captum inputs, or a feature dict "
                f"{{feature_key: scores}}; got {type(attributions).__name__}"
            )
        return self.to_feature_dict(attributions)  # type: ignore[attr-defined]


_IG_ATTRIBUTE_CODE: Any = None


def _ig_baselines_on_stack(adapter: Any, depth: int = 60) -> Optional[tuple]:
    """The baselines of the innermost Captum ``IntegratedGradients._attribute`` on ``adapter``, if any."""
    global _IG_ATTRIBUTE_CODE
    if _IG_ATTRIBUTE_CODE is None:
        from captum.attr import IntegratedGradients

        _IG_ATTRIBUTE_CODE = IntegratedGradients._attribute.__code__
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return None
        if frame.f_code is _IG_ATTRIBUTE_CODE:
            local = frame.f_locals
            if getattr(local.get("self"), "forward_func", None) is adapter:
                baselines = local.get("baselines")
                return tuple(baselines) if isinstance(baselines, (tuple, list)) else (baselines,)
        frame = frame.f_back
    return None


def _is_zero(baseline: Any) -> bool:
    if baseline is None:
        return True
    if isinstance(baseline, Tensor):
        return baseline.is_floating_point() and not bool(baseline.any())
    return isinstance(baseline, (int, float)) and baseline == 0


def _explained_classes(target: Any, batch_size: int, predicted: Tensor, classes: int) -> list[int]:
    """The class each record names: ``target`` checked against the model's ``classes`` outputs."""
    single = classes == 1
    if target is None:
        return [1] * batch_size if single else predicted.tolist()
    if isinstance(target, bool):
        raise TypeError("target must be an int, a sequence of ints or a tensor, not a bool")
    if isinstance(target, int):
        values = [target] * batch_size
    else:
        index = torch.as_tensor(target).reshape(-1)
        if index.is_floating_point() or index.dtype == torch.bool:
            raise TypeError(f"target must hold integer class indices, got dtype {index.dtype}")
        if index.numel() == 1:
            values = [int(index)] * batch_size
        elif index.numel() != batch_size:
            raise ValueError(f"target must be one class or one per sample ({batch_size}), got {index.numel()} values")
        else:
            values = [int(t) for t in index]
    allowed = (0, 1) if single else range(classes)
    bad = sorted({v for v in values if v not in allowed})
    if bad and single:
        raise ValueError(
            f"target {bad[0]} is not a class of a model with a single logit (binary); its attributions explain that "
            "logit, the positive class's score: pass target=None, 0 or 1"
        )
    if bad:
        raise ValueError(
            f"target {bad[0] if len(bad) == 1 else bad} is out of range: the model has {classes} classes (0..{classes - 1}); "
            "pass the target the attributions were computed for"
        )
    return [1] * batch_size if single else values


def _captum_target_on_stack(adapter: Any, depth: int = 16) -> Optional[tuple[Any]]:
    """``(target,)`` of the Captum ``_run_forward`` that is calling ``adapter`` right now, else ``None``.

    Captum calls the forward function and then indexes its output with the target; the adapter reads the
    target first (a few frames up: ``_run_forward`` -> ``Module.__call__`` -> ``forward``) so that a class
    the model does not have is refused with the fix instead of an ``IndexError`` (or a device-side assert).
    ``depth`` leaves room for wrappers between them (decorators, instrumentation such as mutation testing's).
    """
    global _RUN_FORWARD_CODE
    if _RUN_FORWARD_CODE is None:
        from captum._utils.common import _run_forward

        _RUN_FORWARD_CODE = inspect.unwrap(_run_forward).__code__
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return None
        if frame.f_code is _RUN_FORWARD_CODE:
            local = frame.f_locals
            return (local.get("target"),) if local.get("forward_func") is adapter else None
        frame = frame.f_back
    return None


_RUN_FORWARD_CODE: Any = None


def check_devices(tensors: Sequence[tuple[str, Any]], device: torch.device) -> None:
    """Refuse tensors that are not on the model's ``device`` (named in the message, with the fix).

    Example:
        >>> check_devices([("input 'x'", torch.zeros(1))], torch.device("cpu"))
        >>> check_devices([("input 'x'", torch.zeros(1, device="meta"))], torch.device("cpu"))
        Traceback (most recent call last):
        ...
        ValueError: input 'x' is on meta but the model is on cpu; make the inputs with adapter.captum_inputs(batch), which puts them on the model's device, or move them with .to('cpu')
    """
    wrong = [(name, t.device) for name, t in tensors if isinstance(t, Tensor) and not _same_device(t.device, device)]
    if not wrong:
        return
    places = sorted({str(d) for _, d in wrong})
    names = ", ".join(name for name, _ in wrong)
    raise ValueError(
        f"{names} {'is' if len(wrong) == 1 else 'are'} on {' and '.join(places)} but the model is on {device}; make the "
        f"inputs with adapter.captum_inputs(batch), which puts them on the model's device, or move them with "
        f".to({str(device)!r})"
    )


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` name the same device when one of them gives no index."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def spread_over_patches(relevance: Tensor, image_shape: Sequence[int], patch_size: int | tuple[int, int]) -> Tensor:
    """Patch relevance ``[B, N]`` (row-major over the patch grid) as pixels ``[B, C, H, W]``.

    Each patch's relevance is spread evenly over its pixels and channels, so summing a patch's pixels gives
    the patch's relevance back (:func:`sum_over_patches`). Pixels outside the grid (a border the patch
    embedding's stride does not cover) get zero.

    Example:
        >>> pixels = spread_over_patches(torch.tensor([[4.0, 8.0]]), (1, 2, 2, 4), 2)
        >>> pixels[0, 0]
        tensor([[0.5000, 0.5000, 1.0000, 1.0000],
                [0.5000, 0.5000, 1.0000, 1.0000]])
        >>> sum_over_patches(pixels, 2)
        tensor([[4., 8.]])
    """
    batch, channels, height, width = (int(d) for d in image_shape)
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    rows, cols = height // ph, width // pw
    if relevance.shape != (batch, rows * cols):
        raise ValueError(
            f"patch relevance has shape {tuple(relevance.shape)}; an image {tuple(image_shape)} with patches of "
            f"{ph}x{pw} has {rows}x{cols} = {rows * cols} patches per sample"
        )
    grid = relevance.reshape(batch, 1, rows, cols) / float(channels * ph * pw)
    pixels = grid.repeat_interleave(ph, dim=2).repeat_interleave(pw, dim=3).expand(batch, channels, rows * ph, cols * pw)
    return torch.nn.functional.pad(pixels, (0, width - cols * pw, 0, height - rows * ph)).contiguous()


def sum_over_patches(pixels: Tensor, patch_size: int | tuple[int, int]) -> Tensor:
    """Pixel attributions ``[B, C, H, W]`` summed per patch and channel: ``[B, N]`` row-major over the grid."""
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    batch, _, height, width = pixels.shape
    rows, cols = height // ph, width // pw
    cropped = pixels[:, :, : rows * ph, : cols * pw]
    return cropped.reshape(batch, -1, rows, ph, cols, pw).sum(dim=(1, 3, 5)).reshape(batch, rows * cols)


def uncompiled(model: Any) -> Any:
    """The module a ``torch.compile``'d model wraps (``OptimizedModule._orig_mod``, same parameters), else the model.

    Attention capture needs eager execution, so adapters run the original module.

    Example:
        >>> from torch import nn
        >>> net = nn.Linear(2, 2)
        >>> uncompiled(torch.compile(net)) is net, uncompiled(net) is net
        (True, True)
    """
    original = getattr(model, "_orig_mod", None)
    return original if isinstance(original, nn.Module) and type(model).__name__ == "OptimizedModule" else model
