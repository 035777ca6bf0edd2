"""CheferAttribution on deferred attention layers (SDPA forward; each layer's maps and their gradients formed
when the backward pass reaches it, a few heads at a time), for every option, against the rule applied by
hand to an eager copy's returned attentions and their autograd gradients.

The models have five heads: the relevance forms a deferred layer's maps ``ceil(5 / 4) = 2`` heads at a
time, so the groups are uneven (``[0:2]``, ``[2:4]``, ``[4:5]``) and a wrong group bound or group weight
shows. GPT-2 with right padding pools a different position in every sample, BERT pools its first token.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re

import pytest
import torch
import transformers

from captum_chefer import CheferAttribution, HuggingFaceAdapter
from captum_chefer.capture import DeferredHuggingFaceAttention

IDS = torch.tensor([[2, 5, 9, 11, 7, 3, 6], [2, 8, 6, 3, 0, 0, 0], [2, 12, 13, 14, 10, 3, 0]])
MASK = (IDS != 0).long()
TARGET = torch.tensor([1, 2, 0])


def _model(family: str) -> torch.nn.Module:
    torch.manual_seed(11)
    if family == "bert":
        config = transformers.BertConfig(vocab_size=16, hidden_size=20, num_hidden_layers=3, num_attention_heads=5,
                                         intermediate_size=24, num_labels=3)
        return transformers.BertForSequenceClassification(config).eval()
    config = transformers.GPT2Config(vocab_size=16, n_embd=20, n_layer=3, n_head=5, n_positions=16, num_labels=3,
                                     pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return transformers.GPT2ForSequenceClassification(config).eval()


def _pools(family: str) -> torch.Tensor:
    return torch.zeros(3, dtype=torch.long) if family == "bert" else MASK.sum(1) - 1  # right padding: last real token


def _eager(model: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each layer's attention ``[B, H, L, L]`` returned by an eager copy, and its gradient for TARGET."""
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("eager")
    output = twin(input_ids=IDS, attention_mask=MASK, output_attentions=True)
    maps = list(output.attentions)
    grads = torch.autograd.grad(output.logits.gather(1, TARGET.view(-1, 1)).sum(), maps)
    return [a.detach() for a in maps], list(grads)


def _rule(maps, grads, pools, *, use_gradients=True, clamp=True, head_reduction="mean", layers=None, exclude_self=False,
          propagation="row"):
    """Chefer's rule written out densely: R = I, R += reduce_h(clamp(A_h * dA_h)) R per layer, row ``p`` of R."""
    length = maps[0].shape[-1]
    relevance = torch.eye(length, dtype=maps[0].dtype).expand(len(pools), length, length)
    chosen = list(zip(maps, grads, strict=True))[-layers:] if layers else list(zip(maps, grads, strict=True))
    for attention, grad in chosen:
        weighted = attention * grad if use_gradients else attention
        weighted = weighted.clamp(min=0) if clamp else weighted
        weighted = weighted.mean(1) if head_reduction == "mean" else weighted.amax(1)
        relevance = relevance + weighted @ relevance
    rows = relevance[torch.arange(len(pools)), pools]
    if exclude_self:
        rows = rows - torch.nn.functional.one_hot(pools, length)
    return rows * MASK


OPTIONS = [
    dict(zip(("use_gradients", "clamp", "head_reduction"), values, strict=True))
    for values in itertools.product((True, False), (True, False), ("mean", "max"))
] + [
    {"layers": 1}, {"layers": 2, "head_reduction": "max"},
    {"exclude_self": True}, {"exclude_self": True, "clamp": False},
    {"propagation": "dense"}, {"propagation": "dense", "head_reduction": "max", "clamp": False},
    {"propagation": "dense", "use_gradients": False}, {"propagation": "dense", "layers": 2},
]


class _NotStacked:
    """A user's AttentionModel that reports its layers as not a stack: the gradients are collected first."""

    def __init__(self, adapter: HuggingFaceAdapter) -> None:
        self.adapter = adapter

    def __call__(self, *args):
        return self.adapter(*args)

    def attention_forward(self, inputs, additional_forward_args, *, pooled_row_only=False):
        captured = self.adapter.attention_forward(inputs, additional_forward_args, pooled_row_only=pooled_row_only)
        return dataclasses.replace(captured, stacked=False)

    def relevance_to_inputs(self, relevance, inputs, additional_forward_args):
        return self.adapter.relevance_to_inputs(relevance, inputs, additional_forward_args)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_every_option_on_deferred_layers_equals_the_rule_on_the_eager_maps(family):
    model = _model(family)
    maps, grads = _eager(model)
    assert maps[0].shape == (3, 5, 7, 7)
    adapter = HuggingFaceAdapter(model)
    tokens, args = adapter.captum_inputs({"input_ids": IDS, "attention_mask": MASK}, level="token")
    captured = adapter.attention_forward(tokens, args)  # the layers really are deferred
    assert all(isinstance(layer, DeferredHuggingFaceAttention) for layer in captured.attention["input_ids"])
    torch.testing.assert_close(captured.pool_index["input_ids"], _pools(family))
    explainer = CheferAttribution(adapter)
    for options in OPTIONS:
        (scores,) = explainer.attribute(tokens, target=TARGET, additional_forward_args=args, **options)
        expected = _rule(maps, grads, _pools(family), **options)
        torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4, msg=f"{family} {options}")
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("options", [{}, {"head_reduction": "max"}])
def test_on_the_cpu_a_layers_maps_are_formed_a_group_of_heads_at_a_time(monkeypatch, options):
    """The memory bound: never more than ceil(5 / 4) = 2 heads' maps at once (an accelerator takes all five)."""
    seen = []
    original = DeferredHuggingFaceAttention.probabilities

    def spy(self, heads=None, rows=None):
        seen.append(heads)
        return original(self, heads, rows)

    monkeypatch.setattr(DeferredHuggingFaceAttention, "probabilities", spy)
    adapter = HuggingFaceAdapter(_model("bert"))
    tokens, args = adapter.captum_inputs({"input_ids": IDS, "attention_mask": MASK}, level="token")
    CheferAttribution(adapter).attribute(tokens, target=TARGET, additional_forward_args=args, **options)
    assert seen == [slice(0, 2), slice(2, 4), slice(4, 5)] * 3  # three layers


@pytest.mark.parametrize(
    "options", [{}, {"use_gradients": False}, {"clamp": False, "head_reduction": "max"}, {"layers": 2}]
)
def test_deferred_layers_of_a_model_that_is_not_a_stack(options):
    """stacked=False: every gradient first, then the row recursion, on maps formed from the deferred layers."""
    model = _model("gpt2")
    maps, grads = _eager(model)
    adapter = HuggingFaceAdapter(model)
    tokens, args = adapter.captum_inputs({"input_ids": IDS, "attention_mask": MASK}, level="token")
    (scores,) = CheferAttribution(_NotStacked(adapter)).attribute(
        tokens, target=TARGET, additional_forward_args=args, **options
    )
    torch.testing.assert_close(scores, _rule(maps, grads, _pools("gpt2"), **options), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_a_bfloat16_model_gets_float32_relevance(family):
    """The maps are upcast before they are weighted and the pooled row is kept in float32 (deliberately: bfloat16
    would round small increments away): bfloat16 in, float32 out, close to the rule on the eager copy's
    bfloat16 maps (evaluated in float64)."""
    model = _model(family).to(torch.bfloat16)
    maps, grads = _eager(model)
    adapter = HuggingFaceAdapter(model)
    tokens, args = adapter.captum_inputs({"input_ids": IDS, "attention_mask": MASK}, level="token")
    for options in ({}, {"head_reduction": "max"}):
        (scores,) = CheferAttribution(adapter).attribute(tokens, target=TARGET, additional_forward_args=args, **options)
        assert scores.dtype == torch.float32, options
        expected = _rule([a.double() for a in maps], [g.double() for g in grads], _pools(family), **options)
        torch.testing.assert_close(scores.double(), expected.double(), atol=0.05, rtol=0.05, msg=str(options))


def test_too_many_layers_names_every_stream_too_shallow():
    from tests.test_stacked_toys import A1, A2, StackedToy, X

    toy = StackedToy([A1, A2], streams=("a", "b"))
    inputs = (torch.tensor([X, X]), torch.tensor([X, X]))
    with pytest.raises(ValueError, match="^" + re.escape(
        "layers=3 asks for more attention layers than the model has ('a' has 2, 'b' has 2); pass layers between 1 "
        "and 2, or None for all of them") + "$"):
        CheferAttribution(toy).attribute(inputs, layers=3)
