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
from captum_chefer.attribution import PRESETS, AttentionForward
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
    return {key: a.sum(-1) for key, a in zip(adapter.feature_keys, attributions)}


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
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        split_over_codes(torch.zeros(1, 2), torch.zeros(1, 3, 2), torch.ones(1, 3, 2, dtype=torch.bool))


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
    jacobian = torch.autograd.functional.jacobian(lambda v: layer_norm_fixed_scale(v, (4,), weight, bias, 1e-5), x)[0, :, 0, :]
    s = math.sqrt(float(x.var(unbiased=False)) + 1e-5)
    expected = torch.diag(weight) @ (torch.eye(4) - torch.full((4, 4), 0.25)) / s
    assert torch.allclose(jacobian, expected, atol=1e-6)


# ------------------------------------------------------------------------------------ Transformer


@pytest.mark.parametrize("exclude_self", [False, True])
def test_transformer_split_conserves_visits_pads_zero_and_keeps_flat_codes(exclude_self):
    _, adapter, _, inputs, args = _setup("sequence", "transformer", seed=1)
    chefer = CheferAttribution(adapter)
    uniform = _codes(adapter, chefer.attribute(inputs, None, args, exclude_self=exclude_self))
    split = _codes(adapter, chefer.attribute(inputs, None, args, exclude_self=exclude_self, code_split="gradient"))
    flat_mask, nested_mask = adapter.token_masks(args)
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


@pytest.mark.parametrize("kwargs", [{"code_split": "gradient"}, PRESETS["recommended"]])
def test_split_is_batch_invariant(kwargs):
    _, adapter, _, inputs, args = _setup("sequence", "transformer", seed=2)
    chefer = CheferAttribution(adapter)
    whole = chefer.attribute(inputs, None, args, **kwargs)
    for i in (0, 3):
        one = chefer.attribute(tuple(x[i : i + 1] for x in inputs), None, tuple(a[i : i + 1] for a in args), **kwargs)
        for w, o in zip(whole, one):
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
    masks = dict(zip(adapter.feature_keys, adapter.token_masks(args)))
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


class _LogOddsModel:
    """An adapter whose logits are replaced by each class's softmax log-odds, computed term by term."""

    def __init__(self, adapter):
        self.adapter = adapter

    def __call__(self, *args):
        return self.adapter(*args)

    def attention_forward(self, inputs, args, *, pooled_row_only=False):
        out = self.adapter.attention_forward(inputs, args, pooled_row_only=pooled_row_only)
        logits = out.logits
        columns = []
        for j in range(logits.shape[1]):
            others = torch.cat([logits[:, :j], logits[:, j + 1 :]], dim=1)
            columns.append(logits[:, j] - torch.log(torch.exp(others).sum(dim=1)))
        return AttentionForward(torch.stack(columns, dim=1), out.attention, out.pool_index, out.stacked,
                                out.embeddings, out.code_masks, out.state_values)

    def relevance_to_inputs(self, relevance, inputs, args):
        return self.adapter.relevance_to_inputs(relevance, inputs, args)


def test_log_odds_score_of_a_multiclass_model():
    _, adapter, _, inputs, args = _setup("sequence", "transformer", seed=2, n_classes=3)
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    ours = CheferAttribution(adapter).attribute(inputs, target, args, score="log_odds", code_split="gradient")
    reference = CheferAttribution(_LogOddsModel(adapter)).attribute(inputs, target, args, code_split="gradient")
    for a, b in zip(ours, reference):
        assert torch.allclose(a, b, atol=1e-5)
    logit = CheferAttribution(adapter).attribute(inputs, target, args, code_split="gradient")
    assert not torch.allclose(ours[0], logit[0])


def test_log_odds_of_a_single_logit_is_the_logit():
    _, adapter, _, inputs, args = _setup("sequence", "transformer", seed=2)
    chefer = CheferAttribution(adapter)
    for a, b in zip(chefer.attribute(inputs, None, args, score="log_odds"), chefer.attribute(inputs, None, args)):
        assert torch.equal(a, b)


def test_recommended_preset_equals_its_keywords_and_keywords_win():
    _, adapter, _, inputs, args = _setup("sequence", "transformer", seed=3)
    assert PRESETS["recommended"] == {"exclude_self": True, "code_split": "gradient", "layernorm": "detach", "score": "log_odds"}
    preset = CheferAttribution(adapter, preset="recommended")
    explicit = CheferAttribution(adapter).attribute(inputs, None, args, exclude_self=True, code_split="gradient",
                                                    layernorm="detach", score="log_odds")
    for a, b in zip(preset.attribute(inputs, None, args), explicit):
        assert torch.equal(a, b)
    default = CheferAttribution(adapter).attribute(inputs, None, args)
    overridden = preset.attribute(inputs, None, args, exclude_self=False, code_split="uniform", layernorm="exact", score="logit")
    for a, b in zip(overridden, default):
        assert torch.equal(a, b)


def test_bad_choices_name_the_fix():
    _, adapter, _, inputs, args = _setup("sequence", "transformer")
    with pytest.raises(ValueError, match="preset must be one of 'pyhealth', 'recommended'"):
        CheferAttribution(adapter, preset="best")
    for name in ("code_split", "layernorm", "score"):
        with pytest.raises(ValueError, match=f"{name} must be one of"):
            CheferAttribution(adapter).attribute(inputs, None, args, **{name: "nope"})


class _PlainModel:
    """The adapter behind an ``attention_forward`` without a ``layernorm`` keyword."""

    def __init__(self, adapter):
        self.adapter = adapter

    def __call__(self, *args):
        return self.adapter(*args)

    def attention_forward(self, inputs, args, *, pooled_row_only=False):
        return self.adapter.attention_forward(inputs, args, pooled_row_only=pooled_row_only)

    def relevance_to_inputs(self, relevance, inputs, args):
        return self.adapter.relevance_to_inputs(relevance, inputs, args)


@pytest.mark.parametrize("fmt, kind", [("sequence", "transformer"), ("stagenet_nested", "stagenet")])
def test_layernorm_detach_is_the_same_through_the_adapter_and_through_torch_function(fmt, kind):
    _, adapter, _, inputs, args = _setup(fmt, kind, seed=6)
    through_adapter = CheferAttribution(adapter, preset="recommended").attribute(inputs, None, args)
    through_mode = CheferAttribution(_PlainModel(adapter), preset="recommended").attribute(inputs, None, args)
    for a, b in zip(through_adapter, through_mode):
        assert torch.allclose(a, b, atol=1e-6)
    exact = CheferAttribution(adapter, preset="recommended").attribute(inputs, None, args, layernorm="exact")
    if kind == "transformer":  # StageAttentionNet's only layer norm is after its attention, and may change nothing
        assert not all(torch.allclose(a, b) for a, b in zip(through_adapter, exact))
