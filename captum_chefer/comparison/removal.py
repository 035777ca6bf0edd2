"""Removing tokens through the model: the one remover every removal metric uses.

Removing a code makes it padding: its id becomes the feature's pad id and its mask ``False``, and, with
``compact=True`` (the default), the remaining codes move to the front, as the batch would look had the
patient never had the code (PyHealth's ``Transformer`` pools its *first* position; without compaction,
removing the first code makes the model pool a padding slot, which changes the output for a reason
unrelated to the code). The model-specific part is the adapter's ``remove_tokens``; this module drives it:

* :class:`TokenRemover`: a batch bound to its target, called with ``keep`` masks, returns the explained
  output (the deletion / insertion curves, comprehensiveness and sufficiency call it).
* :class:`TokenRemoval`: the same removal as Captum's ``infidelity`` needs it, a ``perturb_func`` that
  draws random removals and a ``forward_func`` that removes the codes whose ids were set to padding.

The explained output is the *probability* of the target (``sigmoid`` of the single logit of a binary
model, ``softmax[target]`` otherwise), or the logit with ``output="logit"``.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Optional, Protocol

import torch
from torch import Tensor

__all__ = ["Output", "Remover", "TokenRemoval", "TokenRemover", "explained_output", "token_removal_perturbation"]

Output = Literal["probability", "logit"]


class Remover(Protocol):
    """What the removal metrics need: which codes are real, and the explained output once some are removed.

    ``real``: ``{feature key: bool tensor}`` shaped like the code ids. Calling it with ``keep`` (a
    dict of the same shapes, ``True`` on codes to keep) returns the explained output per sample ``[B]``.
    """

    real: dict[str, Tensor]

    def __call__(self, keep: Mapping[str, Tensor]) -> Tensor: ...


def explained_output(logits: Tensor, target: Optional[Tensor | int], output: Output, *, multilabel: bool = False) -> Tensor:
    """``[B]`` the explained output of each sample: the target's probability (or logit).

    Example:
        >>> explained_output(torch.tensor([[0.0], [2.0]]), None, "probability").tolist()
        [0.5, 0.8807970285415649]
        >>> explained_output(torch.tensor([[1.0, 1.0]]), torch.tensor([1]), "probability").tolist()
        [0.5]
    """
    if logits.shape[1] == 1:
        if target is not None and bool((torch.as_tensor(target) != 0).any()):
            raise ValueError("a single-logit (binary) model explains its one output: target must be None or 0")
        value = logits[:, 0]
        return torch.sigmoid(value) if output == "probability" else value
    if target is None:
        raise ValueError(f"target is required for a model with {logits.shape[1]} outputs")
    index = torch.as_tensor(target, device=logits.device).long().reshape(-1)
    if index.numel() == 1:
        index = index.expand(logits.shape[0])
    if output == "probability":
        values = torch.sigmoid(logits) if multilabel else logits.softmax(dim=1)
    else:
        values = logits
    return values.gather(1, index.view(-1, 1))[:, 0]


class TokenRemover:
    """Remove codes from a batch through an adapter and read the explained output.

    Args:
        adapter: the adapter of the model.
        batch: a batch of the adapter's library (a PyHealth batch dict).
        target: the explained class, as for Captum (``None`` for a binary model; a ``[B]`` tensor
            or an int otherwise), e.g. ``adapter.captum_target(batch)``.
        output: ``"probability"`` (default) or ``"logit"``.
        compact: move the kept codes (flat streams) or the non-empty visits (nested streams) to the
            front, so the model pools a real code whenever one is left (see the module docstring).

    Example:
        >>> from captum_chefer import PyHealthAdapter
        >>> from captum_chefer.synthetic import toy_model_and_batch
        >>> model, batch = toy_model_and_batch()
        >>> remover = TokenRemover(PyHealthAdapter(model), batch)
        >>> keep_all = {key: mask.clone() for key, mask in remover.real.items()}
        >>> torch.allclose(remover(keep_all), remover.full)
        True
    """

    def __init__(
        self,
        adapter: Any,
        batch: Any,
        target: Optional[Tensor | int] = None,
        *,
        output: Output = "probability",
        compact: bool = True,
    ) -> None:
        if output not in ("probability", "logit"):
            raise ValueError(f"output must be 'probability' or 'logit', got {output!r}")
        self.adapter = adapter
        self.target = target
        self.output: Output = output
        self.compact = compact
        self._tokens, self._args = adapter.captum_inputs(batch, level="token")
        self.real: dict[str, Tensor] = dict(zip(adapter.feature_keys, adapter.token_masks(self._args, self._tokens)))
        with torch.no_grad():
            self.full = self(self.real)
            self.empty = self({k: torch.zeros_like(v) for k, v in self.real.items()})

    def __call__(self, keep: Mapping[str, Tensor]) -> Tensor:
        for key, real in self.real.items():
            if key not in keep:
                raise KeyError(f"keep has no mask for feature {key!r}")
            if tuple(keep[key].shape) != tuple(real.shape):
                raise ValueError(f"keep[{key!r}] has shape {tuple(keep[key].shape)}, the codes {tuple(real.shape)}")
        tokens, args = self.adapter.remove_tokens(self._tokens, self._args, keep, compact=self.compact)
        with torch.no_grad():
            logits = self.adapter(*tokens, *args)
        return explained_output(logits, self.target, self.output, multilabel=_multilabel(self.adapter)).detach().cpu()


class TokenRemoval:
    """Token removal for ``captum.metrics.infidelity``: removed codes become padding.

    ``infidelity`` perturbs only ``inputs``; the masks travel in ``additional_forward_args``, so the
    plain adapter would still treat a removed code as a real code with the padding embedding.
    :attr:`forward_func` therefore removes every code whose id is the pad id, as :class:`TokenRemover`
    removes codes (with ``compact``, the rest move to the front). Use both together, at token level.

    Calling the object is the ``perturb_func``: each real code is removed independently with
    probability ``fraction`` (at least one real code of each sample and stream is kept); it returns
    ``(perturbations, perturbed_inputs)`` with ``perturbations`` ``1.0`` on removed codes, so
    infidelity compares the attribution mass of the removed codes with the drop of the output.

    Args:
        adapter: the adapter.
        fraction: probability that a real code is removed, in ``(0, 1)``.
        generator: a ``torch.Generator`` for reproducible draws.
        compact: see :class:`TokenRemover`.

    Example:
        >>> from captum.metrics import infidelity
        >>> from captum_chefer import CheferAttribution, PyHealthAdapter
        >>> from captum_chefer.synthetic import toy_model_and_batch
        >>> model, batch = toy_model_and_batch()
        >>> adapter = PyHealthAdapter(model)
        >>> tokens, args = adapter.captum_inputs(batch, level="token")
        >>> chefer = CheferAttribution(adapter).attribute(tokens, additional_forward_args=args)
        >>> removal = TokenRemoval(adapter, 0.3, torch.Generator().manual_seed(0))
        >>> scores = infidelity(removal.forward_func, removal, tokens, chefer,
        ...                     additional_forward_args=args, n_perturb_samples=4, normalize=True)
        >>> tuple(scores.shape), bool(torch.isfinite(scores).all())
        ((4,), True)
    """

    def __init__(
        self, adapter: Any, fraction: float = 0.3, generator: Optional[torch.Generator] = None, *, compact: bool = True
    ) -> None:
        if not callable(getattr(adapter, "remove_tokens", None)):
            raise TypeError(f"TokenRemoval needs an adapter from captum_chefer.adapters, got {type(adapter).__name__}")
        if not 0.0 < float(fraction) < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
        self.adapter = adapter
        self.fraction = float(fraction)
        self.generator = generator
        self.compact = compact

    def forward_func(self, *inputs_and_args: Tensor) -> Tensor:
        """The adapter's logits after removing every code whose id is the pad id (token level only)."""
        tokens, args = self.adapter.split_inputs(inputs_and_args)
        self._check_tokens(tokens)
        keep = {key: ids != pad for key, ids, pad in zip(self.adapter.feature_keys, tokens, self.adapter.pad_ids)}
        kept, kept_args = self.adapter.remove_tokens(tokens, args, keep, compact=self.compact)
        return self.adapter(*kept, *kept_args)

    def __call__(self, inputs: Tensor | tuple[Tensor, ...]) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        inputs_tuple = inputs if isinstance(inputs, tuple) else (inputs,)
        self._check_tokens(inputs_tuple)
        perturbations, perturbed = [], []
        for ids, pad in zip(inputs_tuple, self.adapter.pad_ids):
            real = ids != pad
            draw = torch.rand(ids.shape, generator=self.generator, device="cpu").to(ids.device)
            remove = real & (draw < self.fraction)
            flat_real, flat_remove = real.reshape(real.shape[0], -1), remove.reshape(real.shape[0], -1)
            emptied = flat_real.any(dim=1) & ~(flat_real & ~flat_remove).any(dim=1)
            if emptied.any():  # keep the first real code of a sample that would lose all of them
                first = flat_real.float().argmax(dim=1)
                flat_remove[emptied, first[emptied]] = False
            remove = flat_remove.reshape(ids.shape)
            perturbations.append(remove.float())
            perturbed.append(torch.where(remove, torch.full_like(ids, pad), ids))
        return tuple(perturbations), tuple(perturbed)

    def _check_tokens(self, tokens: tuple[Tensor, ...]) -> None:
        for key, ids in zip(self.adapter.feature_keys, tokens):
            if ids.is_floating_point():
                raise TypeError(
                    f"TokenRemoval works on token ids; input for {key!r} is {ids.dtype}. "
                    "Use adapter.captum_inputs(batch, level='token')."
                )


def token_removal_perturbation(
    adapter: Any, fraction: float = 0.3, generator: Optional[torch.Generator] = None, *, compact: bool = True
) -> TokenRemoval:
    """A :class:`TokenRemoval`: pass ``removal.forward_func`` as infidelity's ``forward_func`` and ``removal``
    as its ``perturb_func``; inputs, attributions and ``additional_forward_args`` at token level."""
    return TokenRemoval(adapter, fraction, generator, compact=compact)


def _multilabel(adapter: Any) -> bool:
    return getattr(getattr(adapter, "model", None), "mode", None) == "multilabel"
