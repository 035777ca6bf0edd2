"""Float32 relevance against float64 evaluations when ``A_bar`` is tiny (small gradients).

Chefer's rules form ``R = I + A_bar R`` and take the identity away again (the self term with
``exclude_self``, the ``R - I`` of the Eq. 8-9 normalisation). With ``A_bar`` entries of ``1e-8`` and below
(small logits, long sequences, deep models) float32 holds ``1 + x`` as ``1``, and a rule that adds the
identity first loses the increment. Every case below has such entries, and each float32 result must stay
within ``1e-4`` of the largest score of a float64 evaluation: the rules written out densely here, in float64,
on the same maps and gradients (nothing from ``captum_chefer.relevance`` makes an expected value), or, for
the presets whose score and layer norm are not written out here, the same model cast to float64.

The last cases run under ``torch.autocast("cpu", dtype=torch.bfloat16)``: the relevance must come out in
float32 and its math run in float32, so it equals the float64 rules on the very maps and gradients that
autocast produced (within ``1e-4``), and stays within 5% of the largest score of the float32 run. bfloat16
keeps 8 significant bits, ``2^-8 = 0.4%`` per rounding; the maps and gradients of a two-layer model carry a
few such roundings each, ``A_bar`` is their product and a score sums a few of them, so some ten roundings
(measured: at most 1.5% over a dozen batches and seeds of the PyHealth model, 0.4% for BART).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from captum.attr import TextTokenInput
from torch import Tensor

import captum_chefer.attribution as attribution
import captum_chefer.llm as llm
from captum_chefer import CheferAttribution, CheferLLMAttribution, HuggingFaceAdapter, PyHealthAdapter
from captum_chefer.relevance import (
    dense_encoder_decoder_relevance,
    dense_increment,
    encoder_decoder_rows,
    normalize_increment,
    pooling_rows,
    propagate_column_increment,
    propagate_cross_attention_increment,
    propagate_row,
    propagate_row_increment,
    propagate_self_attention_increment,
    propagate_weighted_increment,
    split_over_codes,
)
from tests.test_stacked_toys import A1, A2, A3, FullMapsStackedToy, StackedToy

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4  # of the largest score
BF16_TOLERANCE = 0.05  # autocast against the float32 run (see the module docstring)
TINY = 1e-8


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """``max |actual - expected| / max |expected|``, in float64; the reference must not be all zero."""
    expected, actual = expected.detach().double(), actual.detach().double()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = float(expected.abs().max())
    assert scale > 0, "an all-zero reference cannot tell anything apart"
    return float((actual - expected).abs().max()) / scale


def assert_close_to_largest(actual: Tensor, expected: Tensor, tolerance: float = TOLERANCE) -> None:
    error = relative_error(actual, expected)
    assert error <= tolerance, (
        f"float32 differs from float64 by {error:.2e} of the largest score (allowed {tolerance:.0e})"
    )


# ------------------------------------------------------------------------- float64 rules, written out here


def eye64(length: int) -> Tensor:
    return torch.eye(length, dtype=torch.float64)


def dense64(layers: list[Tensor]) -> Tensor:
    """``R = (I + A_n) ... (I + A_1)``, ``[B, L, L]``, in float64."""
    relevance = eye64(layers[0].shape[-1]).expand_as(layers[0])
    for weighted in layers:
        relevance = relevance + weighted.double() @ relevance
    return relevance


def norm64(relevance: Tensor) -> Tensor:
    """Eq. 8-9 on ``[T, T]``: ``(R - I) / rowsum(R - I) + I``; a zero row sum keeps the identity row."""
    eye = eye64(relevance.shape[-1])
    extra = relevance - eye
    total = extra.sum(dim=-1, keepdim=True)
    return torch.where(total != 0, extra / torch.where(total != 0, total, torch.ones_like(total)), 0.0) + eye


def a_bar64(attention: Tensor, gradient: Tensor, clamp: bool = True, reduction: str = "mean") -> Tensor:
    product = attention.double() * gradient.double()
    if clamp:
        product = product.clamp(min=0)
    return product.mean(dim=-3) if reduction == "mean" else product.amax(dim=-3)


def encoder_decoder64(encoder: list[Tensor], selfs: list[Tensor], crosses: list[Tensor]) -> Tensor:
    """``R_qi`` of one sample (``[Tq, Ti]``) after rules 6-10, from ``[Ti, Ti]``, ``[Tq, Tq]``, ``[Tq, Ti]`` maps."""
    inputs, queries = crosses[0].shape[-1], crosses[0].shape[-2]
    r_ii = eye64(inputs)
    for weighted in encoder:
        r_ii = r_ii + weighted.double() @ r_ii
    r_qq, r_qi = eye64(queries), torch.zeros(queries, inputs, dtype=torch.float64)
    for s, c in zip(selfs, crosses, strict=True):
        r_qq, r_qi = r_qq + s.double() @ r_qq, r_qi + s.double() @ r_qi
        r_qi = r_qi + norm64(r_qq).T @ c.double() @ norm64(r_ii)
    return r_qi


def tiny_layers(count: int, shape: tuple[int, ...], seed: int, lower: bool = False) -> list[Tensor]:
    """``count`` float64 ``A_bar`` of entries in ``[0, 1e-8)``, a third of them zero (lower-triangular: causal)."""
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(count):
        values = torch.rand(shape, generator=generator, dtype=torch.float64) * TINY
        values = values * (torch.rand(shape, generator=generator) > 1 / 3)
        layers.append(values.tril() if lower else values)
    return layers


# ------------------------------------------------------------------------- (a) the pure rules, A_bar ~ 1e-8


def test_the_row_increment_keeps_what_the_row_form_rounds_away():
    layers, pool = tiny_layers(4, (3, 6, 6), seed=0), torch.tensor([0, 3, 5])
    expected = (dense64(layers) - eye64(6))[torch.arange(3), pool]
    unit = pooling_rows(pool, 6)
    increment, row = torch.zeros(3, 6), unit
    for weighted in reversed(layers):
        increment = propagate_row_increment(increment, weighted.float(), unit)
        row = propagate_row(row, weighted.float())
    assert increment.dtype == torch.float32
    assert_close_to_largest(increment, expected)
    assert relative_error(row - unit, expected) > 0.1  # the case is hard: the row form loses the pooled entry


@pytest.mark.parametrize("reduction", ["mean", "max"])
@pytest.mark.parametrize("clamp", [True, False])
@pytest.mark.parametrize("pooled_row_alone", [False, True])
def test_the_weighted_increment_for_every_option(reduction, clamp, pooled_row_alone):
    generator = torch.Generator().manual_seed(1)
    batch, heads, length, depth = 3, 5, 6, 3
    maps = [
        torch.randn(batch, heads, length, length, generator=generator, dtype=torch.float64).softmax(-1)
        for _ in range(depth)
    ]
    grads = [
        torch.randn(batch, heads, length, length, generator=generator, dtype=torch.float64) * TINY
        for _ in range(depth)
    ]
    pool = torch.tensor([1, 0, 4])
    dense = dense64([a_bar64(a, g, clamp, reduction) for a, g in zip(maps, grads, strict=True)])
    expected = (dense - eye64(length))[torch.arange(batch), pool]
    options = {"clamp": clamp, "head_reduction": reduction}
    top_map, top_grad = maps[-1].float(), grads[-1].float()
    if pooled_row_alone:  # the last layer given for row p alone, [B, H, 1, L]
        rows = (torch.arange(batch), slice(None), pool)
        top_map, top_grad = top_map[rows].unsqueeze(2), top_grad[rows].unsqueeze(2)
    increment = propagate_weighted_increment(None, top_map, top_grad, pool, **options)
    for attention, gradient in zip(reversed(maps[:-1]), reversed(grads[:-1]), strict=True):
        increment = propagate_weighted_increment(increment, attention.float(), gradient.float(), pool, **options)
    assert_close_to_largest(increment, expected)


def test_the_dense_increment():
    layers = tiny_layers(4, (2, 5, 5), seed=2)
    assert_close_to_largest(dense_increment([w.float() for w in layers]), dense64(layers) - eye64(5))


def test_normalisation_and_row_sums_of_tiny_increments():
    layers = tiny_layers(3, (2, 5, 5), seed=3)
    relevance = dense64(layers)
    increment = dense_increment([w.float() for w in layers])
    expected = torch.stack([norm64(r) for r in relevance]) - eye64(5)
    assert_close_to_largest(normalize_increment(increment), expected)
    # sample 0 has two padded tokens: its real 3 x 3 block is normalised alone, padded rows and columns get 0
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    block = norm64(eye64(3) + (relevance[0] - eye64(5))[:3, :3]) - eye64(3)
    expected[0] = torch.nn.functional.pad(block, (0, 2, 0, 2))
    assert_close_to_largest(normalize_increment(increment, mask), expected)
    sums = torch.zeros(2, 5)
    for weighted in layers:
        sums = propagate_column_increment(sums, weighted.float(), torch.ones(2, 5))
    assert_close_to_largest(sums, (relevance - eye64(5)).sum(-1))


def test_one_decoder_layer_on_increments():
    d_ii = dense64(tiny_layers(2, (2, 4, 4), seed=4)) - eye64(4)
    (self_weighted,) = tiny_layers(1, (2, 3, 3), seed=5, lower=True)
    (cross,) = tiny_layers(1, (2, 3, 4), seed=6)
    r_qi = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * TINY
    d_qq, updated = propagate_self_attention_increment(torch.zeros(2, 3, 3), r_qi.float(), self_weighted.float())
    assert_close_to_largest(d_qq, self_weighted)
    assert_close_to_largest(updated, r_qi + self_weighted @ r_qi)
    crossed = propagate_cross_attention_increment(d_qq, updated, d_ii.float(), cross.float())
    r_qq, r_ii = self_weighted + eye64(3), d_ii + eye64(4)
    expected = torch.stack(
        [r_qi[b] + self_weighted[b] @ r_qi[b] + norm64(r_qq[b]).T @ cross[b] @ norm64(r_ii[b]) for b in range(2)]
    )
    assert_close_to_largest(crossed, expected)


@pytest.mark.parametrize("with_padding", [False, True])
def test_encoder_decoder_rows_and_dense_rules(with_padding):
    batch, inputs, queries = 2, 5, 4
    encoder = tiny_layers(2, (batch, inputs, inputs), seed=8)
    selfs = tiny_layers(3, (batch, queries, queries), seed=9, lower=True)
    crosses = tiny_layers(3, (batch, queries, inputs), seed=10)
    crosses[1] = None  # a decoder layer without cross-attention
    masks: dict[str, Tensor] = {}
    real_inputs, real_queries = [inputs, inputs], [queries, queries]
    if with_padding:  # sample 1: two padded inputs and one padded query
        real_inputs, real_queries = [inputs, inputs - 2], [queries, queries - 1]
        masks = {"input_mask": torch.arange(inputs) < torch.tensor(real_inputs).view(-1, 1),
                 "query_mask": torch.arange(queries) < torch.tensor(real_queries).view(-1, 1)}
    expected = []
    for b in range(batch):  # each sample's real block alone; a layer without cross-attention adds a zero A_bar
        ti, tq = real_inputs[b], real_queries[b]
        no_cross = torch.zeros(tq, ti, dtype=torch.float64)
        rows = encoder_decoder64([e[b, :ti, :ti] for e in encoder], [s[b, :tq, :tq] for s in selfs],
                                 [no_cross if c is None else c[b, :tq, :ti] for c in crosses])
        expected.append(torch.nn.functional.pad(rows, (0, inputs - ti, 0, queries - tq)))
    expected = torch.stack(expected)

    def low(layers):
        return [None if w is None else w.float() for w in layers]

    dense = dense_encoder_decoder_relevance(low(encoder), low(selfs), low(crosses), **masks)
    assert_close_to_largest(dense.r_qi, expected)
    for p in range(queries - 1):
        index = torch.tensor([p, p])
        rows = encoder_decoder_rows(low(encoder), low(selfs), low(crosses), index, **masks)
        assert_close_to_largest(rows.r_qi, expected[torch.arange(batch), index])


def test_the_code_split_of_a_tiny_relevance():
    generator = torch.Generator().manual_seed(11)
    visits = torch.rand(2, 3, generator=generator, dtype=torch.float64) * TINY
    shares = torch.randn(2, 3, 4, generator=generator, dtype=torch.float64) * 1e-12
    mask = torch.rand(2, 3, 4, generator=generator) > 0.3
    positive = (shares * mask).clamp(min=0)
    total = positive.sum(-1, keepdim=True)
    even = mask / mask.sum(-1, keepdim=True).clamp(min=1)
    expected = visits.unsqueeze(-1) * torch.where(total > 0, positive / torch.where(total > 0, total, 1.0), even)
    assert_close_to_largest(split_over_codes(visits.float(), shares.float(), mask), expected)


# ------------------------------------------------------------------------- CheferAttribution's paths on toys


def _collected_toy(layers, **kwargs):
    return StackedToy(layers, leaves=True, stacked=False, **kwargs)


def captured_rule(toy, x: Tensor, *, exclude_self: bool, clamp: bool = True, reduction: str = "mean") -> Tensor:
    """The dense rule in float64 on the float64 toy's maps and their autograd gradients, row ``p``."""
    captured = toy.attention_forward((x.double(),), ())
    maps = captured.attention["x"]
    grads = torch.autograd.grad(captured.logits.sum(), maps)
    pool = captured.pool_index["x"]
    relevance = dense64([a_bar64(a, g, clamp, reduction) for a, g in zip(maps, grads, strict=True)])
    row = relevance[torch.arange(len(pool)), pool]
    return row - eye64(row.shape[1])[pool] if exclude_self else row


@pytest.mark.parametrize("options", [{}, {"head_reduction": "max"}, {"clamp": False}, {"exclude_self": False}])
@pytest.mark.parametrize("propagation", ["row", "dense"])
@pytest.mark.parametrize(
    "make", [StackedToy, FullMapsStackedToy, _collected_toy], ids=["fused", "full-maps", "collected"]
)
def test_every_path_of_the_attribution_on_a_toy_with_tiny_gradients(make, propagation, options):
    """``x`` of ``1e-8`` makes every attention gradient ``1e-8`` times that of tests/test_stacked_toys.py."""
    x = torch.tensor([[1.0, -1.0, 2.0], [0.5, 2.0, -1.0]]) * TINY
    options = {"exclude_self": True, **options}
    expected = captured_rule(make([A1, A2, A3], dtype=torch.float64), x, exclude_self=options["exclude_self"],
                             clamp=options.get("clamp", True), reduction=options.get("head_reduction", "mean"))
    (scores,) = CheferAttribution(make([A1, A2, A3])).attribute((x,), propagation=propagation, **options)
    assert scores.dtype == torch.float32
    assert_close_to_largest(scores, expected)


# ------------------------------------------------------------------------- (b) a HuggingFace BERT classifier

IDS = torch.tensor([[2, 5, 6, 7, 8, 9, 3], [2, 10, 11, 3, 0, 0, 0], [2, 12, 13, 14, 6, 3, 0]])
MASK = (IDS != 0).long()


def _bert() -> torch.nn.Module:
    """A tiny random BERT classifier whose head is scaled by 1e-3: logits and gradients a thousandth."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=15, num_labels=3, hidden_size=16, num_hidden_layers=3,
                                     num_attention_heads=2, intermediate_size=32)
    model = transformers.BertForSequenceClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(1e-3)
        model.classifier.bias.mul_(1e-3)
    return model


class _NotStacked:
    """An adapter whose layers are reported as not a stack: the gradients are collected first (``_rows_collected``)."""

    def __init__(self, adapter) -> None:
        self.adapter = adapter

    def __call__(self, *args):
        return self.adapter(*args)

    def attention_forward(self, inputs, additional_forward_args, *, pooled_row_only=False):
        captured = self.adapter.attention_forward(inputs, additional_forward_args, pooled_row_only=pooled_row_only)
        return dataclasses.replace(captured, stacked=False)

    def relevance_to_inputs(self, relevance, inputs, additional_forward_args):
        return self.adapter.relevance_to_inputs(relevance, inputs, additional_forward_args)

    def probabilities(self, logits):
        return self.adapter.probabilities(logits)


def _bert_scores(model, target, *, collected: bool = False, preset: str = "pyhealth", **options) -> Tensor:
    adapter = HuggingFaceAdapter(model)
    tokens, args = adapter.captum_inputs({"input_ids": IDS, "attention_mask": MASK}, level="token")
    chefer = CheferAttribution(_NotStacked(adapter) if collected else adapter, preset=preset)
    (scores,) = chefer.attribute(tokens, target=target, additional_forward_args=args, **options)
    return scores


def _bert_rule64(model, target, *, exclude_self, reduction="mean") -> Tensor:
    """The dense rule in float64 on a float64 eager copy's returned attentions and their gradients."""
    twin = copy.deepcopy(model).double()
    twin.set_attn_implementation("eager")
    output = twin(input_ids=IDS, attention_mask=MASK, output_attentions=True)
    maps = list(output.attentions)
    grads = torch.autograd.grad(output.logits.gather(1, target.view(-1, 1)).sum(), maps)
    # BERT pools [CLS]
    row = dense64([a_bar64(a, g, reduction=reduction) for a, g in zip(maps, grads, strict=True)])[:, 0]
    if exclude_self:
        row = row - eye64(row.shape[1])[0]
    return (row * MASK).detach()


@pytest.mark.parametrize("options", [
    {}, {"exclude_self": True}, {"exclude_self": True, "head_reduction": "max"},
    {"exclude_self": True, "propagation": "dense"},
])
def test_bert_default_preset_against_the_float64_rule(options):
    model, target = _bert(), torch.tensor([1, 2, 0])
    scores = _bert_scores(model, target, **options)
    expected = _bert_rule64(model, target, exclude_self=options.get("exclude_self", False),
                            reduction=options.get("head_reduction", "mean"))
    if options.get("exclude_self"):
        assert float(expected.abs().max()) < 1e-6  # small gradients indeed
    assert_close_to_largest(scores, expected)


@pytest.mark.parametrize("collected", [False, True])
def test_bert_recommended_preset_against_the_model_in_float64(collected):
    """The deferred fused path (SDPA layers formed in the backward pass) and the collected one."""
    model, target = _bert(), torch.tensor([1, 2, 0])
    scores = _bert_scores(model, target, collected=collected, preset="recommended")
    expected = _bert_scores(copy.deepcopy(model).double(), target, collected=collected, preset="recommended")
    assert scores.dtype == torch.float32 and expected.dtype == torch.float64
    assert float(expected.abs().max()) < 1e-6  # small gradients indeed
    assert_close_to_largest(scores, expected)


# ------------------------------------------------------------------------- (c) BART and GPT-2 generating text

WORDS = [
    "the", "a", "patient", "has", "fever", "cough", "pain", "chest", "no", "and", "with", "mild", "severe", "left",
    "right", "denies", "reports",
]


@pytest.fixture(scope="module")
def tokenizer():
    return llm.word_tokenizer(WORDS)


def _bart(vocab: int, head_scale=None) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
        decoder_start_token_id=2, forced_bos_token_id=None, forced_eos_token_id=None, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=head_scale is None)
    model = transformers.BartForConditionalGeneration(config).eval()
    if head_scale is not None:
        with torch.no_grad():
            model.lm_head.weight.mul_(head_scale)
    return model


def _gpt2(vocab: int, head_scale=None) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4, pad_token_id=0,
                                     bos_token_id=1, eos_token_id=2, tie_word_embeddings=head_scale is None)
    model = transformers.GPT2LMHeadModel(config).eval()
    if head_scale is not None:
        with torch.no_grad():
            model.lm_head.weight.mul_(head_scale)
    return model


def _attribute_recording(monkeypatch, model, tokenizer, prompt, target, **options):
    """``CheferLLMAttribution.attribute`` and the maps and gradients it weighted: ``(attention, gradient, owners)``
    per layer, encoder layers first, then the decoder's self- and cross-attention layers."""
    calls = []
    weighted = llm._weighted

    def spy(attention, gradient, owners):
        calls.append((attention.detach().clone(), gradient.detach().clone(), owners.clone()))
        return weighted(attention, gradient, owners)

    monkeypatch.setattr(llm, "_weighted", spy)
    result = CheferLLMAttribution(model, tokenizer).attribute(
        TextTokenInput(prompt, tokenizer), target=target, **options
    )
    monkeypatch.setattr(llm, "_weighted", weighted)
    return result, calls


def _token_bar64(call, j: int) -> Tensor:
    attention, gradient, owners = call
    return a_bar64(attention[int(owners[j])], gradient[j, int(owners[j])])


def _bart_rule64(calls, layers: int) -> Tensor:
    encoder, selfs, crosses = calls[:layers], calls[layers : 2 * layers], calls[2 * layers :]
    rows = []
    for j in range(calls[0][1].shape[0]):
        r_qi = encoder_decoder64([_token_bar64(c, j) for c in encoder], [_token_bar64(c, j) for c in selfs],
                                 [_token_bar64(c, j) for c in crosses])
        rows.append(r_qi[j])
    return torch.stack(rows)


def _gpt2_rule64(calls, prompt_length: int) -> Tensor:
    rows = []
    for j in range(calls[0][1].shape[0]):
        relevance = dense64([_token_bar64(c, j).unsqueeze(0) for c in calls])[0]
        p = prompt_length - 1 + j
        rows.append((relevance[p] - eye64(relevance.shape[0])[p])[:prompt_length])
    return torch.stack(rows)


PROMPT, TARGET = "patient reports severe chest pain and mild cough", "chest pain cough"


@pytest.mark.parametrize("head_scale", [None, 1e-3])
@pytest.mark.parametrize("chunk_size", [16, 1])
def test_bart_against_the_float64_rules_on_the_same_maps(monkeypatch, tokenizer, head_scale, chunk_size):
    """A 2-layer BART's own small gradients already give ``A_bar`` of ``1e-7`` in its encoder; a head scaled by
    ``1e-3`` gives ``1e-10``."""
    model = _bart(len(tokenizer), head_scale)
    result, calls = _attribute_recording(monkeypatch, model, tokenizer, PROMPT, TARGET, chunk_size=chunk_size)
    if chunk_size == 1:  # one backward pass per output token, each weighting every layer: regroup per layer
        tokens = len(result.output_tokens)
        per_token = len(calls) // tokens
        calls = [(calls[i][0], torch.cat([calls[k * per_token + i][1] for k in range(tokens)]),
                  torch.cat([calls[k * per_token + i][2] for k in range(tokens)])) for i in range(per_token)]
    assert result.token_attr.dtype == torch.float32
    assert_close_to_largest(result.token_attr, _bart_rule64(calls, layers=2))


@pytest.mark.parametrize("head_scale", [None, 1e-3])
def test_gpt2_against_the_float64_rule_on_the_same_maps(monkeypatch, tokenizer, head_scale):
    model = _gpt2(len(tokenizer), head_scale)
    result, calls = _attribute_recording(monkeypatch, model, tokenizer, PROMPT, TARGET)
    prompt_length = len(result.input_tokens)
    expected = _gpt2_rule64(calls, prompt_length)
    if head_scale is not None:
        assert float(expected.abs().max()) < 1e-5
    assert_close_to_largest(result.token_attr, expected)


# ------------------------------------------------------------------------- (d) a PyHealth Transformer


@pytest.fixture(scope="module")
def pyhealth_model_and_batch():
    """The toy PyHealth ``Transformer`` (a flat and a nested stream), its output layer scaled by ``1e-7``."""
    from captum_chefer.synthetic import toy_model_and_batch

    model, batch = toy_model_and_batch(batch_size=4)
    model.eval()
    with torch.no_grad():
        model.fc.weight.mul_(1e-7)
        model.fc.bias.mul_(1e-7)
    return model, batch


def _pyhealth_scores(model, batch, preset="pyhealth", **options) -> tuple[Tensor, ...]:
    adapter = PyHealthAdapter(model)
    inputs, args = adapter.captum_inputs(batch, level="token")
    target = adapter.captum_target(batch)
    return CheferAttribution(adapter, preset=preset).attribute(
        inputs, target=target, additional_forward_args=args, **options
    )


@pytest.mark.parametrize("options", [
    {}, {"exclude_self": True}, {"preset": "recommended"}, {"preset": "recommended", "propagation": "dense"},
    {"preset": "recommended", "head_reduction": "max"},
])
def test_pyhealth_transformer_against_the_model_in_float64(pyhealth_model_and_batch, options):
    model, batch = pyhealth_model_and_batch
    scores = _pyhealth_scores(model, batch, **options)
    expected = _pyhealth_scores(copy.deepcopy(model).double(), batch, **options)
    for stream, (ours, reference) in enumerate(zip(scores, expected, strict=True)):
        assert ours.dtype == torch.float32 and reference.dtype == torch.float64
        if options.get("preset") == "recommended" or options.get("exclude_self"):
            assert float(reference.abs().max()) < 1e-7, stream  # small gradients indeed
        assert_close_to_largest(ours, reference)


# ------------------------------------------------------------------------- (e) bfloat16 autocast on the CPU


def _autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("options", [{"exclude_self": True}, {"preset": "recommended", "code_split": "uniform"}])
def test_pyhealth_transformer_under_autocast(pyhealth_model_and_batch, options):
    """Float32 relevance from bfloat16 maps, close to the float32 run. (Not with ``code_split="gradient"``: its
    shares ``g . e`` are sums that cancel, and a bfloat16 backward pass moves them by far more than 8 bits
    of their terms; on the nested stream its split differed by up to 45% of the largest score. That is the
    model's bfloat16 gradient, not the relevance's arithmetic.)"""
    model, batch = pyhealth_model_and_batch
    with _autocast():
        scores = _pyhealth_scores(model, batch, **options)
    reference = _pyhealth_scores(model, batch, **options)
    for ours, full in zip(scores, reference, strict=True):
        assert ours.dtype == torch.float32
        assert_close_to_largest(ours, full, BF16_TOLERANCE)


@pytest.mark.parametrize("propagation", ["row", "dense"])
@pytest.mark.parametrize("make", [StackedToy, _collected_toy], ids=["fused", "collected"])
def test_the_relevance_math_runs_in_float32_under_autocast(monkeypatch, make, propagation):
    """Under autocast the toy's products run in bfloat16, so its gradients hold 8 bits; the relevance computed
    from them must equal the float64 rule on those very gradients (the backward pass's hooks keep autocast on)."""
    calls = []
    propagate = attribution._propagate

    def spy(increment, attention, grad, depth, key, streams, pool_index, reduce):
        calls.append((attention.detach().clone(), grad.detach().clone(), pool_index[key].clone()))
        return propagate(increment, attention, grad, depth, key, streams, pool_index, reduce)

    monkeypatch.setattr(attribution, "_propagate", spy)
    gradients = []
    original = attribution._gradients

    def gradients_spy(explained, streams, reduce, extra=()):
        out = original(explained, streams, reduce, extra)
        gradients.append((streams, out[0]))
        return out

    monkeypatch.setattr(attribution, "_gradients", gradients_spy)
    x = torch.tensor([[1.0, -1.0, 2.0], [0.5, 2.0, -1.0]]) * TINY
    toy = make([A1, A2, A3])
    with _autocast():
        (scores,) = CheferAttribution(toy).attribute((x,), propagation=propagation, exclude_self=True)
    assert scores.dtype == torch.float32
    pool = torch.tensor(toy.pools["x"])
    if propagation == "row":  # the layers as the propagation saw them, from the last one down
        maps, grads = [c[0] for c in reversed(calls)], [c[1] for c in reversed(calls)]
    else:
        ((streams, collected),) = gradients
        maps, grads = [a.detach() for a in streams["x"]], collected["x"]
    assert all(g.abs().max() > 0 for g in grads)
    if maps[-1].shape[-2] == 1:  # the last layer for the pooled row alone: the rule reads nothing else of it
        full = torch.zeros(*maps[-1].shape[:2], 3, 3, dtype=maps[-1].dtype)
        full_grad = torch.zeros_like(full)
        full[torch.arange(2), :, pool], full_grad[torch.arange(2), :, pool] = maps[-1][:, :, 0], grads[-1][:, :, 0]
        maps[-1], grads[-1] = full, full_grad
    relevance = dense64([a_bar64(a, g) for a, g in zip(maps, grads, strict=True)])
    expected = relevance[torch.arange(2), pool] - eye64(3)[pool]
    assert_close_to_largest(scores, expected)


def test_bart_under_autocast(monkeypatch, tokenizer):
    model = _bart(len(tokenizer), 1e-3)
    with _autocast():
        result, calls = _attribute_recording(monkeypatch, model, tokenizer, PROMPT, TARGET)
    assert calls[0][0].dtype == torch.bfloat16  # autocast did reach the model
    assert result.token_attr.dtype == torch.float32
    assert_close_to_largest(result.token_attr, _bart_rule64(calls, layers=2))  # the rules in float32 at least
    full, _ = _attribute_recording(monkeypatch, model, tokenizer, PROMPT, TARGET)
    assert_close_to_largest(result.token_attr, full.token_attr, BF16_TOLERANCE)
