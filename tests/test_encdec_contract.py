"""The encoder-decoder rules' contract beyond their values: every shape check on its own, with its whole
message; float32 at least (bfloat16 in, float32 out); and a decoder of one layer, whose
numbers are worked out by hand below."""

from __future__ import annotations

import re

import pytest
import torch

from captum_chefer.relevance import (
    dense_encoder_decoder_relevance,
    encoder_decoder_rows,
    mask_padding,
    normalize_relevance,
    propagate_cross_attention,
    propagate_self_attention,
)


def _exactly(message: str) -> str:
    return "^" + re.escape(message) + "$"


def test_mask_padding_names_the_wrong_argument():
    with pytest.raises(ValueError, match=_exactly("weighted attention must be [B, Tq, Tk], got (2, 3)")):
        mask_padding(torch.ones(2, 3))
    for name, mask, expected in (("query_mask", torch.ones(1, 3, dtype=torch.bool), (1, 2)),
                                 ("key_mask", torch.ones(1, 2, dtype=torch.bool), (1, 3))):
        with pytest.raises(ValueError, match=_exactly(
            f"{name} must be [B, T] = {expected} with True on real tokens and False on padding; got {tuple(mask.shape)}"
        )):
            mask_padding(torch.zeros(1, 2, 3), **{name: mask})


def test_normalize_relevance_refuses_what_is_not_a_batch_of_square_matrices():
    for shape in [(2, 3), (2, 3, 4), (3, 2, 4), (1, 2, 2, 2)]:
        with pytest.raises(ValueError, match=_exactly(f"relevance must be square [B, T, T], got {shape}")):
            normalize_relevance(torch.ones(shape))


def test_self_update_refuses_each_mismatch_alone():
    good = {"r_qq": torch.eye(3).expand(2, 3, 3), "r_qi": torch.zeros(2, 3, 4), "weighted": torch.ones(2, 3, 3)}
    bad = [("r_qq", torch.eye(3)), ("r_qi", torch.zeros(3, 4)), ("weighted", torch.ones(2, 3, 4)),
           ("r_qi", torch.zeros(2, 2, 4)), ("r_qi", torch.zeros(1, 3, 4))]
    cases = [{**good, name: value} for name, value in bad] + [
        {"r_qq": torch.eye(3), "r_qi": torch.zeros(3, 3, 4), "weighted": torch.ones(3, 3)},  # only R_qq is not 3-D
        {"r_qq": torch.eye(3).expand(2, 3, 3), "r_qi": torch.zeros(2, 3), "weighted": torch.ones(2, 3, 3)},  # only R_qi
    ]
    for args in cases:
        shapes = ", ".join(str(tuple(args[k].shape)) for k in ("r_qq", "r_qi"))
        message = (f"expected R_qq [B, Tq, Tq], R_qi [B, Tq, Ti] and A_bar [B, Tq, Tq]; got {shapes} and "
                   f"{tuple(args['weighted'].shape)}")
        with pytest.raises(ValueError, match=_exactly(message)):
            propagate_self_attention(args["r_qq"], args["r_qi"], args["weighted"])
    propagate_self_attention(**good)


def test_cross_update_refuses_each_mismatch_alone():
    good = {"r_qq": torch.eye(3).expand(2, 3, 3), "r_qi": torch.zeros(2, 3, 4), "r_ii": torch.eye(4).expand(2, 4, 4),
            "weighted": torch.ones(2, 3, 4)}
    bad = [("r_qq", torch.eye(3).expand(2, 3, 3)[:, :2]), ("r_ii", torch.eye(4)[:3].expand(2, 3, 4)),
           ("weighted", torch.ones(2, 3, 3)), ("r_qq", torch.eye(3).expand(1, 3, 3))]
    for name, value in bad:
        args = {**good, name: value}
        shapes = ", ".join(str(tuple(args[k].shape)) for k in ("r_qq", "r_qi", "r_ii"))
        message = ("expected R_qq [B, Tq, Tq], R_qi [B, Tq, Ti], R_ii [B, Ti, Ti] and cross-attention A_bar "
                   f"[B, Tq, Ti]; got {shapes} and {tuple(args['weighted'].shape)}")
        with pytest.raises(ValueError, match=_exactly(message)):
            propagate_cross_attention(args["r_qq"], args["r_qi"], args["r_ii"], args["weighted"])
    propagate_cross_attention(**good)


def test_stacks_of_layers_are_checked_with_messages_that_name_the_layer():
    encoder, selfs, crosses = [torch.zeros(1, 2, 2)], [torch.zeros(1, 3, 3)] * 2, [torch.zeros(1, 3, 2)] * 2
    for function in (dense_encoder_decoder_relevance, lambda *a: encoder_decoder_rows(*a, torch.tensor([0]))):
        with pytest.raises(ValueError, match=_exactly(
            "give one self-attention and one cross-attention A_bar per decoder layer (None for a layer without "
            "cross-attention); got 2 and 1"
        )):
            function(encoder, selfs, crosses[:1])
        with pytest.raises(ValueError, match=r"got 0 and 0$"):
            function(encoder, [], [])
        with pytest.raises(ValueError, match=_exactly(
            "no decoder layer has a cross-attention A_bar: use dense_relevance for a decoder alone"
        )):
            function(encoder, selfs, [None, None])
        cases = [
            (([torch.zeros(1, 2, 2), torch.zeros(1, 3, 3)], selfs, crosses),
             "encoder self-attention A_bar of layer 1 is (1, 3, 3), expected (1, 2, 2)"),
            ((encoder, [selfs[0], torch.zeros(1, 2, 2)], crosses),
             "decoder self-attention A_bar of layer 1 is (1, 2, 2), expected (1, 3, 3)"),
            ((encoder, selfs, [crosses[0], torch.zeros(1, 3, 4)]),
             "decoder cross-attention A_bar of layer 1 is (1, 3, 4), expected (1, 3, 2)"),
        ]
        for args, start in cases:
            message = start + " ([B, Tq, Ti] from the first cross-attention layer)"
            with pytest.raises(ValueError, match=_exactly(message)):
                function(*args)


def test_rows_check_the_query_positions():
    encoder, selfs, crosses = [torch.zeros(2, 2, 2)], [torch.zeros(2, 3, 3)], [torch.zeros(2, 3, 2)]
    with pytest.raises(
        ValueError, match=_exactly("query_index must be [B] = (2,), one query position per sample; got (1,)")
    ):
        encoder_decoder_rows(encoder, selfs, crosses, torch.tensor([0]))
    for index in ([0, 3], [-1, 0], [5, -2]):
        with pytest.raises(ValueError, match=_exactly(f"query_index must lie in [0, 3); got {index}")):
            encoder_decoder_rows(encoder, selfs, crosses, torch.tensor(index))
    encoder_decoder_rows(encoder, selfs, crosses, torch.tensor([2, 0]))  # the last position is a position
    with pytest.raises(ValueError, match=_exactly(
        "query_mask must be [B, T] = (2, 3) with True on real tokens and False on padding; got (2, 2)"
    )):
        encoder_decoder_rows(
            encoder, selfs, crosses, torch.tensor([0, 0]), query_mask=torch.ones(2, 2, dtype=torch.bool)
        )
    padded = torch.tensor([[True, True, True], [True, True, False]])
    with pytest.raises(ValueError, match=_exactly(
        "query_index points at a padded query position: give the position of a real token"
    )):
        encoder_decoder_rows(encoder, selfs, crosses, torch.tensor([2, 2]), query_mask=padded)


def test_one_decoder_layer_by_hand():
    # Encoder A_bar E = [[1, 1], [0, .5]]: R_ii = [[2, 1], [0, 1.5]], norm(R_ii) = [[1.5, .5], [0, 2]].
    # Decoder self S = [[0, 0], [.5, .5]]: R_qq = [[1, 0], [.5, 1.5]]; R_qq - I = S, row sums 0 and 1, so
    # norm(R_qq) = [[1, 0], [.5, 1.5]] (row 0 keeps the identity). Cross C = [[1, 0], [.5, .5]]:
    # C norm(R_ii) = [[1.5, .5], [.75, 1.25]]; norm(R_qq)^T = [[1, .5], [0, 1.5]];
    # R_qi = [[1.5 + .375, .5 + .625], [1.125, 1.875]] = [[1.875, 1.125], [1.125, 1.875]].
    encoder = [torch.tensor([[[1.0, 1.0], [0.0, 0.5]]])]
    selfs, crosses = [torch.tensor([[[0.0, 0.0], [0.5, 0.5]]])], [torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])]
    dense = dense_encoder_decoder_relevance(encoder, selfs, crosses)
    torch.testing.assert_close(dense.r_qi, torch.tensor([[[1.875, 1.125], [1.125, 1.875]]]))
    torch.testing.assert_close(dense.r_qq, torch.tensor([[[1.0, 0.0], [0.5, 1.5]]]))
    for p in (0, 1):
        rows = encoder_decoder_rows(encoder, selfs, crosses, torch.tensor([p]))
        torch.testing.assert_close(rows.r_qi, dense.r_qi[:, p])
        torch.testing.assert_close(rows.r_qq, dense.r_qq[:, p])


@pytest.mark.parametrize("with_encoder", [True, False])
def test_bfloat16_layers_give_float32_relevance(with_encoder):
    """The rules upcast half-precision layers: bfloat16 in, float32 out (its 8 bits would round small increments
    away), as close to the float64 rules as the bfloat16 rounding of the layers allows."""
    generator = torch.Generator().manual_seed(0)
    encoder = [torch.rand(2, 4, 4, generator=generator) / 4 for _ in range(2)] if with_encoder else []
    selfs = [torch.rand(2, 3, 3, generator=generator).tril() / 3 for _ in range(2)]
    crosses = [torch.rand(2, 3, 4, generator=generator) / 4, None]

    def low(layers):
        return [None if w is None else w.bfloat16() for w in layers]

    index = torch.tensor([2, 1])
    exact = dense_encoder_decoder_relevance([w.double() for w in encoder], [w.double() for w in selfs],
                                            [None if w is None else w.double() for w in crosses])
    dense = dense_encoder_decoder_relevance(low(encoder), low(selfs), low(crosses))
    rows = encoder_decoder_rows(low(encoder), low(selfs), low(crosses), index)
    assert dense.r_ii.dtype == dense.r_qq.dtype == dense.r_qi.dtype == torch.float32
    assert rows.r_qi.dtype == rows.r_qq.dtype == torch.float32
    torch.testing.assert_close(dense.r_qi.double(), exact.r_qi, atol=0.05, rtol=0.03)
    torch.testing.assert_close(rows.r_qi.double(), exact.r_qi[torch.arange(2), index], atol=0.05, rtol=0.03)
    torch.testing.assert_close(
        normalize_relevance(exact.r_qq.bfloat16()).double(), normalize_relevance(exact.r_qq), atol=0.05, rtol=0.03
    )
    assert normalize_relevance(exact.r_qq.bfloat16()).dtype == torch.float32


def test_the_dense_rules_stay_on_the_device_of_their_layers():
    """On PyTorch's ``meta`` device (shapes without data) nothing may be created on the default device, and
    masks given on the CPU are moved to the layers."""
    meta = torch.device("meta")
    encoder, selfs, crosses = (
        [torch.empty(2, 4, 4, device=meta)], [torch.empty(2, 3, 3, device=meta)], [torch.empty(2, 3, 4, device=meta)]
    )
    masks = {"input_mask": torch.ones(2, 4, dtype=torch.bool), "query_mask": torch.ones(2, 3, dtype=torch.bool)}
    outputs = [*dense_encoder_decoder_relevance(encoder, selfs, crosses, **masks),
               *dense_encoder_decoder_relevance([], selfs, crosses),
               normalize_relevance(torch.empty(2, 3, 3, device=meta), masks["query_mask"]),
               mask_padding(crosses[0], masks["query_mask"], masks["input_mask"])]
    assert [out.device for out in outputs] == [meta] * len(outputs)
