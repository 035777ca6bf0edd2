"""``python -m captum_chefer compare`` end to end at a tiny size, and its argument handling."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from captum_chefer.cli import main


METHODS = ["Chefer", "Chefer (exclude_self)", "Chefer (recommended)", "Integrated Gradients", "Saliency", "NoiseTunnel (SmoothGrad)", "Random"]


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
    for name in ("report.html", "results.csv", "curves.csv", "results.json", "deletion_insertion.png", "metrics.png", "time.png"):
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
    assert set(data["mean_curves"]["Chefer"]) == {"deletion", "insertion"}
    assert data["settings"]["explained patients"] == 12
    assert data["statistics"]["n_patients"] == 12 and "paired difference" in data["statistics"]["best"]
    assert data["summary"][0]["deletion_aopc_n"] == 12
    from captum_chefer.comparison import Evaluation

    loaded = Evaluation.load(out / "results.json")  # a report's results.json loads back
    assert loaded.methods == METHODS and len(loaded.patient_ids) == 12
    assert loaded.summary()[0]["deletion_aopc"] == pytest.approx(float(rows[0]["deletion_aopc"]))
    # the printed table carries the same numbers as the CSV, and says how many patients and what a star means
    chefer_line = next(line for line in stdout.splitlines() if line.startswith("Chefer "))
    assert f"{float(rows[0]['deletion_aopc']):.3f}" in chefer_line
    assert "n = 12 patients" in stdout and "paired difference to the runner-up" in stdout


def test_a_chance_level_model_is_flagged(small_run):
    # --small trains 2 epochs on 148 patients: the model has not learnt the rules (seeded: 5 of 12 right)
    _, out, stdout, stderr = small_run
    check = json.loads((out / "results.json").read_text())["model_check"]
    assert check["n"] == 12 and check["correct"] == 5 and not check["above_chance"]
    # 6 of the 12 are positive: P(X >= 5) for X ~ Binomial(12, 1/2) is 1 - (1 + 12 + 66 + 220 + 495) / 4096
    assert check["majority_rate"] == 0.5 and check["p_value"] == pytest.approx(3302 / 4096)
    assert "model: accuracy 0.417 (5 of 12" in stdout
    (warning,) = [line for line in stderr.splitlines() if line.startswith("captum-chefer: warning:")]
    assert "not better than chance" in warning and "train it further" in warning
    page = (out / "report.html").read_text()
    assert "<div class='warning'>" in page and "not better than chance" in page


def test_report_is_self_contained(small_run):
    _, out, _, _ = small_run
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
        main(argv + ["--out", str(tmp_path)])
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

