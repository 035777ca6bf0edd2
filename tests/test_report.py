"""The report's statistics: intervals, what is bold and why, the metric notes, the model check, the device."""

from __future__ import annotations

import math

import pytest
import torch

from captum_chefer.comparison import Evaluation, bootstrap_interval, paired_difference
from captum_chefer.report import HEADLINE, METRIC_NOTES, ModelCheck, check_model, curves_figure, headline_table


def evaluation_by_hand() -> Evaluation:
    """Three methods on 8 patients. AUROC: A beats B by exactly 0.05 on every patient (clear). Deletion AOPC:
    A's mean is higher than B's, but the gap flips sign from patient to patient (not clear)."""
    auroc_b = torch.tensor([0.50, 0.60, 0.70, 0.80, 0.55, 0.65, 0.75, 0.85])
    deletion_b = torch.tensor([0.30, 0.10, 0.40, 0.20, 0.30, 0.10, 0.40, 0.20])
    swing = torch.tensor([0.2, -0.2, 0.2, -0.2, 0.2, -0.2, 0.2, -0.15])  # mean +0.00625
    per_sample = {
        "A": {"auroc": auroc_b + 0.05, "deletion_aopc": deletion_b + swing},
        "B": {"auroc": auroc_b, "deletion_aopc": deletion_b},
        "Random": {"auroc": torch.full((8,), 0.99), "deletion_aopc": torch.zeros(8)},
    }
    return Evaluation(per_sample, {}, (0.0, 1.0), (), {"A": 0.002, "B": 0.001, "Random": 0.0001})


def test_bold_only_where_the_paired_interval_clears_the_runner_up():
    evaluation = evaluation_by_hand()
    auroc, deletion = evaluation.leader("auroc"), evaluation.leader("deletion_aopc")
    assert (auroc.method, auroc.runner_up, auroc.clear) == ("A", "B", True)  # Random (0.99) is excluded
    assert auroc.difference.low == pytest.approx(0.05) and auroc.difference.high == pytest.approx(0.05)
    assert (deletion.method, deletion.runner_up, deletion.clear) == ("A", "B", False)
    assert deletion.difference.low < 0 < deletion.difference.high
    time = evaluation.leader("seconds_per_sample")
    assert time.method == "B" and not time.clear and time.difference is None  # one measurement: never marked

    table = headline_table(evaluation, markdown=True)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "**0.725**" in rows["A"]  # AUROC of A, bold
    assert "**" not in rows["B"] and "**" not in rows["Random"]
    assert rows["A"].count("**") == 2  # deletion AOPC and time are not bold
    # the interval printed is the bootstrap interval of the column's values
    interval = bootstrap_interval(evaluation.per_sample["A"]["deletion_aopc"])
    assert f"[{interval.low:.3f}, {interval.high:.3f}]" in rows["A"]
    assert "n = 8 patients" in table and "paired difference" in table
    text = headline_table(evaluation, intervals=False)
    assert "0.725*" in text and "[" not in text.splitlines()[1]


def test_leader_difference_is_oriented_towards_the_better_method_for_lower_is_better_metrics():
    per = {"A": {"sufficiency": torch.tensor([0.1, 0.2, 0.3])}, "B": {"sufficiency": torch.tensor([0.3, 0.4, 0.5])}}
    leader = Evaluation(per, {}, (), ()).leader("sufficiency")
    assert leader.method == "A" and leader.clear
    assert leader.difference.mean == pytest.approx(paired_difference([0.3, 0.4, 0.5], [0.1, 0.2, 0.3]).mean)


def test_columns_with_fewer_patients_say_how_many():
    evaluation = evaluation_by_hand()
    evaluation.per_sample["A"]["auroc"][:3] = math.nan
    evaluation.per_sample["B"]["auroc"][:3] = math.nan
    evaluation.per_sample["Random"]["auroc"][:3] = math.nan
    header = headline_table(evaluation).splitlines()[0]
    assert "AUROC ↑ (n=5)" in header and "Deletion AOPC ↑ " in header and "Deletion AOPC ↑ (n" not in header


def test_every_headline_metric_is_explained_with_its_direction():
    for key, label in HEADLINE:
        note = METRIC_NOTES[key]
        direction = "higher is better" if label.endswith("↑") else "lower is better"
        assert direction in note, key
    assert "squared logits" in METRIC_NOTES["infidelity"] and "negative" in METRIC_NOTES["sufficiency"]


def test_curve_titles_agree_with_the_column_arrows():
    evaluation = evaluation_by_hand()
    for per in evaluation.per_sample.values():
        per.clear()
    evaluation.curves = {name: {"deletion": torch.rand(8, 2), "insertion": torch.rand(8, 2)} for name in ("A", "B")}
    titles = [ax.get_title() for ax in curves_figure(evaluation).axes]
    assert "lower curve is better: higher Deletion AOPC ↑" in titles[0]
    assert "higher curve is better: higher Insertion AOPC ↑" in titles[1]


def test_model_check_against_the_majority_class(planted_model):
    from pyhealth.datasets import get_dataloader

    from captum_chefer import PyHealthAdapter

    adapter = PyHealthAdapter(planted_model)
    loader = get_dataloader(planted_model.dataset, batch_size=32, shuffle=False)
    check = check_model(adapter, loader)
    assert (check.n, check.correct, check.majority_rate, check.above_chance) == (128, 128, 0.5, True)
    assert check.p_value == pytest.approx(0.5**128) and check.warning() == ""
    # with the labels flipped the same model is right on none of them: flagged
    batch = next(iter(loader))
    flipped = {**batch, "label": 1 - batch["label"]}
    bad = check_model(adapter, flipped)
    assert bad.correct == 0 and not bad.above_chance and "not better than chance" in bad.warning()
    assert check_model(adapter, {k: v for k, v in batch.items() if k != "label"}) is None


def test_model_check_sentence():
    check = ModelCheck(n=12, correct=5, majority_rate=0.5, p_value=0.806, above_chance=False)
    assert check.describe().startswith("accuracy 0.417 (5 of 12 explained patients)")


def test_run_comparison_device_option(tmp_path):
    from captum.attr import Saliency

    from captum_chefer import CheferAttribution, PyHealthAdapter
    from captum_chefer.report import run_comparison
    from captum_chefer.synthetic import toy_model_and_batch

    model, batch = toy_model_and_batch()
    adapter = PyHealthAdapter(model)
    methods = [("Chefer", CheferAttribution(adapter), {}), ("Saliency", Saliency(adapter), {})]
    report = run_comparison(adapter, batch, methods=methods, device="cpu", infidelity_samples=0, sensitivity_samples=0,
                            progress=False)
    assert report.settings["device"] == "cpu" and next(model.parameters()).device.type == "cpu"
    with pytest.raises(ValueError, match="not a torch device"):
        run_comparison(adapter, batch, methods=methods, device="tpu9", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device here; pass device='cpu'"):
            run_comparison(adapter, batch, methods=methods, device="cuda", progress=False)
