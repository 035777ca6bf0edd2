"""The examples of docs/beyond-pyhealth.md run as written, each on its own."""

from __future__ import annotations

import pytest

from tests.test_readme_generation import ROOT, python_blocks

BLOCKS = python_blocks(ROOT / "docs" / "beyond-pyhealth.md")
NAMES = ["bert", "vit", "transformer-encoder", "pyhealth-vit", "pyhealth-text"]


def test_the_page_has_the_five_examples():
    assert len(BLOCKS) == 5
    assert [("HuggingFaceAdapter" in b or "adapter_for" in b) for b in BLOCKS[:2]] == [True, True]
    assert "TransformerAdapter" in BLOCKS[2] and "TorchvisionModel" in BLOCKS[3] and "TransformersModel" in BLOCKS[4]


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=NAMES[: len(BLOCKS)])
def test_example_runs(index, capsys):
    namespace: dict = {}
    exec(compile(BLOCKS[index], f"Beyond PyHealth example {NAMES[index]}", "exec"), namespace)
    out = capsys.readouterr().out
    if index == 0:
        relevance, mask = namespace["relevance"], namespace["encoding"]["attention_mask"]
        assert relevance.shape == mask.shape and (relevance[mask == 0] == 0).all()
        assert "'fever'" in out and "sdpa" in out
    elif index == 1:
        assert namespace["attributions"][0].shape == (2, 3, 32, 32) and "torch.Size([2, 16])" in out
    elif index == 2:
        assert namespace["relevance"].shape == (2, 4) and (namespace["relevance"][1, 2:] == 0).all()
        assert namespace["saliency"].shape == (2, 4, 16)
    elif index == 3:
        assert namespace["adapter"].to_feature_dict(namespace["attributions"])["image"].shape == (4, 4)
    else:
        assert namespace["relevance"].shape == namespace["tokens"][0].shape and "'sepsis'" in out
