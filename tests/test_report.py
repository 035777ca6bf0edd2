"""The report's statistics: intervals, what is bold and why, the metric notes, the model check, the device."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from captum_chefer.comparison import Evaluation, bootstrap_interval, paired_difference
from captum_chefer.report import HEADLINE, METRIC_NOTES, ModelCheck, check_model, curves_figure, headline_table
from conftest import points_at


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
    # 5 of 12: Wilson's interval by hand, z = 1.959964: (5/12 + z^2/24 -/+ z sqrt(35/1728 + z^2/576)) / (1 + z^2/12)
    assert check.describe().startswith("accuracy 0.417 (5 of 12 explained patients, 95% interval [0.193, 0.680])")
    assert "most frequent class scores 0.500" in check.describe()
    assert ModelCheck.from_dict(check.as_dict()) == check
    assert check.as_dict()["warning"].startswith("The model is not better than chance on the explained patients")


def test_model_check_from_counts_by_hand():
    # 7 of 12 are class 2: always predicting it scores 7/12; 11 right is above chance, 10 is not (exact binomial)
    above = ModelCheck.from_counts(11, 12, {0: 2, 1: 3, 2: 7})
    assert above.majority_rate == 7 / 12 and above.above_chance and above.warning() == ""
    # P(X >= 11) for X ~ Binomial(12, 7/12): 12 (7/12)^11 (5/12) + (7/12)^12
    assert above.p_value == pytest.approx(12 * (7 / 12) ** 11 * (5 / 12) + (7 / 12) ** 12, rel=1e-12)
    assert not ModelCheck.from_counts(10, 12, {0: 2, 1: 3, 2: 7}).above_chance
    same = ModelCheck.from_predictions(
        torch.tensor([2] * 7 + [1] * 3 + [0] * 2), torch.tensor([2] * 7 + [1] * 3 + [1, 0])
    )
    assert same == above
    with pytest.raises(ValueError, match="summing to n"):
        ModelCheck.from_counts(3, 12, {0: 5, 1: 5})


def test_run_comparison_warns_on_a_chance_level_model_only(planted_model):
    from captum.attr import Saliency
    from pyhealth.datasets import get_dataloader

    from captum_chefer import ChanceLevelWarning, CheferAttribution, PyHealthAdapter
    from captum_chefer.report import run_comparison

    adapter = PyHealthAdapter(planted_model)
    batch = next(iter(get_dataloader(planted_model.dataset, batch_size=16, shuffle=False)))
    methods = [
        ("Chefer (recommended)", CheferAttribution(adapter, preset="recommended"), {}),
        ("Saliency", Saliency(adapter), {}),
    ]
    options = {"methods": methods, "infidelity_samples": 0, "sensitivity_samples": 0, "progress": False}
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChanceLevelWarning)
        assert run_comparison(adapter, batch, **options).model_check.above_chance  # 16 of 16 right: no warning
    flipped = {**batch, "label": 1 - batch["label"]}  # the same model, now right on none of them
    with pytest.warns(ChanceLevelWarning) as caught:
        report = run_comparison(adapter, flipped, **options)
    (warning,) = [w for w in caught if w.category is ChanceLevelWarning]
    assert issubclass(ChanceLevelWarning, UserWarning) and points_at(warning, __file__)  # points at the caller
    assert str(warning.message) == report.model_check.warning()
    assert str(warning.message).startswith(
        "The model is not better than chance on the explained patients: accuracy 0.000 (0 of 16 explained patients, "
        "95% interval [0.000, 0.194])"
    )  # 0 of 16: the upper end is z^2 / (16 + z^2) = 0.194
    assert "train it further" in str(warning.message)


def test_zero_width_intervals_are_honest_in_the_table():
    # P@k 1 on all 8 patients: Wilson's [8 / (8 + z^2), 1]; AUROC 0.5 everywhere: a bootstrap of nothing, marked
    per = {"A": {"precision_at_k": torch.ones(8), "auroc": torch.full((8,), 0.5)},
           "B": {"precision_at_k": torch.tensor([1.0, 0, 1, 1, 0, 1, 1, 1]), "auroc": torch.linspace(0.4, 0.8, 8)}}
    evaluation = Evaluation(per, {}, (0.0, 1.0), (), {"A": 0.001, "B": 0.002})
    rows = {line.split()[0]: line for line in headline_table(evaluation).splitlines()[1:3]}
    assert "1.000 [0.676, 1.000]" in rows["A"] and "0.500 [0.500, 0.500]†" in rows["A"]
    assert "0.750 [0.409, 0.929]" in rows["B"] and "†" not in rows["B"]  # 6 of 8, by the formula
    table = headline_table(evaluation)
    assert "Wilson's score interval where every patient's value is 0 or 1" in table
    assert "†: every patient has the same value" in table
    assert "†" not in headline_table(Evaluation({"B": per["B"]}, {}, (), (), {"B": 0.002}))


def test_bar_charts_carry_the_table_intervals_and_every_figure_one_colour_per_method():
    from matplotlib.colors import to_rgba

    from captum_chefer.report import metrics_figure, time_figure
    from captum_chefer.visualization import METHOD_COLORS

    per = {"Chefer (recommended)": {"precision_at_k": torch.ones(8), "auroc": torch.linspace(0.6, 0.95, 8)},
           "Integrated Gradients": {"precision_at_k": torch.tensor([1.0, 0, 1, 1, 0, 1, 1, 1]),
                                    "auroc": torch.linspace(0.5, 0.9, 8)},
           "Random": {"precision_at_k": torch.tensor([0.0, 1, 0, 0, 0, 0, 0, 1]), "auroc": torch.linspace(0.3, 0.7, 8)}}
    curves = {name: {"deletion": torch.rand(8, 2), "insertion": torch.rand(8, 2)} for name in per}
    evaluation = Evaluation(per, curves, (0.0, 1.0), (), {name: 0.001 * (i + 1) for i, name in enumerate(per)})
    ax = metrics_figure(evaluation).axes[0]
    bars = [c for c in ax.containers if type(c).__name__ == "BarContainer"]
    assert [b.get_label() for b in bars] == list(per)
    for bar in bars:
        name = bar.get_label()
        assert all(p.get_facecolor() == to_rgba(METHOD_COLORS[name]) for p in bar.patches)
        segments = bar.errorbar.lines[2][0].get_segments()  # one vertical error bar per metric
        for (metric, _), segment in zip((("precision_at_k", 0), ("auroc", 1)), segments, strict=True):
            interval = evaluation.interval(name, metric)
            assert segment[0][1] == pytest.approx(interval.low) and segment[1][1] == pytest.approx(interval.high)
    assert bars[0].errorbar.lines[2][0].get_segments()[0][0][1] == pytest.approx(8 / (8 + 1.959964**2), abs=1e-6)
    for line in curves_figure(evaluation).axes[0].get_lines():
        assert to_rgba(line.get_color()) == to_rgba(METHOD_COLORS[line.get_label()])
    time_ax = time_figure(evaluation).axes[0]
    assert [to_rgba(p.get_facecolor()) for p in time_ax.patches] == [to_rgba(METHOD_COLORS[n]) for n in per]
    assert "no interval" in time_ax.get_title()
    chosen = metrics_figure(evaluation, metrics=["auroc"], title="AUROC alone").axes[0]
    assert [t.get_text() for t in chosen.get_xticklabels()] == ["AUROC ↑"] and chosen.get_title() == "AUROC alone"
    only = next(c for c in chosen.containers if type(c).__name__ == "BarContainer")
    assert [p.get_height() for p in only.patches] == [pytest.approx(float(per["Chefer (recommended)"]["auroc"].mean()))]
    with pytest.raises(ValueError, match=r"unknown metrics \['aurok'\]; use some of"):
        metrics_figure(evaluation, metrics=["aurok"])


@pytest.mark.filterwarnings("ignore::captum_chefer.comparison.chance.ChanceLevelWarning")  # the untrained toy model
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
