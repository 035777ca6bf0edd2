"""``TransformerAdapter`` on plain PyTorch classifiers: an ``nn.TransformerEncoder`` text classifier and
torchvision's ``vit_b_16``, each checked against the rule computed independently here (the attention
written out in the test, ``R <- R + mean_h(clamp(A * dA, 0)) R``, the pooled row)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients, LayerIntegratedGradients, NoiseTunnel, Saliency
from torch import nn

from captum_chefer import CheferAttribution, TransformerAdapter, adapter_for, compare_methods
from captum_chefer.adapters.base import sum_over_patches


class EncoderClassifier(nn.Module):
    """Tokens (+ a learned [CLS] unless ``causal``) -> nn.TransformerEncoder -> pooled position -> logits.

    Padding (id 0) is read from the ids, as such models usually do. ``causal``: a causal mask and the
    last real token pooled, as a decoder classifier does.
    """

    def __init__(
        self, layers: int = 3, heads: int = 2, dim: int = 16, vocab: int = 30, classes: int = 3, causal: bool = False
    ):
        super().__init__()
        self.causal = causal
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.position = nn.Parameter(torch.randn(1, 16, dim) * 0.1)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def prepare(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        x = self.embed(ids)
        padding = ids == 0
        if not self.causal:
            x = torch.cat([self.cls.expand(len(ids), -1, -1), x], dim=1)
            padding = torch.cat([torch.zeros_like(padding[:, :1]), padding], dim=1)
        x = x + self.position[:, : x.shape[1]]
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1) if self.causal else None
        return x, padding, causal

    def pool(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if not self.causal:
            return hidden[:, 0]
        last = (torch.arange(ids.shape[1]) * (ids != 0)).amax(dim=1)
        return hidden[torch.arange(len(ids)), last]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x, padding, causal = self.prepare(ids)
        hidden = self.encoder(x, mask=causal, src_key_padding_mask=padding, is_causal=self.causal)
        return self.head(self.pool(hidden, ids))


def manual_encoder_forward(model: EncoderClassifier, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The classifier written out (post-norm layers), returning the logits and each layer's probabilities."""
    x, padding, causal = model.prepare(ids)
    maps = []
    for layer in model.encoder.layers:
        mha = layer.self_attn
        batch, length, dim = x.shape
        heads = mha.num_heads
        q, k, v = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(batch, length, heads, dim // heads).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(dim // heads)
        scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
        if causal is not None:
            scores = scores.masked_fill(causal, float("-inf"))
        probabilities = scores.softmax(dim=-1)
        probabilities.retain_grad()
        maps.append(probabilities)
        attended = mha.out_proj((probabilities @ v).transpose(1, 2).reshape(batch, length, dim))
        x = layer.norm1(x + attended)
        x = layer.norm2(x + layer.linear2(layer.activation(layer.linear1(x))))
    return model.head(model.pool(x, ids)), maps


def independent_rows(
    logits: torch.Tensor, maps: list[torch.Tensor], target: torch.Tensor, pool: torch.Tensor
) -> torch.Tensor:
    """The dense rule on the maps' own gradients: R = I; R <- R + mean_h(clamp(A dA, 0)) R; row ``pool``."""
    logits.gather(1, target.view(-1, 1)).sum().backward()
    length = maps[0].shape[-1]
    relevance = torch.eye(length).expand(len(target), length, length)
    for attention in maps:
        weighted = (attention * attention.grad).clamp(min=0).mean(dim=1)
        relevance = relevance + weighted @ relevance
    return relevance[torch.arange(len(target)), pool].detach()


IDS = torch.tensor([[3, 5, 7, 2, 9, 4], [4, 6, 8, 0, 0, 0], [11, 12, 0, 0, 0, 0]])


def _state(model: nn.Module) -> dict:
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "forward": [("forward" in vars(m)) for m in model.modules()],
    }


# ---------------------------------------------------------------------------------------------- nn.TransformerEncoder


@pytest.mark.parametrize("heads", [1, 2])
def test_encoder_classifier_equals_the_independent_rule(heads):
    torch.manual_seed(0)
    model = EncoderClassifier(layers=3, heads=heads).train()  # the adapter switches dropout off itself
    before = _state(model)
    adapter = TransformerAdapter(model, pool="first", prefix_tokens=1, embedding=model.embed, pad_id=0)
    tokens, args = adapter.captum_inputs(IDS, level="token")
    embeddings, _ = adapter.captum_inputs(IDS, level="embedding")
    target = torch.tensor([0, 1, 2])
    chefer = CheferAttribution(adapter)
    (by_token,) = chefer.attribute(tokens, target=target, additional_forward_args=args)
    (by_embedding,) = chefer.attribute(embeddings, target=target, additional_forward_args=args)
    assert _state(model) == before

    model.eval()
    logits, maps = manual_encoder_forward(model, IDS)
    torch.testing.assert_close(logits, model(IDS), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adapter(*tokens, *args), logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adapter(*embeddings, *args), logits, atol=1e-5, rtol=1e-5)
    expected = independent_rows(logits, maps, target, torch.zeros(3, dtype=torch.long))[:, 1:] * (IDS != 0)
    torch.testing.assert_close(by_token, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(by_embedding.sum(-1), expected, atol=1e-5, rtol=1e-4)
    assert by_embedding.shape == embeddings[0].shape
    assert (by_token[IDS == 0] == 0).all()


def test_causal_classifier_pooling_the_last_real_token():
    """A causal mask and right padding: the row of each sample's last real token, padding never reached."""
    torch.manual_seed(1)
    model = EncoderClassifier(layers=2, heads=2, causal=True).eval()
    adapter = TransformerAdapter(model, pool="last", embedding=model.embed, pad_id=0)
    tokens, args = adapter.captum_inputs(IDS, level="token")
    target = torch.tensor([2, 0, 1])
    (scores,) = CheferAttribution(adapter).attribute(tokens, target=target, additional_forward_args=args)
    logits, maps = manual_encoder_forward(model, IDS)
    last = torch.tensor([5, 2, 1])
    expected = independent_rows(logits, maps, target, last) * (IDS != 0)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)
    assert (scores[1, 3:] == 0).all() and (scores[2, 2:] == 0).all()
    assert scores[1, 2] >= 1.0  # the pooled token's own identity term


def test_batch_gives_the_per_sample_results():
    torch.manual_seed(2)
    model = EncoderClassifier(layers=2, heads=2).eval()
    adapter = TransformerAdapter(model, pool="first", prefix_tokens=1, embedding=model.embed, pad_id=0)
    chefer = CheferAttribution(adapter)
    tokens, args = adapter.captum_inputs(IDS, level="token")
    target = adapter.captum_target(IDS)
    (together,) = chefer.attribute(tokens, target=target, additional_forward_args=args)
    for i, length in enumerate((6, 3, 2)):
        alone_tokens, alone_args = adapter.captum_inputs(IDS[i : i + 1, :length], level="token")
        (alone,) = chefer.attribute(alone_tokens, target=target[i : i + 1], additional_forward_args=alone_args)
        torch.testing.assert_close(together[i, :length], alone[0], atol=1e-5, rtol=1e-4)


def test_gradient_methods_run_through_the_same_adapter():
    torch.manual_seed(3)
    model = EncoderClassifier(layers=2, heads=2).eval()
    adapter = TransformerAdapter(model, pool="first", prefix_tokens=1, embedding=model.embed, pad_id=0)
    embeddings, args = adapter.captum_inputs(IDS)
    tokens, _ = adapter.captum_inputs(IDS, level="token")
    target = adapter.captum_target(IDS)
    baselines = adapter.baselines(embeddings, args)
    assert torch.equal(baselines[0][IDS == 0], embeddings[0][IDS == 0])  # padding stays padding
    assert (baselines[0][IDS != 0] == 0).all()
    ig, delta = IntegratedGradients(adapter).attribute(
        embeddings, baselines=baselines, target=target, additional_forward_args=args, n_steps=64,
        return_convergence_delta=True,
    )
    assert ig[0].shape == embeddings[0].shape and float(delta.abs().max()) < 5e-2
    saliency = Saliency(adapter).attribute(embeddings, target=target, additional_forward_args=args)
    smooth = NoiseTunnel(Saliency(adapter)).attribute(
        embeddings, target=target, additional_forward_args=args, nt_samples=3, stdevs=0.1
    )
    lig = LayerIntegratedGradients(adapter, adapter.embedding_layers).attribute(
        tokens, baselines=adapter.baselines(tokens, args), target=target, additional_forward_args=args, n_steps=16
    )
    for attributions in (saliency, smooth, lig):
        scores = adapter.to_feature_dict(attributions)["input"]
        assert scores.shape == IDS.shape and torch.isfinite(scores).all()
    # padding embeddings are exactly the padding row (zero): gradients there do not leak into real tokens
    comparison = compare_methods(
        adapter, {"input": IDS}, [CheferAttribution(adapter), Saliency(adapter)], progress=False
    )
    assert comparison.scores["Chefer"]["input"].shape == IDS.shape
    assert (comparison.scores["Saliency"]["input"][IDS == 0] == 0).all()


def test_removal_decoding_and_records():
    torch.manual_seed(4)
    model = EncoderClassifier(layers=2, heads=2).eval()
    vocabulary = [f"w{i}" for i in range(30)]
    adapter = TransformerAdapter(
        model, pool="first", prefix_tokens=1, embedding=model.embed, pad_id=0, vocabulary=vocabulary
    )
    tokens, args = adapter.captum_inputs(IDS, level="token")
    (mask,) = adapter.token_masks(args, tokens)
    assert torch.equal(mask, IDS != 0)
    keep = {"input": torch.tensor([[1, 0, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)}
    (removed,), removed_args = adapter.remove_tokens(tokens, args, keep)
    assert removed.tolist() == [[3, 7, 2, 9, 4, 0], [6, 8, 0, 0, 0, 0], [11, 12, 0, 0, 0, 0]]
    assert torch.equal(removed_args[-1], removed)  # the carried ids follow
    torch.testing.assert_close(adapter(removed, *removed_args), model(removed))
    assert [t.text for t in adapter.decode(IDS)[1]] == ["w4", "w6", "w8"]
    (scores,) = CheferAttribution(adapter).attribute(tokens, target=0, additional_forward_args=args)
    records = adapter.visualization_records(IDS, scores, target=0, method="Chefer")
    assert records[2].raw_input_ids == ["w11", "w12"] and len(records[2].word_attributions) == 2


def test_embedding_input_model_with_a_mask_argument():
    """A model that takes embeddings and a mask: relevance spread over D, nothing on padding."""
    torch.manual_seed(5)
    inner = EncoderClassifier(layers=2, heads=2).eval()

    class OnEmbeddings(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x, mask):  # mask: 1 on real tokens
            x = torch.cat([inner.cls.expand(len(x), -1, -1), x], dim=1) + inner.position[:, : x.shape[1] + 1]
            padding = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1) == 0  # [CLS] is real
            return inner.head(inner.encoder(x, src_key_padding_mask=padding)[:, 0])

    model = OnEmbeddings().eval()
    embeddings = inner.embed(IDS).detach()
    adapter = TransformerAdapter(model, prefix_tokens=1, mask_arg=0)
    inputs, args = adapter.captum_inputs((embeddings, (IDS != 0).long()))
    (scores,) = CheferAttribution(adapter).attribute(inputs, target=1, additional_forward_args=args)
    reference = TransformerAdapter(inner, prefix_tokens=1, embedding=inner.embed, pad_id=0)
    tokens, token_args = reference.captum_inputs(IDS, level="token")
    (expected,) = CheferAttribution(reference).attribute(tokens, target=1, additional_forward_args=token_args)
    torch.testing.assert_close(scores.sum(-1), expected, atol=1e-5, rtol=1e-4)
    (removed,), removed_args = adapter.remove_tokens(inputs, args, {"input": torch.ones_like(IDS, dtype=torch.bool)})
    assert torch.equal(removed_args[0], args[0]) and torch.equal(removed, inputs[0])


def test_errors_say_what_to_pass():
    torch.manual_seed(6)
    model = EncoderClassifier(layers=2, heads=2).eval()
    forgot_prefix = TransformerAdapter(model, embedding=model.embed, pad_id=0)
    tokens, args = forgot_prefix.captum_inputs(IDS, level="token")
    with pytest.raises(ValueError, match="pass prefix_tokens=1"):
        CheferAttribution(forgot_prefix).attribute(tokens, target=0, additional_forward_args=args)
    no_embedding = TransformerAdapter(model, prefix_tokens=1, pad_id=0)
    with pytest.raises(ValueError, match="embedding=model"):
        no_embedding.captum_inputs(IDS, level="embedding")
    without_attention = TransformerAdapter(nn.Sequential(nn.Embedding(30, 4), nn.Flatten(), nn.Linear(24, 2)))
    with pytest.raises(ValueError, match=r"no attention module.*IntegratedGradients"):
        CheferAttribution(without_attention)
    with pytest.raises(ValueError, match="pool must be"):
        TransformerAdapter(model, pool="middle")
    with pytest.raises(TypeError, match="TransformerAdapter"):
        adapter_for(model)
    images = TransformerAdapter(nn.Sequential(nn.Flatten(), nn.Linear(48, 2)))
    with pytest.raises(ValueError, match="patch_size"):
        images.to_feature_dict(torch.zeros(1, 3, 4, 4))


# ---------------------------------------------------------------------------------------------- torchvision ViT


def _randomise(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        model.encoder.pos_embedding.normal_(std=0.5)  # visibly position dependent
        for p in model.heads.parameters():
            p.normal_(std=0.5)
    return model.eval()


@pytest.fixture(scope="module")
def vit_b_16():
    """torchvision's vit_b_16 itself (random weights) on 48x48 images: 9 patches and the class token."""
    import torchvision

    torch.manual_seed(0)
    return _randomise(torchvision.models.vit_b_16(weights=None, image_size=48, num_classes=3))


@pytest.fixture(scope="module")
def vit():
    """The same class at a tiny size (3 blocks, 4 heads, width 32), for the tests that run it often."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=48, patch_size=16, num_layers=3, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=3
    )
    return _randomise(model)


def manual_vit_forward(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """torchvision's ViT written out with its attention probabilities in the graph."""
    x = model._process_input(images)
    x = torch.cat([model.class_token.expand(len(x), -1, -1), x], dim=1) + model.encoder.pos_embedding
    maps = []
    for block in model.encoder.layers:
        mha = block.self_attention
        h = block.ln_1(x)
        batch, length, dim = h.shape
        heads = mha.num_heads
        q, k, v = F.linear(h, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(batch, length, heads, dim // heads).transpose(1, 2) for t in (q, k, v))
        probabilities = (q @ k.transpose(-2, -1) / math.sqrt(dim // heads)).softmax(dim=-1)
        probabilities.retain_grad()
        maps.append(probabilities)
        x = x + mha.out_proj((probabilities @ v).transpose(1, 2).reshape(batch, length, dim))
        x = x + block.mlp(block.ln_2(x))
    return model.heads(model.encoder.ln(x)[:, 0]), maps


@pytest.mark.parametrize("size", ["vit_b_16", "tiny"])
def test_torchvision_vit_equals_the_independent_rule(size, request):
    vit = request.getfixturevalue("vit_b_16" if size == "vit_b_16" else "vit")
    torch.manual_seed(7)
    images = torch.rand(2, 3, 48, 48)
    adapter = TransformerAdapter(vit, pool="first", prefix_tokens=1)  # patch size read from the model
    assert adapter.patch_size == 16
    inputs, args = adapter.captum_inputs(images)
    assert args == ()
    target = torch.tensor([2, 0])
    (pixels,) = CheferAttribution(adapter).attribute(inputs, target=target, additional_forward_args=args)
    logits, maps = manual_vit_forward(vit, images)
    torch.testing.assert_close(logits, vit(images), atol=1e-4, rtol=1e-4)
    expected = independent_rows(logits, maps, target, torch.zeros(2, dtype=torch.long))[:, 1:]
    assert pixels.shape == images.shape
    torch.testing.assert_close(sum_over_patches(pixels, 16), expected, atol=1e-5, rtol=1e-4)
    assert adapter.to_feature_dict(pixels)["input"].shape == (2, 9)


def test_vit_pooled_row_shortcut_gives_the_same_logits_and_relevance(vit):
    torch.manual_seed(8)
    images = torch.rand(3, 3, 48, 48)
    adapter = TransformerAdapter(vit, prefix_tokens=1)
    inputs, args = adapter.captum_inputs(images)
    full = adapter.attention_forward(inputs, args)
    short = adapter.attention_forward(inputs, args, pooled_row_only=True)
    torch.testing.assert_close(short.logits, full.logits, atol=1e-5, rtol=1e-5)
    assert full.attention["input"][-1].shape == (3, 4, 10, 10)
    assert short.attention["input"][-1].shape == (3, 4, 1, 10)  # the last block ran for [CLS] alone
    assert all(a.shape == (3, 4, 10, 10) for a in short.attention["input"][:-1])
    chefer = CheferAttribution(adapter)
    row = chefer.attribute(inputs[0], target=1)  # asks for the pooled row
    dense = chefer.attribute(inputs[0], target=1, propagation="dense")  # full maps, the dense product
    torch.testing.assert_close(row, dense, atol=1e-6, rtol=1e-5)
    for name in ("int", "callable"):  # pools other than "first": no shortcut, full last block
        pool = 0 if name == "int" else (lambda inputs, args: torch.zeros(len(inputs[0]), dtype=torch.long))
        other = TransformerAdapter(vit, pool=pool, prefix_tokens=1)
        captured = other.attention_forward(inputs, args, pooled_row_only=True)
        assert captured.attention["input"][-1].shape == (3, 4, 10, 10)
        torch.testing.assert_close(CheferAttribution(other).attribute(inputs[0], target=1), row, atol=1e-6, rtol=1e-5)


def test_vit_gradient_methods_baselines_and_patch_removal(vit):
    torch.manual_seed(9)
    images = torch.rand(2, 3, 48, 48)
    adapter = TransformerAdapter(vit, prefix_tokens=1)
    inputs, args = adapter.captum_inputs(images)
    (zero,) = adapter.baselines(inputs, args, "zero")
    (blur,) = adapter.baselines(inputs, args, "blur")
    assert (zero == 0).all() and blur.shape == images.shape and (blur - images).abs().mean() > 0
    with pytest.raises(ValueError, match="'zero' or 'blur'"):
        adapter.baselines(inputs, args, "unk")
    ig = IntegratedGradients(adapter).attribute(inputs[0], baselines=zero, target=0, n_steps=8)
    saliency = Saliency(adapter).attribute(inputs[0], target=0)
    assert ig.shape == saliency.shape == images.shape
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[0, 4] = False  # the centre patch of the first image
    (removed,), _ = adapter.remove_tokens(inputs, args, {"input": keep})
    assert (removed[0, :, 16:32, 16:32] == 0).all() and torch.equal(removed[1], images[1])
    assert torch.equal(removed[0, :, :16], images[0, :, :16])
    assert [t.text for t in adapter.decode(images)[0]][:4] == ["patch 0,0", "patch 0,1", "patch 0,2", "patch 1,0"]
    (mask,) = adapter.token_masks(args, inputs)
    assert mask.shape == (2, 9) and mask.all()
