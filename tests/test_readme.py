"""The README's examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(section: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"<!-- section: {section}")
    end = text.index("<!-- end section", start)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_api_example_runs(capsys):
    (block,) = python_blocks("api")
    namespace: dict = {}
    exec(compile(block, "README.md (API)", "exec"), namespace)
    scores, model = namespace["scores"], namespace["model"]
    assert sorted(scores) == sorted(model.feature_keys)
    assert "conditions" in capsys.readouterr().out


def test_cohort_example_runs(tmp_path, monkeypatch, capsys):
    from captum_chefer.synthetic import default_cohort, train_transformer

    (block,) = python_blocks("cohort")
    dataset = default_cohort(60, seed=1).dataset()
    model = train_transformer(dataset, epochs=1, progress=False)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"model": model, "dataset": dataset}
    exec(compile(block.replace('"n_steps": 50', '"n_steps": 4'), "README.md (cohort)", "exec"), namespace)
    run, rows, summary = namespace["run"], namespace["rows"], namespace["summary"]
    assert run.manifest["complete"] and run.manifest["n_samples"] == 60
    assert set(rows["method"]) == {"Chefer", "IG"} and rows.height == run.rows
    assert summary.methods == ["Chefer", "IG"] and (tmp_path / "reports" / "top_codes.png").stat().st_size > 0
    assert "Spearman" in capsys.readouterr().out
