"""The benchmark's tiny case: it runs, its numbers are sane, Chefer equals PyHealth there, targets are judged.

No timing is asserted here: the speed targets live in the benchmark's own output.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "speed.py"


def _load_speed():
    spec = importlib.util.spec_from_file_location("benchmark_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    # A fresh process: the memory probes fork before any tensor operation, which pytest's process is past.
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [
            sys.executable, str(SCRIPT), "--quick", "--results", str(out / "RESULTS.md"),
            "--json", str(out / "rows.json"),
        ],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads((out / "rows.json").read_text()), (out / "RESULTS.md").read_text()


def test_quick_rows_are_finite_and_positive(quick_run):
    _, rows, _ = quick_run
    speed = _load_speed()
    assert [r["method"] for r in rows] == list(speed.METHODS)
    for r in rows:
        assert math.isfinite(r["seconds"]) and r["seconds"] > 0, r
        assert r["runs"] >= 5, r
        assert math.isfinite(r["memory_mib"]) and r["memory_mib"] >= 0, r
        assert math.isfinite(r["ratio_pyhealth"]) and r["ratio_pyhealth"] > 0, r
    by_method = {r["method"]: r for r in rows}
    for method in ("chefer", "pyhealth", "saliency", "ig"):  # a backward pass allocates something
        assert by_method[method]["memory_mib"] > 0, by_method[method]
    assert by_method["forward"]["ratio_forward"] == pytest.approx(1.0)
    assert by_method["pyhealth"]["ratio_pyhealth"] == pytest.approx(1.0)
    # every ratio from the run's own raw numbers (time and memory of the reference rows), for every method
    for r in rows:
        assert r["ratio_pyhealth"] == pytest.approx(r["seconds"] / by_method["pyhealth"]["seconds"]), r
        assert r["ratio_forward"] == pytest.approx(r["seconds"] / by_method["forward"]["seconds"]), r
        assert r["memory_ratio_pyhealth"] == pytest.approx(r["memory_mib"] / by_method["pyhealth"]["memory_mib"]), r


def test_quick_chefer_equals_pyhealth_in_that_run(quick_run):
    _, rows, _ = quick_run
    (chefer,) = [r for r in rows if r["method"] == "chefer"]
    assert chefer["max_diff_pyhealth"] < 1e-5


def test_quick_report_has_machine_table_and_targets(quick_run):
    stdout, _, results = quick_run
    for text in (stdout, results):
        assert text.count("machine: ") == 1 and "cores, torch " in text
        assert "| codes | layers | heads | method | median ms |" in text
        assert "targets at 1024+256 codes" in text


def _row(speed, config, method, seconds, memory):
    return speed.Row(config, method, seconds, 5, math.nan, math.nan, memory, math.nan)


def test_target_lines_judge_each_target():
    speed = _load_speed()
    big, small = speed.target_configs(64)
    rows = [
        _row(speed, big, "forward", 1.0, 10.0),
        _row(speed, big, "chefer", 1.5, 30.0),
        _row(speed, big, "pyhealth", 4.0, 100.0),
        _row(speed, big, "saliency", 1.4, 40.0),  # ours slower than Saliency: FAIL
        _row(speed, big, "ig", 90.0, 500.0),
        _row(speed, small, "forward", 0.2, 1.0),
        _row(speed, small, "chefer", 0.3, 1.0),
    ]
    lines = speed.target_lines(rows, 64)
    joined = "\n".join(lines)
    assert "PASS  time ours / PyHealth = 0.38" in joined
    assert "FAIL  time ours / Saliency = 1.07" in joined
    assert "PASS  time ours / no-grad forward = 1.50" in joined
    assert "PASS  peak memory growth ours / PyHealth = 0.30" in joined
    assert "PASS  time IntegratedGradients / ours = 60.00" in joined
    assert "PASS  (ours / forward at 1024) / (ours / forward at 256) = 1.00" in joined
    assert sum(line.lstrip().startswith(("PASS", "FAIL")) for line in lines) == 6


def test_pyhealth_call_leaves_no_attention_state_behind():
    """PyHealth's CheferRelevance keeps attention maps, their gradients and parameter .grad on the model;
    the benchmark drops them after each call so the next method's memory is not flattered by their release."""
    import torch

    speed = _load_speed()
    w = speed.build_workload(speed.QUICK, "cpu")

    def leftovers() -> int:
        held = [m for m in w.model.modules() if getattr(m, "attn_map", None) is not None]
        return len(held) + sum(p.grad is not None for p in w.model.parameters())

    from pyhealth.interpret.methods import CheferRelevance

    CheferRelevance(w.model).attribute(**w.batch)
    assert leftovers() > 0  # what the benchmark has to clean up
    speed.release_pyhealth_state(w.model)
    assert leftovers() == 0
    result = speed.make_methods(w)["pyhealth"]()
    assert leftovers() == 0 and all(torch.isfinite(v).all() for v in result.values())
