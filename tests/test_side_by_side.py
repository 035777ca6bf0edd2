"""Chefer next to Captum's methods on one adapter: padding, targets, baselines, metrics, PyHealth's Evaluator."""

from __future__ import annotations

import pytest
import torch
from captum.attr import (
    InputXGradient,
    IntegratedGradients,
    LayerIntegratedGradients,
    NoiseTunnel,
    Saliency,
)
from captum.metrics import infidelity, sensitivity_max

from captum_chefer import CheferAttribution, PyHealthAdapter
from captum_chefer.comparison import (
    Comparison,
    EvaluatorMethod,
    compare_methods,
    ig_baselines,
    token_removal_perturbation,
)


@pytest.fixture(scope="module")
def planted_batches(planted_model):
    from pyhealth.datasets import get_dataloader

    return list(get_dataloader(planted_model.dataset, batch_size=16, shuffle=False))


@pytest.fixture(scope="module")
def planted(planted_model, planted_batches):
    """(adapter, batch): 16 samples, half carrying the planted code."""
    return PyHealthAdapter(planted_model), planted_batches[0]



def _slice(tensors, i):
    return tuple(t[i : i + 1] for t in tensors)


def test_each_method_puts_nothing_on_padding(planted):
    adapter, batch = planted
    methods = [
        CheferAttribution(adapter),
        ("IG", IntegratedGradients(adapter), {"n_steps": 16, "internal_batch_size": 64}),
        Saliency(adapter),
        InputXGradient(adapter),
        ("NT Chefer", NoiseTunnel(CheferAttribution(adapter)), {"nt_samples": 3, "stdevs": 0.1}),
        ("NT Saliency", NoiseTunnel(Saliency(adapter)), {"nt_samples": 3, "stdevs": 0.1}),
        ("LIG", LayerIntegratedGradients(adapter, adapter.embedding_layers), {"n_steps": 16}),
    ]
    result = compare_methods(adapter, batch, methods)
    assert result.methods == ["Chefer", "IG", "Saliency", "Input X Gradient", "NT Chefer", "NT Saliency", "LIG"]
    for name, scores in result.scores.items():
        for key in adapter.feature_keys:
            codes = batch[key]
            assert tuple(scores[key].shape) == tuple(codes.shape), (name, key)
            assert torch.all(scores[key][codes == 0] == 0), f"{name} puts attribution on padding of {key}"
            assert scores[key][codes != 0].abs().sum() > 0, f"{name} gives {key} nothing at all"
        assert result.seconds_per_sample[name] > 0


def test_adapter_forward_ignores_padding_embeddings(planted):
    """The adapter multiplies embedding inputs by the code masks: noise on padding (NoiseTunnel,
    sensitivity_max) changes nothing, and raw gradients on padding are exactly zero for every method,
    also on padded code slots inside real visits, which PyHealth's visit sum would otherwise reach."""
    adapter, batch = planted
    inputs, args = adapter.captum_inputs(batch)
    noisy = tuple(
        x + 3.0 * torch.randn_like(x) * (batch[k] == 0).unsqueeze(-1)
        for k, x in zip(adapter.feature_keys, inputs, strict=True)
    )
    with torch.no_grad():
        torch.testing.assert_close(adapter(*noisy, *args), adapter(*inputs, *args))
    grads = adapter.to_feature_dict(Saliency(adapter).attribute(noisy, target=0, additional_forward_args=args))
    procedures = batch["procedures"]
    slot_in_real_visit = (procedures == 0) & (procedures != 0).any(dim=-1, keepdim=True)
    assert slot_in_real_visit.any() and torch.all(grads["procedures"][procedures == 0] == 0)
    assert (batch["conditions"] == 0).any() and torch.all(grads["conditions"][batch["conditions"] == 0] == 0)


def test_per_sample_tensor_targets_match_per_example_calls(planted):
    adapter, batch = planted
    inputs, args = adapter.captum_inputs(batch)
    target = torch.tensor([i % 2 for i in range(inputs[0].shape[0])])
    base = ig_baselines(adapter, inputs, args)
    for method, kwargs in [
        (CheferAttribution(adapter), {}),
        (Saliency(adapter), {}),
        (IntegratedGradients(adapter), {"n_steps": 8}),
    ]:
        together = method.attribute(
            inputs, target=target, additional_forward_args=args, **kwargs,
            **({"baselines": base} if "n_steps" in kwargs else {}),
        )
        for i in range(0, inputs[0].shape[0], 5):
            extra = {"baselines": _slice(base, i)} if "n_steps" in kwargs else {}
            alone = method.attribute(
                _slice(inputs, i), target=int(target[i]), additional_forward_args=_slice(args, i), **kwargs, **extra
            )
            for a, b in zip(together, alone, strict=True):
                torch.testing.assert_close(a[i : i + 1], b, rtol=1e-4, atol=1e-5)


def _ig_delta(adapter, batch, reference, n_steps):
    inputs, args = adapter.captum_inputs(batch)
    target = adapter.captum_target(batch)
    baselines = ig_baselines(adapter, inputs, args, reference=reference)
    _, delta = IntegratedGradients(adapter).attribute(
        inputs, baselines=baselines, target=target, additional_forward_args=args, n_steps=n_steps,
        internal_batch_size=1024, return_convergence_delta=True,
    )
    with torch.no_grad():
        index = target.view(-1, 1)
        gap = adapter(*inputs, *args).gather(1, index) - adapter(*baselines, *args).gather(1, index)
    return delta.abs(), gap.abs()


def test_ig_convergence_delta_is_small(planted):
    """The UNK reference converges; the zero embedding does not (LayerNorm is nearly constant along
    most of the straight path from zero and jumps close to it), which is why ``"unk"`` is the default."""
    adapter, batch = planted
    unk_delta, unk_gap = _ig_delta(adapter, batch, "unk", 200)
    zero_delta, zero_gap = _ig_delta(adapter, batch, "zero", 200)
    print(f"IG n_steps=200 on the planted model: unk max |delta| {unk_delta.max():.2e} "
          f"(median |f(x)-f(b)| {unk_gap.median():.2f}); zero max |delta| {zero_delta.max():.2e} "
          f"(median |f(x)-f(b)| {zero_gap.median():.2f})")
    assert unk_gap.median() > 1.0  # the baseline is far from the input: the check is not vacuous
    assert unk_delta.max() < 1e-3 * unk_gap.max()
    assert zero_delta.max() > 100 * unk_delta.max()


def test_ig_baselines_keep_padding_and_use_the_reference(planted):
    adapter, batch = planted
    inputs, args = adapter.captum_inputs(batch)
    unk = {
        key: adapter.model.embedding_model.embedding_layers[key].weight[1].detach() for key in adapter.feature_keys
    }
    for reference in ("unk", "zero"):
        baselines = ig_baselines(adapter, inputs, args, reference=reference)
        for key, x, b in zip(adapter.feature_keys, inputs, baselines, strict=True):
            real = batch[key] != 0
            assert torch.equal(b[~real], x[~real])
            expected = unk[key] if reference == "unk" else torch.zeros_like(unk[key])
            assert torch.allclose(b[real], expected.expand_as(b[real]))
    tokens, targs = adapter.captum_inputs(batch, level="token")
    for key, ids in zip(adapter.feature_keys, ig_baselines(adapter, tokens, targs, reference="unk"), strict=True):
        real = batch[key] != 0
        assert torch.all(ids[real] == 1) and torch.all(ids[~real] == 0)
    with pytest.raises(ValueError, match="reference"):
        ig_baselines(adapter, inputs, args, reference="mean")


def test_noise_tunnel_over_chefer(planted):
    adapter, batch = planted
    inputs, args = adapter.captum_inputs(batch)
    target = adapter.captum_target(batch)
    plain = CheferAttribution(adapter).attribute(inputs, target=target, additional_forward_args=args)
    tunnel = NoiseTunnel(CheferAttribution(adapter))
    quiet = tunnel.attribute(inputs, nt_samples=3, stdevs=1e-7, target=target, additional_forward_args=args)
    for a, b in zip(quiet, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    noisy = tunnel.attribute(inputs, nt_samples=4, stdevs=0.5, target=target, additional_forward_args=args)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(noisy, plain, strict=True))
    for key, a in zip(adapter.feature_keys, noisy, strict=True):
        assert torch.all(a[batch[key] == 0] == 0)


def test_layer_integrated_gradients_agrees_with_ig_on_embeddings(planted):
    adapter, batch = planted
    inputs, args = adapter.captum_inputs(batch)
    tokens, _ = adapter.captum_inputs(batch, level="token")
    target = adapter.captum_target(batch)
    ig = IntegratedGradients(adapter).attribute(
        inputs, baselines=ig_baselines(adapter, inputs, args), target=target, additional_forward_args=args,
        n_steps=128, internal_batch_size=512,
    )
    lig = LayerIntegratedGradients(adapter, adapter.embedding_layers).attribute(
        tokens, baselines=ig_baselines(adapter, tokens, args), target=target, additional_forward_args=args,
        n_steps=128, internal_batch_size=512,
    )
    ig_scores, lig_scores = adapter.to_feature_dict(ig).values(), adapter.to_feature_dict(tuple(lig)).values()
    for key, a, b in zip(adapter.feature_keys, ig_scores, lig_scores, strict=True):
        scale = a.abs().max()
        assert scale > 0
        assert (a - b).abs().max() < 0.02 * scale, key
        # The two integrate the same gradients along the same path (bit-identical on CPU), while a typical code
        # gets about 4-7% of the largest score: only a tolerance far below that tells a wrong attribution apart.
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * float(scale), msg=key)


def _random_like(scores: torch.Tensor, mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(scores.shape, generator=generator) * mask


def test_infidelity_tells_chefer_from_random(planted):
    adapter, batch = planted
    tokens, args = adapter.captum_inputs(batch, level="token")
    target = adapter.captum_target(batch)
    chefer = CheferAttribution(adapter).attribute(tokens, target=target, additional_forward_args=args)
    no_self = CheferAttribution(adapter).attribute(
        tokens, target=target, additional_forward_args=args, exclude_self=True
    )
    generator = torch.Generator().manual_seed(0)
    random = tuple(_random_like(c, t != 0, generator) for c, t in zip(chefer, tokens, strict=True))
    values = {}
    for name, attributions in (("chefer", chefer), ("exclude_self", no_self), ("random", random)):
        removal = token_removal_perturbation(adapter, 0.3, torch.Generator().manual_seed(1))
        values[name] = infidelity(
            removal.forward_func, removal, tokens, attributions, additional_forward_args=args, target=target,
            n_perturb_samples=16, normalize=True,
        )
    print(f"infidelity (token removal 0.3, normalize): Chefer {values['chefer'].mean():.3f}, "
          f"Chefer exclude_self {values['exclude_self'].mean():.3f}, random {values['random'].mean():.3f}")
    assert all(torch.isfinite(v).all() for v in values.values())
    # Measured over 3 batches x 3 seeds: Chefer / random between 0.43 and 0.69.
    assert values["chefer"].mean() < 0.75 * values["random"].mean()
    assert values["exclude_self"].mean() < 0.75 * values["random"].mean()


def test_sensitivity_max_tells_chefer_from_random(planted):
    adapter, batch = planted
    inputs, args = adapter.captum_inputs(batch)
    target = adapter.captum_target(batch)
    chefer = sensitivity_max(
        CheferAttribution(adapter).attribute, inputs, perturb_radius=0.02, n_perturb_samples=4,
        target=target, additional_forward_args=args,
    )
    generator = torch.Generator().manual_seed(0)

    def random_explanation(inputs, target=None, additional_forward_args=None):
        return tuple(torch.rand(x.shape, generator=generator) for x in inputs)

    random = sensitivity_max(
        random_explanation, inputs, perturb_radius=0.02, n_perturb_samples=4, target=target,
        additional_forward_args=args,
    )
    print(f"sensitivity_max (radius 0.02): Chefer {chefer.mean():.4f}, random {random.mean():.4f}")
    assert torch.isfinite(chefer).all() and torch.isfinite(random).all()
    assert chefer.mean() < 0.2 * random.mean()


def test_token_removal_makes_removed_codes_absent(planted):
    adapter, batch = planted
    tokens, args = adapter.captum_inputs(batch, level="token")
    removal = token_removal_perturbation(adapter, 0.5, torch.Generator().manual_seed(0))
    perturbations, perturbed = removal(tokens)
    for _key, ids, p, q in zip(adapter.feature_keys, tokens, perturbations, perturbed, strict=True):
        removed = p.bool()
        assert removed.any() and torch.all(ids[removed] != 0)  # only real codes are removed
        assert torch.all(q[removed] == 0) and torch.equal(q[~removed], ids[~removed])
        assert torch.all((q != 0).reshape(q.shape[0], -1).any(dim=1))  # a code survives in each sample
    # The independent reference: PyHealth's own forward on a batch that never had those codes: removed
    # codes dropped, the remaining codes (flat) or non-empty visits (nested) moved to the front.
    def compacted(q):
        out = torch.zeros_like(q)
        for i, row in enumerate(q):
            kept = row[row != 0] if q.dim() == 2 else row[(row != 0).any(dim=-1)]
            out[i, : kept.shape[0]] = kept
        return out

    with torch.no_grad():
        compacted_batch = {k: compacted(q) for k, q in zip(adapter.feature_keys, perturbed, strict=True)}
        expected = adapter.model(**{**batch, **compacted_batch})["logit"]
        got = removal.forward_func(*perturbed, *args)
        in_place = adapter.model(**{**batch, **dict(zip(adapter.feature_keys, perturbed, strict=True))})["logit"]
        got_in_place = token_removal_perturbation(adapter, 0.5, compact=False).forward_func(*perturbed, *args)
        plain = adapter(*perturbed, *args)  # masks still True on removed codes: not the same model input
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_in_place, in_place, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain, expected, atol=1e-3)
    assert not torch.allclose(in_place, expected, atol=1e-3)  # compaction matters on this batch
    with pytest.raises(ValueError, match="fraction"):
        token_removal_perturbation(adapter, 1.5)


def test_compare_over_a_loader_equals_per_batch_calls(planted, planted_batches):
    adapter, _ = planted
    loader = planted_batches[:2]
    result = compare_methods(adapter, loader, [Saliency(adapter)], progress=False)
    assert isinstance(result, Comparison) and result.n_samples == 32
    assert result.targets is not None and result.targets.shape == (32,)
    offset = 0
    for batch in loader:
        alone = compare_methods(adapter, batch, [Saliency(adapter)]).scores["Saliency"]
        n = batch["conditions"].shape[0]
        for key, s in alone.items():
            block = result.scores["Saliency"][key][offset : offset + n]
            index = tuple(slice(0, d) for d in s.shape)
            assert torch.equal(block[index], s)
            assert block.abs().sum() == s.abs().sum()  # the extra padding is zero
        offset += n
    rows = result.rows()
    assert [r["method"] for r in rows] == ["Saliency"] and rows[0]["seconds_per_sample"] > 0
    real_codes = sum(int(m.sum()) for m in result.masks.values())
    assert len(result.code_rows()) == real_codes
    assert "Saliency" in result.table()


def test_compare_rejects_bad_methods(planted, seq_dataset):
    adapter, batch = planted
    other = PyHealthAdapter(adapter.model)
    with pytest.raises(ValueError, match="same adapter"):
        compare_methods(adapter, batch, [Saliency(other)])
    with pytest.raises(ValueError, match="NoiseTunnel"):
        compare_methods(adapter, batch, [NoiseTunnel(LayerIntegratedGradients(adapter, adapter.embedding_layers))])
    with pytest.raises(ValueError, match="empty"):
        compare_methods(adapter, batch, [])
    with pytest.raises(TypeError, match="Captum attribution"):
        compare_methods(adapter, batch, ["Saliency"])
    with pytest.raises(ValueError, match="target_mode"):
        compare_methods(adapter, batch, [Saliency(adapter)], target_mode="best")
    with pytest.raises(TypeError, match="batch dict"):
        compare_methods(adapter, [batch["conditions"]], [Saliency(adapter)], progress=False)


def test_evaluator_method_in_pyhealths_evaluator(planted, planted_batches, capsys):
    from pyhealth.metrics.interpretability import Evaluator

    adapter, batch = planted
    evaluator = Evaluator(adapter.model, percentages=[10, 20])
    wrapped = EvaluatorMethod(adapter, IntegratedGradients(adapter), n_steps=16)
    scores = wrapped.attribute(**batch)
    expected = compare_methods(adapter, batch, [("IG", IntegratedGradients(adapter), {"n_steps": 16})]).scores["IG"]
    for key in adapter.feature_keys:
        torch.testing.assert_close(scores[key], expected[key])
    # independently of compare_methods: Captum's IG called here, the UNK reference, the predicted class, padding 0
    inputs, args = adapter.captum_inputs(batch)
    direct = IntegratedGradients(adapter).attribute(
        inputs, baselines=ig_baselines(adapter, inputs, args), target=adapter.captum_target(batch),
        additional_forward_args=args, n_steps=16,
    )
    for key, value in adapter.to_feature_dict(direct).items():
        torch.testing.assert_close(scores[key], value * (batch[key] != 0), msg=key)
    results = {"IG": evaluator.evaluate_attribution(planted_batches[:2], wrapped, metrics=["comprehensiveness"])}
    generator = torch.Generator().manual_seed(0)
    random_scores = {k: torch.rand(v.shape, generator=generator) * (batch[k] != 0) for k, v in scores.items()}
    random = evaluator.evaluate(batch, random_scores, metrics=["comprehensiveness"])["comprehensiveness"]
    ig = evaluator.evaluate(batch, scores, metrics=["comprehensiveness"])["comprehensiveness"]
    capsys.readouterr()
    print(f"PyHealth comprehensiveness (10%, 20%): IG {ig[0][ig[1]].mean():.3f}, "
          f"random {random[0][random[1]].mean():.3f}, "
          f"IG over two batches {results['IG']['comprehensiveness']:.3f}")
    assert results["IG"]["comprehensiveness"] == pytest.approx(results["IG"]["comprehensiveness"])  # not NaN
    assert ig[0][ig[1]].mean() > random[0][random[1]].mean() + 0.1

