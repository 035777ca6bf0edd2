"""Attention capture scoped to one call and one thread, and the scoped model state it needs.

:class:`AttentionCapture` is a context manager. Inside it, the thread that opened it records the attention
probabilities of chosen attention modules, as the tensors the forward pass multiplies with the values, so
that their gradients flow (Chefer relevance needs ``dA`` for every layer). Three kinds of attention module
are supported (:func:`attention_kind`):

* ``"pyhealth"``: PyHealth's ``Attention`` (``pyhealth.models.transformer.Attention``), which returns
  ``(values, probabilities)``; the probabilities are recorded as returned.
* ``"multihead"``: ``torch.nn.MultiheadAttention``. Its returned weights are computed after the product
  with the values (a view or a head mean), so they are off the gradient path, and callers such as
  torchvision's ViT and ``nn.TransformerEncoderLayer`` ask for none (``need_weights=False``). For the
  capturing thread the module is evaluated by :func:`multihead_attention`, the same computation written
  out with per-head probabilities on the path; the caller still gets what it asked for.
* ``"huggingface"``: a ``transformers`` attention module that dispatches through the library's
  ``AttentionInterface`` by ``config._attn_implementation`` (SDPA by default, which returns no
  probabilities). While a capture is open the module's config names a dispatcher registered by this
  module: the capturing thread runs the model file's own ``eager_attention_forward`` with an eager mask,
  every other thread runs the original implementation (``"sdpa"``, ``"flash_attention_2"``, ...) with its
  own mask, unchanged. With ``AttentionCapture(deferred=True)`` the capturing thread runs SDPA instead and
  records a :class:`DeferredHuggingFaceAttention`: the probabilities stay out of the graph (as in the
  model's own SDPA forward) and are formed, with their gradient ``dA = dO V^T``, only when the backward
  pass reaches the layer, one layer at a time (the ``[B, H, L, L]`` maps of all layers would otherwise be
  kept alive for the backward pass: 600 MB for BERT-base at 512 tokens and batch 4).

Concurrency. Everything shared is changed only while some capture needs it and changed back by the last
one out: each change (an instance ``forward`` that dispatches, a config's attention implementation,
evaluation mode) is reference-counted under one lock. A patched ``forward`` looks up the calling thread's
open captures and, for any other thread, calls the original. Parameters are never frozen: inside a
capture, :class:`torch.overrides.TorchFunctionMode` (thread-local by construction) hands every torch
operation of the capturing thread ``parameter.detach()`` instead of the parameter, so the graph holds
nothing for parameter gradients, while a concurrent call in another thread (a training step, Saliency, IG)
sees its parameters exactly as they were. The model's ``forward``, hooks, ``requires_grad`` flags, training
flags and attention implementation are as found whenever no capture is open, also after an exception.

Example:
    >>> import torch
    >>> from torch import nn
    >>> layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, batch_first=True, dropout=0.0)
    >>> x = torch.randn(2, 5, 8)
    >>> with AttentionCapture({"text": [layer.self_attn]}) as capture:
    ...     y = layer(x)
    >>> [tuple(a.shape) for a in capture.attention["text"]]
    [(2, 2, 5, 5)]
    >>> torch.allclose(y, layer(x), atol=1e-6), "forward" in vars(layer.self_attn)
    (True, False)
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
import threading
import types
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Hashable, Iterator, Literal, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "AttentionCapture",
    "AttentionKind",
    "DeferredHuggingFaceAttention",
    "attention_kind",
    "evaluation_mode",
    "find_attention_modules",
    "multihead_attention",
    "patched_forward",
]

AttentionKind = Literal["pyhealth", "multihead", "huggingface"]
Handler = Callable[..., Any]  # handler(original_forward, *args, **kwargs) -> what forward returns

HUGGINGFACE_DISPATCHER = "captum_chefer"  # the name registered in transformers' attention interfaces

# ---------------------------------------------------------------------------------------------- shared state

_lock = threading.RLock()
_held: dict[Hashable, list] = {}  # key -> [holders, undo]
_local = threading.local()
_huggingface_original: dict[int, Optional[str]] = {}  # id(config) -> its implementation before the capture


def _open_captures() -> list["AttentionCapture"]:
    captures = getattr(_local, "captures", None)
    if captures is None:
        captures = _local.captures = []
    return captures


@contextmanager
def _holding(key: Hashable, apply: Callable[[], Callable[[], None]]) -> Iterator[None]:
    """Apply a change to shared state for the first holder of ``key``; undo it when the last one leaves.

    ``apply`` makes the change and returns the function that undoes it.
    """
    with _lock:
        entry = _held.get(key)
        if entry is None:
            entry = [0, apply()]
            _held[key] = entry
        entry[0] += 1
    try:
        yield
    finally:
        with _lock:
            entry[0] -= 1
            if entry[0] == 0:
                del _held[key]
                entry[1]()


@contextmanager
def evaluation_mode(model: nn.Module, modules: Optional[Sequence[nn.Module]] = None) -> Iterator[None]:
    """Dropout off for the duration, shared by concurrent callers; training flags restored by the last one.

    Args:
        model: the model.
        modules: ``tuple(model.modules())`` if the caller keeps it (walking a large model costs
            milliseconds, and attribution methods call the model many times).

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train()
        >>> with evaluation_mode(net):
        ...     net[1].training
        False
        >>> net[1].training
        True
    """

    def apply() -> Callable[[], None]:
        training = [m for m in (modules if modules is not None else model.modules()) if m.training]
        for module in training:
            module.training = False

        def undo() -> None:
            for module in training:
                module.training = True

        return undo

    with _holding((id(model), "evaluation"), apply):
        yield


@contextmanager
def patched_forward(module: nn.Module) -> Iterator[None]:
    """Give ``module`` an instance ``forward`` that runs the calling thread's capture handler, if any.

    Threads without an open capture that handles ``module`` call the original ``forward`` (the
    instance attribute the module had, or its class's method). Removed by the last holder.
    """

    def apply() -> Callable[[], None]:
        own = vars(module).get("forward")
        original = own if own is not None else types.MethodType(type(module).forward, module)

        def forward(*args: Any, **kwargs: Any) -> Any:
            for capture in reversed(_open_captures()):
                handler = capture._handlers.get(module)
                if handler is not None:
                    return handler(original, *args, **kwargs)
            return original(*args, **kwargs)

        module.forward = forward

        def undo() -> None:
            if own is not None:
                module.forward = own
            else:
                del module.forward

        return undo

    with _holding((id(module), "forward"), apply):
        yield


class _DetachedParameters(TorchFunctionMode):
    """Within this thread, every torch operation gets ``p.detach()`` for each ``nn.Parameter`` argument."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        args = tuple(_detached(a) for a in args)
        if kwargs:
            kwargs = {k: _detached(v) for k, v in kwargs.items()}
        return func(*args, **(kwargs or {}))


def _detached(value: Any) -> Any:
    if isinstance(value, nn.Parameter):
        return value.detach()
    if type(value) in (list, tuple) and any(isinstance(v, nn.Parameter) for v in value):
        return type(value)(v.detach() if isinstance(v, nn.Parameter) else v for v in value)
    return value


# ---------------------------------------------------------------------------------------------- kinds


def attention_kind(module: nn.Module) -> Optional[AttentionKind]:
    """The kind of attention module ``module`` is, or ``None`` if it is not one this layer can capture.

    Example:
        >>> from torch import nn
        >>> attention_kind(nn.MultiheadAttention(4, 2)), attention_kind(nn.Linear(2, 2))
        ('multihead', None)
    """
    if isinstance(module, nn.MultiheadAttention):
        return "multihead"
    cls = type(module)
    if cls.__module__ == "pyhealth.models.transformer" and cls.__name__ == "Attention":
        return "pyhealth"
    if cls.__module__.startswith("transformers.") and _dispatches_attention(cls) and hasattr(module, "config"):
        return "huggingface"
    return None


_dispatch_cache: dict[type, bool] = {}


def _dispatches_attention(cls: type) -> bool:
    """Whether a transformers module class computes attention through ``ALL_ATTENTION_FUNCTIONS``."""
    if cls not in _dispatch_cache:
        try:
            source = inspect.getsource(cls.forward)  # type: ignore[attr-defined]
        except (OSError, TypeError):
            source = ""
        _dispatch_cache[cls] = "ALL_ATTENTION_FUNCTIONS" in source
    return _dispatch_cache[cls]


def find_attention_modules(root: nn.Module) -> list[nn.Module]:
    """The attention modules under ``root`` that can be captured, in registration order.

    Example:
        >>> from torch import nn
        >>> encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, batch_first=True), num_layers=3)
        >>> len(find_attention_modules(encoder))
        3
    """
    return [m for m in root.modules() if attention_kind(m) is not None]


# ---------------------------------------------------------------------------------------------- capture


class AttentionCapture:
    """Record the attention probabilities of chosen modules, in this thread, for a ``with`` block.

    Args:
        streams: ``{stream: attention modules}``. Every call of a listed module in this thread is
            recorded, in call order, under its stream: ``attention[stream]`` lists ``[B, H, Q, K]``
            tensors on the autograd path (a module called twice, as with shared layers, gives two
            entries). A module may be listed under one stream only.
        overrides: ``{module: handler}``: within the block, this thread's calls of ``module`` run
            ``handler(original_forward, *args, **kwargs)`` instead (e.g. a last block evaluated for the
            pooled position only). Other threads run the original.
        model: if given, the model runs in evaluation mode for the block (see :func:`evaluation_mode`).
        model_modules: ``tuple(model.modules())``, if the caller keeps it.
        detach_parameters: hand this thread's torch operations detached parameters within the block, so
            the graph holds nothing for parameter gradients (the attention gradients need none). Set
            ``False`` to keep parameters in the graph.
        deferred: record ``transformers`` attention as :class:`DeferredHuggingFaceAttention` (SDPA in the
            forward pass, probabilities formed in the backward pass) where the module's attention is plain
            softmax attention (no soft-capping, sinks or position bias); elsewhere the probabilities are
            recorded as tensors. ``CheferAttribution`` takes either.

    Attributes:
        attention: ``{stream: [tensor, ...]}``, filled during the block.
        calls: ``[(stream, module, tensor), ...]`` in call order, for callers that need to tell modules
            apart (e.g. self- and cross-attention of a decoder).
    """

    def __init__(
        self,
        streams: Mapping[str, Sequence[nn.Module]],
        *,
        overrides: Optional[Mapping[nn.Module, Handler]] = None,
        model: Optional[nn.Module] = None,
        model_modules: Optional[Sequence[nn.Module]] = None,
        detach_parameters: bool = True,
        deferred: bool = False,
    ) -> None:
        self.deferred = deferred
        self._stream_of: dict[nn.Module, str] = {}
        self._kinds: dict[nn.Module, AttentionKind] = {}
        for stream, modules in streams.items():
            for module in modules:
                kind = attention_kind(module)
                if kind is None:
                    raise TypeError(
                        f"{type(module).__name__} (stream {stream!r}) is not an attention module this package can capture; "
                        "supported: PyHealth's Attention, torch.nn.MultiheadAttention and transformers attention "
                        "modules that dispatch through AttentionInterface"
                    )
                if module in self._stream_of and self._stream_of[module] != stream:
                    raise ValueError(f"{type(module).__name__} is listed under streams {self._stream_of[module]!r} and {stream!r}")
                self._stream_of[module] = stream
                self._kinds[module] = kind
        self._overrides = dict(overrides or {})
        self._model = model
        self._model_modules = model_modules
        self._detach = detach_parameters
        self._handlers: dict[nn.Module, Handler] = {}
        self._huggingface_configs: set[int] = set()
        self._stack: Optional[ExitStack] = None
        self.attention: dict[str, list[Any]] = {stream: [] for stream in streams}
        self.calls: list[tuple[str, nn.Module, Any]] = []

    def __enter__(self) -> "AttentionCapture":
        if self._stack is not None:
            raise RuntimeError("this AttentionCapture is already open; make a new one for each call")
        stack = ExitStack()
        try:
            if self._model is not None:
                stack.enter_context(evaluation_mode(self._model, self._model_modules))
            for module, kind in self._kinds.items():
                if kind == "huggingface":
                    stack.enter_context(_huggingface_dispatch(module.config))
                    self._huggingface_configs.add(id(module.config))
                    continue
                record = _record_output if kind == "pyhealth" else _record_multihead
                self._handlers[module] = functools.partial(record, self, module)
                stack.enter_context(patched_forward(module))
            for module, handler in self._overrides.items():
                if module in self._handlers:
                    raise ValueError(f"{type(module).__name__} is both captured and overridden")
                self._handlers[module] = handler
                stack.enter_context(patched_forward(module))
            captures = _open_captures()
            captures.append(self)
            stack.callback(captures.remove, self)
            if self._detach:
                stack.enter_context(_DetachedParameters())
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc: Any) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def record(self, module: nn.Module, probabilities: Any) -> None:
        """Record one call's attention probabilities ``[B, H, Q, K]`` of ``module`` (a tensor in the graph, or
        a :class:`DeferredHuggingFaceAttention`)."""
        stream = self._stream_of[module]
        self.attention[stream].append(probabilities)
        self.calls.append((stream, module, probabilities))

    def records(self, module: nn.Module) -> bool:
        """Whether this capture records ``module``."""
        return module in self._stream_of


def _capturing(module: nn.Module) -> Optional[AttentionCapture]:
    for capture in reversed(_open_captures()):
        if capture.records(module):
            return capture
    return None


def _record_output(capture: AttentionCapture, module: nn.Module, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """PyHealth's ``Attention`` returns ``(values, probabilities)``; record the probabilities."""
    output = original(*args, **kwargs)
    capture.record(module, output[1])
    return output


def _record_multihead(capture: AttentionCapture, module: nn.Module, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Evaluate ``nn.MultiheadAttention`` written out; record the per-head probabilities."""
    output, weights, probabilities = multihead_attention(module, *args, **kwargs)
    capture.record(module, probabilities)
    return output, weights


# ---------------------------------------------------------------------------------------------- MultiheadAttention


def multihead_attention(
    module: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Optional[Tensor] = None,
    need_weights: bool = True,
    attn_mask: Optional[Tensor] = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """``nn.MultiheadAttention.forward`` written out, with the per-head probabilities on the gradient path.

    Same arguments and first two results as the module's ``forward`` (in evaluation mode: no dropout);
    the third result is the probabilities ``[B, H, Q, K]`` that multiply the values.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
        >>> x = torch.randn(2, 4, 8)
        >>> out, weights, probs = multihead_attention(mha, x, x, x)
        >>> expected, expected_weights = mha(x, x, x)
        >>> torch.allclose(out, expected, atol=1e-6), torch.allclose(weights, expected_weights, atol=1e-6)
        (True, True)
        >>> tuple(probs.shape)
        (2, 2, 4, 4)
    """
    if module.bias_k is not None or module.add_zero_attn:
        raise NotImplementedError(
            "MultiheadAttention with add_bias_kv or add_zero_attn is not supported by attention capture"
        )
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif module.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    # [L, B, E] from here on, as torch's own implementation
    target, batch, embed = query.shape
    source = key.shape[0]
    heads, head_dim = module.num_heads, module.head_dim
    if module._qkv_same_embed_dim:
        w_q, w_k, w_v = module.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
    b_q = b_k = b_v = None
    if module.in_proj_bias is not None:
        b_q, b_k, b_v = module.in_proj_bias.chunk(3)
    q = torch.nn.functional.linear(query, w_q, b_q)
    k = torch.nn.functional.linear(key, w_k, b_k)
    v = torch.nn.functional.linear(value, w_v, b_v)
    # [B, H, L, d]
    q = q.reshape(target, batch, heads, head_dim).permute(1, 2, 0, 3)
    k = k.reshape(source, batch, heads, head_dim).permute(1, 2, 0, 3)
    v = v.reshape(source, batch, heads, head_dim).permute(1, 2, 0, 3)
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(head_dim)
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(target, source, dtype=torch.bool, device=scores.device).triu(1)
    scores = scores + _additive(attn_mask, scores, batch, heads)
    if key_padding_mask is not None:
        scores = scores + _additive(key_padding_mask, scores, batch, heads, padding=True)
    probabilities = torch.softmax(scores, dim=-1)
    attended = torch.matmul(probabilities, v)  # [B, H, L, d]
    attended = attended.permute(2, 0, 1, 3).reshape(target, batch, embed)
    output = module.out_proj(attended)
    if module.batch_first and batched:
        output = output.transpose(0, 1)
    if not batched:
        output = output.squeeze(1)
    weights = None
    if need_weights:
        weights = probabilities.mean(dim=1) if average_attn_weights else probabilities
        if not batched:
            weights = weights.squeeze(0)
    return output, weights, probabilities


def _additive(mask: Optional[Tensor], scores: Tensor, batch: int, heads: int, padding: bool = False) -> Tensor | float:
    """A boolean (``True``: masked) or float (added) mask as a float tensor broadcastable to ``[B, H, Q, K]``."""
    if mask is None:
        return 0.0
    if mask.dtype == torch.bool:
        mask = torch.zeros_like(mask, dtype=scores.dtype).masked_fill(mask, float("-inf"))
    else:
        mask = mask.to(scores.dtype)
    if padding:  # [B, K]
        return mask.view(batch, 1, 1, mask.shape[-1])
    if mask.dim() == 3:  # [B * H, Q, K]
        return mask.view(batch, heads, *mask.shape[-2:])
    return mask  # [Q, K]


# ---------------------------------------------------------------------------------------------- HuggingFace


@contextmanager
def _huggingface_dispatch(config: Any) -> Iterator[None]:
    """Point ``config`` at the dispatcher while some capture needs it; restore its implementation after."""
    _register_huggingface()

    def apply() -> Callable[[], None]:
        original = config._attn_implementation_internal
        _huggingface_original[id(config)] = original
        config._attn_implementation_internal = HUGGINGFACE_DISPATCHER

        def undo() -> None:
            config._attn_implementation_internal = original
            _huggingface_original.pop(id(config), None)

        return undo

    with _holding((id(config), "attention implementation"), apply):
        yield


_registered = False


def _register_huggingface() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    with _lock:
        AttentionInterface.register(HUGGINGFACE_DISPATCHER, _huggingface_attention)
        AttentionMaskInterface.register(HUGGINGFACE_DISPATCHER, _huggingface_mask)
        _registered = True


def _eager_attention(module: nn.Module) -> Callable[..., Any]:
    """The model file's own ``eager_attention_forward`` (some models scale, soft-cap or add sinks)."""
    function = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if function is None:
        raise TypeError(
            f"{type(module).__name__} has no eager_attention_forward in {type(module).__module__}; its attention "
            "probabilities cannot be captured"
        )
    return function


def _huggingface_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any, **kwargs: Any) -> Any:
    capture = _capturing(module)
    if capture is not None and capture.deferred and _plain_softmax_attention(module, attention_mask, kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        output, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)
        capture.record(module, DeferredHuggingFaceAttention(module, query, key, value, attention_mask, kwargs, output))
        return output, None
    if capture is not None:
        output, probabilities = _eager_attention(module)(module, query, key, value, attention_mask, **kwargs)
        capture.record(module, probabilities)
        return output, probabilities
    original = _huggingface_original.get(id(module.config)) or "eager"
    if original == "eager":
        return _eager_attention(module)(module, query, key, value, attention_mask, **kwargs)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[original](module, query, key, value, attention_mask, **kwargs)


def _huggingface_mask(*args: Any, config: Any = None, **kwargs: Any) -> Any:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    capturing = any(id(config) in capture._huggingface_configs for capture in _open_captures())
    name = "eager" if capturing else (_huggingface_original.get(id(config)) or "eager")
    return ALL_MASK_ATTENTION_FUNCTIONS[name](*args, config=config, **kwargs)


def _plain_softmax_attention(module: nn.Module, attention_mask: Any, kwargs: Mapping[str, Any]) -> bool:
    """Whether ``softmax(q k^T * scaling + mask) v`` is all the module computes (so SDPA computes it too)."""
    if module.training or float(kwargs.get("dropout") or 0.0) != 0.0:
        return False
    if any(kwargs.get(name) is not None for name in ("softcap", "sinks", "s_aux", "position_bias", "head_mask")):
        return False
    if attention_mask is None:  # SDPA would apply the module's causal flag, the eager recomputation would not
        return not getattr(module, "is_causal", False)
    return isinstance(attention_mask, Tensor) and attention_mask.is_floating_point()


class DeferredHuggingFaceAttention:
    """One call of a ``transformers`` attention module, run with SDPA, whose probabilities are formed later.

    ``graph_tensor`` is the call's output ``O = A V`` (``[B, Q, H, d]``, as the attention functions return
    it), in the autograd graph; :meth:`probabilities` forms ``A`` ``[B, H, Q, K]`` with the model file's own
    ``eager_attention_forward`` (against zero-width values, so no product with the values is computed);
    :meth:`gradient` turns the gradient of ``O`` into the gradient of ``A``: ``dA = dO V^T`` (values
    repeated for grouped-query attention), exact because ``A`` enters the output only through ``A V``.
    The attributes ``shape`` and ``dtype`` are those of ``A``. It holds the call's queries, keys and values
    (which SDPA keeps for its own backward pass anyway) and its output.

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> _ = torch.manual_seed(0)
        >>> model = BertModel(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        ...                              intermediate_size=16)).eval()
        >>> ids = torch.tensor([[2, 5, 7, 3]])
        >>> modules = {"text": find_attention_modules(model)}
        >>> with AttentionCapture(modules, model=model, deferred=True, detach_parameters=False) as capture:
        ...     output = model(input_ids=ids).last_hidden_state
        >>> (layer,) = capture.attention["text"]
        >>> type(layer).__name__, tuple(layer.shape)
        ('DeferredHuggingFaceAttention', (1, 2, 4, 4))
        >>> (d_output,) = torch.autograd.grad(output[0, 0].sum(), layer.graph_tensor)
        >>> tuple(layer.gradient(d_output).shape), torch.allclose(layer.probabilities().sum(-1), torch.ones(1, 2, 4))
        ((1, 2, 4, 4), True)
    """

    def __init__(self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor],
                 kwargs: Mapping[str, Any], output: Tensor) -> None:
        self._module = module
        self._query, self._key, self._value, self._mask = query, key, value, mask
        self._kwargs = dict(kwargs)
        self.graph_tensor = output
        self.shape = torch.Size((query.shape[0], query.shape[1], query.shape[2], key.shape[2]))
        self.dtype = query.dtype

    def probabilities(self, heads: Optional[slice] = None, rows: Optional[Tensor] = None) -> Tensor:
        """``A`` ``[B, H, Q, K]``, outside the graph; of the ``heads`` only, and of one query row per sample
        (``rows``, ``[B]``: then ``[B, H, 1, K]``) if given."""
        query, key, mask = self._query.detach(), self._key.detach(), self._mask
        batch, heads_total = self.shape[0], self.shape[1]
        groups = heads_total // key.shape[1]
        if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
            key = key.repeat_interleave(groups, dim=1)
        if heads is not None:
            query, key = query[:, heads], key[:, heads]
            if mask is not None and mask.shape[1] == heads_total:
                mask = mask[:, heads]
        if rows is not None:
            samples = torch.arange(batch, device=query.device)
            rows = rows.to(query.device)
            query = query[samples, :, rows].unsqueeze(2)
            if mask is not None and mask.shape[2] > 1:
                mask = mask.expand(batch, *mask.shape[1:])[samples, :, rows].unsqueeze(2)
        with torch.no_grad():
            empty = self._value[:, :1, :, :0].detach().expand(query.shape[0], key.shape[1], key.shape[2], 0)
            _, probabilities = _eager_attention(self._module)(
                _Ungrouped(self._module), query, key, empty, mask, **self._kwargs
            )
        return probabilities

    def gradient(self, output_gradient: Tensor, heads: Optional[slice] = None, rows: Optional[Tensor] = None) -> Tensor:
        """``dA`` ``[B, H, Q, K]`` from the gradient of ``graph_tensor`` (``heads`` and ``rows`` as for
        :meth:`probabilities`)."""
        with torch.no_grad():
            value = self._value.detach()
            groups = self.shape[1] // value.shape[1]
            if groups > 1:
                value = value.repeat_interleave(groups, dim=1)
            d_output = output_gradient.transpose(1, 2).to(value.dtype)  # [B, H, Q, d]
            if heads is not None:
                value, d_output = value[:, heads], d_output[:, heads]
            if rows is not None:
                samples = torch.arange(d_output.shape[0], device=d_output.device)
                d_output = d_output[samples, :, rows.to(d_output.device)].unsqueeze(2)
            return torch.matmul(d_output, value.transpose(-1, -2))


class _Ungrouped:
    """The attention module as ``eager_attention_forward`` sees it, with keys already repeated per query head."""

    num_key_value_groups = 1

    def __init__(self, module: nn.Module) -> None:
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)
