"""Chefer relevance for generated text, returned in Captum's LLM-attribution format.

:class:`CheferLLMAttribution` explains each token a HuggingFace language model generates (or is given as a
target) by the relevance of the input tokens, following Chefer, Gur and Wolf ("Generic Attention-model
Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers", ICCV 2021, arXiv 2103.15679),
and returns Captum's :class:`~captum.attr.LLMAttributionResult` (``token_attr [n_output, n_input]``,
``seq_attr``, ``plot_token_attr``, ``plot_seq_attr``), so it sits beside Captum's own
``LLMGradientAttribution`` and ``LLMAttribution``.

Three families of model, told apart by their configuration:

* **Decoder-only** (``GPT2LMHeadModel``, Llama-style ``*ForCausalLM``). The prompt and the previous outputs
  are one sequence; rule (6) gives ``R = (I + A_bar_n) ... (I + A_bar_1)`` over it. ``token_attr[j]`` is the
  row of ``R`` at the position ``p`` that predicts output token ``j`` (the last prompt position for
  ``j = 0``, output ``j - 1`` after that), with the identity term removed, read over the prompt's columns.
  That row minus ``e_p`` is what the recursion keeps (``d <- d + (e_p + d) A_bar``), so the identity is
  never added and taken away again: small increments keep their digits.
* **Encoder-decoder** (BART, T5, Marian: ``*ForConditionalGeneration``). Rules (6)-(10): the encoder's
  self-attention gives ``R_ii``; each decoder layer's self-attention updates ``(R_qq, R_qi)`` and its
  cross-attention adds ``norm(R_qq)^T A_bar norm(R_ii)`` to ``R_qi``. ``token_attr[j]`` is row ``j`` of
  ``R_qi`` (the decoder position that predicts output ``j``), over the encoder's tokens, computed from the
  increments ``R_qq - I`` and ``R_ii - I`` (:func:`~captum_chefer.relevance.encoder_decoder_rows`).
* **Image-to-text** (``VisionEncoderDecoderModel`` with a ViT encoder). As encoder-decoder, over the ViT's
  tokens (``[CLS]`` and the patches); the patches' relevance is also given shaped like the image, one
  heatmap per output token (:class:`LLMImageAttributionResult`).

How it runs. All output tokens share one teacher-forced forward pass over the prompt and the whole target,
with attention captured by :class:`~captum_chefer.capture.AttentionCapture` (models that use SDPA or
another fused kernel run eager attention for the calling thread only and are restored). Each output
token ``j`` has its own gradient target ``y_j``, the logit of token ``j`` at the position that predicts it
(the paper's choice; ``gradient_target="log_prob"`` takes ``log p(token j)``, Captum's target), so each
needs its own backward pass. Those are taken together: ``torch.autograd.grad(..., is_grads_batched=True)``
on chunks of ``chunk_size`` targets (one vmapped backward per chunk, reduced at once to ``A_bar`` per
layer, so the chunk size bounds the memory), or one plain backward per target with ``chunk_size=1``. The
relevance is computed in float32, or the model's dtype if wider: half-precision maps and gradients are upcast
before they are weighted, and autocast is off for its products.
"""

from __future__ import annotations

import inspect
import os
import unicodedata
import warnings
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, Sequence

import captum
import torch
from captum.attr import Attribution, LLMAttributionResult, TextTokenInput
from captum.log import log_usage
from torch import Tensor, nn

from ._optional import extra
from .adapters.base import PACKAGE_FILES, spread_over_patches
from .capture import AttentionCapture, evaluation_mode, find_attention_modules
from .relevance import (
    encoder_decoder_rows,
    full_precision,
    mask_padding,
    pooling_rows,
    propagate_row_increment,
    weighted_attention,
)

__all__ = [
    "CheferLLMAttribution", "GradientTarget", "LLMImageAttributionResult", "ModelFamily", "OutOfVocabularyWarning",
    "word_tokenizer",
]

GradientTarget = Literal["logit", "log_prob"]
ModelFamily = Literal["decoder-only", "encoder-decoder", "image-to-text"]
Target = Optional[str | Tensor | Sequence[int]]

# Captum's defaults for generating a target (captum.attr._core.llm_attr.DEFAULT_GEN_ARGS).
DEFAULT_GEN_ARGS: dict[str, Any] = {"max_new_tokens": 25, "do_sample": False, "temperature": None, "top_p": None}


class OutOfVocabularyWarning(UserWarning):
    """Words of a prompt or target that the tokenizer does not know became its unknown token.

    The explanation is then of the unknown token, not of those words.
    """


class LLMImageAttributionResult(LLMAttributionResult):
    """:class:`~captum.attr.LLMAttributionResult` of an image-to-text model, with the relevance on the image.

    ``input_tokens`` are the vision encoder's tokens (``"[CLS]"``, then ``"patch r,c"`` row by row) and
    ``token_attr`` their relevance per output token, as for text. In addition:

    Attributes:
        image_attr: ``[n_output, C, H, W]``, each output token's patch relevance spread evenly over the
            patch's pixels and channels (summing a patch's pixels gives its relevance back; a border the
            patch grid does not cover gets zero).
    """

    def __init__(self, *, image_attr: Tensor, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if image_attr.dim() != 4 or image_attr.shape[0] != len(self.output_tokens):
            raise ValueError(
                f"image_attr must be [n_output, C, H, W] with n_output = {len(self.output_tokens)}; "
                f"got {tuple(image_attr.shape)}"
            )
        self.image_attr = image_attr

    def plot_image_attr(self, output_index: int = 0, show: bool = False) -> Any:
        """A heatmap of output token ``output_index``'s relevance over the image (channels summed).

        Returns:
            ``(Figure, Axes)``, or ``None`` with ``show=True`` (the figure is shown).
        """
        import matplotlib.pyplot as plt

        heat = self.image_attr[output_index].sum(0).cpu()
        fig, ax = plt.subplots()
        image = ax.imshow(heat, cmap="viridis")
        fig.colorbar(image, ax=ax)
        ax.set_title(f"relevance for output token {output_index}: {self.output_tokens[output_index]!r}")
        ax.set_xticks([])
        ax.set_yticks([])
        if show:
            plt.show()
            return None
        return fig, ax


@dataclass
class _Item:
    """One prompt and its target, as the forward pass needs them."""

    source: Tensor  # [P] token ids (text) or [C, H, W] pixels (image)
    target: Tensor  # [K] token ids
    itp_mask: Optional[Tensor]  # [P] bool, True on the columns reported (text; None: all)
    input_tokens: list[str]
    inp: Any


class CheferLLMAttribution(Attribution):
    r"""Chefer relevance of the input tokens for each generated token, as Captum's ``LLMAttributionResult``.

    Args:
        model: a HuggingFace model with a language-model head: ``*ForCausalLM`` / ``GPT2LMHeadModel``
            (decoder-only), ``*ForConditionalGeneration`` (encoder-decoder) or ``VisionEncoderDecoderModel``
            (image-to-text). Its attention modules must dispatch through transformers' attention interface
            (every model with an ``eager_attention_forward``); SDPA models are fine. The model is left
            exactly as found: evaluation mode and eager attention hold for the call only.
        tokenizer: its tokenizer (decodes the output tokens; encodes a ``str`` target).

    Example:
        >>> import torch
        >>> from captum.attr import TextTokenInput
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> tokenizer = word_tokenizer("the patient has a fever and a cough".split())
        >>> _ = torch.manual_seed(0)
        >>> model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4))
        >>> chefer = CheferLLMAttribution(model, tokenizer)
        >>> result = chefer.attribute(TextTokenInput("the patient has a fever", tokenizer), target="and a cough")
        >>> result.input_tokens, result.output_tokens
        (['<s>', 'the', 'patient', 'has', 'a', 'fever'], ['and', 'a', 'cough'])
        >>> tuple(result.token_attr.shape), bool((result.token_attr >= 0).all())
        ((3, 6), True)
    """

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        self.family: ModelFamily = _family(model)
        super().__init__(model)
        self.model = model
        self.tokenizer = tokenizer
        self._model_modules = tuple(model.modules())
        if self.family == "decoder-only":
            encoder_modules: list[nn.Module] = []
            decoder_modules = find_attention_modules(model)
            embeddings = [model.get_input_embeddings()]
        else:
            encoder, decoder = model.get_encoder(), model.get_decoder()
            encoder_modules = find_attention_modules(encoder)
            decoder_modules = find_attention_modules(decoder)
            embeddings = [encoder.get_input_embeddings(), decoder.get_input_embeddings()]
        if not decoder_modules:
            raise TypeError(
                f"{type(model).__name__}: no attention module that this package can capture was found in its "
                "decoder; supported are transformers attention modules that dispatch through AttentionInterface "
                "(models with an eager_attention_forward)"
            )
        self._self_modules = [m for m in decoder_modules if not _is_cross_attention(m)]
        self._cross_modules = [m for m in decoder_modules if _is_cross_attention(m)]
        self._encoder_modules = encoder_modules
        if self.family != "decoder-only" and not self._cross_modules:
            raise TypeError(
                f"{type(model).__name__} is an encoder-decoder, but no cross-attention module was recognised in "
                "its decoder (one with is_causal=False or is_cross_attention=True)"
            )
        self._embeddings = list(dict.fromkeys(m for m in embeddings if m is not None))  # T5 shares one
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    @classmethod
    def get_name(cls) -> str:
        return "Chefer"

    def has_convergence_delta(self) -> bool:
        return False

    @log_usage()
    def attribute(  # type: ignore[override]
        self,
        inp: TextTokenInput | Tensor,
        target: Target = None,
        gen_args: Optional[Mapping[str, Any]] = None,
        *,
        gradient_target: GradientTarget = "logit",
        chunk_size: Optional[int] = 16,
    ) -> LLMAttributionResult:
        """Relevance of each input token for each output token.

        Args:
            inp: the prompt: Captum's ``TextTokenInput`` for a text model (its ``skip_tokens`` drop columns
                from the result, the model still reads them), or the pixel values ``[C, H, W]`` (or
                ``[1, C, H, W]``) an image processor made, for an image-to-text model.
            target: the output to explain: a string, token ids (a 1-D tensor or a list), or ``None`` to
                generate it with ``model.generate``. A string is tokenized without special tokens as the text
                that follows the prompt: for a decoder-only model, prompt and target are tokenized together
                and the target's tokens are those after the prompt's (GPT-2's ``"Ġand"`` rather than
                ``"and"``), joined by a space unless either side has one at the join, the target starts with
                punctuation or both sides are in a script written without spaces; a target that would not
                start on a token boundary is refused. Words the tokenizer does not know warn
                (:class:`OutOfVocabularyWarning`).
            gen_args: keyword arguments of ``model.generate`` when ``target`` is ``None``; Captum's defaults
                (greedy, 25 new tokens) when ``None``. Not allowed with a target.
            gradient_target: ``"logit"`` (the paper: the target token's logit) or ``"log_prob"`` (its
                log-probability, Captum's target for gradient methods).
            chunk_size: output tokens per batched backward pass (``is_grads_batched``); ``1``: one plain
                backward pass per token; ``None``: all at once. Memory grows with it (the gradients of every
                attention map for the whole chunk exist at once).

        Returns:
            ``LLMAttributionResult`` with ``input_tokens`` (the prompt's tokens, or the vision encoder's),
            ``output_tokens``, ``token_attr [n_output, n_input]`` (non-negative), ``seq_attr`` (its sum over
            output tokens, as Captum's gradient methods give it) and ``output_probs`` (the probability of each
            output token given the prompt and the previous outputs). An :class:`LLMImageAttributionResult`
            for an image-to-text model.
        """
        return self.attribute_batch(
            [inp], None if target is None else [target], gen_args, gradient_target=gradient_target, chunk_size=chunk_size
        )[0]

    @log_usage()
    def attribute_batch(
        self,
        inps: Sequence[TextTokenInput | Tensor],
        targets: Optional[Sequence[Target]] = None,
        gen_args: Optional[Mapping[str, Any]] = None,
        *,
        gradient_target: GradientTarget = "logit",
        chunk_size: Optional[int] = 16,
        batch_size: Optional[int] = 1,
    ) -> list[LLMAttributionResult]:
        """:meth:`attribute` for several prompts, optionally padded into shared forward passes.

        Each result equals :meth:`attribute` on its prompt alone: with ``batch_size > 1`` prompts and
        targets are padded on the right and padding is masked, in the model's attention and in the
        relevance rules.

        Args:
            inps: the prompts (see :meth:`attribute`).
            targets: one target per prompt (each as in :meth:`attribute`), or ``None`` to generate all.
            gen_args, gradient_target, chunk_size: as in :meth:`attribute`; chunks take output tokens of
                every prompt in the forward pass.
            batch_size: prompts per forward pass (``None``: all). The forward pass is shared, but the
                backward pass of every output token runs through the whole padded batch, so a batch of ``B``
                prompts does about ``B`` times the backward work of one prompt at a time (``benchmarks/llm.py``
                measured four prompts in one forward pass 5x slower than one at a time, on one CPU thread).
                Larger batches can pay off only where the work per call is too small to occupy the device.

        Returns:
            One result per prompt, in order.
        """
        if isinstance(inps, (TextTokenInput, Tensor)):
            raise TypeError("attribute_batch takes a list of prompts; use attribute for one prompt")
        if isinstance(targets, str):
            raise TypeError("targets must hold one target per prompt (a list), not one string; for one prompt use attribute")
        if targets is not None and len(targets) != len(inps):
            raise ValueError(f"give one target per prompt: {len(inps)} prompts, {len(targets)} targets")
        if gradient_target not in ("logit", "log_prob"):
            raise ValueError(f"gradient_target must be 'logit' or 'log_prob', got {gradient_target!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        if targets is not None and gen_args is not None and any(t is not None for t in targets):
            raise ValueError("gen_args only applies when the target is generated (target=None); drop one of them")
        items = [self._item(inp, None if targets is None else targets[i], gen_args) for i, inp in enumerate(inps)]
        size = batch_size or max(len(items), 1)
        results: list[LLMAttributionResult] = []
        with torch.enable_grad():  # Captum's metrics call attribute under no_grad
            for start in range(0, len(items), size):
                results.extend(self._attribute_items(items[start : start + size], gradient_target, chunk_size))
        return results

    # ------------------------------------------------------------------------------------------ inputs

    def _item(self, inp: Any, target: Target, gen_args: Optional[Mapping[str, Any]]) -> _Item:
        """Validate one prompt, generate or encode its target."""
        device = _device(self.model)
        if self.family == "image-to-text":
            if not isinstance(inp, Tensor):
                raise TypeError(
                    f"{type(self.model).__name__} reads an image: pass its pixel values [C, H, W] (from the image "
                    f"processor) as the input, not {type(inp).__name__}"
                )
            pixels = inp[0] if inp.dim() == 4 and inp.shape[0] == 1 else inp
            if pixels.dim() != 3:
                raise ValueError(f"pass one image's pixel values [C, H, W] (or [1, C, H, W]); got {tuple(inp.shape)}")
            source = pixels.to(device=device, dtype=next(self.model.parameters()).dtype)
            itp_mask, input_tokens = None, []  # the tokens are named after the forward pass
        else:
            if not isinstance(inp, TextTokenInput):
                raise TypeError(
                    f"{type(self.model).__name__} reads text: pass captum.attr.TextTokenInput(prompt, tokenizer), "
                    f"not {type(inp).__name__}"
                )
            if not _same_vocabulary(inp.tokenizer, self.tokenizer):
                raise ValueError(
                    "the prompt was tokenized by another tokenizer than the one CheferLLMAttribution was given (their "
                    "vocabularies differ), so the model would read other tokens than the prompt shows; make the "
                    "TextTokenInput with the same tokenizer"
                )
            source = inp.inp_tensor[0].to(device)
            if source.numel() == 0:
                raise ValueError(
                    "the prompt has no tokens (an empty text, and the tokenizer adds no special token); give a prompt "
                    "of at least one token"
                )
            _check_vocabulary("prompt", source, _vocabulary_size(self.model.get_input_embeddings()))
            _warn_unknown_prompt(self.tokenizer, source, inp.skip_tokens)
            itp_mask = None if inp.itp_mask is None else inp.itp_mask[0].bool().to(device)
            input_tokens = list(inp.values)
        if target is None:
            ids = self._generate(source, gen_args)
        else:
            ids = self._encode_target(target, source if self.family == "decoder-only" else None)
        if ids.numel() == 0:
            raise ValueError("the target is empty: give at least one output token (or generate with max_new_tokens >= 1)")
        _check_vocabulary("target", ids, _vocabulary_size(self.model.get_output_embeddings()))
        return _Item(source, ids.to(device), itp_mask, input_tokens, inp)

    def _encode_target(self, target: Target, prompt: Optional[Tensor] = None) -> Tensor:
        """The target's token ids.

        A string that follows a decoder-only ``prompt`` (its ids) is tokenized with it, as the model reads
        the two (:func:`_continuation_ids`); one without a prompt (the decoder of an encoder-decoder starts
        afresh) on its own, without special tokens. Unknown words warn.
        """
        if isinstance(target, str):
            ids = _continuation_ids(self.tokenizer, prompt, target) if prompt is not None else _encode(self.tokenizer, target)
            _warn_unknown_words(self.tokenizer, target, ids)
            return torch.tensor(ids, dtype=torch.long)
        if isinstance(target, Tensor) or (isinstance(target, Sequence) and all(isinstance(t, int) for t in target)):
            ids = torch.as_tensor(target)
            if ids.dim() == 2 and ids.shape[0] == 1:
                ids = ids[0]
            if ids.dim() != 1 or ids.is_floating_point():
                raise ValueError(f"target token ids must be a 1-D integer tensor or list; got shape {tuple(ids.shape)}")
            return ids.long()
        raise TypeError(f"target must be a string, token ids (tensor or list of ints) or None; got {type(target).__name__}")

    def _generate(self, source: Tensor, gen_args: Optional[Mapping[str, Any]]) -> Tensor:
        """Greedy (or ``gen_args``) generation of the target, as Captum's LLM classes do."""
        kwargs = dict(gen_args) if gen_args else dict(DEFAULT_GEN_ARGS)
        with evaluation_mode(self.model, self._model_modules), torch.no_grad():
            if self.family == "image-to-text":
                output = self.model.generate(pixel_values=source.unsqueeze(0), **kwargs)
            else:
                ids = source.unsqueeze(0)
                output = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        sequence = output.sequences[0] if hasattr(output, "sequences") else output[0]
        if self.family == "decoder-only":
            return sequence[source.shape[0] :]
        return sequence[1:]  # an encoder-decoder's output starts with the decoder's start token, not an output

    # ------------------------------------------------------------------------------------------ forward

    def _forward(self, items: Sequence[_Item]) -> tuple[Tensor, int, Tensor, Tensor, dict[str, Any]]:
        """One teacher-forced forward pass over the padded prompts and targets, with attention captured.

        Returns:
            ``(logits [B, T - first, V], first, input_mask, query_mask, maps)``: logits from sequence position
            ``first`` on; ``maps`` holds ``encoder``, ``self`` and ``cross`` (one entry per decoder layer,
            ``None`` without cross-attention) attention maps.
        """
        device = _device(self.model)
        pad = 0  # any id the embeddings have: padded positions are masked, and nothing reads them
        first = 0  # the first sequence position that logits are returned for
        if self.family == "decoder-only":
            sequences = [torch.cat([item.source, item.target]) for item in items]
            ids, query_mask = _right_padded(sequences, pad, device)
            kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": query_mask.long()}
            input_mask = query_mask
            if self._keeps_logits:  # no vocabulary-sized logits for the prompt positions that predict nothing
                first = min(len(item.source) for item in items) - 1
                kwargs["logits_to_keep"] = ids.shape[1] - first
        else:
            start = _decoder_start(self.model)
            decoder = [torch.cat([item.target.new_tensor([start]), item.target[:-1]]) for item in items]
            decoder_ids, query_mask = _right_padded(decoder, pad, device)
            kwargs = {"decoder_input_ids": decoder_ids}
            if self.family == "image-to-text":
                kwargs["pixel_values"] = torch.stack([item.source for item in items])
                input_mask = None
            else:
                source_ids, input_mask = _right_padded([item.source for item in items], pad, device)
                kwargs.update(input_ids=source_ids, attention_mask=input_mask.long())
        streams = {"encoder": self._encoder_modules, "self": self._self_modules, "cross": self._cross_modules}
        streams = {key: modules for key, modules in streams.items() if modules}
        overrides = {module: _leaf_output for module in self._embeddings}
        with AttentionCapture(streams, overrides=overrides, model=self.model, model_modules=self._model_modules) as capture:
            output = self.model(**kwargs, use_cache=False)
        maps: dict[str, Any] = {"encoder": [], "self": [], "cross": []}
        for stream, _, probabilities in capture.calls:
            if stream == "encoder":
                maps["encoder"].append(probabilities)
            elif stream == "self":
                maps["self"].append(probabilities)
                maps["cross"].append(None)
            elif not maps["cross"] or maps["cross"][-1] is not None:
                raise RuntimeError(
                    f"{type(self.model).__name__}: a cross-attention call came before its layer's self-attention "
                    "call; the decoder's layers are not in the order this class reads them"
                )
            else:
                maps["cross"][-1] = probabilities
        if input_mask is None:  # an image: every encoder token is real
            tokens = output.encoder_last_hidden_state.shape[1]
            input_mask = torch.ones(len(items), tokens, dtype=torch.bool, device=device)
        _check_shapes(maps, self.family, query_mask.shape[1], input_mask.shape[1], type(self.model).__name__)
        return output.logits, first, input_mask, query_mask, maps

    # ------------------------------------------------------------------------------------------ relevance

    def _attribute_items(
        self, items: Sequence[_Item], gradient_target: GradientTarget, chunk_size: Optional[int]
    ) -> list[LLMAttributionResult]:
        logits, first, input_mask, query_mask, maps = self._forward(items)
        device = logits.device
        owners = torch.cat([torch.full((len(item.target),), b, dtype=torch.long) for b, item in enumerate(items)]).to(device)
        steps = torch.cat([torch.arange(len(item.target)) for item in items]).to(device)
        offsets = (
            torch.tensor([len(item.source) - 1 for item in items], device=device)
            if self.family == "decoder-only"
            else torch.zeros(len(items), dtype=torch.long, device=device)
        )
        positions = offsets[owners] + steps  # the logits position that predicts each output token
        tokens = torch.cat([item.target for item in items])
        picked = torch.arange(len(tokens), device=device)
        predicting = logits[owners, positions - first].float()  # [N, V]: the logits that predict each output token
        if gradient_target == "log_prob":
            predicting = predicting.log_softmax(-1)
        explained = predicting[picked, tokens]  # [N]
        probs = predicting.detach().log_softmax(-1)[picked, tokens].exp()
        del logits, predicting

        rows = self._rows(explained, owners, positions, maps, input_mask, query_mask, chunk_size)  # [N, T]
        results = []
        for b, item in enumerate(items):
            mine = owners == b
            if self.family == "decoder-only":
                relevance = rows[mine, : len(item.source)]
            else:
                relevance = rows[mine][:, input_mask[b]]
            results.append(self._result(item, relevance.detach().cpu(), probs[mine].cpu()))
        return results

    def _rows(
        self, explained: Tensor, owners: Tensor, positions: Tensor, maps: dict[str, Any],
        input_mask: Tensor, query_mask: Tensor, chunk_size: Optional[int],
    ) -> Tensor:
        """The relevance row of every explained output token: ``[N, T]`` over the prompt (decoder-only,
        identity removed) or the encoder's tokens."""
        encoder, selfs, crosses = maps["encoder"], maps["self"], maps["cross"]
        tensors = encoder + selfs + [c for c in crosses if c is not None]
        count = explained.shape[0]
        size = count if chunk_size is None else chunk_size
        eye = torch.eye(count, dtype=explained.dtype, device=explained.device)
        out = []
        for start in range(0, count, size):
            stop = min(start + size, count)
            retain = stop < count
            if size == 1:
                grads = [None if g is None else g.unsqueeze(0) for g in torch.autograd.grad(
                    explained[start], tensors, retain_graph=retain, allow_unused=True)]
            else:
                grads = list(torch.autograd.grad(
                    explained, tensors, grad_outputs=eye[start:stop], retain_graph=retain, allow_unused=True,
                    is_grads_batched=True))
            who = owners[start:stop]
            bars = [_weighted(a, g, who) for a, g in zip(tensors, grads)]
            del grads
            with full_precision(explained):  # autocast: the relevance's products in float32 at least
                out.append(self._chunk_rows(bars, who, positions[start:stop], maps, input_mask, query_mask))
        return torch.cat(out)

    def _chunk_rows(
        self, bars: list[Tensor], who: Tensor, where: Tensor, maps: dict[str, Any], input_mask: Tensor,
        query_mask: Tensor,
    ) -> Tensor:
        """The rows of one chunk of explained tokens from their ``A_bar`` (encoder, self, cross layers in turn)."""
        encoder, selfs, crosses = maps["encoder"], maps["self"], maps["cross"]
        enc_bars, self_bars = bars[: len(encoder)], bars[len(encoder) : len(encoder) + len(selfs)]
        if self.family == "decoder-only":  # the increment d = r - e_p: the identity term is never added
            mask = query_mask[who]
            unit = pooling_rows(where, query_mask.shape[1], self_bars[0].dtype)
            increment = torch.zeros_like(unit)
            for weighted in reversed(self_bars):
                increment = propagate_row_increment(increment, mask_padding(weighted, mask, mask), unit)
            return increment
        cross_iter = iter(bars[len(encoder) + len(selfs) :])
        cross_bars = [None if c is None else next(cross_iter) for c in crosses]
        return encoder_decoder_rows(
            enc_bars, self_bars, cross_bars, where, input_mask=input_mask[who], query_mask=query_mask[who]
        ).r_qi

    # ------------------------------------------------------------------------------------------ result

    def _result(self, item: _Item, relevance: Tensor, probs: Tensor) -> LLMAttributionResult:
        output_tokens = _pretty_tokens(item.target.cpu(), self.tokenizer)
        if self.family == "image-to-text":
            return self._image_result(item, relevance, probs, output_tokens)
        if item.itp_mask is not None:
            relevance = relevance[:, item.itp_mask.cpu()]
        return LLMAttributionResult(
            input_tokens=item.input_tokens, output_tokens=output_tokens, seq_attr=relevance.sum(0),
            token_attr=relevance, output_probs=probs, inp=item.inp,
        )

    def _image_result(self, item: _Item, relevance: Tensor, probs: Tensor, output_tokens: list[str]) -> LLMAttributionResult:
        channels, height, width = item.source.shape
        patch = getattr(self.model.get_encoder().config, "patch_size", None)
        if patch is None:
            raise TypeError(f"{type(self.model.get_encoder()).__name__} has no patch_size in its config: cannot place patches")
        ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
        rows, cols = height // ph, width // pw
        extra = relevance.shape[1] - rows * cols
        if extra < 0:
            raise ValueError(f"the encoder has {relevance.shape[1]} tokens, fewer than the {rows}x{cols} patches of the image")
        names = ["[CLS]"] if extra == 1 else [f"[token {k}]" for k in range(extra)]
        names += [f"patch {r},{c}" for r in range(rows) for c in range(cols)]
        image = spread_over_patches(relevance[:, extra:], (relevance.shape[0], channels, height, width), (ph, pw))
        return LLMImageAttributionResult(
            input_tokens=names, output_tokens=output_tokens, seq_attr=relevance.sum(0), token_attr=relevance,
            output_probs=probs, image_attr=image,
        )


# ---------------------------------------------------------------------------------------------- helpers


def _family(model: Any) -> ModelFamily:
    """Which kind of generative model ``model`` is; errors that say how to fix an unsupported one."""
    if not isinstance(model, nn.Module) or not hasattr(model, "config") or not hasattr(model, "get_output_embeddings"):
        raise TypeError(
            f"CheferLLMAttribution needs a HuggingFace transformers model with a language-model head, got "
            f"{type(model).__name__}; for other models use CheferAttribution with an adapter"
        )
    if model.get_output_embeddings() is None:
        raise TypeError(
            f"{type(model).__name__} has no language-model head (get_output_embeddings() is None), so it has no "
            "logits over the vocabulary to explain; load the model with its generation head instead, e.g. "
            "AutoModelForCausalLM / GPT2LMHeadModel or AutoModelForSeq2SeqLM / BartForConditionalGeneration"
        )
    if not getattr(model.config, "is_encoder_decoder", False):
        return "decoder-only"
    main_input = getattr(model, "main_input_name", "input_ids")
    if main_input == "pixel_values":
        return "image-to-text"
    if main_input != "input_ids":
        raise TypeError(
            f"{type(model).__name__} reads {main_input!r}; CheferLLMAttribution supports encoder-decoders that read "
            "text (input_ids) or images (pixel_values)"
        )
    return "encoder-decoder"


def _is_cross_attention(module: nn.Module) -> bool:
    """A decoder's cross-attention: flagged as such, or not causal (every decoder self-attention is)."""
    flag = getattr(module, "is_cross_attention", None)
    if flag is not None:
        return bool(flag)
    if "Cross" in type(module).__name__:
        return True
    return getattr(module, "is_causal", True) is False


def _leaf_output(original: Any, *args: Any, **kwargs: Any) -> Tensor:
    """An input embedding's output as a leaf that requires grad.

    Inside the capture the parameters are detached, so without a leaf nothing downstream would be in the
    autograd graph, the attention maps included.
    """
    return original(*args, **kwargs).detach().requires_grad_(True)


def _weighted(attention: Tensor, gradient: Optional[Tensor], owners: Tensor) -> Tensor:
    """``A_bar`` ``[c, Q, K]`` of each explained token: its sample's attention weighted by its gradient.

    ``gradient`` is ``[c, B, H, Q, K]`` (one row of the batched backward pass per explained token), each row
    non-zero in its own sample only.
    """
    attention = attention.detach()
    count = owners.shape[0]
    if gradient is None:  # no gradient reached the layer
        return attention.new_zeros(count, *attention.shape[2:])
    gradient = gradient[torch.arange(count, device=owners.device), owners]  # [c, H, Q, K]
    if attention.shape[0] == 1:
        attention = attention.expand_as(gradient)  # a view: one sample shared by every explained token
    else:
        attention = attention[owners]
    return weighted_attention(attention, gradient)  # float32 at least: it upcasts half-precision maps


def _right_padded(sequences: Sequence[Tensor], pad: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``[B, T]`` ids padded on the right, and the mask (``True`` on real tokens)."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad, dtype=torch.long, device=device)
    mask = torch.zeros(len(sequences), length, dtype=torch.bool, device=device)
    for b, sequence in enumerate(sequences):
        ids[b, : len(sequence)] = sequence
        mask[b, : len(sequence)] = True
    return ids, mask


def _check_shapes(maps: dict[str, Any], family: ModelFamily, queries: int, inputs: int, name: str) -> None:
    """Every captured map must have the shape its role implies; a misread module fails here, loudly."""
    expected = {"encoder": (inputs, inputs), "self": (queries, queries), "cross": (queries, inputs)}
    if not maps["self"]:
        raise RuntimeError(f"{name}: no decoder self-attention was recorded in the forward pass")
    if family != "decoder-only" and all(c is None for c in maps["cross"]):
        raise RuntimeError(f"{name}: no cross-attention was recorded in the forward pass")
    for key, shape in expected.items():
        for k, attention in enumerate(maps[key]):
            if attention is not None and (attention.dim() != 4 or tuple(attention.shape[-2:]) != shape):
                raise RuntimeError(
                    f"{name}: {key} attention of layer {k} has shape {tuple(attention.shape)}, expected "
                    f"[B, H, {shape[0]}, {shape[1]}]"
                )


def _decoder_start(model: nn.Module) -> int:
    for config in (getattr(model, "generation_config", None), model.config):
        start = getattr(config, "decoder_start_token_id", None)
        if start is not None:
            return int(start)
    raise ValueError(
        f"{type(model).__name__} has no decoder_start_token_id; set model.config.decoder_start_token_id (the "
        "token the decoder starts from, e.g. the tokenizer's BOS or CLS id)"
    )


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device  # what a transformers model's .device says, for any nn.Module


def _pretty_tokens(ids: Tensor, tokenizer: Any) -> list[str]:
    """The output tokens as Captum's LLM classes name them (readable, overlaps marked)."""
    try:
        from captum.attr._core.llm_attr import _convert_ids_to_pretty_tokens
    except ImportError:  # a Captum without it: the tokenizer's own token strings
        return list(tokenizer.convert_ids_to_tokens(ids.tolist()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(_convert_ids_to_pretty_tokens(ids, tokenizer))


def _encode(tokenizer: Any, text: str) -> list[int]:
    """``text``'s token ids, without special tokens."""
    return [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """The text of ``ids`` without special tokens, spaces as the tokens have them."""
    try:
        return str(tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False))
    except TypeError:  # a tokenizer without those options
        return str(tokenizer.decode(list(ids)))


def _joiner(prompt: str, target: str) -> str:
    """What goes between a prompt and the text that follows it: a space between words, else nothing.

    Nothing when either side already has whitespace at the join, when the target starts with punctuation
    that attaches to the word before it (``,``, ``.``, ``)``, ``-`` ...), or when both sides are in a script
    written without spaces (Chinese, Japanese, Thai ...).

    Example:
        >>> [_joiner("a fever", t) for t in ("and a cough", " and", ", and", "?")]
        [' ', '', '', '']
        >>> _joiner("a fever ", "and"), _joiner("", "and"), _joiner("患者发烧", "和咳嗽")
        ('', '', '')
    """
    if not prompt or not target or prompt[-1].isspace() or target[0].isspace():
        return ""
    category = unicodedata.category(target[0])
    if category.startswith("P") and category not in ("Ps", "Pi"):
        return ""
    if _unspaced(prompt[-1]) and _unspaced(target[0]):
        return ""
    return " "


def _unspaced(char: str) -> bool:
    """A character of a script that does not put spaces between words."""
    if unicodedata.east_asian_width(char) in ("W", "F"):
        return not unicodedata.name(char, "").startswith("HANGUL")  # Korean puts spaces between words
    return unicodedata.name(char, "").startswith(("THAI", "LAO", "KHMER", "MYANMAR", "TIBETAN"))


def _continuation_ids(tokenizer: Any, prompt: Tensor, target: str) -> list[int]:
    """The ids of ``target`` as the tokenizer cuts it where it follows the ``prompt`` ids.

    The prompt's text (decoded) and the target are tokenized together and the tokens after the prompt's
    are the target's: a GPT-2 tokenizer then gives ``"Ġand"`` (with the space a word after another takes)
    where ``"and"`` on its own would be ``"a"``, ``"nd"``. If the prompt's own tokens are not a prefix of
    the joint tokens (the target's first characters merge with the prompt's last token), no cut gives the
    target's tokens after these prompt tokens, and the target is refused.

    Example:
        >>> tokenizer = word_tokenizer(["the", "patient", "has", "fever", "and", "cough"])
        >>> prompt = torch.tensor(tokenizer.encode("the patient has fever"))  # <s> first
        >>> tokenizer.convert_ids_to_tokens(_continuation_ids(tokenizer, prompt, "and cough"))
        ['and', 'cough']
    """
    text = _decode(tokenizer, prompt.tolist())
    joined = text + _joiner(text, target) + target
    head, full = _encode(tokenizer, text), _encode(tokenizer, joined)
    if full[: len(head)] == head:
        return full[len(head) :]
    same = next((k for k, (a, b) in enumerate(zip(head, full)) if a != b), len(full))  # where they part
    names = lambda ids: list(tokenizer.convert_ids_to_tokens(ids))  # noqa: E731
    raise ValueError(
        f"the target {target!r} does not start on a token boundary after the prompt: the prompt ends in tokens "
        f"{names(head[same:])}, but prompt and target together tokenize as {names(full[same : same + 3])} there: the "
        "tokenizer does not cut the text where the prompt ends. End the prompt at a word boundary without trailing "
        "whitespace (the target gets its leading space), or pass the target as token ids"
    )


def _same_vocabulary(a: Any, b: Any) -> bool:
    """Whether two tokenizers map tokens to the same ids (``True`` when it cannot be told)."""
    if a is b or not callable(getattr(a, "get_vocab", None)) or not callable(getattr(b, "get_vocab", None)):
        return True
    return a.get_vocab() == b.get_vocab()


def _unknown_words(tokenizer: Any, text: str, unk: int) -> list[str]:
    """The words of ``text`` that the tokenizer turns into its unknown token ``unk`` (in order, once each)."""
    try:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = [text[a:b] for i, (a, b) in zip(encoding["input_ids"], encoding["offset_mapping"]) if i == unk]
    except (TypeError, ValueError, KeyError, NotImplementedError):  # no offsets (a slow tokenizer): word by word
        spans = [word for word in text.split() if unk in _encode(tokenizer, word)]
    literal = getattr(tokenizer, "unk_token", None)
    return [w for w in dict.fromkeys(spans) if w.strip() and w != literal]


def _warn_unknown_words(tokenizer: Any, text: str, ids: Sequence[int]) -> None:
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or unk not in ids:
        return
    words = _unknown_words(tokenizer, text, unk)
    if words:
        warnings.warn(
            f"the target's words {words} are not in the tokenizer's vocabulary and become its unknown token "
            f"{tokenizer.unk_token!r}: the explanation is of that token, not of those words; use words the tokenizer "
            "knows, a tokenizer whose vocabulary has them, or pass token ids",
            OutOfVocabularyWarning,
            skip_file_prefixes=_OWN_FILES,
        )


def _warn_unknown_prompt(tokenizer: Any, ids: Tensor, skipped: Any) -> None:
    unk = getattr(tokenizer, "unk_token_id", None)
    others = {getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "sep", "cls", "mask")}
    if unk is None or unk in others or (skipped and unk in skipped):  # GPT-2's unknown token is also its bos/eos
        return
    positions = (ids == unk).nonzero().flatten().tolist()
    if positions:
        warnings.warn(
            f"the prompt holds {len(positions)} word(s) the tokenizer does not know, read as its unknown token "
            f"{tokenizer.unk_token!r} (token position(s) {positions[:10]}): their relevance is the unknown token's; "
            "use words the tokenizer knows, or a tokenizer whose vocabulary has them",
            OutOfVocabularyWarning,
            skip_file_prefixes=_OWN_FILES,
        )


# Warnings point at the caller's line, not at this package or Captum's wrappers around ``attribute``.
_OWN_FILES = (*PACKAGE_FILES, os.path.dirname(os.path.abspath(captum.__file__)) + os.sep)


def _vocabulary_size(embedding: Any) -> Optional[int]:
    """The number of token ids an embedding or language-model head takes or scores (``None``: unknown)."""
    for name in ("num_embeddings", "out_features"):
        size = getattr(embedding, name, None)
        if isinstance(size, int):
            return size
    return None


def _check_vocabulary(what: str, ids: Tensor, size: Optional[int]) -> None:
    if size is None or ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= size:
        raise ValueError(
            f"the {what} holds token id {high if high >= size else low}, outside the model's vocabulary of {size} "
            f"tokens (ids 0..{size - 1}); use the model's own tokenizer"
        )


def word_tokenizer(words: Sequence[str], *, bos: bool = True, eos: bool = False) -> Any:
    """A whitespace, word-level fast tokenizer over ``words``, built on the spot (no download).

    Ids ``0-3`` are ``<pad>``, ``<s>``, ``</s>``, ``<unk>``, then ``words`` in order (repeats dropped).
    Encoding with special tokens prepends ``<s>`` (``bos``) and appends ``</s>`` (``eos``). Meant for
    examples and tests with tiny random models.

    Example:
        >>> tokenizer = word_tokenizer(["fever", "cough"], eos=True)
        >>> tokenizer.encode("fever and cough"), len(tokenizer)
        ([1, 4, 3, 5, 2], 6)
    """
    with extra("huggingface"):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*special, *words]))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    template = " ".join([*(["<s>"] if bos else []), "$A", *(["</s>"] if eos else [])])
    backend.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
