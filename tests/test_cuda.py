"""The adapter and the attribution methods on CUDA tensors (skipped where torch sees no CUDA device).

Each result is compared with an independent one: PyHealth's ``CheferRelevance`` on the same GPU model,
or the same Captum method on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from captum.attr import IntegratedGradients, LayerIntegratedGradients, Saliency
from test_equivalence import assert_matches, pyhealth_reference, with_explicit_masks

from captum_chefer import CheferAttribution, HuggingFaceAdapter, PyHealthAdapter
from conftest import first_batch, make_dataset, make_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
ATOL = 1e-4  # the GPU sums in another order


@pytest.fixture(autouse=True)
def exact_matmul():
    """TF32 would round products to 10 bits of mantissa; the comparisons here are in float32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize(
    "fmt, kind", [("sequence", "transformer"), ("stagenet_nested", "stagenet")],
    ids=["Transformer", "StageAttentionNet"],
)
@pytest.mark.parametrize("level", ["embedding", "token"])
def test_chefer_on_cuda_matches_pyhealth_on_cuda(fmt, kind, level):
    dataset = make_dataset(fmt, n=10, n_classes=3, seed=11)
    model = make_model(dataset, kind, layers=3, heads=2, seed=11).to("cuda")
    batch = first_batch(dataset, batch_size=7)
    adapter = PyHealthAdapter(model)
    inputs, args = adapter.captum_inputs(batch, level=level)
    assert all(t.device.type == "cuda" for t in inputs + args)
    attributions = CheferAttribution(adapter).attribute(
        inputs, target=adapter.captum_target(batch), additional_forward_args=args
    )
    assert all(a.device.type == "cuda" and a.shape == x.shape for a, x in zip(attributions, inputs, strict=True))
    reference = pyhealth_reference(model, with_explicit_masks(batch) if kind == "stagenet" else batch)
    result = {k: v.cpu() for k, v in adapter.to_feature_dict(attributions).items()}
    assert_matches(result, {k: v.cpu() for k, v in reference.items()}, batch)


def test_captum_methods_through_the_adapter_on_cuda_match_the_cpu():
    dataset = make_dataset("sequence", n=8, n_classes=3, seed=12)
    model = make_model(dataset, layers=2, heads=2, seed=12)
    batch = first_batch(dataset, batch_size=6)

    def run(device: str) -> dict[str, tuple[torch.Tensor, ...]]:
        adapter = PyHealthAdapter(model.to(device))
        inputs, args = adapter.captum_inputs(batch)
        ids, _ = adapter.captum_inputs(batch, level="token")
        kwargs = {"target": adapter.captum_target(batch), "additional_forward_args": args}
        return {
            "saliency": Saliency(adapter).attribute(inputs, **kwargs),
            "ig": IntegratedGradients(adapter).attribute(inputs, n_steps=16, **kwargs),
            "layer_ig": LayerIntegratedGradients(adapter, adapter.embedding_layers).attribute(
                ids, n_steps=16, **kwargs
            ),
        }

    try:
        on_gpu = run("cuda")
        on_cpu = run("cpu")
    finally:
        model.to("cpu")
    for name, attributions in on_gpu.items():
        for gpu, cpu in zip(attributions, on_cpu[name], strict=True):
            assert gpu.device.type == "cuda", name
            assert cpu.abs().sum() > 0, name
            torch.testing.assert_close(gpu.cpu(), cpu, atol=ATOL, rtol=1e-3, msg=name)


def test_int_and_list_targets_on_cuda_match_the_cpu():
    """An int, list or tuple target becomes class indices on the logits' device (CUDA here)."""
    dataset = make_dataset("sequence", n=8, n_classes=3, seed=13)
    model = make_model(dataset, layers=2, heads=2, seed=13)
    batch = first_batch(dataset, batch_size=6)

    def run(device: str, target) -> tuple[torch.Tensor, ...]:
        adapter = PyHealthAdapter(model.to(device))
        inputs, args = adapter.captum_inputs(batch)
        return CheferAttribution(adapter).attribute(inputs, target=target, additional_forward_args=args)

    targets = [2, [0, 1, 2, 2, 1, 0], (1,) * 6]
    try:
        on_gpu = [run("cuda", target) for target in targets]
    finally:
        model.to("cpu")
    for target, gpu in zip(targets, on_gpu, strict=True):
        for a, b in zip(gpu, run("cpu", target), strict=True):
            assert a.device.type == "cuda"
            torch.testing.assert_close(a.cpu(), b, atol=ATOL, rtol=1e-3, msg=repr(target))


@pytest.mark.parametrize("fmt, kind", [("sequence", "transformer"), ("stagenet_nested", "stagenet")])
def test_recommended_preset_on_cuda_matches_the_cpu(fmt, kind):
    """The code split, the fixed-scale layer norm and the log-odds score on a GPU (batch masks kept on the CPU)."""
    dataset = make_dataset(fmt, n=8, n_classes=3, seed=14)
    model = make_model(dataset, kind, layers=2, heads=2, seed=14)
    batch = first_batch(dataset, batch_size=6)

    def run(device: str, args_device: str) -> tuple[torch.Tensor, ...]:
        adapter = PyHealthAdapter(model.to(device))
        inputs, args = adapter.captum_inputs(batch)
        args = tuple(a.to(args_device) for a in args)
        return CheferAttribution(adapter, preset="recommended").attribute(
            inputs, target=adapter.captum_target(batch), additional_forward_args=args
        )

    try:
        on_gpu = run("cuda", "cuda")
        masks_on_cpu = run("cuda", "cpu")
    finally:
        model.to("cpu")
    for gpu, mixed, cpu in zip(on_gpu, masks_on_cpu, run("cpu", "cpu"), strict=True):
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, atol=ATOL, rtol=1e-3)
        torch.testing.assert_close(mixed.cpu(), cpu, atol=ATOL, rtol=1e-3)


@pytest.mark.parametrize("preset", ["pyhealth", "recommended"])
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_huggingface_deferred_attention_on_cuda_matches_the_cpu(family, preset):
    """SDPA kept, each layer's maps formed in the backward pass: on a GPU as on the CPU."""
    from test_huggingface import _bert, _gpt2

    model = _bert() if family == "bert" else _gpt2()
    assert model.config._attn_implementation == "sdpa"
    torch.manual_seed(4)
    real = torch.arange(6) < torch.tensor([6, 3, 4])[:, None]
    encoding = {"input_ids": torch.where(real, torch.randint(4, 15, (3, 6)), 0), "attention_mask": real.long()}
    target = torch.tensor([2, 0, 1])

    def run(device: str) -> torch.Tensor:
        adapter = HuggingFaceAdapter(model.to(device))
        tokens, args = adapter.captum_inputs({k: v.to(device) for k, v in encoding.items()}, level="token")
        return CheferAttribution(adapter, preset=preset).attribute(
            tokens, target=target, additional_forward_args=args
        )[0]

    try:
        on_gpu = run("cuda")
    finally:
        model.to("cpu")
    on_cpu = run("cpu")
    assert on_gpu.device.type == "cuda"
    assert on_cpu.abs().sum() > 0
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=ATOL, rtol=1e-3)


def test_inputs_elsewhere_are_refused_and_batches_elsewhere_are_moved():
    """Inputs on the CPU for a model on CUDA: refused with the fix. A batch on CUDA for a model on the CPU:
    ``captum_inputs`` moves it, and the result is the CPU batch's."""
    dataset = make_dataset("sequence", n=8, n_classes=3, seed=15)
    model = make_model(dataset, layers=2, heads=2, seed=15)
    batch = first_batch(dataset, batch_size=6)
    adapter = PyHealthAdapter(model)
    inputs, args = adapter.captum_inputs(batch)
    target = adapter.captum_target(batch)
    on_cpu = CheferAttribution(adapter).attribute(inputs, target=target, additional_forward_args=args)
    cuda_batch = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    moved, moved_args = adapter.captum_inputs(cuda_batch)
    assert all(t.device.type == "cpu" for t in moved + moved_args)
    moved_attributions = CheferAttribution(adapter).attribute(moved, target=target, additional_forward_args=moved_args)
    for a, b in zip(moved_attributions, on_cpu, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    try:
        adapter = PyHealthAdapter(model.to("cuda"))
        for method in (CheferAttribution(adapter), Saliency(adapter)):
            with pytest.raises(
                ValueError, match=r"input 'conditions', input 'procedures' are on cpu but the model is on cuda"
            ):
                method.attribute(inputs, target=target.to("cuda"), additional_forward_args=args)
    finally:
        model.to("cpu")


def test_huggingface_mask_on_the_cpu_is_moved_and_inputs_on_the_cpu_are_refused():
    from test_huggingface import _bert

    model = _bert().to("cuda")
    encoding = {
        "input_ids": torch.tensor([[2, 7, 9, 3], [2, 8, 3, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
    }
    adapter = HuggingFaceAdapter(model)
    tokens, args = adapter.captum_inputs(encoding, level="token")
    target = torch.tensor([2, 0], device="cuda")
    together = CheferAttribution(adapter).attribute(tokens, target=target, additional_forward_args=args)
    mask_on_cpu = CheferAttribution(adapter).attribute(tokens, target=target, additional_forward_args=(args[0].cpu(),))
    torch.testing.assert_close(mask_on_cpu, together, rtol=1e-5, atol=1e-6)  # GPU backward kernels may sum in any order
    with pytest.raises(ValueError, match=r"input 'input_ids' is on cpu but the model is on cuda"):
        Saliency(adapter).attribute(
            adapter.captum_inputs(encoding)[0][0].cpu(), target=target, additional_forward_args=args
        )


def test_binary_target_1_on_cuda_is_refused_before_captum_indexes_the_logits():
    """A CUDA tensor target of ones on a single logit would be a device-side assert inside Captum's gather,
    which leaves the CUDA context unusable; the adapter refuses it first."""
    dataset = make_dataset("sequence", n=8, seed=16)
    model = make_model(dataset, layers=2, heads=2, seed=16).to("cuda")
    try:
        adapter = PyHealthAdapter(model)
        inputs, args = adapter.captum_inputs(first_batch(dataset, batch_size=6))
        for method in (Saliency(adapter), IntegratedGradients(adapter)):
            with pytest.raises(ValueError, match=r"single logit \(binary\).*target=None \(or 0\)"):
                method.attribute(
                    inputs, target=torch.ones(6, dtype=torch.long, device="cuda"), additional_forward_args=args
                )
        # still usable
        assert Saliency(adapter).attribute(inputs, additional_forward_args=args)[0].device.type == "cuda"
        torch.cuda.synchronize()
    finally:
        model.to("cpu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("preset", ["pyhealth", "recommended"])
def test_bert_under_cuda_autocast_gives_float32_relevance_close_to_the_float32_run(dtype, preset):
    """Half-precision maps and gradients, relevance math in float32: within 5% of the largest score of the
    float32 run (half precision keeps 8 to 11 bits; the relevance adds no rounding of its own).

    A model of ordinary scale: with test_precision's head scaled by 1e-3, float16's own gradients underflow
    (18% off under autocast, 37% for a ``.half()`` model, measured on an H200), as in training without a loss
    scale; bfloat16, with float32's range, stays within the tolerance there too."""
    from test_huggingface import _bert
    from test_precision import BF16_TOLERANCE, IDS, MASK, assert_close_to_largest

    model = _bert().to("cuda")
    adapter = HuggingFaceAdapter(model)
    tokens, args = adapter.captum_inputs({"input_ids": IDS.cuda(), "attention_mask": MASK.cuda()}, level="token")
    target = torch.tensor([1, 2, 0], device="cuda")
    chefer = CheferAttribution(adapter, preset=preset)
    (full,) = chefer.attribute(tokens, target=target, additional_forward_args=args)
    with torch.autocast("cuda", dtype=dtype):
        (half,) = chefer.attribute(tokens, target=target, additional_forward_args=args)
    assert half.dtype == torch.float32 and half.device.type == "cuda"
    assert float(full.abs().max()) > 0
    assert_close_to_largest(half.cpu(), full.cpu(), BF16_TOLERANCE)


def test_bart_under_cuda_autocast_gives_float32_rows_close_to_the_float32_run():
    from captum.attr import TextTokenInput
    from test_precision import BF16_TOLERANCE, PROMPT, TARGET, WORDS, _bart, assert_close_to_largest

    from captum_chefer import CheferLLMAttribution
    from captum_chefer.llm import word_tokenizer

    tokenizer = word_tokenizer(WORDS)
    model = _bart(len(tokenizer)).to("cuda")
    explain = CheferLLMAttribution(model, tokenizer)
    full = explain.attribute(TextTokenInput(PROMPT, tokenizer), target=TARGET)
    with torch.autocast("cuda", dtype=torch.float16):
        half = explain.attribute(TextTokenInput(PROMPT, tokenizer), target=TARGET)
    assert half.token_attr.dtype == torch.float32
    assert_close_to_largest(half.token_attr, full.token_attr, BF16_TOLERANCE)


def test_a_half_precision_model_on_cuda_gets_float32_relevance():
    from test_huggingface import _bert
    from test_precision import IDS, MASK, assert_close_to_largest

    model = _bert().to("cuda")
    adapter = HuggingFaceAdapter(model)
    tokens, args = adapter.captum_inputs({"input_ids": IDS.cuda(), "attention_mask": MASK.cuda()}, level="token")
    target = torch.tensor([1, 2, 0], device="cuda")
    (full,) = CheferAttribution(adapter).attribute(
        tokens, target=target, additional_forward_args=args, exclude_self=True
    )
    model.half()
    (half,) = CheferAttribution(adapter).attribute(
        tokens, target=target, additional_forward_args=args, exclude_self=True
    )
    assert half.dtype == torch.float32
    assert_close_to_largest(half.cpu(), full.cpu(), 0.05)


def test_masked_feature_dict_moves_cpu_masks_to_the_scores_device():
    # compare_methods keeps the batch's masks on the CPU; scores of a GPU model are on the GPU
    from captum_chefer.comparison.methods import masked_feature_dict

    class OnCuda:
        feature_keys = ["codes"]

        def to_feature_dict(self, attributions):
            return {"codes": attributions.to("cuda")}

    scores = torch.tensor([[1.0, 2.0, 3.0]])
    out = masked_feature_dict(OnCuda(), scores, [torch.tensor([[True, False, True]])])
    assert out["codes"].device.type == "cpu" and out["codes"].tolist() == [[1.0, 0.0, 3.0]]
