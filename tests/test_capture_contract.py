"""The capture layer's contract, case by case: shared state held and restored, the calling thread's
parameters detached and nobody else's, the error messages, ``nn.MultiheadAttention`` written out in the
cases the broader tests leave out, and the ``transformers`` dispatcher (which calls are deferred, which run
eagerly, which run the model's own implementation), with expected values from torch's own modules or a
softmax written out here."""

from __future__ import annotations

import re
import threading

import pytest
import torch
import transformers
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from captum_chefer import capture as capture_module
from captum_chefer.capture import (
    HUGGINGFACE_DISPATCHER,
    AttentionCapture,
    DeferredHuggingFaceAttention,
    attention_kind,
    evaluation_mode,
    find_attention_modules,
    multihead_attention,
)


def _exactly(message: str) -> str:
    return "^" + re.escape(message) + "$"


def _in_thread(function):
    """Run ``function`` in another thread and return its result (re-raising its exception)."""
    out: dict = {}

    def run():
        try:
            out["value"] = function()
        except BaseException as error:  # re-raised below
            out["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


# ---------------------------------------------------------------------------------------------- shared state


def test_evaluation_mode_is_applied_again_by_a_later_holder():
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train()
    for _ in range(2):  # the first holder's release must not leave a stale entry behind
        with evaluation_mode(net):
            assert not net.training and not net[0].training and not net[1].training
        assert net.training and net[0].training and net[1].training


def test_evaluation_mode_switches_the_modules_it_is_given():
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train()
    with evaluation_mode(net, modules=(net[1],)):
        assert not net[1].training and net[0].training and net.training
    assert net[1].training


def test_evaluation_mode_of_another_thread_is_shared_until_both_leave():
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train()
    with evaluation_mode(net):

        def other():
            with evaluation_mode(net):
                inside = net[1].training
            return inside, net[1].training

        assert _in_thread(other) == (False, False)  # the other thread left; this one still holds it
        assert not net[1].training
    assert net[1].training


def test_an_instance_forward_is_called_by_the_handler_and_others_and_restored():
    linear = nn.Linear(3, 2)
    calls = []
    plain = linear.forward

    def own(x):
        calls.append(threading.current_thread().name)
        return plain(x)

    linear.forward = own
    x = torch.randn(4, 3)
    expected = x @ linear.weight.T + linear.bias
    doubled = {linear: lambda original, *a, **k: 2 * original(*a, **k)}
    with AttentionCapture({}, overrides=doubled, detach_parameters=False):
        torch.testing.assert_close(linear(x), 2 * expected)  # the handler got the instance forward as the original
        torch.testing.assert_close(_in_thread(lambda: linear(x)), expected)  # other threads call it unchanged
    assert vars(linear)["forward"] is own and len(calls) == 2
    torch.testing.assert_close(linear(x), expected)
    with AttentionCapture({}, overrides={nn.Linear(1, 1): lambda original, *a, **k: None}):
        pass
    assert vars(linear)["forward"] is own


def test_a_class_forward_is_restored_by_removing_the_instance_attribute():
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    with AttentionCapture({"s": [mha]}):
        assert "forward" in vars(mha)
    assert "forward" not in vars(mha)


def test_nested_captures_the_innermost_records_and_the_outer_again_after_it():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True).eval()
    other = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(1, 3, 8)
    with AttentionCapture({"s": [layer.self_attn]}) as outer:
        layer(x)
        with AttentionCapture({"s": [layer.self_attn], "t": [other]}) as inner:
            layer(x)
            other(x, x, x)
        assert "forward" in vars(layer.self_attn) and "forward" not in vars(other)  # the outer capture still patches
        layer(x)
    assert "forward" not in vars(layer.self_attn)
    assert len(outer.attention["s"]) == 2 and len(inner.attention["s"]) == 1 and len(inner.attention["t"]) == 1
    assert [(stream, module) for stream, module, _ in inner.calls] == [("s", layer.self_attn), ("t", other)]
    recorded_maps = [*inner.attention["s"], *inner.attention["t"]]
    assert all(tensor is recorded for (_, _, tensor), recorded in zip(inner.calls, recorded_maps, strict=True))
    assert inner.records(other) and not outer.records(other)


def test_calls_list_every_call_in_order_also_of_a_module_called_twice():
    first = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    second = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(2, 3, 8)
    with AttentionCapture({"a": [first, first], "b": [second]}) as capture:  # listed twice under one stream: allowed
        first(x, x, x)
        second(x, x, x)
        first(x, x, x)
    assert [(stream, module) for stream, module, _ in capture.calls] == [("a", first), ("b", second), ("a", first)]
    assert len(capture.attention["a"]) == 2 and len(capture.attention["b"]) == 1
    assert capture.calls[1][2] is capture.attention["b"][0]


def test_a_capture_can_be_opened_again_once_closed():
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(1, 3, 8)
    capture = AttentionCapture({"s": [mha]})
    for _ in range(2):
        with capture:
            mha(x, x, x)
    assert len(capture.attention["s"]) == 2 and "forward" not in vars(mha)


def test_a_failed_enter_leaves_the_model_as_found():
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True), 2).train()
    first, second = (layer.self_attn for layer in model.layers)
    overrides = {second: lambda original, *a, **k: original(*a, **k)}
    with (
        pytest.raises(ValueError, match=_exactly("MultiheadAttention is both captured and overridden")),
        AttentionCapture({"s": [first, second]}, overrides=overrides, model=model),
    ):
        pass
    assert all(m.training for m in model.modules())
    assert not any("forward" in vars(m) for m in model.modules())
    x = torch.randn(1, 3, 8)
    with AttentionCapture({"s": [first]}) as later:  # and no capture of the failed one is left open in this thread
        model.eval()(x)
    assert len(later.attention["s"]) == 1


# ---------------------------------------------------------------------------------------------- parameters


def test_parameters_are_detached_in_arguments_keywords_lists_and_tuples_for_this_thread_only():
    linear = nn.Linear(3, 2)
    x = torch.randn(4, 3, requires_grad=True)
    with AttentionCapture({}):
        called = linear(x)
        by_keyword = nn.functional.linear(x, weight=linear.weight, bias=linear.bias)
        listed = torch.cat([linear.bias, linear.bias])
        tupled = torch.stack((linear.bias, linear.bias))
        mixed = torch.cat([linear.bias, x[0, :2]])
        elsewhere = _in_thread(lambda: torch.cat([linear.bias]))
    for out in (called, by_keyword):
        assert out.requires_grad  # through x
        (grad,) = torch.autograd.grad(out.sum(), x)
        torch.testing.assert_close(grad, linear.weight.detach().sum(0).expand(4, 3))
        with pytest.raises(RuntimeError):
            torch.autograd.grad(out.sum(), linear.weight, retain_graph=True)
    assert not listed.requires_grad and not tupled.requires_grad
    assert mixed.requires_grad  # a tensor that is not a parameter keeps its graph
    assert elsewhere.requires_grad  # another thread sees its parameters as they are
    with AttentionCapture({}, detach_parameters=False):
        kept = torch.cat([linear.bias])
    assert kept.requires_grad and torch.cat([linear.bias]).requires_grad


# ---------------------------------------------------------------------------------------------- kinds and errors


class Attention(nn.Module):  # PyHealth's class name, but not PyHealth's class
    def forward(self, x):
        return x


class DispatchingAttention(nn.Module):
    """A module whose forward names transformers' attention functions."""

    def __init__(self, config=None):
        super().__init__()
        if config is not None:
            self.config = config

    def forward(self, q, k, v, mask):
        return ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation](self, q, k, v, mask)


def _kind_of(cls: type, module_name: str, *args) -> object:
    renamed = type(cls.__name__, (cls,), {"__module__": module_name, "forward": cls.forward})
    return attention_kind(renamed(*args))


def test_attention_kinds_need_every_condition():
    import pyhealth.models.transformer as pyhealth_transformer

    assert attention_kind(pyhealth_transformer.Attention()) == "pyhealth"
    assert attention_kind(pyhealth_transformer.PositionwiseFeedForward(4, 8)) is None  # PyHealth, not Attention
    assert _kind_of(Attention, "mypackage.layers") is None  # named Attention, not PyHealth's
    config = transformers.BertConfig()
    assert _kind_of(DispatchingAttention, "transformers.models.mine", config) == "huggingface"
    assert _kind_of(DispatchingAttention, "transformers.models.mine") is None  # no config
    assert _kind_of(DispatchingAttention, "mypackage.layers", config) is None  # not a transformers module
    assert _kind_of(Attention, "transformers.models.mine") is None  # does not dispatch
    namespace: dict = {}
    exec("def forward(self, x):\n    return ALL_ATTENTION_FUNCTIONS", namespace)  # no source to read
    sourceless = type(
        "Sourceless", (nn.Module,), {"__module__": "transformers.models.mine", "forward": namespace["forward"]}
    )
    module = sourceless()
    module.config = config
    assert attention_kind(module) is None
    mha = nn.MultiheadAttention(4, 2)
    assert find_attention_modules(nn.Sequential(nn.Linear(2, 2), module, mha)) == [mha]


def test_error_messages_name_the_problem_and_the_fix():
    mha = nn.MultiheadAttention(8, 2)
    with pytest.raises(TypeError, match=_exactly(
        "Linear (stream 'x') is not an attention module this package can capture; supported: PyHealth's Attention, "
        "torch.nn.MultiheadAttention and transformers attention modules that dispatch through AttentionInterface"
    )):
        AttentionCapture({"x": [nn.Linear(2, 2)]})
    with pytest.raises(ValueError, match=_exactly("MultiheadAttention is listed under streams 'a' and 'b'")):
        AttentionCapture({"a": [mha], "b": [mha]})
    capture = AttentionCapture({})
    already_open = _exactly("this AttentionCapture is already open; make a new one for each call")
    with capture, pytest.raises(RuntimeError, match=already_open):
        capture.__enter__()
    x = torch.randn(3, 8)
    message = _exactly("MultiheadAttention with add_bias_kv or add_zero_attn is not supported by attention capture")
    for module in (nn.MultiheadAttention(8, 2, add_bias_kv=True), nn.MultiheadAttention(8, 2, add_zero_attn=True)):
        with pytest.raises(NotImplementedError, match=message):
            multihead_attention(module, x, x, x)
    config = transformers.BertConfig()
    stray = type("StrayAttention", (DispatchingAttention,), {"__module__": "transformers.models.no_such_model"})(config)
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(TypeError, match=_exactly(
        "StrayAttention has no eager_attention_forward in transformers.models.no_such_model; its attention "
        "probabilities cannot be captured"
    )), AttentionCapture({"s": [stray]}):
        stray(q, q, q, None)
    assert config._attn_implementation_internal != HUGGINGFACE_DISPATCHER


# ---------------------------------------------------------------------------------------------- MultiheadAttention


def _compare(module, *args, **kwargs):
    out, weights, probabilities = multihead_attention(module, *args, **kwargs)
    expected, expected_weights = module(*args, **kwargs)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    if expected_weights is None:
        assert weights is None
    else:
        torch.testing.assert_close(weights, expected_weights, atol=1e-6, rtol=1e-5)
    return probabilities


def test_multihead_attention_unbatched_with_padding_and_per_head_weights():
    torch.manual_seed(5)
    mha = nn.MultiheadAttention(8, 2).eval()
    x = torch.randn(5, 8)
    padding = torch.tensor([False, False, False, True, True])
    probabilities = _compare(mha, x, x, x, key_padding_mask=padding, average_attn_weights=False)
    assert probabilities.shape == (1, 2, 5, 5) and bool((probabilities[..., 3:] == 0).all())
    _compare(mha, x, x, x, key_padding_mask=padding)
    _compare(mha, x, x, x, need_weights=False)


def test_multihead_attention_without_bias_with_kdim_vdim_and_per_head_weights():
    torch.manual_seed(6)
    mha = nn.MultiheadAttention(8, 2, bias=False, kdim=6, vdim=4, batch_first=True).eval()
    q, k, v = torch.randn(2, 3, 8), torch.randn(2, 5, 6), torch.randn(2, 5, 4)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[0, 4] = True
    _compare(mha, q, k, v, key_padding_mask=padding, average_attn_weights=False)
    _compare(mha, q, k, v, attn_mask=torch.randn(2 * 2, 3, 5))


def test_multihead_attention_with_nonzero_projection_biases():
    """torch initialises the projection biases to zero; with other biases each of q, k and v needs its own."""
    torch.manual_seed(13)
    for mha, (q, k, v) in ((nn.MultiheadAttention(8, 2, batch_first=True), [torch.randn(2, 4, 8)] * 3),
                           (nn.MultiheadAttention(8, 2, kdim=6, vdim=4, batch_first=True),
                            (torch.randn(2, 3, 8), torch.randn(2, 5, 6), torch.randn(2, 5, 4)))):
        mha.eval()
        with torch.no_grad():
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
        _compare(mha, q, k, v, average_attn_weights=False)


def test_multihead_attention_causal_flag_alone_means_the_causal_mask():
    torch.manual_seed(7)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(2, 4, 8)
    out, weights, probabilities = multihead_attention(mha, x, x, x, is_causal=True)
    expected, expected_weights = mha(x, x, x, attn_mask=nn.Transformer.generate_square_subsequent_mask(4))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, expected_weights, atol=1e-6, rtol=1e-5)
    assert bool((probabilities.triu(1) == 0).all())
    assert bool((probabilities[..., torch.ones(4, 4, dtype=torch.bool).tril()] > 0).all())


def test_multihead_attention_casts_a_float_mask_to_the_scores_dtype():
    torch.manual_seed(8)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(2, 4, 8)
    mask = torch.randn(4, 4, dtype=torch.float64)
    out, weights, probabilities = multihead_attention(mha, x, x, x, attn_mask=mask)
    assert out.dtype == weights.dtype == probabilities.dtype == torch.float32
    expected, expected_weights = mha(x, x, x, attn_mask=mask.float())
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, expected_weights, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- transformers


def _bert(implementation: str = "sdpa") -> nn.Module:
    torch.manual_seed(9)
    config = transformers.BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=16)
    model = transformers.BertModel(config).eval()
    model.set_attn_implementation(implementation)
    return model


def _softmax_attention(q, k, v, mask, scaling):
    """Plain softmax attention written out: the probabilities ``[B, H, Q, K]`` and the output ``[B, Q, H, d]``."""
    scores = q @ k.transpose(-1, -2) * scaling
    probabilities = torch.softmax(scores if mask is None else scores + mask, dim=-1)
    return probabilities, (probabilities @ v).transpose(1, 2)


def _qkv(seed: int = 10):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, 5, 4, generator=generator) for _ in range(3)]


def _dispatch(*args, **kwargs):
    """The dispatcher as transformers calls it, looked up at the call (it is registered when a capture first opens)."""
    return ALL_ATTENTION_FUNCTIONS[HUGGINGFACE_DISPATCHER](*args, **kwargs)


def _padding_mask() -> torch.Tensor:
    mask = torch.zeros(2, 1, 5, 5)
    mask[1, ..., 3:] = torch.finfo(torch.float32).min
    return mask


def test_which_calls_are_deferred():
    """SDPA and the probabilities formed later only where plain softmax attention is all the call computes."""
    model = _bert()
    module = model.encoder.layer[0].attention.self
    dispatcher = _dispatch
    q, k, v = _qkv()
    mask = _padding_mask()
    extra = torch.zeros(4)
    cases = [
        ({}, mask, True), ({"dropout": 0.0}, mask, True), ({"softcap": None}, mask, True),
        ({}, None, True), ({"dropout": 0.1}, mask, False), ({"softcap": 30.0}, mask, False),
        ({"sinks": extra}, mask, False), ({"s_aux": extra}, mask, False), ({"position_bias": extra}, mask, False),
        ({"head_mask": extra}, mask, False),
        ({}, mask.bool(), False),
    ]
    for kwargs, case_mask, deferred in cases:
        with AttentionCapture({"s": [module]}, deferred=True) as capture:
            output, weights = dispatcher(module, q, k, v, case_mask, scaling=module.scaling, **kwargs)
        (layer,) = capture.attention["s"]
        assert isinstance(layer, DeferredHuggingFaceAttention) == deferred, (kwargs, case_mask is None)
        assert (weights is None) == deferred
        if case_mask is None or case_mask.is_floating_point():
            probabilities, expected = _softmax_attention(q, k, v, case_mask, module.scaling)
            torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(
                layer.probabilities() if deferred else layer, probabilities, atol=1e-6, rtol=1e-5
            )
    # without deferred=True, in training mode, or a causal module given no mask: the eager tensor
    for deferred_capture, training, causal in ((False, False, False), (True, True, False), (True, False, True)):
        module.train(training)
        module.is_causal = causal
        with AttentionCapture({"s": [module]}, deferred=deferred_capture) as capture:
            dispatcher(module, q, k, v, None, scaling=module.scaling, dropout=0.0)
        assert isinstance(capture.attention["s"][0], torch.Tensor)
    module.train(False)
    module.is_causal = False
    del module.is_causal  # a module without the attribute counts as not causal
    with AttentionCapture({"s": [module]}, deferred=True) as capture:
        dispatcher(module, q, k, v, None, scaling=module.scaling)
    assert isinstance(capture.attention["s"][0], DeferredHuggingFaceAttention)


@pytest.mark.parametrize("shape", ["per head", "per query", "keys only", "shared by the batch"])
def test_deferred_maps_and_gradients_of_head_groups_and_rows_for_every_mask_shape(shape):
    model = _bert()
    module = model.encoder.layer[0].attention.self
    q, k, v = _qkv(11)
    generator = torch.Generator().manual_seed(12)
    mask = {
        "per head": torch.randn(2, 4, 5, 5, generator=generator),
        "per query": torch.randn(2, 1, 5, 5, generator=generator),
        "keys only": torch.randn(2, 1, 1, 5, generator=generator),
        "shared by the batch": torch.randn(1, 1, 5, 5, generator=generator),
    }[shape]
    with AttentionCapture({"s": [module]}, deferred=True) as capture:
        output, _ = ALL_ATTENTION_FUNCTIONS[HUGGINGFACE_DISPATCHER](module, q, k, v, mask, scaling=module.scaling)
    (layer,) = capture.attention["s"]
    assert isinstance(layer, DeferredHuggingFaceAttention)
    assert layer.shape == (2, 4, 5, 5) and layer.dtype == torch.float32
    assert layer.graph_tensor is output
    probabilities, expected = _softmax_attention(q, k, v, mask, module.scaling)
    probabilities = probabilities.requires_grad_(True)
    d_output = torch.randn(2, 5, 4, 4, generator=generator)
    (d_probabilities,) = torch.autograd.grad((probabilities @ v).transpose(1, 2), probabilities, d_output)
    probabilities = probabilities.detach()
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
    rows = torch.tensor([4, 1])
    samples = torch.arange(2)
    for heads in (None, slice(1, 3), slice(3, 4)):
        chosen = slice(None) if heads is None else heads
        torch.testing.assert_close(layer.probabilities(heads), probabilities[:, chosen], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(layer.gradient(d_output, heads), d_probabilities[:, chosen], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.probabilities(heads, rows),
                                   probabilities[samples, :, rows].unsqueeze(2)[:, chosen], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(layer.gradient(d_output, heads, rows),
                                   d_probabilities[samples, :, rows].unsqueeze(2)[:, chosen], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_calls_not_captured_run_the_models_own_implementation(implementation):
    model = _bert(implementation)
    ids = torch.tensor([[2, 5, 7, 3, 9], [2, 8, 3, 0, 0]])
    mask = (ids != 0).long()
    reference = model(input_ids=ids, attention_mask=mask).last_hidden_state
    modules = find_attention_modules(model)
    with AttentionCapture({"s": modules[1:]}, model=model) as capture:  # the first layer is not captured
        assert model.config._attn_implementation == HUGGINGFACE_DISPATCHER
        output = model(input_ids=ids, attention_mask=mask).last_hidden_state
        elsewhere = _in_thread(lambda: model(input_ids=ids, attention_mask=mask).last_hidden_state)
    assert len(capture.attention["s"]) == 1 and capture.calls[0][1] is modules[1]
    torch.testing.assert_close(output, reference, atol=1e-5, rtol=1e-5)
    assert torch.equal(elsewhere, reference)  # another thread: the original implementation and mask, bit for bit
    assert model.config._attn_implementation == implementation
    assert id(model.config) not in capture_module._huggingface_original


def test_multihead_attention_stays_on_the_device_of_the_module():
    """On PyTorch's ``meta`` device nothing may be created on the default device (the causal mask included)."""
    meta = torch.device("meta")
    mha = nn.MultiheadAttention(8, 2, batch_first=True, device=meta)
    x = torch.empty(2, 4, 8, device=meta)
    outputs = multihead_attention(mha, x, x, x, is_causal=True)
    assert [out.device for out in outputs] == [meta] * 3


def test_the_dispatcher_passes_the_call_arguments_on_in_every_path():
    """A scaling other than ``d ** -0.5`` (some models set their own) reaches SDPA in the deferred path, and the
    model's own implementation in a thread without a capture; ``module`` does too (SDPA reads its causal flag)."""
    dispatcher = _dispatch
    q, k, v = _qkv(14)
    for implementation in ("sdpa", "eager"):
        model = _bert(implementation)
        module = model.encoder.layer[0].attention.self
        probabilities, expected = _softmax_attention(q, k, v, None, 0.3)
        with AttentionCapture({"s": [module]}, deferred=True) as capture:
            output, _ = dispatcher(module, q, k, v, None, scaling=0.3)
            elsewhere, _ = _in_thread(lambda module=module: dispatcher(module, q, k, v, None, scaling=0.3))
        torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(capture.attention["s"][0].probabilities(), probabilities, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(elsewhere, expected, atol=1e-5, rtol=1e-5, msg=implementation)  # not causal either


def test_deferred_rows_of_a_two_token_sequence():
    """With two queries the per-query mask must be read at the row asked for."""
    module = _bert().encoder.layer[0].attention.self
    q, k, v = (t[:, :, :2] for t in _qkv(15))
    mask = torch.tensor([[0.0, -1.0], [-2.0, 0.5]]).expand(2, 1, 2, 2).clone()
    mask[1] = mask[1].flip(-1)
    with AttentionCapture({"s": [module]}, deferred=True) as capture:
        ALL_ATTENTION_FUNCTIONS[HUGGINGFACE_DISPATCHER](module, q, k, v, mask, scaling=module.scaling)
    probabilities, _ = _softmax_attention(q, k, v, mask, module.scaling)
    rows = torch.tensor([1, 0])
    expected = probabilities[torch.arange(2), :, rows].unsqueeze(2)
    torch.testing.assert_close(capture.attention["s"][0].probabilities(None, rows), expected, atol=1e-6, rtol=1e-5)


def test_a_transformers_module_listed_before_others_does_not_end_the_setup():
    model = _bert()
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    modules = find_attention_modules(model)
    x = torch.randn(1, 3, 8)
    with AttentionCapture({"text": modules, "other": [mha]}, model=model) as capture:
        model(input_ids=torch.tensor([[2, 5, 7]]))
        mha(x, x, x)
    assert len(capture.attention["text"]) == 2 and len(capture.attention["other"]) == 1
