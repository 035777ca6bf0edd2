"""PyHealth models beyond the two the equivalence suite covers: StageAttentionNet on plain codes, compiled models."""

from __future__ import annotations

import random
import warnings

import pytest
import torch

from captum_chefer import CheferAttribution, PyHealthAdapter, adapter_for
from captum_chefer.synthetic import quiet_pyhealth
from tests.conftest import first_batch, make_dataset, make_model


def _plain_codes_dataset(n_classes: int = 2, seed: int = 0):
    from pyhealth.datasets import create_sample_dataset

    rng = random.Random(seed)
    samples = [
        {
            "patient_id": f"p{i}", "visit_id": "v", "label": i % n_classes,
            "conditions": [f"C{rng.randrange(9)}" for _ in range(rng.randint(1, 6))],
            "procedures": [
                [f"P{rng.randrange(5)}" for _ in range(rng.randint(1, 3))] for _ in range(rng.randint(1, 4))
            ],
        }
        for i in range(10)
    ]
    with quiet_pyhealth():
        return create_sample_dataset(
            samples=samples, input_schema={"conditions": "sequence", "procedures": "nested_sequence"},
            output_schema={"label": "binary" if n_classes == 2 else "multiclass"}, dataset_name=f"plain-{seed}",
        )


@pytest.mark.parametrize("heads, n_classes", [(1, 2), (2, 3)])
@pytest.mark.parametrize("level", ["embedding", "token"])
def test_stageattentionnet_on_plain_codes_matches_pyhealths_reference(heads, n_classes, level):
    """PyHealth's CheferRelevance crashes on plain `sequence` features of StageAttentionNet; its older
    reference function (kept in pyhealth.interpret.methods.chefer) runs, and is the independent value."""
    from pyhealth.interpret.methods import CheferRelevance
    from pyhealth.interpret.methods.chefer import _reference_attribute_stageattn

    dataset = _plain_codes_dataset(n_classes, seed=heads)
    model = make_model(dataset, "stagenet", heads=heads, seed=heads)
    batch = first_batch(dataset, batch_size=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(IndexError):
            CheferRelevance(model).attribute(**batch)
    adapter = PyHealthAdapter(model)
    target = adapter.captum_target(batch)
    inputs, args = adapter.captum_inputs(batch, level=level)
    attributions = CheferAttribution(adapter).attribute(inputs, target=target, additional_forward_args=args)
    scores = adapter.to_feature_dict(attributions)

    model.set_attention_hooks(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = _reference_attribute_stageattn(model, class_index=0 if target is None else target, **batch)
    finally:
        model.set_attention_hooks(False)
    for key, expected in reference.items():
        codes = batch[key]
        real = codes != 0
        ours = scores[key]
        if codes.dim() == 3:  # visits: each real code of a visit carries the visit's score
            expected = expected.unsqueeze(-1).expand(codes.shape)
        torch.testing.assert_close(ours[real], expected[real], atol=1e-5, rtol=0, msg=key)
        assert torch.all(ours[~real] == 0)


def test_compiled_model_is_accepted_and_gives_the_uncompiled_numbers():
    dataset = make_dataset("sequence", n=8, seed=2)
    model = make_model(dataset, layers=2, heads=2, seed=2)
    batch = first_batch(dataset)
    compiled = torch.compile(model)
    adapter, reference = PyHealthAdapter(compiled), PyHealthAdapter(model)
    assert adapter.model is model and type(adapter_for(compiled)) is PyHealthAdapter
    inputs, args = reference.captum_inputs(batch)
    expected = CheferAttribution(reference).attribute(inputs, additional_forward_args=args)
    compiled_inputs, compiled_args = adapter.captum_inputs(batch)
    got = CheferAttribution(adapter).attribute(compiled_inputs, additional_forward_args=compiled_args)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
