"""The attention-capture layer: what it records, that it is scoped to one call and one thread, and that the
model is left exactly as found (also after an exception)."""

from __future__ import annotations

import threading

import pytest
import torch
from captum.attr import IntegratedGradients, Saliency
from torch import nn

from captum_chefer import CheferAttribution, PyHealthAdapter
from captum_chefer.capture import (
    AttentionCapture,
    attention_kind,
    evaluation_mode,
    find_attention_modules,
    multihead_attention,
)
from tests.conftest import first_batch, make_model


def _state(model: nn.Module) -> dict:
    """Everything a capture may touch, as plain values."""
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "forward": [("forward" in vars(m)) for m in model.modules()],
        "hooks": [len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()],
        "implementation": [getattr(getattr(m, "config", None), "_attn_implementation", None) for m in model.modules()],
    }


# ---------------------------------------------------------------------------------------------- MultiheadAttention


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", ["none", "padding_bool", "padding_float", "attn_bool", "attn_float_3d", "causal"])
def test_multihead_attention_written_out_equals_torch(batch_first, masks):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(12, 3, batch_first=batch_first).eval()
    x = torch.randn(2, 5, 12)
    x = x if batch_first else x.transpose(0, 1)
    kwargs: dict = {}
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1, 3:] = True
    if masks == "padding_bool":
        kwargs["key_padding_mask"] = padding
    elif masks == "padding_float":
        kwargs["key_padding_mask"] = padding.float() * -1e4
    elif masks == "attn_bool":
        kwargs["attn_mask"] = torch.rand(5, 5).ge(0.7).fill_diagonal_(False)
    elif masks == "attn_float_3d":
        kwargs["attn_mask"] = torch.randn(2 * 3, 5, 5)
    elif masks == "causal":
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(5)
        kwargs["is_causal"] = True
    for need_weights, average in ((True, True), (True, False), (False, True)):
        expected, expected_weights = mha(x, x, x, need_weights=need_weights, average_attn_weights=average, **kwargs)
        out, weights, probabilities = multihead_attention(
            mha, x, x, x, need_weights=need_weights, average_attn_weights=average, **kwargs
        )
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        if need_weights:
            torch.testing.assert_close(weights, expected_weights, atol=1e-6, rtol=1e-5)
        else:
            assert weights is None and expected_weights is None
        assert probabilities.shape == (2, 3, 5, 5)
        torch.testing.assert_close(probabilities.sum(-1), torch.ones(2, 3, 5))


def test_multihead_attention_kdim_vdim_and_unbatched():
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(8, 2, kdim=6, vdim=4, batch_first=True).eval()
    q, k, v = torch.randn(3, 4, 8), torch.randn(3, 7, 6), torch.randn(3, 7, 4)
    torch.testing.assert_close(multihead_attention(mha, q, k, v)[0], mha(q, k, v)[0], atol=1e-5, rtol=1e-5)
    square = nn.MultiheadAttention(8, 2).eval()
    x = torch.randn(5, 8)
    out, weights, _ = multihead_attention(square, x, x, x)
    expected, expected_weights = square(x, x, x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, expected_weights, atol=1e-6, rtol=1e-5)
    with pytest.raises(NotImplementedError, match="add_bias_kv"):
        multihead_attention(nn.MultiheadAttention(8, 2, add_bias_kv=True), x, x, x)


def test_captured_probabilities_are_on_the_gradient_path():
    """The gradient w.r.t. the captured map equals a finite difference of the output through that map."""
    torch.manual_seed(2)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True).eval()
    x = torch.randn(1, 4, 8, requires_grad=True)
    with AttentionCapture({"s": [layer.self_attn]}) as capture:
        y = layer(x)
    (attention,) = capture.attention["s"]
    (grad,) = torch.autograd.grad(y[0, 0, 0], attention)
    assert grad.abs().sum() > 0
    # independent check: the output is linear in the probabilities given q, k, v; perturb one entry
    eps = 1e-3
    with torch.no_grad():
        p = attention.detach().clone()
        p[0, 1, 0, 2] += eps
        projection = (layer.self_attn.in_proj_weight, layer.self_attn.in_proj_bias)
        v = torch.nn.functional.linear(x, *[t.chunk(3)[2] for t in projection])
        v = v.view(1, 4, 2, 4).transpose(1, 2)

        def block_output(probabilities):
            attended = (probabilities @ v).transpose(1, 2).reshape(1, 4, 8)
            h = x + layer.self_attn.out_proj(attended)
            h = layer.norm1(h)
            return layer.norm2(h + layer.linear2(layer.activation(layer.linear1(h))))

        numeric = (block_output(p)[0, 0, 0] - block_output(attention.detach())[0, 0, 0]) / eps
    assert float(grad[0, 1, 0, 2]) == pytest.approx(float(numeric), rel=2e-2, abs=1e-4)


def test_kinds_and_finding_modules(seq_model):
    assert attention_kind(nn.MultiheadAttention(4, 2)) == "multihead"
    assert attention_kind(nn.Linear(2, 2)) is None
    found = find_attention_modules(seq_model)
    assert found and all(attention_kind(m) == "pyhealth" for m in found)
    with pytest.raises(TypeError, match="not an attention module"):
        AttentionCapture({"x": [nn.Linear(2, 2)]})


# ---------------------------------------------------------------------------------------------- model left as found


def test_model_left_exactly_as_found_also_after_an_exception(seq_dataset):
    model = make_model(seq_dataset, layers=2, heads=2).train()
    model.embedding_model.train(False)  # a mixed state must come back mixed
    next(model.parameters()).requires_grad_(False)
    before = _state(model)
    adapter = PyHealthAdapter(model)
    batch = first_batch(seq_dataset)
    inputs, args = adapter.captum_inputs(batch)
    CheferAttribution(adapter).attribute(inputs, target=None, additional_forward_args=args)
    assert _state(model) == before

    class Boom(RuntimeError):
        pass

    def explode(*_a, **_k):
        raise Boom("inside the model")

    block = model.transformer["conditions"].transformer[-1]
    overrides = {block.feed_forward: lambda original, *a, **k: explode()}
    with pytest.raises(Boom), AttentionCapture({"c": find_attention_modules(block)}, model=model, overrides=overrides):
        assert not any(m.training for m in model.modules())
        adapter.attention_forward(inputs, args)
    assert _state(model) == before
    with pytest.raises(RuntimeError, match="already open"):
        capture = AttentionCapture({})
        with capture:
            capture.__enter__()


def test_evaluation_mode_is_shared_by_nested_and_concurrent_holders():
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train()
    with evaluation_mode(net):
        with evaluation_mode(net):
            assert not net[1].training
        assert not net[1].training  # the outer holder still needs it off
    assert net[1].training


# ---------------------------------------------------------------------------------------------- threads


def test_concurrent_calls_give_exactly_the_sequential_results(seq_dataset):
    """Four threads explain different patients with one shared model, mixing Chefer, Saliency and IG."""
    from pyhealth.datasets import get_dataloader

    model = make_model(seq_dataset, layers=2, heads=2)
    adapter = PyHealthAdapter(model)
    batches = list(get_dataloader(seq_dataset, batch_size=3, shuffle=False))
    methods = {
        "chefer": lambda i, a, t: CheferAttribution(adapter).attribute(i, target=t, additional_forward_args=a),
        "saliency": lambda i, a, t: Saliency(adapter).attribute(i, target=t, additional_forward_args=a),
        "ig": lambda i, a, t: IntegratedGradients(adapter).attribute(i, target=t, additional_forward_args=a, n_steps=8),
    }
    jobs = [(name, b) for b in range(len(batches)) for name in methods] * 2

    def run(job):
        name, b = job
        inputs, args = adapter.captum_inputs(batches[b])
        return methods[name](inputs, args, None)

    sequential = [run(job) for job in jobs]
    results: dict[int, object] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def worker(k: int) -> None:
        try:
            barrier.wait()
            for j in range(k, len(jobs), 4):
                results[j] = run(jobs[j])
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for j, expected in enumerate(sequential):
        for got, want in zip(results[j], expected, strict=True):
            assert torch.equal(got, want), jobs[j]
    assert _state(model) == _state(make_model(seq_dataset, layers=2, heads=2))


def test_a_concurrent_training_step_keeps_its_parameter_gradients(seq_dataset):
    """Capture never freezes parameters: a thread that trains while another explains gets full gradients."""
    model = make_model(seq_dataset, layers=2, heads=2)
    adapter = PyHealthAdapter(model)
    batch = first_batch(seq_dataset)
    inputs, args = adapter.captum_inputs(batch)
    expected = torch.autograd.grad(model(**batch)["loss"], list(model.parameters()), allow_unused=True)
    started, release = threading.Event(), threading.Event()
    got: dict = {}

    def slow_handler(original, *a, **k):
        started.set()
        release.wait(10)
        return original(*a, **k)

    def explain():
        block = model.transformer["conditions"].transformer[0].feed_forward
        with AttentionCapture({"c": find_attention_modules(model)}, overrides={block: slow_handler}):
            adapter.attention_forward(inputs, args)

    thread = threading.Thread(target=explain)
    thread.start()
    started.wait(10)
    try:  # the capture is open in the other thread now
        got["grads"] = torch.autograd.grad(model(**batch)["loss"], list(model.parameters()), allow_unused=True)
    finally:
        release.set()
        thread.join()
    for g, e in zip(got["grads"], expected, strict=True):
        assert (g is None) == (e is None)
        if g is not None:
            assert torch.equal(g, e)


# ---------------------------------------------------------------------------------------------- HuggingFace


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    return BertForSequenceClassification(config).eval()


def test_huggingface_sdpa_model_is_captured_and_restored():
    model = _tiny_bert()
    assert model.config._attn_implementation == "sdpa"
    before = _state(model)
    ids = torch.randint(1, 40, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    reference = model(inputs_embeds=embeds, attention_mask=mask).logits
    modules = find_attention_modules(model)
    assert [attention_kind(m) for m in modules] == ["huggingface", "huggingface"]
    with AttentionCapture({"text": modules}, model=model) as capture:
        logits = model(inputs_embeds=embeds, attention_mask=mask).logits
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
    maps = capture.attention["text"]
    assert [tuple(a.shape) for a in maps] == [(2, 2, 6, 6)] * 2
    assert torch.all(maps[0][1, :, :, 4:] == 0)  # padded keys get no attention (eager mask applied)
    grads = torch.autograd.grad(logits[:, 0].sum(), maps)
    assert all(g.abs().sum() > 0 for g in grads)
    assert _state(model) == before

    # a thread without a capture runs SDPA, bit for bit, while another thread's capture is open
    other: dict = {}
    inside = threading.Event()
    with AttentionCapture({"text": modules}, model=model) as capture:
        inside.set()
        thread = threading.Thread(
            target=lambda: other.setdefault("logits", model(inputs_embeds=embeds, attention_mask=mask).logits)
        )
        thread.start()
        thread.join()
    assert torch.equal(other["logits"], reference)
    assert capture.attention["text"] == []  # nothing of the other thread's call was recorded
    assert _state(model) == before


def _deferred_cases():
    from transformers import (
        Gemma2Config,
        Gemma2ForSequenceClassification,
        GPT2Config,
        GPT2ForSequenceClassification,
        LlamaConfig,
        LlamaForSequenceClassification,
    )

    torch.manual_seed(3)
    small = {"vocab_size": 40, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 32}
    yield "bert", _tiny_bert(), True
    yield "gpt2", GPT2ForSequenceClassification(
        GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, pad_token_id=0)).eval(), True
    yield "llama (grouped-query)", LlamaForSequenceClassification(
        LlamaConfig(hidden_size=16, num_key_value_heads=2, pad_token_id=0, **small)).eval(), True
    yield "gemma2 (soft-capped: kept as tensors)", Gemma2ForSequenceClassification(
        Gemma2Config(hidden_size=16, num_key_value_heads=2, head_dim=8, attn_logit_softcapping=20.0, pad_token_id=0,
                     **small)).eval(), False


def test_deferred_huggingface_attention_equals_the_eager_capture():
    """SDPA forward, probabilities and dA = dO V^T formed afterwards: the same maps and gradients as eager."""
    for name, model, deferrable in _deferred_cases():
        ids = torch.randint(1, 40, (2, 6))
        mask = torch.ones(2, 6, dtype=torch.long)
        mask[1, :2] = 0  # left padding
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        modules = {"text": find_attention_modules(model)}
        with AttentionCapture(modules, model=model) as eager:
            eager_logits = model(inputs_embeds=embeds, attention_mask=mask).logits
        maps = eager.attention["text"]
        eager_grads = torch.autograd.grad(eager_logits[:, 0].sum(), maps)
        with AttentionCapture(modules, model=model, deferred=True) as deferred:
            logits = model(inputs_embeds=embeds, attention_mask=mask).logits
        layers = deferred.attention["text"]
        torch.testing.assert_close(logits, eager_logits, atol=1e-5, rtol=1e-5, msg=name)
        if not deferrable:
            assert all(isinstance(layer, torch.Tensor) for layer in layers), name
            continue
        assert all(not isinstance(layer, torch.Tensor) for layer in layers), name
        outputs = torch.autograd.grad(logits[:, 0].sum(), [layer.graph_tensor for layer in layers])
        rows = torch.tensor([5, 3])
        for layer, attention, grad, d_output in zip(layers, maps, eager_grads, outputs, strict=True):
            assert layer.shape == attention.shape and layer.dtype == attention.dtype, name
            torch.testing.assert_close(layer.probabilities(), attention.detach(), atol=1e-6, rtol=1e-5, msg=name)
            torch.testing.assert_close(layer.gradient(d_output), grad, atol=1e-6, rtol=1e-4, msg=name)
            # a group of heads, and one query row per sample, as the relevance asks for them
            heads = slice(1, 3)
            torch.testing.assert_close(
                layer.probabilities(heads), attention.detach()[:, heads], atol=1e-6, rtol=1e-5, msg=name
            )
            torch.testing.assert_close(layer.gradient(d_output, heads), grad[:, heads], atol=1e-6, rtol=1e-4, msg=name)
            picked = attention.detach()[torch.arange(2), :, rows].unsqueeze(2)
            torch.testing.assert_close(
                layer.probabilities(heads, rows), picked[:, heads], atol=1e-6, rtol=1e-5, msg=name
            )
            picked_grad = grad[torch.arange(2), :, rows].unsqueeze(2)
            torch.testing.assert_close(
                layer.gradient(d_output, heads, rows), picked_grad[:, heads], atol=1e-6, rtol=1e-4, msg=name
            )
        assert _state(model)["implementation"][0] == "sdpa"
