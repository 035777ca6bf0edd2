"""Unit cases of the relevance math and the method's helpers that the broader tests leave out: the exact error
messages, the default options, the dtypes (float32 maps under a float64 default dtype, mixed dtypes, half
precision upcast), autocast switched off, and the NaN check of the explained output.

Every expected value is worked out by hand in the comments (or from float64 arithmetic written out here), not read
from the code under test.
"""

from __future__ import annotations

import re

import pytest
import torch

from captum_chefer import CheferAttribution
from captum_chefer.attribution import AttentionForward, _propagate_deferred, _select_target, _SplitInputs
from captum_chefer.relevance import (
    dense_encoder_decoder_relevance,
    dense_increment,
    dense_relevance,
    encoder_decoder_rows,
    full_precision,
    normalize_increment,
    normalize_relevance,
    propagate_weighted_increment,
    propagate_weighted_row,
)


def exact(message: str) -> str:
    return "^" + re.escape(message) + "$"


@pytest.fixture
def float64_default():
    """torch's default dtype set to float64 for the test (a user's choice the relevance must not follow)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# Two heads of a two-token layer, and their gradients:
#   products A * dA:  head 0 [[1, -1], [0, 1]]      head 1 [[1, 1.5], [-1, 0]]
#   clamped:          head 0 [[1,  0], [0, 1]]      head 1 [[1, 1.5], [ 0, 0]]
#   clamped head mean A_bar = [[1, 0.75], [0, 0.5]]; clamped head max [[1, 1.5], [0, 1]];
#   unclamped mean [[1, 0.25], [-0.5, 0.5]]; attention alone (no gradient) mean [[0.375, 0.625], [0.5, 0.5]].
HEADS_A = [[[0.5, 0.5], [0.0, 1.0]], [[0.25, 0.75], [1.0, 0.0]]]
HEADS_G = [[[2.0, -2.0], [1.0, 1.0]], [[4.0, 2.0], [-1.0, 3.0]]]


def two_heads(dtype=torch.float32):
    return torch.tensor([HEADS_A], dtype=dtype), torch.tensor([HEADS_G], dtype=dtype)


# ------------------------------------------------------------------------------------------------------ full_precision


def test_full_precision_switches_cpu_autocast_off():
    ones = torch.ones(2, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (ones @ ones.T).dtype == torch.bfloat16  # autocast is on: the product runs in bfloat16
        with full_precision(torch.ones(1)):
            product = ones @ ones.T
        assert (ones @ ones.T).dtype == torch.bfloat16  # and on again after the context
    assert product.dtype == torch.float32
    assert product.tolist() == [[3.0, 3.0], [3.0, 3.0]]


# ------------------------------------------------------------------------------------------------------ error messages


def test_dense_increment_of_no_layers():
    with pytest.raises(ValueError, match=exact("dense_increment needs at least one layer")):
        dense_increment([])


@pytest.mark.parametrize("shape", [(1, 2, 3), (2, 2), (1, 3, 2)])
def test_normalize_increment_refuses_what_is_not_square(shape):
    with pytest.raises(ValueError, match=exact(f"relevance must be square [B, T, T], got {shape}")):
        normalize_increment(torch.zeros(shape))


def test_only_the_last_layer_may_be_the_pooled_row_in_increment_form():
    attention, gradient = torch.full((1, 1, 1, 2), 0.5), torch.ones(1, 1, 1, 2)
    message = ("attention of shape (1, 1, 1, 2) is not square: only the last layer may be given for the pooled row "
               "alone")
    with pytest.raises(ValueError, match=exact(message)):
        propagate_weighted_increment(torch.zeros(1, 2), attention, gradient, torch.tensor([0]))


def test_propagate_weighted_row_needs_a_row_or_a_unit_index():
    attention, gradient = two_heads()
    message = "propagate_weighted_row needs a row, or unit_index for the unit row e_p"
    with pytest.raises(ValueError, match=exact(message)):
        propagate_weighted_row(None, attention, gradient)


def test_an_empty_batch_is_refused():
    message = "the batch holds no samples (batch size 0); pass inputs with at least one sample"
    with pytest.raises(ValueError, match=exact(message)):
        _select_target(torch.zeros(0, 2), 0)


def test_a_bool_tensor_target_is_refused():
    with pytest.raises(TypeError, match=exact("target must hold integer class indices, got dtype torch.bool")):
        _select_target(torch.zeros(2, 2), torch.tensor([True, False]))


def nan_message(shown: str) -> str:
    return (f"the explained output is NaN or infinite for sample(s) {shown}; its relevance would be NaN too. Check "
            "those samples' inputs and the model's weights (a model trained into NaN, an overflow in half precision)")


@pytest.mark.parametrize("bad, batch, shown", [
    ([1, 3], 4, "[1, 3]"),  # samples 0 and 2 are finite and not named
    (list(range(10)), 10, "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]"),  # ten: all named, nothing left out
    (list(range(1, 12)), 12, "[1, 2, 3, 4, 5, 6, 7, 8, 9, 10] ..."),  # eleven: the first ten, then " ..."
    (list(range(12)), 12, "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9] ..."),
], ids=["two", "ten", "eleven", "twelve"])
def test_nan_or_infinite_outputs_are_named(bad, batch, shown):
    logits = torch.zeros(batch, 2)
    for k, b in enumerate(bad):
        logits[b, 1] = float("nan") if k % 2 else float("inf")
    with pytest.raises(ValueError, match=exact(nan_message(shown))):
        _select_target(logits, 1)
    assert float(_select_target(logits, 0)) == 0.0  # class 0 is finite everywhere: its sum, 0


# ---------------------------------------------------------------------------------------- propagate_weighted_increment


def test_propagate_weighted_increment_defaults_are_the_clamped_head_mean():
    attention, gradient = two_heads()
    # the last layer (increment None): A_bar[0] = [1, 0.75]
    assert propagate_weighted_increment(None, attention, gradient, torch.tensor([0])).tolist() == [[1.0, 0.75]]
    # below it, d = [0.5, 0.25]: d + (e_0 + d) A_bar = [0.5, 0.25] + [1.5, 0.25] A_bar
    #   = [0.5 + 1.5 * 1, 0.25 + 1.5 * 0.75 + 0.25 * 0.5] = [2.0, 1.5]
    d = torch.tensor([[0.5, 0.25]])
    assert propagate_weighted_increment(d, attention, gradient, torch.tensor([0])).tolist() == [[2.0, 1.5]]


def test_a_layer_no_gradient_reached_leaves_the_increment():
    attention, _ = two_heads()
    d = torch.tensor([[0.5, 0.25]])
    assert propagate_weighted_increment(d, attention, None, torch.tensor([0])).tolist() == [[0.5, 0.25]]
    # at the last layer: d = 0, in float32 although the maps are float16
    last = propagate_weighted_increment(None, attention.half(), None, torch.tensor([1]))
    assert last.dtype == torch.float32 and last.tolist() == [[0.0, 0.0]]


def test_a_float64_increment_with_float32_maps_stays_float64():
    attention, gradient = two_heads()
    d = torch.tensor([[0.5, 0.25]], dtype=torch.float64)
    out = propagate_weighted_increment(d, attention, gradient, torch.tensor([0]))
    assert out.dtype == torch.float64 and out.tolist() == [[2.0, 1.5]]  # as in the defaults' case


# ----------------------------------------------------------------------------------------------- float64 default dtype


def test_float32_maps_give_float32_relevance_under_a_float64_default(float64_default):
    a = torch.tensor([[[0.5, 0.5], [0.0, 1.0]]], dtype=torch.float32)
    # (I + a)^2 = I + 2a + a^2 = [[2.25, 1.75], [0, 4]] (dense_relevance's docstring case)
    r = dense_relevance([a, a])
    assert r.dtype == torch.float32 and r.tolist() == [[[2.25, 1.75], [0.0, 4.0]]]
    # R - I = [[1, 1, 1], [0, 0, 0], [0, 0.25, 0.75]]: rows scaled to sum 1, the empty row stays e_1
    relevance = torch.tensor([[[2.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.25, 1.75]]], dtype=torch.float32)
    normalized = normalize_relevance(relevance)
    assert normalized.dtype == torch.float32
    assert torch.allclose(normalized, torch.tensor([[[4 / 3, 1 / 3, 1 / 3], [0.0, 1.0, 0.0], [0.0, 0.25, 1.75]]],
                                                   dtype=torch.float32))


def test_float32_rows_under_a_float64_default(float64_default):
    attention, gradient = two_heads(torch.float32)
    index = torch.tensor([0])
    # the unit row e_0 + A_bar[0] = [1 + 1, 0.75]
    row = propagate_weighted_row(None, attention, gradient, unit_index=index)
    assert row.dtype == torch.float32 and row.tolist() == [[2.0, 0.75]]
    # the head maximum, d = [0.5, 0.25]: d + [1.5, 0.25] [[1, 1.5], [0, 1]] = [0.5 + 1.5, 0.25 + 2.25 + 0.25]
    d = torch.tensor([[0.5, 0.25]], dtype=torch.float32)
    out = propagate_weighted_increment(d, attention, gradient, index, head_reduction="max")
    assert out.dtype == torch.float32 and out.tolist() == [[2.0, 2.75]]


def test_float32_encoder_decoder_relevance_under_a_float64_default(float64_default):
    # no encoder layers (R_ii = I), one decoder layer: S = [[1]], C = [[0.5, 0.5]]
    self_layers = [torch.tensor([[[1.0]]], dtype=torch.float32)]
    cross_layers = [torch.tensor([[[0.5, 0.5]]], dtype=torch.float32)]
    # R_qq = I + S = [[2]]; R_qi = norm(R_qq)^T C norm(R_ii) = (S / rowsum(S) + I) C = 2 C = [[1, 1]]
    dense = dense_encoder_decoder_relevance([], self_layers, cross_layers)
    assert [m.dtype for m in dense] == [torch.float32] * 3
    assert dense.r_ii.tolist() == [[[1.0, 0.0], [0.0, 1.0]]]
    assert dense.r_qq.tolist() == [[[2.0]]]
    assert dense.r_qi.tolist() == [[[1.0, 1.0]]]
    rows = encoder_decoder_rows([], self_layers, cross_layers, torch.tensor([0]))
    assert [m.dtype for m in rows] == [torch.float32] * 2
    assert rows.r_qi.tolist() == [[1.0, 1.0]] and rows.r_qq.tolist() == [[2.0]]


class HeadsLayer:
    """A DeferredAttention over fixed maps and gradients ``[B, H, L, L]`` (the output gradient is ignored)."""

    def __init__(self, attention, gradient):
        self.attention, self.grad = attention, gradient
        self.shape, self.dtype = attention.shape, attention.dtype

    def _pick(self, maps, heads, rows):
        maps = maps[:, heads]
        if rows is None:
            return maps.clone()
        return maps[torch.arange(maps.shape[0]), :, rows].unsqueeze(2).clone()

    def probabilities(self, heads=None, rows=None):
        return self._pick(self.attention, heads, rows)

    def gradient(self, output_gradient, heads=None, rows=None):
        return self._pick(self.grad, heads, rows)


@pytest.mark.parametrize("head_reduction, expected", [("mean", [[2.0, 1.5]]), ("max", [[2.0, 2.75]])])
def test_deferred_layer_below_the_last_under_a_float64_default(float64_default, head_reduction, expected):
    # the same layer as above, below the last one (depth 0 of 2), d = [0.5, 0.25]: mean [2.0, 1.5], max [2.0, 2.75]
    layer = HeadsLayer(*two_heads(torch.float32))
    d = torch.tensor([[0.5, 0.25]], dtype=torch.float32)
    reduce = {"use_gradient": True, "clamp": True, "head_reduction": head_reduction}
    out = _propagate_deferred(d, layer, torch.zeros(1), 0, "x", {"x": [None, None]}, {"x": torch.tensor([0])}, reduce)
    assert out.dtype == torch.float32 and out.tolist() == expected


# ------------------------------------------------------------------------------- dense_increment, encoder-decoder rows


def test_dense_increment_of_one_layer_is_a_copy():
    a = torch.tensor([[[0.5, 0.5], [0.0, 1.0]]])
    d = dense_increment([a])
    d += 1.0  # writing into the result leaves the layer as it was
    assert a.tolist() == [[[0.5, 0.5], [0.0, 1.0]]]
    assert d.tolist() == [[[1.5, 1.5], [1.0, 2.0]]]


def test_encoder_decoder_rows_in_the_cross_attentions_float64():
    # float32 self-attention S = [[1e-9]], float64 cross-attention: the rows are float64, so R_qq = 1 + 1e-9 keeps its
    # increment (float32 would round it to 1); R_qi = (S / S + I) C = 2 C
    self_layers = [torch.tensor([[[1e-9]]], dtype=torch.float32)]
    cross_layers = [torch.tensor([[[0.5, 0.25]]], dtype=torch.float64)]
    rows = encoder_decoder_rows([], self_layers, cross_layers, torch.tensor([0]))
    assert rows.r_qq.dtype == torch.float64 and rows.r_qi.dtype == torch.float64
    s = float(torch.tensor(1e-9, dtype=torch.float32))  # 1e-9 as float32 holds it
    assert rows.r_qq.tolist() == [[1.0 + s]]
    assert rows.r_qq[0, 0] != 1.0
    assert torch.allclose(rows.r_qi, torch.tensor([[1.0, 0.5]], dtype=torch.float64), rtol=0, atol=1e-15)


# ----------------------------------------------------------------------------------- code_split="gradient" in bfloat16


# One visit of two codes, bfloat16 embeddings e_0 = [1, 1], e_1 = [0, 1] and the visit's gradient g = [256, 1]: the
# shares g . e_c are 257 and 1, taken in float32; bfloat16 (8 significant bits) would round 257 to 256. The visit's
# relevance 1 is split 257/258 and 1/258 (in bfloat16 it would be 256/257 and 1/257, 1.5e-5 off).
SPLIT = [257 / 258, 1 / 258]


def bf16_codes():
    embedding = torch.tensor([[[[1.0, 1.0], [0.0, 1.0]]]], dtype=torch.bfloat16).requires_grad_(True)
    return embedding, torch.tensor([[[True, True]]])


def test_code_shares_are_taken_in_float32_from_bfloat16_embeddings():
    embedding, mask = bf16_codes()
    captured = AttentionForward(logits=torch.zeros(1, 1), attention={}, pool_index={}, embeddings={"x": embedding},
                                code_masks={"x": mask})
    grad = torch.tensor([[[[256.0, 1.0], [256.0, 1.0]]]], dtype=torch.bfloat16)  # every code gets the visit's g
    out = _SplitInputs(captured).codes({"x": torch.tensor([[1.0]])}, [grad])["x"]
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), torch.tensor([[SPLIT]], dtype=torch.float64), rtol=0, atol=1e-7)


def test_code_shares_through_state_values_are_taken_in_float32():
    # the visit's state value is the sum of its code embeddings, [1, 2]; the gradient at it, g = [256, 1], weighted
    # by the state's relevance 1, goes back to each code unchanged: the shares are g . e_c again
    embedding, mask = bf16_codes()
    values = embedding.sum(dim=2)  # [B, L, D] = [1, 1, 2]
    captured = AttentionForward(logits=torch.zeros(1, 1), attention={}, pool_index={}, embeddings={"x": embedding},
                                code_masks={"x": mask}, state_values={"x": values})
    grad = torch.tensor([[[256.0, 1.0]]], dtype=torch.bfloat16)
    out = _SplitInputs(captured).codes({"x": torch.tensor([[1.0]])}, [grad])["x"]
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), torch.tensor([[SPLIT]], dtype=torch.float64), rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------------------- the method, float64 default


class OneLayerToy(torch.nn.Module):
    """``logit = (A x)[0]`` with one fixed float32 single-head attention map A = [[0.5, 0.5], [0.25, 0.75]]."""

    def _attention(self, batch):
        a = torch.tensor([[0.5, 0.5], [0.25, 0.75]], dtype=torch.float32)
        return a.expand(batch, 1, 2, 2).clone().requires_grad_(True)

    def forward(self, x):
        return (self._attention(x.shape[0])[:, 0] @ x.unsqueeze(-1))[:, 0]

    def attention_forward(self, inputs, additional_forward_args, *, pooled_row_only=False):
        (x,) = inputs
        a = self._attention(x.shape[0])
        logits = (a[:, 0] @ x.unsqueeze(-1))[:, 0]
        pool = torch.zeros(x.shape[0], dtype=torch.long)
        return AttentionForward(logits=logits, attention={"x": [a]}, pool_index={"x": pool})

    def relevance_to_inputs(self, relevance, inputs, additional_forward_args):
        return (relevance["x"],)


@pytest.mark.parametrize("propagation", ["row", "dense"])
def test_a_float32_model_gets_float32_relevance_under_a_float64_default(float64_default, propagation):
    # x = [1, 2]: logit = 0.5 + 1 = 1.5; grad A = e_0 x^T = [[1, 2], [0, 0]]; A_bar[0] = [0.5, 1.0]
    # r = e_0 + A_bar[0] = [1.5, 1.0]
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float32)
    out = CheferAttribution(OneLayerToy()).attribute(x, target=0, exclude_self=False, propagation=propagation)
    assert out.dtype == torch.float32 and out.tolist() == [[1.5, 1.0]]


def test_a_half_precision_increment_is_added_to_e_p_in_float32():
    # d = 1e-4 beside e_0 = 1: float16's spacing at 1 is 2^-10 (about 9.8e-4), so e_0 + d in float16 is e_0 and
    # the layer's product e_0 A_bar would stand for (e_0 + d) A_bar; in float32 (the rule) d is kept
    a = torch.tensor([[[[0.5, 0.5], [0.25, 0.75]]]])
    g = torch.ones_like(a)
    pool = torch.tensor([0])
    half = torch.tensor([[1e-4, 0.0]], dtype=torch.float16)
    ours = propagate_weighted_increment(half, a, g, pool)
    reference = propagate_weighted_increment(half.double(), a.double(), g.double(), pool)  # the same rule in float64
    assert ours.dtype == torch.float32
    # (e_0 + d) A_bar, column 0: (1 + d) * 0.5 + 0 = 0.5 + d / 2; an e_0 + d rounded to e_0 would miss d / 2 = 5e-5
    torch.testing.assert_close(ours.double(), reference, rtol=0, atol=1e-6)
