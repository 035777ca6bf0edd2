"""``python -m captum_chefer compare`` end to end at a tiny size, and its argument handling."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from captum_chefer.cli import main


METHODS = ["Chefer", "Chefer (exclude_self)", "Integrated Gradients", "Saliency", "NoiseTunnel (SmoothGrad)", "Random"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    import io
    from contextlib import redirect_stdout

    buffer = io.StringIO()
    with redirect_stdout(buffer):
        code = main(["compare", "--small", "--out", str(out), "--no-progress", "--seed", "1"])
    return code, out, buffer.getvalue()


def test_compare_writes_report_figures_csv_json(small_run):
    code, out, stdout = small_run
    assert code == 0
    assert f"report: {(out / 'report.html').resolve()}" in stdout
    for name in ("report.html", "results.csv", "curves.csv", "results.json", "deletion_insertion.png", "metrics.png", "time.png"):
        assert (out / name).stat().st_size > 0, name
    assert len(list(out.glob("patient_*.png"))) == 2  # --small shows two patients

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["method"] for r in rows] == METHODS
    for row in rows:
        assert 0.0 <= float(row["auroc"]) <= 1.0 or row["auroc"] in ("", "nan")
        assert float(row["seconds_per_sample"]) > 0

    data = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in data["summary"]] == METHODS
    assert set(data["mean_curves"]["Chefer"]) == {"deletion", "insertion"}
    assert data["settings"]["explained patients"] == 12
    # the printed table carries the same numbers as the CSV
    chefer_line = next(line for line in stdout.splitlines() if line.startswith("Chefer "))
    assert f"{float(rows[0]['deletion_aopc']):.3f}" in chefer_line


def test_report_is_self_contained(small_run):
    _, out, _ = small_run
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 + 2 + 1  # three summary figures, one per shown patient, the cohort's
    assert "<table class=\"results\">" in page and "Chefer (exclude_self)" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "[C_" in page or "[P_" in page  # planted ground-truth codes are marked


def test_module_help_and_console_script():
    result = subprocess.run([sys.executable, "-m", "captum_chefer", "compare", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--out" in result.stdout and "--ig-steps" in result.stdout
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("captum-chefer") == "captum_chefer.cli:main"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compare", "--small", "--explain", "500"], "must be smaller than --patients"),
        (["compare", "--small", "--epochs", "0"], "--epochs must be >= 1"),
        (["compare", "--threads", "0", "--small"], "--threads must be >= 1"),
    ],
)
def test_bad_arguments_exit_with_a_message(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        main(argv + ["--out", str(tmp_path)])


def test_unknown_command_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["explain"])
    assert "invalid choice" in capsys.readouterr().err


def test_readme_compare_examples_run(tmp_path, monkeypatch, capsys):
    import re
    from pathlib import Path

    from pyhealth.datasets import get_dataloader

    from captum_chefer.synthetic import default_cohort, train_transformer

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index("<!-- section: compare")
    one_call, own_cohort = re.findall(r"```python\n(.*?)```", text[start : text.index("<!-- end section", start)], flags=re.S)
    cohort = default_cohort(120, seed=2)
    dataset = cohort.dataset()
    model = train_transformer(dataset, epochs=1, progress=False)
    monkeypatch.chdir(tmp_path)
    namespace = {"model": model, "test_loader": get_dataloader(dataset.subset(list(range(8))), batch_size=4, shuffle=False)}
    exec(compile(one_call, "README.md (compare, one call)", "exec"), namespace)
    assert (tmp_path / "reports" / "mine" / "report.html").exists()
    assert namespace["report"].evaluation.per_sample["Chefer"]["deletion_aopc"].shape == (8,)
    assert "Integrated Gradients" in capsys.readouterr().out

    namespace = {}
    exec(compile(own_cohort, "README.md (compare, own cohort)", "exec"), namespace)
    made = namespace["cohort"]
    assert made.num_classes == 4 and len(made.samples) == 2000 and len(namespace["dataset"]) == 2000
