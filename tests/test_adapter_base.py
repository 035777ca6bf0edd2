"""Shared adapter pieces: patch relevance to pixels and back (hand-computed), records with method names."""

from __future__ import annotations

import pytest
import torch

from captum_chefer.adapters.base import spread_over_patches, sum_over_patches


def test_spread_over_patches_by_hand():
    # a 2-channel 5x5 image, patches of 2x2: a 2x2 grid (the last row and column are outside it)
    relevance = torch.tensor([[8.0, 16.0, 24.0, 32.0]])
    pixels = spread_over_patches(relevance, (1, 2, 5, 5), 2)
    # each patch has 2 channels x 4 pixels = 8 cells: 1, 2, 3, 4 per cell
    expected_channel = torch.tensor(
        [
            [1.0, 1.0, 2.0, 2.0, 0.0],
            [1.0, 1.0, 2.0, 2.0, 0.0],
            [3.0, 3.0, 4.0, 4.0, 0.0],
            [3.0, 3.0, 4.0, 4.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    assert torch.equal(pixels[0, 0], expected_channel) and torch.equal(pixels[0, 1], expected_channel)
    assert torch.equal(sum_over_patches(pixels, 2), relevance)
    assert torch.equal(sum_over_patches(spread_over_patches(relevance, (1, 2, 4, 8), (2, 4)), (2, 4)), relevance)
    with pytest.raises(ValueError, match="2x2 = 4 patches"):
        spread_over_patches(torch.ones(1, 5), (1, 2, 5, 5), 2)
