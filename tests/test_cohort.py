"""A whole cohort: ``attribute_dataset`` alone and under ``torchrun`` (gloo), resuming, ``summarize``, the CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
from captum.attr import IntegratedGradients

from captum_chefer import CheferAttribution, PyHealthAdapter
from captum_chefer.cli import main
from captum_chefer.cohort import COLUMNS, MANIFEST, attribute_dataset, read_cohort, summarize
from captum_chefer.comparison import compare_methods
from conftest import make_samples, points_at

# PyHealth's disk-backed datasets ask for a newer litdata on every open; the test models are untrained, so
# most runs here warn that the model is no better than chance (the tests that check that use pytest.warns)
pytestmark = [
    pytest.mark.filterwarnings("ignore:A newer version of litdata:UserWarning"),
    pytest.mark.filterwarnings("ignore::captum_chefer.comparison.chance.ChanceLevelWarning"),
]

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "tests" / "cohort_build.py"
N = 22  # samples of the test cohort: 5 parts of 5 (the last one of 2)
KEY = ["method", "sample", "feature", "visit", "position"]
# The same settings in-process and on the command line: batches of 3 inside parts of 5 samples.
CLI_ARGS = ["--methods", "chefer,ig,smoothgrad", "--ig-steps", "4", "--nt-samples", "2", "--batch-size", "3",
            "--chunk-size", "5", "--no-progress"]


@pytest.fixture(scope="module")
def disk_dataset(tmp_path_factory):
    """A disk-backed PyHealth dataset (litdata), as large cohorts are; its path is what build() opens."""
    from pyhealth.datasets import create_sample_dataset

    from captum_chefer.synthetic import quiet_pyhealth

    samples = make_samples("sequence", n=N, seed=3)
    with quiet_pyhealth():
        dataset = create_sample_dataset(
            samples=samples, input_schema={"conditions": "sequence", "procedures": "nested_sequence"},
            output_schema={"label": "binary"}, in_memory=False,
        )
    yield dataset.path, samples
    dataset.close()


@pytest.fixture(scope="module")
def built(disk_dataset):
    """(adapter, dataset, specs): what the CLI builds from tests/cohort_build.py, in this process."""
    path, _ = disk_dataset
    os.environ["CAPTUM_CHEFER_TEST_DATASET"] = path
    try:
        spec = importlib.util.spec_from_file_location("cohort_build_under_test", BUILD)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model, dataset = module.build()
    finally:
        del os.environ["CAPTUM_CHEFER_TEST_DATASET"]
    adapter = PyHealthAdapter(model)
    from captum_chefer.report import default_methods

    # --methods chefer,ig,smoothgrad
    wanted = {"Chefer (recommended)", "Integrated Gradients", "NoiseTunnel (SmoothGrad)"}
    specs = [s for s in default_methods(adapter, ig_steps=4, nt_samples=2) if s[0] in wanted]
    return adapter, dataset, specs


@pytest.fixture(scope="module")
def single(built, tmp_path_factory):
    """The single-process run, in this process, with the CLI's settings."""
    adapter, dataset, specs = built
    out = tmp_path_factory.mktemp("single")
    run = attribute_dataset(adapter, dataset, specs, out, 3, chunk_size=5, progress=False)
    return run, read_cohort(out).sort(KEY)


def _expected_codes(samples) -> set[tuple]:
    """Every real code of the raw samples: (sample, feature, visit, position, code), read without the adapter."""
    rows = set()
    for i, s in enumerate(samples):
        rows |= {(i, "conditions", None, j, c) for j, c in enumerate(s["conditions"])}
        rows |= {(i, "procedures", v, j, c) for v, visit in enumerate(s["procedures"]) for j, c in enumerate(visit)}
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_single_process_run_covers_every_real_code_once_per_method(single, disk_dataset):
    run, table = single
    _, samples = disk_dataset
    assert table.columns == list(COLUMNS)
    assert run.manifest["complete"] and run.manifest["n_samples"] == N and len(run.parts) == 5
    assert run.rows == table.height
    expected = _expected_codes(samples)
    for method in ("Chefer (recommended)", "Integrated Gradients", "NoiseTunnel (SmoothGrad)"):
        rows = table.filter(pl.col("method") == method)
        keys = list(rows.select("sample", "feature", "visit", "position", "code").iter_rows())
        assert len(keys) == len(set(keys)) == len(expected)
        assert set(keys) == expected
    ids = dict(zip(table["sample"], table["patient_id"], strict=True))
    assert all(ids[i] == samples[i]["patient_id"] for i in ids)
    # a single-logit model: its positive class is explained, and y_prob is that class's probability
    assert set(table["target"]) == {1}
    assert ((table["probability"] > 0) & (table["probability"] < 1)).all()


def test_scores_equal_compare_methods_over_a_loader(built, single):
    """The rows carry the scores compare_methods gives the same samples (its batches are cut differently)."""
    from pyhealth.datasets import get_dataloader

    adapter, dataset, specs = built
    _, table = single
    loader = get_dataloader(dataset, batch_size=4, shuffle=False)
    deterministic = [s for s in specs if s[0] != "NoiseTunnel (SmoothGrad)"]
    reference = compare_methods(adapter, loader, deterministic, progress=False)
    for name, _, _ in deterministic:
        rows = table.filter(pl.col("method") == name)
        selected = rows.select("sample", "feature", "visit", "position", "score")
        for sample, feature, visit, position, score in selected.iter_rows():
            index = (sample, position) if visit is None else (sample, visit, position)
            assert score == pytest.approx(float(reference.scores[name][feature][index]), abs=1e-5, rel=1e-4)
    with torch.no_grad():
        batch = next(iter(get_dataloader(dataset, batch_size=N, shuffle=False)))
        y_prob = adapter.model(**batch)["y_prob"][:, 0]
    probability = dict(zip(table["sample"], table["probability"], strict=True))
    assert [probability[i] for i in range(N)] == pytest.approx(y_prob.tolist(), abs=1e-6)


def test_torchrun_two_processes_equal_one_and_resume_with_one(disk_dataset, built, single, tmp_path):
    """``torchrun --nproc_per_node 2`` (gloo) writes the single-process rows exactly; after a part is
    deleted, another cut short and a temporary file left behind, one process finishes the run."""
    path, _ = disk_dataset
    out = tmp_path / "two"
    env = dict(os.environ, PYTHONPATH=str(ROOT), CAPTUM_CHEFER_TEST_DATASET=path, OMP_NUM_THREADS="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), "-m", "captum_chefer", "cohort", "--build", str(BUILD), "--out", str(out),
        "--no-summary", *CLI_ARGS,
    ]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "22 samples, 5 parts (5 computed, 0 already complete) by 2 process(es)" in result.stdout

    manifest = json.loads((out / MANIFEST).read_text())
    per_rank = manifest["this_run"]["per_rank"]
    assert manifest["this_run"]["backend"] == "gloo" and [r["rank"] for r in per_rank] == [0, 1]
    assert sorted(per_rank[0]["chunks"] + per_rank[1]["chunks"]) == [0, 1, 2, 3, 4]  # each part by one process
    assert not set(per_rank[0]["chunks"]) & set(per_rank[1]["chunks"])
    single_run, reference = single
    two = read_cohort(out).sort(KEY)
    assert two.equals(reference)  # bit for bit, SmoothGrad's noise included
    assert manifest["model_check"] == single_run.manifest["model_check"]  # label counts summed over the processes

    (out / "part-000001.parquet").unlink()
    cut = out / "part-000003.parquet"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # a part without its footer
    (out / ".part-000002.parquet.4242.tmp").write_bytes(b"PAR1 half written")  # a killed run's temporary file
    untouched = {k: (out / f"part-00000{k}.parquet").stat().st_mtime_ns for k in (0, 2, 4)}
    adapter, dataset, specs = built
    run = attribute_dataset(adapter, dataset, specs, out, 3, chunk_size=5, progress=False)
    assert run.computed == [1, 3] and run.skipped == [0, 2, 4]
    assert run.manifest["this_run"]["world_size"] == 1
    assert {k: (out / f"part-00000{k}.parquet").stat().st_mtime_ns for k in (0, 2, 4)} == untouched
    assert not list(out.glob(".*.tmp"))
    assert read_cohort(out).sort(KEY).equals(reference)
    assert run.manifest["model_check"] == single_run.manifest["model_check"]  # skipped parts keep their counts


def test_the_manifest_checks_the_model_against_chance(built, single, disk_dataset):
    """The model check of the run, against PyHealth's own forward and the raw samples' labels."""
    from pyhealth.datasets import get_dataloader

    from captum_chefer.comparison import ModelCheck

    adapter, dataset, _ = built
    run, _ = single
    _, samples = disk_dataset
    with torch.no_grad():
        batch = next(iter(get_dataloader(dataset, batch_size=N, shuffle=False)))
        predicted = (adapter.model(**batch)["y_prob"][:, 0] >= 0.5).long().tolist()
    labels = [int(s["label"]) for s in samples]
    correct = sum(p == y for p, y in zip(predicted, labels, strict=True))
    majority = max(labels.count(0), labels.count(1)) / N
    check = run.model_check
    assert (check.n, check.correct, check.majority_rate, check.unit) == (N, correct, majority, "samples")
    assert check == ModelCheck.from_counts(correct, N, {0: labels.count(0), 1: labels.count(1)}, unit="samples")
    assert run.manifest["model_check"]["warning"] == (check.warning() or None)


@pytest.fixture
def toy():
    from captum_chefer.synthetic import toy_model_and_batch

    model, _ = toy_model_and_batch(batch_size=9)
    adapter = PyHealthAdapter(model)
    return adapter, model.dataset, [CheferAttribution(adapter), ("IG", IntegratedGradients(adapter), {"n_steps": 4})]


def test_rerun_skips_complete_parts_and_redoes_broken_ones(toy, tmp_path):
    adapter, dataset, methods = toy
    first = attribute_dataset(adapter, dataset, methods, tmp_path, 2, chunk_size=4, progress=False)
    assert first.computed == [0, 1, 2] and first.skipped == []
    before = read_cohort(tmp_path)
    again = attribute_dataset(adapter, dataset, methods, tmp_path, 2, chunk_size=4, progress=False)
    assert again.computed == [] and again.skipped == [0, 1, 2]

    (tmp_path / "part-000000.parquet").unlink()
    part = tmp_path / "part-000002.parquet"
    part.write_bytes(part.read_bytes()[:-9])  # the end of the footer is missing
    (tmp_path / ".part-000001.parquet.99.tmp").write_bytes(b"")
    (tmp_path / MANIFEST).unlink()
    # another batch size
    third = attribute_dataset(adapter, dataset, methods, tmp_path, 3, chunk_size=4, progress=False)
    assert third.computed == [0, 2] and third.skipped == [1]
    after = read_cohort(tmp_path)
    floats = ["score", "probability"]  # other batches pad differently: equal up to rounding
    assert after.select(pl.exclude(floats)).equals(before.select(pl.exclude(floats)))
    for column in floats:
        assert (after[column] - before[column]).abs().max() < 1e-5
    assert not list(tmp_path.glob(".*"))


def test_a_loader_gives_its_batch_size_and_the_dataset_order(toy, tmp_path):
    from pyhealth.datasets import get_dataloader

    adapter, dataset, methods = toy
    loader = get_dataloader(dataset, batch_size=4, shuffle=True, seed=1)  # its sampler is not used
    from_loader = attribute_dataset(adapter, loader, methods, tmp_path / "loader", chunk_size=4, progress=False)
    attribute_dataset(adapter, dataset, methods, tmp_path / "dataset", 4, chunk_size=4, progress=False)
    assert from_loader.manifest["n_samples"] == 9
    assert read_cohort(tmp_path / "loader").equals(read_cohort(tmp_path / "dataset"))
    with pytest.raises(TypeError, match="not a batch; use compare_methods"):
        attribute_dataset(adapter, next(iter(loader)), methods, tmp_path / "batch")


def test_a_run_with_other_settings_is_refused_not_mixed(toy, tmp_path):
    adapter, dataset, methods = toy
    attribute_dataset(adapter, dataset, methods, tmp_path, chunk_size=4, progress=False)
    with pytest.raises(ValueError, match=r"another run .*differs in methods.*overwrite=True"):
        attribute_dataset(adapter, dataset, methods[:1], tmp_path, chunk_size=4, progress=False)
    with pytest.raises(ValueError, match=r"differs in chunk_size\)"):
        attribute_dataset(adapter, dataset, methods, tmp_path, chunk_size=5, progress=False)
    run = attribute_dataset(adapter, dataset, methods[:1], tmp_path, chunk_size=4, overwrite=True, progress=False)
    assert run.computed == [0, 1, 2] and set(read_cohort(tmp_path)["method"]) == {"Chefer"}


def test_processes_that_built_different_models_are_refused(toy, monkeypatch):
    from captum_chefer.cohort import _ProcessGroup

    group = _ProcessGroup(rank=0, world_size=2, created=False, backend="gloo")
    monkeypatch.setattr(group, "gather", lambda value: [value, dict(value, model_sha256="other")])
    with pytest.raises(ValueError, match="differ in model_sha256: every process must build the same model"):
        group.check_same({"model_sha256": "mine", "n_samples": 9})


def test_an_existing_file_as_out_fails_before_any_work(toy, tmp_path):
    adapter, _, methods = toy
    target = tmp_path / "taken"
    target.write_text("not a directory")

    class Untouchable:
        def __len__(self):
            raise AssertionError("the dataset was read")

        def __getitem__(self, index):
            raise AssertionError("the dataset was read")

    with pytest.raises(NotADirectoryError, match=r"is an existing file.*pass a directory"):
        attribute_dataset(adapter, Untouchable(), methods, target)
    assert target.read_text() == "not a directory"


def test_cli_refuses_an_existing_file_as_out_in_one_line(tmp_path, capsys):
    marker = tmp_path / "built"
    build = tmp_path / "build.py"
    build.write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\ndef build():\n    raise AssertionError\n"
    )
    target = tmp_path / "taken.parquet"
    target.write_text("x")
    assert main(["cohort", "--build", str(build), "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "--out" in err and "existing file" in err
    assert not marker.exists()  # the build file was not even imported
    assert main(["cohort", "--build", str(tmp_path / "missing.py"), "--out", str(tmp_path / "o")]) == 2
    assert "no file" in capsys.readouterr().err
    assert main(["cohort", "--synthetic", "10", "--methods", "chefer,lime", "--out", str(tmp_path / "o")]) == 2
    assert "unknown ['lime']" in capsys.readouterr().err


def test_cli_synthetic_cohort_writes_parts_summary_and_resumes(tmp_path, capsys):
    out = tmp_path / "cohort"
    argv = ["cohort", "--synthetic", "40", "--epochs", "1", "--out", str(out), "--ig-steps", "4",
            "--chunk-size", "16", "--top", "5", "--no-progress"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    stdout = captured.out
    assert "40 samples, 3 parts (3 computed, 0 already complete) by 1 process(es)" in stdout
    # the default methods: the recommended Chefer setting and Integrated Gradients
    assert set(read_cohort(out)["method"]) == {"Chefer (recommended)", "Integrated Gradients"}
    assert "Chefer (recommended)" in stdout and "Spearman" in stdout
    for name in ("summary.html", "top_codes.png", "codes.csv", "agreement.csv"):
        assert (out / "_summary" / name).stat().st_size > 0
    page = (out / "_summary" / "summary.html").read_text()
    assert page.count("data:image/png;base64,") == 1 and "<script" not in page
    # one epoch on 40 patients: 29 of 40 right where always guessing the majority gets 24 of 40 (seeded), p = 0.07
    check = json.loads((out / MANIFEST).read_text())["model_check"]
    assert (check["n"], check["correct"], check["majority_rate"], check["above_chance"]) == (40, 29, 0.6, False)
    # P(X >= 29) for X ~ Binomial(40, 0.6), summed here by hand
    from math import comb

    assert check["p_value"] == pytest.approx(
        sum(comb(40, i) * 0.6**i * 0.4 ** (40 - i) for i in range(29, 41)), rel=1e-9
    )
    warning = ("The model is not better than chance on the samples: accuracy 0.725 (29 of 40 samples, 95% interval "
               "[0.572, 0.839]); always predicting the most frequent class scores 0.600 "
               "(one-sided binomial p = 0.0709)")
    assert stdout.splitlines()[2].startswith(f"warning: {warning}")  # the summary table's first line
    (line,) = [line for line in captured.err.splitlines() if "not better than chance" in line]
    assert line.startswith(f"captum-chefer cohort: warning: {warning}") and "ChanceLevelWarning" not in captured.err
    assert "<div class='warning'>" in page and warning in page
    assert main(argv) == 0
    assert "(0 computed, 3 already complete)" in capsys.readouterr().out
    # out reads as one Parquet dataset: the manifest and the summary are skipped by their leading '_'
    import pyarrow.dataset as ds

    assert ds.dataset(out, format="parquet").count_rows() == json.loads((out / MANIFEST).read_text())["rows"]


def test_cli_method_names_say_which_chefer_and_old_names_still_work(tmp_path, capsys):
    from captum_chefer.cli import COHORT_METHODS

    assert COHORT_METHODS["chefer"] == "Chefer (recommended)"
    assert COHORT_METHODS["chefer-pyhealth"] == "Chefer (PyHealth)"
    out = tmp_path / "cohort"
    argv = ["cohort", "--synthetic", "12", "--epochs", "1", "--out", str(out), "--no-summary", "--no-progress",
            "--methods", "chefer-recommended,chefer-exclude-self,chefer-pyhealth"]
    assert main(argv) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    assert notes == [
        "captum-chefer cohort: note: --methods chefer-recommended is now called chefer (the default); the old name is "
        "accepted until the next release",
        "captum-chefer cohort: note: --methods chefer-exclude-self is now called chefer-pyhealth-exclude-self; the old "
        "name is accepted until the next release",
    ]
    methods = json.loads((out / MANIFEST).read_text())["methods"]
    assert [m["name"] for m in methods] == [
        "Chefer (recommended)", "Chefer (PyHealth, exclude_self)", "Chefer (PyHealth)",
    ]
    # the recommended preset, PyHealth's setting with exclude_self, and PyHealth's setting: the options tell them apart
    assert methods[0]["options"] == "{'preset': 'recommended'}" and methods[0]["kwargs"] == "{}"
    assert methods[1]["options"] == methods[2]["options"] == "{'preset': 'pyhealth'}"
    assert methods[1]["kwargs"] == "{'exclude_self': True}" and methods[2]["kwargs"] == "{}"
    assert main(["cohort", "--synthetic", "12", "--epochs", "1", "--out", str(tmp_path / "again"), "--no-summary",
                 "--no-progress", "--methods", "chefer,ig"]) == 0
    (note,) = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    assert "--methods chefer now runs the recommended setting" in note and "chefer-pyhealth runs PyHealth's" in note


def test_attribute_dataset_and_summarize_warn_on_a_chance_level_model(toy, tmp_path):
    from captum_chefer import ChanceLevelWarning

    adapter, dataset, methods = toy
    with pytest.warns(ChanceLevelWarning) as caught:
        run = attribute_dataset(adapter, dataset, methods, tmp_path, chunk_size=4, progress=False)
    (warning,) = [w for w in caught if w.category is ChanceLevelWarning]
    assert points_at(warning, __file__) and str(warning.message) == run.model_check.warning()
    assert str(warning.message).startswith("The model is not better than chance on the samples: accuracy ")
    with pytest.warns(ChanceLevelWarning, match="not better than chance on the samples"):
        summary = summarize(tmp_path)
    assert summary.model_check == run.model_check and summary.table().startswith("warning: The model is not better")


# ---------------------------------------------------------------------------------------------- summarize


def _write_run(out: Path, rows: list[tuple], methods: list[str], n_samples: int) -> None:
    """A finished run written by hand: one part and a manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir()
    columns = [
        "sample", "patient_id", "feature", "code", "visit", "position", "method", "score", "target", "probability",
    ]
    table = pa.Table.from_pylist([dict(zip(columns, r, strict=True)) for r in rows])
    pq.write_table(table, out / "part-000000.parquet")
    manifest = {"format": "captum_chefer.cohort/1", "n_samples": n_samples, "methods": [{"name": m} for m in methods],
                "parts": [{"file": "part-000000.parquet"}], "rows": len(rows)}
    (out / MANIFEST).write_text(json.dumps(manifest))


def test_summarize_hand_computed(tmp_path):
    # Samples 0 and 1 belong to patient pA, sample 2 to pB. Code A occurs twice in sample 0 (two visits).
    scores = {
        "M1": {(0, "A", 0): 1.0, (0, "A", 1): 0.5, (0, "B", 0): 2.0, (1, "A", 0): 0.5, (1, "C", 0): 3.0,
               (2, "B", 0): -1.0, (2, "C", 0): 1.0},
        "M2": {(0, "A", 0): 0.0, (0, "A", 1): 0.0, (0, "B", 0): 1.0, (1, "A", 0): 2.0, (1, "C", 0): 0.5,
               (2, "B", 0): 3.0, (2, "C", 0): 0.1},
    }
    patient = {0: "pA", 1: "pA", 2: "pB"}
    rows = [
        (s, patient[s], "dx", code, visit, 0, m, score, 1, 0.5)
        for m, by in scores.items() for (s, code, visit), score in by.items()
    ]
    _write_run(tmp_path / "run", rows, ["M1", "M2"], 3)
    summary = summarize(tmp_path / "run", top_k=2)
    # M1: A (1.5 + 0.5) / 2 = 1.0; B (2 - 1) / 2 = 0.5; C (3 + 1) / 2 = 2.0. M2: A 1.0, B 2.0, C 0.3.
    m1 = summary.top("M1", 3)
    assert m1["code"].to_list() == ["C", "A", "B"] and m1["rank"].to_list() == [1, 2, 3]
    assert m1["mean_score"].to_list() == pytest.approx([2.0, 1.0, 0.5])
    assert m1["samples"].to_list() == [2, 2, 2] and m1["patients"].to_list() == [2, 1, 2]
    m2 = summary.top("M2", 3)
    assert m2["code"].to_list() == ["B", "A", "C"] and m2["mean_score"].to_list() == pytest.approx([2.0, 1.0, 0.3])
    # ranks (A, B, C): M1 (2, 3, 1), M2 (2, 1, 3): rho = 1 - 6 * (0 + 4 + 4) / (3 * 8) = -1; top-2 {C, A} vs {B, A}
    (agreement,) = summary.agreement.iter_rows(named=True)
    assert agreement["spearman"] == pytest.approx(-1.0)
    assert agreement["top_k_overlap"] == 0.5 and agreement["k"] == 2 and agreement["codes"] == 3
    assert (summary.n_samples, summary.n_patients, summary.n_rows) == (3, 2, 14)
    assert summarize(tmp_path / "run", min_samples=3).codes.height == 0
    assert summary.model_check is None and summary.table().startswith("rank")  # a manifest without a model check


def test_summarize_reads_the_model_check(tmp_path):
    from captum_chefer.comparison import ModelCheck

    rows = [(s, f"p{s}", "dx", "A", None, 0, "M", 1.0, 1, 0.5) for s in range(3)]
    _write_run(tmp_path / "run", rows, ["M"], 3)
    manifest = json.loads((tmp_path / "run" / MANIFEST).read_text())
    good = ModelCheck.from_counts(30, 30, {0: 15, 1: 15}, unit="samples")
    manifest["model_check"] = good.as_dict()
    (tmp_path / "run" / MANIFEST).write_text(json.dumps(manifest))
    summary = summarize(tmp_path / "run")
    assert summary.model_check == good and summary.table().splitlines()[0] == f"model: {good.describe()}"
    # 30 / (30 + z^2)
    assert good.describe().startswith("accuracy 1.000 (30 of 30 samples, 95% interval [0.886, 1.000])")


def test_summarize_spearman_with_ties_matches_scipy(single, tmp_path):
    from scipy.stats import spearmanr

    run, _ = single
    summary = summarize(run.out)
    codes = summary.codes
    for row in summary.agreement.iter_rows(named=True):
        a = codes.filter(pl.col("method") == row["method_a"]).select("feature", "code", pl.col("mean_score").alias("a"))
        b = codes.filter(pl.col("method") == row["method_b"]).select("feature", "code", pl.col("mean_score").alias("b"))
        both = a.join(b, on=["feature", "code"])
        assert row["spearman"] == pytest.approx(spearmanr(both["a"], both["b"]).statistic, abs=1e-12)
        assert row["codes"] == both.height
    fig = summary.figure(5)
    assert len([ax for ax in fig.axes if ax.get_visible()]) == len(summary.methods)


def test_summarize_needs_a_finished_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="has not finished there"):
        summarize(tmp_path)
