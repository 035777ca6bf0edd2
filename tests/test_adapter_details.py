"""Unit tests of the adapters' generic code, on hand-worked values: what mutation testing showed untested.

Covered: ``adapter_for`` (the adapter picked for each kind of model, the refusals and their texts),
``base.py`` (``LookupDict``, the record builder ``Adapter.visualization_records`` on a stand-in adapter whose
logits, tokens and scores are set here, the explained classes, the zero-baseline warning and the Captum target
check with the stack depths they search, device checks, patches, ``uncompiled``), ``HuggingFaceAdapter``
(what the constructor sets up for each head type, the classifier kind, the config attributes it reads, batch
reading and the keys it accepts or refuses, keyword arguments, class names and labels, probabilities) and
``_pyhealth_media`` (the inner adapter and batch of PyHealth's ``TorchvisionModel`` and ``TransformersModel``,
made here without a dataset from tiny networks).

Every expected value is worked out by hand or by a plain call of the model, never read off the code under test.
Models are built once per module from tiny configs (no downloads).
"""

from __future__ import annotations

import contextlib
import inspect
import linecache
import math
import pickle
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
import torchvision
import transformers
from captum.attr import IntegratedGradients, Saliency
from torch import nn
from transformers.modeling_utils import ModuleUtilsMixin

from captum_chefer.adapters import HuggingFaceAdapter, PyHealthAdapter, TransformerAdapter, adapter_for, base
from captum_chefer.adapters import _pyhealth_media as media
from captum_chefer.adapters import huggingface as hf
from captum_chefer.adapters.base import Adapter, DecodedToken, LookupDict, ZeroBaselineWarning

transformers.logging.set_verbosity_error()

WORDS = ["fever", "cough", "rash", "pain", "no", "history", "of", "chest", "sepsis", "stable"]  # ids 5..14
TINY_BERT = {"vocab_size": 15, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 32}
TINY_VIT = {"image_size": 16, "patch_size": 8, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 16}


# ---------------------------------------------------------------------------------------------- models


class NoTypesBertForSequenceClassification(transformers.BertForSequenceClassification):
    """A classifier of a name no mapping lists, whose forward takes no token_type_ids (its encoder does), with a
    linear layer of 7 outputs registered after its head."""

    def __init__(self, config):
        super().__init__(config)
        self.extra = nn.Linear(config.hidden_size, 7)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds)


class TinyViTForImageClassification(transformers.ViTForImageClassification):
    """An image classifier of a name no mapping lists."""


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return transformers.BertTokenizerFast(vocab=str(vocab))


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(num_labels=3, id2label={0: "low", 1: "mid", 2: "high"}, **TINY_BERT)
    return transformers.BertForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def no_types():
    torch.manual_seed(0)
    return NoTypesBertForSequenceClassification(transformers.BertConfig(num_labels=3, **TINY_BERT)).eval()


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(1)
    config = transformers.GPT2Config(vocab_size=15, n_embd=8, n_layer=1, n_head=2, n_positions=16, num_labels=2,
                                     pad_token_id=None)
    return transformers.GPT2ForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(2)
    return transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=3, **TINY_VIT)).eval()


def torchvision_vit(num_classes: int = 4) -> nn.Module:
    torch.manual_seed(3)
    return torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8,
                                                mlp_dim=16, num_classes=num_classes).eval()


def pyhealth_model(cls, feature: str, output_size: int, **attributes):
    """A PyHealth model of class ``cls`` made without a dataset: what the adapters read, set here."""
    from pyhealth.models import BaseModel

    model = cls.__new__(cls)
    BaseModel.__init__(model, None)
    model.feature_keys, model.label_keys = [feature], ["label"]
    model.get_output_size = lambda: output_size
    for name, value in attributes.items():
        setattr(model, name, value)
    return model.eval()


@pytest.fixture(scope="module")
def vision_model():
    """PyHealth's TorchvisionModel around a torchvision ViT with 4 classes; PyHealth's output size says 5."""
    from pyhealth.models import TorchvisionModel

    return pyhealth_model(TorchvisionModel, "image", 5, model=torchvision_vit(), model_name="vit_b_16")


@pytest.fixture(scope="module")
def text_model(tokenizer):
    from pyhealth.models import TransformersModel

    torch.manual_seed(4)
    encoder = transformers.BertModel(transformers.BertConfig(**TINY_BERT))
    return pyhealth_model(TransformersModel, "text", 3, model=encoder,
                          tokenizer=tokenizer, fc=nn.Linear(16, 3), dropout=nn.Dropout(0.1), model_name="tiny",
                          projection=nn.Linear(16, 7))  # registered after the head


@contextlib.contextmanager
def replaced(module: nn.Module, name: str, value):
    """``module.<name>`` set to ``value`` for a ``with`` block (monkeypatch would delete a submodule or parameter)."""
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield module
    finally:
        setattr(module, name, original)


def message(excinfo) -> str:
    """The text of a raised exception (a KeyError's str() adds quotes)."""
    return str(excinfo.value.args[0])


def wrapped(function) -> bool:
    """Whether mutation testing has put ``function`` behind its trampoline (two frames more on the stack)."""
    return function.__code__.co_filename.endswith(("trampoline.py",))


def assert_points_at_caller(warning: warnings.WarningMessage, path: str, line: int) -> None:
    """The warning names the line that called the warning function (``stacklevel=2``); under mutation testing
    the trampoline's call of the function stands in for it (not the trampoline's outer wrapper)."""
    if warning.filename.endswith("trampoline.py"):
        assert "_func(" in linecache.getline(warning.filename, warning.lineno)
    else:
        assert (warning.filename, warning.lineno) == (path, line)


# ---------------------------------------------------------------------------------------------- adapter_for


def test_adapter_for_returns_an_adapter_as_is_and_refuses_options_for_it(bert):
    adapter = HuggingFaceAdapter(bert)
    assert adapter_for(adapter) is adapter
    with pytest.raises(TypeError) as excinfo:
        adapter_for(adapter, pool=0)
    assert message(excinfo) == "model is already an adapter; pass options when you make it, not to adapter_for"


def test_adapter_for_picks_the_adapter_of_each_library_and_passes_the_options(bert, tokenizer, vision_model):
    chosen = adapter_for(bert, tokenizer=tokenizer, pool=2)
    assert type(chosen) is HuggingFaceAdapter and chosen.tokenizer is tokenizer and chosen.pool == 2
    assert type(adapter_for(vision_model)) is PyHealthAdapter
    with pytest.raises(TypeError, match="'bogus'"):
        adapter_for(vision_model, bogus=1)
    with pytest.raises(TypeError, match="'bogus'"):
        adapter_for(bert, bogus=1)


def test_adapter_for_sees_a_pyhealth_model_through_a_compiled_wrapper(vision_model):
    class OptimizedModule(nn.Module):  # what torch.compile returns, by name
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    adapter = adapter_for(OptimizedModule(vision_model))
    assert type(adapter) is PyHealthAdapter and adapter.model is vision_model


NO_ADAPTER = (
    "no adapter is picked automatically for {}; automatic: PyHealth models (PyHealthAdapter) and transformers "
    "classifiers (HuggingFaceAdapter). For any other transformer classifier use TransformerAdapter(model, "
    "pool='first' | 'last' | position, prefix_tokens=...); gradient methods such as captum.attr.IntegratedGradients "
    "work on any forward function."
)


def test_adapter_for_refuses_other_models_naming_the_adapter_to_use():
    from pyhealth.models.transformer import Attention

    class BaseModel(nn.Module):  # PyHealth's class name, not PyHealth's class
        pass

    class PreTrainedModel(nn.Module):  # transformers' class name, not transformers' class
        pass

    class Mixed(ModuleUtilsMixin, nn.Module):  # a transformers.modeling_utils mixin, not a PreTrainedModel
        pass

    for model in (nn.Linear(2, 2), BaseModel(), PreTrainedModel(), Mixed(), Attention()):
        with pytest.raises(TypeError) as excinfo:
            adapter_for(model)
        assert message(excinfo) == NO_ADAPTER.format(type(model).__name__)
    with pytest.raises(TypeError) as excinfo:
        adapter_for(3)
    assert message(excinfo) == "adapter_for needs a torch model (nn.Module), got int"


# ---------------------------------------------------------------------------------------------- base: small pieces


def test_lookup_dict_names_the_keys_it_has_and_survives_pickling():
    plain = LookupDict({"a": 1}, b=2)
    assert dict(plain) == {"a": 1, "b": 2} and plain.kind == "key"
    with pytest.raises(KeyError) as excinfo:
        plain["c"]
    assert message(excinfo) == "no key 'c' here; use one of ['a', 'b']"
    features = LookupDict({"codes": 1}, kind="feature")
    with pytest.raises(KeyError) as excinfo:
        features["labs"]
    assert message(excinfo) == "no feature 'labs' here; use one of ['codes']"
    copy = pickle.loads(pickle.dumps(features))
    assert type(copy) is LookupDict and dict(copy) == {"codes": 1} and copy.kind == "feature"


def test_base_probabilities_are_a_softmax_or_the_sigmoid_of_a_single_logit():
    adapter = Adapter()
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(4.0), 0.0]])
    torch.testing.assert_close(adapter.probabilities(logits), torch.tensor([[0.25, 0.75], [0.8, 0.2]]))
    single = torch.tensor([[0.0], [math.log(3.0)]])
    torch.testing.assert_close(adapter.probabilities(single), torch.tensor([[0.5], [0.75]]))
    assert adapter.class_names() == {} and adapter.true_classes({"labels": torch.tensor([1])}) is None
    with pytest.raises(NotImplementedError):
        adapter.decode({})


def test_is_zero_knows_captums_zero_baselines():
    assert base._is_zero(None) and base._is_zero(0) and base._is_zero(0.0) and base._is_zero(torch.zeros(2, 3))
    assert not base._is_zero(1) and not base._is_zero(-0.5) and not base._is_zero("0")
    assert not base._is_zero(torch.tensor([0.0, 1.0]))
    assert not base._is_zero(torch.zeros(2, dtype=torch.long))  # token ids: the pad id, a real reference


def test_same_device_treats_a_missing_index_as_any():
    cpu, cuda, cuda0, cuda1 = (torch.device(d) for d in ("cpu", "cuda", "cuda:0", "cuda:1"))
    assert base._same_device(cpu, cpu) and base._same_device(cuda, cuda0) and base._same_device(cuda0, cuda)
    assert base._same_device(cuda1, cuda1)
    assert not base._same_device(cuda0, cuda1) and not base._same_device(cpu, cuda) and not base._same_device(cuda, cpu)


def test_check_devices_names_each_misplaced_tensor_and_the_fix():
    base.check_devices([("x", torch.zeros(1)), ("n", 3)], torch.device("cpu"))  # numbers are not checked
    with pytest.raises(ValueError) as excinfo:
        base.check_devices([("input 'x'", torch.zeros(1, device="meta")), ("n", 3)], torch.device("cpu"))
    assert message(excinfo) == (
        "input 'x' is on meta but the model is on cpu; make the inputs with adapter.captum_inputs(batch), which puts "
        "them on the model's device, or move them with .to('cpu')"
    )
    with pytest.raises(ValueError) as excinfo:
        base.check_devices([("the ids", torch.zeros(1, device="meta")), ("the mask", torch.zeros(1)),
                            ("the types", torch.zeros(1, device="meta"))], torch.device("cuda"))
    assert message(excinfo) == (
        "the ids, the mask, the types are on cpu and meta but the model is on cuda; make the inputs with "
        "adapter.captum_inputs(batch), which puts them on the model's device, or move them with .to('cuda')"
    )


def test_patches_of_another_height_and_width_by_hand():
    # a 2-channel 5x7 image, patches of 2x3: a 2x2 grid (the last row and column are outside it); 12 cells a patch
    relevance = torch.tensor([[12.0, 24.0, 36.0, 48.0]])
    pixels = base.spread_over_patches(relevance, (1, 2, 5, 7), (2, 3))
    expected = torch.tensor([[1.0] * 3 + [2.0] * 3 + [0.0]] * 2 + [[3.0] * 3 + [4.0] * 3 + [0.0]] * 2 + [[0.0] * 7])
    assert pixels.shape == (1, 2, 5, 7) and torch.equal(pixels[0, 0], expected) and torch.equal(pixels[0, 1], expected)
    assert torch.equal(base.sum_over_patches(pixels, (2, 3)), relevance)
    # an int patch size: 2x2 patches of a 2-channel 2x4 image, 8 cells a patch
    square = base.spread_over_patches(torch.tensor([[8.0, 16.0]]), (1, 2, 2, 4), 2)
    assert torch.equal(square, torch.tensor([[1.0, 1.0, 2.0, 2.0]] * 2).expand(1, 2, 2, 4))
    assert torch.equal(base.sum_over_patches(torch.ones(2, 3, 4, 4), 2), torch.full((2, 4), 12.0))
    with pytest.raises(ValueError) as excinfo:
        base.spread_over_patches(torch.ones(1, 5), (1, 1, 3, 5), (1, 2))
    assert message(excinfo) == (
        "patch relevance has shape (1, 5); an image (1, 1, 3, 5) with patches of 1x2 has 3x2 = 6 patches per sample"
    )


def test_uncompiled_unwraps_only_torch_compiles_wrapper():
    inner = nn.Linear(2, 2)

    class OptimizedModule(nn.Module):
        def __init__(self, original):
            super().__init__()
            self._orig_mod = original

    class Wrapper(OptimizedModule):  # another class name: not torch.compile's
        pass

    compiled = OptimizedModule(inner)
    assert base.uncompiled(compiled) is inner and base.uncompiled(inner) is inner
    other = Wrapper(inner)
    assert base.uncompiled(other) is other
    odd = OptimizedModule(inner)
    del odd._orig_mod
    odd._orig_mod = "not a module"
    assert base.uncompiled(odd) is odd


# ---------------------------------------------------------------------------------------------- base: explained classes


def test_explained_classes_default_to_the_prediction_or_the_single_logit():
    predicted = torch.tensor([2, 0, 1])
    assert base._explained_classes(None, 3, predicted, 3) == [2, 0, 1]
    assert base._explained_classes(None, 3, torch.zeros(3, dtype=torch.long), 1) == [1, 1, 1]


def test_explained_classes_read_an_int_one_class_or_one_per_sample():
    predicted = torch.tensor([0, 0])
    assert base._explained_classes(2, 2, predicted, 3) == [2, 2]
    assert base._explained_classes(torch.tensor([1]), 3, torch.zeros(3, dtype=torch.long), 3) == [1, 1, 1]
    assert base._explained_classes([2, 0], 2, predicted, 3) == [2, 0]
    assert base._explained_classes(torch.tensor([[0], [2], [1]]), 3, torch.zeros(3), 3) == [0, 2, 1]
    assert base._explained_classes(0, 2, predicted, 1) == [1, 1]
    assert base._explained_classes([1, 0], 2, predicted, 1) == [1, 1]


def test_explained_classes_refuse_bools_floats_and_other_counts():
    with pytest.raises(TypeError) as excinfo:
        base._explained_classes(True, 2, torch.zeros(2), 3)
    assert message(excinfo) == "target must be an int, a sequence of ints or a tensor, not a bool"
    for target, dtype in ((torch.tensor([1.0, 0.0]), "torch.float32"), (torch.tensor([True, False]), "torch.bool")):
        with pytest.raises(TypeError) as excinfo:
            base._explained_classes(target, 2, torch.zeros(2), 3)
        assert message(excinfo) == f"target must hold integer class indices, got dtype {dtype}"
    with pytest.raises(ValueError) as excinfo:
        base._explained_classes([0, 1], 3, torch.zeros(3), 3)
    assert message(excinfo) == "target must be one class or one per sample (3), got 2 values"


def test_explained_classes_refuse_classes_the_model_does_not_have():
    with pytest.raises(ValueError) as excinfo:
        base._explained_classes([3, 2], 2, torch.zeros(2), 1)
    assert message(excinfo) == (
        "target 2 is not a class of a model with a single logit (binary); its attributions explain that logit, the "
        "positive class's score: pass target=None, 0 or 1"
    )
    with pytest.raises(ValueError) as excinfo:
        base._explained_classes(3, 2, torch.zeros(2), 3)
    assert message(excinfo) == (
        "target 3 is out of range: the model has 3 classes (0..2); pass the target the attributions were computed for"
    )
    with pytest.raises(ValueError) as excinfo:
        base._explained_classes([5, 1, 3], 3, torch.zeros(3), 3)
    assert message(excinfo).startswith("target [3, 5] is out of range: the model has 3 classes (0..2)")


# ---------------------------------------------------------------------------------------------- base: records


class Streams(Adapter):
    """A stand-in adapter: fixed logits, tokens and inputs set by the test; it records how it is called."""

    def __init__(self, logits, keys=("codes", "labs"), names=None):
        super().__init__()
        self.feature_keys = list(keys)
        self.logits = logits
        self.names = names or {}
        self.marker = torch.zeros(1)  # the one additional forward arg
        self.levels: list = []
        self.forwarded: list = []
        self.converted: list = []

    def decode(self, batch):
        return batch["decoded"]

    def class_names(self):
        return self.names

    def true_classes(self, batch):
        return batch.get("true")

    def captum_inputs(self, batch, level="embedding"):
        self.levels.append(level)
        return tuple(batch["ids"]), (self.marker,)

    def token_masks(self, additional_forward_args, inputs):
        assert additional_forward_args[0] is self.marker
        return tuple(x != 0 for x in inputs)

    def to_feature_dict(self, attributions):
        self.converted.append(type(attributions))
        attributions = attributions if isinstance(attributions, tuple) else (attributions,)
        return dict(zip(self.feature_keys, attributions, strict=True))

    def forward(self, *inputs_and_args):
        self.forwarded.append((inputs_and_args, torch.is_grad_enabled()))
        return self.logits.double()


def two_stream_batch():
    token = DecodedToken
    return {
        "ids": (torch.tensor([[4, 5, 6], [7, 8, 0]]), torch.tensor([[1, 2], [3, 0]])),
        "decoded": [
            [token("labs", "y", (1,)), token("codes", "c", (2,)), token("codes", "a", (0,))],
            [token("labs", "x", (0,)), token("codes", "b", (1,))],
        ],
        "true": ["t0", "t1"],
    }


TWO_STREAM_SCORES = {"codes": [[2.0, 0.0, -4.0], [0.0, 0.5, 0.0]], "labs": [[0.0, 8.0], [-0.25, 0.0]]}


def test_records_of_two_streams_with_a_method_a_target_and_deltas_by_hand():
    # sample 0: softmax [1/4, 1/2, 1/4] -> class 1 at 0.5; sample 1: softmax [3/5, 1/5, 1/5] -> class 0 at 0.6
    logits = torch.tensor([[0.0, math.log(2.0), 0.0], [math.log(3.0), 0.0, 0.0]])
    adapter = Streams(logits, names={0: "no", 1: "yes"})
    batch = two_stream_batch()
    records = adapter.visualization_records(batch, TWO_STREAM_SCORES, torch.tensor([2, 0]), method="M",
                                            delta=[0.1, -0.2])
    assert adapter.levels == ["token"]
    ((forwarded, grad_enabled),) = adapter.forwarded
    assert forwarded == (*batch["ids"], adapter.marker) and not grad_enabled
    first, second = records
    assert first.raw_input_ids == ["<codes>", "c", "a", "<labs>", "y"]  # feature order, then the decoded order
    assert torch.equal(first.word_attributions, torch.tensor([0.0, -0.5, 0.25, 0.0, 1.0]))  # / the peak |score| 8
    assert first.attr_score == pytest.approx(6.0) and first.pred_prob == pytest.approx(0.5)
    assert (first.pred_class, first.true_class, first.attr_class) == ("yes", "t0", "2 (M)")  # class 2 has no name
    assert first.convergence_score == pytest.approx(0.1) and first.method == "M"
    assert second.raw_input_ids == ["<codes>", "b", "<labs>", "x"]
    assert torch.equal(second.word_attributions, torch.tensor([0.0, 1.0, 0.0, -0.5]))  # / the peak 0.5
    assert second.attr_score == pytest.approx(0.25) and second.pred_prob == pytest.approx(0.6)
    assert (second.pred_class, second.true_class, second.attr_class) == ("no", "t1", "no (M)")
    assert second.convergence_score == pytest.approx(-0.2) and second.method == "M"


def test_records_of_a_single_logit_without_labels_method_or_deltas_by_hand():
    # sigmoid 0.5 -> class 1 at 0.5; sigmoid 0.75 -> class 1 at 0.75; sigmoid 0.25 -> class 0 at 0.75
    logits = torch.tensor([[0.0], [math.log(3.0)], [-math.log(3.0)]])
    adapter = Streams(logits, keys=("codes",))
    token = DecodedToken
    batch = {"ids": (torch.tensor([[1, 2], [3, 4], [5, 6]]),),
             "decoded": [[token("codes", "a", (0,)), token("codes", "b", (1,))], [], [token("codes", "c", (0,))]]}
    scores = torch.tensor([[0.0, 0.0], [0.0, 0.0], [-2.0, 0.0]])
    for target in (None, 0, 1):
        records = adapter.visualization_records(batch, scores, target)
        assert [r.raw_input_ids for r in records] == [["a", "b"], [], ["c"]]  # one stream: no markers
        assert [r.word_attributions.tolist() for r in records] == [[0.0, 0.0], [], [-1.0]]  # all-zero rows stay zero
        assert [r.attr_score for r in records] == [0.0, 0, -2.0]
        assert [r.pred_class for r in records] == ["1", "1", "0"]
        assert [r.pred_prob for r in records] == pytest.approx([0.5, 0.75, 0.75])
        assert [r.attr_class for r in records] == ["1", "1", "1"] and [r.true_class for r in records] == ["n/a"] * 3
        assert [(r.convergence_score, r.method) for r in records] == [(None, None)] * 3
    assert adapter.converted == [torch.Tensor] * 3


def test_records_take_a_list_or_tuple_and_refuse_other_attributions_and_shapes():
    adapter = Streams(torch.zeros(2, 3))
    batch = two_stream_batch()
    scores = tuple(torch.tensor(TWO_STREAM_SCORES[k]) for k in ("codes", "labs"))
    from_list = adapter.visualization_records(batch, list(scores))
    assert adapter.converted == [tuple] and from_list[0].attr_score == pytest.approx(6.0)
    with pytest.raises(TypeError) as excinfo:
        adapter.visualization_records(batch, 3)
    assert message(excinfo) == (
        "attributions must be a tensor or tuple shaped like the Captum inputs, or a feature dict "
        "{feature_key: scores}; got int"
    )
    with pytest.raises(KeyError) as excinfo:
        adapter.visualization_records(batch, {"codes": scores[0], "other": scores[1]})
    assert message(excinfo) == "attributions have no scores for ['labs']; expected keys ['codes', 'labs']"
    with pytest.raises(ValueError) as excinfo:
        adapter.visualization_records(batch, {"codes": scores[0], "labs": torch.zeros(2, 3)})
    assert message(excinfo) == (
        "scores for 'labs' have shape (2, 3) but the batch's tokens are (2, 2); pass the attributions of this batch"
    )
    with pytest.raises(ValueError) as excinfo:
        adapter.visualization_records(batch, scores, delta=torch.zeros(3))
    assert message(excinfo) == "delta must hold one value per sample (2), got 3"


# ------------------------------------------------------------------------------------------ base: Captum on the stack


class Product(Adapter):
    """A stand-in adapter over ``x @ weight`` whose forward runs the base checks as the adapters' forwards do."""

    def __init__(self, outputs: int = 3):
        super().__init__()
        self.feature_keys = ["x"]
        self.weight = nn.Parameter(torch.arange(2.0 * outputs).reshape(2, outputs))
        self.probe = None  # called from forward with the adapter, when set
        self.warn_line = None

    def forward(self, x):
        if self.probe is not None:
            self.probe(self)
        self.warn_line = sys._getframe().f_lineno + 1
        self._warn_if_zero_baseline()
        logits = x @ self.weight
        self._check_captum_target(logits)
        return logits


def zero_baseline_warnings(run):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [w for w in caught if issubclass(w.category, ZeroBaselineWarning)]


def test_zero_baseline_warning_once_per_adapter_with_the_fix_at_the_callers_line(monkeypatch):
    monkeypatch.setattr(base, "_IG_ATTRIBUTE_CODE", None)  # as in a fresh process
    adapter = Product()
    x = torch.ones(2, 2)
    (warning,) = zero_baseline_warnings(lambda: IntegratedGradients(adapter).attribute(x, target=0, n_steps=2))
    assert warning.category is ZeroBaselineWarning and str(warning.message) == (
        "IntegratedGradients runs through Product from an all-zero baseline (Captum's default when baselines is not "
        "given). On normalised transformers the integral from zero converges badly (large convergence delta). Pass "
        "baselines=ig_baselines(adapter, inputs, additional_forward_args) (from captum_chefer import ig_baselines; "
        "reference='unk' by default), as compare_methods does."
    )
    assert_points_at_caller(warning, __file__, adapter.warn_line)
    assert zero_baseline_warnings(lambda: IntegratedGradients(adapter).attribute(x, target=0, n_steps=2)) == []
    fresh = Product()
    ig = IntegratedGradients(fresh)
    assert zero_baseline_warnings(lambda: ig.attribute(x, baselines=0.5, target=0, n_steps=2)) == []
    assert zero_baseline_warnings(lambda: Saliency(fresh).attribute(x, target=0)) == []
    assert zero_baseline_warnings(lambda: fresh(x)) == []
    assert len(zero_baseline_warnings(lambda: ig.attribute(x, baselines=0, target=0, n_steps=2))) == 1


def at_depth(function, adapter, step: int, code):
    """``function(adapter)`` called so that the frame running ``code`` is ``step`` frames above ``function``'s own
    frame (mutation testing's trampoline puts two frames between a function and its caller)."""
    frame, hops = sys._getframe(), 0
    while frame.f_code is not code:
        frame, hops = frame.f_back, hops + 1
    helpers = step - hops - 1 - (2 if wrapped(function) else 0)
    assert helpers >= 1

    def nested(k):
        return function(adapter) if k == 1 else nested(k - 1)

    return nested(helpers)


def test_ig_baselines_are_found_up_to_61_frames_above():
    found = {}

    def probe(adapter):
        adapter.probe = None
        for step in (61, 62):
            found[step] = at_depth(base._ig_baselines_on_stack, adapter, step, IntegratedGradients._attribute.__code__)

    adapter = Product()
    adapter.probe = probe
    baseline = torch.full((2, 2), 0.5)
    IntegratedGradients(adapter).attribute(torch.ones(2, 2), baselines=baseline, target=0, n_steps=2)
    assert found[62] is None and len(found[61]) == 1 and torch.equal(found[61][0], baseline)
    assert base._ig_baselines_on_stack(adapter) is None  # no Captum on the stack


def test_captum_target_is_found_up_to_17_frames_above():
    from captum._utils.common import _run_forward

    found = {}
    run_forward = inspect.unwrap(_run_forward).__code__

    def probe(adapter):
        adapter.probe = None
        for step in (17, 18):
            found[step] = at_depth(base._captum_target_on_stack, adapter, step, run_forward)

    adapter = Product()
    adapter.probe = probe
    Saliency(adapter).attribute(torch.ones(2, 2), target=2)
    assert found == {17: (2,), 18: None}


def test_captum_targets_beyond_the_outputs_are_refused_only_for_this_adapter(monkeypatch):
    monkeypatch.setattr(base, "_RUN_FORWARD_CODE", None)  # as in a fresh process
    adapter = Product()
    x = torch.ones(2, 2)
    with pytest.raises(ValueError) as excinfo:
        Saliency(adapter).attribute(x, target=3)
    assert message(excinfo) == "target 3 is out of range: the model has 3 outputs, so targets are class indices 0..2"
    assert Saliency(adapter).attribute(x, target=2).shape == (2, 2)
    assert Saliency(lambda v: adapter(v).repeat(1, 3)).attribute(x, target=7).shape == (2, 2)  # another forward_func
    assert torch.equal(adapter(x), torch.tensor([[3.0, 5.0, 7.0], [3.0, 5.0, 7.0]]))  # no Captum method: no check
    single = Product(outputs=1)
    assert Saliency(single).attribute(x).shape == (2, 2)  # target None
    with pytest.raises(ValueError, match="target 1 is out of range for a model with a single logit"):
        Saliency(single).attribute(x, target=1)


# ---------------------------------------------------------------------------------------- HuggingFaceAdapter: set-up


def test_an_encoder_classifier_is_set_up_with_its_config_and_tokenizer(bert, tokenizer):
    adapter = HuggingFaceAdapter(bert, tokenizer=tokenizer)
    assert (adapter.kind, adapter.pool, adapter.prefix_tokens, adapter.patch_size) == ("encoder", "first", 0, None)
    embedding = bert.get_input_embeddings()
    assert adapter.embedding is embedding and adapter.embedding_layers == [embedding]
    assert (adapter.pad_id, adapter.mask_arg, adapter.feature_keys, adapter.num_outputs) == (0, 0, ["input_ids"], 3)
    assert adapter.tokenizer is tokenizer and adapter._callee is bert and adapter._takes_token_types
    assert adapter._carries_ids is False


def test_a_decoder_classifier_pools_the_last_token_through_its_base_model(gpt2):
    adapter = HuggingFaceAdapter(gpt2)
    assert (adapter.kind, adapter.pool, adapter.pad_id) == ("decoder", "last", None)
    assert adapter.feature_keys == ["input_ids"]
    assert adapter._callee is gpt2.transformer and adapter.embedding is gpt2.get_input_embeddings()
    ids, mask = torch.tensor([[5, 6, 7], [8, 9, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    with torch.no_grad():
        hidden = gpt2.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = gpt2.score(hidden[[0, 1], [2, 1]])
        torch.testing.assert_close(adapter(ids, mask), expected)
    assert HuggingFaceAdapter(gpt2, pool="first").pool == "first"


def test_an_image_classifier_is_set_up_without_text_parts(vit):
    adapter = HuggingFaceAdapter(vit)
    assert (adapter.kind, adapter.pool, adapter.prefix_tokens, adapter.patch_size) == ("image", "first", 0, 8)
    assert (adapter.embedding, adapter.pad_id, adapter.mask_arg) == (None, None, None)
    assert adapter.feature_keys == ["pixel_values"] and adapter.num_outputs == 3
    assert adapter._callee is vit and not adapter._takes_token_types
    assert adapter.embedding_layers == [vit.get_input_embeddings()]
    assert HuggingFaceAdapter(vit, pool=1).pool == 1
    torch.manual_seed(5)
    rectangular = transformers.ViTForImageClassification(transformers.ViTConfig(**{**TINY_VIT, "patch_size": [8, 4]}))
    patch_size = HuggingFaceAdapter(rectangular).patch_size
    assert patch_size == (8, 4) and type(patch_size) is tuple


def test_an_image_classifier_without_patches_has_no_patch_size():
    torch.manual_seed(7)
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1], num_labels=2)
    adapter = HuggingFaceAdapter(transformers.ResNetForImageClassification(config).eval())  # its config has none
    assert (adapter.kind, adapter.patch_size, adapter.feature_keys) == ("image", None, ["pixel_values"])


def test_a_subclassed_decoder_classifier_still_pools_its_last_token(gpt2):
    class CustomLossGPT2ForSequenceClassification(transformers.GPT2ForSequenceClassification):
        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    torch.manual_seed(8)
    subclassed = CustomLossGPT2ForSequenceClassification(gpt2.config).eval()
    adapter = HuggingFaceAdapter(subclassed)
    assert (adapter.kind, adapter.pool) == ("decoder", "last")


def test_a_subclass_with_its_own_pooling_is_read_from_its_own_forward(gpt2, bert):
    class FirstTokenGPT2(transformers.GPT2ForSequenceClassification):
        def forward(self, input_ids=None, attention_mask=None, **kwargs):  # pools position 0, no super()
            hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return transformers.modeling_outputs.SequenceClassifierOutput(logits=self.score(hidden[:, 0]))

    class SubclassedBert(transformers.BertForSequenceClassification):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    assert HuggingFaceAdapter(FirstTokenGPT2(gpt2.config).eval()).kind == "encoder"
    assert HuggingFaceAdapter(SubclassedBert(bert.config).eval()).kind == "encoder"


def test_the_pad_id_comes_from_the_config_then_the_tokenizer(bert, gpt2, monkeypatch):
    monkeypatch.setattr(bert.config, "pad_token_id", 3)
    assert HuggingFaceAdapter(bert, tokenizer=SimpleNamespace(pad_token_id=4)).pad_id == 3
    assert HuggingFaceAdapter(gpt2, tokenizer=SimpleNamespace(pad_token_id=4)).pad_id == 4
    assert HuggingFaceAdapter(gpt2, tokenizer=SimpleNamespace()).pad_id is None


def test_a_text_model_ignores_a_patch_size_in_its_config(bert, monkeypatch):
    monkeypatch.setattr(bert.config, "patch_size", 4, raising=False)
    assert HuggingFaceAdapter(bert).patch_size is None


def test_text_config_value_reads_the_text_part_of_a_composite_config():
    composite = SimpleNamespace(pad_token_id=1, get_text_config=lambda: SimpleNamespace(pad_token_id=2))
    assert hf._text_config_value(composite, "pad_token_id") == 2
    assert hf._text_config_value(SimpleNamespace(pad_token_id=1), "pad_token_id") == 1
    assert hf._text_config_value(SimpleNamespace(pad_token_id=1, get_text_config=5), "pad_token_id") == 1
    assert hf._text_config_value(SimpleNamespace(), "pad_token_id") is None


def test_a_classifier_whose_forward_takes_no_token_types_gets_none(no_types):
    adapter = HuggingFaceAdapter(no_types)
    assert adapter.kind == "encoder" and adapter._callee is no_types and not adapter._takes_token_types
    assert adapter.num_outputs == 3  # config.num_labels, not the last linear layer (7 outputs)
    ids, mask = torch.tensor([[2, 5, 3]]), torch.tensor([[1, 1, 1]])
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.ones_like(ids)}
    _, args = adapter.captum_inputs(batch, level="token")
    assert len(args) == 1 and torch.equal(args[0], mask)


def test_classifier_kinds_by_mapping_and_by_class_name(bert, gpt2, vit, no_types):
    kind = HuggingFaceAdapter._classifier_kind
    assert (kind(bert), kind(gpt2), kind(vit), kind(no_types)) == ("encoder", "decoder", "image", "encoder")
    torch.manual_seed(6)
    assert kind(TinyViTForImageClassification(transformers.ViTConfig(**TINY_VIT))) == "image"
    teacher = transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**TINY_VIT))
    assert kind(teacher) == "image" and HuggingFaceAdapter(teacher, pool=0).pool == 0
    with pytest.raises(ValueError) as excinfo:
        HuggingFaceAdapter(teacher)
    assert message(excinfo) == (
        "DeiTForImageClassificationWithTeacher's head averages a [CLS] head and a distillation-token head; Chefer "
        "follows one position. Pass pool=0 to follow the [CLS] token (part of the head only), or use a gradient method "
        "such as IntegratedGradients(adapter)"
    )


def test_models_without_a_classification_head_are_refused_with_the_fix():
    with pytest.raises(TypeError) as excinfo:
        HuggingFaceAdapter(transformers.BertModel(transformers.BertConfig(**TINY_BERT)))
    assert message(excinfo) == (
        "BertModel has no classification head: HuggingFaceAdapter explains a classifier's logits. Load the model with "
        "AutoModelForSequenceClassification or AutoModelForImageClassification (or wrap your own head with "
        "TransformerAdapter)"
    )
    with pytest.raises(TypeError) as excinfo:
        HuggingFaceAdapter(nn.Linear(2, 2))
    assert message(excinfo) == "HuggingFaceAdapter needs a transformers model (PreTrainedModel), got Linear"


def test_a_decoder_classifier_without_a_score_head_is_refused(gpt2):
    with replaced(gpt2, "score", None), pytest.raises(TypeError) as excinfo:
        HuggingFaceAdapter(gpt2)
    assert message(excinfo) == (
        "GPT2ForSequenceClassification pools its last token but has no `score` head this adapter knows how to apply; "
        "use TransformerAdapter(model, pool='last', ...) with your own forward"
    )


def test_pools_last_token_reads_the_forwards_source():
    assert hf._pools_last_token(transformers.GPT2ForSequenceClassification)
    assert not hf._pools_last_token(transformers.BertForSequenceClassification)
    assert not hf._pools_last_token(type("Builtin", (), {"forward": len}))  # no source: TypeError
    namespace: dict = {}
    exec("class NoFile:\n    def forward(self):\n        return 'last_non_pad_token'\n", namespace)
    assert not hf._pools_last_token(namespace["NoFile"])  # no source file: OSError
    assert not hf._pools_last_token(object)  # no forward anywhere


class _TinyHeadless(transformers.PreTrainedModel):
    """A transformers model of the user's own, known to the auto mappings under no name."""

    config_class = transformers.PretrainedConfig

    def __init__(self):
        super().__init__(transformers.PretrainedConfig())
        self.linear = nn.Linear(2, 2)

    def forward(self, inputs=None):
        return self.linear(inputs)


def test_classifier_kind_of_a_users_own_model_by_its_class_name():
    """A model in none of transformers' mappings is an image or sequence classifier by its name's suffix."""
    image = type("TinyForImageClassification", (_TinyHeadless,), {})
    sequence = type("TinyForSequenceClassification", (_TinyHeadless,), {})
    assert HuggingFaceAdapter._classifier_kind(image()) == "image"
    assert HuggingFaceAdapter._classifier_kind(sequence()) == "encoder"  # its forward pools no last token
    for name in ("TinyForimageclassification", "TinyClassifier"):
        with pytest.raises(TypeError, match="has no classification head"):
            HuggingFaceAdapter._classifier_kind(type(name, (_TinyHeadless,), {})())


# --------------------------------------------------------------------------------------- HuggingFaceAdapter: batches


def test_a_text_batch_of_lists_is_read_as_tensors_with_a_default_mask(bert):
    adapter = HuggingFaceAdapter(bert)
    lists = {"input_ids": [[2, 5, 3], [2, 6, 0]], "token_type_ids": [[0, 0, 0], [0, 1, 1]]}
    (ids,), args = adapter.captum_inputs(lists, level="token")
    assert ids.dtype == torch.long and ids.tolist() == [[2, 5, 3], [2, 6, 0]]
    assert [a.tolist() for a in args] == [[[1, 1, 1], [1, 1, 1]], [[0, 0, 0], [0, 1, 1]]]
    (ids,), args = adapter.captum_inputs({"input_ids": [[2, 5, 3]], "attention_mask": [[1, 1, 0]]}, level="token")
    assert [a.tolist() for a in args] == [[[1, 1, 0]]]
    (embedded,), _ = adapter.captum_inputs({"input_ids": [[2, 5, 3]]})  # level="embedding" by default
    assert embedded.dtype == torch.float32 and embedded.shape == (1, 3, 16)


def test_the_mask_and_token_types_follow_the_ids_device(bert):
    adapter = HuggingFaceAdapter(bert)
    ids = torch.tensor([[2, 5, 3]], device="meta")
    read, args, labels = adapter._read_batch({"input_ids": ids, "attention_mask": torch.ones(1, 3, dtype=torch.long),
                                              "token_type_ids": torch.zeros(1, 3, dtype=torch.long), "labels": [1]})
    assert read is ids and [a.device.type for a in args] == ["meta", "meta"] and labels == [1]
    kwargs = HuggingFaceAdapter._text_kwargs(ids, (torch.ones(1, 3), torch.zeros(1, 3)))
    assert list(kwargs) == ["attention_mask", "token_type_ids", "input_ids"] and kwargs["input_ids"] is ids
    assert [kwargs[k].device.type for k in ("attention_mask", "token_type_ids")] == ["meta", "meta"]


def test_text_kwargs_name_ids_or_embeddings():
    ids, mask, embedded = torch.tensor([[2, 5]]), torch.tensor([[1, 1]]), torch.zeros(1, 2, 4)
    assert HuggingFaceAdapter._text_kwargs(ids, (mask,)) == {"attention_mask": mask, "input_ids": ids}
    assert HuggingFaceAdapter._text_kwargs(embedded, (mask,)) == {"attention_mask": mask, "inputs_embeds": embedded}
    with pytest.raises(ValueError) as excinfo:
        HuggingFaceAdapter._text_kwargs(ids, ())
    assert message(excinfo) == (
        "expected the attention mask as the first additional forward arg; make it with adapter.captum_inputs(...)"
    )


def test_text_batches_that_cannot_be_read_are_refused_with_the_fix(bert):
    adapter = HuggingFaceAdapter(bert)
    cases = [
        (torch.ones(2, 3, dtype=torch.long), TypeError,
         "pass the tokenizer's encoding (input_ids and attention_mask), not a bare tensor"),
        ([[2, 5, 3]], TypeError, "batch must be a tokenizer's BatchEncoding or a dict (or pixel_values), got list"),
        ({"attention_mask": [[1, 1]], "labels": [0]}, KeyError,
         "a text batch needs 'input_ids' (a tokenizer's output); it has ['attention_mask', 'labels']"),
        ({"input_ids": [2, 5, 3]}, ValueError,
         "input_ids must be [B, L]; tokenize a list of texts, or add a batch dimension"),
        ({"input_ids": [[2, 5, 3, 3], [2, 5, 3, 3]], "attention_mask": [[1, 1, 1], [1, 1, 1]]}, ValueError,
         "attention_mask (2, 3) does not match input_ids (2, 4)"),
    ]
    for batch, error, text in cases:
        with pytest.raises(error) as excinfo:
            adapter.captum_inputs(batch, level="token")
        assert message(excinfo) == text


def test_image_batches_are_pixels_alone_or_in_a_dict_with_labels(vit):
    adapter = HuggingFaceAdapter(vit)
    pixels = torch.rand(2, 3, 16, 16)
    (read,), args = adapter.captum_inputs(pixels)
    assert torch.equal(read, pixels) and args == ()
    (read,), args = adapter.captum_inputs({"pixel_values": pixels, "labels": torch.tensor([2, 0])})
    assert torch.equal(read, pixels) and args == ()
    labelled = {"pixel_values": pixels, "labels": torch.tensor([2, 0])}
    assert adapter.captum_target(labelled, mode="label").tolist() == [2, 0]
    with torch.no_grad():
        torch.testing.assert_close(adapter(pixels), vit(pixel_values=pixels).logits)
    with pytest.raises(ValueError) as excinfo:
        adapter(pixels, torch.ones(2, 4))
    assert message(excinfo) == "image models take no additional forward args, got 1"


def test_image_batches_that_cannot_be_read_are_refused_with_the_fix(vit):
    adapter = HuggingFaceAdapter(vit)
    cases = [
        ({"labels": torch.tensor([0])}, KeyError, "an image batch needs 'pixel_values'; it has ['labels']"),
        (torch.rand(3, 16, 16), ValueError,
         "pixel_values must be a tensor [B, C, H, W], got torch.Size([3, 16, 16]); for one image add the batch "
         "dimension: pixels[None]"),
        (torch.rand(1, 1, 3, 16, 16), ValueError,
         "pixel_values must be a tensor [B, C, H, W], got torch.Size([1, 1, 3, 16, 16])"),
        ({"pixel_values": [[1.0]]}, ValueError, "pixel_values must be a tensor [B, C, H, W], got list"),
    ]
    for batch, error, text in cases:
        with pytest.raises(error) as excinfo:
            adapter.captum_inputs(batch)
        assert message(excinfo) == text


def refusal(adapter, batch) -> str:
    with pytest.raises(KeyError) as excinfo:
        adapter.captum_inputs(batch, level="token")
    return message(excinfo)


def test_encoding_keys_the_model_would_not_get_are_refused_with_hints(bert):
    adapter = HuggingFaceAdapter(bert)
    ids, mask = torch.tensor([[2, 5, 3]]), torch.tensor([[1, 1, 1]])
    reads = "it reads ['input_ids', 'attention_mask', 'token_type_ids', 'labels']. Rename or drop them"
    assert refusal(adapter, {"input_ids": ids, "mask": mask, "segment_ids": mask}) == (
        "the batch has keys ['mask', 'segment_ids'] that HuggingFaceAdapter does not pass to "
        f"BertForSequenceClassification, which would run without them; {reads} ('mask' -> 'attention_mask', "
        "'segment_ids' -> 'token_type_ids')"
    )
    assert refusal(adapter, {"input_ids": ids, "attention_mask": mask, "mask": mask, "position_ids": mask}) == (
        "the batch has keys ['mask', 'position_ids'] that HuggingFaceAdapter does not pass to "
        f"BertForSequenceClassification, which would run without them; {reads}"
    )
    extras = {"special_tokens_mask": mask, "offset_mapping": mask, "length": mask, "overflow_to_sample_mapping": mask}
    batch = {"input_ids": ids, "attention_mask": mask, "labels": [1], **extras}
    (read,), args = adapter.captum_inputs(batch, level="token")
    assert torch.equal(read, ids) and len(args) == 1


def test_a_model_without_token_types_ignores_them_and_reads_fewer_keys(no_types):
    adapter = HuggingFaceAdapter(no_types)
    ids = torch.tensor([[2, 5, 3]])
    assert refusal(adapter, {"input_ids": ids, "token_type_ids": ids, "segment_ids": ids}) == (
        "the batch has keys ['segment_ids'] that HuggingFaceAdapter does not pass to "
        "NoTypesBertForSequenceClassification, which would run without them; it reads ['input_ids', 'attention_mask', "
        "'labels']. Rename or drop them"
    )


def test_image_batches_read_only_pixels_and_labels(vit):
    adapter = HuggingFaceAdapter(vit)
    pixels = torch.rand(1, 3, 16, 16)
    reads = "it reads ['pixel_values', 'labels']. Rename or drop them"
    assert refusal(adapter, {"image": pixels, "token_type_ids": pixels}) == (
        "the batch has keys ['image', 'token_type_ids'] that HuggingFaceAdapter does not pass to "
        f"ViTForImageClassification, which would run without them; {reads} ('image' -> 'pixel_values')"
    )
    assert refusal(adapter, {"pixel_values": pixels, "input_ids": pixels}) == (
        "the batch has keys ['input_ids'] that HuggingFaceAdapter does not pass to ViTForImageClassification, which "
        f"would run without them; {reads}"
    )


def test_likely_key_of_each_kind_of_name():
    expected = {
        "MASK": "attention_mask", "input_mask": "attention_mask", "segment_ids": "token_type_ids",
        "Types": "token_type_ids",
        "label": "labels", "targets": "labels", "ids": "input_ids", "input": "input_ids", "inputs": "input_ids",
        "tokens": "input_ids", "token_ids": "input_ids", "pixels": "pixel_values", "Images": "pixel_values",
        "position_ids": None, "input_values": None,
    }
    assert {key: hf._likely_key(key) for key in expected} == expected


def test_per_sample_args_and_prefix_by_kind(bert, vit):
    text, image = HuggingFaceAdapter(bert), HuggingFaceAdapter(vit)
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    assert text._per_sample_args((a, b, c, 5, a)) == [("the attention_mask", a), ("the token_type_ids", b),
                                                       ("additional forward arg 2", c), ("additional forward arg 4", a)]
    assert (image._prefix(18, 16), image._prefix(16, 16), image._prefix(15, 16)) == (2, 0, 0)
    assert (text._prefix(18, 16), text._prefix(16, 16)) == (0, 0)


# --------------------------------------------------------------------------------------- HuggingFaceAdapter: display


def test_class_names_labels_and_probabilities(bert, monkeypatch):
    adapter = HuggingFaceAdapter(bert)
    assert adapter.class_names() == {0: "low", 1: "mid", 2: "high"}
    assert adapter.true_classes({"labels": torch.tensor([2, 0])}) == ["high", "low"]
    assert adapter.true_classes({"labels": [1]}) == ["mid"]
    assert adapter.true_classes({"labels": torch.tensor([[1, 0, 1], [0, 0, 0]])}) == ["low,high", ""]
    assert adapter.true_classes({"input_ids": torch.ones(1, 2)}) is None
    assert adapter.true_classes(torch.ones(1, 2)) is None
    logits = torch.tensor([[0.0, math.log(3.0), 0.0]])
    torch.testing.assert_close(adapter.probabilities(logits), torch.tensor([[0.2, 0.6, 0.2]]))
    torch.testing.assert_close(adapter.probabilities(torch.tensor([[math.log(3.0)]])), torch.tensor([[0.75]]))
    monkeypatch.setattr(bert.config, "problem_type", "multi_label_classification")
    torch.testing.assert_close(adapter.probabilities(logits), torch.tensor([[0.5, 0.75, 0.5]]))
    assert adapter.true_classes({"labels": torch.tensor([1, 5])}) == ["mid", "5"]  # a class without a name
    assert adapter.true_classes({"labels": torch.tensor([[1, 1], [0, 1]])}) == ["low,mid", "mid"]  # two labels
    assert adapter.true_classes({"labels": torch.tensor([[0, 0, 1, 1, 0, 1]])}) == ["high,3,5"]
    monkeypatch.setattr(bert, "config", SimpleNamespace())  # neither id2label nor problem_type
    assert adapter.class_names() == {}
    torch.testing.assert_close(adapter.probabilities(logits), torch.tensor([[0.2, 0.6, 0.2]]))


def test_records_use_the_tokenizer_given_for_them_and_pass_the_options(bert, tokenizer):
    bare = HuggingFaceAdapter(bert)
    batch = {"input_ids": torch.tensor([[2, 5, 3], [2, 7, 3]]), "attention_mask": torch.ones(2, 3, dtype=torch.long),
             "labels": torch.tensor([0, 2])}
    scores = torch.tensor([[1.0, 2.0, -4.0], [0.0, 0.5, 0.25]])
    with torch.no_grad():
        predicted = bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(1)
    target = (predicted + 1) % 3  # not the predicted class
    records = bare.visualization_records(batch, scores, target, method="M", delta=torch.tensor([0.5, 0.25]),
                                         tokenizer=tokenizer)
    assert bare.tokenizer is None and [r.raw_input_ids for r in records] == [["[CLS]", "fever", "[SEP]"],
                                                                              ["[CLS]", "rash", "[SEP]"]]
    names = ["low", "mid", "high"]
    assert [r.attr_class for r in records] == [f"{names[t]} (M)" for t in target.tolist()]
    assert [r.pred_class for r in records] == [names[p] for p in predicted.tolist()]
    assert [r.method for r in records] == ["M", "M"]
    assert [r.convergence_score for r in records] == [0.5, 0.25] and [r.true_class for r in records] == ["low", "high"]
    assert [r.word_attributions.tolist() for r in records] == [[0.25, 0.5, -1.0], [0.0, 1.0, 0.5]]
    assert bare.visualization_records(batch, scores)[0].raw_input_ids == ["#2", "#5", "#3"]
    with_tokenizer = HuggingFaceAdapter(bert, tokenizer=tokenizer)
    assert with_tokenizer.visualization_records(batch, scores)[1].raw_input_ids == ["[CLS]", "rash", "[SEP]"]


def test_embedding_baselines_put_the_reference_embedding_on_real_tokens(bert, tokenizer, monkeypatch):
    monkeypatch.setattr(bert.config, "pad_token_id", 3)  # a pad token whose embedding is not zero
    adapter = HuggingFaceAdapter(bert, tokenizer=tokenizer)
    weight = bert.get_input_embeddings().weight.detach()
    ids, mask = torch.tensor([[2, 5, 3, 0], [2, 0, 6, 3]]), torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1]])
    x = weight[ids] + 1.0
    real = mask.bool().unsqueeze(-1)
    for reference, token in (("unk", 1), ("mask", 4), ("pad", 3)):
        (baseline,) = adapter.baselines((x,), (mask,), reference)
        torch.testing.assert_close(baseline, torch.where(real, weight[token].expand_as(x), x), msg=reference)
    (zero,) = adapter.baselines((x,), (mask,), "zero")
    torch.testing.assert_close(zero, torch.where(real, torch.zeros_like(x), x))
    (half,) = adapter.baselines((x.bfloat16(),), (mask,))
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half, torch.where(real, weight[1].expand_as(x), x).bfloat16())
    (tokens,) = adapter.baselines((ids,), (mask,), "pad")
    assert tokens.tolist() == [[3, 3, 3, 0], [3, 0, 3, 3]]
    (tokens,) = adapter.baselines((ids,), (mask,), "mask")
    assert tokens.tolist() == [[4, 4, 4, 0], [4, 0, 4, 4]]


def test_image_baselines_are_black_or_blurred_by_a_quarter_patch(vit):
    from captum_chefer.adapters.torch import blurred_images

    adapter = HuggingFaceAdapter(vit)
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    (black,) = adapter.baselines((pixels,), (), "zero")
    assert torch.equal(black, torch.zeros(2, 3, 16, 16))
    (blurred,) = adapter.baselines((pixels,), (), "blur")
    torch.testing.assert_close(blurred, blurred_images(pixels, 2.0))  # patches of 8


def test_references_without_their_token_are_refused_with_the_fix(gpt2, bert):
    ids, mask = torch.tensor([[5, 6]]), torch.tensor([[1, 1]])
    with pytest.raises(ValueError) as excinfo:
        HuggingFaceAdapter(gpt2).baselines((ids,), (mask,), "pad")
    assert message(excinfo) == (
        "GPT2ForSequenceClassification has no pad token; use reference='zero' or pass a tokenizer with one"
    )
    (padded,) = HuggingFaceAdapter(bert).baselines((ids,), (mask,), "pad")  # the config's pad id, no tokenizer
    assert padded.tolist() == [[0, 0]]
    for tokenizer in (None, SimpleNamespace(pad_token_id=0)):
        with pytest.raises(ValueError) as excinfo:
            HuggingFaceAdapter(bert, tokenizer=tokenizer).baselines((ids,), (mask,), "mask")
        assert message(excinfo) == (
            "reference 'mask' needs the tokenizer's mask_token_id: HuggingFaceAdapter(model, tokenizer=...), or use "
            "reference='pad' or 'zero'"
        )


def test_baselines_default_to_the_unknown_token_and_refuse_other_references(bert, vit, tokenizer):
    adapter = HuggingFaceAdapter(bert, tokenizer=tokenizer)
    ids, mask = torch.tensor([[2, 5, 3, 0]]), torch.tensor([[1, 1, 1, 0]])
    (unk,) = adapter.baselines((ids,), (mask,))
    assert unk.tolist() == [[1, 1, 1, 0]]
    (zero,) = adapter.baselines((ids,), (mask,), "zero")
    assert zero.tolist() == [[0, 0, 0, 0]]
    with pytest.raises(ValueError) as excinfo:
        adapter.baselines((ids,), (mask,), "blur")
    assert message(excinfo) == "text baselines are 'unk', 'mask', 'pad' or 'zero', got 'blur'"
    with pytest.raises(ValueError) as excinfo:
        HuggingFaceAdapter(vit).baselines((torch.zeros(1, 3, 16, 16),), (), "unk")
    assert message(excinfo) == "image baselines are 'zero' or 'blur', got 'unk'"


# ---------------------------------------------------------------------------------------------- PyHealth media models


def test_media_adapter_of_a_torchvision_vit(vision_model):
    adapter = media.media_adapter(vision_model)
    assert type(adapter) is TransformerAdapter and adapter.model is vision_model.model
    assert (adapter.pool, adapter.prefix_tokens, adapter.patch_size, adapter.feature_keys) == ("first", 1, 8, ["image"])
    assert adapter.num_outputs == 5  # PyHealth's output size, not the network's last layer (4)


def test_media_adapter_refuses_torchvision_models_without_patch_attention():
    from pyhealth.models import TorchvisionModel

    class VisionTransformer(nn.Module):  # torchvision's class name, not torchvision's class
        patch_size = 8

    for network in (torchvision.ops.MLP(4, [4]), VisionTransformer()):
        model = pyhealth_model(TorchvisionModel, "image", 2, model=network, model_name="resnet18")
        with pytest.raises(ValueError) as excinfo:
            media.media_adapter(model)
        assert message(excinfo) == (
            "PyHealthAdapter supports TorchvisionModel's ViT variants (vit_b_16, vit_b_32, vit_l_16, vit_l_32, "
            "vit_h_14); 'resnet18' has no attention over patch tokens for Chefer relevance. For ResNet, DenseNet or "
            "Swin use a gradient method on the network, e.g. captum.attr.IntegratedGradients(model.model) or "
            "Saliency(model.model) on the batch's images"
        )


def test_media_adapter_of_a_transformers_model_and_of_other_models(text_model, tokenizer):
    from pyhealth.models import BaseModel

    class Codes(BaseModel):
        def forward(self, **kwargs):
            return {}

    assert media.media_adapter(pyhealth_model(Codes, "codes", 2)) is None
    assert media.media_adapter(nn.Linear(2, 2)) is None
    adapter = media.media_adapter(text_model)
    encoder = text_model.model
    assert type(adapter) is media._TransformersModelAdapter and adapter.model is text_model
    assert (adapter.kind, adapter.pool, adapter.prefix_tokens) == ("encoder", "first", 0)
    assert (adapter.pad_id, adapter.mask_arg) == (0, 0)
    assert adapter.embedding is encoder.get_input_embeddings() and adapter.feature_keys == ["text"]
    assert adapter.num_outputs == 3 and adapter.tokenizer is tokenizer and adapter._callee is encoder  # not 7
    assert adapter._carries_ids is False and adapter._takes_token_types
    ids, mask = torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with torch.no_grad():
        expected = text_model.fc(encoder(input_ids=ids, attention_mask=mask).pooler_output)
        torch.testing.assert_close(adapter(ids, mask), expected)
    assert media._parameters(lambda a, b=1, *c, d: 0) == {"a", "b", "c", "d"}


def test_a_transformers_model_without_a_pooler_is_refused(tokenizer):
    from pyhealth.models import TransformersModel

    distilbert = transformers.DistilBertConfig(vocab_size=15, dim=16, n_layers=1, n_heads=2, hidden_dim=32)
    for encoder in (transformers.BertModel(transformers.BertConfig(**TINY_BERT), add_pooling_layer=False),
                    transformers.DistilBertModel(distilbert)):  # a pooler of None, no pooler at all
        model = pyhealth_model(TransformersModel, "text", 2, model=encoder, tokenizer=tokenizer)
        with pytest.raises(ValueError) as excinfo:
            media.media_adapter(model)
        assert message(excinfo) == (
            f"{type(encoder).__name__} has no pooler: TransformersModel reads pooler_output, which it does not give"
        )


def test_a_transformers_model_whose_tokenizer_has_no_pad_token(text_model, monkeypatch):
    monkeypatch.setattr(text_model, "tokenizer", SimpleNamespace())
    assert media.media_adapter(text_model).pad_id is None


def test_media_batch_of_images_repeats_one_channel_onto_the_models_device(vision_model):
    grey, colour = torch.rand(2, 1, 16, 16), torch.rand(2, 3, 16, 16)
    repeated = media.media_batch(vision_model, {"image": grey, "label": torch.tensor([0, 1])})
    assert repeated.shape == (2, 3, 16, 16) and all(torch.equal(repeated[:, c], grey[:, 0]) for c in range(3))
    assert torch.equal(media.media_batch(vision_model, {"image": colour}), colour)
    with replaced(vision_model, "_dummy_param", nn.Parameter(torch.empty(0, device="meta"))):
        on_meta = media.media_batch(vision_model, {"image": grey})
    assert on_meta.device.type == "meta" and on_meta.shape == (2, 3, 16, 16)


def test_media_batch_refuses_what_is_not_an_image_batch(vision_model):
    cases = [
        ([torch.rand(1, 3, 16, 16)], TypeError, "batch must be a dict from pyhealth.datasets.get_dataloader, got list"),
        ({"x": 1, "label": 0}, KeyError,
         "the batch has no feature 'image'; the model needs ['image'], the batch has ['label', 'x']"),
        ({"image": torch.rand(3, 16, 16)}, TypeError,
         "feature 'image' must be a float image tensor [B, C, H, W], got torch.Size([3, 16, 16])"),
        ({"image": torch.ones(1, 3, 16, 16, dtype=torch.long)}, TypeError,
         "feature 'image' must be a float image tensor [B, C, H, W], got torch.Size([1, 3, 16, 16])"),
        ({"image": [[1.0]]}, TypeError, "feature 'image' must be a float image tensor [B, C, H, W], got list"),
    ]
    for batch, error, text in cases:
        with pytest.raises(error) as excinfo:
            media.media_batch(vision_model, batch)
        assert message(excinfo) == text


def test_media_batch_of_texts_is_the_tokenizers_padded_encoding(text_model):
    # [CLS] 2, [SEP] 3, [PAD] 0; fever 5, cough 6, rash 7
    encoding = media.media_batch(text_model, {"text": ["fever cough", "rash"], "label": [0, 1]})
    assert {k: v.tolist() for k, v in encoding.items()} == {
        "input_ids": [[2, 5, 6, 3], [2, 7, 3, 0]], "token_type_ids": [[0, 0, 0, 0], [0, 0, 0, 0]],
        "attention_mask": [[1, 1, 1, 1], [1, 1, 1, 0]],
    }
    assert media.media_batch(text_model, {"text": "rash"})["input_ids"].tolist() == [[2, 7, 3]]
    assert media.media_batch(text_model, {"text": ("rash", "fever")})["input_ids"].tolist() == [[2, 7, 3], [2, 5, 3]]
    for value, name in (([], "list"), (["rash", 3], "list"), (("rash", b"x"), "tuple")):
        with pytest.raises(TypeError) as excinfo:
            media.media_batch(text_model, {"text": value})
        assert message(excinfo) == f"feature 'text' must be a list of texts, got {name}"
    with replaced(text_model, "_dummy_param", nn.Parameter(torch.empty(0, device="meta"))):
        encoding = media.media_batch(text_model, {"text": ["rash"]})
    assert {v.device.type for v in encoding.values()} == {"meta"}


def test_media_batch_refuses_a_text_feature_that_is_a_number(text_model):
    with pytest.raises(TypeError) as excinfo:
        media.media_batch(text_model, {"text": 5})
    assert message(excinfo) == "feature 'text' must be a list of texts, got int"


def test_decoder_classifiers_that_hand_over_to_their_parent_pool_the_last_token():
    from captum_chefer.adapters.huggingface import _pools_last_token

    # Gemma3's and Qwen3.5's classifiers are `return super().forward(...)` over a forward that pools the last
    # non-pad token; BERT's pools [CLS]; comments naming super() or the last token change nothing
    assert _pools_last_token(transformers.Gemma3ForSequenceClassification)
    assert _pools_last_token(transformers.Qwen3_5ForSequenceClassification)
    assert _pools_last_token(transformers.GPT2ForSequenceClassification)
    assert not _pools_last_token(transformers.BertForSequenceClassification)

    class Commented(transformers.BertForSequenceClassification):
        def forward(self, *args, **kwargs):  # unlike super(), this one pools last_non_pad_token
            return None

    assert not _pools_last_token(Commented)


def test_a_decoded_token_s_code_is_its_text_unless_given():
    plain = DecodedToken("conditions", "C1", (0,))
    assert (plain.code, plain.text) == ("C1", "C1")
    nested = DecodedToken("procedures", "v2:P7", (1, 0), code="P7")  # the display adds the visit, the code not
    assert (nested.code, nested.text, nested.index) == ("P7", "v2:P7", (1, 0))
    assert DecodedToken("procedures", "v2:P7", (1, 0), code="").code == ""  # given, even if empty
