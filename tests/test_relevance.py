"""Hand-computed relevance on tiny cases, without PyHealth.

The toy model computes ``logit = (A2 @ A1 @ x)[pool]`` with fixed attention matrices, so the gradients
are known in closed form: ``dlogit/dA2 = e_pool (A1 x)^T`` and ``dlogit/dA1 = A2[pool]^T x^T``. Every
expected number below was worked out by hand from those formulas (the arithmetic is in the comments).
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from torch import Tensor

from captum_chefer import CheferAttribution
from captum_chefer.attribution import AttentionForward, AttentionModel
from captum_chefer.relevance import dense_relevance, pooling_rows, propagate_row, read_rows, weighted_attention

A1_2 = [[0.5, 0.5], [0.25, 0.75]]
A2_2 = [[0.6, 0.4], [0.5, 0.5]]
A1_3 = [[0.5, 0.25, 0.25], [0.0, 1.0, 0.0], [0.2, 0.3, 0.5]]
A2_3 = [[0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]


class TwoLayerToy(torch.nn.Module):
    """An AttentionModel with two fixed single-head attention layers over a [B, L] input."""

    def __init__(self, a1: list, a2: list, pool: int = 0) -> None:
        super().__init__()
        self.a1, self.a2, self.pool = a1, a2, pool

    def _attention(self, batch: int) -> tuple[Tensor, Tensor]:
        def make(a: list) -> Tensor:
            return torch.tensor(a).expand(batch, 1, len(a), len(a)).clone().requires_grad_(True)

        return make(self.a1), make(self.a2)

    def forward(self, x: Tensor) -> Tensor:
        a1, a2 = self._attention(x.shape[0])
        return (a2[:, 0] @ a1[:, 0] @ x.unsqueeze(-1))[:, self.pool]

    def attention_forward(
        self, inputs: tuple[Tensor, ...], additional_forward_args: tuple, *, pooled_row_only: bool = False
    ) -> AttentionForward:
        (x,) = inputs
        a1, a2 = self._attention(x.shape[0])
        if pooled_row_only:  # the last layer for the pooled position alone: [B, 1, 1, L]
            a2 = a2.detach()[:, :, self.pool : self.pool + 1].clone().requires_grad_(True)
            logits = (a2[:, 0] @ a1[:, 0] @ x.unsqueeze(-1))[:, 0]
        else:
            logits = (a2[:, 0] @ a1[:, 0] @ x.unsqueeze(-1))[:, self.pool]
        pool = torch.full((x.shape[0],), self.pool, dtype=torch.long)
        # The two layers are independent tensors, not a stack: gradients are collected, then propagated.
        return AttentionForward(logits=logits, attention={"x": [a1, a2]}, pool_index={"x": pool}, stacked=False)

    def relevance_to_inputs(
        self, relevance: Mapping[str, Tensor], inputs: tuple[Tensor, ...], additional_forward_args: tuple
    ) -> tuple[Tensor, ...]:
        return (relevance["x"],)


class FullMapsToy(TwoLayerToy):
    """The same model, always returning every layer's full attention map (also allowed)."""

    def attention_forward(self, inputs, additional_forward_args, *, pooled_row_only=False):
        return super().attention_forward(inputs, additional_forward_args)


class OlderSignatureToy(TwoLayerToy):
    """An AttentionModel written before ``pooled_row_only`` existed: called without it."""

    def attention_forward(self, inputs, additional_forward_args):
        return super().attention_forward(inputs, additional_forward_args)


TOYS = [TwoLayerToy, FullMapsToy, OlderSignatureToy]


def test_toy_model_implements_the_interface():
    assert isinstance(TwoLayerToy(A1_2, A2_2), AttentionModel)
    x = torch.tensor([[1.0, 2.0]])
    pooled = TwoLayerToy(A1_2, A2_2, pool=1).attention_forward((x,), (), pooled_row_only=True)
    assert pooled.attention["x"][1].shape == (1, 1, 1, 2)
    torch.testing.assert_close(pooled.logits, TwoLayerToy(A1_2, A2_2, pool=1)(x))


@pytest.mark.parametrize("toy", TOYS)
def test_two_tokens_two_layers_by_hand(toy):
    # A1 x = [1.5, 1.75]; grad A2 = [[1.5, 1.75], [0, 0]]; A_bar2 = [[.9, .7], [0, 0]]
    # grad A1 = [[.6, 1.2], [.4, .8]]; A_bar1 = [[.3, .6], [.1, .6]]
    # r = [1, 0] -> [1.9, .7] -> [1.9 + .57 + .07, .7 + 1.14 + .42] = [2.54, 2.26]
    x = torch.tensor([[1.0, 2.0]])
    out = CheferAttribution(toy(A1_2, A2_2)).attribute(x, target=0)
    torch.testing.assert_close(out, torch.tensor([[2.54, 2.26]]))
    out = CheferAttribution(toy(A1_2, A2_2)).attribute(x, target=0, exclude_self=True)
    torch.testing.assert_close(out, torch.tensor([[1.54, 2.26]]))


@pytest.mark.parametrize(
    "options, expected",
    [
        # A1 x = [.75, -1, .9]; A_bar2 row 0 = clamp([.15, -.3, .45]) = [.15, 0, .45]
        # A_bar1 = clamp(A1 * A2[0]^T x^T) = [[.1, 0, .1], [0, 0, 0], [.1, 0, .5]]
        # r = [1.15, 0, .45] -> + 1.15 [.1, 0, .1] + .45 [.1, 0, .5] = [1.31, 0, .79]
        ({}, [1.31, 0.0, 0.79]),
        # unclamped: r = [1.15, -.3, .45]; r A_bar1 = [.16, -.035, .34]
        ({"clamp": False}, [1.31, -0.335, 0.79]),
        # attention alone: r = [1.2, .3, .5]; r A1 = [.7, .75, .55]
        ({"use_gradients": False}, [1.9, 1.05, 1.05]),
        # the last layer alone
        ({"layers": 1}, [1.15, 0.0, 0.45]),
        ({"exclude_self": True}, [0.31, 0.0, 0.79]),
    ],
)
@pytest.mark.parametrize("toy", TOYS)
def test_three_tokens_variants_by_hand(options, expected, toy):
    x = torch.tensor([[1.0, -1.0, 2.0]])
    for propagation in ("row", "dense"):
        out = CheferAttribution(toy(A1_3, A2_3)).attribute(x, target=0, propagation=propagation, **options)
        torch.testing.assert_close(out, torch.tensor([expected]), msg=f"{propagation} {options}")


@pytest.mark.parametrize("toy", TOYS)
def test_pooling_another_position_by_hand(toy):
    # pool = 1: A1 x = [1.5, 1.75]; grad A2 = [[0, 0], [1.5, 1.75]]; A_bar2 = [[0, 0], [.75, .875]]
    # grad A1 = A2[1]^T x^T = [[.5, 1], [.5, 1]]; A_bar1 = [[.25, .5], [.125, .75]]
    # r = [0, 1] -> [.75, 1.875] -> [.75 + .1875 + .234375, 1.875 + .375 + 1.40625] = [1.171875, 3.65625]
    x = torch.tensor([[1.0, 2.0]])
    for propagation in ("row", "dense"):
        out = CheferAttribution(toy(A1_2, A2_2, pool=1)).attribute(x, target=0, propagation=propagation)
        torch.testing.assert_close(out, torch.tensor([[1.171875, 3.65625]]))


def test_weighted_attention_heads_mean_and_max():
    attention = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [0.5, 0.5]]]])  # [1, 2 heads, 2, 2]
    gradient = torch.tensor([[[[2.0, 1.0], [-1.0, 4.0]], [[3.0, 3.0], [2.0, -2.0]]]])
    # products: head 0 [[2, 0], [-.5, 2]] -> clamp [[2, 0], [0, 2]]; head 1 [[0, 3], [1, -1]] -> [[0, 3], [1, 0]]
    mean = weighted_attention(attention, gradient)
    torch.testing.assert_close(mean, torch.tensor([[[1.0, 1.5], [0.5, 1.0]]]))
    top = weighted_attention(attention, gradient, head_reduction="max")
    torch.testing.assert_close(top, torch.tensor([[[2.0, 3.0], [1.0, 2.0]]]))
    with pytest.raises(ValueError, match="head_reduction"):
        weighted_attention(attention, gradient, head_reduction="median")


def test_row_recursion_equals_dense_product():
    torch.manual_seed(0)
    layers = [torch.rand(3, 5, 5) for _ in range(4)]
    pool = torch.tensor([0, 4, 2])
    row = pooling_rows(pool, 5)
    for weighted in reversed(layers):
        row = propagate_row(row, weighted)
    torch.testing.assert_close(row, read_rows(dense_relevance(layers), pool))


def test_fused_path_refuses_attention_that_is_not_a_stack():
    class Mislabelled(TwoLayerToy):
        def attention_forward(self, inputs, additional_forward_args, *, pooled_row_only=False):
            captured = super().attention_forward(inputs, additional_forward_args, pooled_row_only=pooled_row_only)
            captured.stacked = True  # wrong: the fused path would read layer 1 before layer 2
            return captured

    with pytest.raises(RuntimeError, match="not a stack"):
        CheferAttribution(Mislabelled(A1_2, A2_2)).attribute(torch.tensor([[1.0, 2.0]]), target=0)


def test_missing_gradient_contributes_nothing():
    attention = torch.rand(2, 3, 4, 4)
    assert torch.equal(weighted_attention(attention, None), torch.zeros(2, 4, 4))


def test_only_the_last_layer_may_be_the_pooled_row_and_only_when_asked():
    class RowTooLow(TwoLayerToy):
        def attention_forward(self, inputs, additional_forward_args, *, pooled_row_only=False):
            captured = super().attention_forward(inputs, additional_forward_args, pooled_row_only=pooled_row_only)
            captured.attention["x"].reverse()  # the pooled row is now the first layer
            return captured

    class AlwaysRow(TwoLayerToy):
        def attention_forward(self, inputs, additional_forward_args, *, pooled_row_only=False):
            return super().attention_forward(inputs, additional_forward_args, pooled_row_only=True)

    x = torch.tensor([[1.0, 2.0]])
    with pytest.raises(ValueError, match="layer 0, has shape"):
        CheferAttribution(RowTooLow(A1_2, A2_2)).attribute(x, target=0)
    with pytest.raises(ValueError, match=r"layer 1, has shape \(1, 1, 1, 2\)"):
        CheferAttribution(AlwaysRow(A1_2, A2_2)).attribute(x, target=0, propagation="dense")
