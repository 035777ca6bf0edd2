"""The pure tensor functions of ``relevance.py`` at their edges: one-head maps without a head dimension,
their defaults, missing gradients, dtypes, devices and the error messages. Expected values by hand.

Two heads over two tokens, used throughout (the products are those of tests/test_relevance.py):

    A  head 0 [[1, 0], [.5, .5]]    head 1 [[0, 1], [.5, .5]]
    dA head 0 [[2, 1], [-1, 4]]     head 1 [[3, 3], [2, -2]]
    A * dA: head 0 [[2, 0], [-.5, 2]], head 1 [[0, 3], [1, -1]]
    clamped, mean over heads: [[1, 1.5], [.5, 1]];  max: [[2, 3], [1, 2]];  unclamped mean: [[1, 1.5], [.25, .5]]
    attention alone, mean: [[.5, .5], [.5, .5]]
"""

from __future__ import annotations

import pytest
import torch

from captum_chefer.relevance import (
    dense_relevance,
    pooling_rows,
    propagate_row,
    propagate_weighted_row,
    read_rows,
    weighted_attention,
)

ATTENTION = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [0.5, 0.5]]]])  # [1, 2, 2, 2]
GRADIENT = torch.tensor([[[[2.0, 1.0], [-1.0, 4.0]], [[3.0, 3.0], [2.0, -2.0]]]])
ROW = torch.tensor([[1.0, 2.0]])


def test_one_head_without_a_head_dimension():
    # [B, L, L]: a = [[.5, .5], [0, 1]], dA = [[2, -2], [1, 1]] -> a * dA = [[1, -1], [0, 1]] -> [[1, 0], [0, 1]]
    a = torch.tensor([[[0.5, 0.5], [0.0, 1.0]]])
    g = torch.tensor([[[2.0, -2.0], [1.0, 1.0]]])
    expected = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert torch.equal(weighted_attention(a, g), expected)
    assert torch.equal(weighted_attention(a, g, clamp=False), torch.tensor([[[1.0, -1.0], [0.0, 1.0]]]))
    assert torch.equal(weighted_attention(a, None, use_gradient=False), a)
    assert torch.equal(weighted_attention(a, None), torch.zeros(1, 2, 2))
    # the row rule: r = [.5, 1]: r + r A_bar = [.5, 1] + [.5, 1] = [1, 2]
    r = torch.tensor([[0.5, 1.0]])
    assert torch.equal(propagate_weighted_row(r, a, g), torch.tensor([[1.0, 2.0]]))
    assert torch.equal(propagate_weighted_row(r, a, g, clamp=False), torch.tensor([[1.0, 1.5]]))
    # unit rows: e_0 + A_bar[0] = [2, 0]; e_1 + A_bar[1] = [0, 2]; attention alone: e_1 + a[1] = [0, 2]
    assert torch.equal(propagate_weighted_row(None, a, g, unit_index=torch.tensor([0])), torch.tensor([[2.0, 0.0]]))
    assert torch.equal(propagate_weighted_row(None, a, g, unit_index=torch.tensor([1])), torch.tensor([[0.0, 2.0]]))
    assert torch.equal(
        propagate_weighted_row(None, a, None, use_gradient=False, unit_index=torch.tensor([1])),
        torch.tensor([[0.0, 2.0]]),
    )
    # the pooled row alone, [B, 1, L]
    assert torch.equal(
        propagate_weighted_row(None, a[:, 1:], g[:, 1:], unit_index=torch.tensor([1])), torch.tensor([[0.0, 2.0]])
    )


def test_defaults_are_the_papers_clamped_head_mean():
    # r = [1, 2]: r + r A_bar = [1, 2] + [1 * 1 + 2 * .5, 1 * 1.5 + 2 * 1] = [3, 5.5]
    assert torch.equal(propagate_weighted_row(ROW, ATTENTION, GRADIENT), torch.tensor([[3.0, 5.5]]))
    # unclamped: [1, 2] + [1 + 2 * .25, 1.5 + 2 * .5] = [2.5, 4.5]; max: [1, 2] + [2 + 2, 3 + 4] = [5, 9]
    assert torch.equal(propagate_weighted_row(ROW, ATTENTION, GRADIENT, clamp=False), torch.tensor([[2.5, 4.5]]))
    assert torch.equal(
        propagate_weighted_row(ROW, ATTENTION, GRADIENT, head_reduction="max"), torch.tensor([[5.0, 9.0]])
    )
    # attention alone: [1, 2] + [1.5, 1.5]
    assert torch.equal(propagate_weighted_row(ROW, ATTENTION, None, use_gradient=False), torch.tensor([[2.5, 3.5]]))
    # unit row p = 1: e_1 + A_bar[1] = [.5, 2] (mean), [1, 3] (max); p = 0: [1 + 1, 1.5] = [2, 1.5]
    p1, p0 = torch.tensor([1]), torch.tensor([0])
    assert torch.equal(propagate_weighted_row(None, ATTENTION, GRADIENT, unit_index=p1), torch.tensor([[0.5, 2.0]]))
    assert torch.equal(propagate_weighted_row(None, ATTENTION, GRADIENT, unit_index=p0), torch.tensor([[2.0, 1.5]]))
    assert torch.equal(
        propagate_weighted_row(None, ATTENTION, GRADIENT, unit_index=p1, head_reduction="max"),
        torch.tensor([[1.0, 3.0]]),
    )
    assert torch.equal(
        propagate_weighted_row(None, ATTENTION, GRADIENT, unit_index=p1, clamp=False), torch.tensor([[0.25, 1.5]])
    )
    assert torch.equal(weighted_attention(ATTENTION, GRADIENT), torch.tensor([[[1.0, 1.5], [0.5, 1.0]]]))


def test_a_layer_no_gradient_reached_adds_nothing():
    assert torch.equal(propagate_weighted_row(ROW, ATTENTION, None), ROW)
    # the unit row e_p, in the attention's dtype, whatever row was passed
    for p, expected in ((0, [[1.0, 0.0]]), (1, [[0.0, 1.0]])):
        out = propagate_weighted_row(ROW, ATTENTION.double(), None, unit_index=torch.tensor([p]))
        assert out.dtype == torch.float64 and torch.equal(out, torch.tensor(expected, dtype=torch.float64))


def test_per_sample_unit_rows():
    # two samples, p = [1, 0]: sample 0 reads row 1, sample 1 row 0 (of the same maps)
    attention, gradient = ATTENTION.expand(2, -1, -1, -1), GRADIENT.expand(2, -1, -1, -1)
    out = propagate_weighted_row(None, attention, gradient, unit_index=torch.tensor([1, 0]))
    assert torch.equal(out, torch.tensor([[0.5, 2.0], [2.0, 1.5]]))
    assert torch.equal(pooling_rows(torch.tensor([1, 0, 2]), 3), torch.tensor([[0.0, 1, 0], [1, 0, 0], [0, 0, 1]]))
    relevance = torch.arange(8.0).view(2, 2, 2)  # sample 0 [[0, 1], [2, 3]], sample 1 [[4, 5], [6, 7]]
    assert torch.equal(read_rows(relevance, torch.tensor([1, 0])), torch.tensor([[2.0, 3.0], [4.0, 5.0]]))


def test_dtypes_follow_the_attention_in_float32_at_least():
    """float64 stays float64; half-precision maps and gradients are upcast to float32 (8 bits would round
    small increments away)."""
    assert pooling_rows(torch.tensor([0]), 2).dtype == torch.float32
    assert pooling_rows(torch.tensor([0]), 2, torch.float64).dtype == torch.float64
    cases = ((torch.float64, torch.float64), (torch.bfloat16, torch.float32), (torch.float16, torch.float32))
    for dtype, computed in cases:
        a, g = ATTENTION.to(dtype), GRADIENT.to(dtype)
        weighted = weighted_attention(a, g)
        assert weighted.dtype == computed
        assert dense_relevance([weighted, weighted]).dtype == computed
        assert dense_relevance([weighted.to(dtype)]).dtype == computed
        assert propagate_weighted_row(None, a, g, unit_index=torch.tensor([1])).dtype == computed
        assert propagate_weighted_row(ROW.to(dtype), a, g).dtype == computed
        assert propagate_row(ROW.to(dtype), weighted.to(dtype)).dtype == computed


def test_every_function_stays_on_the_device_of_its_inputs():
    """On PyTorch's ``meta`` device (shapes without data), nothing may be created on the default device."""
    meta = torch.device("meta")
    attention, gradient = torch.empty(3, 2, 4, 4, device=meta), torch.empty(3, 2, 4, 4, device=meta)
    pool = torch.tensor([0, 3, 1], device=meta)
    row = pooling_rows(pool, 4)
    weighted = weighted_attention(attention, gradient)
    outputs = [
        row, weighted, propagate_row(row, weighted), propagate_weighted_row(row, attention, gradient),
        propagate_weighted_row(None, attention, gradient, unit_index=pool),
        propagate_weighted_row(None, attention, None, unit_index=pool),
        propagate_weighted_row(row, attention, None, use_gradient=False, head_reduction="max"),
        dense_relevance([weighted, weighted]), read_rows(dense_relevance([weighted]), pool),
        weighted_attention(attention, None),
    ]
    for i, out in enumerate(outputs):
        assert out.device == meta, i
    assert [tuple(o.shape) for o in outputs[:3]] == [(3, 4), (3, 4, 4), (3, 4)]


def test_error_messages_name_the_shapes():
    with pytest.raises(ValueError, match=r"^attention \(1, 2, 2, 2\) and its gradient \(1, 2, 2, 3\) differ in shape$"):
        weighted_attention(ATTENTION, torch.ones(1, 2, 2, 3))
    with pytest.raises(ValueError, match=r"^attention must be \[B, H, L, L\] or \[B, L, L\], got \(2, 2\)$"):
        weighted_attention(torch.ones(2, 2), None)
    with pytest.raises(ValueError, match=r"^head_reduction must be 'mean' or 'max', got 'median'$"):
        weighted_attention(ATTENTION, GRADIENT, head_reduction="median")
    both = r"^attention and gradient must both be \[B, H, L, L\] or \[B, L, L\]; got "
    with pytest.raises(ValueError, match=both + r"\(2, 2\) and None$"):
        propagate_weighted_row(ROW, torch.ones(2, 2), None)
    with pytest.raises(ValueError, match=both + r"\(1, 2, 2, 2\) and \(1, 2, 2, 3\)$"):
        propagate_weighted_row(ROW, ATTENTION, torch.ones(1, 2, 2, 3))
    with pytest.raises(
        ValueError, match=r"^attention must be \[B, H, L, L\] or \[B, H, 1, L\] \(row p alone\); got \(1, 2, 3, 2\)$"
    ):
        propagate_weighted_row(None, torch.ones(1, 2, 3, 2), torch.ones(1, 2, 3, 2), unit_index=torch.tensor([0]))
    with pytest.raises(ValueError, match=r"^attention of shape \(1, 2, 1, 2\) is not square: "
                       r"only the last layer may be given for the pooled row alone$"):
        propagate_weighted_row(ROW, ATTENTION[:, :, :1], GRADIENT[:, :, :1])
    with pytest.raises(ValueError, match=r"^dense_relevance needs at least one layer$"):
        dense_relevance([])


def test_the_head_mean_is_folded_into_one_product(monkeypatch):
    """With the head mean (the default), ``propagate_weighted_row`` never forms ``A_bar`` (its docstring's
    promise: one product over all heads); the other reductions and the attention alone go through it."""
    import captum_chefer.relevance as relevance

    formed = []

    def recording(*args, **kwargs):
        formed.append(kwargs.get("head_reduction", "mean"))
        return weighted_attention(*args, **kwargs)

    monkeypatch.setattr(relevance, "weighted_attention", recording)
    assert torch.equal(relevance.propagate_weighted_row(ROW, ATTENTION, GRADIENT), torch.tensor([[3.0, 5.5]]))
    assert torch.equal(
        relevance.propagate_weighted_row(ROW, ATTENTION, GRADIENT, clamp=False), torch.tensor([[2.5, 4.5]])
    )
    assert formed == []
    relevance.propagate_weighted_row(ROW, ATTENTION, GRADIENT, head_reduction="max")
    relevance.propagate_weighted_row(ROW, ATTENTION, None, use_gradient=False)
    assert formed == ["max", "mean"]
