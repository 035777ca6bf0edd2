"""``code_split``, ``layernorm``, ``score`` and ``preset`` of ``CheferAttribution``.

References are independent of the code under test: hand-computed numbers, plain autograd gradients
through the adapter (or through hooks the test installs itself), and the library's default
(``code_split="uniform"``), whose visit relevance the equivalence tests check against PyHealth.
"""

from __future__ import annotations

import math

import pytest
import torch

from captum_chefer import CheferAttribution, PyHealthAdapter
from captum_chefer.attribution import PRESETS
from captum_chefer.layernorm import FixedScaleLayerNorm
from captum_chefer.protocol import _names_keyword
from captum_chefer.relevance import layer_norm_fixed_scale, softmax_log_odds, split_over_codes
from conftest import first_batch, make_dataset, make_model


def _setup(fmt: str, kind: str, seed: int = 0, n_classes: int = 2):
    dataset = make_dataset(fmt, n=10, seed=seed, n_classes=n_classes)
    model = make_model(dataset, kind, seed=seed)
    adapter = PyHealthAdapter(model)
    batch = first_batch(dataset)
    inputs, args = adapter.captum_inputs(batch)
    return model, adapter, batch, inputs, args


def _codes(adapter, attributions):
    """``{key: [B, V, C] or [B, L]}``: the per-code relevance (summed over the embedding)."""
    return {key: a.sum(-1) for key, a in zip(adapter.feature_keys, attributions, strict=True)}


# ------------------------------------------------------------------------------------ the pure split


def test_split_of_hand_computed_visits():
    # visit 0: relevance 2, shares 3, 1, -4 and a padding slot (share 5, ignored) -> 2 * 3/4, 2 * 1/4, 0, 0
    # visit 1: relevance 1, no positive share among its two real codes -> 1/2 each
    # visit 2: padding only -> nothing
    relevance = torch.tensor([[2.0, 1.0, 7.0]])
    shares = torch.tensor([[[3.0, 1.0, -4.0, 5.0], [-1.0, 0.0, 9.0, 9.0], [1.0, 1.0, 1.0, 1.0]]])
    mask = torch.tensor([[[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]]]).bool()
    expected = [[[1.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]]
    assert split_over_codes(relevance, shares, mask).tolist() == expected


def test_split_keeps_negative_visit_relevance_and_checks_shapes():
    out = split_over_codes(torch.tensor([[-3.0]]), torch.tensor([[[1.0, 2.0]]]), torch.tensor([[[True, True]]]))
    assert out.tolist() == [[[-1.0, -2.0]]]
    with pytest.raises(ValueError, match=r"\[B, V\].*got \(1, 2\), \(1, 3, 2\), \(1, 3, 2\)"):
        split_over_codes(torch.zeros(1, 2), torch.zeros(1, 3, 2), torch.ones(1, 3, 2, dtype=torch.bool))
    # the split comes in the relevance's dtype, whatever the shares'
    split = split_over_codes(
        torch.tensor([[1.0]]), torch.tensor([[[1.0, 2.0]]], dtype=torch.float64), torch.ones(1, 1, 2) > 0
    )
    assert split.dtype == torch.float32


def test_split_without_shares_is_even_and_in_the_relevance_dtype():
    # shares None (no gradient reached the codes) or none positive: R_v / n_v, exact in float64
    relevance = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    mask = torch.tensor([[[True, True, True], [True, True, False]]])
    expected = [[[1 / 3, 1 / 3, 1 / 3], [1.0, 1.0, 0.0]]]
    assert split_over_codes(relevance, None, mask).tolist() == expected
    assert split_over_codes(relevance, -torch.ones(1, 2, 3), mask).tolist() == expected
    assert split_over_codes(relevance, None, mask).dtype == torch.float64
    with pytest.raises(ValueError, match=r"got \(1, 2\), None, \(1, 3, 3\)"):
        split_over_codes(relevance, None, torch.ones(1, 3, 3, dtype=torch.bool))


def test_softmax_log_odds_by_hand():
    logits = torch.tensor([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    out = softmax_log_odds(logits, torch.tensor([1, 2]))
    assert out[0].item() == pytest.approx(3.0 - math.log(math.e + 1.0), abs=1e-6)
    assert out[1].item() == pytest.approx(math.log((1 / 3) / (2 / 3)), abs=1e-6)


def test_fixed_scale_layer_norm_values_and_jacobian():
    weight, bias = torch.tensor([1.0, 2.0, 0.5, -1.0]), torch.tensor([0.1, 0.0, -0.2, 0.3])
    x = torch.tensor([[1.0, 3.0, -2.0, 0.5]])
    out = layer_norm_fixed_scale(x, (4,), weight, bias, 1e-5)
    assert torch.allclose(out, torch.nn.functional.layer_norm(x, (4,), weight, bias, 1e-5), atol=1e-6)
    # the scale s held fixed: the Jacobian is diag(weight) (I - 11^T / D) / s
    jacobian = torch.autograd.functional.jacobian(
        lambda v: layer_norm_fixed_scale(v, (4,), weight, bias, 1e-5), x
    )[0, :, 0, :]
    s = math.sqrt(float(x.var(unbiased=False)) + 1e-5)
    expected = torch.diag(weight) @ (torch.eye(4) - torch.full((4, 4), 0.25)) / s
    assert torch.allclose(jacobian, expected, atol=1e-6)


def _fixed_scale_jacobian(x, weight, eps):
    """diag(weight) (I - 11^T / D) / s, with s = sqrt(var(x) + eps) held fixed (computed by hand)."""
    d = x.shape[-1]
    s = math.sqrt(float(x.var(unbiased=False)) + eps)
    return torch.diag(weight) @ (torch.eye(d) - torch.full((d, d), 1 / d)) / s


def test_fixed_scale_layer_norm_default_eps_without_weight():
    x = torch.tensor([[0.0, 1e-3, 2e-3, 4e-3]])  # variance ~2e-6: eps = 1e-5 dominates the scale
    out = layer_norm_fixed_scale(x, (4,))
    assert torch.allclose(out, torch.nn.functional.layer_norm(x, (4,), eps=1e-5), atol=1e-6)
    jacobian = torch.autograd.functional.jacobian(lambda v: layer_norm_fixed_scale(v, (4,)), x)[0, :, 0, :]
    assert torch.allclose(jacobian, _fixed_scale_jacobian(x[0], torch.ones(4), 1e-5), rtol=1e-4)


def test_fixed_scale_mode_passes_the_layer_norms_weight_bias_and_eps():
    norm = torch.nn.LayerNorm(4, eps=0.5)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        norm.bias.copy_(torch.tensor([0.1, 0.0, -0.2, 0.3]))
    x = torch.tensor([[1.0, 1.5, 0.0, 0.5]])  # variance 0.3: eps = 0.5 matters in both passes

    def fixed(v):
        with FixedScaleLayerNorm():
            return norm(v)

    expected_out = (x - x.mean()) / math.sqrt(float(x.var(unbiased=False)) + 0.5) * norm.weight + norm.bias
    assert torch.allclose(fixed(x), expected_out, atol=1e-6)
    jacobian = torch.autograd.functional.jacobian(fixed, x)[0, :, 0, :]
    assert torch.allclose(jacobian, _fixed_scale_jacobian(x[0], norm.weight.detach(), 0.5), atol=1e-6)


# ------------------------------------------------------------------------------------ Transformer


@pytest.mark.parametrize("exclude_self", [False, True])
def test_transformer_split_conserves_visits_pads_zero_and_keeps_flat_codes(exclude_self):
    _, adapter, _, inputs, args = _setup("sequence", "transformer", seed=1)
    chefer = CheferAttribution(adapter)
    uniform = _codes(adapter, chefer.attribute(inputs, None, args, exclude_self=exclude_self))
    split = _codes(adapter, chefer.attribute(inputs, None, args, exclude_self=exclude_self, code_split="gradient"))
    _, nested_mask = adapter.token_masks(args)
    assert torch.equal(split["conditions"], uniform["conditions"])  # flat codes: unchanged
    # uniform gives every real code its visit's relevance: that is the visit's relevance
    visit = (uniform["procedures"] * nested_mask).sum(-1) / nested_mask.sum(-1).clamp(min=1)
    assert torch.allclose(split["procedures"].sum(-1), visit, atol=1e-6)
    assert bool((split["procedures"][~nested_mask] == 0).all())
    assert not torch.allclose(split["procedures"], uniform["procedures"])  # it does split


def test_transformer_split_follows_an_independent_gradient():
    _, adapter, _, inputs, args = _setup("sequence", "transformer", seed=3)
    split = _codes(adapter, CheferAttribution(adapter).attribute(inputs, None, args, code_split="gradient"))
    uniform = _codes(adapter, CheferAttribution(adapter).attribute(inputs, None, args))
    nested = inputs[1].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(adapter(inputs[0], nested, *args)[:, 0].sum(), nested)
    mask = adapter.token_masks(args)[1]
    shares = ((grad * inputs[1]).sum(-1) * mask).clamp(min=0)
    visit = uniform["procedures"].amax(-1)  # every real code of a visit holds the visit's relevance (>= 0 here)
    total = shares.sum(-1, keepdim=True)
    expected = torch.where(total > 0, visit.unsqueeze(-1) * shares / total.clamp(min=1e-30),
                           visit.unsqueeze(-1) * mask / mask.sum(-1, keepdim=True).clamp(min=1))
    assert torch.allclose(split["procedures"], expected * mask, atol=1e-6)


def _two_nested_streams(seed: int, **model_kwargs):
    """A Transformer over two nested streams (procedures, then diagnoses) and a flat one."""
    import random

    from pyhealth.datasets import create_sample_dataset

    from captum_chefer.synthetic import quiet_pyhealth
    from conftest import make_samples

    rng = random.Random(seed)
    samples = make_samples("sequence", n=8, seed=seed)
    for sample in samples:
        sample["diagnoses"] = [
            [f"D{rng.randrange(7)}" for _ in range(rng.randint(1, 3))] for _ in range(rng.randint(1, 5))
        ]
    schema = {"conditions": "sequence", "procedures": "nested_sequence", "diagnoses": "nested_sequence"}
    with quiet_pyhealth():
        dataset = create_sample_dataset(samples=samples, input_schema=schema, output_schema={"label": "binary"},
                                        dataset_name="test-two-nested")
    model = make_model(dataset, seed=seed, **model_kwargs)
    adapter = PyHealthAdapter(model)
    inputs, args = adapter.captum_inputs(first_batch(dataset, batch_size=8))
    return adapter, inputs, args


def test_every_nested_stream_is_split_by_its_own_gradient():
    adapter, inputs, args = _two_nested_streams(seed=7)
    split = _codes(adapter, CheferAttribution(adapter).attribute(inputs, None, args, code_split="gradient"))
    uniform = _codes(adapter, CheferAttribution(adapter).attribute(inputs, None, args))
    embedded = [x.clone().requires_grad_(True) for x in inputs]
    grads = torch.autograd.grad(adapter(*embedded, *args)[:, 0].sum(), embedded[1:])
    masks = adapter.token_masks(args)[1:]
    for key, x, grad, mask in zip(("procedures", "diagnoses"), inputs[1:], grads, masks, strict=True):
        shares = ((grad * x).sum(-1) * mask).clamp(min=0)
        visit = (uniform[key] * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        total = shares.sum(-1, keepdim=True)
        fraction = torch.where(
            total > 0, shares / total.clamp(min=1e-30), mask / mask.sum(-1, keepdim=True).clamp(min=1)
        )
        assert torch.allclose(split[key], visit.unsqueeze(-1) * fraction * mask, atol=1e-6), key
        assert not torch.allclose(split[key], uniform[key]), key


def test_visits_the_model_truncated_away_get_zero_and_kept_visits_keep_their_sum():
    adapter, inputs, args = _two_nested_streams(seed=8, max_seq_len=2)
    masks = dict(zip(adapter.feature_keys, adapter.token_masks(args), strict=True))
    assert masks["diagnoses"][:, 2:].any(), "the fixture must hold visits beyond max_seq_len"
    split = _codes(adapter, CheferAttribution(adapter).attribute(inputs, None, args, code_split="gradient"))
    uniform = _codes(adapter, CheferAttribution(adapter).attribute(inputs, None, args))
    for key in ("procedures", "diagnoses"):
        mask = masks[key]
        assert bool((split[key][:, 2:] == 0).all()), key
        visit = (uniform[key] * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        assert torch.allclose(split[key].sum(-1)[:, :2], visit[:, :2], atol=1e-6), key
        assert bool((split[key][~mask] == 0).all()), key


@pytest.mark.parametrize("kwargs", [{"code_split": "gradient"}, PRESETS["recommended"]])
def test_split_is_batch_invariant(kwargs):
    _, adapter, _, inputs, args = _setup("sequence", "transformer", seed=2)
    chefer = CheferAttribution(adapter)
    whole = chefer.attribute(inputs, None, args, **kwargs)
    for i in (0, 3):
        one = chefer.attribute(tuple(x[i : i + 1] for x in inputs), None, tuple(a[i : i + 1] for a in args), **kwargs)
        for w, o in zip(whole, one, strict=True):
            assert torch.allclose(w[i : i + 1], o, atol=1e-6)


def test_split_uses_one_autograd_grad_call_for_transformer(monkeypatch):
    _, adapter, _, inputs, args = _setup("sequence", "transformer")
    calls = []
    original = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or original(*a, **k))
    CheferAttribution(adapter).attribute(inputs, None, args, code_split="gradient")
    assert len(calls) == 1


# ------------------------------------------------------------------------------------ StageAttentionNet


def test_stagenet_split_conserves_each_patient_and_pads_zero():
    _, adapter, _, inputs, args = _setup("stagenet_nested", "stagenet", seed=4)
    chefer = CheferAttribution(adapter)
    uniform = _codes(adapter, chefer.attribute(inputs, None, args, exclude_self=True))
    split = _codes(adapter, chefer.attribute(inputs, None, args, exclude_self=True, code_split="gradient"))
    masks = dict(zip(adapter.feature_keys, adapter.token_masks(args), strict=True))
    assert torch.equal(split["labs"], uniform["labs"])  # flat codes: unchanged
    mask = masks["codes"]
    states = (uniform["codes"] * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # each state's relevance
    assert torch.allclose(split["codes"].sum((1, 2)), states.sum(1), atol=1e-6)
    assert bool((split["codes"][~mask] == 0).all())


def test_stagenet_split_follows_the_value_path_computed_independently():
    model, adapter, _, inputs, args = _setup("stagenet_nested", "stagenet", seed=5)
    uniform = _codes(adapter, CheferAttribution(adapter).attribute(inputs, None, args))
    split = _codes(adapter, CheferAttribution(adapter).attribute(inputs, None, args, code_split="gradient"))
    mask = adapter.token_masks(args)[0]
    states = (uniform["codes"] * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # r_t, [B, V]
    kept = {}
    projection = model.stagenet["codes"].mha.linear_layers[2]
    handle = projection.register_forward_hook(lambda module, a, output: kept.setdefault("v", output))
    try:
        codes = inputs[0].clone().requires_grad_(True)
        logit = adapter(codes, inputs[1], *args)[:, 0].sum()
    finally:
        handle.remove()
    values = kept["v"]
    (g_values,) = torch.autograd.grad(logit, values, retain_graph=True)
    (back,) = torch.autograd.grad(values, codes, grad_outputs=g_values * states[:, : values.shape[1], None])
    shares = ((back * inputs[0]).sum(-1) * mask).clamp(min=0)
    expected = states.sum(1)[:, None, None] * shares / shares.sum((1, 2), keepdim=True)
    assert torch.allclose(split["codes"], expected, atol=1e-6)


class _Rewired:
    """The adapter with its ``AttentionForward`` changed by ``change`` (a test double for other models).

    Its ``attention_forward`` has no ``layernorm`` keyword, so ``layernorm="detach"`` reaches it as a
    torch-function mode.
    """

    def __init__(self, adapter, change=lambda out: out):
        self.adapter, self.change = adapter, change

    def __call__(self, *args):
        return self.adapter(*args)

    def attention_forward(self, inputs, args, *, pooled_row_only=False):
        return self.change(self.adapter.attention_forward(inputs, args, pooled_row_only=pooled_row_only))

    def relevance_to_inputs(self, relevance, inputs, args):
        return self.adapter.relevance_to_inputs(relevance, inputs, args)


def _unstacked(out):
    out.stacked = False  # gradients collected first, then the row recursion
    return out


@pytest.mark.parametrize("propagation", ["dense", "unstacked"])
def test_stagenet_split_is_the_same_on_every_propagation_path(propagation):
    _, adapter, _, inputs, args = _setup("stagenet_nested", "stagenet", seed=5)
    fused = CheferAttribution(adapter).attribute(inputs, None, args, code_split="gradient")
    if propagation == "dense":
        other = CheferAttribution(adapter).attribute(inputs, None, args, code_split="gradient", propagation="dense")
    else:
        other = CheferAttribution(_Rewired(adapter, _unstacked)).attribute(inputs, None, args, code_split="gradient")
    for a, b in zip(fused, other, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def _embedding_off_the_path(out):
    for key in out.code_masks:  # a 4-d leaf the logits do not depend on: no gradient reaches it
        out.embeddings[key] = out.embeddings[key].detach().clone().requires_grad_(True)
        if key in out.state_values:
            out.state_values[key] = out.state_values[key].detach().clone().requires_grad_(True)
    return out


@pytest.mark.parametrize("fmt, kind", [("sequence", "transformer"), ("stagenet_nested", "stagenet")])
def test_codes_no_gradient_reaches_split_evenly(fmt, kind):
    _, adapter, _, inputs, args = _setup(fmt, kind, seed=2)
    key = "procedures" if kind == "transformer" else "codes"
    mask = dict(zip(adapter.feature_keys, adapter.token_masks(args), strict=True))[key]
    uniform = _codes(adapter, CheferAttribution(adapter).attribute(inputs, None, args))[key]
    split = _codes(adapter, CheferAttribution(_Rewired(adapter, _embedding_off_the_path)).attribute(
        inputs, None, args, code_split="gradient"))[key]
    visit = (uniform * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # the visit's (state's) relevance
    if kind == "transformer":  # each visit's relevance over its real codes
        expected = visit.unsqueeze(-1) / mask.sum(-1, keepdim=True).clamp(min=1)
    else:  # the stream's relevance over all its real codes
        expected = (visit.sum(1) / mask.sum((1, 2)))[:, None, None]
    assert torch.allclose(split, expected * mask, atol=1e-6)


@pytest.mark.parametrize("embedding, message", [
    (None, "returned none"),
    (torch.zeros(6, 4, 16, requires_grad=True), r"shape \(6, 4, 16\);"),
    (torch.zeros(6, 4, 3, 16), r"shape \(6, 4, 3, 16\) outside the graph"),
])
def test_split_without_code_embeddings_names_the_fix(embedding, message):
    _, adapter, _, inputs, args = _setup("sequence", "transformer")

    def change(out):
        out.embeddings["procedures"] = embedding
        return out

    chefer = CheferAttribution(_Rewired(adapter, change))
    fix = r"return them in AttentionForward\(embeddings=\.\.\.\), or pass code_split='uniform'"
    with pytest.raises(ValueError, match=f"stream 'procedures'.*{message}.*{fix}"):
        chefer.attribute(inputs, None, args, code_split="gradient")
    chefer.attribute(inputs, None, args)  # the uniform split needs no embeddings


# ------------------------------------------------------------------------------------ layernorm, score, preset


def test_layernorm_detach_keeps_logits_changes_relevance_and_leaves_the_model():
    model, adapter, _, inputs, args = _setup("sequence", "transformer", seed=1)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms
    before = adapter(*inputs, *args)
    seen = {}
    original = adapter.attention_forward

    def spy(*a, **k):
        out = original(*a, **k)
        seen["logits"] = out.logits.detach()
        return out

    adapter.attention_forward = spy
    chefer = CheferAttribution(adapter)
    exact = chefer.attribute(inputs, None, args, code_split="gradient")
    detached = chefer.attribute(inputs, None, args, code_split="gradient", layernorm="detach")
    del adapter.attention_forward
    assert torch.allclose(seen["logits"], before, atol=1e-6)
    assert not torch.allclose(exact[1], detached[1])
    assert not any("forward" in vars(m) for m in norms) and not any(m._forward_hooks for m in norms)
    assert torch.equal(adapter(*inputs, *args), before)


def _log_odds_logits(out):
    """Each class's logit replaced by its softmax log-odds, computed term by term."""
    logits = out.logits
    columns = []
    for j in range(logits.shape[1]):
        others = torch.cat([logits[:, :j], logits[:, j + 1 :]], dim=1)
        columns.append(logits[:, j] - torch.log(torch.exp(others).sum(dim=1)))
    out.logits = torch.stack(columns, dim=1)
    return out


def test_log_odds_score_of_a_multiclass_model():
    _, adapter, _, inputs, args = _setup("sequence", "transformer", seed=2, n_classes=3)
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    ours = CheferAttribution(adapter).attribute(inputs, target, args, score="log_odds", code_split="gradient")
    reference = CheferAttribution(_Rewired(adapter, _log_odds_logits)).attribute(
        inputs, target, args, code_split="gradient"
    )
    for a, b in zip(ours, reference, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    logit = CheferAttribution(adapter).attribute(inputs, target, args, code_split="gradient")
    assert not torch.allclose(ours[0], logit[0])


def test_log_odds_of_a_single_logit_is_the_logit():
    _, adapter, _, inputs, args = _setup("sequence", "transformer", seed=2)
    chefer = CheferAttribution(adapter)
    log_odds, logit = chefer.attribute(inputs, None, args, score="log_odds"), chefer.attribute(inputs, None, args)
    for a, b in zip(log_odds, logit, strict=True):
        assert torch.equal(a, b)


def test_recommended_preset_equals_its_keywords_and_keywords_win():
    _, adapter, _, inputs, args = _setup("sequence", "transformer", seed=3)
    assert PRESETS["recommended"] == {
        "exclude_self": True, "code_split": "gradient", "layernorm": "detach", "score": "log_odds",
    }
    preset = CheferAttribution(adapter, preset="recommended")
    explicit = CheferAttribution(adapter).attribute(inputs, None, args, exclude_self=True, code_split="gradient",
                                                    layernorm="detach", score="log_odds")
    for a, b in zip(preset.attribute(inputs, None, args), explicit, strict=True):
        assert torch.equal(a, b)
    default = CheferAttribution(adapter).attribute(inputs, None, args)
    overridden = preset.attribute(
        inputs, None, args, exclude_self=False, code_split="uniform", layernorm="exact", score="logit"
    )
    for a, b in zip(overridden, default, strict=True):
        assert torch.equal(a, b)


def test_bad_choices_name_the_fix():
    _, adapter, _, inputs, args = _setup("sequence", "transformer")
    with pytest.raises(ValueError, match="preset must be one of 'pyhealth', 'recommended'"):
        CheferAttribution(adapter, preset="best")
    allowed = {"code_split": "'uniform', 'gradient'", "layernorm": "'exact', 'detach'", "score": "'logit', 'log_odds'"}
    for name, values in allowed.items():
        with pytest.raises(ValueError, match=f"{name} must be one of {values}, got 'nope'"):
            CheferAttribution(adapter).attribute(inputs, None, args, **{name: "nope"})


def test_log_odds_of_two_softmax_classes_is_the_logit_difference():
    _, adapter, _, inputs, args = _setup("sequence", "transformer", seed=4, n_classes=3)

    class TwoClasses(_Rewired):
        def probabilities(self, logits):
            return logits.softmax(dim=1)

    def first_two(out):
        out.logits = out.logits[:, :2]
        return out

    def difference(out):  # log p_1 / p_0 under a two-class softmax: l_1 - l_0
        out.logits = (out.logits[:, 1] - out.logits[:, 0]).unsqueeze(1)
        return out

    ours = CheferAttribution(TwoClasses(adapter, first_two)).attribute(inputs, 1, args, score="log_odds")
    reference = CheferAttribution(_Rewired(adapter, difference)).attribute(inputs, None, args)
    for a, b in zip(ours, reference, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_an_attention_forward_with_a_layernorm_keyword_is_asked_for_it():
    _, adapter, _, inputs, args = _setup("sequence", "transformer")
    seen = []

    class Asking(_Rewired):
        def attention_forward(self, inputs, args, *, pooled_row_only=False, layernorm="exact"):
            seen.append(layernorm)
            return self.adapter.attention_forward(inputs, args, pooled_row_only=pooled_row_only, layernorm=layernorm)

    CheferAttribution(Asking(adapter)).attribute(inputs, None, args, layernorm="detach")
    CheferAttribution(_Rewired(adapter)).attribute(inputs, None, args, layernorm="detach")  # no keyword: not passed
    assert seen == ["detach"]
    assert _names_keyword(Asking.attention_forward, "layernorm")
    assert not _names_keyword(lambda *a, **k: None, "layernorm")  # **kwargs does not count
    assert not _names_keyword(max, "layernorm")  # no signature to read


@pytest.mark.parametrize("fmt, kind", [("sequence", "transformer"), ("stagenet_nested", "stagenet")])
def test_layernorm_detach_is_the_same_through_the_adapter_and_through_torch_function(fmt, kind):
    _, adapter, _, inputs, args = _setup(fmt, kind, seed=6)
    through_adapter = CheferAttribution(adapter, preset="recommended").attribute(inputs, None, args)
    through_mode = CheferAttribution(_Rewired(adapter), preset="recommended").attribute(inputs, None, args)
    for a, b in zip(through_adapter, through_mode, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    exact = CheferAttribution(adapter, preset="recommended").attribute(inputs, None, args, layernorm="exact")
    if kind == "transformer":  # StageAttentionNet's only layer norm is after its attention, and may change nothing
        assert not all(torch.allclose(a, b) for a, b in zip(through_adapter, exact, strict=True))
