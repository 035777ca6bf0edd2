"""Behaviour researchers rely on: Captum's conventions, batch invariance, no_grad, a model left as found."""

from __future__ import annotations

import pytest
import torch
from captum.attr import Attribution

from captum_chefer import CheferAttribution, PyHealthAdapter, adapter_for
from captum_chefer.synthetic import quiet_pyhealth
from conftest import first_batch, make_dataset, make_model, make_samples


def chefer_scores(adapter, batch, level="embedding", **options):
    inputs, args = adapter.captum_inputs(batch, level=level)
    target = adapter.captum_target(batch)
    return adapter.to_feature_dict(
        CheferAttribution(adapter).attribute(inputs, target=target, additional_forward_args=args, **options)
    )


def test_captum_conventions(seq_model, seq_batch):
    adapter = PyHealthAdapter(seq_model)
    method = CheferAttribution(adapter)
    assert isinstance(method, Attribution)
    assert method.get_name() == "Chefer"
    assert method.has_convergence_delta() is False
    assert method.multiplies_by_inputs is False

    inputs, args = adapter.captum_inputs(seq_batch)
    out = method.attribute(inputs, target=None, additional_forward_args=args)
    assert isinstance(out, tuple) and len(out) == len(inputs)
    for attribution, x in zip(out, inputs, strict=True):
        assert attribution.shape == x.shape and attribution.dtype == x.dtype
    # spread evenly over the embedding dimension: summing over it gives the token relevance back
    tokens, token_args = adapter.captum_inputs(seq_batch, level="token")
    by_token = method.attribute(tokens, target=None, additional_forward_args=token_args)
    for attribution, token_attribution in zip(out, by_token, strict=True):
        torch.testing.assert_close(attribution.sum(-1), token_attribution)
        assert torch.allclose(attribution, attribution[..., :1].expand_as(attribution))


def test_tensor_in_tensor_out_for_one_stream():
    from pyhealth.datasets import create_sample_dataset

    samples = [{k: v for k, v in s.items() if k != "labs"} for s in make_samples("stagenet", n=6, seed=2)]
    with quiet_pyhealth():
        dataset = create_sample_dataset(samples, {"codes": "stagenet"}, {"label": "binary"}, dataset_name="one")
    model = make_model(dataset, "stagenet", heads=1, seed=2)
    batch = first_batch(dataset)
    adapter = PyHealthAdapter(model)
    (codes,), args = adapter.captum_inputs(batch, level="token")
    out = CheferAttribution(adapter).attribute(codes, target=None, additional_forward_args=args)
    assert isinstance(out, torch.Tensor) and out.shape == codes.shape


def test_a_bare_model_is_refused_with_the_fix(seq_model, seq_batch):
    with pytest.raises(TypeError, match=r"adapter_for\(model\)"):
        CheferAttribution(seq_model)
    adapter = adapter_for(seq_model)
    assert isinstance(adapter, PyHealthAdapter) and adapter_for(adapter) is adapter
    inputs, args = adapter.captum_inputs(seq_batch)
    wrapped = CheferAttribution(adapter).attribute(inputs, additional_forward_args=args)
    assert [tuple(a.shape) for a in wrapped] == [tuple(x.shape) for x in inputs]


@pytest.mark.parametrize(
    "fmt, kind", [("sequence", "transformer"), ("stagenet_nested", "stagenet"), ("stagenet", "stagenet")]
)
def test_batch_gives_what_single_samples_give(fmt, kind):
    from pyhealth.datasets import get_dataloader

    dataset = make_dataset(fmt, n=6, n_classes=3, seed=4)
    model = make_model(dataset, kind, heads=2, seed=4)
    adapter = PyHealthAdapter(model)
    batched = chefer_scores(adapter, first_batch(dataset, batch_size=6))
    for i, single in enumerate(get_dataloader(dataset, batch_size=1, shuffle=False)):
        alone = chefer_scores(adapter, single)
        for key, scores in alone.items():
            region = tuple(slice(0, n) for n in scores.shape[1:])
            torch.testing.assert_close(batched[key][i][region], scores[0], atol=1e-5, rtol=1e-5)
            rest = batched[key][i].clone()
            rest[region] = 0
            assert torch.all(rest == 0), f"sample {i} {key}: batch padding got relevance"


def test_inside_no_grad_and_deterministic(seq_model, seq_batch):
    adapter = PyHealthAdapter(seq_model)
    first = chefer_scores(adapter, seq_batch)
    with torch.no_grad():
        inside = chefer_scores(adapter, seq_batch)
    again = chefer_scores(adapter, seq_batch)
    for key in first:
        assert torch.equal(first[key], inside[key])
        assert torch.equal(first[key], again[key])


def test_dropout_is_off_while_attributing(seq_dataset, seq_batch):
    model = make_model(seq_dataset, layers=2, heads=2, dropout=0.9)
    reference = chefer_scores(PyHealthAdapter(model), seq_batch)  # model.eval() from make_model
    model.train()
    in_training_mode = chefer_scores(PyHealthAdapter(model), seq_batch)
    for key in reference:
        assert torch.equal(reference[key], in_training_mode[key])


def _state(model):
    return (
        [(name, m.training) for name, m in model.named_modules()],
        [(name, p.requires_grad) for name, p in model.named_parameters()],
        [(name, len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()],
        model._attention_hooks_enabled,
    )


def _prepare_state(model):
    model.train()
    model.fc.eval()  # a mixed state must come back as it was, not as model.train(flag) would set it
    model.embedding_model.embedding_layers["conditions"].weight.requires_grad_(False)
    sentinel = torch.full_like(model.fc.weight, 7.0)
    model.fc.weight.grad = sentinel
    return sentinel


def test_model_left_as_found(seq_dataset, seq_batch):
    model = make_model(seq_dataset)
    sentinel = _prepare_state(model)
    before = _state(model)
    chefer_scores(PyHealthAdapter(model), seq_batch)
    assert _state(model) == before
    assert model.fc.weight.grad is sentinel and torch.all(sentinel == 7.0)
    assert all(p.grad is None for n, p in model.named_parameters() if n != "fc.weight")


def test_model_left_as_found_when_an_exception_is_raised_midway(seq_dataset, seq_batch):
    model = make_model(seq_dataset)
    sentinel = _prepare_state(model)
    adapter = PyHealthAdapter(model)
    inputs, args = adapter.captum_inputs(seq_batch)

    def explode(module, args, output):
        raise RuntimeError("boom")

    handle = model.fc.register_forward_hook(explode)
    before = _state(model)
    with pytest.raises(RuntimeError, match="boom"):
        CheferAttribution(adapter).attribute(inputs, additional_forward_args=args)
    assert _state(model) == before
    handle.remove()
    assert model.fc.weight.grad is sentinel


def test_exclude_self_drops_exactly_the_pooling_identity(seq_model, seq_batch):
    adapter = PyHealthAdapter(seq_model)
    default = chefer_scores(adapter, seq_batch, level="token")
    excluded = chefer_scores(adapter, seq_batch, level="token", exclude_self=True)
    # Transformer pools the first code: it alone loses exactly 1, in every sample
    diff = default["conditions"] - excluded["conditions"]
    assert torch.allclose(diff[:, 0], torch.ones(diff.shape[0]))
    assert torch.all(diff[:, 1:] == 0)
    assert torch.all(default["conditions"][:, 0] >= 1)


def test_exclude_self_pools_the_last_valid_step_for_stageattentionnet():
    dataset = make_dataset("stagenet", n=6, seed=6)
    model = make_model(dataset, "stagenet", heads=2, seed=6)
    batch = first_batch(dataset)
    adapter = PyHealthAdapter(model)
    diff = chefer_scores(adapter, batch, level="token")["codes"] - chefer_scores(
        adapter, batch, level="token", exclude_self=True
    )["codes"]
    last = (batch["codes"][1] != 0).sum(dim=1) - 1
    expected = torch.zeros_like(diff)
    expected[torch.arange(diff.shape[0]), last] = 1.0
    torch.testing.assert_close(diff, expected)


def test_sample_with_every_code_padded_and_batch_of_one(seq_model, seq_dataset):
    batch = first_batch(seq_dataset, batch_size=3)
    batch["conditions"] = batch["conditions"].clone()
    batch["conditions"][1] = 0
    scores = chefer_scores(PyHealthAdapter(seq_model), batch)
    assert torch.all(scores["conditions"][1] == 0)
    assert torch.all(torch.isfinite(scores["procedures"]))
    assert torch.all(scores["conditions"][0, 0] >= 1)

    one = first_batch(seq_dataset, batch_size=1)
    alone = chefer_scores(PyHealthAdapter(seq_model), one)
    assert alone["conditions"].shape == one["conditions"].shape
    assert alone["conditions"][0, 0] >= 1


def test_adapter_forward_equals_the_model(seq_model, seq_batch):
    adapter = PyHealthAdapter(seq_model)
    expected = seq_model(**seq_batch)["logit"]
    for level in ("embedding", "token"):
        inputs, args = adapter.captum_inputs(seq_batch, level=level)
        torch.testing.assert_close(adapter(*inputs, *args), expected)


def test_per_sample_targets_give_per_sample_calls():
    dataset = make_dataset("sequence", n=6, n_classes=3, seed=9)
    model = make_model(dataset, layers=2, heads=2, seed=9)
    batch = first_batch(dataset)
    adapter = PyHealthAdapter(model)
    inputs, args = adapter.captum_inputs(batch, level="token")
    targets = torch.tensor([0, 1, 2, 2, 1, 0])
    mixed = CheferAttribution(adapter).attribute(inputs, target=targets, additional_forward_args=args)
    for cls in range(3):
        fixed = CheferAttribution(adapter).attribute(inputs, target=cls, additional_forward_args=args)
        rows = targets == cls
        for m, f in zip(mixed, fixed, strict=True):
            torch.testing.assert_close(m[rows], f[rows])
