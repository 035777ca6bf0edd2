"""Time of CheferLLMAttribution for a generated text against Captum's LLMGradientAttribution, side by side.

One process builds a tiny-but-not-trivial random GPT-2 (4 layers, width 128, 4 heads, a 512-word
vocabulary) and a random BART of the same size (3 + 3 layers), a prompt of 32 words and a target of 64
tokens, and times, interleaved in a rotating order, the median of ``--repeats`` calls (after one warm-up
call each) of:

* ``chefer``: ``CheferLLMAttribution(model, tokenizer).attribute(inp, target=...)`` with the default chunks
  of 16 output tokens per batched backward pass (``is_grads_batched``);
* ``chefer_loop``: the same with ``chunk_size=1``, one plain backward pass per output token;
* ``chefer_all``: the same with ``chunk_size=None``, all output tokens in one batched backward pass;
* ``captum_lig``: Captum's ``LLMGradientAttribution(LayerIntegratedGradients(model, wte), tokenizer)`` with
  its default 50 steps (one attribution call, i.e. one batched forward and backward pass over 50 scaled
  inputs, per output token). Captum's class runs ``model(input_ids)`` and reads the last position's logits,
  so it applies to decoder-only models only: on BART only Chefer is timed.

A second table times four prompts of different lengths (16-token targets) with ``attribute_batch``:
one padded forward pass for all four (``batch_size=None``) against one forward pass per prompt
(``batch_size=1``).

Peak memory: the growth of the resident set's high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) over one call, in this process, with glibc's mmap threshold fixed so freed
tensors leave the resident set at once. Linux only; ``nan`` elsewhere.

Usage::

    .venv/bin/python benchmarks/llm.py            # writes benchmarks/LLM-RESULTS.md (a few minutes on one thread)
    .venv/bin/python benchmarks/llm.py --quick    # tiny sizes, a few seconds after the imports
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402 (imported after the repository is put on sys.path)

SIZES = {
    "full": {
        "layers": 4, "width": 128, "heads": 4, "words": 512, "prompt": 32, "target": 64, "steps": 50,
        "prompts": (8, 16, 24, 32), "batch_target": 16,
    },
    "quick": {
        "layers": 2, "width": 32, "heads": 4, "words": 64, "prompt": 8, "target": 8, "steps": 4,
        "prompts": (3, 5, 7, 9), "batch_target": 4,
    },
}


def _status_kib(field: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return math.nan


def _fix_mmap_threshold() -> None:
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: freed blocks leave the RSS at once


def peak_mib(call: Callable[[], Any]) -> float:
    """Growth of the resident set's high-water mark over one call, MiB (nan where not measurable)."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return math.nan
    before = _status_kib("VmRSS")
    call()
    return (_status_kib("VmHWM") - before) / 1024


def median_times(calls: dict[str, Callable[[], Any]], repeats: int, slow: frozenset = frozenset(),
                 slow_repeats: int = 2) -> dict[str, float]:
    """Median seconds of each call, interleaved in a rotating order after one warm-up call each.

    ``slow`` calls (Captum's LIG: minutes per call on a shared CPU) get no warm-up call of their own (the
    others have warmed the model) and are timed in the first ``slow_repeats`` rounds only.
    """
    for name, call in calls.items():
        if name not in slow:
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            if name in slow and r >= slow_repeats:
                continue
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def build(size: dict) -> dict[str, Any]:
    import transformers

    from captum_chefer.llm import word_tokenizer

    transformers.logging.set_verbosity_error()
    words = [f"w{i}" for i in range(size["words"] - 4)]
    tokenizer = word_tokenizer(words, bos=True)
    vocab = len(tokenizer)
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=vocab, n_positions=256, n_embd=size["width"], n_layer=size["layers"], n_head=size["heads"],
        pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
    bart = transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=vocab, d_model=size["width"], encoder_layers=max(size["layers"] - 1, 1),
        decoder_layers=max(size["layers"] - 1, 1), encoder_attention_heads=size["heads"],
        decoder_attention_heads=size["heads"], encoder_ffn_dim=4 * size["width"], decoder_ffn_dim=4 * size["width"],
        max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2,
        forced_bos_token_id=None, forced_eos_token_id=None)).eval()
    rng = random.Random(0)

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    return {
        "tokenizer": tokenizer, "gpt2": gpt2, "bart": bart,
        "prompt": text(size["prompt"]), "target": text(size["target"]),
        "prompts": [text(n) for n in size["prompts"]],
        "batch_targets": [text(size["batch_target"]) for _ in size["prompts"]],
    }


def run(size_name: str, repeats: int) -> dict[str, Any]:
    from captum.attr import LayerIntegratedGradients, LLMGradientAttribution, TextTokenInput

    from captum_chefer import CheferLLMAttribution

    size = SIZES[size_name]
    setup = build(size)
    tokenizer, gpt2, bart = setup["tokenizer"], setup["gpt2"], setup["bart"]
    inp = TextTokenInput(setup["prompt"], tokenizer)
    target = setup["target"]
    chefer_gpt2, chefer_bart = CheferLLMAttribution(gpt2, tokenizer), CheferLLMAttribution(bart, tokenizer)
    lig = LLMGradientAttribution(LayerIntegratedGradients(gpt2, gpt2.transformer.wte), tokenizer)
    results: dict[str, Any] = {}
    calls = {
        "chefer": lambda: results.__setitem__("chefer", chefer_gpt2.attribute(inp, target=target)),
        "chefer_loop": lambda: results.__setitem__(
            "chefer_loop", chefer_gpt2.attribute(inp, target=target, chunk_size=1)
        ),
        "chefer_all": lambda: results.__setitem__(
            "chefer_all", chefer_gpt2.attribute(inp, target=target, chunk_size=None)
        ),
        "captum_lig": lambda: results.__setitem__(
            "captum_lig", lig.attribute(inp, target=target, n_steps=size["steps"])
        ),
        "bart_chefer": lambda: results.__setitem__("bart_chefer", chefer_bart.attribute(inp, target=target)),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seconds = median_times(calls, repeats, slow=frozenset({"captum_lig"}))
        memory = {name: peak_mib(call) for name, call in calls.items()}
        inps = [TextTokenInput(p, tokenizer) for p in setup["prompts"]]
        batch_calls = {
            "one_forward": lambda: chefer_gpt2.attribute_batch(inps, setup["batch_targets"], batch_size=None),
            "forward_per_prompt": lambda: chefer_gpt2.attribute_batch(inps, setup["batch_targets"], batch_size=1),
        }
        batch_seconds = median_times(batch_calls, repeats)
    outputs = len(results["chefer"].output_tokens)
    agree = max(float((results[name].token_attr - results["chefer"].token_attr).abs().max())
                for name in ("chefer_loop", "chefer_all"))
    scale = float(results["chefer"].token_attr.abs().max())
    return {
        "size": size_name, "size_spec": size, "repeats": repeats, "outputs": outputs, "prompt_tokens": len(inp.values),
        "seconds": seconds, "memory_mib": memory, "batch_seconds": batch_seconds, "chunking_max_abs_diff": agree,
        "token_attr_max": scale, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "load": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


LABELS = {
    "chefer": "CheferLLMAttribution, chunks of 16 (default)",
    "chefer_loop": "CheferLLMAttribution, chunk_size=1 (a loop)",
    "chefer_all": "CheferLLMAttribution, chunk_size=None (all at once)",
    "captum_lig": "Captum LLMGradientAttribution(LayerIntegratedGradients)",
    "bart_chefer": "CheferLLMAttribution on BART, chunks of 16",
}


def markdown(row: dict[str, Any]) -> str:
    s = row["size_spec"]
    base = row["seconds"]["captum_lig"]
    lines = [
        "# CheferLLMAttribution against Captum's LLMGradientAttribution",
        "",
        f"Written by `benchmarks/llm.py`{' --quick' if row['size'] == 'quick' else ''}. "
        f"Random GPT-2: {s['layers']} layers, width {s['width']}, {s['heads']} heads, vocabulary {s['words']}; "
        f"BART: {max(s['layers'] - 1, 1)} + {max(s['layers'] - 1, 1)} layers of the same width. "
        f"Prompt of {row['prompt_tokens']} tokens (BOS included), target of {row['outputs']} tokens. "
        f"Median of {row['repeats']} interleaved calls after a warm-up (Captum's LIG: "
        f"{min(2, row['repeats'])} calls, no warm-up of its own); torch "
        f"{row['torch']}, {row['threads']} thread(s), {row['cpus']} CPUs ({row['processor']}), load average "
        f"{', '.join(f'{x:.1f}' for x in row['load']) if row['load'] else 'n/a'} at the end (other jobs shared the "
        "machine, so absolute times are inflated; the ratios were measured side by side).",
        "",
        "| method | model | seconds | x Captum LIG | peak memory growth (MiB) |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for name in ("chefer", "chefer_loop", "chefer_all", "captum_lig", "bart_chefer"):
        label = LABELS[name] if name != "captum_lig" else f"{LABELS[name]}, {s['steps']} steps"
        model = "BART" if name == "bart_chefer" else "GPT-2"
        ratio = "n/a (decoder-only class)" if name == "bart_chefer" else f"{row['seconds'][name] / base:.3f}"
        lines.append(f"| {label} | {model} | {row['seconds'][name]:.3f} | {ratio} | {row['memory_mib'][name]:.1f} |")
    b = row["batch_seconds"]
    lines += [
        "",
        "Captum's `LLMGradientAttribution` calls the model as `model(input_ids)` and reads the last position's "
        "logits: it serves decoder-only models only, so BART has no Captum row.",
        "",
        f"Chunk sizes agree: the largest difference of `token_attr` between the three Chefer variants is "
        f"{row['chunking_max_abs_diff']:.2e} (largest entry {row['token_attr_max']:.2e}).",
        "",
        f"Four prompts of {', '.join(str(n) for n in s['prompts'])} words, {s['batch_target']}-token targets, "
        "`attribute_batch` on GPT-2:",
        "",
        "| forward passes | seconds |",
        "| --- | ---: |",
        f"| one padded forward pass for the four prompts (`batch_size=None`) | {b['one_forward']:.3f} |",
        f"| one forward pass per prompt (`batch_size=1`, the default) | {b['forward_per_prompt']:.3f} |",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per method (default 3, quick 2)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "LLM-RESULTS.md")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    _fix_mmap_threshold()
    row = run("quick" if args.quick else "full", args.repeats or (2 if args.quick else 3))
    text = markdown(row)
    args.results.write_text(text)
    if args.json is not None:
        args.json.write_text(json.dumps(row, indent=2, default=str))
    print(text)


if __name__ == "__main__":
    main()
