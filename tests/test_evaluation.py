"""Evaluation metrics on hand-made attributions with known answers, and code removal through a real model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from captum_chefer import CheferAttribution, PyHealthAdapter
from captum_chefer.comparison import (
    RandomAttribution,
    TokenRemover,
    attribution_sensitivity,
    comprehensiveness,
    evaluate_methods,
    localization_auroc,
    precision_at_k,
    rank_codes,
    removal_curves,
    sufficiency,
    token_infidelity,
)
from tests.conftest import first_batch, make_model

WEIGHTS = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])  # one sample, 5 real codes + padding
REAL = {"x": torch.tensor([[True, True, True, True, True, False]])}


class Additive:
    """A "model" whose output is the sum of the weights of the kept codes: every answer is hand-computable."""

    def __init__(self, weights=WEIGHTS, real=REAL):
        self.weights, self.real = weights, real
        self.calls = []

    def __call__(self, keep):
        self.calls.append({k: v.clone() for k, v in keep.items()})
        return (keep["x"].float() * self.real["x"].float() * self.weights).sum(1)


PERFECT = {"x": WEIGHTS.clone()}
REVERSED = {"x": -WEIGHTS.clone()}
GRID = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


def test_deletion_and_insertion_curves_of_a_perfect_and_a_reversed_ranking():
    perfect = removal_curves(Additive(), PERFECT, GRID)
    reversed_ = removal_curves(Additive(), REVERSED, GRID)
    # total 15; removing the best codes first: 15, 10, 6, 3, 1, 0; worst first: 15, 14, 12, 9, 5, 0
    assert perfect.deletion.tolist() == [[15, 10, 6, 3, 1, 0]]
    assert reversed_.deletion.tolist() == [[15, 14, 12, 9, 5, 0]]
    assert perfect.insertion.tolist() == [[0, 5, 9, 12, 14, 15]]
    assert reversed_.insertion.tolist() == [[0, 1, 3, 6, 10, 15]]
    assert perfect.full.tolist() == [15] and perfect.empty.tolist() == [0]
    # AOPC = mean(full - deletion) = (0+5+9+12+14+15)/6; insertion AOPC the same by symmetry here
    assert perfect.deletion_aopc.item() == pytest.approx(55 / 6)
    assert perfect.insertion_aopc.item() == pytest.approx(55 / 6)
    assert reversed_.deletion_aopc.item() == pytest.approx((0 + 1 + 3 + 6 + 10 + 15) / 6)
    assert perfect.deletion_aopc.item() > reversed_.deletion_aopc.item()


def test_padding_is_never_removed_or_inserted():
    model = Additive()
    removal_curves(model, PERFECT, GRID)
    for keep in model.calls:
        assert not keep["x"][0, 5]  # the padding slot is never "kept" either: it is not a code


def test_number_of_codes_is_ceil_of_fraction_times_codes():
    # 5 codes: 30% -> ceil(1.5) = 2 removed; 10% -> 1; 0.6 -> 3 exactly (no float round-up to 4)
    comp = comprehensiveness(Additive(), PERFECT, [0.1, 0.3, 0.6])
    assert comp.tolist() == [[5.0, 9.0, 12.0]]


def test_comprehensiveness_and_sufficiency_known_values():
    comp_good = comprehensiveness(Additive(), PERFECT, [0.2, 0.4])
    comp_bad = comprehensiveness(Additive(), REVERSED, [0.2, 0.4])
    suff_good = sufficiency(Additive(), PERFECT, [0.2, 0.4])
    suff_bad = sufficiency(Additive(), REVERSED, [0.2, 0.4])
    assert comp_good.tolist() == [[5.0, 9.0]] and comp_bad.tolist() == [[1.0, 3.0]]
    assert suff_good.tolist() == [[10.0, 6.0]] and suff_bad.tolist() == [[14.0, 12.0]]


def test_ranking_spans_streams_and_nested_codes():
    scores = {"a": torch.tensor([[0.5, 0.0]]), "b": torch.tensor([[[0.9, 0.1], [0.3, 0.0]]])}
    real = {"a": torch.tensor([[True, False]]), "b": torch.tensor([[[True, True], [True, False]]])}
    rank, n = rank_codes(scores, real)
    # flattened: a0=0.5, a1=pad, b00=0.9, b01=0.1, b10=0.3, b11=pad
    assert n.tolist() == [4]
    assert rank[0, [2, 0, 4, 3]].tolist() == [0, 1, 2, 3]
    assert sorted(rank[0, [1, 5]].tolist()) == [4, 5]


def test_ties_are_broken_at_random_not_by_position():
    first = set()
    for seed in range(12):
        rank, _ = rank_codes({"x": torch.ones(1, 6)}, REAL, seed=seed)
        first.add(int((rank[0] == 0).nonzero()))
        assert int(rank[0, 5]) == 5  # padding still last
    assert len(first) > 2


def test_precision_at_k_perfect_reversed_ties_and_missing_truth():
    real = {"x": torch.tensor([[True] * 5 + [False], [True] * 5 + [False]])}
    truth = {"x": torch.tensor([[True, True, False, False, False, False], [False] * 6])}
    perfect = {"x": torch.tensor([[5.0, 4, 3, 2, 1, 9], [1.0, 2, 3, 4, 5, 0]])}  # padding's 9 must not count
    reversed_ = {"x": torch.tensor([[1.0, 2, 3, 4, 5, 0], [1.0, 2, 3, 4, 5, 0]])}
    p = precision_at_k(perfect, truth, real)
    assert p[0].item() == 1.0 and math.isnan(p[1].item())
    assert precision_at_k(reversed_, truth, real)[0].item() == 0.0
    # all tied: expected precision = share of true codes, 2/5
    assert precision_at_k({"x": torch.ones(2, 6)}, truth, real)[0].item() == pytest.approx(0.4)
    # k=3 with the perfect ranking: 2 true among the top 3
    assert precision_at_k(perfect, truth, real, k=3)[0].item() == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="positive int"):
        precision_at_k(perfect, truth, real, k=0)


def test_auroc_perfect_reversed_tied():
    real = {"x": torch.tensor([[True] * 5 + [False]])}
    truth = {"x": torch.tensor([[True, True, False, False, False, False]])}
    assert localization_auroc(PERFECT, truth, real).item() == 1.0
    assert localization_auroc(REVERSED, truth, real).item() == 0.0
    assert localization_auroc({"x": torch.ones(1, 6)}, truth, real).item() == 0.5
    # one inversion among 2 x 3 pairs: 5/6
    assert localization_auroc({"x": torch.tensor([[5.0, 2, 3, 1, 0, 0]])}, truth, real).item() == pytest.approx(5 / 6)
    assert math.isnan(localization_auroc(PERFECT, {"x": torch.zeros(1, 6, dtype=torch.bool)}, real).item())


def test_bad_scores_are_refused():
    with pytest.raises(ValueError, match="shape"):
        removal_curves(Additive(), {"x": torch.ones(1, 4)})
    with pytest.raises(KeyError, match="no entry"):
        removal_curves(Additive(), {"y": torch.ones(1, 6)})
    with pytest.raises(ValueError, match="fractions"):
        removal_curves(Additive(), PERFECT, [0.5, 1.5])


# ---------------------------------------------------------------------------------------------- real model


@pytest.fixture
def trained(seq_dataset):
    model = make_model(seq_dataset)
    return PyHealthAdapter(model), first_batch(seq_dataset, batch_size=6)


def test_token_remover_keeps_everything_and_removes_everything(trained):
    adapter, batch = trained
    remover = TokenRemover(adapter, batch)
    tokens, args = adapter.captum_inputs(batch, level="token")
    expected = torch.sigmoid(adapter(*tokens, *args)[:, 0])
    assert torch.allclose(remover.full, expected)
    assert torch.allclose(remover({k: v.clone() for k, v in remover.real.items()}), expected)
    assert not torch.allclose(remover.empty, expected)
    logit = TokenRemover(adapter, batch, output="logit")
    assert torch.allclose(logit.full, adapter(*tokens, *args)[:, 0])
    with pytest.raises(ValueError, match="output must be"):
        TokenRemover(adapter, batch, output="odds")


def test_compacted_removal_equals_the_batch_without_the_code(trained):
    """Removing the first condition equals a batch whose conditions start at the second code (built by hand)."""
    adapter, batch = trained
    remover = TokenRemover(adapter, batch, compact=True)
    keep = {k: v.clone() for k, v in remover.real.items()}
    keep["conditions"][:, 0] = False
    got = remover(keep)
    ids = batch["conditions"]
    shifted = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
    by_hand = dict(batch)
    by_hand["conditions"] = shifted
    tokens, args = adapter.captum_inputs(by_hand, level="token")
    expected = torch.sigmoid(adapter(*tokens, *args)[:, 0])
    has_two = (ids != 0).sum(1) >= 2
    assert torch.allclose(got[has_two], expected[has_two], atol=1e-6)

    # without compaction the first position is left as padding in place: a different model input
    in_place = TokenRemover(adapter, batch, compact=False)(keep)
    assert not torch.allclose(in_place[has_two], expected[has_two], atol=1e-4)


def test_multiclass_target_probability(seq_dataset):
    from tests.conftest import make_dataset

    dataset = make_dataset("sequence", n=12, n_classes=3)
    adapter = PyHealthAdapter(make_model(dataset))
    batch = first_batch(dataset)
    target = adapter.captum_target(batch)
    remover = TokenRemover(adapter, batch, target)
    tokens, args = adapter.captum_inputs(batch, level="token")
    probs = adapter(*tokens, *args).softmax(1)
    assert torch.allclose(remover.full, probs.gather(1, target.view(-1, 1))[:, 0])
    with pytest.raises(ValueError, match="target is required"):
        TokenRemover(adapter, batch, None)


def test_random_attribution_is_seeded_and_shaped(trained):
    adapter, batch = trained
    inputs, args = adapter.captum_inputs(batch)
    a = RandomAttribution(adapter, seed=3).attribute(inputs, additional_forward_args=args)
    b = RandomAttribution(adapter, seed=3).attribute(inputs, additional_forward_args=args)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert [x.shape for x in a] == [x.shape for x in inputs]
    tokens, _ = adapter.captum_inputs(batch, level="token")
    t = RandomAttribution(adapter).attribute(tokens)
    assert [x.shape for x in t] == [x.shape for x in tokens] and all(x.is_floating_point() for x in t)


def test_captum_metrics_rank_random_below_chefer(trained):
    adapter, batch = trained
    target = adapter.captum_target(batch)
    tokens, args = adapter.captum_inputs(batch, level="token")
    chefer = adapter.to_feature_dict(CheferAttribution(adapter).attribute(tokens, additional_forward_args=args))
    infid = token_infidelity(adapter, batch, chefer, target, n_perturb_samples=4)
    assert infid.shape == (6,) and torch.isfinite(infid).all() and (infid >= 0).all()
    # Chefer is a deterministic function of the input: tiny noise changes it little; random scores change totally
    sens_chefer = attribution_sensitivity(adapter, CheferAttribution(adapter), batch, target, n_perturb_samples=3)
    sens_random = attribution_sensitivity(adapter, RandomAttribution(adapter), batch, target, n_perturb_samples=3)
    assert sens_chefer.shape == (6,)
    assert float(sens_chefer.mean()) < 0.5 * float(sens_random.mean())


def test_evaluate_methods_end_to_end(trained, tmp_path):
    adapter, batch = trained
    truth_masks = {k: torch.zeros_like(v, dtype=torch.bool) for k, v in TokenRemover(adapter, batch).real.items()}
    truth_masks["conditions"][:, 0] = batch["conditions"][:, 0] != 0
    evaluation = evaluate_methods(
        adapter, [batch, batch], [CheferAttribution(adapter), ("Random", RandomAttribution(adapter), {})],
        ground_truth=lambda b: truth_masks, infidelity_samples=2, sensitivity_samples=1, sensitivity_max_batch=3,
        progress=False,
    )
    assert evaluation.methods == ["Chefer", "Random"]
    per = evaluation.per_sample["Chefer"]
    assert per["deletion_aopc"].shape == (12,) and per["auroc"].shape == (12,)
    assert torch.isnan(per["sensitivity"][3:6]).all() and not torch.isnan(per["sensitivity"][:3]).any()
    # the same numbers as the metric functions on the same scores, batch after batch
    from captum_chefer.comparison import compare_methods

    scores = compare_methods(adapter, batch, [CheferAttribution(adapter)], progress=False).scores["Chefer"]
    real = TokenRemover(adapter, batch).real
    direct = precision_at_k(scores, truth_masks, real)
    assert torch.allclose(per["precision_at_k"], torch.cat([direct, direct]))
    assert torch.allclose(per["deletion_aopc"][:6], removal_curves(TokenRemover(adapter, batch), scores).deletion_aopc)
    best = evaluation.best("auroc", exclude=())
    assert best == max(evaluation.summary(), key=lambda r: r["auroc"])["method"]
    rows = evaluation.summary()
    assert [r["method"] for r in rows] == ["Chefer", "Random"] and rows[0]["seconds_per_sample"] > 0
    assert "comprehensiveness@0.1" in rows[0]
    data = json.loads(evaluation.to_json(tmp_path / "e.json").read_text())
    assert data["summary"][0]["method"] == "Chefer" and len(data["mean_curves"]["Chefer"]["deletion"]) == 11
    assert (tmp_path / "e.csv").exists() is False
    assert evaluation.to_csv(tmp_path / "e.csv").read_text().splitlines()[0].startswith("method,")
    assert "Chefer" in evaluation.table() and evaluation.table(markdown=True).startswith("| method")


def test_same_seed_same_numbers_even_for_noisetunnel(trained):
    from captum.attr import NoiseTunnel, Saliency

    adapter, batch = trained
    methods = [("SmoothGrad", NoiseTunnel(Saliency(adapter)), {"nt_samples": 3, "stdevs": 0.5})]
    runs = []
    for draws in (1, 5):
        torch.rand(draws)  # the caller's global random state differs between the runs
        state = torch.get_rng_state()
        evaluation = evaluate_methods(
            adapter, batch, methods, infidelity_samples=2, sensitivity_samples=2, progress=False
        )
        assert torch.equal(torch.get_rng_state(), state)  # and is given back untouched
        runs.append(evaluation.per_sample["SmoothGrad"])
    for metric in ("deletion_aopc", "insertion_aopc", "infidelity", "sensitivity"):
        assert torch.equal(runs[0][metric], runs[1][metric]), metric
    other = evaluate_methods(
        adapter, batch, methods, infidelity_samples=2, sensitivity_samples=2, seed=1, progress=False
    )
    assert not torch.equal(other.per_sample["SmoothGrad"]["sensitivity"], runs[0]["sensitivity"])


def test_stagenet_removal_moves_times_with_their_codes(stage_dataset):
    adapter = PyHealthAdapter(make_model(stage_dataset, kind="stagenet"))
    batch = first_batch(stage_dataset)
    remover = TokenRemover(adapter, batch)
    assert torch.allclose(remover({k: v.clone() for k, v in remover.real.items()}), remover.full)
    keep = {k: v.clone() for k, v in remover.real.items()}
    keep["codes"][:, 0] = False
    got = remover(keep)
    schema = list(stage_dataset.input_processors["codes"].schema())
    parts = list(batch["codes"])
    time, codes = parts[schema.index("time")], parts[schema.index("value")]
    parts[schema.index("time")] = torch.cat([time[:, 1:], torch.zeros_like(time[:, :1])], dim=1)
    parts[schema.index("value")] = torch.cat([codes[:, 1:], torch.zeros_like(codes[:, :1])], dim=1)
    tokens, args = adapter.captum_inputs({**batch, "codes": tuple(parts)}, level="token")
    expected = torch.sigmoid(adapter(*tokens, *args)[:, 0])
    has_two = (codes != 0).sum(1) >= 2
    assert has_two.any()
    assert torch.allclose(got[has_two], expected[has_two], atol=1e-6)


def test_localization_and_summary_from_the_raw_scores(trained):
    """Independent expected values: the truth is each sample's first condition alone, so R-precision is 1 when
    that code scores highest (1/t when t codes tie for the top), and AUROC is the share of other real codes
    scored below it (ties count half); the summary is each metric's mean over the samples where it is defined."""
    adapter, batch = trained
    tokens, args = adapter.captum_inputs(batch, level="token")
    raw = adapter.to_feature_dict(CheferAttribution(adapter).attribute(tokens, additional_forward_args=args))
    real = {key: batch[key] != 0 for key in adapter.feature_keys}
    truth = {key: torch.zeros_like(mask) for key, mask in real.items()}
    truth["conditions"][:, 0] = real["conditions"][:, 0]
    evaluation = evaluate_methods(
        adapter, batch, [CheferAttribution(adapter), ("Random", RandomAttribution(adapter), {})],
        ground_truth=lambda b: truth, infidelity_samples=0, progress=False,
    )
    per = evaluation.per_sample["Chefer"]
    for i in range(batch["conditions"].shape[0]):
        first = float(raw["conditions"][i, 0])
        others = torch.cat([raw[k][i][real[k][i]] for k in adapter.feature_keys])[1:]  # conditions come first
        top = max(first, float(others.max()))
        tied = 1 + int((others == top).sum()) if first == top else 0
        assert float(per["precision_at_k"][i]) == pytest.approx(1 / tied if tied else 0.0), i
        expected_auroc = float((others < first).float().mean() + 0.5 * (others == first).float().mean())
        assert float(per["auroc"][i]) == pytest.approx(expected_auroc), i
    for row in evaluation.summary():
        for metric, values in evaluation.per_sample[row["method"]].items():
            defined = [float(v) for v in values if not math.isnan(float(v))]
            expected = sum(defined) / len(defined) if defined else math.nan
            assert row[metric] == pytest.approx(expected, nan_ok=True), (row["method"], metric)
    means = {name: sum(map(float, m["auroc"])) / len(m["auroc"]) for name, m in evaluation.per_sample.items()}
    assert evaluation.best("auroc", exclude=()) == max(means, key=means.get)
    assert evaluation.best("auroc") == "Chefer"  # the only method left once Random is excluded
