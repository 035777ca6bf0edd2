"""Bad input gets an error that names the problem and the fix, never an IndexError from inside torch."""

from __future__ import annotations

import pytest
import torch

from captum_chefer import CheferAttribution, PyHealthAdapter
from captum_chefer.synthetic import quiet_pyhealth
from conftest import first_batch, make_dataset


@pytest.fixture
def adapter(seq_model):
    return PyHealthAdapter(seq_model)


def attribute(adapter, inputs, args, target=None):
    return CheferAttribution(adapter).attribute(inputs, target=target, additional_forward_args=args)


def test_not_a_pyhealth_model():
    with pytest.raises(TypeError, match="PyHealth model"):
        PyHealthAdapter(torch.nn.Linear(2, 1))
    with pytest.raises(TypeError, match=r"adapter_for\(model\)"):
        CheferAttribution(torch.nn.Linear(2, 1))
    with pytest.raises(TypeError, match="CheferAttribution needs"):
        CheferAttribution(lambda x: x)


def test_pyhealth_model_that_cannot_be_run_is_refused_when_wrapped(seq_dataset):
    from pyhealth.models import RNN

    with quiet_pyhealth():
        rnn = RNN(dataset=seq_dataset, embedding_dim=8, hidden_dim=8)
    assert not hasattr(rnn, "forward_from_embedding")  # what every method would call, and fail on
    with pytest.raises(TypeError, match=r"RNN cannot be explained.*no forward_from_embedding.*Transformer"):
        PyHealthAdapter(rnn)


def test_pyhealth_model_without_attention_runs_gradient_methods_but_not_chefer():
    from captum.attr import Saliency
    from pyhealth.models import MLP

    dataset = make_dataset("sequence")
    with quiet_pyhealth():
        from pyhealth.datasets import create_sample_dataset

        from conftest import make_samples

        flat = create_sample_dataset(
            samples=[{k: v for k, v in s.items() if k != "procedures"} for s in make_samples("sequence")],
            input_schema={"conditions": "sequence"}, output_schema={"label": "binary"}, dataset_name="flat",
        )
        mlp = MLP(dataset=flat, embedding_dim=8, hidden_dim=8).eval()
    adapter = PyHealthAdapter(mlp)
    batch = first_batch(flat)
    inputs, args = adapter.captum_inputs(batch)
    assert torch.allclose(adapter(*inputs, *args), mlp(**batch)["logit"])
    assert Saliency(adapter).attribute(inputs, additional_forward_args=args)[0].shape == inputs[0].shape
    with pytest.raises(ValueError, match=r"no attention layers.*IntegratedGradients"):
        CheferAttribution(adapter)
    del dataset


def test_code_ids_given_to_a_gradient_method(adapter, seq_batch):
    from captum.attr import IntegratedGradients

    ids, args = adapter.captum_inputs(seq_batch, level="token")
    with pytest.raises(ValueError, match=r"'conditions' has the shape of its code ids.*captum_inputs\(batch\).*"
                                          r"LayerIntegratedGradients\(adapter, adapter.embedding_layers\)"):
        IntegratedGradients(adapter).attribute(ids, additional_forward_args=args, n_steps=4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs(adapter, seq_batch, bad):
    from captum.attr import Saliency

    inputs, args = adapter.captum_inputs(seq_batch)
    poisoned = inputs[0].clone()
    poisoned[0, 0, 0] = bad
    for method in (CheferAttribution(adapter), Saliency(adapter)):
        with pytest.raises(ValueError, match="'conditions' holds 1 NaN or infinite value"):
            method.attribute((poisoned, inputs[1]), additional_forward_args=args)


def test_layers_beyond_the_depth(adapter, seq_batch):
    inputs, args = adapter.captum_inputs(seq_batch)
    method = CheferAttribution(adapter)
    with pytest.raises(ValueError, match=r"layers=5 asks for more.*'conditions' has 2.*between 1 and 2"):
        method.attribute(inputs, additional_forward_args=args, layers=5)
    assert method.attribute(inputs, additional_forward_args=args, layers=2)[0].shape == inputs[0].shape


def test_batch_missing_a_feature_key(adapter, seq_batch):
    batch = {k: v for k, v in seq_batch.items() if k != "procedures"}
    with pytest.raises(KeyError, match="no feature 'procedures'"):
        adapter.captum_inputs(batch)


def test_batch_holding_the_wrong_type(adapter, seq_batch):
    with pytest.raises(TypeError, match="'conditions' must be a tensor of code ids"):
        adapter.captum_inputs({**seq_batch, "conditions": seq_batch["conditions"].tolist()})
    with pytest.raises(TypeError, match="code ids"):
        adapter.captum_inputs({**seq_batch, "conditions": seq_batch["conditions"].float()})
    with pytest.raises(TypeError, match="batch must be a dict"):
        adapter.captum_inputs([seq_batch])
    with pytest.raises(ValueError, match="must have 3 dims"):
        adapter.captum_inputs({**seq_batch, "procedures": seq_batch["conditions"]})


def test_stagenet_feature_without_times(stage_dataset):
    from conftest import make_model

    adapter = PyHealthAdapter(make_model(stage_dataset, "stagenet", heads=1))
    batch = first_batch(stage_dataset)
    with pytest.raises(TypeError, match=r"\(time, codes\) tuple"):
        adapter.captum_inputs({**batch, "codes": batch["codes"][1]})


def test_label_asked_for_but_absent(adapter, seq_batch):
    batch = {k: v for k, v in seq_batch.items() if k != "label"}
    with pytest.raises(ValueError, match=r"needs the label 'label'.*mode='predicted'"):
        adapter.captum_target(batch, mode="label")
    assert adapter.captum_target(batch) is None  # binary: the one logit, no label needed


def test_label_target_for_multiclass():
    from conftest import make_model

    dataset = make_dataset("sequence", n=6, n_classes=3)
    batch = first_batch(dataset)
    adapter = PyHealthAdapter(make_model(dataset))
    assert torch.equal(adapter.captum_target(batch, mode="label"), batch["label"].view(-1))


def test_unknown_target_mode(adapter, seq_batch):
    with pytest.raises(ValueError, match="'predicted' or 'label'"):
        adapter.captum_target(seq_batch, mode="true")


def test_unknown_level(adapter, seq_batch):
    with pytest.raises(ValueError, match="'embedding' or 'token'"):
        adapter.captum_inputs(seq_batch, level="visit")


def test_wrong_number_of_input_tensors(adapter, seq_batch):
    inputs, args = adapter.captum_inputs(seq_batch)
    with pytest.raises(ValueError, match=r"expected 2 input tensors.*captum_inputs"):
        attribute(adapter, inputs[:1], args)
    with pytest.raises(ValueError, match="expected 2 input tensors"):
        adapter(*inputs)  # additional forward args forgotten


def test_inputs_with_different_batch_sizes(adapter, seq_batch):
    inputs, args = adapter.captum_inputs(seq_batch)
    message = r"different batch sizes \(input 'conditions' 3, mask of 'conditions' 6, .*one adapter.captum_inputs"
    with pytest.raises(ValueError, match=message):
        attribute(adapter, (inputs[0][:3], inputs[1]), args)
    with pytest.raises(
        ValueError, match=r"'conditions' 3, mask of 'conditions' 3, input 'procedures' 6, mask of 'procedures' 6"
    ):
        attribute(adapter, (inputs[0][:3], inputs[1]), (args[0][:3], args[1]))
    from captum.attr import Saliency

    with pytest.raises(ValueError, match="different batch sizes"):
        Saliency(adapter).attribute(inputs, additional_forward_args=(args[0], args[1][:2]))
    batch = {**seq_batch, "conditions": seq_batch["conditions"][:3]}
    with pytest.raises(ValueError, match="different batch sizes"):
        adapter.captum_inputs(batch)


def test_inputs_and_masks_of_different_shapes(adapter, seq_batch):
    inputs, args = adapter.captum_inputs(seq_batch)
    with pytest.raises(ValueError, match=r"'conditions' has shape .* mask implies"):
        attribute(adapter, (inputs[0][:, :2], inputs[1]), args)


@pytest.mark.parametrize("target", [1, 5, -1, [0, 0], torch.tensor([0, 1, 0, 0, 0, 0])])
def test_target_out_of_range_or_misshapen(adapter, seq_batch, target):
    inputs, args = adapter.captum_inputs(seq_batch)
    with pytest.raises(ValueError, match=r"out of range|one per sample"):
        attribute(adapter, inputs, args, target=target)


def test_target_required_for_multiclass_and_must_be_integer():
    from conftest import make_model

    dataset = make_dataset("sequence", n=6, n_classes=3)
    adapter = PyHealthAdapter(make_model(dataset))
    inputs, args = adapter.captum_inputs(first_batch(dataset))
    with pytest.raises(ValueError, match=r"target is required.*captum_target"):
        attribute(adapter, inputs, args, target=None)
    with pytest.raises(TypeError, match="integer class indices"):
        attribute(adapter, inputs, args, target=torch.ones(6))


def test_empty_batch(adapter, seq_batch):
    batch = {**seq_batch, "conditions": seq_batch["conditions"][:0], "procedures": seq_batch["procedures"][:0]}
    with pytest.raises(ValueError, match="empty"):
        adapter.captum_inputs(batch)


def test_bad_options(adapter, seq_batch):
    inputs, args = adapter.captum_inputs(seq_batch)
    method = CheferAttribution(adapter)
    with pytest.raises(ValueError, match="layers"):
        method.attribute(inputs, additional_forward_args=args, layers=0)
    with pytest.raises(ValueError, match="propagation"):
        method.attribute(inputs, additional_forward_args=args, propagation="sparse")
    with pytest.raises(ValueError, match="head_reduction"):
        method.attribute(inputs, additional_forward_args=args, head_reduction="median")


def test_feature_dict_of_the_wrong_shape(adapter, seq_batch):
    inputs, _ = adapter.captum_inputs(seq_batch)
    with pytest.raises(ValueError, match="one per feature key"):
        adapter.to_feature_dict(inputs[:1])
    with pytest.raises(ValueError, match="expected 2 dims"):
        adapter.to_feature_dict((inputs[0][0, :, 0], inputs[1]))


def test_zero_baseline_warning_fires_once_per_adapter_and_not_with_proper_baselines(seq_model, seq_batch):
    import warnings

    from captum.attr import IntegratedGradients, LayerIntegratedGradients, NoiseTunnel, Saliency

    from captum_chefer import ig_baselines
    from captum_chefer.adapters.base import ZeroBaselineWarning

    def zero_baseline_warnings(run):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
        return [w for w in caught if issubclass(w.category, ZeroBaselineWarning)]

    adapter = PyHealthAdapter(seq_model)
    inputs, args = adapter.captum_inputs(seq_batch)
    ids, _ = adapter.captum_inputs(seq_batch, level="token")
    ig = IntegratedGradients(adapter)

    def proper():
        return ig.attribute(inputs, baselines=ig_baselines(adapter, inputs, args), additional_forward_args=args,
                            n_steps=4)

    def lig_proper():
        return LayerIntegratedGradients(adapter, adapter.embedding_layers).attribute(
            ids, baselines=ig_baselines(adapter, ids, args), additional_forward_args=args, n_steps=4)

    def others():
        return (Saliency(adapter).attribute(inputs, additional_forward_args=args),
                CheferAttribution(adapter).attribute(inputs, additional_forward_args=args))

    assert zero_baseline_warnings(proper) == [] and zero_baseline_warnings(lig_proper) == []
    assert zero_baseline_warnings(others) == []

    def default():
        return ig.attribute(inputs, additional_forward_args=args, n_steps=4, internal_batch_size=8)

    (warning,) = zero_baseline_warnings(default)
    assert "all-zero baseline" in str(warning.message) and "ig_baselines(adapter, inputs" in str(warning.message)
    assert zero_baseline_warnings(default) == []  # once per adapter
    assert zero_baseline_warnings(
        lambda: ig.attribute(inputs, baselines=(0.0, 0), additional_forward_args=args, n_steps=4)
    ) == []

    # a fresh adapter warns again; so do the zero baselines of LayerIntegratedGradients and NoiseTunnel(IG)
    for run in (
        lambda a: LayerIntegratedGradients(a, a.embedding_layers).attribute(
            ids, additional_forward_args=args, n_steps=4
        ),
        lambda a: NoiseTunnel(IntegratedGradients(a)).attribute(inputs, additional_forward_args=args, n_steps=4,
                                                                 nt_samples=2, stdevs=0.01),
        lambda a: IntegratedGradients(a).attribute(inputs, baselines=tuple(torch.zeros_like(x) for x in inputs),
                                                   additional_forward_args=args, n_steps=4),
    ):
        fresh = PyHealthAdapter(seq_model)
        assert len(zero_baseline_warnings(lambda run=run, fresh=fresh: run(fresh))) == 1


@pytest.mark.parametrize("target", [True, False])
def test_bool_target(adapter, seq_batch, target):
    inputs, args = adapter.captum_inputs(seq_batch)
    with pytest.raises(TypeError, match=r"^target must be an int, a sequence of ints or a tensor, not a bool$"):
        attribute(adapter, inputs, args, target=target)


def test_pooling_that_cannot_be_inferred(seq_dataset, seq_batch):
    from pyhealth.models import BaseModel
    from pyhealth.models.embedding import EmbeddingModel
    from pyhealth.models.transformer import TransformerLayer

    class CustomAttention(BaseModel):
        """PyHealth attention layers per feature key, in a model that is neither Transformer nor StageAttentionNet."""

        def __init__(self, dataset):
            super().__init__(dataset=dataset)
            self.embedding_model = EmbeddingModel(dataset, embedding_dim=8)
            self.transformer = torch.nn.ModuleDict({k: TransformerLayer(8, heads=1) for k in self.feature_keys})

        def forward_from_embedding(self, **kwargs):  # what PyHealthAdapter needs to run a model
            raise NotImplementedError

    model = CustomAttention(seq_dataset)
    adapter = PyHealthAdapter(model, pooling=None)
    assert adapter.pooling is None
    with pytest.raises(ValueError, match=r"^pass pooling='first' or 'last' to PyHealthAdapter for CustomAttention$"):
        CheferAttribution(adapter)
    with pytest.raises(ValueError, match=r"^pass pooling='first' or 'last' to PyHealthAdapter for CustomAttention$"):
        adapter.attention_forward(*adapter.captum_inputs(seq_batch, level="token"))
    assert PyHealthAdapter(model, pooling="first").pooling == "first"
    CheferAttribution(PyHealthAdapter(model, pooling="last"))  # told the pooling, the model is accepted
