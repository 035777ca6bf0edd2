"""``HuggingFaceAdapter`` on tiny random-weight ``transformers`` models built from configs (no downloads).

The expected relevance is computed here, independently: a copy of the model set to eager attention returns
its attention probabilities (``output_attentions=True``), their gradients come from ``backward`` on the
target logits, and the dense rule ``R <- R + mean_h(clamp(A * dA, 0)) R`` is read at the pooled row. The
adapter runs the original model, on SDPA as it was built.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from captum.attr import IntegratedGradients, LayerIntegratedGradients, NoiseTunnel, Saliency
from torch import nn

from captum_chefer import CheferAttribution, HuggingFaceAdapter, adapter_for, compare_methods

SMALL = {"hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 32}
WORDS = ["fever", "cough", "rash", "pain", "no", "history", "of", "chest", "sepsis", "stable"]


def _state(model: nn.Module) -> dict:
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "forward": [("forward" in vars(m)) for m in model.modules()],
        "implementation": [getattr(getattr(m, "config", None), "_attn_implementation", None) for m in model.modules()],
    }


def eager_reference(
    model: nn.Module, target: torch.Tensor, pool: torch.Tensor, **inputs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the pooled relevance rows of an eager copy of ``model``, from its returned attentions."""
    twin = copy.deepcopy(model).eval()
    twin.set_attn_implementation("eager")
    output = twin(**inputs, output_attentions=True)
    maps = list(output.attentions)
    assert maps and all(a.requires_grad for a in maps)
    for attention in maps:
        attention.retain_grad()
    output.logits.gather(1, target.view(-1, 1)).sum().backward()
    length = maps[0].shape[-1]
    relevance = torch.eye(length).expand(len(target), length, length)
    for attention in maps:
        weighted = (attention * attention.grad).clamp(min=0).mean(dim=1)
        relevance = relevance + weighted @ relevance
    return output.logits.detach(), relevance[torch.arange(len(target)), pool].detach()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A BertTokenizerFast from a vocabulary file written here."""
    from transformers import BertTokenizerFast

    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizerFast(vocab=str(vocab))  # transformers 5 names the file `vocab`


TEXTS = ["fever cough rash pain", "no history of chest pain sepsis", "stable"]


def _bert(**config):
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(
        transformers.BertConfig(vocab_size=15, num_labels=3, **SMALL, **config)
    ).eval()


def _gpt2():
    torch.manual_seed(1)
    config = transformers.GPT2Config(vocab_size=15, n_embd=16, n_layer=3, n_head=2, n_positions=16, num_labels=3,
                                     pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return transformers.GPT2ForSequenceClassification(config).eval()


# ---------------------------------------------------------------------------------------------- encoders


def test_bert_equals_the_eager_computation_and_keeps_sdpa(tokenizer):
    model = _bert()
    assert model.config._attn_implementation == "sdpa"
    before = _state(model)
    encoding = tokenizer(TEXTS, return_tensors="pt", padding=True)
    adapter = HuggingFaceAdapter(model, tokenizer=tokenizer)
    tokens, args = adapter.captum_inputs(encoding, level="token")
    embeddings, _ = adapter.captum_inputs(encoding)
    assert len(args) == 2  # attention mask, token type ids
    target = torch.tensor([2, 0, 1])
    chefer = CheferAttribution(adapter)
    (by_token,) = chefer.attribute(tokens, target=target, additional_forward_args=args)
    (by_embedding,) = chefer.attribute(embeddings, target=target, additional_forward_args=args)
    assert _state(model) == before
    logits, rows = eager_reference(model, target, torch.zeros(3, dtype=torch.long), **encoding)
    torch.testing.assert_close(adapter(*tokens, *args), logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adapter(*embeddings, *args), logits, atol=1e-5, rtol=1e-5)
    expected = rows * encoding["attention_mask"]
    torch.testing.assert_close(by_token, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(by_embedding.sum(-1), expected, atol=1e-5, rtol=1e-4)
    assert by_embedding.shape == embeddings[0].shape
    assert (by_token[encoding["attention_mask"] == 0] == 0).all()


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_other_encoders_equal_the_eager_computation(family):
    torch.manual_seed(2)
    if family == "roberta":
        config = transformers.RobertaConfig(vocab_size=15, num_labels=2, pad_token_id=1, **SMALL)
        model = transformers.RobertaForSequenceClassification(config).eval()
        ids = torch.tensor([[0, 5, 6, 7, 2], [0, 8, 2, 1, 1]])
    else:
        config = transformers.DistilBertConfig(
            vocab_size=15, num_labels=2, dim=16, n_layers=3, n_heads=2, hidden_dim=32
        )
        model = transformers.DistilBertForSequenceClassification(config).eval()
        ids = torch.tensor([[2, 5, 6, 7, 3], [2, 8, 3, 0, 0]])
    encoding = {"input_ids": ids, "attention_mask": (torch.arange(5) < torch.tensor([[5], [3]])).long()}
    adapter = adapter_for(model)
    assert isinstance(adapter, HuggingFaceAdapter) and adapter.kind == "encoder"
    tokens, args = adapter.captum_inputs(encoding, level="token")
    target = torch.tensor([1, 0])
    (scores,) = CheferAttribution(adapter).attribute(tokens, target=target, additional_forward_args=args)
    logits, rows = eager_reference(model, target, torch.zeros(2, dtype=torch.long), **encoding)
    torch.testing.assert_close(adapter(*tokens, *args), logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores, rows * encoding["attention_mask"], atol=1e-5, rtol=1e-4)
    assert model.config._attn_implementation == "sdpa"


def test_batch_gives_the_per_sample_results(tokenizer):
    model = _bert()
    adapter = HuggingFaceAdapter(model, tokenizer=tokenizer)
    chefer = CheferAttribution(adapter)
    encoding = tokenizer(TEXTS, return_tensors="pt", padding=True)
    tokens, args = adapter.captum_inputs(encoding, level="token")
    target = adapter.captum_target(encoding)
    (together,) = chefer.attribute(tokens, target=target, additional_forward_args=args)
    for i, text in enumerate(TEXTS):
        alone = tokenizer([text], return_tensors="pt")
        alone_tokens, alone_args = adapter.captum_inputs(alone, level="token")
        (scores,) = chefer.attribute(alone_tokens, target=target[i : i + 1], additional_forward_args=alone_args)
        length = alone["input_ids"].shape[1]
        torch.testing.assert_close(together[i, :length], scores[0], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- decoders


@pytest.mark.parametrize("side", ["right", "left"])
def test_gpt2_pools_the_last_real_token(side):
    model = _gpt2()
    lengths = torch.tensor([6, 3, 4])
    positions = torch.arange(6)
    real = positions < lengths[:, None] if side == "right" else positions >= (6 - lengths)[:, None]
    torch.manual_seed(3)
    ids = torch.where(real, torch.randint(4, 15, (3, 6)), torch.zeros(3, 6, dtype=torch.long))
    encoding = {"input_ids": ids, "attention_mask": real.long()}
    adapter = HuggingFaceAdapter(model)
    assert adapter.kind == "decoder" and adapter.pool == "last"
    tokens, args = adapter.captum_inputs(encoding, level="token")
    embeddings, _ = adapter.captum_inputs(encoding)
    target = torch.tensor([0, 2, 1])
    before = _state(model)
    (scores,) = CheferAttribution(adapter).attribute(tokens, target=target, additional_forward_args=args)
    (by_embedding,) = CheferAttribution(adapter).attribute(embeddings, target=target, additional_forward_args=args)
    assert _state(model) == before
    last = torch.tensor([5, 2, 3]) if side == "right" else torch.full((3,), 5)
    logits, rows = eager_reference(model, target, last, **encoding)
    with torch.no_grad():
        torch.testing.assert_close(model(**encoding).logits, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adapter(*tokens, *args), logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adapter(*embeddings, *args), logits, atol=1e-5, rtol=1e-5)  # HF would pool a pad here
    torch.testing.assert_close(scores, rows * real, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(by_embedding.sum(-1), scores, atol=1e-5, rtol=1e-4)
    assert (scores[~real] == 0).all()
    assert bool((scores[torch.arange(3), last] >= 1.0).all())  # the pooled token's identity term
    if side == "right":  # causal attention and right padding: each sample alone gives the same scores
        for i in range(3):
            alone = {k: v[i : i + 1, : lengths[i]] for k, v in encoding.items()}
            alone_tokens, alone_args = adapter.captum_inputs(alone, level="token")
            (one,) = CheferAttribution(adapter).attribute(
                alone_tokens, target=target[i : i + 1], additional_forward_args=alone_args
            )
            torch.testing.assert_close(scores[i, : lengths[i]], one[0], atol=1e-5, rtol=1e-4)


def test_llama_style_classifier_equals_the_eager_computation():
    torch.manual_seed(4)
    config = transformers.LlamaConfig(vocab_size=15, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=32, num_labels=2, pad_token_id=0)
    model = transformers.LlamaForSequenceClassification(config).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 4, 5, 6]])
    encoding = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    adapter = adapter_for(model)
    tokens, args = adapter.captum_inputs(encoding, level="token")
    (scores,) = CheferAttribution(adapter).attribute(tokens, target=1, additional_forward_args=args)
    logits, rows = eager_reference(model, torch.tensor([1, 1]), torch.tensor([4, 4]), **encoding)
    torch.testing.assert_close(adapter(*tokens, *args), logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores, rows * encoding["attention_mask"], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- images


@pytest.mark.parametrize("family", ["vit", "deit"])
def test_image_classifiers_equal_the_eager_computation(family):
    torch.manual_seed(5)
    config = dict(image_size=32, patch_size=8, num_channels=3, num_labels=3, **SMALL)
    if family == "vit":
        model = transformers.ViTForImageClassification(transformers.ViTConfig(**config)).eval()
        prefix = 1
    else:
        model = transformers.DeiTForImageClassification(transformers.DeiTConfig(**config)).eval()
        prefix = 2  # [CLS] and the distillation token
    pixels = torch.randn(2, 3, 32, 32)
    adapter = adapter_for(model)
    inputs, args = adapter.captum_inputs({"pixel_values": pixels})
    assert args == () and adapter.kind == "image"
    target = torch.tensor([2, 1])
    before = _state(model)
    (attributions,) = CheferAttribution(adapter).attribute(inputs, target=target, additional_forward_args=args)
    assert _state(model) == before
    logits, rows = eager_reference(model, target, torch.zeros(2, dtype=torch.long), pixel_values=pixels)
    torch.testing.assert_close(adapter(*inputs), logits, atol=1e-5, rtol=1e-5)
    assert attributions.shape == pixels.shape
    patches = adapter.to_feature_dict(attributions)["pixel_values"]
    torch.testing.assert_close(patches, rows[:, prefix:], atol=1e-5, rtol=1e-4)  # [CLS] (and distillation) dropped
    # each patch's relevance is spread evenly over its pixels and channels
    torch.testing.assert_close(
        attributions[0, :, :8, :8], torch.full((3, 8, 8), float(rows[0, prefix]) / 192), atol=1e-6, rtol=1e-4
    )


def test_image_gradient_methods_and_heads_reading_two_positions():
    torch.manual_seed(6)
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, num_labels=2, **SMALL)
    adapter = HuggingFaceAdapter(transformers.ViTForImageClassification(config).eval())
    pixels = torch.randn(2, 3, 32, 32)
    inputs, args = adapter.captum_inputs(pixels)
    (baseline,) = adapter.baselines(inputs, args, "blur")
    ig = IntegratedGradients(adapter).attribute(inputs[0], baselines=baseline, target=0, n_steps=8)
    smooth = NoiseTunnel(Saliency(adapter)).attribute(inputs[0], target=0, nt_samples=2, stdevs=0.1)
    assert ig.shape == smooth.shape == pixels.shape
    assert adapter.to_feature_dict(ig)["pixel_values"].shape == (2, 16)
    teacher = transformers.DeiTForImageClassificationWithTeacher(
        transformers.DeiTConfig(image_size=32, patch_size=8, **SMALL)
    )
    with pytest.raises(ValueError, match=r"distillation-token head.*pool=0"):
        HuggingFaceAdapter(teacher)
    assert HuggingFaceAdapter(teacher, pool=0).pool == 0


# ---------------------------------------------------------------------------------------------- Captum methods, display


def test_gradient_methods_baselines_and_records(tokenizer):
    model = _bert()
    adapter = HuggingFaceAdapter(model, tokenizer=tokenizer)
    encoding = tokenizer(TEXTS, return_tensors="pt", padding=True)
    embeddings, args = adapter.captum_inputs(encoding)
    tokens, _ = adapter.captum_inputs(encoding, level="token")
    target = adapter.captum_target(encoding)
    mask = encoding["attention_mask"].bool()
    (unk,) = adapter.baselines(tokens, args, "unk")
    assert (unk[mask] == tokenizer.unk_token_id).all() and torch.equal(unk[~mask], tokens[0][~mask])
    (masked,) = adapter.baselines(embeddings, args, "mask")
    mask_embedding = model.get_input_embeddings().weight[tokenizer.mask_token_id]
    torch.testing.assert_close(masked[0, 1], mask_embedding.detach())
    ig, delta = IntegratedGradients(adapter).attribute(
        embeddings, baselines=adapter.baselines(embeddings, args, "pad"), target=target, additional_forward_args=args,
        n_steps=64, return_convergence_delta=True,
    )
    assert float(delta.abs().max()) < 5e-2
    lig = LayerIntegratedGradients(adapter, adapter.embedding_layers).attribute(
        tokens, baselines=(unk,), target=target, additional_forward_args=args, n_steps=16
    )
    for attributions in (ig, lig):
        assert adapter.to_feature_dict(attributions)["input_ids"].shape == tokens[0].shape
    comparison = compare_methods(adapter, encoding, [CheferAttribution(adapter), Saliency(adapter)], progress=False)
    assert (comparison.scores["Saliency"]["input_ids"][~mask] == 0).all()
    records = adapter.visualization_records(encoding, comparison.scores["Chefer"], method="Chefer")
    assert records[2].raw_input_ids == ["[CLS]", "stable", "[SEP]"]
    bare = HuggingFaceAdapter(model)
    assert bare.visualization_records(encoding, lig, tokenizer=tokenizer)[0].raw_input_ids[1] == "fever"
    assert bare.decode(encoding)[2][1].text == "#14" and bare.tokenizer is None
    with pytest.raises(ValueError, match="tokenizer"):
        bare.baselines(tokens, args, "unk")


def test_removal_masks_tokens_out_and_compacts(tokenizer):
    adapter = HuggingFaceAdapter(_gpt2())
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    encoding = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    tokens, args = adapter.captum_inputs(encoding, level="token")
    keep = {"input_ids": torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)}
    (removed,), (removed_mask,) = adapter.remove_tokens(tokens, args, keep)
    assert removed.tolist() == [[5, 7, 0, 0], [9, 10, 0, 0]] and removed_mask.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]
    expected = adapter(torch.tensor([[5, 7]]), torch.ones(1, 2, dtype=torch.long))
    torch.testing.assert_close(adapter(removed, removed_mask)[:1], expected, atol=1e-5, rtol=1e-5)
    (kept,), (kept_mask,) = adapter.remove_tokens(tokens, args, keep, compact=False)
    assert kept.tolist() == [[5, 0, 7, 0], [9, 10, 0, 0]] and kept_mask.tolist() == [[1, 0, 1, 0], [1, 1, 0, 0]]


# ---------------------------------------------------------------------------------------------- errors


def test_models_without_a_head_or_attention_are_refused():
    base = transformers.BertModel(transformers.BertConfig(vocab_size=15, **SMALL))
    with pytest.raises(TypeError, match=r"no classification head.*AutoModelForSequenceClassification"):
        HuggingFaceAdapter(base)
    with pytest.raises(TypeError, match="no classification head"):
        adapter_for(base)
    with pytest.raises(TypeError, match="transformers model"):
        HuggingFaceAdapter(nn.Linear(2, 2))
    convnext = transformers.ConvNextForImageClassification(
        transformers.ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=2)
    ).eval()
    adapter = HuggingFaceAdapter(convnext)  # fine for gradient methods
    assert Saliency(adapter).attribute(torch.randn(1, 3, 32, 32), target=0).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"no attention module.*IntegratedGradients"):
        CheferAttribution(adapter)
    with pytest.raises(TypeError, match="encoding"):
        HuggingFaceAdapter(_bert()).captum_inputs(torch.ones(2, 3, dtype=torch.long))


def test_label_targets_and_class_names(tokenizer):
    model = _bert(id2label={0: "low", 1: "mid", 2: "high"})
    adapter = HuggingFaceAdapter(model, tokenizer=tokenizer)
    encoding = tokenizer(TEXTS, return_tensors="pt", padding=True)
    encoding["labels"] = torch.tensor([2, 0, 1])
    assert torch.equal(adapter.captum_target(encoding, mode="label"), encoding["labels"])
    tokens, args = adapter.captum_inputs(encoding, level="token")
    (scores,) = CheferAttribution(adapter).attribute(tokens, target=encoding["labels"], additional_forward_args=args)
    records = adapter.visualization_records(encoding, scores, encoding["labels"])
    assert [r.true_class for r in records] == ["high", "low", "mid"] and records[0].attr_class == "high"
    encoding["labels"] = torch.tensor([[1, 0, 1], [0, 1, 0], [0, 0, 1]])
    with pytest.raises(ValueError, match="several classes per sample"):
        adapter.captum_target(encoding, mode="label")
    with pytest.raises(ValueError, match="'labels'"):
        adapter.captum_target({"input_ids": tokens[0]}, mode="label")


def test_options_through_deferred_layers(tokenizer):
    """The ablations and the dense propagation on SDPA layers (maps formed in the backward pass, a few heads
    at a time) against the rule on an eager copy's returned attentions."""
    model = _bert()
    adapter = HuggingFaceAdapter(model, tokenizer=tokenizer)
    encoding = tokenizer(TEXTS, return_tensors="pt", padding=True)
    tokens, args = adapter.captum_inputs(encoding, level="token")
    target = torch.tensor([1, 2, 0])
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("eager")
    output = twin(**encoding, output_attentions=True)
    maps = list(output.attentions)
    grads = torch.autograd.grad(output.logits.gather(1, target.view(-1, 1)).sum(), maps)

    def rule(use_gradients=True, clamp=True, head_reduction="mean", layers=None, exclude_self=False, propagation="row"):
        length = maps[0].shape[-1]
        relevance = torch.eye(length).expand(3, length, length)
        chosen = list(zip(maps, grads, strict=True))[-layers:] if layers else list(zip(maps, grads, strict=True))
        for attention, grad in chosen:
            weighted = attention.detach() * grad if use_gradients else attention.detach()
            weighted = weighted.clamp(min=0) if clamp else weighted
            weighted = weighted.mean(1) if head_reduction == "mean" else weighted.amax(1)
            relevance = relevance + weighted @ relevance
        self_term = torch.nn.functional.one_hot(torch.zeros(3, dtype=torch.long), length) if exclude_self else 0
        row = relevance[:, 0] - self_term
        return row * encoding["attention_mask"]

    for options in ({"head_reduction": "max"}, {"use_gradients": False}, {"clamp": False}, {"layers": 2},
                    {"propagation": "dense"}, {"exclude_self": True}):
        (scores,) = CheferAttribution(adapter).attribute(tokens, target=target, additional_forward_args=args, **options)
        torch.testing.assert_close(scores, rule(**options), atol=1e-5, rtol=1e-4, msg=str(options))
