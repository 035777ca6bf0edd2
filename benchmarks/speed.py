"""Side-by-side speed and memory of Chefer relevance and Captum methods on PyHealth's Transformer.

For each configuration (codes in the first stream, layers, heads; batch 4, a second stream of 256
codes), one process builds a synthetic cohort with ``pyhealth.datasets.create_sample_dataset`` and an
untrained ``pyhealth.models.Transformer`` in evaluation mode, then times, interleaved and in a rotating
order, the median of ``--repeats`` calls (after one warm-up call each) of:

* ``forward``: the model's logits through the adapter under ``torch.no_grad()``;
* ``chefer``: ``CheferAttribution(adapter).attribute`` (ours, the fused row propagation);
* ``chefer-split``: the same with ``code_split="gradient"`` (it splits nested visits only: run the grid
  with ``--nested`` to make the second stream nested visits of up to 4 codes, so it has work to do);
* ``chefer-recommended``: ``CheferAttribution(adapter, preset="recommended")``;
* ``pyhealth``: PyHealth's own ``CheferRelevance(model).attribute(**batch)``;
* ``saliency``: Captum ``Saliency(adapter)``;
* ``ig``: Captum ``IntegratedGradients(adapter)`` with 50 steps (no warm-up call; outside the target
  configuration it is timed ``--ig-repeats`` times, as it dominates the run time).

On the CPU, the peak memory growth of one call of each method is measured in a process of its own: a
child forked from this process before it runs any tensor operation (so no OpenMP pool is inherited),
which fixes glibc's mmap threshold (so freed tensors leave the resident set at once and the peak does not
depend on allocation history), builds the same workload, runs one no-grad forward to warm the allocator
and thread pool, resets the kernel's high-water mark (``/proc/self/clear_refs``), calls the method once
and reads ``VmHWM`` from ``/proc/self/status`` (``ru_maxrss`` would carry a parent's peak across
``exec``). On CUDA it is the growth of ``torch.cuda.max_memory_allocated`` over one call, in this
process (the allocator counts exactly, and CUDA does not survive a fork).

A second grid, ``--families``, runs transformers beyond PyHealth's code models, random weights, batch 4:
``bert`` (BERT-base size, 512 tokens, ``HuggingFaceAdapter``), ``vit`` (ViT-B/16 at 224x224,
``HuggingFaceAdapter``), ``gpt2`` (a GPT-2-small-size classifier, 512 tokens), ``pyhealth-vit``
(``TorchvisionModel("vit_b_16")`` at 224x224 through ``PyHealthAdapter``, with PyHealth's
``_reference_attribute_vit`` as the ``pyhealth`` method) and ``pyhealth-text`` (a BERT-base-size
``TransformersModel`` through ``PyHealthAdapter``; its texts tokenized to 512 tokens, although the model's own
``forward`` truncates at 256). Ours, Saliency and IG take the embeddings (text) or the pixels (images); the
targets are judged against Saliency and the no-grad forward. Its section of ``RESULTS.md`` is replaced,
the rest of the file kept.

Usage::

    .venv/bin/python benchmarks/speed.py              # the full grid (CPU: tens of minutes)
    .venv/bin/python benchmarks/speed.py --target     # only the configurations the targets read
    .venv/bin/python benchmarks/speed.py --quick      # a tiny grid, a few seconds after the imports
    .venv/bin/python benchmarks/speed.py --target --nested \\
        --methods forward,pyhealth,chefer,chefer-split,chefer-recommended
    .venv/bin/python benchmarks/speed.py --device cuda
    .venv/bin/python benchmarks/speed.py --families transformers           # the transformers grid (CPU: hours)
    .venv/bin/python benchmarks/speed.py --families bert,vit --ig-steps 10
    .venv/bin/python benchmarks/speed.py --families transformers --quick   # the same at a tiny size
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import json
import math
import os
import platform
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402 (imported after the repository is put on sys.path)

METHODS = ("forward", "chefer", "chefer-split", "chefer-recommended", "pyhealth", "saliency", "ig")
LABELS = {
    "forward": "no-grad forward",
    "chefer": "CheferAttribution (ours)",
    "chefer-split": 'CheferAttribution, code_split="gradient"',
    "chefer-recommended": 'CheferAttribution, preset="recommended"',
    "pyhealth": "PyHealth CheferRelevance",
    "saliency": "Captum Saliency",
    "ig": "Captum IntegratedGradients (50 steps)",
}
IG_STEPS = 50


@dataclass(frozen=True)
class Config:
    """One benchmark configuration."""

    length: int  # codes in the first stream (the longest sample; the others are shorter)
    depth: int  # transformer layers per stream
    heads: int
    batch: int = 4
    second: int = 256  # codes in the second stream
    embedding_dim: int = 64
    nested: bool = False  # the second stream as nested visits of up to 4 codes (``second`` codes in all)

    @property
    def name(self) -> str:
        nested = " nested" if self.nested else ""
        return (f"L={self.length}+{self.second}{nested} depth={self.depth} heads={self.heads} batch={self.batch} "
                f"dim={self.embedding_dim}")


def full_grid(embedding_dim: int) -> list[Config]:
    """The grid of the issue: 128..1024 codes, depth 2 and 6, 1 and 4 heads, batch 4."""
    return [Config(n, d, h, embedding_dim=embedding_dim) for n in (128, 256, 512, 1024) for d in (2, 6) for h in (1, 4)]


def target_configs(embedding_dim: int, nested: bool = False) -> tuple[Config, Config]:
    """The target configuration (1024 codes, 6 layers, 1 head) and its 256-code companion."""
    return (Config(1024, 6, 1, embedding_dim=embedding_dim, nested=nested),
            Config(256, 6, 1, embedding_dim=embedding_dim, nested=nested))


QUICK = Config(16, 2, 2, batch=4, second=8, embedding_dim=16)


@dataclass(frozen=True)
class TransformerConfig:
    """One configuration of the transformers grid: a family at its size."""

    family: str  # one of FAMILIES
    length: int  # tokens (text) or the image side in pixels
    batch: int = 4
    tiny: bool = False  # a few-layer, narrow model of the same family (for the tests)

    @property
    def name(self) -> str:
        unit = "px" if self.family in IMAGE_FAMILIES else "tokens"
        return f"{self.family} {self.length} {unit} batch={self.batch}" + (" (tiny)" if self.tiny else "")


FAMILIES = ("bert", "vit", "gpt2", "pyhealth-vit", "pyhealth-text")
IMAGE_FAMILIES = ("vit", "pyhealth-vit")
FAMILY_LABELS = {
    "bert": "BERT-base (HuggingFaceAdapter)",
    "vit": "ViT-B/16 (HuggingFaceAdapter)",
    "gpt2": "GPT-2 small classifier (HuggingFaceAdapter)",
    "pyhealth-vit": "TorchvisionModel vit_b_16 (PyHealthAdapter)",
    "pyhealth-text": "TransformersModel BERT-base (PyHealthAdapter)",
}


def transformer_configs(families: list[str], tiny: bool = False) -> list[TransformerConfig]:
    """BERT and GPT-2 at 512 tokens, the ViTs at 224x224, batch 4 (tiny: 16 tokens, 32x32)."""

    def length(family: str) -> int:
        if tiny:
            return 32 if family in IMAGE_FAMILIES else 16
        return 224 if family in IMAGE_FAMILIES else 512

    return [TransformerConfig(f, length(f), tiny=tiny) for f in families]


# ---------------------------------------------------------------------------------------------- workload


@dataclass
class Workload:
    """A model, one batch and the Captum arguments the adapter makes from it."""

    config: Config
    model: Any
    batch: dict[str, Any]
    adapter: Any
    inputs: tuple
    args: tuple
    target: Any


def synthetic_samples(config: Config, seed: int = 0) -> list[dict[str, Any]]:
    """``config.batch`` samples: the first with exactly ``length`` / ``second`` codes, the others with
    between half and all of them (so the batch has padding), and a binary label."""
    rng = random.Random(seed)

    def codes(n: int) -> list[str]:
        return [f"C{rng.randrange(500)}" for _ in range(n)]

    samples = []
    for i in range(config.batch):
        n_first = config.length if i == 0 else rng.randint(max(1, config.length // 2), config.length)
        n_second = config.second if i == 0 else rng.randint(max(1, config.second // 2), config.second)
        second: list = codes(n_second)
        if config.nested:  # visits of 4 codes, the last one shorter
            second = [second[j : j + 4] for j in range(0, len(second), 4)]
        samples.append(
            {"patient_id": f"p{i}", "visit_id": "v0", "codes": codes(n_first), "second": second, "label": i % 2}
        )
    return samples


def build_workload(config: Config | TransformerConfig, device: str, seed: int = 0) -> Workload:
    """The model and batch of ``config`` on ``device``."""
    if isinstance(config, TransformerConfig):
        return build_transformer_workload(config, device, seed)
    from pyhealth.datasets import create_sample_dataset, get_dataloader
    from pyhealth.models import Transformer

    from captum_chefer import PyHealthAdapter
    from captum_chefer.synthetic import quiet_pyhealth

    with quiet_pyhealth():
        dataset = create_sample_dataset(
            samples=synthetic_samples(config, seed),
            input_schema={"codes": "sequence", "second": "nested_sequence" if config.nested else "sequence"},
            output_schema={"label": "binary"},
            dataset_name="benchmark",
        )
        torch.manual_seed(seed)
        model = Transformer(
            dataset=dataset, embedding_dim=config.embedding_dim, heads=config.heads, num_layers=config.depth
        )
    model = model.to(device).eval()
    batch = next(iter(get_dataloader(dataset, batch_size=config.batch, shuffle=False)))
    adapter = PyHealthAdapter(model)
    inputs, args = adapter.captum_inputs(batch)
    return Workload(config, model, batch, adapter, inputs, args, adapter.captum_target(batch))


def _padded_lengths(config: TransformerConfig, rng: random.Random) -> list[int]:
    """The first sample has all ``length`` tokens, the others between half and all of them."""
    return [config.length if i == 0 else rng.randint(config.length // 2, config.length) for i in range(config.batch)]


def build_transformer_workload(config: TransformerConfig, device: str, seed: int = 0) -> Workload:
    """A random-weight transformer of ``config.family`` and a batch of ``config.batch`` samples on ``device``."""
    import transformers

    from captum_chefer import HuggingFaceAdapter, PyHealthAdapter

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tiny = (
        {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
        if config.tiny else {}
    )
    family = config.family
    if family in ("pyhealth-vit", "pyhealth-text"):
        model, batch = _pyhealth_transformer(config, rng)
        model = model.to(device).eval()
        adapter = PyHealthAdapter(model)
        if family == "pyhealth-vit":
            inputs, args = adapter.captum_inputs(batch)
        else:  # tokenized to config.length tokens (the model's forward would stop at 256)
            encoding = model.tokenizer(
                batch["text"], return_tensors="pt", padding=True, truncation=True, max_length=config.length
            )
            ids, mask = encoding["input_ids"].to(device), encoding["attention_mask"].to(device)
            with torch.no_grad():
                inputs = (adapter.embedding_layers[0](ids).detach(),)
            args = (mask, encoding["token_type_ids"].to(device))
        return Workload(config, model, batch, adapter, inputs, args, adapter.captum_target(batch))
    if family == "vit":
        vit_config = transformers.ViTConfig(
            image_size=config.length, num_labels=2, **({**tiny, "patch_size": 8} if config.tiny else {})
        )
        model = transformers.ViTForImageClassification(vit_config)
        batch = {"pixel_values": torch.randn(config.batch, 3, config.length, config.length)}
    else:
        if family == "bert":
            model = transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=2, **tiny))
        elif family == "gpt2":
            size = {"n_embd": 32, "n_layer": 2, "n_head": 2} if config.tiny else {}
            gpt_config = transformers.GPT2Config(
                num_labels=2, pad_token_id=0, n_positions=max(1024, config.length), **size
            )
            model = transformers.GPT2ForSequenceClassification(gpt_config)
        else:
            raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
        vocab = model.config.vocab_size
        lengths = _padded_lengths(config, rng)
        mask = (torch.arange(config.length)[None, :] < torch.tensor(lengths)[:, None]).long()
        ids = torch.randint(5, vocab, (config.batch, config.length)) * mask
        batch = {"input_ids": ids, "attention_mask": mask}
    model = model.to(device).eval()
    batch = {k: v.to(device) for k, v in batch.items()}
    adapter = HuggingFaceAdapter(model)
    inputs, args = adapter.captum_inputs(batch)
    return Workload(config, model, batch, adapter, inputs, args, adapter.captum_target(batch))


def _pyhealth_transformer(config: TransformerConfig, rng: random.Random) -> tuple[Any, dict[str, Any]]:
    """``TorchvisionModel("vit_b_16")`` or a BERT-base ``TransformersModel`` (saved once to a temporary folder)."""
    import tempfile

    from pyhealth.datasets import create_sample_dataset, get_dataloader
    from pyhealth.models import TorchvisionModel, TransformersModel

    from captum_chefer.synthetic import quiet_pyhealth

    if config.family == "pyhealth-vit":
        generator = torch.Generator().manual_seed(rng.randrange(2**31))
        samples = [
            {
                "patient_id": f"p{i}",
                "image": torch.rand(3, config.length, config.length, generator=generator).tolist(),
                "label": i % 2,
            }
            for i in range(config.batch)
        ]
        with quiet_pyhealth():
            dataset = create_sample_dataset(
                samples=samples, input_schema={"image": "tensor"}, output_schema={"label": "binary"},
                dataset_name="bench-vit",
            )
            model = TorchvisionModel(dataset, "vit_b_16", {"weights": None, "image_size": config.length})
        if config.tiny:
            model.model.encoder.layers = model.model.encoder.layers[:2]
    else:
        folder = Path(tempfile.gettempdir()) / f"captum-chefer-bench-bert-{'tiny' if config.tiny else 'base'}"
        _save_text_encoder(folder, config.tiny)
        lengths = _padded_lengths(config, rng)
        words = [f"w{i}" for i in range(200)]
        samples = [
            {"patient_id": f"p{i}", "text": " ".join(rng.choice(words) for _ in range(n - 2)), "label": i % 2}
            for i, n in enumerate(lengths)
        ]
        with quiet_pyhealth():
            dataset = create_sample_dataset(
                samples=samples, input_schema={"text": "text"}, output_schema={"label": "binary"},
                dataset_name="bench-text",
            )
            model = TransformersModel(dataset=dataset, model_name=str(folder))
    batch = next(iter(get_dataloader(dataset, batch_size=config.batch, shuffle=False)))
    return model, batch


def _save_text_encoder(folder: Path, tiny: bool) -> None:
    """A random BERT-base (or tiny BERT) and a word-per-token vocabulary, saved for ``AutoModel.from_pretrained``."""
    if (folder / "config.json").exists():
        return
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(200)]
    vocab.write_text("\n".join(words) + "\n")
    transformers.BertTokenizerFast(vocab=str(vocab)).save_pretrained(folder)
    size = (
        {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64} if tiny else {}
    )
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(vocab_size=len(words), **size)).save_pretrained(folder)


def ig_internal_batch(config: Config | TransformerConfig) -> int:
    """Expanded samples per IG chunk: about 4096 codes of the first stream, whole steps of the batch
    (transformers grid: one step of the batch at a time)."""
    if isinstance(config, TransformerConfig):
        return config.batch
    return config.batch * max(1, min(IG_STEPS, 4096 // config.length))


def common_methods(w: Workload) -> dict[str, Callable[[], Any]]:
    """The calls both grids time: the no-grad forward, ours, Saliency and IG (``IG_STEPS``)."""
    from captum.attr import IntegratedGradients, Saliency

    from captum_chefer import CheferAttribution

    chefer = CheferAttribution(w.adapter)
    saliency = Saliency(w.adapter)
    ig = IntegratedGradients(w.adapter)
    kwargs = {"target": w.target, "additional_forward_args": w.args}

    def forward() -> Any:
        with torch.no_grad():
            return w.adapter(*w.inputs, *w.args)

    return {
        "forward": forward,
        "chefer": lambda: chefer.attribute(w.inputs, **kwargs),
        "saliency": lambda: saliency.attribute(w.inputs, **kwargs),
        "ig": lambda: ig.attribute(
            w.inputs, n_steps=IG_STEPS, internal_batch_size=ig_internal_batch(w.config), **kwargs
        ),
    }


def make_methods(w: Workload) -> dict[str, Callable[[], Any]]:
    """One zero-argument call per method; each returns its attributions (or logits)."""
    if isinstance(w.config, TransformerConfig):
        return make_transformer_methods(w)
    from pyhealth.interpret.methods import CheferRelevance

    from captum_chefer import CheferAttribution

    common = common_methods(w)
    chefer = CheferAttribution(w.adapter)
    recommended = CheferAttribution(w.adapter, preset="recommended")
    reference = CheferRelevance(w.model)
    kwargs = {"target": w.target, "additional_forward_args": w.args}

    def pyhealth() -> Any:
        try:
            return reference.attribute(**w.batch)
        finally:
            release_pyhealth_state(w.model)

    return {
        "forward": common["forward"],
        "chefer": common["chefer"],
        "chefer-split": lambda: chefer.attribute(w.inputs, code_split="gradient", **kwargs),
        "chefer-recommended": lambda: recommended.attribute(w.inputs, **kwargs),
        "pyhealth": pyhealth,
        "saliency": common["saliency"],
        "ig": common["ig"],
    }


def make_transformer_methods(w: Workload) -> dict[str, Callable[[], Any]]:
    """Forward, ours, Saliency, IG (``IG_STEPS``) and, for the PyHealth ViT, PyHealth's reference."""
    calls = common_methods(w)
    if w.config.family == "pyhealth-vit":
        from pyhealth.interpret.methods.chefer import _reference_attribute_vit

        def pyhealth() -> Any:
            try:
                return _reference_attribute_vit(w.model, interpolate=False, **w.batch)
            finally:
                w.model.clear_attention_storage()
                w.model.zero_grad(set_to_none=True)

        calls["pyhealth"] = pyhealth
    return calls


def transformer_methods(config: TransformerConfig) -> tuple[str, ...]:
    """The methods run for ``config`` (PyHealth's reference only where it exists)."""
    code_only = ("chefer-split", "chefer-recommended")  # options for PyHealth's code models (nested visits)
    return tuple(m for m in METHODS if m not in code_only and (m != "pyhealth" or config.family == "pyhealth-vit"))


def release_pyhealth_state(model: torch.nn.Module) -> None:
    """Drop what ``CheferRelevance.attribute`` leaves on the model after it returns.

    It keeps every layer's attention map and attention gradient on the attention modules and fills
    the parameters' ``.grad``. Left there, they would be freed during the next method's call, which
    would then appear to use less memory than it does (in one process, as on CUDA).
    """
    for module in model.modules():
        for name in ("attn_map", "attn_gradients"):
            if getattr(module, name, None) is not None:
                setattr(module, name, None)
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------- timing


@dataclass
class Timing:
    """Median wall time of one method in one configuration."""

    seconds: float
    runs: int
    all_seconds: list[float] = field(default_factory=list)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_methods(
    w: Workload, device: str, repeats: int, ig_repeats: int, methods: tuple[str, ...] = METHODS
) -> tuple[dict[str, Timing], float]:
    """Interleaved timings (the order rotates every round) and the largest |ours - PyHealth|."""
    calls = make_methods(w)
    warm = {name: calls[name]() for name in methods if name != "ig"}  # warm-up, and results to compare
    _sync(device)
    gap = _max_difference(w, warm["chefer"], warm["pyhealth"]) if {"chefer", "pyhealth"} <= set(warm) else math.nan
    del warm
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for round_ in range(max(repeats, ig_repeats)):
        order = methods[round_ % len(methods) :] + methods[: round_ % len(methods)]
        for name in order:
            if len(samples[name]) >= (ig_repeats if name == "ig" else repeats):
                continue
            gc.collect()
            _sync(device)
            start = time.perf_counter()
            result = calls[name]()
            _sync(device)
            samples[name].append(time.perf_counter() - start)
            del result
    return {n: Timing(statistics.median(s), len(s), s) for n, s in samples.items()}, gap


def _max_difference(w: Workload, ours: tuple, theirs: dict[str, torch.Tensor]) -> float:
    """The largest |ours - PyHealth| on real codes (PyHealth gives a nested visit's padding slots its score too)."""
    scores = w.adapter.to_feature_dict(ours)
    if isinstance(w.config, TransformerConfig):  # the ViT reference: [B, 1, rows, columns] patches
        return max(
            float((scores[k].float() - theirs[k].reshape(scores[k].shape).float()).abs().max()) for k in scores
        )
    real = dict(zip(w.adapter.feature_keys, w.adapter.token_masks(w.args), strict=True))  # a mask per feature key
    return max(
        float(((scores[k].float() - theirs[k].to(scores[k].device).float()) * real[k].to(scores[k].device)).abs().max())
        for k in scores
    )


# ---------------------------------------------------------------------------------------------- memory


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def fixed_mmap_threshold(threshold: int = 64 * 1024) -> bool:
    """Have glibc serve every block above ``threshold`` bytes with ``mmap`` and unmap it when freed.

    By default glibc raises its mmap threshold each time a large block is freed and serves later blocks
    of that size from the heap, which it keeps; the high-water mark then depends on what ran before and
    in which order. With a fixed threshold, ``VmHWM`` follows the tensors alive at each moment. Returns
    ``False`` where that is not glibc.
    """
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def measure_memory_here(config: Config, method: str, device: str, threads: int) -> dict[str, float]:
    """Peak RSS growth (MiB) of one call of ``method`` on the CPU, measured in the calling process."""
    fixed = fixed_mmap_threshold()
    torch.set_num_threads(threads)
    w = build_workload(config, device)
    call = make_methods(w)[method]
    with torch.no_grad():
        w.adapter(*w.inputs, *w.args)  # thread pool and allocator warm, shared by every method
    gc.collect()
    reset = _reset_peak()
    before = _status_kib("VmRSS") if reset else _status_kib("VmHWM")
    result = call()
    peak = _status_kib("VmHWM")
    del result
    return {"rss_mib": max(0, peak - before) / 1024, "hwm_reset": float(reset), "fixed_mmap_threshold": float(fixed)}


def measure_cuda_memory(w: Workload, method: str) -> dict[str, float]:
    """Peak growth (MiB) of CUDA memory allocated by one call, from PyTorch's allocator statistics.

    The allocator counts every tensor of this process exactly, so no separate process is needed (and
    a process forked after CUDA started could not use it).
    """
    call = make_methods(w)[method]
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = call()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del result
    return {"rss_mib": peak / 2**20}


def measure_memory_forked(config: Config, method: str, device: str, threads: int) -> dict[str, float]:
    """``measure_memory_here`` in a child process forked for this one measurement."""
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():  # the imports' idle helper threads are not used by the child
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        code = 0
        try:
            payload = json.dumps(measure_memory_here(config, method, device, threads))
        except BaseException as error:  # report, never fall back into the parent's code
            payload, code = json.dumps({"error": f"{type(error).__name__}: {error}"}), 1
        with os.fdopen(write_end, "w") as pipe:
            pipe.write(payload)
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        payload = pipe.read()
    os.waitpid(pid, 0)
    result = json.loads(payload) if payload else {"error": "the child process died"}
    if "error" in result:
        raise RuntimeError(f"memory probe {method} at {config.name} failed: {result['error']}")
    return result


# ---------------------------------------------------------------------------------------------- report


@dataclass
class Row:
    """One method in one configuration."""

    config: Config
    method: str
    seconds: float
    runs: int
    ratio_pyhealth: float
    ratio_forward: float
    memory_mib: float
    memory_ratio_pyhealth: float
    max_diff_pyhealth: float = math.nan


def machine_line(device: str, threads: int) -> str:
    """CPU model, cores, torch version (and GPU) of this run."""
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or cpu
    line = (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({threads} intra-op thread(s)), "
            f"Python {platform.python_version()}")
    if device.startswith("cuda"):
        line += f", GPU {torch.cuda.get_device_name(torch.device(device))}"
    return line + f", device {device}"


def _fmt(x: float | None, digits: int = 2) -> str:
    return "\N{EN DASH}" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown_table(rows: list[Row]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| codes | layers | heads | method | median ms | runs "
        "| × PyHealth | × forward | peak growth MiB | mem × PyHealth |",  # noqa: RUF001 (the multiplication sign is the printed text)
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        c = r.config
        lines.append(
            f"| {c.length}+{c.second}{' nested' if c.nested else ''} | {c.depth} | {c.heads} | {LABELS[r.method]} | "
            f"{r.seconds * 1000:.1f} | {r.runs} | {_fmt(r.ratio_pyhealth)} | {_fmt(r.ratio_forward)} | "
            f"{_fmt(r.memory_mib, 1)} | {_fmt(r.memory_ratio_pyhealth)} |"
        )
    return "\n".join(lines)


def _row(rows: list[Row], config: Config, method: str) -> Row | None:
    return next((r for r in rows if r.config == config and r.method == method), None)


def target_lines(rows: list[Row], embedding_dim: int, nested: bool = False) -> list[str]:
    """PASS/FAIL per target of the issue, with the measured ratio."""
    big, small = target_configs(embedding_dim, nested)

    def get(config: Config, method: str) -> Row | None:
        return _row(rows, config, method)

    ours, ph, sal, fwd, ig = (get(big, m) for m in ("chefer", "pyhealth", "saliency", "forward", "ig"))
    split, recommended = get(big, "chefer-split"), get(big, "chefer-recommended")
    ours_small, fwd_small = get(small, "chefer"), get(small, "forward")
    checks: list[tuple[str, float | None, str, float]] = []
    if ours and ph:
        checks.append(("time ours / PyHealth", ours.seconds / ph.seconds, "<=", 0.5))
        memory_ratio = ours.memory_mib / ph.memory_mib if ph.memory_mib else None
        checks.append(("peak memory growth ours / PyHealth", memory_ratio, "<=", 0.6))
    if ours and sal:
        checks.append(("time ours / Saliency", ours.seconds / sal.seconds, "<=", 1.0))
    if ours and fwd:
        checks.append(("time ours / no-grad forward", ours.seconds / fwd.seconds, "<=", 2.0))
    if ours and ig:
        checks.append(("time IntegratedGradients / ours", ig.seconds / ours.seconds, ">=", 40.0))
    if ours and split:
        checks.append(('time code_split="gradient" / ours', split.seconds / ours.seconds, "<=", 1.1))
    if ours and recommended:
        checks.append(('time preset="recommended" / ours', recommended.seconds / ours.seconds, "<=", 1.1))
    if ours and fwd and ours_small and fwd_small:
        growth = (ours.seconds / fwd.seconds) / (ours_small.seconds / fwd_small.seconds)
        checks.append(("(ours / forward at 1024) / (ours / forward at 256)", growth, "<=", 1.2))
    runs = min((r.runs for r in (ours, ph, sal, fwd, ig) if r), default=0)
    lines = [
        f"targets at {big.length}+{big.second} codes, {big.depth} layers, {big.heads} head, batch {big.batch} "
        f"(>= {runs} runs each):"
    ]
    for name, value, op, bound in checks:
        ok = value is not None and (value <= bound if op == "<=" else value >= bound)
        lines.append(f"  {'PASS' if ok else 'FAIL'}  {name} = {_fmt(value)} (target {op} {bound})")
    if not checks:
        lines.append("  (the target configuration was not run)")
    return lines


# ---------------------------------------------------------------------------------------------- transformers grid


SECTION_START = "<!-- section: transformers grid -->"
SECTION_END = "<!-- end section: transformers grid -->"


@dataclass
class TransformerRow:
    """One method on one transformer of the transformers grid."""

    config: TransformerConfig
    method: str
    seconds: float
    runs: int
    ratio_saliency: float
    ratio_forward: float
    memory_mib: float
    memory_ratio_saliency: float
    max_diff_pyhealth: float = math.nan


def method_label(method: str) -> str:
    return f"Captum IntegratedGradients ({IG_STEPS} steps)" if method == "ig" else {
        **LABELS, "pyhealth": "PyHealth _reference_attribute_vit"
    }[method]


def run_transformers(
    configs: list[TransformerConfig], device: str, repeats: int, ig_repeats: int, threads: int, ig_memory: bool,
    log=print,
) -> list[TransformerRow]:
    """Memory probes first (each in a process forked before this one runs a tensor op), then the timings."""
    t0 = time.time()
    preload()
    importlib.import_module("transformers")  # loaded here, before the memory probes fork

    log(f"imports: {time.time() - t0:.1f} s")
    cuda = device.startswith("cuda")
    memory: dict[tuple[TransformerConfig, str], dict[str, float]] = {}
    for config in [] if cuda else configs:
        for method in transformer_methods(config):
            if method == "ig" and not ig_memory:
                continue
            t0 = time.time()
            memory[config, method] = measure_memory_forked(config, method, device, threads)  # type: ignore[arg-type]
            log(f"memory {config.name} {method}: {memory[config, method]['rss_mib']:.1f} MiB "
                f"({time.time() - t0:.1f} s)")
    torch.set_num_threads(threads)
    rows: list[TransformerRow] = []
    for config in configs:
        t0 = time.time()
        w = build_workload(config, device)
        log(f"built {config.name} in {time.time() - t0:.1f} s")
        methods = transformer_methods(config)
        timings, gap = time_methods(w, device, repeats, ig_repeats, methods)
        if cuda:
            for method in methods:
                memory[config, method] = measure_cuda_memory(w, method)
        del w
        gc.collect()
        saliency, forward = timings["saliency"].seconds, timings["forward"].seconds
        saliency_memory = memory.get((config, "saliency"), {}).get("rss_mib", math.nan)
        for method in methods:
            t, m = timings[method], memory.get((config, method))
            mib = m["rss_mib"] if m else math.nan
            rows.append(
                TransformerRow(
                    config, method, t.seconds, t.runs, t.seconds / saliency, t.seconds / forward, mib,
                    mib / saliency_memory if saliency_memory else math.nan, gap if method == "chefer" else math.nan,
                )
            )
        log(f"timed {config.name}: " + ", ".join(f"{n} {t.seconds * 1000:.1f} ms" for n, t in timings.items()))
    return rows


def transformer_table(rows: list[TransformerRow]) -> str:
    """The transformers grid as a markdown table."""
    lines = [
        "| model | input | method | median ms | runs "
        "| × Saliency | × forward | peak growth MiB | mem × Saliency |",  # noqa: RUF001 (the multiplication sign is the printed text)
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        c = r.config
        size = f"{c.length}x{c.length} px" if c.family in IMAGE_FAMILIES else f"{c.length} tokens"
        lines.append(
            f"| {FAMILY_LABELS[c.family]}{' (tiny)' if c.tiny else ''} | {size}, batch {c.batch} | "
            f"{method_label(r.method)} | {r.seconds * 1000:.1f} | {r.runs} | {_fmt(r.ratio_saliency)} | "
            f"{_fmt(r.ratio_forward)} | {_fmt(r.memory_mib, 1)} | {_fmt(r.memory_ratio_saliency)} |"
        )
    return "\n".join(lines)


def transformer_target_lines(rows: list[TransformerRow]) -> list[str]:
    """PASS/FAIL per family: ours <= Saliency's time, <= 2x the no-grad forward, memory <= Saliency's."""
    lines = []
    for config in dict.fromkeys(r.config for r in rows):
        ours = next((r for r in rows if r.config == config and r.method == "chefer"), None)
        if ours is None:
            continue
        checks = [
            ("time ours / Saliency", ours.ratio_saliency, 1.0),
            ("time ours / no-grad forward", ours.ratio_forward, 2.0),
            ("peak memory growth ours / Saliency", ours.memory_ratio_saliency, 1.0),
        ]
        parts = []
        for name, value, bound in checks:
            known = not (isinstance(value, float) and math.isnan(value))
            verdict = ("PASS" if value <= bound else "FAIL") if known else "n/a "
            parts.append(f"{verdict}  {name} = {_fmt(value)} (target <= {bound})")
        if not math.isnan(ours.max_diff_pyhealth):
            parts.append(
                f"max |ours - PyHealth reference| over patches = {ours.max_diff_pyhealth:.2e} "
                "(the reference skips pos_embedding and misorders gradients beyond 2 blocks)"
            )
        lines.append(f"{config.name}:")
        lines += [f"  {part}" for part in parts]
    return lines


def write_section(path: Path, text: str) -> None:
    """Put ``text`` between the transformers-grid markers of ``path``, keeping everything else."""
    block = f"{SECTION_START}\n{text}\n{SECTION_END}\n"
    old = path.read_text() if path.exists() else ""
    if SECTION_START in old and SECTION_END in old:
        start = old.index(SECTION_START)
        end = old.index(SECTION_END, start) + len(SECTION_END)
        new = old[:start] + block.rstrip("\n") + old[end:]
    else:
        new = old + ("\n" if old and not old.endswith("\n\n") else "") + block
    path.write_text(new)


def transformers_main(args: argparse.Namespace, families: list[str]) -> int:
    global IG_STEPS
    IG_STEPS = args.ig_steps
    configs = transformer_configs(families, tiny=args.quick)
    started = time.time()
    rows = run_transformers(
        configs, args.device, args.repeats, args.ig_repeats, args.threads, args.ig_memory,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    cuda = args.device.startswith("cuda")
    if cuda:
        memory_note = "peak growth = torch.cuda.max_memory_allocated over one call, above what was allocated before it"
    else:
        memory_note = (
            "peak growth = VmHWM - VmRSS of one call in its own process, glibc mmap threshold fixed at 64 KiB"
            + ("" if args.ig_memory else "; IG memory not measured (--ig-memory)")
        )
    text = "\n".join(
        [
            f"## Transformers beyond PyHealth's code models ({args.device})",
            "",
            "```",
            " ".join(["benchmarks/speed.py", *sys.argv[1:]]),
            "```",
            "",
            f"machine: {machine_line(args.device, args.threads)}",
            f"random weights, batch 4; median of {args.repeats} interleaved runs "
            f"(IG: {args.ig_repeats}, {IG_STEPS} steps, "
            f"internal batch 4, so IG's time is {IG_STEPS} forward and backward passes); {memory_note}; total run time "
            f"{time.time() - started:.0f} s",
            "",
            transformer_table(rows),
            "",
            "```",
            *transformer_target_lines(rows),
            "```",
        ]
    )
    print(text)
    if args.results:
        write_section(Path(args.results), text)
    if args.json:
        args.json.write_text(json.dumps([{**asdict(r), "config": asdict(r.config)} for r in rows], indent=1))
    return 0


# ---------------------------------------------------------------------------------------------- main


def preload() -> None:
    """Import everything the workloads use once, here, so that forked memory probes start at once."""
    modules = ("captum.attr", "pyhealth.datasets", "pyhealth.interpret.methods", "pyhealth.models", "captum_chefer")
    for module in modules:
        importlib.import_module(module)


def run(
    configs: list[Config], device: str, repeats: int, ig_repeats: int, threads: int, log=print,
    methods: tuple[str, ...] = METHODS,
) -> list[Row]:
    """Memory probes first (forked before this process runs any tensor op), then the timings."""
    t0 = time.time()
    preload()
    log(f"imports: {time.time() - t0:.1f} s")
    targets = set(target_configs(configs[0].embedding_dim, configs[0].nested))
    cuda = device.startswith("cuda")
    memory: dict[tuple[Config, str], dict[str, float]] = {}
    for config in [] if cuda else configs:
        for method in methods:
            if method == "ig" and config not in targets and replace(config, nested=False) != QUICK:
                continue  # IG's memory is not a target; measuring it everywhere doubles the grid's time
            t0 = time.time()
            memory[config, method] = measure_memory_forked(config, method, device, threads)
            log(f"memory {config.name} {method}: {memory[config, method]['rss_mib']:.1f} MiB "
                f"({time.time() - t0:.1f} s)")
    torch.set_num_threads(threads)
    rows: list[Row] = []
    for config in configs:
        w = build_workload(config, device)
        full_ig = config in targets or replace(config, nested=False) == QUICK
        timings, gap = time_methods(w, device, repeats, repeats if full_ig else ig_repeats, methods)
        if cuda:
            for method in methods:
                memory[config, method] = measure_cuda_memory(w, method)
        del w
        gc.collect()
        ph, fwd = timings["pyhealth"].seconds, timings["forward"].seconds
        ph_mem = memory[config, "pyhealth"]["rss_mib"]
        for method in methods:
            t, m = timings[method], memory.get((config, method))
            mib = m["rss_mib"] if m else math.nan
            rows.append(
                Row(
                    config, method, t.seconds, t.runs, t.seconds / ph, t.seconds / fwd, mib,
                    mib / ph_mem if ph_mem else math.nan, gap if method == "chefer" else math.nan,
                )
            )
        log(f"timed {config.name}: " + ", ".join(f"{n} {t.seconds * 1000:.1f} ms" for n, t in timings.items())
            + f"; max |ours - PyHealth| = {gap:.2e}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument("--quick", action="store_true", help="one tiny configuration (for the tests)")
    grid.add_argument(
        "--target", action="store_true", help="only the 1024- and 256-code configurations the targets read"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per method (median; default 5)")
    parser.add_argument("--ig-repeats", type=int, default=1, help="timed IG calls outside the target configuration")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads, the same for every method (default 1)"
    )
    parser.add_argument("--embedding-dim", type=int, default=64)
    parser.add_argument("--nested", action="store_true", help="the second stream as nested visits of up to 4 codes")
    parser.add_argument(
        "--methods", default=None, help=f"a comma list of {', '.join(METHODS)} (forward and pyhealth always run)"
    )
    parser.add_argument(
        "--results", default=str(Path(__file__).with_name("RESULTS.md")), help="markdown output ('' for none)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument(
        "--families", default=None,
        help=f"run the transformers grid instead: 'transformers' (all) or a comma list of {', '.join(FAMILIES)}",
    )
    parser.add_argument(
        "--ig-steps", type=int, default=IG_STEPS, help="IG steps in the transformers grid (default 50)"
    )
    parser.add_argument("--ig-memory", action="store_true", help="also measure IG's memory in the transformers grid")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.ig_repeats < 1 or args.ig_steps < 1:
        parser.error("--repeats, --ig-repeats and --ig-steps must be positive")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    if args.families is not None:
        if args.families == "transformers":
            families = list(FAMILIES)
        else:
            families = [f.strip() for f in args.families.split(",") if f.strip()]
        unknown = [f for f in families if f not in FAMILIES]
        if unknown or not families:
            parser.error(f"--families: unknown {unknown}; choose 'transformers' or from {', '.join(FAMILIES)}")
        if args.target:
            parser.error("--target applies to the PyHealth grid; the transformers grid is all targets")
        return transformers_main(args, families)
    methods = METHODS
    if args.methods:
        chosen = {"forward", "pyhealth", *(m.strip() for m in args.methods.split(",") if m.strip())}
        if not chosen <= set(METHODS):
            parser.error(f"--methods: unknown {sorted(chosen - set(METHODS))}; choose from {', '.join(METHODS)}")
        methods = tuple(m for m in METHODS if m in chosen)
    if args.quick:
        configs = [QUICK]
    elif args.target:
        configs = list(target_configs(args.embedding_dim))
    else:
        configs = full_grid(args.embedding_dim)
        big, small = target_configs(args.embedding_dim)
        configs = [big, small] + [c for c in configs if c not in (big, small)]  # targets first

    started = time.time()
    if args.nested:
        configs = [replace(c, nested=True) for c in configs]
    rows = run(
        configs, args.device, args.repeats, args.ig_repeats, args.threads,
        log=lambda s: print(s, file=sys.stderr, flush=True), methods=methods,
    )
    rows.sort(key=lambda r: (r.config.length, r.config.depth, r.config.heads, METHODS.index(r.method)))
    cuda = args.device.startswith("cuda")
    machine = machine_line(args.device, args.threads)
    if cuda:
        memory_note = "peak growth = torch.cuda.max_memory_allocated over one call, above what was allocated before it"
    else:
        memory_note = (
            "IG memory only at the target configurations; peak growth = VmHWM - VmRSS of one call in its own "
            "process, glibc mmap threshold fixed at 64 KiB"
        )
    gaps = [r.max_diff_pyhealth for r in rows if r.method == "chefer"]
    text = "\n".join(
        [
            f"machine: {machine}",
            f"batch 4, a second stream of 256 codes{' (nested visits of up to 4)' if configs[0].nested else ''}, "
            f"embedding dim {configs[0].embedding_dim}; median of {args.repeats} "
            f"interleaved runs (IG: {args.repeats} at the target configurations, {args.ig_repeats} elsewhere); "
            f"{memory_note}",
            f"max |ours - PyHealth| over the grid: {max(gaps):.2e}; total run time {time.time() - started:.0f} s",
            "",
            markdown_table(rows),
            "",
            *target_lines(rows, configs[0].embedding_dim, configs[0].nested),
        ]
    )
    print(text)
    if args.results:
        Path(args.results).write_text(
            f"# Benchmark results ({args.device})\n\n```\n{' '.join(sys.argv)}\n```\n\n{text}\n"
        )
    if args.json:
        args.json.write_text(json.dumps([{**asdict(r), "config": asdict(r.config)} for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
