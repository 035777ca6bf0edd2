"""Hand-computed relevance on stacked, multi-head toys: the fused path (``stacked=True``) and head averaging.

The toy is a stack of linear "attention" layers over one number per token: ``h_k = M_k h_{k-1}`` with
``M_k = mean_h A_kh`` over two heads of fixed probabilities, ``h_0 = x``, and the logit ``h_n[p]`` of the
pooled position ``p``. Each layer's attention is made a function of the output of the layer below with
slope zero (``A_k + 0 * sum(h_{k-1})``), so autograd reaches the layers from the last one down, as in a
transformer, while their values stay the hand-picked matrices. The gradients are then known in closed form:

    dlogit/dA_kh = (1/H) u_k^T h_{k-1}^T,   u_k = e_p^T M_n ... M_{k+1}   (u_n = e_p)

Every expected number below was worked out by hand from that formula; the arithmetic is in the comments.
The matrices, for all tests (rows are queries):

    A1 heads  a: [[.5, .25, .25], [0, 1, 0], [.2, .3, .5]]     b: [[0, .5, .5], [.5, .5, 0], [1, 0, 0]]
    A2 heads  a: [[.2, .3, .5], [1, 0, 0], [0, 0, 1]]          b: [[.6, .4, 0], [0, .5, .5], [.5, 0, .5]]
    A3 heads  a: [[.5, .5, 0], [.25, .25, .5], [0, .5, .5]]    b: [[1, 0, 0], [0, 0, 1], [.5, .25, .25]]
    M1 = [[.25, .375, .375], [.25, .75, 0], [.6, .15, .25]]    M2 = [[.4, .35, .25], [.5, .25, .25], [.25, 0, .75]]
    M3 = [[.75, .25, 0], [.125, .125, .75], [.25, .375, .375]]
    x = [1, -1, 2]:  h1 = M1 x = [.625, -.5, .95]

Both samples of a batch hold ``x``; sample 0 pools position 0 and sample 1 position 2.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest
import torch
from torch import Tensor

from captum_chefer import CheferAttribution
from captum_chefer.attribution import AttentionForward, AttentionModel

A1 = [[[0.5, 0.25, 0.25], [0.0, 1.0, 0.0], [0.2, 0.3, 0.5]], [[0.0, 0.5, 0.5], [0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]]
A2 = [[[0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], [[0.6, 0.4, 0.0], [0.0, 0.5, 0.5], [0.5, 0.0, 0.5]]]
A3 = [[[0.5, 0.5, 0.0], [0.25, 0.25, 0.5], [0.0, 0.5, 0.5]], [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.25, 0.25]]]
X = [1.0, -1.0, 2.0]
POOLS = [0, 2]


class StackedToy(torch.nn.Module):
    """An AttentionModel whose attention layers form a stack (``stacked=True``: the fused path).

    Args:
        layers: per layer, its heads' attention matrices ``[H][L][L]``.
        pools: the pooled position of each sample, or per stream name.
        classes: 1 (the logit ``h_n[p]``) or 2 (``[h_n[p], -h_n[p]]``: class 1 flips every gradient).
        three_dim: return single-head maps as ``[B, L, L]`` (and ``[B, 1, L]`` for the pooled row).
        streams: names of the attention streams, each fed by its own input; all but ``unused`` add to the logit.
        unused: streams whose attention the logit never reads (no gradient reaches them).
        dtype: the dtype of the attention maps and the logits.
        leaves: make every layer's attention an independent leaf instead (not a stack, whatever ``stacked`` says).
        stacked: what ``attention_forward`` reports.
    """

    def __init__(
        self, layers: Sequence, pools: Sequence[int] | Mapping[str, Sequence[int]] = POOLS, *, classes: int = 1,
        three_dim: bool = False, streams: Sequence[str] = ("x",), unused: Sequence[str] = (),
        dtype: torch.dtype = torch.float32, leaves: bool = False, stacked: bool = True,
    ) -> None:
        super().__init__()
        self.leaves, self.stacked = leaves, stacked
        self.layers, self.classes, self.three_dim = layers, classes, three_dim
        self.streams, self.unused, self.dtype = list(streams), set(unused), dtype
        self.pools = {key: list(pools[key] if isinstance(pools, Mapping) else pools) for key in self.streams}

    def _stream(self, x: Tensor, pool: Tensor, pooled_row_only: bool) -> tuple[Tensor, list[Tensor]]:
        batch = x.shape[0]
        h, maps = x, []
        for depth, heads in enumerate(self.layers):
            base = torch.tensor(heads, dtype=self.dtype).expand(batch, -1, -1, -1)  # [B, H, L, L]
            if depth == 0 or self.leaves:
                a = base.clone().requires_grad_(True)
            else:  # a function of the layer below (slope zero): autograd reaches it before that layer
                a = base + 0 * h.sum(dim=1).view(-1, 1, 1, 1)
            row_only = pooled_row_only and depth == len(self.layers) - 1
            if row_only:
                a = a[torch.arange(batch), :, pool].unsqueeze(2)  # [B, H, 1, L]: row p of each head
            mixed = a.mean(dim=1)
            if self.three_dim:
                assert a.shape[1] == 1, "three_dim needs single-head layers"
                a = a[:, 0]
                mixed = a
            h = (mixed @ h.unsqueeze(-1)).squeeze(-1)
            maps.append(a)
        score = h[:, 0] if row_only else h[torch.arange(batch), pool]
        return score, maps

    def _run(self, inputs: tuple[Tensor, ...], pooled_row_only: bool) -> AttentionForward:
        score = torch.zeros(inputs[0].shape[0], dtype=self.dtype)
        attention, pool_index = {}, {}
        for key, x in zip(self.streams, inputs, strict=True):
            pool_index[key] = torch.tensor(self.pools[key])
            s, attention[key] = self._stream(x.to(self.dtype), pool_index[key], pooled_row_only)
            if key not in self.unused:
                score = score + s
        logits = torch.stack([score, -score], dim=1) if self.classes == 2 else score.unsqueeze(1)
        return AttentionForward(logits=logits, attention=attention, pool_index=pool_index, stacked=self.stacked)

    def forward(self, *inputs: Tensor) -> Tensor:
        return self._run(inputs, False).logits

    def attention_forward(
        self, inputs: tuple[Tensor, ...], additional_forward_args: tuple, *, pooled_row_only: bool = False
    ) -> AttentionForward:
        return self._run(inputs, pooled_row_only)

    def relevance_to_inputs(
        self, relevance: Mapping[str, Tensor], inputs: tuple[Tensor, ...], additional_forward_args: tuple
    ) -> tuple[Tensor, ...]:
        return tuple(relevance[key] for key in self.streams)


class FullMapsStackedToy(StackedToy):
    """The same stack, always returning every layer's full attention map (also allowed)."""

    def attention_forward(self, inputs, additional_forward_args, *, pooled_row_only=False):
        return self._run(inputs, False)


TOYS = [StackedToy, FullMapsStackedToy]
PROPAGATIONS = ["row", "dense"]


def _x(batch: int = 2) -> Tensor:
    return torch.tensor([X] * batch)


def _attribute(toy, propagation, **options):
    target = options.pop("target", None)
    return CheferAttribution(toy).attribute(_x(), target=target, propagation=propagation, **options)


def test_the_toy_is_an_attention_model_and_a_stack():
    toy = StackedToy([A1, A2])
    assert isinstance(toy, AttentionModel)
    captured = toy.attention_forward((_x(),), (), pooled_row_only=True)
    assert captured.stacked
    assert [tuple(a.shape) for a in captured.attention["x"]] == [(2, 2, 3, 3), (2, 2, 1, 3)]
    # logit = M2[p] . h1: p=0: .4 * .625 + .35 * -.5 + .25 * .95 = .3125; p=2: .25 * .625 + .75 * .95 = .86875
    torch.testing.assert_close(captured.logits, torch.tensor([[0.3125], [0.86875]]))
    torch.testing.assert_close(toy(_x()), captured.logits)


# Two layers, p = 0: u1 = M2[0] = [.4, .35, .25].
#   grad A2_h row 0 = h1 / 2 = [.3125, -.25, .475] (other rows 0)
#   grad A1_h = (u1 / 2)^T x^T: rows [.2, -.2, .4], [.175, -.175, .35], [.125, -.125, .25]
# Two layers, p = 2: u1 = M2[2] = [.25, 0, .75].
#   grad A2_h row 2 = [.3125, -.25, .475]
#   grad A1_h rows [.125, -.125, .25], [0, 0, 0], [.375, -.375, .75]
TWO_LAYER_CASES = [
    # default, p=0: A2a row 0 * grad = [.0625, -.075, .2375], A2b: [.1875, -.1, 0]; clamp, mean:
    #   A_bar2[0] = [.125, 0, .11875], r = [1.125, 0, .11875]
    #   A1a * grad clamped: [[.1, 0, .1], [0, 0, 0], [.025, 0, .125]]; A1b: [[0, 0, .2], [.0875, 0, 0], [.125, 0, 0]]
    #   A_bar1 = [[.05, 0, .15], [.04375, 0, 0], [.075, 0, .0625]]
    #   r A_bar1 = [1.125 * .05 + .11875 * .075, 0, 1.125 * .15 + .11875 * .0625] = [.06515625, 0, .176171875]
    #   r = [1.19015625, 0, .294921875]
    # default, p=2: A2a row 2 * grad = [0, 0, .475], A2b: [.15625, 0, .2375] -> A_bar2[2] = [.078125, 0, .35625]
    #   r = [.078125, 0, 1.35625]
    #   A1a * grad clamped: rows [.0625, 0, .0625], 0, [.075, 0, .375]; A1b: rows [0, 0, .125], 0, [.375, 0, 0]
    #   A_bar1 = [[.03125, 0, .09375], [0, 0, 0], [.225, 0, .1875]]
    #   r A_bar1 = [.078125 * .03125 + 1.35625 * .225, 0, .078125 * .09375 + 1.35625 * .1875]
    #            = [.30759765625, 0, .26162109375]
    #   r = [.38572265625, 0, 1.61787109375]
    ({}, [[1.19015625, 0.0, 0.294921875], [0.38572265625, 0.0, 1.61787109375]]),
    # exclude_self: the same less e_p
    ({"exclude_self": True}, [[0.19015625, 0.0, 0.294921875], [0.38572265625, 0.0, 0.61787109375]]),
    # clamp=False, p=0: A_bar2[0] = mean([.0625, -.075, .2375], [.1875, -.1, 0]) = [.125, -.0875, .11875]
    #   A_bar1 = [[.05, -.075, .15], [.04375, -.13125, 0], [.075, -.01875, .0625]]
    #   r A_bar1 = [.05625 - .003828125 + .00890625, -.084375 + .011484375 - .0022265625, .16875 + .007421875]
    #   r = [1.125 + .061328125, -.0875 - .0751171875, .11875 + .176171875] = [1.186328125, -.1626171875, .294921875]
    # clamp=False, p=2: row 2 has no negative product: r = [.078125, 0, 1.35625] as above; A_bar1 column 1
    #   gains [-.046875, 0, -.05625]: r A_bar1 column 1 = .078125 * -.046875 + 1.35625 * -.05625 = -.079951171875
    ({"clamp": False}, [[1.186328125, -0.1626171875, 0.294921875], [0.38572265625, -0.079951171875, 1.61787109375]]),
    # use_gradients=False: r = e_p (I + M2)(I + M1).
    #   p=0: [1.4, .35, .25]
    #      + [1.4 * .25 + .35 * .25 + .25 * .6, 1.4 * .375 + .35 * .75 + .25 * .15, 1.4 * .375 + .25 * .25]
    #      = [1.4, .35, .25] + [.5875, .825, .5875] = [1.9875, 1.175, .8375]
    #   p=2: [.25, 0, 1.75] + [.25 * .25 + 1.75 * .6, .25 * .375 + 1.75 * .15, .25 * .375 + 1.75 * .25]
    #      = [.25, 0, 1.75] + [1.1125, .35625, .53125] = [1.3625, .35625, 2.28125]
    #   (walking the layers bottom-up instead gives e_p + M2[p], [1.4, .35, .25] for p=0: layer 1 is lost)
    ({"use_gradients": False}, [[1.9875, 1.175, 0.8375], [1.3625, 0.35625, 2.28125]]),
    # head_reduction="max", p=0: A_bar2[0] = max([.0625, 0, .2375], [.1875, 0, 0]) = [.1875, 0, .2375]
    #   A_bar1 = [[.1, 0, .2], [.0875, 0, 0], [.125, 0, .125]]
    #   r A_bar1 = [1.1875 * .1 + .2375 * .125, 0, 1.1875 * .2 + .2375 * .125] = [.1484375, 0, .2671875]
    #   r = [1.3359375, 0, .5046875]
    # head_reduction="max", p=2: A_bar2[2] = max([0, 0, .475], [.15625, 0, .2375]) = [.15625, 0, .475]
    #   A_bar1 rows [.0625, 0, .125], 0, [.375, 0, .375]
    #   r A_bar1 = [.15625 * .0625 + 1.475 * .375, 0, .15625 * .125 + 1.475 * .375] = [.562890625, 0, .57265625]
    #   r = [.719140625, 0, 2.04765625]
    ({"head_reduction": "max"}, [[1.3359375, 0.0, 0.5046875], [0.719140625, 0.0, 2.04765625]]),
    # layers=1: the last layer alone, r = e_p + A_bar2[p] from the default case
    ({"layers": 1}, [[1.125, 0.0, 0.11875], [0.078125, 0.0, 1.35625]]),
    # class 1 explains -logit: every product flips sign before the clamp.
    #   p=0: A_bar2[0] = mean([0, .075, 0], [0, .1, 0]) = [0, .0875, 0]; A_bar1 column 1 = [.075, .13125, .01875]
    #     r = [1, .0875, 0] + [0, .075 + .0875 * .13125, 0] = [1, .173984375, 0]
    #   p=2: A_bar2[2] = 0 (row 2 products are all >= 0); A_bar1 row 2 = [0, .05625, 0]; r = [0, .05625, 1]
    ({"target": 1}, [[1.0, 0.173984375, 0.0], [0.0, 0.05625, 1.0]]),
    # per-sample targets: sample 0 class 0, sample 1 class 1
    ({"target": torch.tensor([0, 1])}, [[1.19015625, 0.0, 0.294921875], [0.0, 0.05625, 1.0]]),
]


@pytest.mark.parametrize(
    "options, expected", TWO_LAYER_CASES, ids=lambda v: ",".join(v) if isinstance(v, dict) else None
)
@pytest.mark.parametrize("propagation", PROPAGATIONS)
@pytest.mark.parametrize("toy", TOYS)
def test_two_layers_two_heads_by_hand(toy, propagation, options, expected):
    classes = 2 if "target" in options else 1
    out = _attribute(toy([A1, A2], classes=classes), propagation, **dict(options))
    torch.testing.assert_close(out, torch.tensor(expected), msg=f"{propagation} {options}")


@pytest.mark.parametrize("propagation", PROPAGATIONS)
@pytest.mark.parametrize("toy", TOYS)
def test_three_layers_attention_alone_by_hand(toy, propagation):
    # r = e_p (I + M3)(I + M2)(I + M1), walked from the last layer down.
    # p=0: e_0 (I + M3) = [1.75, .25, 0]
    #      + [1.75, .25, 0] M2 = [.825, .675, .5]            -> [2.575, .925, .5]
    #      + [2.575, .925, .5] M1 = [1.175, 1.734375, 1.090625] -> [3.75, 2.659375, 1.590625]
    # p=2: e_2 (I + M3) = [.25, .375, 1.375]
    #      + [.25, .375, 1.375] M2 = [.63125, .18125, 1.1875]     -> [.88125, .55625, 2.5625]
    #      + [.88125, .55625, 2.5625] M1 = [1.896875, 1.13203125, .97109375] -> [2.778125, 1.68828125, 3.53359375]
    out = _attribute(toy([A1, A2, A3]), propagation, use_gradients=False)
    torch.testing.assert_close(out, torch.tensor([[3.75, 2.659375, 1.590625], [2.778125, 1.68828125, 3.53359375]]))
    # the last two layers: the middle line above, [2.575, .925, .5] and [.88125, .55625, 2.5625]
    out = _attribute(toy([A1, A2, A3]), propagation, use_gradients=False, layers=2)
    torch.testing.assert_close(out, torch.tensor([[2.575, 0.925, 0.5], [0.88125, 0.55625, 2.5625]]))
    # the last layer: e_p + M3[p]
    out = _attribute(toy([A1, A2, A3]), propagation, use_gradients=False, layers=1)
    torch.testing.assert_close(out, torch.tensor([[1.75, 0.25, 0.0], [0.25, 0.375, 1.375]]))


@pytest.mark.parametrize("propagation", PROPAGATIONS)
@pytest.mark.parametrize("toy", TOYS)
def test_single_head_maps_without_a_head_dimension(toy, propagation):
    # Heads a alone, as [B, L, L] maps. p=0 is tests/test_relevance.py's three-token case: [1.31, 0, .79].
    # p=2: h1 = A1a x = [.75, -1, .9]; A2a row 2 = e_2, grad row 2 = h1: A_bar2[2] = [0, 0, .9], r = [0, 0, 1.9]
    #      u1 = A2a[2] = e_2: grad A1 row 2 = x = [1, -1, 2], A1a row 2 * x = [.2, -.3, 1] -> [.2, 0, 1]
    #      r = [0, 0, 1.9] + 1.9 [.2, 0, 1] = [.38, 0, 3.8]
    # attention alone: p=0 [1.9, 1.05, 1.05] (tests/test_relevance.py); p=2: e_2 (I + A2a) = [0, 0, 2],
    #      + 2 A1a[2] = [.4, .6, 1] -> [.4, .6, 3]
    single = [[A1[0]], [A2[0]]]
    out = _attribute(toy(single, three_dim=True), propagation)
    torch.testing.assert_close(out, torch.tensor([[1.31, 0.0, 0.79], [0.38, 0.0, 3.8]]))
    alone = _attribute(toy(single, three_dim=True), propagation, use_gradients=False)
    torch.testing.assert_close(alone, torch.tensor([[1.9, 1.05, 1.05], [0.4, 0.6, 3.0]]))


@pytest.mark.parametrize("propagation", PROPAGATIONS)
@pytest.mark.parametrize("toy", TOYS)
@pytest.mark.parametrize("use_gradients", [True, False])
@pytest.mark.parametrize("layers", [None, 1])
def test_several_streams_and_one_no_gradient_reaches(toy, propagation, use_gradients, layers):
    """Three streams: ``a`` and ``b`` add to the logit, ``c`` does not. Stream ``b`` pools the other way round
    (sample 0 pools 2), so each stream's row must come from its own gradients and pooling."""
    pools = {"a": [0, 2], "b": [2, 0], "c": [0, 2]}
    method = CheferAttribution(toy([A1, A2], pools, streams=("a", "b", "c"), unused=("c",)))
    a, b, c = method.attribute(
        (_x(), _x(), _x()), propagation=propagation, use_gradients=use_gradients, layers=layers
    )
    # the single-stream answers (above), for pools [0, 2]
    if use_gradients:
        expected = [[1.125, 0.0, 0.11875], [0.078125, 0.0, 1.35625]] if layers else [
            [1.19015625, 0.0, 0.294921875], [0.38572265625, 0.0, 1.61787109375]]
    else:  # layers=1: e_p + M2[p]
        expected = [[1.4, 0.35, 0.25], [0.25, 0.0, 1.75]] if layers else [
            [1.9875, 1.175, 0.8375], [1.3625, 0.35625, 2.28125]]
    torch.testing.assert_close(a, torch.tensor(expected))
    torch.testing.assert_close(b, torch.tensor(expected[::-1]))
    # c: no gradient reaches it, so A_bar = 0 in every layer and r = e_p, unless attention alone is used
    if use_gradients:
        torch.testing.assert_close(c, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    else:
        torch.testing.assert_close(c, torch.tensor(expected))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("propagation", PROPAGATIONS)
@pytest.mark.parametrize("toy", TOYS)
def test_relevance_is_float32_or_the_attention_dtype_if_wider(toy, propagation, dtype):
    """float64 maps give float64 relevance; bfloat16 maps are upcast and give float32 (deliberately: 8 bits of
    mantissa would round small increments away)."""
    computed = torch.promote_types(dtype, torch.float32)
    expected = torch.tensor([[1.19015625, 0.0, 0.294921875], [0.38572265625, 0.0, 1.61787109375]], dtype=computed)
    tolerance = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {}
    unit = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=computed)
    for exclude_self in (False, True):
        for streams, unused in ((("x",), ()), (("x", "y"), ("y",))):
            out = CheferAttribution(toy([A1, A2], streams=streams, unused=unused, dtype=dtype)).attribute(
                tuple(_x() for _ in streams), propagation=propagation, exclude_self=exclude_self
            )
            for row in out:
                assert row.dtype == computed, (streams, exclude_self, row.dtype)
            torch.testing.assert_close(out[0], expected - unit if exclude_self else expected, **tolerance)
            if unused:  # the stream no gradient reaches keeps e_p, in the same dtype
                torch.testing.assert_close(out[1], unit - unit if exclude_self else unit)
