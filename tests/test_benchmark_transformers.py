"""The transformers grid of the benchmark at a tiny size, in process (no timing is asserted)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.test_benchmark import _load_speed


@pytest.fixture(scope="module")
def speed():
    return _load_speed()


@pytest.mark.parametrize("family", ["bert", "gpt2", "pyhealth-vit"])
def test_tiny_workloads_run_every_method(speed, family):
    speed.IG_STEPS = 2
    (config,) = speed.transformer_configs([family], tiny=True)
    w = speed.build_workload(config, "cpu")
    calls = speed.make_methods(w)
    assert set(calls) == set(speed.transformer_methods(config))
    assert ("pyhealth" in calls) == (family == "pyhealth-vit")
    results = {name: call() for name, call in calls.items()}
    assert results["forward"].shape == (config.batch, w.adapter.num_outputs)
    for name in ("chefer", "saliency", "ig"):
        (attributions,) = results[name]
        assert attributions.shape == w.inputs[0].shape and torch.isfinite(attributions).all(), name
    if family == "pyhealth-vit":  # two blocks: the reference still skips pos_embedding, so the two differ
        gap = speed._max_difference(w, results["chefer"], results["pyhealth"])
        assert math.isfinite(gap) and gap > 0
        assert all(p.grad is None for p in w.model.parameters())  # the benchmark cleans up after PyHealth


def _row(speed, config, method, seconds, memory):
    return speed.TransformerRow(config, method, seconds, 3, math.nan, math.nan, memory, math.nan)


def test_targets_are_judged_per_family(speed, tmp_path):
    bert, vit = speed.transformer_configs(["bert", "vit"])
    rows = [
        speed.TransformerRow(bert, "chefer", 2.0, 3, 0.95, 2.1, 90.0, 0.9),
        speed.TransformerRow(vit, "chefer", 1.0, 3, 1.2, 1.5, 50.0, math.nan),
    ]
    joined = "\n".join(speed.transformer_target_lines(rows))
    assert "PASS  time ours / Saliency = 0.95" in joined and "FAIL  time ours / no-grad forward = 2.10" in joined
    assert "FAIL  time ours / Saliency = 1.20" in joined
    assert "n/a   peak memory growth ours / Saliency = –" in joined  # noqa: RUF001 (the en dash is the printed text)
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results (cpu)\n\nthe PyHealth grid\n")
    speed.write_section(results, "first")
    speed.write_section(results, "second")
    text = results.read_text()
    assert text.startswith("# Benchmark results (cpu)\n\nthe PyHealth grid\n")
    assert text.count(speed.SECTION_START) == 1 and "second" in text and "first" not in text
