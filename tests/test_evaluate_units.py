"""captum_chefer.comparison.evaluate on hand-made values: Evaluation's tables, leaders, files and
error messages, check_ground_truth, and evaluate_methods' wiring (its metrics replaced by recording fakes).

Each expected value is worked out by hand in the comments, not read from the code under test.
"""

from __future__ import annotations

import csv
import json
import math
import re
from statistics import NormalDist
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch

import captum_chefer.comparison.evaluate as ev
from captum_chefer.comparison import Evaluation
from captum_chefer.comparison.evaluate import Leader, _cat_rows, _fmt, _head, check_ground_truth, evaluate_methods


def _t(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def _two(**kwargs) -> Evaluation:
    # "a" beats "b" by exactly 0.25 on every patient (values exact in float32); only "a" has a time
    per = {"a": {"auroc": _t(1.0, 0.75, 0.5, 0.25)}, "b": {"auroc": _t(0.75, 0.5, 0.25, 0.0)}}
    return Evaluation(per, {}, (), (), {"a": 0.5}, **kwargs)


# ---------------------------------------------------------------------------------------------- _fmt


def test_fmt_by_hand():
    assert _fmt(float("nan"), 3) == "n/a"
    assert _fmt(0.0, 3) == "0.000"  # zero is never written in scientific notation
    assert _fmt(5.0, 3) == "5.000"
    assert _fmt(0.0001, 3) == "1.00e-04"  # below 10^-3: digits - 1 = 2 decimals of the mantissa
    assert _fmt(-0.0009, 3) == "-9.00e-04"  # 0.0009 < 0.001 (and > 11^-3 = 0.00075)
    assert _fmt(1.0, 0) == "1"  # at the threshold 10^0 = 1 exactly: fixed, not scientific
    assert _fmt(0.5, 1) == "0.5"
    assert _fmt(3, 3) == "3" and _fmt(None, 3) == "None" and _fmt("x", 2) == "x"


# ---------------------------------------------------------------------------------------------- lookups


def test_wrong_names_say_which_exist():
    evaluation = Evaluation({"a": {"auroc": _t(0.5)}}, {"a": {"deletion": _t(1.0).reshape(1, 1)}}, (1.0,), ())
    with pytest.raises(KeyError, match=re.escape("no method 'zz' here; use one of ['a']")):
        evaluation.per_sample["zz"]
    with pytest.raises(KeyError, match=re.escape("no metric 'zz' here; use one of ['auroc']")):
        evaluation.per_sample["a"]["zz"]
    with pytest.raises(KeyError, match=re.escape("no method 'zz' here; use one of ['a']")):
        evaluation.curves["zz"]
    with pytest.raises(KeyError, match=re.escape("no curve 'zz' here; use one of ['deletion']")):
        evaluation.curves["a"]["zz"]


# ---------------------------------------------------------------------------------------------- summary, table


def test_summary_without_intervals_by_default_and_nan_time():
    rows = _two().summary()
    assert [list(r) for r in rows] == [["method", "auroc", "seconds_per_sample"]] * 2
    # means: (1 + .75 + .5 + .25) / 4 and (.75 + .5 + .25 + 0) / 4
    assert rows[0]["auroc"] == 0.625 and rows[1]["auroc"] == 0.375
    assert rows[0]["seconds_per_sample"] == 0.5 and math.isnan(rows[1]["seconds_per_sample"])
    with_intervals = _two().summary(intervals=True)[0]
    assert list(with_intervals) == ["method", "auroc", "auroc_low", "auroc_high", "auroc_n", "seconds_per_sample"]
    assert with_intervals["auroc_n"] == 4


def _table_evaluation() -> Evaluation:
    per = {"LongMethodName": {"auroc": _t(0.5, 1.0)}, "b": {"auroc": _t(0.25, 0.25)}}
    return Evaluation(per, {}, (), (), {"LongMethodName": 0.5})


def test_table_text_and_markdown_by_hand():
    # widths: method max(6, 14, 1) = 14; auroc 5; seconds_per_sample max(18, 5, 3) = 18; columns joined by 2 spaces
    expected = "\n".join([
        "method          auroc  seconds_per_sample",
        "LongMethodName  0.750  0.500" + " " * 13,
        "b" + " " * 13 + "  0.250  n/a" + " " * 15,
    ])
    assert _table_evaluation().table() == expected
    assert _table_evaluation().table(digits=1).splitlines()[1] == "LongMethodName  0.8    0.5" + " " * 15
    assert _table_evaluation().table(markdown=True) == (
        "| method | auroc | seconds_per_sample |\n"
        "|---|---|---|\n"
        "| LongMethodName | 0.750 | 0.500 |\n"
        "| b | 0.250 | n/a |"
    )


def test_columns_and_table_of_no_method_and_of_one():
    empty = Evaluation({}, {}, (), ())
    assert empty.columns() == ["method"]
    assert empty.table() == "method"
    assert empty.summary() == []
    one = Evaluation({"a": {"auroc": _t(0.5)}}, {}, (), ())
    assert one.columns() == ["method", "auroc", "seconds_per_sample"]


# ---------------------------------------------------------------------------------------------- interval


def test_interval_errors_name_what_exists():
    evaluation = _two()
    with pytest.raises(KeyError, match=re.escape("unknown method 'z'; known: ['a', 'b']")):
        evaluation.interval("z", "auroc")
    with pytest.raises(KeyError, match=re.escape("'a' has no per-patient values for 'zz'; known: ['auroc']")):
        evaluation.interval("a", "zz")


def test_interval_uses_the_evaluations_level():
    # 3 of 4 successes: Wilson at level 0.5, z = the 75% normal quantile, by hand
    evaluation = Evaluation({"a": {"p": _t(1.0, 1.0, 0.0, 1.0)}}, {}, (), (), level=0.5)
    interval = evaluation.interval("a", "p")
    z, n, p = NormalDist().inv_cdf(0.75), 4, 0.75
    centre, spread, scale = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)), 1 + z * z / n
    assert interval.level == 0.5 and interval.kind == "wilson"
    assert math.isclose(interval.low, (centre - spread) / scale, rel_tol=1e-9)
    assert math.isclose(interval.high, (centre + spread) / scale, rel_tol=1e-9)


def test_interval_uses_the_evaluations_resamples_and_seed():
    values = _t(0.0, 1.5, 3.0, 6.0, 12.0)  # not all 0 / 1: the bootstrap
    # one resample: the interval is that resample's mean, a point
    one = Evaluation({"a": {"m": values}}, {}, (), (), n_resamples=1).interval("a", "m")
    assert one.low == one.high
    many = Evaluation({"a": {"m": values}}, {}, (), ()).interval("a", "m")
    assert many.low < many.high
    # the seed picks the resample: five seeds do not all pick the same one
    lows = {
        Evaluation({"a": {"m": values}}, {}, (), (), n_resamples=1, seed=s).interval("a", "m").low for s in range(6)
    }
    assert len(lows) > 1


# ---------------------------------------------------------------------------------------------- leader, best


def test_leader_errors():
    with pytest.raises(KeyError, match=re.escape("unknown metric 'zz'; known: ['auroc', 'comprehensiveness', ")):
        _two().leader("zz")
    with pytest.raises(ValueError, match=re.escape("no method has a value for 'infidelity'")):
        _two().leader("infidelity")


def test_leader_of_one_method_and_of_time():
    one = Evaluation({"a": {"auroc": _t(0.5, 0.7)}}, {}, (), ())
    assert one.leader("auroc") == Leader("auroc", "a", None, None, False)
    timed = Evaluation({"a": {"auroc": _t(0.5)}, "b": {"auroc": _t(0.6)}}, {}, (), (), {"a": 0.5, "b": 0.25})
    # time: lower is better, one measurement per method, so no difference and never clear
    assert timed.leader("seconds_per_sample") == Leader("seconds_per_sample", "b", "a", None, False)


def test_leader_with_a_difference():
    leader = _two().leader("auroc")
    assert (leader.metric, leader.method, leader.runner_up, leader.clear) == ("auroc", "a", "b", True)
    # every paired difference is exactly 0.25: the bootstrap interval is the point 0.25
    difference = leader.difference
    assert (difference.mean, difference.low, difference.high, difference.n) == (0.25, 0.25, 0.25, 4)
    # lower is better: the difference is runner-up - best, positive
    lower = Evaluation({"a": {"infidelity": _t(0.75, 0.5)}, "b": {"infidelity": _t(0.25, 0.0)}}, {}, (), ())
    leader = lower.leader("infidelity")
    assert (leader.method, leader.runner_up, leader.difference.mean, leader.clear) == ("b", "a", 0.5, True)


def test_leader_clear_on_a_single_shared_patient():
    # one patient both have a value for: the difference 0.5 is its own interval, above zero
    per = {"a": {"auroc": _t(0.75, math.nan)}, "b": {"auroc": _t(0.25, math.nan)}}
    leader = Evaluation(per, {}, (), ()).leader("auroc")
    assert leader.difference.n == 1 and leader.difference.low == 0.5 and leader.clear is True


def test_leader_passes_level_resamples_and_seed():
    per = {"a": {"auroc": _t(3.0, 1.0, 4.0, 1.0, 5.0, 9.0)}, "b": {"auroc": _t(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)}}
    assert Evaluation(per, {}, (), (), level=0.5).leader("auroc").difference.level == 0.5
    one = Evaluation(per, {}, (), (), n_resamples=1).leader("auroc").difference
    assert one.low == one.high  # one resample: a point
    many = Evaluation(per, {}, (), ()).leader("auroc").difference
    assert many.low < many.high
    lows = {Evaluation(per, {}, (), (), n_resamples=1, seed=s).leader("auroc").difference.low for s in range(6)}
    assert len(lows) > 1


def test_best_errors_and_direction():
    with pytest.raises(KeyError, match=re.escape("unknown metric 'zz'; known: ['auroc', 'comprehensiveness', ")):
        _two().best("zz")
    with pytest.raises(ValueError, match=re.escape("no method has a value for 'infidelity'")):
        _two().best("infidelity")
    per = {
        "Random": {"auroc": _t(0.99), "infidelity": _t(0.0)},
        "a": {"auroc": _t(0.5), "infidelity": _t(0.25)},
        "b": {"auroc": _t(0.6), "infidelity": _t(0.75)},
        "c": {"sensitivity": _t(0.1)},  # no auroc, no infidelity: left out
    }
    evaluation = Evaluation(per, {}, (), ())
    assert evaluation.best("auroc") == "b"  # Random excluded
    assert evaluation.best("infidelity") == "a"  # lower is better
    assert evaluation.best("auroc", exclude=()) == "Random"


def test_best_near_the_end_of_the_float_range():
    # means of 1e308 and 1.7e308 (float64): a doubled score would overflow both to infinity and tie them
    per = {"b": {"auroc": _t(1e308, dtype=torch.float64), "infidelity": _t(1.7e308, dtype=torch.float64)},
           "a": {"auroc": _t(1.7e308, dtype=torch.float64), "infidelity": _t(1e308, dtype=torch.float64)}}
    evaluation = Evaluation(per, {}, (), ())
    assert evaluation.best("auroc") == "a" and evaluation.best("infidelity") == "a"


# ------------------------------------------------------------------------------------------ statistics, dicts, files


def test_statistics_by_hand():
    stats = _two(level=0.9, n_resamples=50, seed=3).statistics()
    assert stats == {
        "n_patients": 4,
        "interval": "90% interval of the mean over patients: Wilson score interval where every value is 0 or 1, else "
                    "percentile bootstrap (50 resamples, seed 3)",
        "best": "the best mean (Random excluded) is marked only where the bootstrap interval of its paired difference "
                "to the runner-up, over the same patients, lies above zero",
        "leaders": {
            # deletion_aopc etc. have no value: left out, the later metrics still listed
            "auroc": {"method": "a", "runner_up": "b", "clear": True, "difference": {
                "mean": 0.25, "low": 0.25, "high": 0.25, "n": 4, "level": 0.9, "kind": "bootstrap"}},
            "seconds_per_sample": {"method": "a", "runner_up": None, "clear": False, "difference": None},
        },
    }


def _curved() -> Evaluation:
    curves = {"a": {"deletion": torch.tensor([[1.0, 0.5], [0.5, 0.0]]),
                    "insertion": torch.tensor([[0.0, 0.25], [0.5, 1.0]])}}
    return Evaluation({"a": {"auroc": _t(1.0, 0.0)}}, curves, (0.0, 1.0), (0.5,), {}, ["p1", "p2"])


def test_to_dict_by_hand():
    data = _curved().to_dict()
    assert list(data) == ["summary", "statistics", "fractions", "percentages", "mean_curves", "patient_ids",
                          "per_sample", "curves", "seconds_per_sample", "higher_is_better", "level", "n_resamples",
                          "seed"]
    assert (data["level"], data["n_resamples"], data["seed"]) == (0.95, 2000, 0)  # the defaults
    (row,) = data["summary"]
    assert list(row) == ["method", "auroc", "auroc_low", "auroc_high", "auroc_n", "seconds_per_sample"]
    assert row["auroc"] == 0.5 and row["auroc_n"] == 2
    assert row["seconds_per_sample"] is None  # no time: NaN, written as null
    assert data["statistics"]["n_patients"] == 2 and data["statistics"]["leaders"]["auroc"]["method"] == "a"
    # column means of the curves: (1 + .5) / 2, (.5 + 0) / 2 and (0 + .5) / 2, (.25 + 1) / 2
    assert data["mean_curves"] == {"a": {"deletion": [0.75, 0.25], "insertion": [0.25, 0.625]}}
    assert data["higher_is_better"]["auroc"] is True and data["higher_is_better"]["infidelity"] is False
    assert data["fractions"] == [0.0, 1.0] and data["percentages"] == [0.5] and data["patient_ids"] == ["p1", "p2"]


def test_to_json_creates_parents_and_indents_by_two(tmp_path):
    path = _curved().to_json(tmp_path / "x" / "y" / "e.json")
    text = path.read_text()
    lines = text.splitlines()
    assert lines[0] == "{" and lines[1] == '  "summary": ['
    assert json.loads(text)["mean_curves"] == {"a": {"deletion": [0.75, 0.25], "insertion": [0.25, 0.625]}}


def test_to_csv_creates_parents_and_writes_the_intervals(tmp_path):
    one = Evaluation({"a": {"auroc": _t(1.0, 0.0, 1.0, 1.0)}}, {}, (), (), {"a": 0.25})
    path = one.to_csv(tmp_path / "x" / "y" / "s.csv")
    with path.open(newline="", encoding="utf-8") as f:
        header, row, *rest = list(csv.reader(f))
    assert header == ["method", "auroc", "auroc_low", "auroc_high", "auroc_n", "seconds_per_sample"]
    assert (row[0], row[1], row[4], row[5], rest) == ("a", "0.75", "4", "0.25", [])
    empty = Evaluation({}, {}, (), ()).to_csv(tmp_path / "e.csv")
    assert empty.read_bytes() == b"method\r\n"


# ---------------------------------------------------------------------------------------------- rows, save, load


def test_rows_without_curves_patients_or_time():
    per = {"a": {"auroc": _t(0.5, 0.25)}, "b": {"auroc": _t(1.0, 0.0)}}
    curves = {"a": {"deletion": torch.tensor([[1.0, 0.5], [0.5, 0.0]])}}  # no insertion; "b" has no curves
    rows = Evaluation(per, curves, (0.0, 1.0), (), {"a": 0.5}, ["p0"]).rows()
    nan = "nan"
    clean = [{k: nan if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows]
    assert clean == [
        {"method": "a", "sample": 0, "patient_id": "p0", "auroc": 0.5, "deletion@0.0": 1.0, "deletion@1.0": 0.5,
         "seconds_per_sample": 0.5},
        {"method": "a", "sample": 1, "patient_id": None, "auroc": 0.25, "deletion@0.0": 0.5, "deletion@1.0": 0.0,
         "seconds_per_sample": 0.5},
        {"method": "b", "sample": 0, "patient_id": "p0", "auroc": 1.0, "seconds_per_sample": nan},
        {"method": "b", "sample": 1, "patient_id": None, "auroc": 0.0, "seconds_per_sample": nan},
    ]


def test_save_and_load_keep_the_bootstrap_settings(tmp_path):
    evaluation = _two(level=0.8, n_resamples=37, seed=5)
    again = Evaluation.load(evaluation.save(tmp_path / "e.json"))
    assert (again.level, again.n_resamples, again.seed) == (0.8, 37, 5)
    assert Evaluation.load(tmp_path / "e.json", seed=9).seed == 9  # an argument replaces the file's value
    csv_path = evaluation.save(tmp_path / "e.csv")  # rows hold no settings: the defaults, or the arguments
    loaded = Evaluation.load(csv_path)
    assert (loaded.level, loaded.n_resamples, loaded.seed) == (0.95, 2000, 0)
    given = Evaluation.load(csv_path, level=0.8, n_resamples=37, seed=5)
    assert (given.level, given.n_resamples, given.seed) == (0.8, 37, 5)
    assert given.interval("a", "auroc") == evaluation.interval("a", "auroc")


def test_empty_curves_survive_json_and_csv(tmp_path):
    # a method evaluated without curves holds empty ones; they come back empty, not as NaN rows
    per = {"a": {"auroc": _t(0.5, 0.25)}, "b": {"auroc": _t(1.0, 0.0)}}
    curves = {"a": {"deletion": torch.tensor([[1.0, 0.5], [0.5, 0.0]])}, "b": {"deletion": torch.empty(0)}}
    evaluation = Evaluation(per, curves, (0.0, 1.0), (), {"a": 0.5, "b": 0.25})
    data = evaluation.to_dict()
    assert data["curves"]["b"] == {"deletion": []} and data["mean_curves"]["b"] == {"deletion": []}
    for suffix in (".json", ".csv"):
        again = Evaluation.load(evaluation.save(tmp_path / f"e{suffix}"))
        assert again.curves["b"]["deletion"].numel() == 0, suffix
        assert again.curves["a"]["deletion"].tolist() == [[1.0, 0.5], [0.5, 0.0]], suffix
        assert again.rows() == evaluation.rows(), suffix


def test_csv_keeps_patient_ids_that_look_like_numbers(tmp_path):
    evaluation = Evaluation({"a": {"auroc": _t(0.5, 0.25, 1.0)}}, {}, (), (), {}, ["007", "0389", "12"])
    assert Evaluation.load(evaluation.save(tmp_path / "e.csv")).patient_ids == ["007", "0389", "12"]


def test_load_a_minimal_json(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"per_sample": {"a": {"auroc": [0.5, None]}}}))
    loaded = Evaluation.load(path)
    values = loaded.per_sample["a"]["auroc"]
    assert values[0] == 0.5 and math.isnan(values[1])
    assert loaded.curves == {} and loaded.fractions == () and loaded.percentages == ()
    assert loaded.seconds_per_sample == {} and loaded.patient_ids == []
    assert (loaded.level, loaded.n_resamples, loaded.seed) == (0.95, 2000, 0)  # a file without them: the defaults


def test_load_arguments_replace_the_bootstrap_settings_of_a_json_file(tmp_path):
    path = _two(level=0.8, n_resamples=37, seed=5).save(tmp_path / "e.json")
    loaded = Evaluation.load(path, level=0.5, n_resamples=11, seed=3)
    assert (loaded.level, loaded.n_resamples, loaded.seed) == (0.5, 11, 3)


def test_load_refuses_json_and_csv_without_per_patient_values(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"summary": []}))
    message = f"{str(path)!r} holds no per-patient values; write it with Evaluation.save"
    with pytest.raises(ValueError, match=re.escape(message)):
        Evaluation.load(path)
    path = tmp_path / "header.csv"
    path.write_text("method,sample,auroc\r\n")
    with pytest.raises(ValueError, match=re.escape(
        f"{str(path)!r} holds no per-patient rows (a report's results.csv is the summary only); load the file "
        "Evaluation.save wrote, or the report's results.json"
    )):
        Evaluation.load(path)


def test_load_one_row_and_a_missing_metric(tmp_path):
    curves = {"a": {"deletion": torch.tensor([[1.0, 0.5]]), "insertion": torch.tensor([[0.0, 1.0]])}}
    per = {"a": {"auroc": _t(0.5)}, "b": {"infidelity": _t(0.25)}}
    path = Evaluation(per, curves, (0.0, 1.0), (), {"a": 0.25, "b": 2.0}, []).save(tmp_path / "e.csv")
    loaded = Evaluation.load(path)
    assert loaded.methods == ["a", "b"] and loaded.patient_ids == []
    assert loaded.fractions == (0.0, 1.0) and loaded.seconds_per_sample == {"a": 0.25, "b": 2.0}
    assert loaded.per_sample["a"]["auroc"].tolist() == [0.5] and math.isnan(loaded.per_sample["b"]["auroc"][0])
    assert math.isnan(loaded.per_sample["a"]["infidelity"][0])
    assert loaded.per_sample["b"]["infidelity"].tolist() == [0.25]
    assert loaded.curves["a"]["deletion"].tolist() == [[1.0, 0.5]]


def test_load_percentages_and_refuses_odd_at_columns(tmp_path):
    def load(extra: str):
        path = tmp_path / "odd.csv"
        path.write_text(f"method,sample,deletion@0.5,{extra}\r\na,0,1.0,0.25\r\n")
        return Evaluation.load(path)

    loaded = load("comprehensiveness@0.25")
    assert loaded.percentages == (0.25,) and loaded.fractions == (0.5,)
    for column in ("comprehensiveness@0.5@x", "comprehensiveness@x@0.5", "deletion@0.5@x", "deletion@x@0.5"):
        with pytest.raises(ValueError, match="could not convert string to float"):
            load(column)


# ---------------------------------------------------------------------------------------------- check_ground_truth


REAL = {"conditions": torch.tensor([[True, False]]), "procedures": torch.tensor([[True, True]])}


def test_ground_truth_must_be_a_dict():
    with pytest.raises(TypeError, match=re.escape(
        "ground_truth must return a dict {feature key: bool mask of the relevant codes}, got list"
    )):
        check_ground_truth([torch.ones(1, 2)], REAL)


def test_ground_truth_missing_or_unknown_keys():
    with pytest.raises(KeyError, match=re.escape(
        "ground_truth returned masks for ['conditions'], but the model's feature keys are "
        "['conditions', 'procedures'] (missing ['procedures'], unknown []); return one bool mask per feature key, "
        "all False where no code is relevant"
    )):
        check_ground_truth({"conditions": torch.ones(1, 2, dtype=torch.bool)}, REAL)
    with pytest.raises(KeyError, match=re.escape("(missing [], unknown ['x'])")):
        check_ground_truth({**REAL, "x": torch.ones(1)}, REAL)


def test_ground_truth_shape_and_values():
    with pytest.raises(ValueError, match=re.escape(
        "ground_truth's mask for 'conditions' has shape (1, 3), but the batch's codes of 'conditions' are (1, 2); "
        "return masks shaped like the batch's code ids"
    )):
        check_ground_truth({"conditions": torch.ones(1, 3), "procedures": REAL["procedures"]}, REAL)
    with pytest.raises(ValueError, match=re.escape(
        "ground_truth's mask for 'procedures' holds values other than 0 and 1; return a bool mask (True on the "
        "codes that truly matter), not scores"
    )):
        check_ground_truth({"conditions": REAL["conditions"], "procedures": torch.tensor([[0.5, 1.0]])}, REAL)


def test_ground_truth_refuses_integers_other_than_0_and_1():
    # code ids returned instead of a mask would otherwise all count as relevant
    message = "ground_truth's mask for 'procedures' holds values other than 0 and 1"
    with pytest.raises(ValueError, match=re.escape(message)):
        check_ground_truth({"conditions": REAL["conditions"], "procedures": torch.tensor([[2, 0]])}, REAL)
    with pytest.raises(ValueError, match="'conditions' holds values other than 0 and 1"):
        check_ground_truth({"conditions": torch.tensor([[-1, 0]]), "procedures": REAL["procedures"]}, REAL)


def test_ground_truth_accepts_float_and_int_masks_in_the_order_of_real():
    # 0.0 / 1.0 floats and 0 / 1 ints are masks
    out = check_ground_truth({"procedures": torch.tensor([[1, 0]]), "conditions": torch.tensor([[1.0, 0.0]])}, REAL)
    assert list(out) == ["conditions", "procedures"]
    assert out["conditions"].dtype == torch.bool and out["conditions"].tolist() == [[True, False]]
    assert out["procedures"].tolist() == [[True, False]]
    with pytest.raises(KeyError, match=re.escape("no feature 'x' here; use one of ['conditions', 'procedures']")):
        out["x"]


# ---------------------------------------------------------------------------------------------- _cat_rows, _head


def test_cat_rows():
    assert _cat_rows([]).shape == (0,)
    assert _cat_rows([torch.ones(1, 2), torch.zeros(2, 2)]).tolist() == [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]


def test_head_cuts_only_per_sample_values():
    batch = {
        "x": torch.arange(4), "scalar": torch.tensor(7), "pair": (torch.arange(4), torch.zeros(4, 2)),
        "ids": ["a", "b", "c", "d"], "three": [1, 2, 3], "n": 5, "other": torch.zeros(3),
    }
    out = _head(batch, 2, 4)
    assert out["x"].tolist() == [0, 1] and int(out["scalar"]) == 7
    assert out["pair"][0].tolist() == [0, 1] and tuple(out["pair"][1].shape) == (2, 2)
    assert out["ids"] == ["a", "b"] and out["three"] == [1, 2, 3] and out["n"] == 5
    assert tuple(out["other"].shape) == (3,)
    whole = _head(batch, 4, 4)  # k >= n: the batch itself, nothing sliced or copied
    assert whole == batch and all(whole[k] is batch[k] for k in batch)


# ---------------------------------------------------------------------------------------------- evaluate_methods


class _Bar:
    """Stands in for tqdm: records its arguments and postfixes."""

    made: ClassVar[list] = []

    def __init__(self, iterable=None, **kwargs):
        self.iterable, self.kwargs, self.postfix = iterable, kwargs, []
        _Bar.made.append(self)

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix(self, **kwargs):
        self.postfix.append(kwargs)


class _Adapter:
    def __init__(self, calls):
        self.calls = calls

    def captum_target(self, batch, mode="predicted"):
        self.calls["target"].append(mode)
        return batch.get("target")


@pytest.fixture
def fakes(monkeypatch):
    """The metrics of evaluate_methods replaced by fakes that record their arguments.

    Per method, the fake scores are the batch's ``x`` (times 10 for method "B"); each fake metric is a
    simple function of them, so the evaluation's values can be checked by hand.
    """
    kinds = ("compare", "target", "remover", "curves", "comp", "suff", "truth", "infidelity", "sensitivity")
    calls = {k: [] for k in kinds}
    _Bar.made = []
    monkeypatch.setattr("tqdm.tqdm", _Bar)
    monkeypatch.setattr(ev, "method_specs", lambda adapter, methods: list(methods))

    def compare_methods(adapter, data, specs, *, target_mode="predicted", baseline="unk", progress=True):
        calls["compare"].append({"target_mode": target_mode, "progress": progress})
        x = data["x"].float()
        scores = {name: {"x": x * (10 if name == "B" else 1)} for name, _, _ in specs}
        return SimpleNamespace(n_samples=len(x), scores=scores, seconds_per_sample=data["seconds"])

    class Remover:
        def __init__(self, adapter, batch, target=None, *, output="probability", compact=True):
            calls["remover"].append({"output": output, "compact": compact})
            self.real = {"x": torch.ones(len(batch["x"]), dtype=torch.bool)}

    def removal_curves(remover, scores, fractions=DEFAULT, *, seed=0):
        calls["curves"].append({"fractions": tuple(fractions), "seed": seed})
        x = scores["x"]
        deletion = x[:, None].repeat(1, len(fractions))
        return SimpleNamespace(deletion=deletion, insertion=-deletion, deletion_aopc=x, insertion_aopc=-x)

    def comprehensiveness(remover, scores, percentages=DEFAULT, *, seed=0):
        calls["comp"].append({"percentages": tuple(percentages), "seed": seed})
        return torch.stack([scores["x"] * (j + 1) for j in range(len(percentages))], 1)

    def sufficiency(remover, scores, percentages=DEFAULT, *, seed=0):
        calls["suff"].append({"percentages": tuple(percentages), "seed": seed})
        return torch.stack([-scores["x"] * (j + 1) for j in range(len(percentages))], 1)

    def precision_at_k(scores, truth, real, k=None):
        calls["truth"].append(truth["x"].tolist())
        return scores["x"] / 100

    def token_infidelity(
        adapter, batch, scores, target=None, *, n_perturb_samples=10, fraction=0.3, seed=0, compact=True
    ):
        calls["infidelity"].append({"n": n_perturb_samples, "seed": seed, "compact": compact})
        return scores["x"] + 1

    def attribution_sensitivity(adapter, method, batch, target=None, *, attribute_kwargs=None, n_perturb_samples=5,
                                perturb_radius=0.02, baseline="unk"):
        calls["sensitivity"].append({"method": method, "size": len(batch["x"]), "kwargs": attribute_kwargs,
                                     "target": None if target is None else target.tolist(), "n": n_perturb_samples})
        return torch.zeros(len(batch["x"]))

    for name, fake in [("compare_methods", compare_methods), ("TokenRemover", Remover),
                       ("removal_curves", removal_curves),
                       ("comprehensiveness", comprehensiveness), ("sufficiency", sufficiency),
                       ("precision_at_k", precision_at_k), ("localization_auroc", lambda s, t, r: s["x"] / 1000),
                       ("token_infidelity", token_infidelity), ("attribution_sensitivity", attribution_sensitivity)]:
        monkeypatch.setattr(ev, name, fake)
    return calls


DEFAULT = (0.5,)  # the fakes' own defaults: a mutant that drops an argument records these
METHODS = [("A", "method A", {"n_steps": 4}), ("B", "method B", {})]


def _batch(x, target, seconds, patients=None):
    batch = {"x": torch.tensor(x), "target": torch.tensor(target), "seconds": seconds}
    if patients is not None:
        batch["patient_id"] = patients
    return batch


def test_evaluate_methods_wiring_by_hand(fakes):
    data = [_batch([1.0, 2.0], [0, 1], {"A": 0.5, "B": 0.25}, ["p1", "p2"]),
            _batch([4.0], [1], {"A": 0.25, "B": 1.0}, ["p3"])]
    evaluation = evaluate_methods(
        _Adapter(fakes), data, METHODS, ground_truth=lambda b: {"x": b["x"] > 1.5}, fractions=(0, 0.5, 1),
        percentages=(0.1, 0.2), target_mode="label", output="logit", compact=False, infidelity_samples=1,
        sensitivity_samples=3, sensitivity_max_batch=1, seed=3, progress=False,
    )
    assert fakes["compare"] == [{"target_mode": "label", "progress": False}] * 2
    assert fakes["target"] == ["label"] * 2
    assert fakes["remover"] == [{"output": "logit", "compact": False}] * 2
    assert fakes["curves"] == [{"fractions": (0.0, 0.5, 1.0), "seed": 3}] * 4
    assert fakes["comp"] == fakes["suff"] == [{"percentages": (0.1, 0.2), "seed": 3}] * 4
    assert fakes["truth"] == [[False, True]] * 2 + [[True]] * 2
    assert fakes["infidelity"] == [{"n": 1, "seed": 3, "compact": False}] * 4
    # sensitivity on the first sample of each batch, with its target and the method's own kwargs
    assert fakes["sensitivity"] == [
        {"method": "method A", "size": 1, "kwargs": {"n_steps": 4}, "target": [0], "n": 3},
        {"method": "method B", "size": 1, "kwargs": {}, "target": [0], "n": 3},
        {"method": "method A", "size": 1, "kwargs": {"n_steps": 4}, "target": [1], "n": 3},
        {"method": "method B", "size": 1, "kwargs": {}, "target": [1], "n": 3},
    ]
    a = evaluation.per_sample["A"]
    assert list(a) == ["deletion_aopc", "insertion_aopc", "comprehensiveness", "sufficiency", "comprehensiveness@0.1",
                       "sufficiency@0.1", "comprehensiveness@0.2", "sufficiency@0.2", "precision_at_k", "auroc",
                       "infidelity", "sensitivity"]
    # scores x = [1, 2, 4]: comprehensiveness (x + 2x) / 2, sufficiency its negative, infidelity x + 1
    assert a["comprehensiveness"].tolist() == [1.5, 3.0, 6.0] and a["sufficiency"].tolist() == [-1.5, -3.0, -6.0]
    assert a["comprehensiveness@0.2"].tolist() == [2.0, 4.0, 8.0] and a["infidelity"].tolist() == [2.0, 3.0, 5.0]
    assert a["deletion_aopc"].tolist() == [1.0, 2.0, 4.0]
    assert evaluation.per_sample["B"]["deletion_aopc"].tolist() == [10.0, 20.0, 40.0]
    sensitivity = a["sensitivity"].tolist()
    assert sensitivity[0] == 0.0 and math.isnan(sensitivity[1]) and sensitivity[2] == 0.0
    assert evaluation.curves["A"]["deletion"].tolist() == [[1.0] * 3, [2.0] * 3, [4.0] * 3]
    # time per sample: (0.5 * 2 + 0.25 * 1) / 3 and (0.25 * 2 + 1.0 * 1) / 3
    seconds = evaluation.seconds_per_sample
    assert math.isclose(seconds["A"], 1.25 / 3) and math.isclose(seconds["B"], 0.5)
    assert evaluation.patient_ids == ["p1", "p2", "p3"] and evaluation.seed == 3
    assert evaluation.fractions == (0.0, 0.5, 1.0) and evaluation.percentages == (0.1, 0.2)
    outer, *inner = _Bar.made
    assert outer.kwargs == {"desc": "evaluating", "unit": "batch", "total": 2, "disable": True}
    assert [bar.kwargs for bar in inner] == [{"desc": "metrics", "unit": "method", "leave": False, "disable": True}] * 2
    assert [bar.postfix for bar in inner] == [[{"method": "A"}, {"method": "B"}]] * 2


def test_evaluate_methods_defaults_on_a_generator(fakes):
    batches = (b for b in [_batch([1.0], [0], {"A": 0.5, "B": 0.25})])
    evaluation = evaluate_methods(_Adapter(fakes), batches, METHODS)
    assert _Bar.made[0].kwargs["total"] is None and _Bar.made[0].kwargs["disable"] is False
    assert fakes["target"] == ["predicted"] and fakes["compare"][0]["target_mode"] == "predicted"
    assert fakes["infidelity"] == [{"n": 10, "seed": 0, "compact": True}] * 2  # ten perturbations by default
    assert fakes["sensitivity"] == [] and "sensitivity" not in evaluation.per_sample["A"]
    assert "auroc" not in evaluation.per_sample["A"]  # no ground truth
    assert evaluation.n_samples == 1 and evaluation.patient_ids == []  # one sample is enough; no patient ids
    assert evaluation.seconds_per_sample == {"A": 0.5, "B": 0.25}


def test_evaluate_methods_sensitivity_on_sixteen_samples_by_default(fakes):
    batch = _batch([float(i) for i in range(20)], list(range(20)), {"A": 0.5, "B": 0.25})
    evaluation = evaluate_methods(_Adapter(fakes), batch, METHODS[:1], infidelity_samples=0, sensitivity_samples=1)
    (call,) = fakes["sensitivity"]
    assert call["size"] == 16 and call["target"] == list(range(16))
    assert "infidelity" not in evaluation.per_sample["A"]
    assert _Bar.made[0].kwargs["total"] == 1  # a batch dict is one batch


def test_evaluate_methods_refuses_empty_data(fakes):
    with pytest.raises(ValueError, match=r"^data holds no samples$"):
        evaluate_methods(_Adapter(fakes), [], METHODS)
