"""A multilabel PyHealth ``Transformer`` (one logit per label, several true labels per sample).

Chefer with a per-sample class target is checked against PyHealth 2.1's ``CheferRelevance`` (which takes one
class for the whole batch: it is called once per class), Saliency against the gradient taken here with
``torch.autograd``, and Integrated Gradients against its completeness property.
"""

from __future__ import annotations

import random

import pytest
import torch
from captum.attr import IntegratedGradients, Saliency
from test_equivalence import assert_matches, pyhealth_reference

from captum_chefer import CheferAttribution, PyHealthAdapter, ig_baselines
from captum_chefer.synthetic import quiet_pyhealth
from conftest import first_batch

LABELS = ["L0", "L1", "L2", "L3"]


@pytest.fixture(scope="module")
def multilabel():
    """(model, batch): a 2-layer, 2-head Transformer over a flat and a nested stream, 4 labels, 8 samples."""
    from pyhealth.datasets import create_sample_dataset
    from pyhealth.models import Transformer

    rng = random.Random(3)
    samples = [
        {
            "patient_id": f"p{i}", "visit_id": "v0",
            "conditions": [f"C{rng.randrange(12)}" for _ in range(rng.randint(1, 6))],
            "procedures": [
                [f"P{rng.randrange(6)}" for _ in range(rng.randint(1, 3))] for _ in range(rng.randint(1, 3))
            ],
            "label": rng.sample(LABELS, rng.randint(1, 3)),
        }
        for i in range(8)
    ]
    with quiet_pyhealth():
        dataset = create_sample_dataset(
            samples=samples, input_schema={"conditions": "sequence", "procedures": "nested_sequence"},
            output_schema={"label": "multilabel"}, dataset_name="multilabel",
        )
        torch.manual_seed(3)
        model = Transformer(dataset=dataset, embedding_dim=16, heads=2, num_layers=2).eval()
    return model, first_batch(dataset, batch_size=8)


def test_the_model_is_multilabel(multilabel):
    model, batch = multilabel
    adapter = PyHealthAdapter(model)
    assert model.mode == "multilabel" and adapter.num_outputs == len(LABELS)
    assert (batch["label"].sum(dim=1) > 1).any()  # several true labels in some samples
    with torch.no_grad():
        expected = model(**batch)["logit"].argmax(dim=1)
    assert torch.equal(adapter.captum_target(batch), expected)
    with pytest.raises(
        ValueError, match=r"^a multilabel model has several true classes per sample; pass target=class index$"
    ):
        adapter.captum_target(batch, mode="label")


@pytest.mark.parametrize("level", ["embedding", "token"])
def test_chefer_with_a_class_per_sample_matches_pyhealth(multilabel, level):
    model, batch = multilabel
    adapter = PyHealthAdapter(model)
    inputs, args = adapter.captum_inputs(batch, level=level)
    target = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    attributions = CheferAttribution(adapter).attribute(inputs, target=target, additional_forward_args=args)
    ours = adapter.to_feature_dict(attributions)
    for cls in range(len(LABELS)):
        rows = target == cls
        reference = pyhealth_reference(model, batch, cls)
        part = {key: value[rows] for key, value in batch.items() if key in adapter.feature_keys}
        assert_matches({k: v[rows] for k, v in ours.items()}, {k: v[rows] for k, v in reference.items()}, part)
    # and with no class given, both explain each sample's highest logit
    predicted = adapter.to_feature_dict(CheferAttribution(adapter).attribute(
        inputs, target=adapter.captum_target(batch), additional_forward_args=args))
    assert_matches(predicted, pyhealth_reference(model, batch), batch)


def test_saliency_is_the_gradient_of_each_samples_class(multilabel):
    model, batch = multilabel
    adapter = PyHealthAdapter(model)
    inputs, args = adapter.captum_inputs(batch)
    target = torch.tensor([3, 2, 1, 0, 0, 1, 2, 3])
    saliency = Saliency(adapter).attribute(inputs, target=target, additional_forward_args=args)
    leaves = tuple(x.clone().requires_grad_(True) for x in inputs)
    chosen = adapter(*leaves, *args).gather(1, target.view(-1, 1)).sum()
    for got, grad in zip(saliency, torch.autograd.grad(chosen, leaves), strict=True):
        torch.testing.assert_close(got, grad.abs())
    for key, scores in adapter.to_feature_dict(saliency).items():
        real = batch[key] != 0
        assert torch.all(scores[~real] == 0) and scores[real].abs().sum() > 0


def test_integrated_gradients_is_complete_for_each_samples_class(multilabel):
    model, batch = multilabel
    adapter = PyHealthAdapter(model)
    inputs, args = adapter.captum_inputs(batch)
    target = torch.tensor([1, 1, 0, 2, 3, 3, 0, 2])
    baselines = ig_baselines(adapter, inputs, args)
    ig = IntegratedGradients(adapter).attribute(
        inputs, baselines=baselines, target=target, additional_forward_args=args, n_steps=32, internal_batch_size=512,
    )
    with torch.no_grad():
        index = target.view(-1, 1)
        gap = adapter(*inputs, *args).gather(1, index) - adapter(*baselines, *args).gather(1, index)
    total = sum(a.reshape(a.shape[0], -1).sum(dim=1) for a in ig)
    assert gap.abs().median() > 0.05  # the check is not vacuous
    torch.testing.assert_close(total, gap[:, 0], atol=1e-4 * float(gap.abs().max()), rtol=0)
    for key, scores in adapter.to_feature_dict(ig).items():
        assert torch.all(scores[batch[key] == 0] == 0)


def test_log_odds_of_a_sigmoid_label_is_its_logit(multilabel):
    """Each label of a multilabel model is its own sigmoid, whose log-odds is the label's logit: score="log_odds"
    must give exactly the logit's relevance (a softmax over the labels would mix the other labels in)."""
    model, batch = multilabel
    adapter = PyHealthAdapter(model)
    inputs, args = adapter.captum_inputs(batch)
    target = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    chefer = CheferAttribution(adapter)
    log_odds = chefer.attribute(inputs, target=target, additional_forward_args=args, score="log_odds")
    logit = chefer.attribute(inputs, target=target, additional_forward_args=args, score="logit")
    for a, b in zip(log_odds, logit, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # and it differs from the softmax log-odds, so the check above can fail
    from captum_chefer.relevance import softmax_log_odds

    with torch.no_grad():
        logits = adapter(*inputs, *args)
    assert not torch.allclose(softmax_log_odds(logits, target), logits.gather(1, target.view(-1, 1)).view(-1))
