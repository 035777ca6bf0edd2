"""The comparison's small pieces on hand-made values: Comparison's summary rows, text table and saved
columns, Interval.excludes at its edges, and the JSON cells of write_rows.

Each expected value is worked out by hand in the comments, not read from the code under test.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from captum_chefer.comparison import Comparison, Interval
from captum_chefer.comparison.tables import read_rows, write_rows


def _comparison(targets=None) -> Comparison:
    # two samples; stream "x" flat [2, 3], stream "y" nested [2, 1, 2]; zero on padding
    x = torch.tensor([[1.0, -2.0, 0.0], [0.25, 0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([[[3.0, 0.0]], [[-0.25, 0.25]]], dtype=torch.float64)
    masks = {
        "x": torch.tensor([[True, True, False], [True, False, False]]),
        "y": torch.tensor([[[True, False]], [[True, True]]]),
    }
    ids = {"x": torch.tensor([[5, 6, 0], [7, 0, 0]]), "y": torch.tensor([[[8, 0]], [[9, 10]]])}
    return Comparison(
        scores={"A": {"x": x, "y": y}, "Saliency": {"x": 2 * x, "y": 2 * y}},
        seconds_per_sample={"A": 0.5, "Saliency": 0.125},
        ids=ids,
        masks=masks,
        targets=targets,
    )


def test_rows_by_hand():
    rows = _comparison().rows()
    # x, real codes |1|, |-2|, |0.25|: 3.25 / 3; y, real codes 3, 0.25, 0.25: 3.5 / 3
    # per sample, the top |score| over the whole sample's total: 3 / 6 and 0.25 / 0.75 (a total below 1)
    assert [r["method"] for r in rows] == ["A", "Saliency"]
    assert list(rows[0]) == ["method", "seconds_per_sample", "x_mean_abs", "y_mean_abs", "top_code_share"]
    assert rows[0]["seconds_per_sample"] == 0.5 and rows[1]["seconds_per_sample"] == 0.125
    assert math.isclose(rows[0]["x_mean_abs"], 3.25 / 3) and math.isclose(rows[0]["y_mean_abs"], 3.5 / 3)
    assert math.isclose(rows[1]["x_mean_abs"], 6.5 / 3) and math.isclose(rows[1]["y_mean_abs"], 7 / 3)
    share = (3 / 6 + 0.25 / 0.75) / 2
    assert math.isclose(rows[0]["top_code_share"], share) and math.isclose(rows[1]["top_code_share"], share)


def test_rows_of_a_stream_without_real_codes_give_zero():
    empty = Comparison(
        scores={"A": {"z": torch.zeros(2, 3), "x": torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0]])}},
        seconds_per_sample={"A": 1.0},
        masks={"z": torch.zeros(2, 3, dtype=torch.bool), "x": torch.tensor([[1, 0, 0], [1, 1, 0]]).bool()},
    )
    (row,) = empty.rows()
    assert row["z_mean_abs"] == 0.0 and math.isclose(row["x_mean_abs"], 4 / 3, rel_tol=1e-6)
    assert math.isclose(row["top_code_share"], (2 / 2 + 1 / 2) / 2)


def test_table_by_hand():
    # 3.25 / 3 = 1.0833.. and 3.5 / 3 = 1.1666.. at 4 significant digits; the top-code share 0.41666..
    expected = [
        "method    seconds_per_sample  x_mean_abs  y_mean_abs  top_code_share",
        "A         0.5                 1.083       1.167       0.4167        ",
        "Saliency  0.125               2.167       2.333       0.4167        ",
    ]
    assert _comparison().table() == "\n".join(expected)
    assert _comparison().table(digits=2).splitlines()[1] == (
        "A         0.5                 1.1         1.2         "
        "0.42          "
    )
    assert Comparison(scores={}, seconds_per_sample={}).table() == ""


def test_save_writes_the_columns_in_order_with_targets(tmp_path):
    path = _comparison(targets=torch.tensor([1, 0])).save(tmp_path / "c.csv")
    header = path.read_text(encoding="utf-8").splitlines()[0]
    assert header == "method,sample,patient_id,feature,visit,position,code_id,code,score,target,seconds_per_sample"
    rows = read_rows(path)
    assert len(rows) == 2 * 6  # two methods, six real codes
    assert {(r["sample"], r["target"]) for r in rows} == {(0, 1), (1, 0)}
    first = rows[0]
    assert (first["method"], first["feature"], first["visit"], first["position"], first["code_id"], first["code"]) == (
        "A", "x", None, 0, 5, "#5"
    )
    assert first["score"] == 1.0 and first["seconds_per_sample"] == 0.5
    assert Comparison.load(path).targets.tolist() == [1, 0]
    without = read_rows(_comparison().save(tmp_path / "none.csv"))
    assert {r["target"] for r in without} == {None}


def test_interval_excludes_at_its_edges():
    assert Interval(0.5, 0.2, 0.8, 1).excludes()  # one patient is an interval
    assert not Interval(0.5, -0.2, 0.8, 4).excludes()  # 0 inside
    assert Interval(0.5, -0.2, 0.8, 4).excludes(1.0)
    assert not Interval(0.5, 0.0, 0.8, 4).excludes(0.0)  # the ends belong to the interval
    assert not Interval(-0.5, -0.8, 0.0, 4).excludes()
    assert not Interval(0.5, 0.2, 0.8, 0).excludes()  # no patient, no interval


def test_json_cells_are_plain_numbers_except_nan_and_infinity(tmp_path):
    path = write_rows([{"a": 0.5, "b": float("nan"), "c": -float("inf"), "d": 3, "e": None}], tmp_path / "t.json")
    data = json.loads(path.read_text(), parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
    assert data == {
        "columns": ["a", "b", "c", "d", "e"],
        "rows": [[0.5, {"float": "nan"}, {"float": "-inf"}, 3, None]],
    }
    (row,) = read_rows(path)
    assert row["a"] == 0.5 and math.isnan(row["b"]) and row["c"] == -math.inf and row["d"] == 3 and row["e"] is None


def test_load_one_method_one_code_with_its_dtypes(tmp_path):
    one = Comparison(
        scores={"A": {"x": torch.tensor([[0.75]])}},
        seconds_per_sample={"A": 0.5},
        ids={"x": torch.tensor([[4]])},
        masks={"x": torch.tensor([[True]])},
    )
    again = Comparison.load(one.save(tmp_path / "one.csv"))  # a single row, a single method
    assert again.methods == ["A"] and again.scores["A"]["x"].tolist() == [[0.75]]
    assert again.ids["x"].dtype == torch.long and again.ids["x"].tolist() == [[4]]
    assert again.masks["x"].dtype == torch.bool and again.masks["x"].tolist() == [[True]]


def test_load_refuses_a_table_without_scores_or_code_ids(tmp_path):
    for missing in ("score", "code_id"):
        row = {"method": "A", "sample": 0, "feature": "x", "visit": None, "position": 0, "code_id": 3, "score": 1.0}
        del row[missing]
        path = write_rows([row], tmp_path / f"no_{missing}.csv")
        expected = f"{str(path)!r} holds no comparison rows; write it with Comparison.save"
        with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
            Comparison.load(path)


class _StubAdapter:
    """The least an adapter offers CheferAttribution (its AttentionModel protocol), and nothing that runs."""

    def __call__(self, *args):
        raise AssertionError("not called")

    def attention_forward(self, *args, **kwargs):
        raise AssertionError("not called")

    def relevance_to_inputs(self, *args, **kwargs):
        raise AssertionError("not called")


def test_default_methods_names_methods_and_settings():
    from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

    from captum_chefer import CheferAttribution
    from captum_chefer.comparison import RandomAttribution
    from captum_chefer.report import default_methods

    adapter = _StubAdapter()  # the methods are only built here, never run
    specs = default_methods(adapter)
    assert [name for name, _, _ in specs] == [
        "Chefer (recommended)", "Chefer (PyHealth)", "Chefer (PyHealth, exclude_self)", "Integrated Gradients",
        "Saliency", "NoiseTunnel (SmoothGrad)", "Random",
    ]
    kinds = [CheferAttribution, CheferAttribution, CheferAttribution, IntegratedGradients, Saliency, NoiseTunnel,
             RandomAttribution]
    assert [type(method) for _, method, _ in specs] == kinds
    assert [method.preset for _, method, _ in specs[:3]] == ["recommended", "pyhealth", "pyhealth"]
    assert all(method.forward_func is adapter for _, method, _ in specs if not isinstance(method, NoiseTunnel))
    assert isinstance(specs[5][1].attribution_method, Saliency)
    assert specs[5][1].attribution_method.forward_func is adapter
    assert [kwargs for _, _, kwargs in specs] == [
        {}, {}, {"exclude_self": True}, {"n_steps": 50}, {},
        {"nt_type": "smoothgrad", "nt_samples": 10, "stdevs": 0.1}, {},
    ]
    assert specs[6][1].generator.initial_seed() == 0
    chosen = default_methods(adapter, ig_steps=1, nt_samples=1, nt_stdev=0.3, seed=5)  # 1 is the smallest allowed
    assert chosen[3][2] == {"n_steps": 1} and chosen[5][2] == {"nt_type": "smoothgrad", "nt_samples": 1, "stdevs": 0.3}
    assert chosen[6][1].generator.initial_seed() == 5
    for bad in ({"ig_steps": 0}, {"nt_samples": 0}):
        steps, samples = bad.get("ig_steps", 50), bad.get("nt_samples", 10)
        message = f"ig_steps and nt_samples must be >= 1, got {steps}, {samples}"
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            default_methods(adapter, **bad)


def test_load_reads_patients_and_a_missing_time(tmp_path):
    # a table written by hand: no seconds_per_sample and no target column; one patient id missing, one numeric
    rows = [
        {"method": "A", "sample": 0, "patient_id": None, "feature": "x", "visit": None, "position": 0, "code_id": 3,
         "code": "c3", "score": 0.5},
        {"method": "A", "sample": 1, "patient_id": 7, "feature": "x", "visit": None, "position": 1, "code_id": 4,
         "code": "c4", "score": -1.0},
    ]
    loaded = Comparison.load(write_rows(rows, tmp_path / "hand.csv"))
    assert loaded.patient_ids == [None, "7"] and loaded.targets is None
    assert list(loaded.seconds_per_sample) == ["A"] and math.isnan(loaded.seconds_per_sample["A"])
    assert loaded.scores["A"]["x"].tolist() == [[0.5, 0.0], [0.0, -1.0]]
    assert loaded.masks["x"].tolist() == [[True, False], [False, True]]
    assert [[(t.feature, t.text, t.index) for t in tokens] for tokens in loaded.decoded] == [
        [("x", "c3", (0,))], [("x", "c4", (1,))]
    ]


def test_progress_bars_by_default_and_none_when_asked(capsys):
    from captum.attr import Saliency

    from captum_chefer import PyHealthAdapter
    from captum_chefer.comparison import compare_methods, evaluate_methods
    from captum_chefer.synthetic import toy_model_and_batch

    model, batch = toy_model_and_batch()
    adapter = PyHealthAdapter(model)
    methods = [Saliency(adapter)]
    evaluate_methods(adapter, batch, methods, infidelity_samples=0)
    compare_methods(adapter, [batch], methods)
    shown = capsys.readouterr().err
    assert "evaluating" in shown and "metrics" in shown and "compare_methods" in shown
    evaluate_methods(adapter, batch, methods, infidelity_samples=0, progress=False)
    compare_methods(adapter, [batch], methods, progress=False)
    assert capsys.readouterr().err == ""


def test_save_without_real_codes_still_writes_the_header(tmp_path):
    empty = Comparison(scores={"A": {"x": torch.zeros(1, 2)}}, seconds_per_sample={"A": 0.1},
                       ids={"x": torch.zeros(1, 2, dtype=torch.long)}, masks={"x": torch.zeros(1, 2, dtype=torch.bool)})
    path = empty.save(tmp_path / "empty.csv")
    assert path.read_text(encoding="utf-8").splitlines() == [
        "method,sample,patient_id,feature,visit,position,code_id,code,score,target,seconds_per_sample"
    ]
