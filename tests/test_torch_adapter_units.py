"""Unit tests of ``captum_chefer.adapters.torch`` (``TransformerAdapter`` and its helpers): exact error messages
and warnings, default arguments checked through behaviour, and small results checked against values worked out
by hand. Tiny models built here; each test runs in well under a second."""

from __future__ import annotations

import math
import os
import re
import sys
import warnings

import pytest
import torch
from torch import nn

import captum_chefer
from captum_chefer import TransformerAdapter
from captum_chefer.adapters.torch import _is_torchvision_vit, blurred_images, logits_of
from captum_chefer.capture import evaluation_mode


def exact(message: str) -> str:
    """A ``match=`` pattern that accepts ``message`` only, whole."""
    return "^" + re.escape(message) + "$"


class TrainingShift(nn.Module):
    """Adds 1 in training mode: the output tells whether the adapter switched the model to evaluation mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (1.0 if self.training else 0.0)


class Net(nn.Module):
    """ids ``[B, L]`` (embedded) or embeddings ``[B, L, D]`` (+ an optional ``[B, L]`` mask, non-zero on real
    tokens) -> one ``nn.MultiheadAttention`` -> the first position -> logits."""

    def __init__(
        self, vocab: int = 10, dim: int = 4, classes: int = 2, padding_idx: int | None = None, layers: int = 1
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.attns = nn.ModuleList(nn.MultiheadAttention(dim, 2, batch_first=True) for _ in range(layers))
        self.shift = TrainingShift()
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if not x.is_floating_point():
            x = self.embed(x)
        padding = None if mask is None else mask == 0
        for attn in self.attns:
            x = x + attn(x, x, x, key_padding_mask=padding, need_weights=False)[0]
        return self.head(self.shift(x[:, 0]))


def net(**kwargs) -> Net:
    torch.manual_seed(0)
    return Net(**kwargs).eval()


IDS = torch.tensor([[3, 5, 7], [4, 6, 8]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def embeddings(batch: int = 2, length: int = 3, dim: int = 4, dtype=torch.float32) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, length, dim, dtype=dtype)


def tiny_vit(layers: int = 2):
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(
        image_size=8, patch_size=4, num_layers=layers, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=2
    ).eval()


# -------------------------------------------------------------------------------------------- __init__


def test_init_refuses_an_adapter_as_the_model():
    with pytest.raises(
        TypeError, match=exact("model is already an adapter; pass it to the attribution method directly")
    ):
        TransformerAdapter(TransformerAdapter(net()))


def test_init_refuses_a_model_that_is_not_a_module():
    with pytest.raises(TypeError, match=exact("TransformerAdapter needs a torch model (nn.Module), got object")):
        TransformerAdapter(object())


@pytest.mark.parametrize("prefix_tokens", [-1, True, 1.5])
def test_init_refuses_prefix_tokens_other_than_a_non_negative_int(prefix_tokens):
    with pytest.raises(ValueError, match=exact(f"prefix_tokens must be a non-negative int, got {prefix_tokens!r}")):
        TransformerAdapter(net(), prefix_tokens=prefix_tokens)


def test_init_refuses_an_embedding_that_is_not_a_module():
    with pytest.raises(TypeError, match=exact("embedding must be the model's token embedding module, got str")):
        TransformerAdapter(net(), embedding="embed")


def test_num_outputs_given_or_read_from_the_last_linear():
    assert TransformerAdapter(net(classes=3)).num_outputs == 3
    assert TransformerAdapter(net(classes=3), num_outputs=5).num_outputs == 5


def test_given_attention_modules_are_the_ones_captured():
    model = net(layers=2)
    adapter = TransformerAdapter(model, attention=[model.attns[1]])
    forward = adapter.attention_forward((embeddings(),), ())
    assert len(forward.attention["input"]) == 1
    assert len(TransformerAdapter(model).attention_forward((embeddings(),), ()).attention["input"]) == 2


def test_calls_use_the_modules_read_when_the_adapter_was_made(monkeypatch):
    # walking the module tree costs time on every call: the adapter reads it once, when it is made
    model = net()
    adapter = TransformerAdapter(model, embedding=model.embed)
    walks = []
    modules = model.modules
    monkeypatch.setattr(model, "modules", lambda *a, **k: walks.append(1) or modules(*a, **k))
    tokens, args = adapter.captum_inputs(IDS, level="token")
    adapter(*tokens, *args)
    adapter.attention_forward(tokens, args)
    assert adapter.num_outputs == 2
    assert walks == []


# ------------------------------------------------------------------------------- forward, split_inputs


def test_forward_switches_its_own_model_to_evaluation_mode_while_another_hold_is_open():
    model = net().train()
    adapter = TransformerAdapter(model)
    x = embeddings()
    with torch.no_grad():
        model.eval()
        expected = model(x)
        model.train()
        with evaluation_mode(None, ()):  # another caller's hold (not of this model) must not stop this one
            logits = adapter(x)
    torch.testing.assert_close(logits, expected)
    assert model.shift.training  # restored


def test_split_inputs():
    x, a = embeddings(), torch.ones(2, 3)
    inputs, args = TransformerAdapter(net()).split_inputs((x, a))
    assert len(inputs) == 1 and inputs[0] is x
    assert len(args) == 1 and args[0] is a


@pytest.mark.parametrize("call", [(), ("ids",)])
def test_split_inputs_needs_a_tensor_first(call):
    message = (
        "expected the input tensor first, then the additional forward args; make both with adapter.captum_inputs(batch)"
    )
    with pytest.raises(ValueError, match=exact(message)):
        TransformerAdapter(net()).split_inputs(call)


# --------------------------------------------------------------------------------------------- _logits


def test_logits_pass_the_model_arguments_at_both_levels():
    model = net()
    adapter = TransformerAdapter(model, embedding=model.embed, mask_arg=0)
    with torch.no_grad():
        expected = model(IDS, MASK)
        assert not torch.allclose(expected, model(IDS))  # the mask matters
        tokens, args = adapter.captum_inputs((IDS, MASK), level="token")
        torch.testing.assert_close(adapter(*tokens, *args), expected)
        embedded, args = adapter.captum_inputs((IDS, MASK), level="embedding")
        torch.testing.assert_close(adapter(*embedded, *args), expected)


@pytest.mark.parametrize(
    "args, got",
    [((), "nothing"), ((torch.ones(2, 3, 4),), "a float tensor"), (([[1, 2, 3]],), "list"), ((None,), "NoneType")],
)
def test_logits_need_the_token_ids_last(args, got):
    model = net()
    message = (f"the last additional forward arg must be the token ids (an integer tensor), got {got}; make the args "
               "with adapter.captum_inputs(batch)")
    with pytest.raises(ValueError, match=exact(message)):
        TransformerAdapter(model, embedding=model.embed)(embeddings(), *args)


def test_logits_refuse_embeddings_of_other_ids():
    model = net()
    message = "embeddings (2, 3, 4) do not match the token ids (2, 2) they stand for"
    with pytest.raises(ValueError, match=exact(message)):
        TransformerAdapter(model, embedding=model.embed)(embeddings(), IDS[:, :2])


def test_embedding_level_logits_keep_the_parameters_in_the_graph():
    model = net()
    adapter = TransformerAdapter(model, embedding=model.embed)
    embedded, args = adapter.captum_inputs(IDS)
    adapter(*embedded, *args).sum().backward()
    assert model.head.weight.grad is not None
    assert model.attns[0].in_proj_weight.grad is not None


# --------------------------------------------------------------------------------------- captum_inputs


def test_captum_inputs_refuses_an_unknown_level():
    with pytest.raises(ValueError, match=exact("level must be 'embedding' or 'token', got 'ids'")):
        TransformerAdapter(net()).captum_inputs(IDS, level="ids")


def test_captum_inputs_refuses_floats_for_a_model_given_its_embedding():
    model = net()
    message = (
        "this adapter was given embedding= (a model that takes token ids), but the batch holds (2, 3, 4) floats; "
        "pass the token ids"
    )
    with pytest.raises(ValueError, match=exact(message)):
        TransformerAdapter(model, embedding=model.embed).captum_inputs(embeddings())


def test_captum_inputs_refuses_embedding_samples_without_a_real_token():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    message = (
        "sample(s) [1] of the batch have no real token (all padding): the model's output for them reads padding only, "
        "and there is nothing to attribute; drop them from the batch"
    )
    with pytest.raises(ValueError, match=exact(message)):
        TransformerAdapter(net(), mask_arg=0).captum_inputs((embeddings(), mask))


def test_captum_inputs_embedding_level_needs_the_embedding():
    message = (
        "level='embedding' needs the model's token embedding module: TransformerAdapter(model, "
        "embedding=model.<embedding>); or use level='token'"
    )
    with pytest.raises(ValueError, match=exact(message)):
        TransformerAdapter(net()).captum_inputs(IDS)


def test_captum_inputs_keeps_arguments_that_are_not_tensors():
    inputs, args = TransformerAdapter(net()).captum_inputs((IDS, None, "flag"), level="token")
    assert inputs[0] is not None and args == (None, "flag")


def test_captum_inputs_of_images_without_channels_are_not_checked_for_tokens():
    # the token checks read dimension 1 of ids and embeddings, never the channels of images
    images = torch.zeros(1, 0, 4, 4)
    (out,), args = TransformerAdapter(net(), patch_size=2).captum_inputs(images)
    assert out.shape == (1, 0, 4, 4) and args == ()


# --------------------------------------------------------------------------------------- captum_target


def test_captum_target_labels():
    adapter = TransformerAdapter(net(classes=2))
    target = adapter.captum_target({"input": IDS, "labels": [1, 0]}, mode="label")
    assert target.dtype == torch.long and target.tolist() == [1, 0]
    assert adapter.captum_target({"input": IDS, "labels": torch.tensor([[1], [0]])}, mode="label").tolist() == [1, 0]
    assert TransformerAdapter(net(classes=1)).captum_target({"input": IDS, "labels": [1, 0]}, mode="label") is None


@pytest.mark.parametrize("labels", [[[0, 1], [1, 0]], [[0, 1, 1], [1, 0, 0]]])
def test_captum_target_refuses_multi_label_labels(labels):
    message = "the labels hold several classes per sample (multi-label); pass target=<class index>"
    with pytest.raises(ValueError, match=exact(message)):
        TransformerAdapter(net(classes=3)).captum_target({"input": IDS, "labels": labels}, mode="label")


@pytest.mark.parametrize("batch", [IDS, (IDS,), {"input": IDS}])
def test_captum_target_label_mode_needs_labels(batch):
    message = "target mode 'label' needs a dict batch with 'labels'; use mode='predicted' or pass target="
    with pytest.raises(ValueError, match=exact(message)):
        TransformerAdapter(net()).captum_target(batch, mode="label")


def test_captum_target_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match=exact("target mode must be 'predicted' or 'label', got 'labels'")):
        TransformerAdapter(net()).captum_target(IDS, mode="labels")


def test_captum_target_predicted_by_a_model_without_embedding():
    model = net(classes=2)
    with torch.no_grad():
        expected = model(IDS).argmax(dim=1)
    assert TransformerAdapter(model).captum_target(IDS).tolist() == expected.tolist()
    assert TransformerAdapter(net(classes=1)).captum_target(IDS) is None


def test_captum_target_labels_go_to_the_model_device():
    model = net().to("meta")
    target = TransformerAdapter(model).captum_target({"input": IDS, "labels": [1, 0]}, mode="label")
    assert target.device.type == "meta"


class Parameterless(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().sum(dim=-1, keepdim=True).repeat(1, 2)


def test_captum_target_of_a_model_without_parameters_stays_on_the_cpu():
    target = TransformerAdapter(Parameterless(), num_outputs=2).captum_target(
        {"input": IDS, "labels": [1, 0]}, mode="label"
    )
    assert target.device == torch.device("cpu") and target.tolist() == [1, 0]


# ------------------------------------------------------------------------ to_feature_dict, _patch_size


def test_to_feature_dict_refuses_several_tensors():
    message = "expected one attribution tensor (feature 'input'), got 2 items"
    with pytest.raises(ValueError, match=exact(message)):
        TransformerAdapter(net()).to_feature_dict((torch.ones(1, 3), torch.ones(1, 3)))


def test_to_feature_dict_refuses_other_shapes():
    message = "attributions have shape (1, 1, 1, 1, 1); expected [B, L], [B, L, D] or [B, C, H, W]"
    with pytest.raises(ValueError, match=exact(message)):
        TransformerAdapter(net()).to_feature_dict(torch.ones(1, 1, 1, 1, 1))


def test_to_feature_dict_names_its_features_on_a_wrong_key():
    scores = TransformerAdapter(net()).to_feature_dict(torch.ones(1, 3))
    with pytest.raises(KeyError) as info:
        scores["x"]
    assert info.value.args == ("no feature 'x' here; use one of ['input']",)


def test_to_feature_dict_sums_rectangular_patches():
    scores = TransformerAdapter(net(), patch_size=(2, 4)).to_feature_dict(torch.ones(1, 3, 4, 8))
    assert scores["input"].tolist() == [[24.0, 24.0, 24.0, 24.0]]  # 2 x 4 pixels x 3 channels per patch


def test_images_need_the_patch_size():
    message = "images need the model's patch size: TransformerAdapter(model, patch_size=16)"
    with pytest.raises(ValueError, match=exact(message)):
        TransformerAdapter(net()).to_feature_dict(torch.ones(1, 3, 4, 4))


# ---------------------------------------------------------------------------- token_masks, _token_mask


def test_token_masks_from_the_mask_argument_without_inputs():
    (mask,) = TransformerAdapter(net(), mask_arg=0).token_masks((MASK,))
    assert mask.tolist() == (MASK != 0).tolist()


def test_token_masks_of_rectangular_images():
    images = torch.zeros(1, 3, 4, 8)
    (mask,) = TransformerAdapter(net(), patch_size=2).token_masks((), (images,))
    assert mask.dtype == torch.bool and mask.shape == (1, 8) and bool(mask.all())


def test_token_masks_name_a_mask_argument_that_is_not_a_tensor():
    message = ("mask_arg=0 names additional forward arg 0, which is a str, not the attention mask tensor; pass the "
               "index of the mask")
    with pytest.raises(ValueError, match=exact(message)):
        TransformerAdapter(net(), mask_arg=0).token_masks(("mask", MASK), (IDS,))


@pytest.mark.parametrize("mask_arg, args", [(1, (MASK,)), (2, (MASK, MASK)), (0, ())])
def test_token_masks_refuse_a_mask_argument_that_is_not_there(mask_arg, args):
    message = f"mask_arg={mask_arg}, but the additional forward args hold {len(args)} items"
    with pytest.raises(ValueError, match=exact(message)):
        TransformerAdapter(net(), mask_arg=mask_arg).token_masks(args, (IDS,))


def test_token_masks_of_embeddings_with_a_pad_id_are_all_real():
    (mask,) = TransformerAdapter(net(), pad_id=0).token_masks((), (embeddings(),))
    assert mask.dtype == torch.bool and mask.tolist() == [[True] * 3] * 2


def test_token_masks_of_ids_with_a_pad_id():
    ids = torch.tensor([[3, 0, 0], [4, 6, 0]])
    (mask,) = TransformerAdapter(net(), pad_id=0).token_masks((), (ids,))
    assert mask.tolist() == [[True, False, False], [True, True, False]]


@pytest.mark.parametrize("args", [(), (IDS,)])
def test_token_masks_need_the_inputs_where_no_argument_carries_the_ids(args):
    message = "this adapter's masks need the inputs: token_masks(additional_forward_args, inputs)"
    with pytest.raises(ValueError, match=exact(message)):
        TransformerAdapter(net(), pad_id=0).token_masks(args)


def test_token_masks_from_the_carried_ids():
    model = net()
    ids = torch.tensor([[3, 0, 0], [4, 6, 0]])
    (mask,) = TransformerAdapter(model, embedding=model.embed, pad_id=0).token_masks((ids,))
    assert mask.tolist() == [[True, False, False], [True, True, False]]
    (mask,) = TransformerAdapter(model, embedding=model.embed).token_masks((ids,))
    assert mask.dtype == torch.bool and mask.tolist() == [[True] * 3] * 2


def test_token_masks_without_padding_are_all_real_and_shaped_like_the_input():
    ids = torch.tensor([[3, 4, 5], [6, 7, 8]])
    (mask,) = TransformerAdapter(net()).token_masks((), (ids,))
    assert mask.dtype == torch.bool and mask.shape == (2, 3) and bool(mask.all())
    (mask,) = TransformerAdapter(net()).token_masks((), ids)  # a bare tensor for the inputs
    assert mask.shape == (2, 3)


def test_token_masks_are_made_on_the_input_device_whatever_the_default_device():
    adapter, images = TransformerAdapter(net(), patch_size=2), torch.zeros(1, 3, 4, 4)
    with torch.device("meta"):
        (image_mask,) = adapter.token_masks((), (images,))
        (id_mask,) = adapter.token_masks((), (IDS,))
    assert image_mask.device.type == "cpu" and id_mask.device.type == "cpu"
    assert image_mask.dtype == torch.bool and id_mask.dtype == torch.bool


# ------------------------------------------------------------------------------------------- baselines


def test_baselines_of_embeddings_zero_the_real_tokens_only():
    x = embeddings()
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    (baseline,) = TransformerAdapter(net(), mask_arg=0).baselines((x,), (mask,))
    expected = x.clone()
    expected[0, :2] = 0
    expected[1, :1] = 0
    torch.testing.assert_close(baseline, expected)
    (baseline,) = TransformerAdapter(net()).baselines((x,), ())
    assert baseline.tolist() == torch.zeros(2, 3, 4).tolist()


def test_baselines_blur_only_images():
    message = "TransformerAdapter baselines are 'zero' (or 'blur' for images), got 'blur'"
    with pytest.raises(ValueError, match=exact(message)):
        TransformerAdapter(net()).baselines((embeddings(),), (), reference="blur")


def test_token_baselines_need_the_pad_id():
    message = "token-level baselines need the padding id: TransformerAdapter(..., pad_id=)"
    with pytest.raises(ValueError, match=exact(message)):
        TransformerAdapter(net()).baselines((IDS,), ())


def test_image_blur_baseline_has_sigma_a_quarter_of_the_patch():
    torch.manual_seed(2)
    images = torch.rand(1, 2, 16, 16, dtype=torch.float64)
    (baseline,) = TransformerAdapter(net(), patch_size=8).baselines((images,), (), reference="blur")
    torch.testing.assert_close(baseline, reference_blur(images, 2.0))


# ----------------------------------------------------------------------------- remove_tokens, _aligned


def test_remove_tokens_of_ids_needs_to_know_the_padding():
    message = "removing tokens needs to know what padding is: pass pad_id= or mask_arg= to TransformerAdapter"
    with pytest.raises(ValueError, match=exact(message)):
        TransformerAdapter(net()).remove_tokens((IDS,), (), {"input": torch.ones(2, 3, dtype=torch.bool)})


def test_remove_tokens_of_embeddings_without_padding():
    x = embeddings(batch=1)
    (out,), args = TransformerAdapter(net()).remove_tokens((x,), (), {"input": torch.tensor([[True, False, True]])})
    expected = torch.stack([x[0, 0], x[0, 2], torch.zeros(4)])[None]
    torch.testing.assert_close(out, expected)
    assert args == ()


def test_remove_tokens_of_ids_with_a_pad_id():
    (out,), _ = TransformerAdapter(net(), pad_id=0).remove_tokens(
        (torch.tensor([[3, 4, 5]]),), (), {"input": torch.tensor([[False, True, True]])}
    )
    assert out.tolist() == [[4, 5, 0]]


def test_remove_tokens_moves_the_aligned_arguments_only():
    features = torch.arange(6.0).view(1, 3, 2)
    count = torch.tensor([7])
    (out,), args = TransformerAdapter(net(), pad_id=0, mask_arg=0).remove_tokens(
        (torch.tensor([[3, 4, 5]]),),
        (torch.tensor([[1, 1, 1]]), "flag", count, features),
        {"input": torch.tensor([[True, False, True]])},
    )
    assert out.tolist() == [[3, 5, 0]]
    mask, flag, kept_count, kept_features = args
    assert mask.dtype == torch.long and mask.tolist() == [[1, 1, 0]]
    assert flag == "flag" and kept_count is count
    assert kept_features.tolist() == [[[0.0, 1.0], [4.0, 5.0], [2.0, 3.0]]]


def test_remove_tokens_keeps_the_order_of_a_long_sequence():
    torch.manual_seed(3)
    length = 3000
    keep = torch.rand(1, length) < 0.5
    ids = torch.arange(1, length + 1)[None]
    (out,), _ = TransformerAdapter(nn.Linear(1, 1), pad_id=0, attention=[]).remove_tokens((ids,), (), {"input": keep})
    kept = ids[keep].tolist()
    assert out[0].tolist() == kept + [0] * (length - len(kept))


# ---------------------------------------------------------------------------------------------- decode


def test_decode_embeddings_and_rectangular_images():
    assert [t.text for t in TransformerAdapter(net()).decode(embeddings(batch=1))[0]] == ["t0", "t1", "t2"]
    texts = [t.text for t in TransformerAdapter(net(), patch_size=2).decode(torch.zeros(1, 3, 4, 8))[0]]
    assert texts == [
        "patch 0,0",
        "patch 0,1",
        "patch 0,2",
        "patch 0,3",
        "patch 1,0",
        "patch 1,1",
        "patch 1,2",
        "patch 1,3",
    ]


def test_decode_reads_the_mask_where_token_masks_reads_it():
    # for a model given embedding=, the ids travel after the model's arguments: mask_arg=0 with no model
    # argument names the ids themselves, for decode as for token_masks
    model = net()
    ids = torch.tensor([[3, 0, 5]])
    adapter = TransformerAdapter(model, embedding=model.embed, mask_arg=0)
    assert [t.text for t in adapter.decode(ids)[0]] == ["#3", "#5"]
    assert adapter.token_masks((ids,))[0].tolist() == [[True, False, True]]
    with pytest.raises(ValueError, match=exact("mask_arg=0, but the additional forward args hold 0 items")):
        TransformerAdapter(model, mask_arg=0).decode(ids)


# ---------------------------------------------------------------- require_attention, attention_forward


def test_require_attention_names_the_model():
    message = (
        "Sequential has no attention module this package can capture (torch.nn.MultiheadAttention, PyHealth's or "
        "HuggingFace attention); pass attention=[...] if it has one, or use a gradient method such as "
        "IntegratedGradients(adapter)"
    )
    with pytest.raises(ValueError, match=exact(message)):
        TransformerAdapter(nn.Sequential(nn.Linear(2, 2))).require_attention()


def test_attention_forward_of_embeddings_tracks_the_input_and_detaches_the_parameters():
    model = net()
    x = embeddings()
    forward = TransformerAdapter(model).attention_forward((x,), ())
    leaf = forward.embeddings["input"]
    assert leaf.requires_grad and leaf.is_leaf
    torch.testing.assert_close(leaf, x)
    forward.logits.sum().backward()
    assert leaf.grad is not None
    assert model.head.weight.grad is None and model.attns[0].in_proj_weight.grad is None


def test_attention_forward_of_ids_tracks_the_embedding_output():
    model = net()
    forward = TransformerAdapter(model, embedding=model.embed).attention_forward((IDS,), (IDS,))
    leaf = forward.embeddings["input"]
    assert leaf.is_leaf and leaf.requires_grad
    torch.testing.assert_close(leaf, model.embed(IDS).detach())


def test_attention_forward_of_ids_without_an_embedding_keeps_the_parameters_in_the_graph():
    forward = TransformerAdapter(net()).attention_forward((IDS,), ())
    assert forward.embeddings == {}
    assert forward.logits.requires_grad


def test_attention_forward_pool_index():
    # pool=-1 counts from the end of the attention sequence (3 positions; the maps have 2 heads)
    forward = TransformerAdapter(net(), pool=-1).attention_forward((IDS,), ())
    assert forward.pool_index["input"].tolist() == [2, 2]
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    forward = TransformerAdapter(net(), pool="last", mask_arg=0).attention_forward((embeddings(),), (mask,))
    assert forward.pool_index["input"].tolist() == [2, 1]


def test_attention_forward_refuses_modules_the_model_does_not_call():
    message = (
        "none of the 1 attention modules ran in the forward pass of Net; pass the modules the model calls as "
        "attention=[...]"
    )
    with pytest.raises(RuntimeError, match=exact(message)):
        TransformerAdapter(net(), attention=[nn.MultiheadAttention(4, 2)]).attention_forward((embeddings(),), ())


class KeywordEmbeddingNet(Net):
    """Calls its embedding with a keyword argument, twice: the first call's output is what the model reads."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self.first = self.embed(input=x)
        second = self.embed(input=x.flip(1))
        return super().forward(self.first + 0 * second, mask)


def test_attention_forward_tracks_the_first_embedding_call():
    torch.manual_seed(0)
    model = KeywordEmbeddingNet().eval()
    forward = TransformerAdapter(model, embedding=model.embed).attention_forward((IDS,), (IDS,))
    assert forward.embeddings["input"] is model.first


# --------------------------------------------------------------------------------- relevance_to_inputs


@pytest.mark.parametrize(
    "positions, prefix, message",
    [
        (
            5,
            0,
            "the attention covers 5 positions but the input has 3 tokens; pass prefix_tokens=2 (the positions the "
            "model "
            "puts before them, e.g. a class token)",
        ),
        (
            2,
            0,
            "the attention covers 2 positions but the input has 3 tokens; the model drops or merges positions, so its "
            "attention cannot be mapped to these inputs",
        ),
        (
            3,
            1,
            "the attention covers 3 positions but the input has 3 tokens; the model drops or merges positions, so its "
            "attention cannot be mapped to these inputs (prefix_tokens is 1)",
        ),
        (
            5,
            1,
            "the attention covers 5 positions but the input has 3 tokens; pass prefix_tokens=2 (the positions the "
            "model "
            "puts before them, e.g. a class token) (prefix_tokens is 1)",
        ),
    ],
)
def test_relevance_to_inputs_refuses_another_length(positions, prefix, message):
    with pytest.raises(ValueError, match=exact(message)):
        TransformerAdapter(net(), prefix_tokens=prefix).relevance_to_inputs(
            {"input": torch.ones(2, positions)}, (IDS,), ()
        )


def test_relevance_to_inputs_refuses_another_patch_count():
    message = (
        "the attention covers 6 positions but the input has 4 patches; pass prefix_tokens=2 (the positions the "
        "model puts before them, e.g. a class token)"
    )
    with pytest.raises(ValueError, match=exact(message)):
        TransformerAdapter(net(), patch_size=2).relevance_to_inputs(
            {"input": torch.ones(1, 6)}, (torch.zeros(1, 1, 4, 4),), ()
        )


def test_relevance_to_inputs_in_the_input_dtype():
    adapter = TransformerAdapter(net(), patch_size=2, prefix_tokens=1)
    (pixels,) = adapter.relevance_to_inputs(
        {"input": torch.tensor([[9.0, 4.0, 8.0, 0.0, 4.0]])}, (torch.zeros(1, 1, 4, 4, dtype=torch.float64),), ()
    )
    assert pixels.dtype == torch.float64
    assert pixels[0, 0].tolist() == [
        [1.0, 1.0, 2.0, 2.0],
        [1.0, 1.0, 2.0, 2.0],
        [0.0, 0.0, 1.0, 1.0],
        [0.0, 0.0, 1.0, 1.0],
    ]
    (spread,) = TransformerAdapter(net(), prefix_tokens=1).relevance_to_inputs(
        {"input": torch.tensor([[9.0, 3.0, 6.0, 9.0]])}, (embeddings(1, 3, 3, torch.float64),), ()
    )
    assert spread.dtype == torch.float64
    assert spread[0].tolist() == [[1.0] * 3, [2.0] * 3, [3.0] * 3]


def test_relevance_to_inputs_of_ids_zero_on_padding():
    ids = torch.tensor([[1, 2, 0]])
    (row,) = TransformerAdapter(net(), pad_id=0).relevance_to_inputs(
        {"input": torch.tensor([[1.0, 2.0, 3.0]])}, (ids,), ()
    )
    assert row.tolist() == [[1.0, 2.0, 0.0]]
    (row,) = TransformerAdapter(net()).relevance_to_inputs({"input": torch.tensor([[1.0, 2.0, 3.0]])}, (ids,), ())
    assert row.tolist() == [[1.0, 2.0, 3.0]]


# ---------------------------------------------------------- _pooled_row_overrides, _is_torchvision_vit


def test_pooled_row_override_only_for_the_captured_last_block():
    model = tiny_vit()
    assert len(TransformerAdapter(model, pool="first", prefix_tokens=1)._pooled_row_overrides(True)) == 1
    first_only = TransformerAdapter(
        model, pool="first", prefix_tokens=1, attention=[model.encoder.layers[0].self_attention]
    )
    assert first_only._pooled_row_overrides(True) == {}


class EncoderBlock(nn.Module):
    """Named like torchvision's block, without its ``self_attention``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_pooled_row_override_not_for_a_block_without_self_attention():
    model = tiny_vit()
    adapter = TransformerAdapter(model, pool="first", prefix_tokens=1)
    model.encoder.layers[-1] = EncoderBlock()
    assert adapter._pooled_row_overrides(True) == {}


class VisionTransformer(nn.Module):
    """Not torchvision's."""


def test_is_torchvision_vit():
    assert _is_torchvision_vit(tiny_vit())
    assert not _is_torchvision_vit(VisionTransformer())


# --------------------------------------------------------------------- _check_inputs, _per_sample_args


def test_check_inputs_refuses_a_non_tensor():
    message = "the input must be a tensor (ids, embeddings or images), got str"
    with pytest.raises(TypeError, match=exact(message)):
        TransformerAdapter(net()).attention_forward(("ids",), ())


@pytest.mark.parametrize("shape, what", [((0, 3), "samples"), ((2, 0), "tokens")])
def test_check_inputs_refuses_an_empty_input(shape, what):
    message = f"the input 'input' has shape {shape}: no {what}; pass at least one sample with at least one token"
    with pytest.raises(ValueError, match=exact(message)):
        TransformerAdapter(net())(torch.zeros(shape, dtype=torch.long))


def test_check_inputs_batch_sizes_of_the_per_sample_arguments():
    adapter = TransformerAdapter(net(), mask_arg=0)
    adapter._check_inputs(IDS, (torch.tensor(1),))  # a scalar has no batch dimension
    message = (
        "inputs and additional_forward_args have different batch sizes (input 'input' 2, the mask (additional forward "
        "arg 0) 3); make them with one adapter.captum_inputs(batch) call and slice all of them together"
    )
    with pytest.raises(ValueError, match=exact(message)):
        adapter._check_inputs(IDS, (torch.ones(3),))
    TransformerAdapter(net())._check_inputs(IDS, (torch.tensor([1, 2, 3]),))  # not a per-sample argument


def test_check_inputs_batch_size_of_the_carried_ids():
    model = net()
    message = (
        "inputs and additional_forward_args have different batch sizes (input 'input' 2, the token ids (last "
        "additional forward arg) 3); make them with one adapter.captum_inputs(batch) call and slice all of them "
        "together"
    )
    with pytest.raises(ValueError, match=exact(message)):
        TransformerAdapter(model, embedding=model.embed)(embeddings(), torch.ones(3, 3, dtype=torch.long))


def test_check_inputs_refuses_non_finite_values():
    x = embeddings()
    x[0, 1, 2] = float("nan")
    message = (
        "the input 'input' holds 1 NaN or infinite value(s); attributions of it would be NaN. Check what made the "
        "inputs (a baseline or noise with NaN/inf), and pass the inputs from adapter.captum_inputs(batch)"
    )
    with pytest.raises(ValueError, match=exact(message)):
        TransformerAdapter(net()).captum_inputs(x)


@pytest.mark.parametrize("ids, shown", [([[3, 10]], 10), ([[-1, 3]], -1)])
def test_check_inputs_refuses_ids_outside_the_vocabulary(ids, shown):
    model = net()
    message = (
        f"the input 'input' holds token id {shown}, outside the model's vocabulary of 10 tokens (ids 0..9); tokenize "
        "with the model's own tokenizer"
    )
    with pytest.raises(ValueError, match=exact(message)):
        TransformerAdapter(model, embedding=model.embed).captum_inputs(torch.tensor(ids), level="token")


def test_check_inputs_lists_ten_empty_samples():
    ids = torch.zeros(12, 3, dtype=torch.long)
    ids[11, 0] = 4
    message = (
        "sample(s) [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] of the batch have no real token (all padding): the model's output "
        "for them reads padding only, and there is nothing to attribute; drop them from the batch"
    )
    with pytest.raises(ValueError, match=exact(message)):
        TransformerAdapter(net(), pad_id=0).captum_inputs(ids, level="token")


# ---------------------------------------------------------------------------- _warn_if_padding_unknown


def assert_names_the_callers_line(warning):
    """The warning names a line outside the package: this test's (under mutation testing, mutmut's trampoline
    stands between the test and the package, and is the first frame outside it)."""
    assert not warning.filename.startswith(os.path.dirname(captum_chefer.__file__) + os.sep), warning.filename
    if "mutmut" not in sys.modules:
        assert warning.filename == __file__


def test_warns_once_of_ids_equal_to_the_padding_idx():
    model = net(padding_idx=0)
    adapter = TransformerAdapter(model, embedding=model.embed)
    message = (
        "the token ids hold 0, the padding_idx of the model's embedding, but TransformerAdapter was told of no "
        "padding, so every token counts as real (scores and removal on padding, pool='last' at a padded position); "
        "pass pad_id=0 "
        "if it marks padding"
    )
    ids = torch.tensor([[3, 4, 0]])
    with pytest.warns(UserWarning, match=exact(message)) as record:
        adapter.captum_inputs(ids, level="token")
    assert_names_the_callers_line(record[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapter.captum_inputs(ids, level="token")


def test_no_warning_without_padding_ids():
    model = net(padding_idx=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TransformerAdapter(model, embedding=model.embed).captum_inputs(IDS, level="token")


def test_warns_once_of_an_argument_shaped_like_a_mask():
    adapter = TransformerAdapter(net())
    batch = (IDS, "flag", torch.ones(2), MASK)
    message = (
        "model argument 2 is shaped like the tokens (2, 3) and holds 0/1 values, as a padding mask does, but "
        "TransformerAdapter was told of no padding, so every token counts as real (scores and removal on padding, "
        "pool='last' at a padded position). If it is a mask that is non-zero on real tokens, pass mask_arg=2; if "
        "padding is a token id, pass pad_id="
    )
    with pytest.warns(UserWarning, match=exact(message)) as record:
        adapter.captum_inputs(batch, level="token")
    assert_names_the_callers_line(record[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapter.captum_inputs(batch, level="token")


@pytest.mark.parametrize(
    "argument",
    [
        torch.tensor([[0, 2, 3], [1, 0, 2]]),
        torch.zeros(2, 3, dtype=torch.long),
        torch.ones(2, 3, dtype=torch.long),
        torch.tensor([1, 0]),
    ],
)
def test_no_warning_for_arguments_that_are_no_mask(argument):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TransformerAdapter(net()).captum_inputs((IDS, argument), level="token")


# ------------------------------------------------------------ _per_sample_args (through captum_inputs)


def test_mask_arg_beyond_the_arguments_is_refused_by_name():
    with pytest.raises(ValueError, match=exact("mask_arg=1, but the additional forward args hold 1 items")):
        TransformerAdapter(net(), mask_arg=1).captum_inputs((IDS, MASK), level="token")


# ----------------------------------------------------------------------------------------- _read_batch


def test_read_batch_dict_with_args_and_labels():
    adapter = TransformerAdapter(net())
    batch = {"input": IDS, "args": (MASK,), "labels": [0, 1]}
    (x,), args = adapter.captum_inputs(batch, level="token")
    assert x.tolist() == IDS.tolist() and len(args) == 1 and args[0].tolist() == MASK.tolist()
    assert adapter.captum_target(batch, mode="label").tolist() == [0, 1]


def test_read_batch_dict_needs_the_input():
    with pytest.raises(KeyError) as info:
        TransformerAdapter(net()).captum_inputs({"ids": IDS})
    assert info.value.args == ("a dict batch needs the model input under 'input'; it has ['ids']",)


def test_read_batch_dict_refuses_unknown_keys():
    with pytest.raises(KeyError) as info:
        TransformerAdapter(net()).captum_inputs({"input": IDS, "mask": MASK, "args": ()})
    message = (
        "the batch has keys ['mask'] that TransformerAdapter does not read, so the model would run without them; a "
        "dict batch holds 'input', 'args' (the model's other arguments, in order) and 'labels' only"
    )
    assert info.value.args == (message,)


def test_read_batch_refuses_an_empty_tuple_and_a_non_tensor():
    with pytest.raises(ValueError, match=exact("the batch is empty")):
        TransformerAdapter(net()).captum_inputs(())
    with pytest.raises(
        TypeError, match=exact("the model input must be a tensor (ids, embeddings or images), got list")
    ):
        TransformerAdapter(net()).captum_inputs(([1, 2],))


# ----------------------------------------------------------------------------------------------- _kind


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.tensor([3, 4, 5]), "token ids must be an integer tensor [B, L], got torch.int64 (3,)"),
        (torch.tensor([[True, False]]), "token ids must be an integer tensor [B, L], got torch.bool (1, 2)"),
        (
            torch.zeros(1, 1, 1, 1, 1),
            "inputs must be ids [B, L], embeddings [B, L, D] or images [B, C, H, W]; got (1, 1, 1, 1, 1)",
        ),
    ],
)
def test_kind_refuses_other_inputs(x, message):
    with pytest.raises(ValueError, match=exact(message)):
        TransformerAdapter(net()).captum_inputs(x)


# ----------------------------------------------------------------------------------------- _pool_index


def test_callable_pool_gets_the_arguments():
    adapter = TransformerAdapter(net(), pool=lambda inputs, args: args[0].sum(dim=1) - 1)
    assert adapter._pool_index((IDS,), (MASK,), 3).tolist() == [2, 1]


@pytest.mark.parametrize("positions", [[0, 0, 0], [0, 3], [-1, 0]])
def test_callable_pool_positions_are_checked(positions):
    adapter = TransformerAdapter(net(), pool=lambda inputs, args: torch.tensor(positions))
    message = f"pool(...) must give 2 positions in 0..2, got {positions}"
    with pytest.raises(ValueError, match=exact(message)):
        adapter._pool_index((IDS,), (), 3)


def test_pool_first_and_images_last():
    images = torch.zeros(2, 3, 4, 4)
    first = TransformerAdapter(net())._pool_index((IDS,), (), 3)
    assert first.dtype == torch.long and first.tolist() == [0, 0]
    last = TransformerAdapter(net(), pool="last", patch_size=2)._pool_index((images,), (), 5)
    assert last.dtype == torch.long and last.tolist() == [4, 4]


def test_pool_last_real_token_after_the_prefix():
    ids = torch.tensor([[3, 4, 0], [5, 0, 0]])
    adapter = TransformerAdapter(net(), pool="last", pad_id=0, prefix_tokens=1)
    assert adapter._pool_index((ids,), (), 4).tolist() == [2, 1]


@pytest.mark.parametrize("pool, expected", [(-4, 0), (-1, 3), (3, 3)])
def test_pool_int(pool, expected):
    index = TransformerAdapter(net(), pool=pool)._pool_index((IDS,), (), 4)
    assert index.dtype == torch.long and index.tolist() == [expected, expected]


@pytest.mark.parametrize("pool", [4, -5])
def test_pool_int_outside_the_sequence(pool):
    with pytest.raises(ValueError, match=exact(f"pool={pool} is outside the attention sequence of 4 positions")):
        TransformerAdapter(net(), pool=pool)._pool_index((IDS,), (), 4)


@pytest.mark.parametrize("pool", ["first", "last", 1])
def test_pool_index_on_the_input_device_whatever_the_default_device(pool):
    images = torch.zeros(2, 3, 4, 4)
    adapter = TransformerAdapter(net(), pool=pool, pad_id=0, patch_size=2)
    with torch.device("meta"):
        by_token = adapter._pool_index((IDS,), (), 3)
        by_patch = adapter._pool_index((images,), (), 5)
    assert by_token.device.type == "cpu" and by_patch.device.type == "cpu"


# ------------------------------------------------------------------------------------------- logits_of


class WithLogits:
    def __init__(self, logits: torch.Tensor):
        self.logits = logits


def test_logits_of_each_output_form():
    logits = torch.ones(2, 3)
    assert logits_of(logits) is logits
    assert logits_of(WithLogits(logits)) is logits
    assert logits_of((logits, torch.zeros(5))) is logits
    assert logits_of([logits]) is logits
    assert logits_of({"logit": logits, "loss": torch.zeros(())}) is logits


@pytest.mark.parametrize(
    "output, name", [((), "tuple"), ({"y": torch.ones(2, 3)}, "dict"), ("logits", "str"), ((1, 2), "tuple")]
)
def test_logits_of_refuses_outputs_without_logits(output, name):
    message = ("the model must return logits [B, C] (a tensor, .logits, a tuple starting with them, or a dict with a "
               f"'logit' tensor); got {name}")
    with pytest.raises(TypeError, match=exact(message)):
        logits_of(output)


def test_logits_of_refuses_other_shapes():
    with pytest.raises(ValueError, match=exact("the model must return logits [B, C]; got shape (3,)")):
        logits_of(torch.ones(3))


# -------------------------------------------------------------------------------------- blurred_images


def reference_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """The separable Gaussian blur written out with loops: radius round(3 sigma) (at least 1, at most the image
    size - 1), weights exp(-k^2 / (2 sigma^2)) normalised to sum 1, reflect padding (the border pixel not repeated)."""
    height, width = images.shape[-2:]
    radius = min(max(1, round(3 * sigma)), width - 1, height - 1)
    weights = [math.exp(-(k * k) / (2 * sigma * sigma)) for k in range(-radius, radius + 1)]
    weights = [w / sum(weights) for w in weights]

    def reflect(i: int, size: int) -> int:
        return -i if i < 0 else 2 * (size - 1) - i if i >= size else i

    rows = torch.zeros_like(images)
    for j in range(width):
        for k, w in zip(range(-radius, radius + 1), weights, strict=True):
            rows[..., j] += w * images[..., reflect(j + k, width)]
    out = torch.zeros_like(images)
    for i in range(height):
        for k, w in zip(range(-radius, radius + 1), weights, strict=True):
            out[..., i, :] += w * rows[..., reflect(i + k, height), :]
    return out


@pytest.mark.parametrize(
    "shape, sigma",
    [((1, 2, 9, 9), 0.8), ((2, 1, 9, 3), 1.0), ((1, 2, 3, 9), 1.0), ((1, 1, 6, 7), 0.49), ((1, 3, 12, 12), 1.7)],
)
def test_blurred_images_equal_the_written_out_blur(shape, sigma):
    torch.manual_seed(4)
    images = torch.rand(shape, dtype=torch.float64)
    torch.testing.assert_close(blurred_images(images, sigma), reference_blur(images, sigma), rtol=0, atol=1e-9)


def test_blurred_images_whatever_the_default_device():
    images = torch.rand(1, 1, 5, 5)
    with torch.device("meta"):
        blurred = blurred_images(images, 1.0)
    assert blurred.device.type == "cpu"
    torch.testing.assert_close(blurred, reference_blur(images, 1.0))


# ---------------------------------------------------------------------------- through HuggingFaceAdapter (a subclass)

HF_SMALL = {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16}


def test_attention_forward_defers_transformers_attention():
    transformers = pytest.importorskip("transformers")
    from captum_chefer.adapters.huggingface import HuggingFaceAdapter

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=15, num_labels=2, **HF_SMALL)
    adapter = HuggingFaceAdapter(transformers.BertForSequenceClassification(config).eval())
    batch = {"input_ids": torch.tensor([[2, 5, 6, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    tokens, args = adapter.captum_inputs(batch, level="token")
    maps = adapter.attention_forward(tokens, args).attention["input_ids"]
    assert [type(m).__name__ for m in maps] == ["DeferredHuggingFaceAttention"]


def test_relevance_to_inputs_asks_the_subclass_for_its_prefix():
    # HuggingFaceAdapter's image prefix is the attention length less the patch count (here 5 - 4)
    transformers = pytest.importorskip("transformers")
    from captum_chefer.adapters.huggingface import HuggingFaceAdapter

    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, num_labels=2, **HF_SMALL)
    adapter = HuggingFaceAdapter(transformers.ViTForImageClassification(config).eval())
    relevance = {"pixel_values": torch.tensor([[5.0, 4.0, 8.0, 12.0, 16.0]])}
    (pixels,) = adapter.relevance_to_inputs(relevance, (torch.zeros(1, 1, 8, 8),), ())
    expected = torch.tensor([[0.25, 0.5], [0.75, 1.0]]).repeat_interleave(4, 0).repeat_interleave(4, 1)
    assert pixels[0, 0].tolist() == expected.tolist()  # each patch's relevance over its 16 pixels
