"""Equal to the reference: PyHealth 2.1's ``CheferRelevance`` on the same model and batch.

PyHealth spreads a nested visit's score over every code slot of the visit, padding included; we give
padding zero. So the comparison is on real codes, and padding is checked to be exactly zero.
"""

from __future__ import annotations

import pytest
import torch

from captum_chefer import CheferAttribution, PyHealthAdapter
from conftest import first_batch, make_dataset, make_model

ATOL = 1e-5


def pyhealth_reference(model, batch, target_class_idx=None) -> dict[str, torch.Tensor]:
    from pyhealth.interpret.methods import CheferRelevance

    return CheferRelevance(model).attribute(target_class_idx=target_class_idx, **batch)


def with_explicit_masks(batch: dict) -> dict:
    """PyHealth's StageAttentionNet needs a trailing (time, codes, mask) for flat codes."""
    out = dict(batch)
    for key, value in batch.items():
        if isinstance(value, tuple):
            time, codes = value
            out[key] = (time, codes, (codes != 0).int())
    return out


def codes_of(batch: dict, key: str) -> torch.Tensor:
    value = batch[key]
    return value[1] if isinstance(value, tuple) else value


def ours(model, batch, level: str, target=None) -> dict[str, torch.Tensor]:
    adapter = PyHealthAdapter(model)
    inputs, args = adapter.captum_inputs(batch, level=level)
    if target is None:
        target = adapter.captum_target(batch)
    attributions = CheferAttribution(adapter).attribute(inputs, target=target, additional_forward_args=args)
    return adapter.to_feature_dict(attributions)


def assert_matches(result: dict, reference: dict, batch: dict) -> None:
    assert result.keys() == reference.keys()
    for key, expected in reference.items():
        real = codes_of(batch, key) != 0
        assert result[key].shape == real.shape, key
        assert expected.shape == real.shape, key
        torch.testing.assert_close(result[key][real], expected[real], atol=ATOL, rtol=0, msg=key)
        assert torch.all(result[key][~real] == 0), f"{key}: padding got relevance"


@pytest.mark.parametrize("level", ["embedding", "token"])
@pytest.mark.parametrize(
    "layers, heads, n_classes",
    [(1, 1, 2), (2, 2, 2), (3, 4, 2), (1, 4, 3), (2, 1, 3), (3, 2, 4)],
)
def test_transformer_matches_pyhealth(layers, heads, n_classes, level):
    dataset = make_dataset("sequence", n=10, n_classes=n_classes, seed=layers * 10 + heads)
    model = make_model(dataset, "transformer", layers=layers, heads=heads, seed=layers + heads)
    batch = first_batch(dataset, batch_size=7)
    assert_matches(ours(model, batch, level), pyhealth_reference(model, batch), batch)


@pytest.mark.parametrize("fmt", ["stagenet", "stagenet_nested"])
@pytest.mark.parametrize("heads, n_classes", [(1, 2), (2, 3), (4, 2)])
@pytest.mark.parametrize("level", ["embedding", "token"])
def test_stageattentionnet_matches_pyhealth(fmt, heads, n_classes, level):
    dataset = make_dataset(fmt, n=10, n_classes=n_classes, seed=heads)
    model = make_model(dataset, "stagenet", heads=heads, seed=heads)
    batch = first_batch(dataset, batch_size=7)
    assert_matches(ours(model, batch, level), pyhealth_reference(model, with_explicit_masks(batch)), batch)


def test_explicit_class_matches_pyhealth():
    dataset = make_dataset("sequence", n=8, n_classes=3, seed=5)
    model = make_model(dataset, layers=2, heads=2, seed=5)
    batch = first_batch(dataset, batch_size=8)
    for cls in range(3):
        assert_matches(ours(model, batch, "embedding", target=cls), pyhealth_reference(model, batch, cls), batch)


def test_flat_stagenet_works_where_pyhealth_needs_an_explicit_mask():
    dataset = make_dataset("stagenet", n=8, seed=3)
    model = make_model(dataset, "stagenet", heads=2, seed=3)
    batch = first_batch(dataset, batch_size=8)
    with pytest.raises(IndexError):  # PyHealth 2.1 cannot find the last valid step of flat codes
        pyhealth_reference(model, batch)
    result = ours(model, batch, "embedding")
    assert_matches(result, pyhealth_reference(model, with_explicit_masks(batch)), batch)


def test_sequences_longer_than_max_seq_len():
    dataset = make_dataset("sequence", n=6, seed=8, max_len=9)
    model = make_model(dataset, layers=2, heads=2, seed=8, max_seq_len=4)
    batch = first_batch(dataset, batch_size=6)
    codes = batch["conditions"]
    assert codes.shape[1] > 4, "the fixture must hold sequences longer than max_seq_len"
    result = ours(model, batch, "embedding")
    reference = pyhealth_reference(model, batch)  # PyHealth returns only the 4 positions it kept
    assert result["conditions"].shape == codes.shape
    assert torch.all(result["conditions"][:, 4:] == 0)
    real = codes[:, :4] != 0
    torch.testing.assert_close(result["conditions"][:, :4][real], reference["conditions"][real], atol=ATOL, rtol=0)
