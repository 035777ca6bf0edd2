"""The README's examples run as written, in order, and the README stays short and points at files that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def blocks(section: str, language: str = "python") -> list[str]:
    text = README.read_text()
    start = text.index(f"<!-- section: {section} -->")
    end = text.index(f"<!-- end section: {section} -->", start)
    return re.findall(rf"```{language}\n(.*?)```", text[start:end], flags=re.S)


APPENDED = ("beyond-pyhealth", "cohort", "generation")  # sections appended after the product part


def test_readme_is_short():
    lines = README.read_text().splitlines()
    first_appended = min(
        (i for i, line in enumerate(lines) for name in APPENDED if line.strip() == f"<!-- section: {name} -->"),
        default=len(lines),
    )
    assert first_appended <= 180, "the product part of the README (above the appended sections) is too long"


def test_every_section_is_closed():
    text = README.read_text()
    opened = re.findall(r"<!-- section: ([\w-]+)", text)
    closed = re.findall(r"<!-- end section: ([\w-]+)", text)
    assert opened == closed and len(set(opened)) == len(opened)


def test_links_point_at_files():
    text = README.read_text()
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if target.startswith("http"):
            continue
        assert (ROOT / target).exists(), target


def test_own_model_blocks_run_in_order(tmp_path, monkeypatch, capsys):
    """The path from a Trainer-trained model and a dataloader to explanations and a report, as written."""
    code = blocks("own-model")
    assert len(code) == 4
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, block in enumerate(code):
        exec(compile(block, f"README.md (own-model, block {i + 1})", "exec"), namespace)
    out = capsys.readouterr().out
    assert re.search(r"^Chefer tensor\(\[", out, flags=re.M) and re.search(r"^IG tensor\(\[", out, flags=re.M)
    model, adapter = namespace["model"], namespace["adapter"]
    assert namespace["scores"]["conditions"].shape == namespace["batch"]["conditions"].shape
    page = (tmp_path / "reports" / "mine" / "patients.html").read_text()
    assert page.count("<td class='method'>Chefer</td>") == page.count("<td class='method'>IG</td>") == 64
    report = namespace["report"]
    assert report.html_path == Path("reports/mine/report.html") and report.html_path.exists()
    assert report.model_check.above_chance  # the stand-in model learnt something
    assert "accuracy" in out and "Random" in out
    from captum_chefer.comparison import Evaluation

    saved = Evaluation.load(tmp_path / "reports" / "mine" / "per_patient.parquet")
    assert saved.methods == report.evaluation.methods and saved.n_samples == report.evaluation.n_samples == 80
    assert adapter.model is model


def test_own_model_prose_names_what_the_blocks_use():
    text = README.read_text()
    for name in ("compare_methods", "code_rows", "Comparison.load", "ground_truth", "exclude_self", "ig_baselines"):
        assert name in text, name


def test_shell_commands_exist():
    from captum_chefer.cli import build_parser

    for block in blocks("install", "bash"):
        for line in block.splitlines():
            if line.startswith("make "):
                target = line.split()[1]
                assert re.search(rf"^{target}:", (ROOT / "Makefile").read_text(), flags=re.M), target
    help_text = build_parser().format_help()
    assert "compare" in help_text


@pytest.mark.parametrize("section", ["report"])
def test_demo_table_is_there(section):
    text = README.read_text()
    start = text.index(f"<!-- section: {section} -->")
    table = [line for line in text[start:].splitlines() if line.startswith("| Chefer")]
    assert table and "[" in table[0], "the demo table carries intervals"


@pytest.mark.filterwarnings("ignore::captum_chefer.comparison.chance.ChanceLevelWarning")  # one epoch on 60 patients
def test_cohort_example_runs(tmp_path, monkeypatch, capsys):
    from captum_chefer.cohort import read_cohort
    from captum_chefer.synthetic import default_cohort, train_transformer

    (block,) = blocks("cohort")
    dataset = default_cohort(60, seed=1).dataset()
    model = train_transformer(dataset, epochs=1, progress=False)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"model": model, "dataset": dataset}
    exec(compile(block.replace('"n_steps": 50', '"n_steps": 4'), "README.md (cohort)", "exec"), namespace)
    run, summary = namespace["run"], namespace["summary"]
    assert run.manifest["complete"] and run.manifest["n_samples"] == 60
    rows = read_cohort(tmp_path / "reports" / "cohort_api")
    assert set(rows["method"]) == {"Chefer (recommended)", "IG"} and rows.height == run.rows
    assert summary.methods == ["Chefer (recommended)", "IG"]
    assert "{'preset': 'recommended'}" in run.manifest["methods"][0]["options"]  # the recommended setting runs
    out = capsys.readouterr().out
    assert "Spearman" in out and out.startswith(("model: accuracy", "warning: The model is not better than chance"))
