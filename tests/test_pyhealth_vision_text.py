"""``PyHealthAdapter`` on PyHealth's image and text models: ``TorchvisionModel`` (vit_b_16) and ``TransformersModel``
(a tiny BERT saved locally, with a tokenizer from a vocabulary file written here; no downloads).

Expected values: PyHealth 2.1's ``_reference_attribute_vit(interpolate=False)`` where it is right (two encoder
blocks or fewer, ``pos_embedding`` zero: see ``test_pyhealth_vit_reference_is_right_only_there``), and an
independent computation elsewhere (the ViT written out in ``test_torch_adapter``; an eager copy of the
text encoder returning its attentions).
"""

from __future__ import annotations

import contextlib
import copy
import threading

import pytest
import torch
from captum.attr import IntegratedGradients, LayerIntegratedGradients, NoiseTunnel, Saliency

from captum_chefer import CheferAttribution, PyHealthAdapter, adapter_for, compare_methods
from captum_chefer.adapters.base import sum_over_patches
from captum_chefer.synthetic import quiet_pyhealth
from tests.conftest import TEXTS, save_tiny_bert
from tests.test_torch_adapter import independent_rows, manual_vit_forward

# ---------------------------------------------------------------------------------------------- fixtures


def image_dataset(channels: int = 3, n: int = 6, classes: int = 3):
    from pyhealth.datasets import create_sample_dataset

    generator = torch.Generator().manual_seed(0)
    samples = [
        {
            "patient_id": f"p{i}",
            "image": torch.rand(channels, 32, 32, generator=generator).tolist(),
            "label": i % classes,
        }
        for i in range(n)
    ]
    with quiet_pyhealth():
        return create_sample_dataset(
            samples=samples, input_schema={"image": "tensor"},
            output_schema={"label": "multiclass" if classes > 2 else "binary"}, dataset_name=f"images-{channels}",
        )


def batch_of(dataset, size: int = 4):
    from pyhealth.datasets import get_dataloader

    return next(iter(get_dataloader(dataset, batch_size=size, shuffle=False)))


@pytest.fixture(scope="module")
def images():
    """One-channel 32x32 images, three classes (the model repeats the channel, as for X-rays)."""
    return image_dataset(channels=1)


@pytest.fixture(scope="module")
def vit_model(images):
    """TorchvisionModel("vit_b_16") on 32x32 images (2x2 patches), random weights, visibly position dependent.

    Built once (86M parameters): tests that need fewer blocks or no positions change it for a ``with`` block.
    """
    from pyhealth.models import TorchvisionModel

    torch.manual_seed(0)
    with quiet_pyhealth():
        model = TorchvisionModel(images, "vit_b_16", {"weights": None, "image_size": 32})
    with torch.no_grad():
        model.model.encoder.pos_embedding.normal_(std=0.5)
        model.model.heads.weight.normal_(std=0.5)
    return model.eval()


@contextlib.contextmanager
def shrunk(model, blocks: int, zero_positions: bool):
    """The model with its first ``blocks`` encoder blocks (and, optionally, a zero pos_embedding), restored after."""
    encoder = model.model.encoder
    layers, positions = encoder.layers, encoder.pos_embedding.detach().clone()
    encoder.layers = layers[:blocks]
    if zero_positions:
        with torch.no_grad():
            encoder.pos_embedding.zero_()
    try:
        yield model
    finally:
        encoder.layers = layers
        with torch.no_grad():
            encoder.pos_embedding.copy_(positions)


def reference_patches(model, batch, target):
    from pyhealth.interpret.methods.chefer import _reference_attribute_vit

    result = _reference_attribute_vit(model, interpolate=False, class_index=target, **batch)
    model.zero_grad(set_to_none=True)
    return result["image"].reshape(len(target), -1).detach()


def chefer_patches(model, batch, target):
    adapter = PyHealthAdapter(model)
    inputs, args = adapter.captum_inputs(batch)
    (pixels,) = CheferAttribution(adapter).attribute(inputs, target=target, additional_forward_args=args)
    return adapter.to_feature_dict(pixels)["image"]


# ---------------------------------------------------------------------------------------------- TorchvisionModel ViT


@pytest.mark.parametrize("blocks", [1, 2])
def test_vit_equals_pyhealth_reference_where_it_is_right(vit_model, images, blocks):
    batch = batch_of(images)
    target = torch.tensor([0, 2, 1, 2])
    with shrunk(vit_model, blocks, zero_positions=True) as model:
        torch.testing.assert_close(
            chefer_patches(model, batch, target), reference_patches(model, batch, target), atol=1e-5, rtol=1e-5
        )


def test_pyhealth_vit_reference_is_right_only_there(vit_model, images):
    """The reference skips pos_embedding, and pairs maps with the wrong gradients from the third block on."""
    batch = batch_of(images)
    target = torch.tensor([0, 2, 1, 2])
    with torch.no_grad():  # pos_embedding skipped: the reference runs another model
        reference_logits, _ = vit_model.forward_with_attention(batch["image"], register_hook=False)
        assert (reference_logits - vit_model.model(batch["image"].repeat(1, 3, 1, 1))).abs().max() > 1e-2
    for blocks in (2, 12):  # with pos_embedding zero: right up to two blocks, not beyond
        with shrunk(vit_model, blocks, zero_positions=True) as model:
            logits, maps = manual_vit_forward(model.model, batch["image"].repeat(1, 3, 1, 1))
            expected = independent_rows(logits, maps, target, torch.zeros(4, dtype=torch.long))[:, 1:]
            ours, theirs = chefer_patches(model, batch, target), reference_patches(model, batch, target)
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
        assert ((theirs - expected).abs().max() < 1e-5) == (blocks <= 2), blocks


def test_vit_with_position_embeddings_equals_the_independent_rule(vit_model):
    batch = {
        "image": torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)),
        "label": torch.tensor([0, 1, 2, 0]),
    }
    target = torch.tensor([1, 1, 0, 2])
    adapter = PyHealthAdapter(vit_model)
    inputs, args = adapter.captum_inputs(batch)
    assert args == () and inputs[0].shape == (4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(adapter(*inputs).softmax(1), vit_model(**batch)["y_prob"])
    (pixels,) = CheferAttribution(adapter).attribute(inputs, target=target)
    logits, maps = manual_vit_forward(vit_model.model, batch["image"])
    expected = independent_rows(logits, maps, target, torch.zeros(4, dtype=torch.long))[:, 1:]
    assert pixels.shape == inputs[0].shape
    torch.testing.assert_close(sum_over_patches(pixels, 16), expected, atol=1e-5, rtol=1e-4)
    # spread evenly: every pixel and channel of a patch holds a 1/(3*16*16) share
    torch.testing.assert_close(pixels[0, :, 16:, :16], torch.full((3, 16, 16), float(expected[0, 2]) / 768))


def test_vit_pooled_row_shortcut(vit_model, images):
    with shrunk(vit_model, 3, zero_positions=False) as model:
        adapter = PyHealthAdapter(model)
        inputs, args = adapter.captum_inputs(batch_of(images))
        full = adapter.attention_forward(inputs, args)
        short = adapter.attention_forward(inputs, args, pooled_row_only=True)
        row = CheferAttribution(adapter).attribute(inputs, target=1)
        dense = CheferAttribution(adapter).attribute(inputs, target=1, propagation="dense")
    torch.testing.assert_close(short.logits, full.logits, atol=1e-5, rtol=1e-5)
    assert full.attention["image"][-1].shape == (4, 12, 5, 5) and short.attention["image"][-1].shape == (4, 12, 1, 5)
    torch.testing.assert_close(row[0], dense[0], atol=1e-6, rtol=1e-5)


def test_one_channel_images_gradient_methods_and_captum_display(vit_model, images):
    import matplotlib

    matplotlib.use("Agg")
    from captum.attr import visualization as viz

    with shrunk(vit_model, 2, zero_positions=False) as model:
        adapter = adapter_for(model)
        assert isinstance(adapter, PyHealthAdapter) and adapter.num_outputs == 3
        batch = batch_of(images)
        inputs, args = adapter.captum_inputs(batch)
        assert inputs[0].shape == (4, 3, 32, 32) and torch.equal(inputs[0][:, 1], batch["image"][:, 0])
        target = adapter.captum_target(batch)
        assert torch.equal(adapter.captum_target(batch, mode="label"), batch["label"].view(-1))
        chefer = CheferAttribution(adapter).attribute(inputs, target=target)
        (zero,) = adapter.baselines(inputs, args, "zero")
        ig = IntegratedGradients(adapter).attribute(inputs, baselines=(zero,), target=target, n_steps=8)
        saliency = Saliency(adapter).attribute(inputs, target=target)
        smooth = NoiseTunnel(Saliency(adapter)).attribute(inputs, target=target, nt_samples=2, stdevs=0.05)
        for attributions in (chefer, ig, saliency, smooth):
            assert attributions[0].shape == inputs[0].shape
            assert adapter.to_feature_dict(attributions)["image"].shape == (4, 4)
        comparison = compare_methods(
            adapter, batch, [CheferAttribution(adapter), Saliency(adapter)], baseline="zero", progress=False
        )
        records = adapter.visualization_records(batch, chefer, method="Chefer")
    figure, _ = viz.visualize_image_attr(
        chefer[0][0].permute(1, 2, 0).numpy(), inputs[0][0].permute(1, 2, 0).numpy(),
        method="blended_heat_map", sign="positive", use_pyplot=False,
    )
    assert figure is not None
    with pytest.raises(ValueError, match="'zero' or 'blur'"):
        adapter.baselines(inputs, args, "unk")
    assert comparison.scores["Chefer"]["image"].shape == (4, 4)
    assert [t.text for t in adapter.decode(batch)[0]] == ["patch 0,0", "patch 0,1", "patch 1,0", "patch 1,1"]
    assert len(records) == 4 and records[0].raw_input_ids[0] == "patch 0,0"
    assert records[1].true_class == "1" and records[1].attr_class == str(int(target[1])) + " (Chefer)"


@pytest.fixture
def two_block_vit(vit_model):
    with shrunk(vit_model, 2, zero_positions=False) as model:
        yield model


def test_vit_concurrent_calls_equal_sequential(two_block_vit, images):
    """Four threads mix Chefer and Saliency on one shared model; each gets exactly its sequential result."""
    adapter = PyHealthAdapter(two_block_vit)
    batch = batch_of(images)
    jobs = [("chefer", 0), ("saliency", 1), ("chefer", 2), ("saliency", 0)] * 2

    def run(job):
        name, target = job
        # inputs of its own per call: Saliency sets and resets requires_grad on the tensors it is given
        inputs = tuple(x.clone() for x in adapter.captum_inputs(batch)[0])
        method = CheferAttribution(adapter) if name == "chefer" else Saliency(adapter)
        return method.attribute(inputs, target=target)[0]

    sequential = [run(job) for job in jobs]
    results: dict = {}
    barrier = threading.Barrier(4)

    def worker(k):
        barrier.wait()
        for j in range(k, len(jobs), 4):
            results[j] = run(jobs[j])

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for j, expected in enumerate(sequential):
        assert torch.equal(results[j], expected), jobs[j]


def test_other_torchvision_models_are_refused_with_the_supported_ones(images):
    from pyhealth.models import TorchvisionModel

    with quiet_pyhealth():
        resnet = TorchvisionModel(images, "resnet18", {"weights": None})
    with pytest.raises(ValueError, match=r"ViT variants \(vit_b_16.*'resnet18'.*IntegratedGradients"):
        PyHealthAdapter(resnet)


# ---------------------------------------------------------------------------------------------- TransformersModel


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """TransformersModel on a tiny BERT saved with its tokenizer into a local directory (no hub access)."""
    from pyhealth.datasets import create_sample_dataset
    from pyhealth.models import TransformersModel

    directory = tmp_path_factory.mktemp("tiny-bert")
    save_tiny_bert(directory, layers=3)
    samples = [{"patient_id": f"p{i}", "text": text, "label": i % 3} for i, text in enumerate(TEXTS)]
    with quiet_pyhealth():
        dataset = create_sample_dataset(
            samples=samples, input_schema={"text": "text"}, output_schema={"label": "multiclass"},
            dataset_name="notes",
        )
        model = TransformersModel(dataset=dataset, model_name=str(directory))
    return model.eval(), dataset


def eager_text_reference(model, batch, target):
    twin = copy.deepcopy(model).eval()
    twin.model.set_attn_implementation("eager")
    encoding = twin.tokenizer(batch["text"], return_tensors="pt", padding=True, truncation=True, max_length=256)
    output = twin.model(**encoding, output_attentions=True)
    maps = list(output.attentions)
    for attention in maps:
        attention.retain_grad()
    logits = twin.fc(twin.dropout(output.pooler_output))
    rows = independent_rows(logits, maps, target, torch.zeros(len(target), dtype=torch.long))
    return rows * encoding["attention_mask"], logits.detach()


def test_text_model_equals_the_eager_computation(text_model):
    model, dataset = text_model
    assert model.model.config._attn_implementation == "sdpa"
    batch = batch_of(dataset)
    adapter = PyHealthAdapter(model)
    tokens, args = adapter.captum_inputs(batch, level="token")
    embeddings, _ = adapter.captum_inputs(batch)
    encoding = model.tokenizer(batch["text"], return_tensors="pt", padding=True, truncation=True, max_length=256)
    assert torch.equal(tokens[0], encoding["input_ids"]) and torch.equal(args[0], encoding["attention_mask"])
    assert embeddings[0].shape == (*tokens[0].shape, 16)
    target = torch.tensor([2, 0, 1, 1])
    (by_token,) = CheferAttribution(adapter).attribute(tokens, target=target, additional_forward_args=args)
    (by_embedding,) = CheferAttribution(adapter).attribute(embeddings, target=target, additional_forward_args=args)
    expected, logits = eager_text_reference(model, batch, target)
    with torch.no_grad():
        torch.testing.assert_close(adapter(*tokens, *args), logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(adapter(*embeddings, *args), logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(adapter(*tokens, *args).softmax(1), model(**batch)["y_prob"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(by_token, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(adapter.to_feature_dict(by_embedding)["text"], expected, atol=1e-5, rtol=1e-4)
    assert model.model.config._attn_implementation == "sdpa" and not model.training


def test_text_model_methods_records_and_removal(text_model):
    model, dataset = text_model
    batch = batch_of(dataset)
    adapter = PyHealthAdapter(model)
    _, args = adapter.captum_inputs(batch)
    tokens, _ = adapter.captum_inputs(batch, level="token")
    target = adapter.captum_target(batch)
    assert torch.equal(adapter.captum_target(batch, mode="label"), batch["label"].view(-1))
    (unk,) = adapter.baselines(tokens, args, "unk")
    assert (unk[args[0].bool()] == model.tokenizer.unk_token_id).all()
    lig = LayerIntegratedGradients(adapter, adapter.embedding_layers).attribute(
        tokens, baselines=(unk,), target=target, additional_forward_args=args, n_steps=16
    )
    assert adapter.to_feature_dict(lig)["text"].shape == tokens[0].shape
    comparison = compare_methods(
        adapter, batch, [CheferAttribution(adapter), Saliency(adapter), IntegratedGradients(adapter)], progress=False
    )
    assert set(comparison.methods) == {"Chefer", "Saliency", "Integrated Gradients"}
    records = adapter.visualization_records(batch, comparison.scores["Chefer"], method="Chefer")
    assert records[0].raw_input_ids == ["[CLS]", "fever", "cough", "rash", "[SEP]"]
    assert records[0].true_class == "0"
    keep = {"text": torch.zeros_like(tokens[0], dtype=torch.bool)}
    keep["text"][:, :2] = True
    (_,), kept_args = adapter.remove_tokens(tokens, args, keep)
    assert torch.equal(kept_args[0][:, :2], args[0][:, :2]) and not kept_args[0][:, 2:].any()


def test_an_unknown_layernorm_mode_is_refused_for_images_too(two_block_vit, images):
    adapter = PyHealthAdapter(two_block_vit)
    inputs, args = adapter.captum_inputs(batch_of(images))
    with pytest.raises(ValueError, match="layernorm must be 'exact' or 'detach', got 'fixed'"):
        adapter.attention_forward(inputs, args, layernorm="fixed")
