"""The synthetic cohort: the planted rule really determines the label, and the ground truth is what the rule read.

The checks re-implement each rule directly on the sample dicts (not through the generator's classes).
"""

from __future__ import annotations

import pytest
import torch

from captum_chefer.synthetic import (
    Interaction,
    KOf,
    Order,
    StreamSpec,
    Trigger,
    default_cohort,
    make_cohort,
)

FLAT = StreamSpec("dx", "sequence", prefix="D", vocab_size=30, length=(3, 8))
NESTED = StreamSpec("px", "nested_sequence", prefix="P", vocab_size=20, length=(1, 4), codes_per_visit=(1, 3))
TIMED = StreamSpec("rx", "stagenet", prefix="R", vocab_size=20, length=(1, 4), codes_per_visit=(1, 2))


def codes_of(value, kind):
    if kind == "stagenet":
        value = value[1]
    if kind == "sequence":
        return list(value)
    return [c for visit in value for c in visit]


def visits_of(value, kind):
    return value[1] if kind == "stagenet" else value


def test_trigger_decides_the_label_and_is_the_ground_truth():
    cohort = make_cohort(400, streams=[FLAT], rules=[Trigger("dx", "D_T")], decoys=[("dx", "D_DECOY")], seed=1)
    labels = [s["label"] for s in cohort.samples]
    assert 0.35 < sum(labels) / len(labels) < 0.65
    for sample, truth in zip(cohort.samples, cohort.relevant, strict=True):
        has = "D_T" in sample["dx"]
        assert sample["label"] == int(has)
        assert truth == (frozenset({("dx", "D_T")}) if has else frozenset())


def test_k_of_a_risk_set_with_near_misses_in_negatives():
    risk = ("D_R1", "D_R2", "D_R3", "D_R4")
    cohort = make_cohort(400, streams=[FLAT], rules=[KOf("dx", risk, k=3)], near_miss_rate=1.0, seed=2)
    partial = 0
    for sample, truth in zip(cohort.samples, cohort.relevant, strict=True):
        present = {c for c in sample["dx"] if c in risk}
        assert sample["label"] == int(len(present) >= 3)
        if sample["label"]:
            assert truth == frozenset(("dx", c) for c in present)
        else:
            assert truth == frozenset()
            partial += 1 <= len(present) <= 2
    assert partial > 100  # negatives carry 1 or 2 risk codes: the count matters, not the presence


def test_interaction_across_a_flat_and_a_nested_stream():
    rule = Interaction(("dx", "D_A"), ("px", "P_B"))
    cohort = make_cohort(400, streams=[FLAT, NESTED], rules=[rule], near_miss_rate=1.0, seed=3)
    only_one = 0
    for sample, truth in zip(cohort.samples, cohort.relevant, strict=True):
        a = "D_A" in sample["dx"]
        b = any("P_B" in visit for visit in sample["px"])
        assert sample["label"] == int(a and b)
        assert truth == (frozenset({("dx", "D_A"), ("px", "P_B")}) if a and b else frozenset())
        only_one += a != b
    assert only_one > 100  # one of the two codes alone does not make the label


@pytest.mark.parametrize("stream", [FLAT, NESTED, TIMED], ids=lambda s: s.kind)
def test_order_rule_first_before_then(stream):
    first, then = f"{stream.prefix}_FIRST", f"{stream.prefix}_THEN"
    cohort = make_cohort(300, streams=[stream], rules=[Order(stream.key, first, then)], near_miss_rate=1.0, seed=4)
    both_wrong_order = 0
    for sample in cohort.samples:
        value = sample[stream.key]
        if stream.kind == "sequence":
            steps = list(enumerate(value))
        else:
            steps = [(v, c) for v, visit in enumerate(visits_of(value, stream.kind)) for c in visit]
        a = [t for t, c in steps if c == first]
        b = [t for t, c in steps if c == then]
        ordered = bool(a and b and min(a) < max(b))
        assert sample["label"] == int(ordered)
        both_wrong_order += bool(a and b and not ordered)
    assert both_wrong_order > 50  # negatives hold both codes in the wrong order


def test_stagenet_stream_has_increasing_times_per_visit():
    cohort = make_cohort(50, streams=[TIMED], rules=[Trigger("rx", "R_T")], seed=5)
    for sample in cohort.samples:
        times, visits = sample["rx"]
        assert len(times) == len(visits) >= 1
        assert times == sorted(times) and times[0] == 0.0
        assert all(visit for visit in visits)


def test_multiclass_label_is_the_rule_that_fired():
    rules = [Trigger("dx", "D_T"), KOf("dx", ("D_R1", "D_R2", "D_R3"), k=2), Interaction(("dx", "D_A"), ("px", "P_B"))]
    cohort = make_cohort(600, streams=[FLAT, NESTED], rules=rules, task="multiclass", seed=6)
    assert cohort.num_classes == 4 and cohort.output_schema == {"label": "multiclass"}
    counts = [0] * 4
    for sample in cohort.samples:
        dx = sample["dx"]
        px = codes_of(sample["px"], "nested_sequence")
        holds = ["D_T" in dx, len({c for c in dx if c in ("D_R1", "D_R2", "D_R3")}) >= 2, "D_A" in dx and "P_B" in px]
        assert sum(holds) <= 1
        expected = holds.index(True) + 1 if any(holds) else 0
        assert sample["label"] == expected
        counts[expected] += 1
    assert min(counts) > 100  # classes drawn uniformly


def test_decoys_are_independent_of_the_label():
    cohort = make_cohort(
        3000, streams=[FLAT], rules=[Trigger("dx", "D_T")], decoys=[("dx", "D_DECOY")], decoy_rate=0.4, seed=7
    )
    rate = {}
    for label in (0, 1):
        group = [s for s in cohort.samples if s["label"] == label]
        rate[label] = sum("D_DECOY" in s["dx"] for s in group) / len(group)
    assert abs(rate[0] - 0.4) < 0.05 and abs(rate[1] - 0.4) < 0.05
    assert all(("dx", "D_DECOY") not in truth for truth in cohort.relevant)


def test_seeded_and_reproducible():
    a = default_cohort(60, seed=11)
    b = default_cohort(60, seed=11)
    c = default_cohort(60, seed=12)
    assert a.samples == b.samples and a.relevant == b.relevant
    assert a.samples != c.samples


def test_default_cohort_fires_every_rule():
    cohort = default_cohort(300)
    fired = {name for names in cohort.fired for name in names}
    assert fired == {"trigger", "k_of", "interaction"}
    assert all(len(names) <= 1 for names in cohort.fired)


def test_ground_truth_masks_mark_exactly_the_relevant_codes():
    from pyhealth.datasets import get_dataloader
    from pyhealth.models import Transformer

    from captum_chefer import PyHealthAdapter
    from captum_chefer.synthetic import quiet_pyhealth

    cohort = default_cohort(40, seed=3)
    dataset = cohort.dataset()
    with quiet_pyhealth():
        model = Transformer(dataset=dataset, embedding_dim=8, heads=1, num_layers=1)
    adapter = PyHealthAdapter(model)
    batch = next(iter(get_dataloader(dataset, batch_size=40, shuffle=False)))
    masks = cohort.ground_truth(adapter, batch)
    names = {key: {i: c for c, i in dataset.input_processors[key].code_vocab.items()} for key in adapter.feature_keys}
    relevant = cohort.relevant_by_patient()
    for key in adapter.feature_keys:
        ids = batch[key]
        assert masks[key].shape == ids.shape and masks[key].dtype == torch.bool
        for i, pid in enumerate(batch["patient_id"]):
            expected = torch.tensor([(key, names[key][int(v)]) in relevant[pid] for v in ids[i].reshape(-1)])
            assert torch.equal(masks[key][i].reshape(-1), expected)
    assert any(m.any() for m in masks.values())
    with pytest.raises(KeyError, match="not in this cohort"):
        cohort.ground_truth(adapter, {**batch, "patient_id": ["nobody"] * 40})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rules": [Trigger("dx", "D_T"), KOf("dx", ("D_T", "D_X"), 1)]}, "read by two rules"),
        ({"rules": [Trigger("nope", "D_T")]}, "not among"),
        ({"rules": [Trigger("dx", "D007")]}, "looks like a background code"),
        ({"rules": [Trigger("dx", "D_T")], "decoys": [("dx", "D_T")]}, "also read by rule"),
        ({"rules": [Trigger("dx", "D_T")], "task": "regression"}, "task must be"),
        ({"rules": []}, "at least one rule"),
        ({"rules": [Trigger("dx", "D_T")], "positive_rate": 1.0}, "positive_rate"),
    ],
)
def test_bad_cohorts_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_cohort(10, streams=[FLAT], **kwargs)


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="1 <= k"):
        KOf("dx", ("A", "B"), k=3)
    with pytest.raises(ValueError, match="kind must be"):
        StreamSpec("dx", "list")
    with pytest.raises(ValueError, match="length"):
        StreamSpec("dx", length=(3, 2))
