"""Unit tests of ``captum_chefer.adapters.pyhealth`` (``PyHealthAdapter`` and its helpers): exact error messages,
defaults checked through behaviour, devices (the ``meta`` device stands in for an accelerator: it runs no kernel, so
a tensor left on the CPU shows), dtypes, and small results worked out by hand from tiny synthetic datasets whose
vocabularies are known (PyHealth numbers codes in order of appearance after ``<pad>`` 0 and ``<unk>`` 1).
Image and text models (``TorchvisionModel``, ``TransformersModel``) are built here without downloads."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from captum_chefer import PyHealthAdapter
from captum_chefer.adapters import pyhealth as pyhealth_adapter
from captum_chefer.adapters.pyhealth import FeatureSpec
from captum_chefer.layernorm import FixedScaleLayerNorm
from captum_chefer.synthetic import quiet_pyhealth
from tests.conftest import TEXTS, first_batch, make_dataset, make_model, save_tiny_bert


def exact(message: str) -> str:
    """A ``match=`` pattern that accepts ``message`` only, whole."""
    return "^" + re.escape(message) + "$"


def dataset(samples: list[dict], schema: dict[str, str], label: str = "binary", name: str = "units"):
    from pyhealth.datasets import create_sample_dataset

    with quiet_pyhealth():
        return create_sample_dataset(samples=samples, input_schema=schema, output_schema={"label": label},
                                     dataset_name=name)


def samples(column: str, values: list, labels: list) -> list[dict]:
    pairs = enumerate(zip(values, labels, strict=True))
    return [{"patient_id": f"p{i}", "visit_id": "v", column: v, "label": y} for i, (v, y) in pairs]


# Three samples of one flat stream: vocabulary <pad> 0, <unk> 1, A 2, B 3, C 4 (5 codes).
FLAT = [["A", "B"], ["C"], ["B", "A", "C"]]
FLAT_IDS = torch.tensor([[2, 3, 0], [4, 0, 0], [3, 2, 4]])


@pytest.fixture(scope="module")
def seq():
    """A two-layer, two-head Transformer on a flat (``conditions`` [6, 7]) and a nested (``procedures`` [6, 4, 3])
    stream, binary; and its first batch of six samples."""
    data = make_dataset("sequence")
    return make_model(data), first_batch(data)


@pytest.fixture(scope="module")
def seq3():
    """The same with three classes."""
    data = make_dataset("sequence", n_classes=3)
    return make_model(data), first_batch(data)


@pytest.fixture(scope="module")
def stage():
    """A StageAttentionNet on two flat stagenet streams: ``codes`` with times [6, 7], ``labs`` without [6, 4]."""
    data = make_dataset("stagenet")
    return make_model(data, "stagenet"), first_batch(data)


@pytest.fixture(scope="module")
def flat():
    """A one-layer Transformer on the one flat stream FLAT, binary; and the batch of its three samples."""
    data = dataset(samples("conditions", FLAT, [0, 1, 0]), {"conditions": "sequence"}, name="flat")
    model = make_model(data, layers=1)
    batch = first_batch(data, batch_size=3)
    assert torch.equal(batch["conditions"], FLAT_IDS)
    return model, batch


@pytest.fixture(scope="module")
def nested_stage():
    """A StageAttentionNet on one nested stagenet stream without times: ``visits`` [3, 3, 3]."""
    visits = [[["A", "B"], ["C"]], [["B"]], [["C", "A", "B"], ["A"], ["B"]]]
    data = dataset(samples("visits", [(None, v) for v in visits], [0, 1, 0]), {"visits": "stagenet"}, name="visits")
    return make_model(data, "stagenet", heads=1), first_batch(data, batch_size=3)


def fresh(data_and_batch, kind: str = "transformer"):
    """A new model of the fixture's kind on the same dataset (for tests that change the model)."""
    model, batch = data_and_batch
    return make_model(model.dataset, kind, layers=model.num_layers if kind == "transformer" else 2), batch


# the tokenizer's vocabulary: [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4, then WORDS from 5


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """Two TransformersModels on a tiny BERT saved locally: ``{"multiclass": (model, batch), "binary": ...}``."""
    from pyhealth.models import TransformersModel

    directory = tmp_path_factory.mktemp("tiny-bert")
    save_tiny_bert(directory, layers=2)
    out = {}
    for kind, labels in [("multiclass", [0, 1, 2, 1]), ("binary", [0, 1, 0, 1])]:
        data = dataset(samples("text", TEXTS, labels), {"text": "text"}, kind, name=f"notes-{kind}")
        with quiet_pyhealth():
            model = TransformersModel(dataset=data, model_name=str(directory)).eval()
        out[kind] = (model, first_batch(data, batch_size=4))
    return out


@pytest.fixture(scope="module")
def vit():
    """TorchvisionModel("vit_b_16") on two 32x32 images (2x2 patches of 16 pixels), random weights."""
    from pyhealth.models import TorchvisionModel

    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 32, 32, generator=generator).tolist() for _ in range(2)]
    data = dataset(samples("image", images, [0, 1]), {"image": "tensor"}, name="images")
    torch.manual_seed(0)
    with quiet_pyhealth():
        model = TorchvisionModel(data, "vit_b_16", {"weights": None, "image_size": 32}).eval()
    return model, first_batch(data, batch_size=2)


def on_meta(data_and_batch, kind: str = "transformer"):
    """A fresh model of the fixture's kind moved to the ``meta`` device, its adapter, and the batch (on the CPU)."""
    model, batch = fresh(data_and_batch, kind)
    adapter = PyHealthAdapter(model)
    return model.to("meta"), adapter, batch


# -------------------------------------------------------------------------------------------- __init__


def test_init_refuses_an_adapter_as_the_model(flat):
    adapter = PyHealthAdapter(flat[0])
    with pytest.raises(TypeError, match=exact(
        "model is already a PyHealthAdapter; pass it to the attribution method directly"
    )):
        PyHealthAdapter(adapter)


def test_init_refuses_a_module_that_is_not_a_pyhealth_model():
    with pytest.raises(TypeError, match=exact(
        "PyHealthAdapter needs a PyHealth model (pyhealth.models.BaseModel), got Linear. "
        "Train a pyhealth.models.Transformer or StageAttentionNet, or give Captum your own forward function."
    )):
        PyHealthAdapter(nn.Linear(2, 2))


def test_init_refuses_a_model_with_two_label_keys(flat, monkeypatch):
    monkeypatch.setattr(flat[0], "label_keys", ["label", "other"])
    with pytest.raises(ValueError, match=exact(
        "PyHealthAdapter supports models with one label key, got ['label', 'other']"
    )):
        PyHealthAdapter(flat[0])


def test_init_of_a_text_model_has_no_code_features_and_pools_the_first_token(text):
    adapter = PyHealthAdapter(text["multiclass"][0])  # TransformersModel has no forward_from_embedding: not refused
    assert adapter.features == ()
    assert adapter.pooling == "first"
    assert adapter.feature_keys == ["text"] and adapter.label_key == "label"


# -------------------------------------------------------------------------------------------- _describe_feature


def test_features_describe_each_stream(seq, stage, nested_stage):
    assert PyHealthAdapter(seq[0]).features == (
        FeatureSpec("conditions", 2, False, 0, None, 0), FeatureSpec("procedures", 3, False, 0, None, 0),
    )
    # stagenet batches are (time, codes) tuples: codes at 1, times at 0
    assert PyHealthAdapter(stage[0]).features == (
        FeatureSpec("codes", 2, True, 1, 0, 0), FeatureSpec("labs", 2, True, 1, 0, 0),
    )
    assert PyHealthAdapter(nested_stage[0]).features == (FeatureSpec("visits", 3, True, 1, 0, 0),)


def test_pad_id_is_the_vocabularys_pad_entry(seq, monkeypatch):
    monkeypatch.setitem(seq[0].dataset.input_processors["conditions"].code_vocab, "<pad>", 5)
    assert PyHealthAdapter(seq[0]).pad_ids == (5, 0)


def test_pad_id_is_zero_without_a_pad_entry(seq, monkeypatch):
    monkeypatch.delitem(seq[0].dataset.input_processors["conditions"].code_vocab, "<pad>")
    assert PyHealthAdapter(seq[0]).pad_ids == (0, 0)


def test_pad_id_is_zero_without_a_vocabulary(seq, monkeypatch):
    monkeypatch.delattr(seq[0].dataset.input_processors["conditions"], "code_vocab")
    assert PyHealthAdapter(seq[0]).pad_ids == (0, 0)


def test_a_stagenet_processor_without_its_nested_flag_is_flat(stage, monkeypatch):
    monkeypatch.delattr(stage[0].dataset.input_processors["codes"], "_is_nested")
    assert PyHealthAdapter(stage[0]).features[0].token_dims == 2


class OtherProcessor:
    def schema(self) -> tuple[str, ...]:
        return ("value",)


def test_describe_refuses_a_feature_that_is_not_codes(flat, monkeypatch):
    monkeypatch.setitem(flat[0].dataset.input_processors, "conditions", OtherProcessor())
    with pytest.raises(ValueError, match=exact(
        "feature 'conditions' uses OtherProcessor; PyHealthAdapter supports code features "
        "('sequence', 'nested_sequence', 'stagenet' codes)."
    )):
        PyHealthAdapter(flat[0])


NO_EMBEDDING_MODEL = (
    "Transformer has no embedding_model, which PyHealthAdapter needs to embed the codes of feature 'conditions'; "
    "use a PyHealth model built on pyhealth.models.EmbeddingModel (Transformer, StageAttentionNet)"
)


def test_describe_refuses_a_model_whose_embedding_model_is_none(flat):
    model, _ = fresh(flat)
    model.embedding_model = None
    with pytest.raises(TypeError, match=exact(NO_EMBEDDING_MODEL)):
        PyHealthAdapter(model)


def test_describe_refuses_a_model_without_embedding_model(flat):
    model, _ = fresh(flat)
    del model.embedding_model
    with pytest.raises(TypeError, match=exact(NO_EMBEDDING_MODEL)):
        PyHealthAdapter(model)


# -------------------------------------------------------------------------------------------- _default_pooling


def test_stageattentionnet_pools_the_last_step(stage):
    assert PyHealthAdapter(stage[0]).pooling == "last"


# -------------------------------------------------------------------------------------------- captum_inputs


def test_captum_inputs_of_a_text_model_are_the_tokenizers(text):
    model, batch = text["multiclass"]
    adapter = PyHealthAdapter(model)
    (ids,), args = adapter.captum_inputs(batch, level="token")
    mask = args[0]
    # [CLS] fever cough rash [SEP] / [CLS] no history of chest pain [SEP] / [CLS] sepsis [SEP] /
    # [CLS] stable chest [SEP]
    assert torch.equal(ids, torch.tensor([
        [2, 5, 6, 7, 3, 0, 0], [2, 9, 10, 11, 12, 8, 3], [2, 13, 3, 0, 0, 0, 0], [2, 14, 12, 3, 0, 0, 0],
    ]))
    assert torch.equal(mask, (ids != 0).long())
    (embedded,), _ = adapter.captum_inputs(batch)
    torch.testing.assert_close(embedded, model.model.get_input_embeddings().weight[ids])


def test_captum_inputs_land_on_the_models_device(seq, stage, nested_stage):
    for fixture, kind in [(seq, "transformer"), (stage, "stagenet"), (nested_stage, "stagenet")]:
        _, adapter, batch = on_meta(fixture, kind)
        for level in ("token", "embedding"):
            inputs, args = adapter.captum_inputs(batch, level=level)
            assert {t.device.type for t in inputs + args} == {"meta"}, level


def test_captum_inputs_give_ones_for_missing_times_of_nested_visits(nested_stage):
    _, (mask, times) = PyHealthAdapter(nested_stage[0]).captum_inputs(nested_stage[1], level="token")
    assert torch.equal(times, torch.ones(3, 3))  # one per visit [B, V], not per code
    assert torch.equal(mask, nested_stage[1]["visits"][1] != 0)


# -------------------------------------------------------------------------------------------- captum_target


def test_captum_target_labels_land_on_the_models_device(seq3):
    _, adapter, batch = on_meta(seq3)
    target = adapter.captum_target(batch, mode="label")
    assert target.device.type == "meta" and target.dtype == torch.long and target.shape == (6,)


def test_captum_target_of_a_binary_text_model_is_none_for_a_valid_batch_only(text):
    model, batch = text["binary"]
    adapter = PyHealthAdapter(model)
    assert adapter.captum_target(batch) is None
    with pytest.raises(KeyError, match=re.escape(
        "the batch has no feature 'text'; the model needs ['text'], the batch has ['label', 'patient_id']"
    )):
        adapter.captum_target({"patient_id": batch["patient_id"], "label": batch["label"]})


def test_captum_target_predicts_from_the_code_ids(seq3):
    """The predicted class is the model's own on the batch (``model(**batch)``), which embeds the padding codes of a
    visit too: made visible here by a padding embedding far from zero."""
    model, batch = fresh(seq3)
    torch.manual_seed(5)
    with torch.no_grad():
        model.embedding_model.embedding_layers["procedures"].weight[0] = 40 * torch.randn(16)
        expected = model(**batch)["logit"].argmax(dim=1)
    assert torch.equal(PyHealthAdapter(model).captum_target(batch), expected)


# -------------------------------------------------------------------------------------------- to_feature_dict


def test_to_feature_dict_of_a_text_model(text):
    adapter = PyHealthAdapter(text["multiclass"][0])
    attributions = torch.arange(24.0).reshape(1, 3, 8)
    scores = adapter.to_feature_dict((attributions,))
    assert torch.equal(scores["text"], torch.tensor([[28.0, 92.0, 156.0]]))  # 0+...+7, 8+...+15, 16+...+23


def test_to_feature_dict_takes_a_bare_tensor_for_one_feature(flat):
    adapter = PyHealthAdapter(flat[0])
    attributions = torch.ones(3, 3, 4)
    assert torch.equal(adapter.to_feature_dict(attributions)["conditions"], torch.full((3, 3), 4.0))


def test_to_feature_dict_refuses_attributions_of_another_rank(seq):
    adapter = PyHealthAdapter(seq[0])
    with pytest.raises(ValueError, match=exact(
        "attributions for 'procedures' have shape (6, 4); expected 3 dims (codes) or 4 (embeddings)"
    )):
        adapter.to_feature_dict((torch.zeros(6, 7), torch.zeros(6, 4)))


# -------------------------------------------------------------------------------------------- baselines


def test_baselines_default_to_the_unknown_code(flat):
    adapter = PyHealthAdapter(flat[0])
    tokens, args = adapter.captum_inputs(flat[1], level="token")
    (baseline,) = adapter.baselines(tokens, args)
    assert torch.equal(baseline, torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]]))  # <unk> 1 on real codes


def test_zero_baselines_are_padding_ids_and_zero_embeddings(flat):
    adapter = PyHealthAdapter(flat[0])
    tokens, args = adapter.captum_inputs(flat[1], level="token")
    assert torch.equal(adapter.baselines(tokens, args, "zero")[0], torch.zeros(3, 3, dtype=torch.long))
    (embedded,), _ = adapter.captum_inputs(flat[1])
    noisy = embedded + 1.0  # padding positions hold 1.0 now, and keep it
    (baseline,) = adapter.baselines((noisy,), args, "zero")
    expected = torch.ones(3, 3, 16)
    expected[FLAT_IDS != 0] = 0.0
    assert torch.equal(baseline, expected)


@pytest.mark.parametrize("reference", ["unk", "zero"])
def test_baselines_keep_the_inputs_dtype(flat, reference):
    adapter = PyHealthAdapter(flat[0])
    (embedded,), args = adapter.captum_inputs(flat[1])
    (baseline,) = adapter.baselines((embedded.to(torch.bfloat16),), args, reference)
    assert baseline.dtype == torch.bfloat16


def test_baselines_refuse_an_unknown_reference(flat):
    adapter = PyHealthAdapter(flat[0])
    tokens, args = adapter.captum_inputs(flat[1], level="token")
    with pytest.raises(ValueError, match=exact("reference must be 'unk' or 'zero', got 'pad'")):
        adapter.baselines(tokens, args, "pad")


def test_baselines_refuse_a_wrong_number_of_inputs(seq):
    adapter = PyHealthAdapter(seq[0])
    tokens, args = adapter.captum_inputs(seq[1], level="token")
    message = exact("expected 2 input tensors (one per feature key ['conditions', 'procedures']); "
                    "make them with adapter.captum_inputs(batch)")
    with pytest.raises(ValueError, match=message):
        adapter.baselines(tokens[:1], args)
    with pytest.raises(ValueError, match=message):
        adapter.baselines((tokens[0], tokens[1].tolist()), args)


def test_baselines_take_a_bare_tensor_for_one_feature(flat):
    adapter = PyHealthAdapter(flat[0])
    (ids,), args = adapter.captum_inputs(flat[1], level="token")
    assert torch.equal(adapter.baselines(ids, args, "zero")[0], torch.zeros(3, 3, dtype=torch.long))


def test_baselines_refuse_inputs_shaped_unlike_their_masks(flat):
    adapter = PyHealthAdapter(flat[0])
    (embedded,), args = adapter.captum_inputs(flat[1])
    with pytest.raises(ValueError, match=exact(
        "input for 'conditions' has shape (3, 2, 16) but its mask is (3, 3); "
        "pass inputs and additional_forward_args from the same adapter.captum_inputs call"
    )):
        adapter.baselines((embedded[:, :2],), args)
    with pytest.raises(ValueError, match=exact(
        "token input for 'conditions' has shape (3, 2) but its mask is (3, 3)"
    )):
        adapter.baselines((FLAT_IDS[:, :2],), args)


def test_unk_baseline_is_the_vocabularys_unk_entry(flat, monkeypatch):
    adapter = PyHealthAdapter(flat[0])
    tokens, args = adapter.captum_inputs(flat[1], level="token")
    monkeypatch.setitem(flat[0].dataset.input_processors["conditions"].code_vocab, "<unk>", 4)
    assert torch.equal(adapter.baselines(tokens, args, "unk")[0], torch.tensor([[4, 4, 0], [4, 0, 0], [4, 4, 4]]))


def test_unk_baseline_is_one_without_an_unk_entry(flat, monkeypatch):
    adapter = PyHealthAdapter(flat[0])
    tokens, args = adapter.captum_inputs(flat[1], level="token")
    monkeypatch.delitem(flat[0].dataset.input_processors["conditions"].code_vocab, "<unk>")
    assert torch.equal(adapter.baselines(tokens, args, "unk")[0], torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]]))


def test_unk_baseline_is_one_without_a_vocabulary(flat, monkeypatch):
    adapter = PyHealthAdapter(flat[0])
    tokens, args = adapter.captum_inputs(flat[1], level="token")
    monkeypatch.delattr(flat[0].dataset.input_processors["conditions"], "code_vocab")
    assert torch.equal(adapter.baselines(tokens, args, "unk")[0], torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]]))


@pytest.mark.parametrize("reference", ["unk", "zero"])
def test_baselines_land_on_the_inputs_device(flat, reference):
    _, adapter, batch = on_meta(flat)
    inputs, _ = adapter.captum_inputs(batch)
    cpu_args = (FLAT_IDS != 0,)  # masks on the CPU, inputs on the model's device
    (baseline,) = adapter.baselines(inputs, cpu_args, reference)
    assert baseline.device.type == "meta" and baseline.shape == (3, 3, 16)


def test_baselines_of_a_text_model(text):
    model, batch = text["multiclass"]
    adapter = PyHealthAdapter(model)
    tokens, args = adapter.captum_inputs(batch, level="token")
    (baseline,) = adapter.baselines(tokens, args, "mask")
    expected = torch.where(args[0].bool(), torch.tensor(4), torch.tensor(0))  # [MASK] 4 on real tokens, [PAD] 0
    assert torch.equal(baseline, expected)


# -------------------------------------------------------------------------------------------- remove_tokens


def test_remove_tokens_compacts_by_default(flat):
    adapter = PyHealthAdapter(flat[0])
    tokens, args = adapter.captum_inputs(flat[1], level="token")
    keep = {"conditions": torch.tensor([[False, True, True], [True, True, True], [True, False, True]])}
    (ids,), (mask,) = adapter.remove_tokens(tokens, args, keep)
    # kept codes move to the front in their order: [3, 0, 0], [4, 0, 0], [3, 4, 0]
    assert torch.equal(ids, torch.tensor([[3, 0, 0], [4, 0, 0], [3, 4, 0]]))
    assert torch.equal(mask, ids != 0)
    (ids,), (mask,) = adapter.remove_tokens(tokens, args, keep, compact=False)
    assert torch.equal(ids, torch.tensor([[0, 3, 0], [4, 0, 0], [3, 0, 4]]))


def test_remove_tokens_keeps_the_order_of_many_kept_codes(flat):
    """A long stream: the kept codes stay in their order (a stable sort; an unstable one reorders them here)."""
    adapter = PyHealthAdapter(flat[0])
    n = 2400
    ids = (torch.arange(n) % 3 + 2).unsqueeze(0)  # 2, 3, 4, 2, 3, 4, ...
    keep = {"conditions": (torch.arange(n) % 2 == 1).unsqueeze(0)}  # every second code
    (out,), (mask,) = adapter.remove_tokens((ids,), (torch.ones(1, n, dtype=torch.bool),), keep)
    assert torch.equal(out[0, : n // 2], ids[0, 1::2]) and not out[0, n // 2:].any()
    assert mask[0, : n // 2].all() and not mask[0, n // 2:].any()


def test_remove_tokens_of_three_streams(flat):
    data = dataset(
        [{"patient_id": f"p{i}", "visit_id": "v", "a": FLAT[i], "b": FLAT[2 - i], "c": FLAT[i][:1], "label": i % 2}
         for i in range(3)],
        {"a": "sequence", "b": "sequence", "c": "sequence"}, name="three",
    )
    model, batch = make_model(data, layers=1), first_batch(data, batch_size=3)
    adapter = PyHealthAdapter(model)
    tokens, args = adapter.captum_inputs(batch, level="token")
    keep = {key: torch.ones_like(t, dtype=torch.bool) for key, t in zip("abc", tokens, strict=True)}
    keep["c"][0] = False  # the first sample loses its only code of c
    new_tokens, new_args = adapter.remove_tokens(tokens, args, keep)
    for key, t, m in zip("abc", new_tokens, new_args, strict=True):
        assert torch.equal(m, t != 0), key
    assert torch.equal(new_args[0], args[0]) and torch.equal(new_args[1], args[1])
    assert torch.equal(new_args[2], torch.tensor([[False], [True], [True]]))


def test_remove_tokens_moves_keep_to_the_tokens_device(flat):
    _, adapter, batch = on_meta(flat)
    tokens, args = adapter.captum_inputs(batch, level="token")
    (ids,), (mask,) = adapter.remove_tokens(tokens, args, {"conditions": torch.ones(3, 3, dtype=torch.bool)})
    assert ids.device.type == "meta" and mask.device.type == "meta"


def test_remove_tokens_of_a_text_model(text):
    model, batch = text["multiclass"]
    adapter = PyHealthAdapter(model)
    tokens, args = adapter.captum_inputs(batch, level="token")
    keep = {"text": torch.ones(4, 7, dtype=torch.bool)}
    keep["text"][:, 1] = False  # the first word of each text
    (ids,), (mask, *_) = adapter.remove_tokens(tokens, args, keep, compact=True)
    assert torch.equal(ids, torch.tensor([
        [2, 6, 7, 3, 0, 0, 0], [2, 10, 11, 12, 8, 3, 0], [2, 3, 0, 0, 0, 0, 0], [2, 12, 3, 0, 0, 0, 0],
    ]))
    assert torch.equal(mask, (ids != 0).long())
    (ids,), (mask, *_) = adapter.remove_tokens(tokens, args, keep, compact=False)
    assert torch.equal(ids, torch.tensor([
        [2, 0, 6, 7, 3, 0, 0], [2, 0, 10, 11, 12, 8, 3], [2, 0, 3, 0, 0, 0, 0], [2, 0, 12, 3, 0, 0, 0],
    ]))
    assert torch.equal(mask, (ids != 0).long())


# -------------------------------------------------------------------------------------------- decode, _code_names


def test_decode_of_one_flat_stream(flat):
    decoded = PyHealthAdapter(flat[0]).decode(flat[1])
    assert [[(t.feature, t.text, t.index) for t in sample] for sample in decoded] == [
        [("conditions", "A", (0,)), ("conditions", "B", (1,))],
        [("conditions", "C", (0,))],
        [("conditions", "B", (0,)), ("conditions", "A", (1,)), ("conditions", "C", (2,))],
    ]


def test_decode_of_nested_visits_shows_the_visit_and_keeps_the_code_apart(seq):
    model, batch = seq
    adapter = PyHealthAdapter(model)
    (_, procedures), _ = adapter.captum_inputs(batch, level="token")
    names = {i: c for c, i in model.dataset.input_processors["procedures"].code_vocab.items()}
    nested = [(i, t) for i, sample in enumerate(adapter.decode(batch)) for t in sample if t.feature == "procedures"]
    assert len(nested) == int((procedures != 0).sum()) > 0
    for i, token in nested:
        assert token.code == names[int(procedures[(i, *token.index)])]  # the vocabulary's spelling
        assert token.text == f"v{token.index[0] + 1}:{token.code}"  # visit 1-based for display, index 0-based
    flat_tokens = [t for sample in adapter.decode(batch) for t in sample if t.feature == "conditions"]
    assert flat_tokens and all(t.code == t.text for t in flat_tokens)


def test_decode_shows_ids_missing_from_the_vocabulary(flat, monkeypatch):
    adapter = PyHealthAdapter(flat[0])
    monkeypatch.delitem(flat[0].dataset.input_processors["conditions"].code_vocab, "B")
    assert [t.text for t in adapter.decode(flat[1])[0]] == ["A", "#3"]


def test_decode_without_a_vocabulary_shows_ids(flat, monkeypatch):
    adapter = PyHealthAdapter(flat[0])
    monkeypatch.delattr(flat[0].dataset.input_processors["conditions"], "code_vocab")
    assert [t.text for t in adapter.decode(flat[1])[2]] == ["#3", "#2", "#4"]


def test_decode_of_a_text_model(text):
    model, batch = text["multiclass"]
    decoded = PyHealthAdapter(model).decode(batch)
    assert [t.text for t in decoded[2]] == ["[CLS]", "sepsis", "[SEP]"]
    assert [t.text for t in decoded[3]] == ["[CLS]", "stable", "chest", "[SEP]"]


# -------------------------------------------------------------------------------------------- class_names, true_classes


def test_class_names_without_a_label_vocabulary_are_empty(flat, monkeypatch):
    monkeypatch.delattr(flat[0].dataset.output_processors["label"], "label_vocab")
    assert PyHealthAdapter(flat[0]).class_names() == {}


@pytest.fixture(scope="module")
def multilabel():
    """Labels sorted into the vocabulary: L0 0, L1 1, L2 2."""
    data = dataset(samples("conditions", FLAT, [["L1", "L0"], ["L2"], ["L0", "L2"]]), {"conditions": "sequence"},
                   "multilabel", name="multilabel")
    return make_model(data, layers=1), first_batch(data, batch_size=3)


@pytest.fixture(scope="module")
def named_classes():
    """Labels sorted into the vocabulary: high 0, low 1, mid 2."""
    data = dataset(samples("conditions", FLAT, ["low", "high", "mid"]), {"conditions": "sequence"},
                   "multiclass", name="named")
    return make_model(data, layers=1), first_batch(data, batch_size=3)


def test_true_classes_of_a_multilabel_model(multilabel, monkeypatch):
    adapter = PyHealthAdapter(multilabel[0])
    assert adapter.true_classes(multilabel[1]) == ["L0,L1", "L2", "L0,L2"]
    monkeypatch.delitem(multilabel[0].dataset.output_processors["label"].label_vocab, "L2")
    assert adapter.true_classes(multilabel[1]) == ["L0,L1", "2", "L0,2"]


def test_true_classes_of_a_multiclass_model(named_classes, monkeypatch):
    adapter = PyHealthAdapter(named_classes[0])
    assert adapter.true_classes(named_classes[1]) == ["low", "high", "mid"]
    monkeypatch.delitem(named_classes[0].dataset.output_processors["label"].label_vocab, "mid")
    assert adapter.true_classes(named_classes[1]) == ["low", "high", "2"]


# -------------------------------------------------------------------------------------------- probabilities


def test_probabilities_of_a_binary_model_are_sigmoids(flat):
    probabilities = PyHealthAdapter(flat[0]).probabilities(torch.tensor([[0.0], [2.0]]))
    torch.testing.assert_close(probabilities, torch.tensor([[0.5], [1 / (1 + math.exp(-2.0))]]))


# -------------------------------------------------------------------------------------------- _read_batch


def test_read_batch_refuses_a_batch_that_is_not_a_dict(flat):
    with pytest.raises(TypeError, match=exact("batch must be a dict from pyhealth.datasets.get_dataloader, got list")):
        PyHealthAdapter(flat[0]).captum_inputs([FLAT_IDS])


def test_read_batch_refuses_stagenet_codes_without_times(stage):
    batch = dict(stage[1], codes=stage[1]["codes"][1])
    with pytest.raises(TypeError, match=exact(
        "feature 'codes' must be a (time, codes) tuple as the stagenet processor makes it, got Tensor"
    )):
        PyHealthAdapter(stage[0]).captum_inputs(batch)


def test_read_batch_refuses_codes_that_are_not_ids(flat):
    adapter = PyHealthAdapter(flat[0])
    with pytest.raises(TypeError, match=exact(
        "feature 'conditions' must be a tensor of code ids, got Tensor of torch.float32"
    )):
        adapter.captum_inputs({"conditions": FLAT_IDS.float()})
    with pytest.raises(TypeError, match=exact("feature 'conditions' must be a tensor of code ids, got list")):
        adapter.captum_inputs({"conditions": FLAT_IDS.tolist()})


def test_read_batch_refuses_times_of_another_shape(stage, nested_stage):
    times, codes = stage[1]["codes"]
    adapter = PyHealthAdapter(stage[0])
    with pytest.raises(ValueError, match=exact(
        "times of 'codes' must be a tensor shaped (6, 7), got torch.Size([6, 6])"
    )):
        adapter.captum_inputs(dict(stage[1], codes=(times[:, :6], codes)))
    with pytest.raises(ValueError, match=exact("times of 'codes' must be a tensor shaped (6, 7), got list")):
        adapter.captum_inputs(dict(stage[1], codes=(times.tolist(), codes)))
    _, visits = nested_stage[1]["visits"]
    with pytest.raises(ValueError, match=exact(
        "times of 'visits' must be a tensor shaped (3, 3), got torch.Size([3, 3, 3])"
    )):
        PyHealthAdapter(nested_stage[0]).captum_inputs({"visits": (visits.float(), visits)})


def test_read_batch_refuses_an_empty_batch(flat):
    with pytest.raises(ValueError, match=exact("the batch is empty")):
        PyHealthAdapter(flat[0]).captum_inputs({"conditions": FLAT_IDS[:0]})


# -------------------------------------------------------------------------------------------- forward


def test_forward_of_a_text_model_gives_its_logits(text):
    model, batch = text["multiclass"]
    adapter = PyHealthAdapter(model)
    tokens, args = adapter.captum_inputs(batch, level="token")
    with torch.no_grad():
        torch.testing.assert_close(adapter(*tokens, *args).softmax(dim=1), model(**batch)["y_prob"])  # no "logit"


def test_forward_puts_each_model_in_evaluation_mode_even_inside_another_models_call(flat, seq):
    """An adapter called while another model's adapter runs (here from a hook of the first model) still runs its
    own model with dropout off."""
    outer_model, _ = fresh(flat)
    inner_model, inner_batch = fresh(seq)
    outer, inner = PyHealthAdapter(outer_model), PyHealthAdapter(inner_model.train())
    outer_inputs, outer_args = outer.captum_inputs(flat[1])
    inner_inputs, inner_args = inner.captum_inputs(inner_batch)
    seen = []
    inner_model.fc.register_forward_pre_hook(lambda module, args: seen.append(inner_model.training))

    def call_inner(module, args):
        inner(*inner_inputs, *inner_args)

    outer_model.fc.register_forward_pre_hook(call_inner)
    outer(*outer_inputs, *outer_args)
    assert seen == [False]
    assert inner_model.training


def test_calls_reuse_the_modules_read_when_wrapped(seq, monkeypatch):
    """Walking the module tree costs milliseconds: the adapter reads it once, when it is made."""
    model, batch = fresh(seq)
    adapter = PyHealthAdapter(model)
    inputs, args = adapter.captum_inputs(batch)

    def refuse():
        raise AssertionError("model.modules() walked during a call")

    monkeypatch.setattr(model, "modules", refuse)
    adapter(*inputs, *args)
    adapter.attention_forward(inputs, args)


# -------------------------------------------------------------------------------------------- split_inputs


def test_split_inputs_of_a_text_model(text):
    adapter = PyHealthAdapter(text["multiclass"][0])
    ids, mask = torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3)
    inputs, args = adapter.split_inputs((ids, mask))
    assert inputs == (ids,) and args == (mask,)


def test_split_inputs_refuses_a_wrong_count(seq):
    adapter = PyHealthAdapter(seq[0])
    tokens, args = adapter.captum_inputs(seq[1], level="token")
    with pytest.raises(ValueError, match=exact(
        "expected 2 input tensors (one per feature key ['conditions', 'procedures']) and 2 additional forward args "
        "(masks, times), got 3 tensors in all; make both with adapter.captum_inputs(batch)"
    )):
        adapter(*tokens, args[0])


# -------------------------------------------------------------------------------------------- token_masks


def test_token_masks_of_a_text_model(text):
    model, batch = text["multiclass"]
    adapter = PyHealthAdapter(model)
    tokens, args = adapter.captum_inputs(batch, level="token")
    (mask,) = adapter.token_masks(args, tokens)
    assert torch.equal(mask, tokens[0] != 0)


def test_token_masks_of_images_come_from_the_inputs(vit):
    model, batch = vit
    adapter = PyHealthAdapter(model)
    inputs, args = adapter.captum_inputs(batch)
    assert args == ()
    (mask,) = adapter.token_masks(args, inputs)
    assert torch.equal(mask, torch.ones(2, 4, dtype=torch.bool))  # 2x2 patches, all real


def test_token_masks_take_a_bare_mask_for_one_feature(flat):
    (mask,) = PyHealthAdapter(flat[0]).token_masks(FLAT_IDS != 0)
    assert torch.equal(mask, FLAT_IDS != 0)


def test_token_masks_refuse_a_wrong_count(seq):
    adapter = PyHealthAdapter(seq[0])
    _, args = adapter.captum_inputs(seq[1], level="token")
    with pytest.raises(ValueError, match=exact(
        "expected 2 additional forward args (per feature key its mask, then times for temporal features); "
        "make them with adapter.captum_inputs(batch)"
    )):
        adapter.token_masks(args[:1])


def test_token_masks_skip_the_times_of_temporal_features(stage):
    adapter = PyHealthAdapter(stage[0])
    _, args = adapter.captum_inputs(stage[1], level="token")
    masks = adapter.token_masks(args)
    assert torch.equal(masks[0], stage[1]["codes"][1] != 0) and torch.equal(masks[1], stage[1]["labs"][1] != 0)


# ------------------------------------------------------------------------------ _model_kwargs, _check_batch_sizes


def test_forward_refuses_a_mask_that_is_not_a_tensor(flat):
    adapter = PyHealthAdapter(flat[0])
    (embedded,), _ = adapter.captum_inputs(flat[1])
    with pytest.raises(TypeError, match=exact(
        "inputs and additional forward args must be tensors (feature 'conditions')"
    )):
        adapter(embedded, (FLAT_IDS != 0).tolist())


@pytest.mark.parametrize("mask, shape", [(torch.ones(3, dtype=torch.bool), "(3,)"), (torch.tensor(True), "()")])
def test_forward_refuses_a_mask_of_another_rank(flat, mask, shape):
    adapter = PyHealthAdapter(flat[0])
    (embedded,), _ = adapter.captum_inputs(flat[1])
    with pytest.raises(ValueError, match=exact(f"mask of 'conditions' must have 2 dims, got {shape}")):
        adapter(embedded, mask)


def test_forward_refuses_a_one_dimensional_mask_of_another_batch_size(flat):
    adapter = PyHealthAdapter(flat[0])
    (embedded,), _ = adapter.captum_inputs(flat[1])
    with pytest.raises(ValueError, match=exact(
        "inputs and additional_forward_args have different batch sizes (input 'conditions' 3, mask of 'conditions' 2); "
        "make them with one adapter.captum_inputs(batch) call and slice all of them together"
    )):
        adapter(embedded, torch.ones(2, dtype=torch.bool))


def test_forward_refuses_an_empty_batch(flat):
    adapter = PyHealthAdapter(flat[0])
    (embedded,), (mask,) = adapter.captum_inputs(flat[1])
    with pytest.raises(ValueError, match=exact("the inputs hold no samples (batch size 0); pass at least one sample")):
        adapter(embedded[:0], mask[:0])


def test_forward_refuses_embeddings_shaped_unlike_their_mask(flat):
    adapter = PyHealthAdapter(flat[0])
    (embedded,), (mask,) = adapter.captum_inputs(flat[1])
    with pytest.raises(ValueError, match=exact(
        "input for 'conditions' has shape (3, 2, 16) but its mask implies (3, 3, 16); "
        "inputs and additional_forward_args must come from the same captum_inputs call"
    )):
        adapter(embedded[:, :2], mask)


def test_forward_takes_masks_of_any_dtype(seq):
    adapter = PyHealthAdapter(seq[0])
    inputs, args = adapter.captum_inputs(seq[1])
    with torch.no_grad():
        expected = seq[0](**seq[1])["logit"]
        torch.testing.assert_close(adapter(*inputs, *(a.double() for a in args)), expected)


def test_step_masks_land_on_the_models_device(seq):
    """Token ids on the model's device, masks on the CPU: the pooled positions come back on the model's device.
    (The embedding layers lose ``num_embeddings`` so that no id range is read: a meta tensor holds no values.)"""
    model, batch = fresh(seq)
    adapter = PyHealthAdapter(model)
    tokens, args = adapter.captum_inputs(batch, level="token")
    for layer in model.embedding_model.embedding_layers.values():
        del layer.num_embeddings
    model.to("meta")
    out = adapter.attention_forward(tuple(t.to("meta") for t in tokens), args)
    assert {index.device.type for index in out.pool_index.values()} == {"meta"}


# -------------------------------------------------------------------------------------------- _check_embedding_input


def test_forward_refuses_code_ids_as_floats(flat):
    adapter = PyHealthAdapter(flat[0])
    (ids,), (mask,) = adapter.captum_inputs(flat[1], level="token")
    with pytest.raises(ValueError, match=exact(
        "the input for 'conditions' has the shape of its code ids (3, 3) but holds floats: a gradient method "
        "(e.g. IntegratedGradients) was given code ids, which it cannot differentiate. Give it the embeddings, "
        "adapter.captum_inputs(batch) (level='embedding', the default), or use "
        "LayerIntegratedGradients(adapter, adapter.embedding_layers) on the code ids"
    )):
        adapter(ids.float(), mask)


def test_forward_refuses_non_finite_embeddings(flat):
    adapter = PyHealthAdapter(flat[0])
    (embedded,), (mask,) = adapter.captum_inputs(flat[1])
    embedded = embedded.clone()
    embedded[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=exact(
        "the input for 'conditions' holds 1 NaN or infinite value(s); attributions of it would be NaN. Check what made "
        "the inputs (a model with NaN weights, a baseline or noise with NaN/inf), and pass the embeddings from "
        "adapter.captum_inputs(batch)"
    )):
        adapter(embedded, mask)


# -------------------------------------------------------------------------------------------- _check_code_ids


def test_code_ids_must_index_the_vocabulary(flat):
    adapter = PyHealthAdapter(flat[0])  # 5 codes
    for bad, shown in [(5, 5), (-1, -1)]:
        ids = FLAT_IDS.clone()
        ids[1, 1] = bad
        with pytest.raises(ValueError, match=exact(
            f"feature 'conditions' holds code id {shown}, outside the model's vocabulary of 5 codes (ids 0..4); "
            "encode the samples with the dataset the model was built on (its input processors), not another dataset's"
        )):
            adapter.captum_inputs({"conditions": ids})


def test_code_ids_are_not_checked_against_an_embedding_without_a_size(flat, monkeypatch):
    adapter = PyHealthAdapter(flat[0])
    monkeypatch.delattr(flat[0].embedding_model.embedding_layers["conditions"], "num_embeddings")
    (ids,), _ = adapter.captum_inputs(flat[1], level="token")
    assert torch.equal(ids, FLAT_IDS)


# -------------------------------------------------------------------------------------------- _transformer_mask


def test_a_sample_without_codes_attends_to_its_first_position(seq):
    """PyHealth's Transformer lets a sample whose stream is all padding attend to its first position; so does the
    adapter (``model(**batch)`` infers the same mask from the zero padding embeddings)."""
    model, batch = seq
    batch = dict(batch, conditions=batch["conditions"].clone())
    batch["conditions"][2] = 0
    adapter = PyHealthAdapter(model)
    tokens, args = adapter.captum_inputs(batch, level="token")
    with torch.no_grad():
        torch.testing.assert_close(adapter(*tokens, *args), model(**batch)["logit"])


# -------------------------------------------------------------------------------------------- require_attention


def test_require_attention_refuses_a_model_without_attention(flat):
    from pyhealth.models import MLP

    torch.manual_seed(0)
    with quiet_pyhealth():
        model = MLP(dataset=flat[0].dataset, embedding_dim=8)
    with pytest.raises(ValueError, match=exact(
        "MLP has no attention layers for Chefer relevance to propagate; use a pyhealth.models.Transformer or "
        "StageAttentionNet, or a gradient method such as IntegratedGradients"
    )):
        PyHealthAdapter(model).require_attention()


# -------------------------------------------------------------------------- attention_forward, _pooled_row_overrides


def test_attention_forward_computes_every_row_unless_asked(seq):
    model, batch = seq
    adapter = PyHealthAdapter(model)
    inputs, args = adapter.captum_inputs(batch)
    with torch.no_grad():
        expected = model(**batch)["logit"]
    full = adapter.attention_forward(inputs, args)
    assert [tuple(a.shape) for a in full.attention["conditions"]] == [(6, 2, 7, 7), (6, 2, 7, 7)]
    assert [tuple(a.shape) for a in full.attention["procedures"]] == [(6, 2, 4, 4), (6, 2, 4, 4)]
    row = adapter.attention_forward(inputs, args, pooled_row_only=True)
    assert [tuple(a.shape) for a in row.attention["conditions"]] == [(6, 2, 7, 7), (6, 2, 1, 7)]
    assert [tuple(a.shape) for a in row.attention["procedures"]] == [(6, 2, 4, 4), (6, 2, 1, 4)]
    torch.testing.assert_close(full.logits.detach(), expected)
    torch.testing.assert_close(row.logits.detach(), expected)
    assert all(index.dtype == torch.long and not index.any() for index in full.pool_index.values())


def test_attention_forward_refuses_an_unknown_layernorm_mode(seq):
    adapter = PyHealthAdapter(seq[0])
    inputs, args = adapter.captum_inputs(seq[1])
    with pytest.raises(ValueError, match=exact("layernorm must be 'exact' or 'detach', got 'fixed'")):
        adapter.attention_forward(inputs, args, layernorm="fixed")


def test_attention_forward_of_images_computes_the_class_token_row_when_asked(vit):
    model, batch = vit
    adapter = PyHealthAdapter(model)
    inputs, args = adapter.captum_inputs(batch)
    full = adapter.attention_forward(inputs, args)
    row = adapter.attention_forward(inputs, args, pooled_row_only=True)
    maps = full.attention["image"]
    assert len(maps) == 12 and all(tuple(a.shape) == (2, 12, 5, 5) for a in maps)  # class token + 4 patches
    assert tuple(row.attention["image"][-1].shape) == (2, 12, 1, 5)
    torch.testing.assert_close(row.logits, full.logits)


def _grad(logits: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(logits[:, 0].sum(), leaf)[0]


def test_attention_forward_of_a_text_model_holds_layer_norm_scales_when_asked(text):
    """The gradient at the embeddings is the model's own (``exact``) or the one with every layer norm's scale a
    constant (``detach``: the model run under ``FixedScaleLayerNorm``)."""
    model, batch = text["multiclass"]
    adapter = PyHealthAdapter(model)
    (embedded,), args = adapter.captum_inputs(batch)
    references = {}
    for mode in ("exact", "detach"):
        leaf = embedded.clone().requires_grad_(True)
        with FixedScaleLayerNorm() if mode == "detach" else torch.enable_grad():
            references[mode] = _grad(adapter(leaf, *args), leaf)
    assert not torch.allclose(references["exact"], references["detach"], atol=1e-4)
    for mode in ("exact", "detach"):
        out = adapter.attention_forward((embedded,), args, layernorm=mode)
        torch.testing.assert_close(_grad(out.logits, out.embeddings["text"]), references[mode], atol=1e-5, rtol=1e-4)


def test_layer_norm_with_a_held_scale_keeps_the_forward_values(seq):
    """``layernorm="detach"`` changes the backward pass only: the logits stay the model's, with its norms' own
    weights, biases and eps."""
    model, batch = fresh(seq)
    torch.manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.normal_()
                module.bias.normal_()
                module.eps = 0.3
        expected = model(**batch)["logit"]
    adapter = PyHealthAdapter(model)
    inputs, args = adapter.captum_inputs(batch)
    out = adapter.attention_forward(inputs, args, layernorm="detach")
    torch.testing.assert_close(out.logits.detach(), expected)


# -------------------------------------------------------------------------------------------- relevance_to_inputs


def test_relevance_to_inputs_of_a_text_model(text):
    model, batch = text["multiclass"]
    adapter = PyHealthAdapter(model)
    tokens, args = adapter.captum_inputs(batch, level="token")
    relevance = {"text": torch.arange(28.0).reshape(4, 7)}
    (out,) = adapter.relevance_to_inputs(relevance, tokens, args)
    assert torch.equal(out, relevance["text"] * (tokens[0] != 0))  # padding gets nothing


def test_relevance_to_inputs_lands_on_the_inputs_device_and_dtype(flat):
    adapter = PyHealthAdapter(flat[0])
    row = {"conditions": torch.tensor([[4.0, 8.0, 12.0], [4.0, 8.0, 12.0], [4.0, 8.0, 12.0]])}
    embedded = torch.zeros(3, 3, 16, dtype=torch.bfloat16)
    (out,) = adapter.relevance_to_inputs(row, (embedded,), (FLAT_IDS != 0,))
    # each real code's relevance spread evenly over the 16 dimensions: 0.25, 0.5, 0.75
    expected = (torch.tensor([[0.25, 0.5, 0.0], [0.25, 0.0, 0.0], [0.25, 0.5, 0.75]])).unsqueeze(-1).expand(3, 3, 16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected.to(torch.bfloat16))
    (out,) = adapter.relevance_to_inputs(row, (embedded.to("meta"),), (FLAT_IDS != 0,))  # relevance and mask on the CPU
    assert out.device.type == "meta"


# ------------------------------------------------------------------------------ _require_runnable, _runnable_models


NOT_RUNNABLE = (
    "NoEmbedding cannot be explained through PyHealthAdapter: it has no forward_from_embedding(), which every "
    "attribution method runs it through (Chefer, Integrated Gradients, Saliency, ...). Use a PyHealth model that "
    "has one ({}), a TorchvisionModel with a ViT or a TransformersModel, or give Captum your own forward function "
    "of the embedded inputs."
)


def no_embedding_model(dataset):
    from pyhealth.models import BaseModel

    class NoEmbedding(BaseModel):
        pass

    with quiet_pyhealth():
        return NoEmbedding(dataset=dataset)


def test_init_refuses_a_pyhealth_model_without_forward_from_embedding(flat):
    # the classes of pyhealth.models that have forward_from_embedding (PyHealth 2.1), in name order
    runnable = "MLP, StageAttentionNet, StageNet, TorchvisionModel, Transformer"
    with pytest.raises(TypeError, match=exact(NOT_RUNNABLE.format(runnable))):
        PyHealthAdapter(no_embedding_model(flat[0].dataset))


def test_init_names_the_two_attention_models_when_no_runnable_model_is_found(flat, monkeypatch):
    monkeypatch.setattr(pyhealth_adapter, "_runnable_models", lambda: [])
    with pytest.raises(TypeError, match=exact(NOT_RUNNABLE.format("Transformer, StageAttentionNet"))):
        PyHealthAdapter(no_embedding_model(flat[0].dataset))


# -------------------------------------------------------------------------------------------- _first_row_block_forward


def test_first_row_block_matches_the_full_block_when_the_first_code_is_padding(seq):
    """A mask whose first position is padding (codes removed without compacting): PyHealth's feed-forward zeroes
    that row's output, in the full block and in the first-row one."""
    model, batch = seq
    adapter = PyHealthAdapter(model)
    tokens, args = adapter.captum_inputs(batch, level="token")
    keep = {key: torch.ones_like(t, dtype=torch.bool) for key, t in zip(adapter.feature_keys, tokens, strict=True)}
    keep["conditions"][:, 0] = tokens[0][:, 1] == 0  # the first code goes wherever a second one stays
    tokens, args = adapter.remove_tokens(tokens, args, keep, compact=False)
    assert not args[0][0, 0] and args[0][0].any()
    with torch.no_grad():
        expected = adapter(*tokens, *args)
    out = adapter.attention_forward(tokens, args, pooled_row_only=True)
    torch.testing.assert_close(out.logits.detach(), expected)


def test_first_row_block_registers_pyhealths_attention_hooks_when_enabled(seq):
    model, batch = fresh(seq)
    adapter = PyHealthAdapter(model)
    inputs, args = adapter.captum_inputs(batch)
    model.set_attention_hooks(True)
    adapter.attention_forward(inputs, args, pooled_row_only=True)
    last = model.transformer["conditions"].transformer[-1].attention
    assert last.attn_map is not None and tuple(last.attn_map.shape) == (6, 2, 1, 7)

