"""One tiny case of ``benchmarks/quality.py``: every table is written and the verdict reads the rows."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_quality():
    spec = importlib.util.spec_from_file_location("benchmark_quality", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmark_quality"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    quality = _load_quality()
    out = tmp_path_factory.mktemp("quality")
    threads = torch.get_num_threads()
    try:
        argv = ["--tiny", "--out", str(out / "QUALITY.md"), "--json", str(out / "rows.json")]
        assert quality.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    return quality, (out / "QUALITY.md").read_text(), json.loads((out / "rows.json").read_text())


def test_tiny_run_writes_every_table(tiny_run):
    quality, report, rows = tiny_run
    for heading in ("## Verdict", "## P@k", "## AUROC", "## deletion AOPC", "## insertion AOPC",
                    "## comprehensiveness", "## sufficiency", "## Time per patient"):
        assert heading in report
    assert {r["family"] for r in rows["rows"]} == set(quality.TINY_FAMILIES)
    methods = {r["method"] for r in rows["rows"]}
    assert {quality.RECOMMENDED, quality.BASELINE, "Chefer", "Chefer exclude_self", "Saliency",
            "NoiseTunnel (SmoothGrad)", "Random"} <= methods
    for r in rows["rows"]:
        assert r["seconds"] > 0, r
        for metric in ("precision_at_k", "auroc"):
            value = r["metrics"][metric]
            assert value is None or math.isnan(value) or 0.0 <= value <= 1.0, (r["method"], metric, value)


def test_tiny_run_verdict_compares_the_recommendation_with_ig(tiny_run):
    quality, report, rows = tiny_run
    for family in quality.TINY_FAMILIES:
        get = {r["method"]: r for r in rows["rows"] if r["family"] == family}
        rec = get[quality.RECOMMENDED]["metrics"]["precision_at_k"]
        ig = get[quality.BASELINE]["metrics"]["precision_at_k"]
        ratio = get[quality.BASELINE]["seconds"] / get[quality.RECOMMENDED]["seconds"]
        verdicts = report.split("## Verdict", 1)[1].split("\n## ", 1)[0]
        line = next(row for row in verdicts.splitlines() if row.startswith(f"| {family} |"))
        assert f"{rec:.3f}" in line and f"{ig:.3f}" in line
        assert ("below IG" in line) == (rec < ig - 1e-9)
        assert ("reached" in line) == (rec >= ig - 1e-9 and ratio >= 40)


def test_recommended_row_is_the_preset():
    quality = _load_quality()
    from captum_chefer import PyHealthAdapter
    from captum_chefer.synthetic import toy_model_and_batch

    model, _ = toy_model_and_batch()
    methods = quality.methods(PyHealthAdapter(model), 0, quality.Settings())
    specs = {name: (method, kwargs) for name, method, kwargs, _ in methods}
    method, kwargs = specs[quality.RECOMMENDED]
    assert method.preset == "recommended" and kwargs == {}
