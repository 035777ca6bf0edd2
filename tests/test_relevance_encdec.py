"""The encoder-decoder rules (paper Eq. 6-10) on hand-computed tiny cases and against a plain loop.

Every expected number in the hand-computed tests is worked out in the comments; the randomised tests
compare against ``plain_relevance``, a loop over Python lists written here without the package.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch import Tensor

from captum_chefer.relevance import (
    dense_encoder_decoder_relevance,
    encoder_decoder_rows,
    mask_padding,
    normalize_relevance,
    propagate_column,
    propagate_cross_attention,
    propagate_self_attention,
    weighted_attention,
)

D = torch.float64


def t(values: list) -> Tensor:
    """A float64 tensor with a batch dimension of one."""
    return torch.tensor(values, dtype=D).unsqueeze(0)


# --- The hand-computed two-layer case --------------------------------------------------------------
#
# Encoder: one layer, two heads (head averaging and clamping before the mean both matter):
#   head 1: A = [[0.5, 0.5], [1, 0]], dA = [[2, 4], [-1, 0]]
#           A * dA = [[1, 2], [-1, 0]] -> clamp [[1, 2], [0, 0]]
#   head 2: A = [[0.5, 0.5], [0, 1]], dA = [[2, 0], [3, 1]]   ->  A * dA = [[1, 0], [0, 1]]
#   A_bar_E = mean = [[1, 1], [0, 0.5]]            (without the clamp row 1 would be [-0.5, 0.5])
#   R_ii = I + A_bar_E = [[2, 1], [0, 1.5]]
#   norm(R_ii): R_ii - I = [[1, 1], [0, 0.5]], row sums 2 and 0.5
#               -> [[0.5, 0.5], [0, 1]] + I = [[1.5, 0.5], [0, 2]]
#
# Decoder layer 1: S1 = [[2, 0], [0.5, 0.5]], C1 = [[1, 0], [0.5, 0.5]]
#   R_qq = I + S1 = [[3, 0], [0.5, 1.5]];   R_qi = 0 + S1 0 = 0
#   norm(R_qq): R_qq - I = S1, row sums 2 and 1 -> [[1, 0], [0.5, 0.5]] + I = [[2, 0], [0.5, 1.5]]
#   C1 norm(R_ii) = [[1.5, 0.5], [0.5 * 1.5, 0.5 * 0.5 + 0.5 * 2]] = [[1.5, 0.5], [0.75, 1.25]]
#   norm(R_qq)^T = [[2, 0.5], [0, 1.5]]
#   R_qi = [[2 * 1.5 + 0.5 * 0.75, 2 * 0.5 + 0.5 * 1.25], [1.5 * 0.75, 1.5 * 1.25]]
#        = [[3.375, 1.625], [1.125, 1.875]]
#
# Decoder layer 2: S2 = [[0, 0], [1, 1]], C2 = [[0.5, 0], [0, 1]]
#   S2 R_qq = [[0, 0], [3 + 0.5, 0 + 1.5]]  ->  R_qq = [[3, 0], [4, 3]]
#   S2 R_qi = [[0, 0], [3.375 + 1.125, 1.625 + 1.875]] = [[0, 0], [4.5, 3.5]]
#   R_qi = [[3.375, 1.625], [5.625, 5.375]]
#   norm(R_qq): R_qq - I = [[2, 0], [4, 2]], row sums 2 and 6
#               -> [[1, 0], [2/3, 1/3]] + I = [[2, 0], [2/3, 4/3]]
#   C2 norm(R_ii) = [[0.75, 0.25], [0, 2]]
#   norm(R_qq)^T C2 norm(R_ii) = [[2 * 0.75, 2 * 0.25 + 2/3 * 2], [0, 4/3 * 2]] = [[1.5, 11/6], [0, 8/3]]
#   R_qi = [[3.375 + 1.5, 1.625 + 11/6], [5.625, 5.375 + 8/3]] = [[4.875, 83/24], [5.625, 193/24]]

ENC_ATTENTION = [[[0.5, 0.5], [1.0, 0.0]], [[0.5, 0.5], [0.0, 1.0]]]
ENC_GRADIENT = [[[2.0, 4.0], [-1.0, 0.0]], [[2.0, 0.0], [3.0, 1.0]]]
S1, C1 = [[2.0, 0.0], [0.5, 0.5]], [[1.0, 0.0], [0.5, 0.5]]
S2, C2 = [[0.0, 0.0], [1.0, 1.0]], [[0.5, 0.0], [0.0, 1.0]]


def hand_layers() -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    encoder = [weighted_attention(t(ENC_ATTENTION), t(ENC_GRADIENT))]
    return encoder, [t(S1), t(S2)], [t(C1), t(C2)]


def test_two_heads_are_clamped_then_averaged() -> None:
    (encoder,), _, _ = hand_layers()
    assert torch.equal(encoder, t([[1.0, 1.0], [0.0, 0.5]]))


def test_normalize_relevance_by_hand() -> None:
    # R - I = [[1, 1], [0.5, 0.5]], row sums 2 and 1 -> [[0.5, 0.5], [0.5, 0.5]] + I
    assert torch.allclose(normalize_relevance(t([[2.0, 1.0], [0.5, 1.5]])), t([[1.5, 0.5], [0.5, 1.5]]))
    # norm(R_ii) of the hand case
    assert torch.allclose(normalize_relevance(t([[2.0, 1.0], [0.0, 1.5]])), t([[1.5, 0.5], [0.0, 2.0]]))


def test_normalize_relevance_zero_sum_row_keeps_the_identity() -> None:
    # row 0: R - I = [1, 1, 1] / 3 + e_0; row 1: R - I = 0, no relevance gathered: e_1;
    # row 2: R - I = [0, 0.25, 0.75] sums to 1: unchanged
    r = t([[2.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.25, 1.75]])
    expected = t([[4 / 3, 1 / 3, 1 / 3], [0.0, 1.0, 0.0], [0.0, 0.25, 1.75]])
    out = normalize_relevance(r)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, expected)
    # clamp=False can give a row whose entries cancel: R - I = [1, -1] sums to zero -> e_0 as well
    assert torch.allclose(normalize_relevance(t([[2.0, -1.0], [0.0, 1.5]])), t([[1.0, 0.0], [0.0, 2.0]]))


def test_normalize_relevance_padded_row_and_column() -> None:
    # token 2 is padding and holds junk (nan, inf): its row becomes e_2, and row 0 is normalised over
    # the real columns only: R - I = [1, 1, (dropped)] / 2 + e_0 = [1.5, 0.5, 0]
    nan, inf = float("nan"), float("inf")
    r = t([[2.0, 1.0, 7.0], [0.0, 1.0, nan], [inf, 5.0, 5.0]])
    out = normalize_relevance(r, mask=torch.tensor([[True, True, False]]))
    assert torch.allclose(out, t([[1.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))


def test_propagate_column_gives_row_sums_and_columns() -> None:
    # R = (I + B)(I + A) with A = [[0.5, 0.5], [0, 1]], B = [[0, 1], [1, 0]]:
    # I + A = [[1.5, 0.5], [0, 2]], I + B = [[1, 1], [1, 1]] -> R = [[1.5, 2.5], [1.5, 2.5]]
    a, b = t([[0.5, 0.5], [0.0, 1.0]]), t([[0.0, 1.0], [1.0, 0.0]])
    ones = propagate_column(propagate_column(torch.ones(1, 2, dtype=D), a), b)
    assert torch.allclose(ones, torch.tensor([[4.0, 4.0]], dtype=D))  # row sums 1.5 + 2.5
    column_1 = propagate_column(propagate_column(torch.tensor([[0.0, 1.0]], dtype=D), a), b)
    assert torch.allclose(column_1, torch.tensor([[2.5, 2.5]], dtype=D))


def test_two_layer_case_step_by_step() -> None:
    encoder, selfs, crosses = hand_layers()
    r_ii = torch.eye(2, dtype=D).unsqueeze(0) + encoder[0]
    assert torch.allclose(r_ii, t([[2.0, 1.0], [0.0, 1.5]]))
    r_qq, r_qi = torch.eye(2, dtype=D).unsqueeze(0), torch.zeros(1, 2, 2, dtype=D)

    r_qq, r_qi = propagate_self_attention(r_qq, r_qi, selfs[0])
    assert torch.allclose(r_qq, t([[3.0, 0.0], [0.5, 1.5]]))
    assert torch.equal(r_qi, torch.zeros(1, 2, 2, dtype=D))
    r_qi = propagate_cross_attention(r_qq, r_qi, r_ii, crosses[0])
    assert torch.allclose(r_qi, t([[3.375, 1.625], [1.125, 1.875]]))

    r_qq, r_qi = propagate_self_attention(r_qq, r_qi, selfs[1])
    assert torch.allclose(r_qq, t([[3.0, 0.0], [4.0, 3.0]]))
    assert torch.allclose(r_qi, t([[3.375, 1.625], [5.625, 5.375]]))
    r_qi = propagate_cross_attention(r_qq, r_qi, r_ii, crosses[1])
    assert torch.allclose(r_qi, t([[4.875, 83 / 24], [5.625, 193 / 24]]))


def test_two_layer_case_dense_and_rows() -> None:
    encoder, selfs, crosses = hand_layers()
    dense = dense_encoder_decoder_relevance(encoder, selfs, crosses)
    assert torch.allclose(dense.r_ii, t([[2.0, 1.0], [0.0, 1.5]]))
    assert torch.allclose(dense.r_qq, t([[3.0, 0.0], [4.0, 3.0]]))
    assert torch.allclose(dense.r_qi, t([[4.875, 83 / 24], [5.625, 193 / 24]]))
    for p in (0, 1):
        rows = encoder_decoder_rows(encoder, selfs, crosses, torch.tensor([p]))
        assert torch.allclose(rows.r_qi[0], dense.r_qi[0, p])
        assert torch.allclose(rows.r_qq[0], dense.r_qq[0, p])


def test_cross_update_with_zero_sum_rows_uses_the_identity() -> None:
    # No decoder self-relevance yet (R_qq = I): every row of R_qq - I sums to zero, norm(R_qq) = I and
    # R_qi gets C1 norm(R_ii) = [[1.5, 0.5], [0.75, 1.25]] (worked out above). A 0/0 would give nan.
    r_qq, r_ii = torch.eye(2, dtype=D).unsqueeze(0), t([[2.0, 1.0], [0.0, 1.5]])
    out = propagate_cross_attention(r_qq, torch.zeros(1, 2, 2, dtype=D), r_ii, t(C1))
    assert torch.allclose(out, t([[1.5, 0.5], [0.75, 1.25]]))
    # R_ii = I as well (no encoder relevance): the update is the cross-attention itself
    out = propagate_cross_attention(r_qq, torch.zeros(1, 2, 2, dtype=D), r_qq, t(C1))
    assert torch.allclose(out, t(C1))


def test_cross_update_padded_query_and_input() -> None:
    # The layer-1 case with a third query and a third input that are padding, holding junk everywhere.
    nan = float("nan")
    r_qq = t([[3.0, 0.0, nan], [0.5, 1.5, 9.0], [nan, 4.0, 2.0]])
    r_ii = t([[2.0, 1.0, 8.0], [0.0, 1.5, nan], [nan, 3.0, 1.0]])
    cross = t([[1.0, 0.0, 5.0], [0.5, 0.5, nan], [nan, 7.0, 1.0]])
    r_qi = t([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    query_mask, input_mask = torch.tensor([[True, True, False]]), torch.tensor([[True, True, False]])
    out = propagate_cross_attention(r_qq, r_qi, r_ii, cross, query_mask=query_mask, input_mask=input_mask)
    # real block: layer 1's [[3.375, 1.625], [1.125, 1.875]]; padded row and column get nothing
    assert torch.allclose(out, t([[3.375, 1.625, 0.0], [1.125, 1.875, 0.0], [0.0, 0.0, 0.0]]))


def test_self_update_padded_query() -> None:
    # S1 with a padded third query (junk in its row and column): R_qq real block I + S1, padded row e_2
    nan = float("nan")
    s = t([[2.0, 0.0, nan], [0.5, 0.5, 3.0], [nan, 1.0, 1.0]])
    r_qq, r_qi = torch.eye(3, dtype=D).unsqueeze(0), t([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    r_qq, r_qi = propagate_self_attention(r_qq, r_qi, s, query_mask=torch.tensor([[True, True, False]]))
    assert torch.allclose(r_qq, t([[3.0, 0.0, 0.0], [0.5, 1.5, 0.0], [0.0, 0.0, 1.0]]))
    # R_qi += S1 R_qi on the real rows: row 0 + 2 [1, 0] = [3, 0]; row 1 + 0.5 [1, 0] + 0.5 [0, 2] = [0.5, 3]
    assert torch.allclose(r_qi, t([[3.0, 0.0], [0.5, 3.0], [0.0, 0.0]]))


def test_mask_padding_rejects_a_mask_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match="query_mask must be"):
        mask_padding(torch.zeros(1, 2, 3), query_mask=torch.ones(1, 3, dtype=torch.bool))


def test_rows_reject_a_padded_query_position_and_mismatched_layers() -> None:
    encoder, selfs, crosses = hand_layers()
    with pytest.raises(ValueError, match="padded query position"):
        padded = torch.tensor([[True, False]])
        encoder_decoder_rows(encoder, selfs, crosses, torch.tensor([1]), query_mask=padded)
    with pytest.raises(ValueError, match="one self-attention and one cross-attention"):
        dense_encoder_decoder_relevance(encoder, selfs, crosses[:1])
    with pytest.raises(ValueError, match="decoder self-attention A_bar of layer 1"):
        dense_encoder_decoder_relevance(encoder, [selfs[0], torch.zeros(1, 3, 3, dtype=D)], crosses)


# --- An independent reference: the rules as a loop over Python lists --------------------------------

Matrix = list[list[float]]


def eye(n: int) -> Matrix:
    return [[1.0 if i == j else 0.0 for j in range(n)] for i in range(n)]


def matmul(a: Matrix, b: Matrix) -> Matrix:
    return [[sum(a[i][k] * b[k][j] for k in range(len(b))) for j in range(len(b[0]))] for i in range(len(a))]


def add(a: Matrix, b: Matrix) -> Matrix:
    return [[x + y for x, y in zip(ra, rb, strict=True)] for ra, rb in zip(a, b, strict=True)]


def transpose(a: Matrix) -> Matrix:
    return [list(column) for column in zip(*a, strict=True)]


def normalized(r: Matrix) -> Matrix:
    out = []
    for m, row in enumerate(r):
        gathered = [value - (1.0 if j == m else 0.0) for j, value in enumerate(row)]
        total = sum(gathered)
        scaled = [g / total if total != 0 else 0.0 for g in gathered]
        out.append([value + (1.0 if j == m else 0.0) for j, value in enumerate(scaled)])
    return out


def plain_relevance(
    encoder: list[Matrix], selfs: list[Matrix], crosses: list[Matrix | None], queries: int, inputs: int
) -> tuple[Matrix, Matrix, Matrix]:
    r_ii = eye(inputs)
    for e in encoder:
        r_ii = add(r_ii, matmul(e, r_ii))
    r_qq, r_qi = eye(queries), [[0.0] * inputs for _ in range(queries)]
    for s, c in zip(selfs, crosses, strict=True):
        r_qq, r_qi = add(r_qq, matmul(s, r_qq)), add(r_qi, matmul(s, r_qi))
        if c is not None:
            r_qi = add(r_qi, matmul(transpose(normalized(r_qq)), matmul(c, normalized(r_ii))))
    return r_ii, r_qq, r_qi


# --- Random multi-head, multi-layer samples, padded into one batch -----------------------------------


def random_weighted(
    generator: torch.Generator, rows: int, columns: int, heads: int = 3, causal: bool = False
) -> Tensor:
    """``A_bar`` ``[rows, columns]`` from random multi-head attention and gradients."""
    scores = torch.randn(1, heads, rows, columns, generator=generator, dtype=D)
    if causal:
        scores = scores.masked_fill(torch.ones(rows, columns, dtype=torch.bool).triu(1), float("-inf"))
    attention = scores.softmax(dim=-1)
    gradient = torch.randn(1, heads, rows, columns, generator=generator, dtype=D)
    return weighted_attention(attention, gradient)[0]


def random_sample(seed: int, queries: int, inputs: int, encoder_layers: int = 2, decoder_layers: int = 3,
                  skip_cross: int | None = None) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "queries": queries,
        "inputs": inputs,
        "encoder": [random_weighted(generator, inputs, inputs) for _ in range(encoder_layers)],
        "selfs": [random_weighted(generator, queries, queries, causal=True) for _ in range(decoder_layers)],
        "crosses": [
            None if k == skip_cross else random_weighted(generator, queries, inputs)
            for k in range(decoder_layers)
        ],
    }


def pad_batch(
    samples: list[dict], positions_q: list[list[int]], positions_i: list[list[int]], tq: int, ti: int
) -> tuple:
    """The samples placed at the given real positions of a padded batch; padding holds junk (some nan)."""
    junk = torch.Generator().manual_seed(99)

    def place(matrices: list, rows: list, columns: list, shape: tuple) -> Tensor | None:
        if all(m is None for m in matrices):
            return None
        out = torch.rand(len(matrices), *shape, generator=junk, dtype=D) * 50.0
        nan = torch.rand(len(matrices), *shape, generator=junk) < 0.2
        out = out.masked_fill(nan, float("nan"))
        for b, m in enumerate(matrices):
            out[b, torch.tensor(rows[b]).unsqueeze(-1), torch.tensor(columns[b])] = m
        return out

    def stack(key: str, rows: list, columns: list, shape: tuple) -> list:
        layers = range(len(samples[0][key]))
        return [place([s[key][k] for s in samples], rows, columns, shape) for k in layers]

    encoder = stack("encoder", positions_i, positions_i, (ti, ti))
    selfs = stack("selfs", positions_q, positions_q, (tq, tq))
    crosses = stack("crosses", positions_q, positions_i, (tq, ti))
    query_mask = torch.zeros(len(samples), tq, dtype=torch.bool)
    input_mask = torch.zeros(len(samples), ti, dtype=torch.bool)
    for b in range(len(samples)):
        query_mask[b, positions_q[b]] = True
        input_mask[b, positions_i[b]] = True
    return encoder, selfs, crosses, query_mask, input_mask


def padded_case(skip_cross: int | None = None):
    # sample 0 right-padded, sample 1 left-padded, sample 2 fills the batch
    samples = [random_sample(0, 3, 2, skip_cross=skip_cross), random_sample(1, 2, 4, skip_cross=skip_cross),
               random_sample(2, 4, 5, skip_cross=skip_cross)]
    positions_q = [[0, 1, 2], [2, 3], [0, 1, 2, 3]]
    positions_i = [[0, 1], [1, 2, 3, 4], [0, 1, 2, 3, 4]]
    return samples, positions_q, positions_i, pad_batch(samples, positions_q, positions_i, 4, 5)


def as_lists(sample: dict) -> tuple:
    return ([e.tolist() for e in sample["encoder"]], [s.tolist() for s in sample["selfs"]],
            [None if c is None else c.tolist() for c in sample["crosses"]])


@pytest.mark.parametrize("skip_cross", [None, 1])
def test_dense_equals_plain_loop_per_sample(skip_cross: int | None) -> None:
    for seed, (tq, ti) in enumerate([(3, 2), (2, 4), (4, 5)]):
        sample = random_sample(seed, tq, ti, skip_cross=skip_cross)
        dense = dense_encoder_decoder_relevance(
            [e.unsqueeze(0) for e in sample["encoder"]], [s.unsqueeze(0) for s in sample["selfs"]],
            [None if c is None else c.unsqueeze(0) for c in sample["crosses"]])
        for got, expected in zip(dense, plain_relevance(*as_lists(sample), tq, ti), strict=True):
            assert torch.allclose(got[0], torch.tensor(expected, dtype=D), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("skip_cross", [None, 1])
def test_padded_batch_equals_each_sample_alone(skip_cross: int | None) -> None:
    samples, positions_q, positions_i, padded = padded_case(skip_cross)
    encoder, selfs, crosses, query_mask, input_mask = padded
    masks = {"input_mask": input_mask, "query_mask": query_mask}
    batch = dense_encoder_decoder_relevance(encoder, selfs, crosses, **masks)
    for b, sample in enumerate(samples):
        alone = dense_encoder_decoder_relevance(
            [e.unsqueeze(0) for e in sample["encoder"]], [s.unsqueeze(0) for s in sample["selfs"]],
            [None if c is None else c.unsqueeze(0) for c in sample["crosses"]])
        expected_lists = plain_relevance(*as_lists(sample), sample["queries"], sample["inputs"])
        q, i = torch.tensor(positions_q[b]), torch.tensor(positions_i[b])
        blocks = (batch.r_ii[b][i][:, i], batch.r_qq[b][q][:, q], batch.r_qi[b][q][:, i])
        for got, one, expected in zip(blocks, alone, expected_lists, strict=True):
            assert torch.allclose(got, one[0], rtol=1e-10, atol=1e-12)
            assert torch.allclose(got, torch.tensor(expected, dtype=D), rtol=1e-10, atol=1e-12)
        # padding: identity rows in R_ii and R_qq, zero rows and columns in R_qi, nothing in real rows
        pad_q, pad_i = ~query_mask[b], ~input_mask[b]
        assert torch.equal(batch.r_qq[b][pad_q], torch.eye(4, dtype=D)[pad_q])
        assert torch.equal(batch.r_ii[b][pad_i], torch.eye(5, dtype=D)[pad_i])
        assert not batch.r_qq[b][query_mask[b]][:, pad_q].any()
        assert not batch.r_qi[b][pad_q].any() and not batch.r_qi[b][:, pad_i].any()


@pytest.mark.parametrize("skip_cross", [None, 1])
def test_rows_equal_dense_multi_head_multi_layer_padded(skip_cross: int | None) -> None:
    _, _, _, (encoder, selfs, crosses, query_mask, input_mask) = padded_case(skip_cross)
    masks = {"input_mask": input_mask, "query_mask": query_mask}
    dense = dense_encoder_decoder_relevance(encoder, selfs, crosses, **masks)
    checked = 0
    for p in range(4):
        real = query_mask[:, p]
        keep = real.nonzero().squeeze(-1)  # samples for which p is a real query
        rows = encoder_decoder_rows(
            [e[keep] for e in encoder],
            [s[keep] for s in selfs],
            [None if c is None else c[keep] for c in crosses],
            torch.full((len(keep),), p), input_mask=input_mask[keep], query_mask=query_mask[keep])
        assert torch.allclose(rows.r_qi, dense.r_qi[keep, p], rtol=1e-10, atol=1e-12)
        assert torch.allclose(rows.r_qq, dense.r_qq[keep, p], rtol=1e-10, atol=1e-12)
        checked += len(keep)
    assert checked == 3 + 2 + 4


def test_rows_with_per_sample_positions_and_zero_sum_rows() -> None:
    # Per-sample query positions in one call, and layers with all-zero rows and with cancelling
    # (clamp=False) rows, so zero-sum rows of R_qq - I and R_ii - I occur in both forms.
    generator = torch.Generator().manual_seed(5)
    batch, tq, ti = 3, 4, 3
    encoder = [torch.randn(batch, ti, ti, generator=generator, dtype=D) for _ in range(2)]
    encoder[0][:, 1] = 0.0  # R_ii row 1 gathers nothing from layer 1 ...
    encoder[1][:, 1] = torch.tensor([0.5, 0.0, -0.5], dtype=D)  # ... and a row that sums to zero from layer 2
    selfs = [torch.randn(batch, tq, tq, generator=generator, dtype=D).tril() for _ in range(3)]
    for s in selfs:
        s[:, 2:] = 0.0  # queries 2 and 3 gather nothing: zero-sum rows of R_qq - I
    crosses = [torch.randn(batch, tq, ti, generator=generator, dtype=D) for _ in range(3)]
    index = torch.tensor([0, 3, 1])
    dense = dense_encoder_decoder_relevance(encoder, selfs, crosses)
    rows = encoder_decoder_rows(encoder, selfs, crosses, index)
    assert torch.isfinite(dense.r_qi).all()
    assert torch.allclose(rows.r_qi, dense.r_qi[torch.arange(batch), index], rtol=1e-10, atol=1e-12)
    assert torch.allclose(rows.r_qq, dense.r_qq[torch.arange(batch), index], rtol=1e-10, atol=1e-12)
    for b in range(batch):  # and the plain loop agrees on the zero-sum handling
        plain = plain_relevance([e[b].tolist() for e in encoder], [s[b].tolist() for s in selfs],
                                [c[b].tolist() for c in crosses], tq, ti)
        assert torch.allclose(dense.r_qi[b], torch.tensor(plain[2], dtype=D), rtol=1e-10, atol=1e-12)


def test_rows_without_encoder_layers() -> None:
    # A decoder cross-attending to inputs that have no self-attention of their own: R_ii = I.
    sample = random_sample(7, 3, 4, encoder_layers=0)
    selfs, crosses = [s.unsqueeze(0) for s in sample["selfs"]], [c.unsqueeze(0) for c in sample["crosses"]]
    dense = dense_encoder_decoder_relevance([], selfs, crosses)
    plain = plain_relevance([], *as_lists(sample)[1:], 3, 4)
    assert torch.allclose(dense.r_qi[0], torch.tensor(plain[2], dtype=D), rtol=1e-10, atol=1e-12)
    rows = encoder_decoder_rows([], selfs, crosses, torch.tensor([2]))
    assert torch.allclose(rows.r_qi[0], dense.r_qi[0, 2], rtol=1e-10, atol=1e-12)


def test_float32_rows_match_dense_at_a_realistic_size() -> None:
    random.seed(0)
    generator = torch.Generator().manual_seed(11)
    batch, tq, ti, heads = 2, 24, 40, 4

    def layer(rows: int, columns: int, causal: bool) -> Tensor:
        scores = torch.randn(batch, heads, rows, columns, generator=generator)
        if causal:
            scores = scores.masked_fill(torch.ones(rows, columns, dtype=torch.bool).triu(1), float("-inf"))
        gradient = torch.randn(batch, heads, rows, columns, generator=generator)
        return weighted_attention(scores.softmax(-1), gradient)

    encoder = [layer(ti, ti, False) for _ in range(3)]
    selfs = [layer(tq, tq, True) for _ in range(4)]
    crosses = [layer(tq, ti, False) for _ in range(4)]
    index = torch.tensor([random.randrange(tq), random.randrange(tq)])
    dense = dense_encoder_decoder_relevance(encoder, selfs, crosses)
    rows = encoder_decoder_rows(encoder, selfs, crosses, index)
    assert torch.allclose(rows.r_qi, dense.r_qi[torch.arange(batch), index], rtol=1e-4, atol=1e-6)
