"""Results out: code rows with patients and decoded codes, Comparison and Evaluation saved and loaded back."""

from __future__ import annotations

import math

import pytest
import torch
from captum.attr import IntegratedGradients, Saliency

from captum_chefer import CheferAttribution, PyHealthAdapter
from captum_chefer.comparison import Comparison, Evaluation, RandomAttribution, compare_methods, evaluate_methods
from captum_chefer.comparison.tables import read_rows, write_rows
from conftest import first_batch, make_dataset, make_model

FORMATS = (".csv", ".json", ".parquet")


@pytest.fixture(scope="module")
def nested_comparison():
    dataset = make_dataset("sequence", n=10)
    adapter = PyHealthAdapter(make_model(dataset))
    rest = {k: (v[6:] if hasattr(v, "__getitem__") else v) for k, v in first_batch(dataset, 10).items()}
    loader = [first_batch(dataset, 6), rest]
    methods = [CheferAttribution(adapter), ("IG", IntegratedGradients(adapter), {"n_steps": 4})]
    return adapter, loader, compare_methods(adapter, loader, methods, progress=False)


def test_code_rows_carry_patient_and_decoded_code(nested_comparison):
    adapter, loader, result = nested_comparison
    rows = result.code_rows()
    assert result.patient_ids == [f"p{i}" for i in range(10)]
    assert len(rows) == 2 * sum(int(m.sum()) for m in result.masks.values())
    processors = adapter.model.dataset.input_processors
    vocab = {key: {i: c for c, i in processors[key].code_vocab.items()} for key in adapter.feature_keys}
    for row in rows:
        key, sample = row["feature"], row["sample"]
        index = (sample, row["position"]) if row["visit"] is None else (sample, row["visit"], row["position"])
        assert row["patient_id"] == f"p{sample}"
        assert row["code_id"] == int(result.ids[key][index])
        code = vocab[key][row["code_id"]]  # the dataset's own vocabulary, not the adapter's decoder
        assert row["code"] == (code if row["visit"] is None else f"v{row['visit'] + 1}:{code}")
        assert row["score"] == float(result.scores[row["method"]][key][index])
    # the second batch's first patient is sample 6 and its codes are its own
    batch = loader[1]
    first = [r for r in rows if r["sample"] == 6 and r["feature"] == "conditions" and r["method"] == "Chefer"]
    assert [r["code_id"] for r in first] == [int(c) for c in batch["conditions"][0] if c != 0]


@pytest.mark.parametrize("suffix", FORMATS)
def test_comparison_round_trip(nested_comparison, tmp_path, suffix):
    _, _, result = nested_comparison
    again = Comparison.load(result.save(tmp_path / f"comparison{suffix}"))
    assert again.code_rows() == result.code_rows()
    assert again.methods == result.methods and again.patient_ids == result.patient_ids
    assert again.seconds_per_sample == result.seconds_per_sample
    assert (again.targets is None) == (result.targets is None)
    for key, mask in result.masks.items():
        index = tuple(slice(0, d) for d in again.masks[key].shape)
        assert torch.equal(again.masks[key], mask[index]) and not mask.sum() - mask[index].sum()
        assert torch.equal(again.ids[key], result.ids[key][index])
        for name in result.methods:
            assert torch.equal(again.scores[name][key], result.scores[name][key][index])


def test_comparison_load_rejects_other_files(tmp_path):
    write_rows([{"method": "x", "deletion_aopc": 0.1}], tmp_path / "summary.csv")
    with pytest.raises(ValueError, match=r"no comparison rows; write it with Comparison\.save"):
        Comparison.load(tmp_path / "summary.csv")
    with pytest.raises(ValueError, match=r"name the file \.csv, \.json or \.parquet"):
        Comparison.load(tmp_path / "summary.xlsx")


@pytest.fixture(scope="module")
def evaluation(planted_model):
    from pyhealth.datasets import get_dataloader

    adapter = PyHealthAdapter(planted_model)
    loader = list(get_dataloader(planted_model.dataset, batch_size=8, shuffle=False))[:2]

    def truth(b):
        planted = adapter.model.dataset.input_processors["conditions"].code_vocab["C0"]
        return {"conditions": b["conditions"] == planted,
                "procedures": torch.zeros_like(b["procedures"], dtype=torch.bool)}

    methods = [
        CheferAttribution(adapter), ("Saliency", Saliency(adapter), {}), ("Random", RandomAttribution(adapter), {}),
    ]
    return evaluate_methods(adapter, loader, methods, ground_truth=truth, infidelity_samples=2, progress=False)


def same_tensors(a, b):
    return a.shape == b.shape and bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


@pytest.mark.parametrize("suffix", FORMATS)
def test_evaluation_round_trip(evaluation, tmp_path, suffix):
    assert evaluation.patient_ids == [f"p{i}" for i in range(16)]
    assert torch.isnan(evaluation.per_sample["Chefer"]["auroc"]).any()  # negatives have no planted code: NaN survives
    again = Evaluation.load(evaluation.save(tmp_path / f"evaluation{suffix}"))
    assert again.methods == evaluation.methods and again.patient_ids == evaluation.patient_ids
    assert again.fractions == evaluation.fractions and again.percentages == evaluation.percentages
    assert again.seconds_per_sample == evaluation.seconds_per_sample
    for name in evaluation.methods:
        assert set(again.per_sample[name]) == set(evaluation.per_sample[name])
        for metric, values in evaluation.per_sample[name].items():
            assert same_tensors(again.per_sample[name][metric], values), (name, metric)
        for kind in ("deletion", "insertion"):
            assert torch.equal(again.curves[name][kind], evaluation.curves[name][kind])
    for got, want in zip(again.summary(intervals=True), evaluation.summary(intervals=True), strict=True):
        assert got.keys() == want.keys() and got["method"] == want["method"]
        assert [got[k] for k in got if k != "method"] == pytest.approx(
            [want[k] for k in want if k != "method"], nan_ok=True
        )


def test_results_json_loads_and_the_summary_csv_is_refused(evaluation, tmp_path):
    evaluation.to_json(tmp_path / "results.json")
    assert Evaluation.load(tmp_path / "results.json").per_sample.keys() == evaluation.per_sample.keys()
    evaluation.to_csv(tmp_path / "results.csv")
    with pytest.raises(
        ValueError, match=r"summary only\); load the file Evaluation.save wrote, or the report's results.json"
    ):
        Evaluation.load(tmp_path / "results.csv")


def test_rows_round_trip_every_cell_type(tmp_path):
    rows = [
        {"method": "Chefer", "sample": 0, "patient_id": "007", "score": 0.1, "flag": True},
        {"method": "IG", "sample": 1, "patient_id": None, "score": math.nan, "flag": False},
        {"method": "IG", "sample": 2, "patient_id": "x", "score": -math.inf, "flag": None},
    ]
    for suffix in FORMATS:
        back = read_rows(write_rows(rows, tmp_path / f"rows{suffix}"))
        assert [r["patient_id"] for r in back][1:] == [None, "x"] and back[0]["sample"] == 0
        assert math.isnan(back[1]["score"]) and back[2]["score"] == -math.inf and back[0]["score"] == 0.1
    # a string that looks like a number stays a string, in CSV too
    assert read_rows(tmp_path / "rows.csv")[0]["patient_id"] == "007"
