"""``benchmarks/llm.py --quick`` runs, writes its table, and its three Chefer chunkings agree.

No timing is asserted: the comparison with Captum lives in the benchmark's own output.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_writes_sane_numbers(tmp_path):
    results, rows = tmp_path / "LLM-RESULTS.md", tmp_path / "llm.json"
    proc = subprocess.run(
        [
            sys.executable, str(ROOT / "benchmarks" / "llm.py"),
            "--quick", "--results", str(results), "--json", str(rows),
        ],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(rows.read_text())
    assert set(row["seconds"]) == {"chefer", "chefer_loop", "chefer_all", "captum_lig", "bart_chefer"}
    assert all(math.isfinite(s) and s > 0 for s in [*row["seconds"].values(), *row["batch_seconds"].values()])
    assert row["outputs"] == 8 and row["token_attr_max"] > 0
    assert row["chunking_max_abs_diff"] <= 1e-4 * row["token_attr_max"]
    text = results.read_text()
    assert "| Captum LLMGradientAttribution(LayerIntegratedGradients), 4 steps | GPT-2 |" in text
    assert "decoder-only" in text
