"""The fused row propagation (inside the backward pass) equals the dense reference, on CPU and CUDA."""

from __future__ import annotations

import pytest
import torch

from captum_chefer import CheferAttribution, PyHealthAdapter
from captum_chefer.relevance import propagate_row, propagate_weighted_row, weighted_attention
from conftest import first_batch, make_dataset, make_model

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
OPTIONS = [
    {},
    {"exclude_self": True},
    {"head_reduction": "max"},
    {"clamp": False},
    {"layers": 2},
    {"use_gradients": False},
    {"layers": 1, "use_gradients": False, "head_reduction": "max"},
    {"layers": 1, "clamp": False, "exclude_self": True},
    {"code_split": "gradient"},
    {"layernorm": "detach", "score": "log_odds"},
    {"code_split": "gradient", "exclude_self": True, "layernorm": "detach", "score": "log_odds", "layers": 2},
]


def _fused_and_dense(model, batch, n_classes: int, **options) -> tuple[tuple, tuple, tuple]:
    adapter = PyHealthAdapter(model)
    inputs, args = adapter.captum_inputs(batch)
    target = adapter.captum_target(batch)
    method = CheferAttribution(adapter)
    fused = method.attribute(inputs, target=target, additional_forward_args=args, propagation="row", **options)
    dense = method.attribute(inputs, target=target, additional_forward_args=args, propagation="dense", **options)
    return inputs, fused, dense


@pytest.fixture(scope="module")
def three_layer_four_head():
    """A Transformer with 3 layers and 4 heads over two streams (flat and nested), 3 classes."""
    dataset = make_dataset("sequence", n=10, n_classes=3, seed=5, max_len=9)
    return make_model(dataset, layers=3, heads=4, seed=5), first_batch(dataset, batch_size=6)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "default")
def test_fused_equals_dense(three_layer_four_head, options):
    model, batch = three_layer_four_head
    assert len(model.feature_keys) >= 2 and model.num_layers == 3 and model.heads == 4
    inputs, fused, dense = _fused_and_dense(model, batch, 3, **options)
    assert len(fused) == len(inputs) == len(dense)
    for a, b in zip(fused, dense, strict=True):
        assert a.shape == b.shape
        assert a.abs().sum() > 0  # something was propagated
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_options_cover_every_keyword_of_attribute():
    """The comparison above is only as good as its option list: each keyword option of ``attribute``
    (all but ``propagation``, which is what is compared) must appear in it with a non-default value."""
    import inspect

    parameters = inspect.signature(CheferAttribution.attribute).parameters.values()
    keywords = {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keywords.pop("propagation") == "row"
    for name, default in keywords.items():
        assert any(name in o and o[name] != default for o in OPTIONS), f"OPTIONS never sets {name}"


def test_fused_path_fills_no_parameter_grad(three_layer_four_head):
    model, batch = three_layer_four_head
    model.zero_grad(set_to_none=True)
    flags = [p.requires_grad for p in model.parameters()]
    _fused_and_dense(model, batch, 3)
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags


@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("clamp", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "max"])
def test_propagate_weighted_row_matches_the_two_step_rule(heads, clamp, reduction):
    torch.manual_seed(heads)
    batch, length = 3, 7
    attention = torch.softmax(torch.randn(batch, heads, length, length), dim=-1)
    gradient = torch.randn(batch, heads, length, length)
    row = torch.rand(batch, length)
    kept = attention.clone(), gradient.clone()
    weighted = weighted_attention(attention, gradient, clamp=clamp, head_reduction=reduction)
    expected = propagate_row(row, weighted)
    got = propagate_weighted_row(row, attention, gradient, clamp=clamp, head_reduction=reduction)
    torch.testing.assert_close(got, expected)
    # the unit-row shortcut of the last layer: e_p (I + A_bar) = e_p + A_bar[p]
    pool = torch.tensor([0, 3, 6])
    unit = torch.nn.functional.one_hot(pool, length).float()
    torch.testing.assert_close(
        propagate_weighted_row(None, attention, gradient, clamp=clamp, head_reduction=reduction, unit_index=pool),
        propagate_row(unit, weighted),
    )
    # the last layer given for row p alone ([B, H, 1, L]), as a model computes it for the pooled position only
    samples = torch.arange(batch)
    row_p = attention[samples, :, pool].unsqueeze(2), gradient[samples, :, pool].unsqueeze(2)
    torch.testing.assert_close(
        propagate_weighted_row(None, *row_p, clamp=clamp, head_reduction=reduction, unit_index=pool),
        propagate_row(unit, weighted),
    )
    assert torch.equal(attention, kept[0]) and torch.equal(gradient, kept[1])  # inputs untouched


def test_propagate_weighted_row_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"same|must both"):
        propagate_weighted_row(torch.ones(1, 2), torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 3))


def test_last_block_for_the_first_position_alone(three_layer_four_head):
    """``pooled_row_only``: the Transformer's last block runs for position 0 only, with the same logits."""
    model, batch = three_layer_four_head
    adapter = PyHealthAdapter(model)
    inputs, args = adapter.captum_inputs(batch)
    full = adapter.attention_forward(inputs, args)
    pooled = adapter.attention_forward(inputs, args, pooled_row_only=True)
    torch.testing.assert_close(pooled.logits, full.logits, atol=1e-6, rtol=1e-5)
    for key in model.feature_keys:
        *lower, last = pooled.attention[key]
        assert last.shape == full.attention[key][-1][:, :, :1].shape  # [B, H, 1, L]
        torch.testing.assert_close(last, full.attention[key][-1][:, :, :1])
        for a, b in zip(lower, full.attention[key][:-1], strict=True):
            torch.testing.assert_close(a, b)
        assert "forward" not in vars(model.transformer[key].transformer[-1])  # the class's forward again


def test_last_block_is_restored_when_the_forward_fails(three_layer_four_head):
    model, batch = three_layer_four_head
    adapter = PyHealthAdapter(model)
    inputs, args = adapter.captum_inputs(batch)
    handle = model.fc.register_forward_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
    try:
        with pytest.raises(RuntimeError, match="boom"):
            adapter.attention_forward(inputs, args, pooled_row_only=True)
    finally:
        handle.remove()
    assert not any("forward" in vars(layer.transformer[-1]) for layer in model.transformer.values())
    with torch.no_grad():  # and the model computes every position of its last block again
        emb, _ = model.transformer[model.feature_keys[0]](torch.randn(2, 5, model.embedding_dim))
    assert emb.shape == (2, 5, model.embedding_dim)


@CUDA
@pytest.mark.parametrize("options", [{}, {"exclude_self": True}], ids=["default", "exclude_self"])
def test_fused_equals_dense_on_cuda(three_layer_four_head, options):
    model, batch = three_layer_four_head
    _, cpu_fused, _ = _fused_and_dense(model, batch, 3, **options)
    model.to("cuda")
    try:
        _, fused, dense = _fused_and_dense(model, batch, 3, **options)
    finally:
        model.to("cpu")
    for a, b, c in zip(fused, dense, cpu_fused, strict=True):
        assert a.device.type == "cuda" and b.device.type == "cuda"
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.cpu(), c, atol=1e-4, rtol=1e-4)
