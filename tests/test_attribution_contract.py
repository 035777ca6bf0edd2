"""``CheferAttribution.attribute``'s contract on the hand-computed stacked toy: every target form Captum
allows, the exact error messages, and how an ``AttentionModel`` is called.

Expected values are those worked out in tests/test_stacked_toys.py (two layers, two heads, x = [1, -1, 2];
class 1 explains the negated logit):

    class 0, p=0: [1.19015625, 0, .294921875]      class 0, p=2: [.38572265625, 0, 1.61787109375]
    class 1, p=0: [1, .173984375, 0]               class 1, p=2: [0, .05625, 1]
"""

from __future__ import annotations

import re

import pytest
import torch
from test_stacked_toys import A1, A2, StackedToy, _x

from captum_chefer import CheferAttribution
from captum_chefer.attribution import AttentionForward

CLASS0 = [[1.19015625, 0.0, 0.294921875], [0.38572265625, 0.0, 1.61787109375]]
CLASS1 = [[1.0, 0.173984375, 0.0], [0.0, 0.05625, 1.0]]


def _two_classes(**kwargs) -> StackedToy:
    return StackedToy([A1, A2], classes=2, **kwargs)


@pytest.mark.parametrize(
    "target, expected",
    [
        (0, CLASS0),
        (1, CLASS1),
        (torch.tensor(1), CLASS1),  # a 0-dim tensor: one class for the batch
        ([0, 1], [CLASS0[0], CLASS1[1]]),
        ((1, 0), [CLASS1[0], CLASS0[1]]),
        (torch.tensor([[1], [0]]), [CLASS1[0], CLASS0[1]]),  # [B, 1], as some Captum callers pass it
        (torch.tensor([1, 1], dtype=torch.int32), CLASS1),
    ],
)
@pytest.mark.parametrize("propagation", ["row", "dense"])
def test_every_target_form(target, expected, propagation):
    out = CheferAttribution(_two_classes()).attribute(_x(), target=target, propagation=propagation)
    torch.testing.assert_close(out, torch.tensor(expected))


def test_a_tensor_gives_a_tensor_and_a_tuple_a_tuple():
    method = CheferAttribution(StackedToy([A1, A2]))
    single = method.attribute(_x())
    assert isinstance(single, torch.Tensor)
    (first,) = method.attribute((_x(),))
    torch.testing.assert_close(first, single)
    torch.testing.assert_close(single, torch.tensor(CLASS0))


def test_the_method_describes_itself_as_captum_expects():
    method = CheferAttribution(StackedToy([A1, A2]))
    assert method.get_name() == "Chefer" and CheferAttribution.get_name() == "Chefer"
    assert method.has_convergence_delta() is False
    assert method.multiplies_by_inputs is False
    assert method.forward_func is method.model  # Captum's methods (NoiseTunnel, metrics) call forward_func
    assert isinstance(method.model, StackedToy)


def test_inside_no_grad():
    with torch.no_grad():
        out = CheferAttribution(StackedToy([A1, A2])).attribute(_x())
    torch.testing.assert_close(out, torch.tensor(CLASS0))


@pytest.mark.parametrize(
    "target, error, message",
    [
        (True, TypeError, "target must be an int, a sequence of ints or a tensor, not a bool"),
        (False, TypeError, "target must be an int, a sequence of ints or a tensor, not a bool"),
        (torch.tensor([0.0, 1.0]), TypeError, "target must hold integer class indices, got dtype torch.float32"),
        ([0.5, 1.0], TypeError, "target must hold integer class indices, got dtype torch.float32"),
        ("1", TypeError, "target must be an int, a sequence of ints, a tensor or None; got str"),
        (1.0, TypeError, "target must be an int, a sequence of ints, a tensor or None; got float"),
        (2, ValueError, "target 2 is out of range: the model has 2 outputs, so targets are class indices 0..1"),
        (-1, ValueError, "target -1 is out of range: the model has 2 outputs, so targets are class indices 0..1"),
        ([0, 2], ValueError, "target 2 is out of range: the model has 2 outputs, so targets are class indices 0..1"),
        ([3, -1], ValueError,
         "target [-1, 3] is out of range: the model has 2 outputs, so targets are class indices 0..1"),
        ([0, 1, 0], ValueError, "target must be one index for the batch or one per sample (2); got shape (3,). "
         "Multi-dimensional (tuple) targets are not supported."),
        (torch.tensor([[0, 1]]), ValueError, "target must be one index for the batch or one per sample (2); got shape "
         "(1, 2). Multi-dimensional (tuple) targets are not supported."),
        (None, ValueError, "target is required: the model has 2 outputs. Pass an int, a list or tensor of 2 class "
         "indices, or adapter.captum_target(batch)."),
    ],
    ids=repr,
)
def test_bad_targets_are_named(target, error, message):
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        CheferAttribution(_two_classes()).attribute(_x(), target=target)


def test_one_output_needs_no_target_and_accepts_class_zero():
    method = CheferAttribution(StackedToy([A1, A2]))
    torch.testing.assert_close(method.attribute(_x(), target=0), method.attribute(_x()))
    with pytest.raises(ValueError, match=re.escape(
        "target 1 is out of range for a model with a single logit (binary): "
        "that logit is the positive class's score, explained with target=None (or 0)"
    )):
        method.attribute(_x(), target=1)


def test_logits_must_be_two_dimensional():
    class FlatLogits(StackedToy):
        def _run(self, inputs, pooled_row_only):
            captured = super()._run(inputs, pooled_row_only)
            captured.logits = captured.logits[:, 0]
            return captured

    with pytest.raises(ValueError, match=r"^the model must return logits \[B, C\]; got shape \(2,\)$"):
        CheferAttribution(FlatLogits([A1, A2])).attribute(_x())


@pytest.mark.parametrize(
    "options, message",
    [
        ({"layers": 0}, "layers must be a positive int or None, got 0"),
        ({"layers": 1.5}, "layers must be a positive int or None, got 1.5"),
        ({"propagation": "sparse"}, "propagation must be 'row' or 'dense', got 'sparse'"),
        ({"head_reduction": "median"}, "head_reduction must be 'mean' or 'max', got 'median'"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        CheferAttribution(StackedToy([A1, A2])).attribute(_x(), **options)


@pytest.mark.parametrize(
    "inputs", [(), [torch.ones(2, 3)], (torch.ones(2, 3), [1.0])], ids=["empty", "list", "non-tensor"]
)
def test_inputs_must_be_tensors(inputs):
    with pytest.raises(TypeError, match=r"^inputs must be a tensor or a non-empty tuple of tensors$"):
        CheferAttribution(StackedToy([A1, A2])).attribute(inputs)


def test_additional_forward_args_reach_the_model_as_a_tuple():
    seen = []

    class Recording(StackedToy):
        def attention_forward(self, inputs, additional_forward_args, *, pooled_row_only=False):
            seen.append(("attention_forward", additional_forward_args))
            return self._run(inputs, pooled_row_only)

        def relevance_to_inputs(self, relevance, inputs, additional_forward_args):
            seen.append(("relevance_to_inputs", additional_forward_args))
            return super().relevance_to_inputs(relevance, inputs, additional_forward_args)

    mask = torch.ones(2, 3, dtype=torch.bool)
    for args, expected in ((None, ()), (mask, (mask,)), ((mask, mask), (mask, mask))):
        CheferAttribution(Recording([A1, A2])).attribute(_x(), additional_forward_args=args)
        assert [name for name, _ in seen] == ["attention_forward", "relevance_to_inputs"]
        for _, got in seen:
            assert isinstance(got, tuple) and len(got) == len(expected)
            assert all(a is b for a, b in zip(got, expected, strict=True))
        seen.clear()


def test_layers_that_are_not_a_stack_are_refused_by_the_fused_path():
    # independent leaves: autograd never needs layer 2's gradient to reach layer 1, so layer 1's comes first
    message = (
        "attention gradients of stream 'x' did not arrive layer by layer from the last one (layer 0 came when 1 "
        "was due): the layers are not a stack; return AttentionForward(..., stacked=False)"
    )
    with pytest.raises(RuntimeError, match=f"^{re.escape(message)}$"):
        CheferAttribution(StackedToy([A1, A2], leaves=True)).attribute(_x())
    # the dense reference does not need the order, nor does the row recursion when the model says so
    out = CheferAttribution(StackedToy([A1, A2], leaves=True)).attribute(_x(), propagation="dense")
    torch.testing.assert_close(out, torch.tensor(CLASS0))
    out = CheferAttribution(StackedToy([A1, A2], leaves=True, stacked=False)).attribute(_x())
    torch.testing.assert_close(out, torch.tensor(CLASS0))


def test_attention_shapes_are_checked_with_a_message_naming_the_layer():
    class Maps(StackedToy):
        def __init__(self, change):
            super().__init__([A1, A2])
            self.change = change

        def _run(self, inputs, pooled_row_only):
            captured = super()._run(inputs, pooled_row_only)
            captured.attention["x"] = self.change(captured.attention["x"])
            return captured

    def attribute(change, propagation="row"):
        return CheferAttribution(Maps(change)).attribute(_x(), propagation=propagation)

    with pytest.raises(ValueError, match=r"^attention_forward returned no attention layers for stream 'x'$"):
        attribute(lambda maps: [])
    row_hint = " (or [B, H, 1, L] for the last layer, when asked for the pooled row only)"
    first_row = "attention of stream 'x', layer 0, has shape (2, 2, 1, 3); expected [B, H, 3, 3] like the first layer"
    with pytest.raises(ValueError, match=f"^{re.escape(first_row + row_hint)}$"):
        attribute(lambda maps: [maps[0][:, :, :1], maps[1]])
    with pytest.raises(ValueError, match=f"^{re.escape(first_row)}$"):  # dense: no pooled row allowed, no hint
        attribute(lambda maps: [maps[0][:, :, :1], maps[1]], "dense")
    five = "attention of stream 'x', layer 1, has shape (2, 1, 2, 3, 3); expected [B, H, 3, 3] like the first layer"
    with pytest.raises(ValueError, match=f"^{re.escape(five + row_hint)}$"):
        attribute(lambda maps: [maps[0], maps[0].unsqueeze(1)])
    two = "attention of stream 'x', layer 1, has shape (3, 3); expected [B, H, 3, 3] like the first layer"
    with pytest.raises(ValueError, match=f"^{re.escape(two + row_hint)}$"):
        attribute(lambda maps: [maps[0], maps[0][0, 0]])
    wide = "attention of stream 'x', layer 1, has shape (2, 2, 1, 4); expected [B, H, 3, 3] like the first layer"
    with pytest.raises(ValueError, match=f"^{re.escape(wide + row_hint)}$"):
        attribute(lambda maps: [maps[0], torch.ones(2, 2, 1, 4)])


def test_pooled_row_only_is_passed_to_whoever_accepts_it():
    calls = []

    class KeywordsToy(StackedToy):
        def attention_forward(self, inputs, additional_forward_args, **kwargs):
            calls.append(kwargs)
            return self._run(inputs, kwargs.get("pooled_row_only", False))

    class Unreadable:
        """A callable whose signature cannot be read: it is called with the positional arguments only."""

        __signature__ = "not a signature"

        def __init__(self, toy):
            self.toy = toy

        def __call__(self, inputs, additional_forward_args, **kwargs):
            calls.append(kwargs)
            return self.toy._run(inputs, False)

    class ExplicitToy(StackedToy):
        def attention_forward(self, inputs, additional_forward_args, *, pooled_row_only=False):
            calls.append({"pooled_row_only": pooled_row_only})
            return self._run(inputs, pooled_row_only)

    for propagation, expected in (("row", True), ("dense", False)):
        out = CheferAttribution(ExplicitToy([A1, A2])).attribute(_x(), propagation=propagation)
        torch.testing.assert_close(out, torch.tensor(CLASS0))
        assert calls.pop() == {"pooled_row_only": expected}
    toy = KeywordsToy([A1, A2])
    for propagation, expected in (("row", {"pooled_row_only": True}), ("dense", {})):
        out = CheferAttribution(toy).attribute(_x(), propagation=propagation)
        torch.testing.assert_close(out, torch.tensor(CLASS0))
        assert calls.pop() == expected
    unreadable = StackedToy([A1, A2])
    unreadable.attention_forward = Unreadable(unreadable)
    out = CheferAttribution(unreadable).attribute(_x())
    torch.testing.assert_close(out, torch.tensor(CLASS0))
    assert calls.pop() == {}


def test_require_attention_runs_when_the_method_is_made():
    class NoAttention(StackedToy):
        def require_attention(self):
            raise ValueError("this model has no attention")

    with pytest.raises(ValueError, match=r"^this model has no attention$"):
        CheferAttribution(NoAttention([A1, A2]))


def test_what_is_neither_a_model_nor_an_attention_model_is_refused():
    message = (
        "CheferAttribution needs an adapter that exposes the model's attention, got function; wrap the model first: "
        "CheferAttribution(captum_chefer.adapter_for(model)), or PyHealthAdapter(model), HuggingFaceAdapter(model), "
        "TransformerAdapter(model)"
    )
    with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
        CheferAttribution(lambda x: x)


def test_attention_forward_result_type():
    captured = StackedToy([A1, A2]).attention_forward((_x(),), ())
    assert isinstance(captured, AttentionForward) and captured.stacked is True
    assert AttentionForward(logits=captured.logits, attention={}, pool_index={}).stacked is True


def test_only_the_dense_reference_forms_the_dense_product(monkeypatch):
    """``propagation="row"`` (stacked or not) never multiplies L x L relevance matrices; ``"dense"`` does."""
    import captum_chefer.attribution as attribution

    def refuse(*args, **kwargs):
        raise AssertionError("the L x L relevance matrix was formed")

    monkeypatch.setattr(attribution, "dense_increment", refuse)  # R - I, which the dense path forms
    for toy in (StackedToy([A1, A2]), StackedToy([A1, A2], leaves=True, stacked=False)):
        torch.testing.assert_close(CheferAttribution(toy).attribute(_x()), torch.tensor(CLASS0))
        torch.testing.assert_close(
            CheferAttribution(toy).attribute(_x(), use_gradients=False),
            torch.tensor([[1.9875, 1.175, 0.8375], [1.3625, 0.35625, 2.28125]]),  # tests/test_stacked_toys.py
        )
        with pytest.raises(AssertionError, match="was formed"):
            CheferAttribution(toy).attribute(_x(), propagation="dense")
