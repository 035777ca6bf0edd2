"""The comparison metrics and the token remover against hand-computed values, on an adapter double whose
every output is a sum of small binary fractions.

``BagOfCodes`` is a linear "bag of codes" model: the logits are the sum over the real codes of
``E[id] @ U`` (plus, optionally, a penalty when the first position is padding, as PyHealth's
``Transformer`` pools its first position). So removing codes changes the output by exactly the sum of
their weights ``W = E @ U``, Integrated Gradients of a code is ``(E[id] - baseline) @ U[:, target]``,
and every expected value below follows from ``E`` and ``U`` by hand.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from captum.attr import Attribution, IntegratedGradients

from captum_chefer.adapters.base import Adapter
from captum_chefer.comparison import (
    RandomAttribution,
    TokenRemoval,
    TokenRemover,
    attribution_sensitivity,
    comprehensiveness,
    explained_output,
    localization_auroc,
    precision_at_k,
    rank_codes,
    removal_curves,
    sufficiency,
    token_infidelity,
    token_removal_perturbation,
)

# code 0 is padding (zero embedding), code 1 is <unk>; entries are binary fractions, so sums are exact
E = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [1.0, 2.0], [3.0, 0.0], [0.0, 3.0]])
U = torch.tensor([[1.0, 0.5], [0.25, 2.0]])
W = E @ U  # the weight of each code for each class: W[id, c]
IDS = {  # two streams, padded; every row starts with a real code
    "a": torch.tensor([[2, 4, 6, 5, 0, 0], [7, 3, 0, 0, 0, 0], [5, 3, 0, 0, 0, 0]]),
    "b": torch.tensor([[3, 5, 0], [6, 2, 4], [4, 7, 0]]),
}


class Mode(torch.nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode


class BagOfCodes(Adapter):
    """An adapter double: logits = sum over real codes of ``E[id] @ U`` + ``penalty`` if position 0 is padding.

    Like the image adapters, it reads the masks' shape from the inputs (``token_masks`` needs them).
    """

    def __init__(self, keys=("a", "b"), penalty: float = 0.0, model=None) -> None:
        super().__init__()
        self.feature_keys = list(keys)
        self.penalty = penalty
        if model is not None:
            self.model = model

    @property
    def pad_ids(self):
        return tuple(0 for _ in self.feature_keys)

    def captum_inputs(self, batch, level="embedding"):
        ids = tuple(batch[k] for k in self.feature_keys)
        masks = tuple(i != 0 for i in ids)
        return (ids if level == "token" else tuple(E[i] for i in ids)), masks

    def token_masks(self, additional_forward_args, inputs=None):
        if inputs is None:
            raise TypeError("BagOfCodes reads the masks from the inputs")
        return tuple(
            x != 0 if not x.is_floating_point() else m.clone()
            for x, m in zip(inputs, additional_forward_args, strict=True)
        )

    def split_inputs(self, inputs_and_args):
        n = len(self.feature_keys)
        return tuple(inputs_and_args[:n]), tuple(inputs_and_args[n:])

    def remove_tokens(self, tokens, additional_forward_args, keep, *, compact=True):
        out = []
        for key, ids in zip(self.feature_keys, tokens, strict=True):
            kept = torch.where(keep[key] & (ids != 0), ids, torch.zeros_like(ids))
            if compact:  # the kept codes to the front, in their order
                kept = kept.gather(1, torch.argsort((kept == 0).to(torch.int8), dim=1, stable=True))
            out.append(kept)
        return tuple(out), tuple(ids != 0 for ids in out)

    def to_feature_dict(self, attributions):
        attributions = attributions if isinstance(attributions, tuple) else (attributions,)
        return {k: a.sum(-1) if a.dim() == 3 else a for k, a in zip(self.feature_keys, attributions, strict=True)}

    def baselines(self, inputs, additional_forward_args, reference="unk"):
        if reference not in ("unk", "zero"):
            raise ValueError(f"unknown reference {reference!r}")
        value = E[1] if reference == "unk" else torch.zeros(2)
        return tuple(
            torch.where(m.unsqueeze(-1), value, x) for x, m in zip(inputs, additional_forward_args, strict=True)
        )

    def forward(self, *inputs_and_args):
        inputs, masks = self.split_inputs(inputs_and_args)
        logits = torch.zeros(inputs[0].shape[0], U.shape[1])
        for x, m in zip(inputs, masks, strict=True):
            emb = x if x.is_floating_point() else E[x]
            logits = logits + (emb * m.unsqueeze(-1)).sum(1) @ U + self.penalty * (~m[:, 0]).float().unsqueeze(1)
        return logits


def batch(keys=("a", "b")):
    return {k: IDS[k].clone() for k in keys}


def weights_of(target, keys=("a", "b")):
    """The exact attribution of each code for each sample's target class: its weight, 0 on padding."""
    t = torch.as_tensor(target).expand(3)
    return {k: W[IDS[k], t.view(-1, 1)] * (IDS[k] != 0) for k in keys}


# ---------------------------------------------------------------------------------------------- ranking and curves


class Additive:
    """A remover whose output is the sum of the kept codes' weights."""

    def __init__(self, weights, real):
        self.weights, self.real = weights, real

    def __call__(self, keep):
        return sum((keep[k].float() * self.real[k].float() * self.weights[k]).reshape(1, -1).sum(1) for k in self.real)


def test_curves_over_three_streams_of_different_sizes():
    """Codes of three streams ranked together: each stream's keep mask lands on its own codes."""
    weights = {"a": torch.tensor([[8.0, 1.0]]), "b": torch.tensor([[[4.0, 0.5], [2.0, 0.0]]]),
               "c": torch.tensor([[16.0]])}
    real = {"a": torch.tensor([[True, True]]), "b": torch.tensor([[[True, True], [True, False]]]),
            "c": torch.tensor([[True]])}
    curves = removal_curves(Additive(weights, real), weights, [0.0, 1 / 3, 2 / 3, 1.0])
    # 6 codes, 31.5 in all; the best first: 16, 8, 4, 2, 1, 0.5; the top 2, 4, 6 removed (deletion) or kept
    assert curves.deletion.tolist() == [[31.5, 7.5, 1.5, 0.0]]
    assert curves.insertion.tolist() == [[0.0, 24.0, 30.0, 31.5]]
    assert curves.fractions.tolist() == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])


def test_nan_scores_rank_last_and_infinite_first():
    """A NaN score (a method that failed on a code) counts as the least relevant, +inf as the most,
    whatever the seed that breaks ties."""
    real = {"x": torch.ones(1, 4, dtype=torch.bool)}
    for seed in range(8):
        rank, _ = rank_codes({"x": torch.tensor([[math.nan, -1.0, -2.0, -3.0]])}, real, seed=seed)
        assert rank.tolist() == [[3, 0, 1, 2]]
        big = torch.finfo(torch.float32).max
        rank, _ = rank_codes({"x": torch.tensor([[big, math.inf, 0.0, -math.inf]])}, real, seed=seed)
        assert rank.tolist() == [[1, 0, 2, 3]]


def test_ties_follow_one_random_order_for_any_scores():
    """Ties are broken by one seeded random order of the positions: within each tied group the codes keep
    that order (200 codes, wide enough for torch's sort to be unstable unless asked)."""
    n = 200
    real = {"x": torch.ones(1, n, dtype=torch.bool)}
    shuffled, _ = rank_codes({"x": torch.zeros(1, n)}, real, seed=3)  # all tied: the random order itself
    groups = torch.arange(n) % 3  # 67, 67 and 66 codes scored 0, 1 and 2: group 2 ranks first
    rank, _ = rank_codes({"x": groups.float().view(1, n)}, real, seed=3)
    places = {2: range(0, 66), 1: range(66, 133), 0: range(133, 200)}
    for g in range(3):
        members = (groups == g).nonzero().view(-1)
        by_random_order = members[torch.argsort(shuffled[0, members])]
        assert torch.equal(by_random_order, members[torch.argsort(rank[0, members])])
        assert sorted(rank[0, members].tolist()) == list(places[g])


def test_real_codes_rank_by_score_among_much_padding():
    """Padding interleaved with 150 real codes does not disturb the order of the real ones."""
    n = 300
    real = torch.arange(n) % 2 == 0
    scores = torch.where(real, torch.arange(n).float(), torch.full((n,), 1e6))  # padding scored highest
    rank, n_real = rank_codes({"x": scores.view(1, n)}, {"x": real.view(1, n)})
    assert int(n_real) == 150
    expected = torch.empty(150, dtype=torch.long)
    expected[torch.argsort(torch.arange(0, n, 2), descending=True)] = torch.arange(150)
    assert torch.equal(rank[0, real], expected)
    assert sorted(rank[0, ~real].tolist()) == list(range(150, 300))


def _tied():
    weights = {"x": torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.5]])}
    return Additive(weights, {"x": torch.ones(1, 6, dtype=torch.bool)}), {"x": torch.ones(1, 6)}


def test_seed_reaches_the_ranking_of_every_curve():
    """All scores tied: the removed codes are those the seed draws, so different seeds give different curves."""
    remover, tied = _tied()
    for metric in (comprehensiveness, sufficiency, lambda r, s, seed: removal_curves(r, s, [0.5], seed=seed).deletion):
        values = {tuple(metric(remover, tied, seed=seed).view(-1).tolist()) for seed in range(6)}
        assert len(values) > 1, metric


def test_documented_default_seeds():
    """The defaults the signatures document: seed 0 everywhere (seed 1 gives other numbers here)."""
    remover, tied = _tied()
    real = remover.real
    assert not torch.equal(rank_codes(tied, real, seed=0)[0], rank_codes(tied, real, seed=1)[0])
    assert torch.equal(rank_codes(tied, real)[0], rank_codes(tied, real, seed=0)[0])
    for metric in (comprehensiveness, sufficiency):
        assert not torch.equal(metric(remover, tied, seed=0), metric(remover, tied, seed=1))
        assert torch.equal(metric(remover, tied), metric(remover, tied, seed=0))
    x = torch.zeros(2, 5, 3)
    assert torch.equal(RandomAttribution(None).attribute(x), RandomAttribution(None, seed=0).attribute(x))
    assert not torch.equal(RandomAttribution(None, seed=1).attribute(x), RandomAttribution(None, seed=0).attribute(x))


def test_random_attribution_is_a_captum_attribution_without_delta():
    assert RandomAttribution.get_name() == "Random"
    assert RandomAttribution(None).has_convergence_delta() is False


def test_score_errors_name_the_fix():
    with pytest.raises(ValueError) as error:
        rank_codes({"x": torch.ones(1, 3)}, {"x": torch.ones(1, 4, dtype=torch.bool)})
    assert str(error.value) == ("scores['x'] has shape (1, 3) but the codes are (1, 4); pass per-code scores of the "
                                "same batch (adapter.to_feature_dict or Comparison.scores[method])")
    real = {"conditions": torch.ones(1, 2, dtype=torch.bool), "procedures": torch.ones(1, 2, dtype=torch.bool)}
    with pytest.raises(KeyError) as missing:
        rank_codes({"conditions": torch.ones(1, 2)}, real)
    assert missing.value.args[0] == (
        "no entry for feature(s) ['procedures']: got entries for ['conditions'], but the codes' feature keys are "
        "['conditions', 'procedures']; pass one entry per feature key (adapter.to_feature_dict, "
        "Comparison.scores[method] or a ground-truth mask)"
    )


# ---------------------------------------------------------------------------------------------- localization


def test_precision_and_auroc_on_small_and_undefined_samples():
    """k=1 is allowed; a sample with one real code or one false code is scored; an undefined sample
    (NaN) before a defined one does not stop the loop."""
    real = {"x": torch.tensor([[True, True, True], [True, False, False], [True, True, True]])}
    truth = {"x": torch.tensor([[False, False, False], [True, False, False], [True, False, True]])}
    scores = {"x": torch.tensor([[1.0, 2.0, 3.0], [0.5, 9.0, 9.0], [3.0, 1.0, 2.0]])}
    p = precision_at_k(scores, truth, real)
    assert math.isnan(p[0]) and p[1:].tolist() == [1.0, 1.0]
    # k=1: the top code of sample 2 (score 3) is true; sample 1's only real code is true
    assert precision_at_k(scores, truth, real, k=1)[1:].tolist() == [1.0, 1.0]
    # k=2 over sample 2's scores 3 (true), 2 (true), 1: both true
    assert precision_at_k(scores, truth, real, k=2)[2].item() == 1.0
    auroc = localization_auroc(scores, truth, real)
    # sample 0: no true code; sample 1: no false real code; sample 2: true 3 and 2 against false 1
    assert math.isnan(auroc[0]) and math.isnan(auroc[1]) and auroc[2].item() == 1.0
    one_false = {"x": torch.tensor([[True, True], [True, True]])}
    one_true = {"x": torch.tensor([[True, False], [True, False]])}
    auroc = localization_auroc({"x": torch.tensor([[1.0, 2.0], [2.0, 1.0]])}, one_true, one_false)
    assert auroc.tolist() == [0.0, 1.0]


def test_precision_ties_at_the_cutoff_with_codes_above():
    """One code above the cut-off, then three tied for the last two places of which one is true:
    expected precision at 3 = (1 + 2 x 1/3) / 3."""
    real = {"x": torch.ones(1, 5, dtype=torch.bool)}
    truth = {"x": torch.tensor([[True, True, False, False, False]])}
    scores = {"x": torch.tensor([[5.0, 1.0, 1.0, 1.0, 0.0]])}
    assert precision_at_k(scores, truth, real, k=3).item() == pytest.approx((1 + 2 / 3) / 3)


# ---------------------------------------------------------------------------------------------- explained output


def test_explained_output_picks_the_target_and_the_link():
    logits = torch.tensor([[0.0, math.log(2.0), 0.0], [math.log(3.0), 0.0, 0.0]])
    # softmax: sample 0 class 1 = 2/4; sample 1 class 0 = 3/5; an int target applies to every sample
    assert explained_output(logits, torch.tensor([1, 0]), "probability").tolist() == pytest.approx([0.5, 0.6])
    assert explained_output(logits, 1, "probability").tolist() == pytest.approx([0.5, 1 / 5])
    assert explained_output(logits, torch.tensor(1), "logit").tolist() == pytest.approx([math.log(2.0), 0.0])
    # multilabel: each label its own sigmoid
    assert explained_output(logits, 1, "probability", multilabel=True).tolist() == pytest.approx([2 / 3, 0.5])
    # three samples, two classes: an int target still gives one value per sample
    three = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 0.0]])
    assert explained_output(three, 0, "logit").tolist() == [0.0, 2.0, 0.0]


def test_single_logit_models_explain_their_one_output():
    logits = torch.tensor([[0.0], [math.log(3.0)]])
    for target in (None, 0, torch.tensor([0, 0])):
        assert explained_output(logits, target, "probability").tolist() == pytest.approx([0.5, 0.75])
    for target in (1, torch.tensor([0, 1])):
        with pytest.raises(ValueError, match=r"^a single-logit \(binary\) model explains its one output: "
                                             r"target must be None or 0$"):
            explained_output(logits, target, "probability")


# ---------------------------------------------------------------------------------------------- TokenRemover


def test_token_remover_on_the_double():
    """full: every code; empty: none; the target's softmax probability, or its logit."""
    adapter = BagOfCodes()
    target = torch.tensor([1, 0, 1])
    logits = sum(W[IDS[k]].sum(1) for k in "ab")  # padding's weight is 0
    remover = TokenRemover(adapter, batch(), target)
    assert remover.full.tolist() == pytest.approx(logits.softmax(1)[[0, 1, 2], target].tolist())
    assert remover.empty.tolist() == pytest.approx([0.5] * 3)
    logit = TokenRemover(adapter, batch(), target, output="logit")
    assert logit.full.tolist() == pytest.approx(logits[[0, 1, 2], target].tolist())
    keep = {k: v.clone() for k, v in remover.real.items()}
    keep["a"][:, 0] = False
    assert logit(keep).tolist() == pytest.approx((logits[[0, 1, 2], target] - W[IDS["a"][:, 0], target]).tolist())


def test_token_remover_multilabel_uses_a_sigmoid_per_label():
    """A multilabel model (model.mode == 'multilabel') explains sigmoid(logit); others the softmax,
    whether the adapter has no model or a model without a mode."""
    logits = sum(W[IDS[k]].sum(1) for k in "ab")
    target = torch.tensor([0, 1, 0])
    chosen = logits[[0, 1, 2], target]
    multilabel = TokenRemover(BagOfCodes(model=Mode("multilabel")), batch(), target)
    assert multilabel.full.tolist() == pytest.approx(torch.sigmoid(chosen).tolist())
    softmax = logits.softmax(1)[[0, 1, 2], target].tolist()
    assert TokenRemover(BagOfCodes(model=Mode("multiclass")), batch(), target).full.tolist() == pytest.approx(softmax)
    linear = BagOfCodes(model=torch.nn.Linear(1, 1))
    assert TokenRemover(linear, batch(), target).full.tolist() == pytest.approx(softmax)
    assert TokenRemover(BagOfCodes(), batch(), target).full.tolist() == pytest.approx(softmax)


def test_token_remover_errors_name_the_feature_and_shapes():
    remover = TokenRemover(BagOfCodes(), batch(), 0)
    with pytest.raises(KeyError, match="keep has no mask for feature 'b'"):
        remover({"a": remover.real["a"]})
    with pytest.raises(ValueError, match=r"keep\['a'\] has shape \(3, 2\), the codes \(3, 6\)"):
        remover({"a": remover.real["a"][:, :2], "b": remover.real["b"]})


# ---------------------------------------------------------------------------------------------- TokenRemoval


def test_token_removal_settings_and_refusals():
    adapter = BagOfCodes()
    default = TokenRemoval(adapter)
    assert (default.fraction, default.compact, default.generator) == (0.3, True, None)
    generator = torch.Generator()
    made = token_removal_perturbation(adapter, 0.4, generator, compact=False)
    assert isinstance(made, TokenRemoval) and made.adapter is adapter and made.generator is generator
    assert (made.fraction, made.compact) == (0.4, False)
    default = token_removal_perturbation(adapter)
    assert (default.fraction, default.compact, default.generator) == (0.3, True, None)
    with pytest.raises(TypeError, match=r"TokenRemoval needs an adapter from captum_chefer\.adapters, got object"):
        TokenRemoval(object())
    for fraction in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\), got"):
            TokenRemoval(adapter, fraction)
    with pytest.raises(TypeError, match=r"input for 'a' is torch\.float32\. "
                                        r"Use adapter\.captum_inputs\(batch, level='token'\)"):
        TokenRemoval(adapter)(adapter.captum_inputs(batch())[0])


def test_token_removal_forward_removes_padded_codes_and_compacts():
    """forward_func treats every pad id as removed; with compact the rest move to the front (no penalty for
    a padded first position), without they stay in place (the penalty applies)."""
    adapter = BagOfCodes(penalty=64.0)
    tokens, args = adapter.captum_inputs(batch(), level="token")
    perturbed = (tokens[0].clone(), tokens[1])
    perturbed[0][:, 0] = 0  # the first code of stream a removed
    weights = sum(W[IDS[k]].sum(1) for k in "ab") - W[IDS["a"][:, 0]]
    compact = TokenRemoval(adapter, 0.5).forward_func(*perturbed, *args)
    assert torch.allclose(compact, weights)
    in_place = TokenRemoval(adapter, 0.5, compact=False).forward_func(*perturbed, *args)
    assert torch.allclose(in_place, weights + 64.0)


def test_token_removal_draws_remove_real_codes_only_and_keep_one_per_row():
    """Each real code removed independently (about `fraction` of them), never padding; a row about to lose
    every code keeps its first one; rows without a real code stay as they are; a bare tensor works too."""
    adapter = BagOfCodes(keys=("a",))
    ids = torch.zeros(400, 12, dtype=torch.long)
    lengths = torch.arange(400) % 13  # 0 (no real code) to 12 codes
    for row, n in enumerate(lengths.tolist()):
        ids[row, :n] = 2 + (torch.arange(n) % 6)
    removal = TokenRemoval(adapter, 0.5, torch.Generator().manual_seed(1))
    (perturbation,), (perturbed,) = removal((ids,))
    real = ids != 0
    removed = perturbation.bool()
    assert not (removed & ~real).any()  # padding is never removed
    assert torch.equal(perturbed, torch.where(removed, torch.zeros_like(ids), ids))
    kept = (real & ~removed).sum(1)
    assert (kept[lengths > 0] >= 1).all() and (kept[lengths == 0] == 0).all()
    share = removed.sum() / real.sum()
    assert 0.4 < float(share) < 0.6
    # the first code is removed in some rows that keep others, and kept alone in rows that lost the rest
    first_removed = removed[:, 0] & (kept >= 1)
    assert first_removed.any()
    alone = (kept == 1) & real[:, 0] & ~removed[:, 0] & (lengths > 1)
    assert alone.any()
    # a fraction close to 1: every row with codes keeps exactly its first one
    high = TokenRemoval(adapter, 1 - 1e-6, torch.Generator().manual_seed(0))
    (perturbation,), _ = high(ids)  # a bare tensor, not a tuple
    left = real & ~perturbation.bool()
    assert torch.equal(left.sum(1), (lengths > 0).long()) and torch.equal(left[:, 0], lengths > 0)


def test_token_removal_draws_come_from_its_generator():
    """The same seed gives the same draws whatever the global random state, and whatever the default device."""
    adapter = BagOfCodes()
    tokens, _ = adapter.captum_inputs(batch(), level="token")
    big = (tokens[0].repeat(20, 1), tokens[1].repeat(20, 1))
    runs = []
    for draws in (1, 7):
        torch.rand(draws)
        runs.append(TokenRemoval(adapter, 0.5, torch.Generator().manual_seed(4))(big)[0])
    assert all(torch.equal(x, y) for x, y in zip(*runs, strict=True))
    other = TokenRemoval(adapter, 0.5, torch.Generator().manual_seed(5))(big)[0]
    assert not all(torch.equal(x, y) for x, y in zip(runs[0], other, strict=True))
    with torch.device("meta"):  # a default device other than the generator's (as torch.set_default_device("cuda"))
        again = TokenRemoval(adapter, 0.5, torch.Generator().manual_seed(4))(big)[0]
    assert all(torch.equal(x, y) for x, y in zip(runs[0], again, strict=True))


# ---------------------------------------------------------------------------------------------- token_infidelity


def test_infidelity_is_zero_for_the_exact_weights_at_any_scale():
    """The model is additive once the kept codes move to the front, so the exact weights (of each sample's
    target class) explain every removal: infidelity 0, and 0 again when scaled by 3 (normalised). Without
    compaction the penalty for a padded first position is not explained; without normalising, the scale is."""
    adapter = BagOfCodes(penalty=64.0)
    target = torch.tensor([1, 0, 1])
    exact = weights_of(target)
    # (outputs differ by tens, so their squares by hundreds: 1e-3 is rounding in Captum's expanded square)
    assert token_infidelity(adapter, batch(), exact, target).abs().max() < 1e-3
    tripled = {k: 3 * v for k, v in exact.items()}
    assert token_infidelity(adapter, batch(), tripled, target).abs().max() < 1e-3
    assert token_infidelity(adapter, batch(), exact, target, compact=False).max() > 10.0


def test_infidelity_of_one_perturbation_is_zero():
    """With one perturbation per sample the least-squares scale fits it exactly: 0 for any scores; more
    perturbations expose wrong scores."""
    adapter = BagOfCodes()
    wrong = {k: torch.ones_like(v, dtype=torch.float) * (v != 0) for k, v in batch().items()}
    assert token_infidelity(adapter, batch(), wrong, 0, n_perturb_samples=1).abs().max() < 1e-3
    assert token_infidelity(adapter, batch(), wrong, 0, n_perturb_samples=10).max() > 0.1


def test_infidelity_draws_from_its_seed():
    adapter = BagOfCodes()
    wrong = {k: torch.ones_like(v, dtype=torch.float) * (v != 0) for k, v in batch().items()}
    runs = []
    for draws in (1, 5):
        torch.rand(draws)
        runs.append(token_infidelity(adapter, batch(), wrong, 0, seed=2))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], token_infidelity(adapter, batch(), wrong, 0, seed=3))


def test_infidelity_documented_defaults():
    """n_perturb_samples=10, fraction=0.3, seed=0, compact=True."""
    adapter = BagOfCodes(penalty=64.0)
    wrong = {k: torch.ones_like(v, dtype=torch.float) * (v != 0) for k, v in batch().items()}
    default = token_infidelity(adapter, batch(), wrong, 0)
    explicit = token_infidelity(adapter, batch(), wrong, 0, n_perturb_samples=10, fraction=0.3, seed=0, compact=True)
    assert torch.equal(default, explicit)
    for changed in ({"n_perturb_samples": 11}, {"seed": 1}, {"compact": False}):
        assert not torch.equal(default, token_infidelity(adapter, batch(), wrong, 0, **changed)), changed


# ---------------------------------------------------------------------------------------------- sensitivity


class Recorder(Attribution):
    """Returns its inputs as attributions, records each call, and warns as Captum's gradient methods do
    (plus a warning of its own, which must reach the caller)."""

    def __init__(self, forward_func) -> None:
        super().__init__(forward_func)
        self.calls = []

    def attribute(self, inputs, target=None, additional_forward_args=None, **kwargs):
        self.calls.append({"rows": inputs[0].shape[0], "target": target, "kwargs": kwargs})
        warnings.warn(
            "Input Tensor 0 did not already require gradients, required_grads has been set automatically.",
            stacklevel=2,
        )
        warnings.warn("the method's own warning", RuntimeWarning, stacklevel=2)
        return tuple(x.clone() for x in inputs)


def test_sensitivity_passes_target_kwargs_and_sample_count_to_the_method():
    adapter = BagOfCodes()
    method = Recorder(adapter)
    target = torch.tensor([1, 0, 1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attribution_sensitivity(adapter, method, batch(), target, attribute_kwargs={"flag": 7}, n_perturb_samples=4)
    messages = [str(w.message) for w in caught]
    assert "the method's own warning" in messages
    assert not any("did not already require gradients" in m for m in messages)
    # Captum explains the batch once, then each example expanded n_perturb_samples times
    assert sorted(call["rows"] for call in method.calls) == [3, 12]
    assert all(call["kwargs"] == {"flag": 7} for call in method.calls)
    assert all(call["target"] is not None for call in method.calls)
    first = min(method.calls, key=lambda call: call["rows"])
    assert torch.equal(torch.as_tensor(first["target"]), target)
    method.calls.clear()
    with pytest.warns(RuntimeWarning, match="the method's own warning"):
        attribution_sensitivity(adapter, method, batch(), target)
    assert sorted(call["rows"] for call in method.calls) == [3, 15]  # the documented default, 5


def _ig_sensitivity(adapter, target, **kwargs):
    torch.manual_seed(0)  # Captum draws the noise from the global generator: the same draws for every call
    return attribution_sensitivity(
        adapter, IntegratedGradients(adapter), batch(), target, n_perturb_samples=3, **kwargs
    )


def test_sensitivity_of_integrated_gradients_against_its_closed_form():
    """IG of the linear model: code score (E[id] - baseline) . U[:, t]; the noise changes every score by
    delta . U[:, t] whatever the baseline, so sensitivity ~ 1 / ||scores||: the ratio between two baselines
    is the inverse ratio of the score norms, and the noise radius scales it linearly."""
    adapter = BagOfCodes()
    target = torch.tensor([1, 0, 1])
    real = {k: IDS[k] != 0 for k in "ab"}

    def norm(reference):
        scores = [((E[IDS[k]] - reference) * U[:, target].T.unsqueeze(1)).sum(-1) * real[k] for k in "ab"]
        return torch.cat(scores, dim=1).norm(dim=1)

    unk = _ig_sensitivity(adapter, target)  # the default baseline, "unk"
    zero = _ig_sensitivity(adapter, target, baseline="zero")
    assert (zero / unk).tolist() == pytest.approx((norm(E[1]) / norm(torch.zeros(2))).tolist(), rel=1e-4)
    assert torch.allclose(_ig_sensitivity(adapter, target, baseline="unk"), unk)
    # baselines the caller passes are used as they are
    inputs, args = adapter.captum_inputs(batch())
    own = adapter.baselines(inputs, args, "zero")
    passed = _ig_sensitivity(adapter, target, attribute_kwargs={"baselines": own})
    assert torch.allclose(passed, zero, rtol=1e-5)
    # the noise radius: the documented default 0.02, and a ten times larger one
    assert torch.allclose(_ig_sensitivity(adapter, target, perturb_radius=0.02), unk)
    assert (_ig_sensitivity(adapter, target, perturb_radius=0.2) / unk).tolist() == pytest.approx([10.0] * 3, rel=1e-4)
