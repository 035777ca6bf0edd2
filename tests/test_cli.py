"""``python -m captum_chefer compare`` end to end at a tiny size, and its argument handling."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import warnings
from importlib.metadata import entry_points

import pytest

from captum_chefer.cli import main

METHODS = ["Chefer (recommended)", "Chefer (PyHealth)", "Chefer (PyHealth, exclude_self)", "Integrated Gradients",
           "Saliency", "NoiseTunnel (SmoothGrad)", "Random"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    import io
    from contextlib import redirect_stderr, redirect_stdout

    buffer, errors = io.StringIO(), io.StringIO()
    with redirect_stdout(buffer), redirect_stderr(errors):
        code = main(["compare", "--small", "--out", str(out), "--no-progress", "--seed", "1"])
    return code, out, buffer.getvalue(), errors.getvalue()


def test_compare_writes_report_figures_csv_json(small_run):
    code, out, stdout, _ = small_run
    assert code == 0
    assert f"report: {(out / 'report.html').resolve()}" in stdout
    for name in ("report.html", "results.csv", "curves.csv", "results.json", "deletion_insertion.png", "metrics.png",
                 "time.png"):
        assert (out / name).stat().st_size > 0, name
    assert len(list(out.glob("patient_*.png"))) == 2  # --small shows two patients

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["method"] for r in rows] == METHODS
    for row in rows:
        assert 0.0 <= float(row["auroc"]) <= 1.0 or row["auroc"] in ("", "nan")
        assert float(row["seconds_per_sample"]) > 0
        assert float(row["deletion_aopc_low"]) <= float(row["deletion_aopc"]) <= float(row["deletion_aopc_high"])
        assert row["deletion_aopc_n"] == "12"

    data = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in data["summary"]] == METHODS
    assert set(data["mean_curves"]["Chefer (recommended)"]) == {"deletion", "insertion"}
    assert data["settings"]["explained patients"] == 12
    assert data["statistics"]["n_patients"] == 12 and "paired difference" in data["statistics"]["best"]
    assert data["summary"][0]["deletion_aopc_n"] == 12
    from captum_chefer.comparison import Evaluation

    loaded = Evaluation.load(out / "results.json")  # a report's results.json loads back
    assert loaded.methods == METHODS and len(loaded.patient_ids) == 12
    assert loaded.summary()[0]["deletion_aopc"] == pytest.approx(float(rows[0]["deletion_aopc"]))
    # the printed table carries the same numbers as the CSV, and says how many patients and what a star means
    chefer_line = next(line for line in stdout.splitlines() if line.startswith("Chefer (recommended) "))
    assert f"{float(rows[0]['deletion_aopc']):.3f}" in chefer_line
    assert "n = 12 patients" in stdout and "paired difference to the runner-up" in stdout


def test_a_chance_level_model_is_flagged(small_run):
    # --small trains 2 epochs on 148 patients: the model has not learnt the rules (seeded: 5 of 12 right)
    _, out, stdout, stderr = small_run
    check = json.loads((out / "results.json").read_text())["model_check"]
    assert check["n"] == 12 and check["correct"] == 5 and not check["above_chance"]
    # 6 of the 12 are positive: P(X >= 5) for X ~ Binomial(12, 1/2) is 1 - (1 + 12 + 66 + 220 + 495) / 4096
    assert check["majority_rate"] == 0.5 and check["p_value"] == pytest.approx(3302 / 4096)
    # 5 of 12 and Wilson's interval (hand-computed in tests/test_report.py)
    assert "model: accuracy 0.417 (5 of 12 explained patients, 95% interval [0.193, 0.680])" in stdout
    assert check["accuracy_low"] == pytest.approx(0.19326, abs=1e-5)
    assert check["accuracy_high"] == pytest.approx(0.68049, abs=1e-5)
    # said once, as the command's own line: not also as a Python warning from each step of the run
    (warning,) = [line for line in stderr.splitlines() if "not better than chance" in line]
    assert warning.startswith(
        "captum-chefer: warning: The model is not better than chance on the explained patients: "
        "accuracy 0.417 (5 of 12 "
    )
    assert "train it further" in warning and "ChanceLevelWarning" not in stderr
    page = (out / "report.html").read_text()
    assert "<div class='warning'>" in page and "not better than chance" in page


def test_compare_as_a_function_warns_in_python(monkeypatch, tmp_path):
    import captum_chefer.cli as cli
    from captum_chefer import ChanceLevelWarning
    from captum_chefer.comparison import ModelCheck

    class Report:
        model_check = ModelCheck.from_counts(5, 12, {0: 6, 1: 6})

    def steps(*args, **kwargs):  # the run's own steps would warn too: compare() says it once
        warnings.warn(ChanceLevelWarning("from a step"), stacklevel=2)
        return Report()

    monkeypatch.setattr(cli, "_compare", steps)
    with pytest.warns(ChanceLevelWarning) as caught:
        cli.compare(tmp_path, patients=10, epochs=1, explain=2, ig_steps=1, nt_samples=1, show=0, sensitivity_samples=0,
                    infidelity_samples=0)
    assert [str(w.message) for w in caught] == [Report.model_check.warning()]


def test_report_is_self_contained(small_run):
    _, out, _, _ = small_run
    page = (out / "report.html").read_text()
    # three summary figures, one per shown patient, the cohort's
    assert page.count("data:image/png;base64,") == 3 + 2 + 1
    assert "<table class=\"results\">" in page and "Chefer (PyHealth, exclude_self)" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page
    # planted ground-truth codes are outlined and bracketed, with a legend line
    assert "<mark class='planted'" in page and ("[C_" in page or "[P_" in page)
    assert "a planted code (the cohort's ground truth)" in page
    assert "Chefer (recommended)</b> is <code>CheferAttribution(adapter, preset=\"recommended\")</code>" in page
    assert "<b>Chefer (PyHealth)</b> is <code>CheferAttribution(adapter)</code>" in page
    # the cohort section checks the model on its samples too
    cohort = page[page.index("<h2>Cohort"):]
    assert "not better than chance on the samples" in cohort[:2000]


def test_module_help_and_console_script():
    result = subprocess.run(
        [sys.executable, "-m", "captum_chefer", "compare", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "--out" in result.stdout and "--ig-steps" in result.stdout
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("captum-chefer") == "captum_chefer.cli:main"


@pytest.fixture
def no_training(monkeypatch):
    """Fail if the command gets as far as training: bad arguments must stop it before."""
    import captum_chefer.synthetic

    def refuse(*args, **kwargs):
        raise AssertionError("the command started training")

    monkeypatch.setattr(captum_chefer.synthetic, "train_transformer", refuse)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compare", "--small", "--explain", "500"], "must be smaller than --patients"),
        (["compare", "--small", "--epochs", "0"], "--epochs must be >= 1"),
        (["compare", "--threads", "0", "--small"], "--threads must be >= 1"),
        (["compare", "--small", "--device", "tpu9"], "--device tpu9: not a torch device"),
    ],
)
def test_bad_arguments_exit_with_a_message(argv, message, tmp_path, capsys, no_training):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("captum-chefer: error: ") and message in line


def test_bad_out_is_refused_before_any_training(tmp_path, capsys, no_training):
    a_file = tmp_path / "README.md"
    a_file.write_text("not a folder")
    for out, message in (
        (a_file / "x", f"{a_file} is a file, so no folder can be made inside it"),
        (a_file / "x" / "y", f"{a_file} is a file, so no folder can be made inside it"),
        (a_file, f"{a_file} is a file, not a folder"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["compare", "--small", "--out", str(out)])
        assert exit_info.value.code == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"captum-chefer: error: --out {out}: ") and message in line
    assert not (tmp_path / "README.md" / "x").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda_is_refused_before_any_training(tmp_path, capsys, no_training):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--small", "--device", "cuda", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--device cuda: torch sees no CUDA device" in capsys.readouterr().err


def test_unknown_command_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["explain"])
    assert "invalid choice" in capsys.readouterr().err

