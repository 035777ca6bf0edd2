"""The comparison's plumbing on hand-made values: the statistics against independent references, tables
written and read back, compare_methods / attribute_batch / EvaluatorMethod on a fake adapter that records
what it is asked, and run_comparison with its collaborators replaced by recorders.

Every expected value is worked out by hand (in the comments) or by scipy, not read from the code under test.
The fakes make each test take milliseconds: no PyHealth model is built here.
"""

from __future__ import annotations

import csv
import itertools
import json
import locale
import math
import signal
import warnings
from types import SimpleNamespace

import pytest
import torch
from captum.attr import Attribution, IntegratedGradients, LayerIntegratedGradients, NoiseTunnel, Saliency
from scipy import stats as scipy_stats

from captum_chefer import report
from captum_chefer.adapters import Adapter
from captum_chefer.adapters.base import DecodedToken
from captum_chefer.comparison import DEFAULT_FRACTIONS, DEFAULT_PERCENTAGES, Comparison, methods
from captum_chefer.comparison.methods import (
    EvaluatorMethod,
    _cat_padded,
    attribute_batch,
    batch_patient_ids,
    compare_methods,
    ig_baselines,
    is_ig_like,
    masked_feature_dict,
    method_specs,
)
from captum_chefer.comparison.stats import (
    Interval,
    above_chance,
    binomial_tail,
    bootstrap_interval,
    mean_interval,
    paired_difference,
    wilson_interval,
)
from captum_chefer.comparison.tables import read_rows, table_format, write_rows

# ---------------------------------------------------------------------------------------------- statistics


def _wilson_reference(k: int, n: int, level: float) -> tuple[float, float]:
    """Wilson's score interval from scipy (binomtest's proportion_ci)."""
    ci = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
    return ci.low, ci.high


def test_interval_as_dict_keeps_finite_numbers_and_turns_nan_into_none():
    assert Interval(0.5, 0.25, 0.75, 4, 0.9, "wilson").as_dict() == {
        "mean": 0.5, "low": 0.25, "high": 0.75, "n": 4, "level": 0.9, "kind": "wilson"}
    empty = Interval(math.nan, math.inf, -math.inf, 0).as_dict()
    assert empty == {"mean": None, "low": None, "high": None, "n": 0, "level": 0.95, "kind": "bootstrap"}


@pytest.mark.parametrize("level", [0.0, 1.0, 1.5, -0.1])
def test_levels_outside_the_open_unit_interval_are_refused(level):
    with pytest.raises(ValueError, match=r"level must be between 0 and 1 \(e\.g\. 0\.95\), got "):
        bootstrap_interval([1.0, 2.0], level=level)
    with pytest.raises(ValueError, match=r"level must be between 0 and 1 \(e\.g\. 0\.95\), got "):
        wilson_interval(1, 2, level=level)


def test_a_single_resample_is_allowed():
    # one resample of two equal values: the interval is that value
    interval = bootstrap_interval([2.0, 2.0], n_resamples=1)
    assert (interval.mean, interval.low, interval.high, interval.n) == (2.0, 2.0, 2.0, 2)
    with pytest.raises(ValueError, match=r"n_resamples must be a positive int, got 0"):
        bootstrap_interval([2.0], n_resamples=0)


def test_the_level_is_kept_with_and_without_values():
    empty = bootstrap_interval([math.nan], level=0.8)
    assert empty.level == 0.8 and empty.n == 0
    assert math.isnan(empty.mean) and math.isnan(empty.low) and math.isnan(empty.high)
    assert bootstrap_interval([1.0, 3.0], level=0.8).level == 0.8
    assert paired_difference([1.0], [math.nan], level=0.7).level == 0.7


def test_default_seeds_are_zero():
    values = [0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4]
    other = [0.0] * 7
    # seeds 0 and 1 give different intervals for these values, so the default must be 0
    assert bootstrap_interval(values, seed=0) != bootstrap_interval(values, seed=1)
    assert mean_interval(values) == bootstrap_interval(values, seed=0)
    assert paired_difference(values, other) == paired_difference(values, other, seed=0)
    assert paired_difference(values, other, seed=0) != paired_difference(values, other, seed=1)


def test_paired_difference_works_in_double_precision():
    # 1e8 + 1 has no float32 form (float32 steps by 8 there): in single precision the difference would be 0
    big = 100_000_001.0
    assert paired_difference([big], [1e8]).mean == pytest.approx(1.0)
    assert paired_difference([1e8], [big]).mean == pytest.approx(-1.0)


@pytest.mark.parametrize("k,n,level", [(0, 5, 0.95), (3, 10, 0.95), (7, 8, 0.9), (10, 10, 0.8), (1, 1, 0.5)])
def test_wilson_interval_matches_scipy(k, n, level):
    interval = wilson_interval(k, n, level=level)
    low, high = _wilson_reference(k, n, level)
    assert interval.low == pytest.approx(low, abs=1e-9) and interval.high == pytest.approx(high, abs=1e-9)
    assert (interval.mean, interval.n, interval.level, interval.kind) == (pytest.approx(k / n), n, level, "wilson")


def test_wilson_interval_ends_are_exact_at_zero_and_all_successes():
    # the formula reaches 0 (and 1) only up to rounding; the interval states them exactly
    for level in (0.5, 0.8, 0.9, 0.95, 0.99):
        for n in range(1, 60):
            assert wilson_interval(0, n, level=level).low == 0.0
            assert wilson_interval(n, n, level=level).high == 1.0


def test_wilson_interval_of_no_tries():
    interval = wilson_interval(0, 0, level=0.9)
    assert math.isnan(interval.mean) and math.isnan(interval.low) and math.isnan(interval.high)
    assert (interval.n, interval.level, interval.kind) == (0, 0.9, "wilson")


def test_binomial_tail_edges_against_scipy():
    for k, n, p in [(0, 0, 0.5), (0, 3, 0.0), (1, 3, 0.0), (2, 3, 1.0), (3, 3, 1.0), (4, 9, 0.3), (9, 9, 0.7)]:
        assert binomial_tail(k, n, p) == pytest.approx(scipy_stats.binom.sf(k - 1, n, p), abs=1e-12)
    assert binomial_tail(0, 3, 0.0) == pytest.approx(1.0) and binomial_tail(1, 3, 0.0) == 0.0
    assert binomial_tail(3, 3, 1.0) == pytest.approx(1.0)


@pytest.mark.parametrize("n,p", [(3, 1.5), (3, -0.5), (-1, 0.5), (-2, 1.5)])
def test_binomial_tail_refuses_impossible_arguments(n, p):
    with pytest.raises(ValueError, match=r"need n >= 0 and 0 <= p <= 1, got n="):
        binomial_tail(1, n, p)


def test_above_chance_on_one_prediction_and_at_the_threshold():
    # 1 of 1 right when the majority class is 1%: P(X >= 1) = 0.01
    above, p_value = above_chance(1, 1, 0.01)
    assert above and p_value == pytest.approx(0.01)
    # 2 of 2 at a rate of 1/2: P = 1/4 exactly, which is not below alpha = 1/4
    assert above_chance(2, 2, 0.5, alpha=0.25) == (False, 0.25)
    for n in (0, -1):
        with pytest.raises(ValueError, match=r"^above_chance needs at least one prediction$"):
            above_chance(0, n, 0.5)


# ---------------------------------------------------------------------------------------------- tables


def test_table_format_names_the_file_it_cannot_read(tmp_path):
    with pytest.raises(ValueError, match=r"cannot tell the format of '.*rows\.txt': name the file"):
        table_format(tmp_path / "rows.txt")


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_rows_round_trip_into_new_folders_with_odd_text(tmp_path, suffix):
    rows = [{"a": 1, "text": "x\r\ny\rz", "w": "é→"}, {"a": 2, "text": "plain", "w": None}]
    path = write_rows(rows, tmp_path / "one" / "two" / f"rows{suffix}")
    assert path.is_file() and read_rows(path) == rows


@pytest.fixture
def ascii_locale():
    """The C locale: files opened without an encoding are ASCII."""
    saved = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        if locale.getencoding().lower().replace("-", "") == "utf8":
            pytest.skip("this platform's C locale is UTF-8")
        yield
    finally:
        locale.setlocale(locale.LC_CTYPE, saved)


def test_csv_tables_are_utf8_whatever_the_locale(tmp_path, ascii_locale):
    rows = [{"code": "é→", "n": 1}]
    path = write_rows(rows, tmp_path / "rows.csv")
    assert read_rows(path) == rows


def test_read_rows_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^no file '.*missing\.csv'$"):
        read_rows(tmp_path / "missing.csv")
    for i, data in enumerate([{"columns": ["a"]}, {"rows": []}, [1, 2], "columns rows"]):
        path = tmp_path / f"bad{i}.json"
        path.write_text(json.dumps(data))
        message = rf"^'.*bad{i}\.json' is not a table written by captum_chefer \(no 'columns' and 'rows'\)$"
        with pytest.raises(ValueError, match=message):
            read_rows(path)


def test_csv_cells_come_back_as_numbers_only_where_written_as_numbers(tmp_path):
    # strings that merely look like numbers (a patient id "007", an ICD-9 code "0389", "1.50") stay strings
    rows = [{"id": "007", "code": "0389", "text": "1.50", "exp": "1e5", "plus": "+3", "n": 12, "neg": -3, "x": 0.1,
             "tiny": 1e-05, "big": 1e300, "nan": "not a number"}]
    path = write_rows(rows, tmp_path / "rows.csv")
    with path.open(newline="", encoding="utf-8") as f:
        assert list(csv.reader(f))[1] == ["007", "0389", "1.50", "1e5", "+3", "12", "-3", "0.1", "1e-05", "1e+300",
                                          "not a number"]
    back = read_rows(path)
    assert back == rows
    assert [type(v) for v in back[0].values()] == [str, str, str, str, str, int, int, float, float, float, str]


def test_an_empty_csv_file_holds_no_rows(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("")
    assert read_rows(path) == []


# ---------------------------------------------------------------------------------------------- fakes


class FakeAdapter(Adapter):
    """An adapter whose inputs are the batch's tensors themselves; it records what it is asked."""

    def __init__(self, keys=("x",), device="cpu"):
        super().__init__()
        self.feature_keys = list(keys)
        self.model = SimpleNamespace(device=torch.device(device))
        self.calls: list[tuple] = []
        self.moves: list[torch.device] = []

    def captum_inputs(self, batch, *, level):
        self.calls.append(("captum_inputs", level))
        ids = tuple(batch[k] for k in self.feature_keys)
        inputs = ids if level == "token" else tuple(t.double() for t in ids)
        return inputs, (batch["extra"],)

    def captum_target(self, batch, *, mode):
        self.calls.append(("captum_target", mode))
        return batch.get("target")

    def token_masks(self, args, tokens):
        self.calls.append(("token_masks", args, tokens))
        return tuple(t != 0 for t in tokens)

    def baselines(self, inputs, args, reference):
        self.calls.append(("baselines", reference))
        return tuple(torch.zeros_like(t) for t in inputs)

    def to_feature_dict(self, attributions):
        assert isinstance(attributions, tuple) and len(attributions) == len(self.feature_keys)
        assert all(isinstance(a, torch.Tensor) for a in attributions)
        return dict(zip(self.feature_keys, attributions, strict=True))

    def decode(self, batch):
        ids = batch[self.feature_keys[0]]
        return [[DecodedToken(self.feature_keys[0], f"c{int(v)}", (j,)) for j, v in enumerate(row) if v] for row in ids]

    def to(self, device):
        self.moves.append(torch.device(device))
        return self


class Recorder(Attribution):
    """Scores = the inputs times ``factor``; records each call's arguments; may warn or return a delta."""

    def __init__(self, forward_func, factor=1.0, warn=()):
        super().__init__(forward_func)
        self.factor, self.warn, self.seen = factor, warn, []

    def attribute(self, inputs, target=None, additional_forward_args=None, **kwargs):
        self.seen.append({"inputs": inputs, "target": target, "args": additional_forward_args, **kwargs})
        for message in self.warn:
            warnings.warn(message, UserWarning, stacklevel=2)
        scores = tuple(t.double() * self.factor for t in inputs)
        return (scores, torch.zeros(len(inputs[0]))) if kwargs.get("return_convergence_delta") else scores


# an IG-like method for the comparison: it is told apart by its class name
FakeIG = type("IntegratedGradients", (Recorder,), {})


class FakeLIG(LayerIntegratedGradients):
    """A token-level method (LayerIntegratedGradients) that records its inputs."""

    def __init__(self, adapter):
        super().__init__(adapter, torch.nn.Identity())
        self.seen = []

    def attribute(self, inputs, target=None, additional_forward_args=None, **kwargs):
        self.seen.append(inputs)
        return tuple(t.double() for t in inputs)


def _batch(ids, target=None, patient_id=None):
    batch = {"x": torch.tensor(ids), "extra": torch.tensor([7.0])}
    if target is not None:
        batch["target"] = torch.tensor(target)
    if patient_id is not None:
        batch["patient_id"] = patient_id
    return batch


class Clock:
    """perf_counter that advances by one second per call."""

    def __init__(self):
        self.ticks = itertools.count()

    def perf_counter(self):
        return float(next(self.ticks))


# ---------------------------------------------------------------------------------------------- methods


def test_callers_are_named_when_the_adapter_is_not_one():
    with pytest.raises(TypeError, match=r"^ig_baselines needs an adapter from captum_chefer\.adapters .*, got int$"):
        ig_baselines(3, (), ())
    with pytest.raises(TypeError, match=r"^compare_methods needs an adapter from captum_chefer\.adapters .*, got str$"):
        compare_methods("model", {}, [])


def test_comparison_lookups_name_methods_and_features():
    comparison = Comparison(
        scores={"A": {"x": torch.zeros(1, 2)}}, seconds_per_sample={"A": 1.0},
        ids={"x": torch.zeros(1, 2)}, masks={"x": torch.ones(1, 2, dtype=torch.bool)},
    )
    with pytest.raises(KeyError, match=r"no method 'B' here; use one of \['A'\]"):
        comparison.scores["B"]
    for table in (comparison.scores["A"], comparison.ids, comparison.masks):
        with pytest.raises(KeyError, match=r"no feature 'y' here; use one of \['x'\]"):
            table["y"]


def test_codes_without_decoded_text_belong_to_their_own_sample():
    # sample 0 has codes at positions 0 and 1, sample 1 only at position 1
    comparison = Comparison(
        scores={"A": {"x": torch.tensor([[1.0, 2.0], [0.0, 3.0]])}}, seconds_per_sample={"A": 1.0},
        ids={"x": torch.tensor([[5, 6], [0, 8]])}, masks={"x": torch.tensor([[True, True], [False, True]])},
    )
    rows = [(r["sample"], r["position"], r["code"], r["score"]) for r in comparison.code_rows()]
    assert rows == [(0, 0, "#5", 1.0), (0, 1, "#6", 2.0), (1, 1, "#8", 3.0)]


def test_compare_methods_asks_the_adapter_for_each_level_and_passes_the_pieces_on():
    adapter = FakeAdapter()
    method = Recorder(adapter)
    batch = _batch([[1, 2, 0]], target=[1])
    result = compare_methods(adapter, batch, [method], target_mode="label", baseline="zero", progress=False)
    assert ("captum_inputs", "embedding") in adapter.calls and ("captum_inputs", "token") in adapter.calls
    assert ("captum_target", "label") in adapter.calls
    (masks_call,) = [c for c in adapter.calls if c[0] == "token_masks"]
    assert masks_call[1] == (batch["extra"],) and masks_call[2] == (batch["x"],)
    (seen,) = method.seen
    assert seen["inputs"][0].dtype == torch.float64 and seen["target"].tolist() == [1]
    assert result.scores["Recorder"]["x"].tolist() == [[1.0, 2.0, 0.0]] and result.targets.tolist() == [1]


def test_compare_methods_refuses_bad_modes_and_empty_data():
    adapter = FakeAdapter()
    with pytest.raises(ValueError, match=r"^target_mode must be 'predicted' or 'label', got 'true'$"):
        compare_methods(adapter, _batch([[1]]), [Recorder(adapter)], target_mode="true")
    with pytest.raises(ValueError, match=r"^baseline must be 'unk' or 'zero', got 'one'$"):
        compare_methods(adapter, _batch([[1]]), [Recorder(adapter)], baseline="one")
    with pytest.raises(ValueError, match=r"^data holds no samples$"):
        compare_methods(adapter, [], [Recorder(adapter)], progress=False)
    with pytest.raises(TypeError, match=r"got an item of type int$"):
        compare_methods(adapter, [1, 2], [Recorder(adapter)], progress=False)


def test_compare_methods_times_per_sample_with_a_clock(monkeypatch):
    # each attribute call takes one tick (one second): two batches of 2 and 1 samples, 2 s over 3 samples
    monkeypatch.setattr(methods, "time", Clock())
    adapter = FakeAdapter()
    result = compare_methods(adapter, [_batch([[1, 2], [3, 0]]), _batch([[4]])], [Recorder(adapter)], progress=False)
    assert result.seconds_per_sample == {"Recorder": pytest.approx(2 / 3)}
    assert result.n_samples == 3
    # padded to the longest batch: the second batch's sample gets a zero in position 1
    assert result.ids["x"].tolist() == [[1, 2], [3, 0], [4, 0]]


def test_a_single_sample_is_enough():
    adapter = FakeAdapter()
    result = compare_methods(adapter, [_batch([[5]])], [Recorder(adapter)], progress=False)
    assert result.n_samples == 1 and result.scores["Recorder"]["x"].tolist() == [[5.0]]


def test_compare_methods_progress_bar_settings(monkeypatch):
    import tqdm

    seen = {}

    def fake_tqdm(data, **kwargs):
        seen.update(kwargs)
        return data

    monkeypatch.setattr(tqdm, "tqdm", fake_tqdm)
    adapter = FakeAdapter()
    compare_methods(adapter, [_batch([[1]])], [Recorder(adapter)])
    assert seen == {"desc": "compare_methods", "unit": "batch"}


def test_batch_patient_ids():
    assert batch_patient_ids({"patient_id": ["a", None, 3]}, 3) == ["a", None, "3"]
    assert batch_patient_ids({"patient_id": ["a"]}, 2) == [None, None]
    assert batch_patient_ids({}, 2) == [None, None]
    assert batch_patient_ids({"patient_id": "ab"}, 2) == [None, None]


def test_attribute_batch_baselines_from_the_reference_unless_given():
    adapter = FakeAdapter()
    inputs = (torch.tensor([[1.0, 2.0]]),)
    ig = FakeIG(adapter)
    mine = (torch.full((1, 2), 0.5),)
    attribute_batch(adapter, ig, {"baselines": mine}, inputs, inputs, (), (torch.ones(1, 2, dtype=torch.bool),),
                    None, "zero", {"m": 0.0}, "m")
    assert ig.seen[0]["baselines"] is mine and not [c for c in adapter.calls if c[0] == "baselines"]
    attribute_batch(adapter, ig, {}, inputs, inputs, (), (torch.ones(1, 2, dtype=torch.bool),), None, "zero",
                    {"m": 0.0}, "m")
    assert ("baselines", "zero") in adapter.calls and ig.seen[1]["baselines"][0].tolist() == [[0.0, 0.0]]


def test_attribute_batch_hides_only_captums_requires_grad_note():
    adapter = FakeAdapter()
    inputs = (torch.tensor([[1.0]]),)
    method = Recorder(adapter, warn=("Input Tensor 0 did not already require gradients, required_grads has been set "
                                     "automatically.", "something else"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attribute_batch(adapter, method, {}, inputs, inputs, (), (torch.ones(1, 1, dtype=torch.bool),), None, "unk",
                        {"m": 0.0}, "m")
    assert [str(w.message) for w in caught] == ["something else"]


def test_attribute_batch_adds_its_time_and_drops_the_convergence_delta(monkeypatch):
    monkeypatch.setattr(methods, "time", Clock())
    adapter = FakeAdapter()
    inputs = (torch.tensor([[1.0, 2.0]]),)
    seconds = {"m": 5.0}
    out = attribute_batch(adapter, Recorder(adapter, factor=3.0), {"return_convergence_delta": True}, inputs, inputs,
                          (), (torch.tensor([[True, False]]),), None, "unk", seconds, "m")
    assert seconds == {"m": 6.0}  # one tick added to what was there
    assert out["x"].tolist() == [[3.0, 0.0]]  # the scores, masked; not the delta


def test_attribute_batch_keeps_two_scores_without_a_delta():
    adapter = FakeAdapter(keys=("x", "y"))
    inputs = (torch.tensor([[1.0]]), torch.tensor([[2.0]]))
    masks = (torch.ones(1, 1, dtype=torch.bool),) * 2
    out = attribute_batch(adapter, Recorder(adapter), {}, inputs, inputs, (), masks, None, "unk", {"m": 0.0}, "m")
    assert out["x"].tolist() == [[1.0]] and out["y"].tolist() == [[2.0]]


def test_masked_feature_dict_shape_error_and_lookup():
    adapter = FakeAdapter()
    with pytest.raises(ValueError, match=r"^scores for 'x' have shape \(2, 3\), the codes \(2, 2\)$"):
        masked_feature_dict(adapter, (torch.zeros(2, 3),), (torch.ones(2, 2, dtype=torch.bool),))
    out = masked_feature_dict(adapter, (torch.ones(1, 2),), (torch.tensor([[True, False]]),))
    assert out["x"].tolist() == [[1.0, 0.0]]
    with pytest.raises(KeyError, match=r"no feature 'y' here"):
        out["y"]


def test_method_specs_refuses_what_is_not_a_list_of_methods():
    adapter = FakeAdapter()
    method = Recorder(adapter)
    for methods_arg in ("Saliency", {method}, method):
        with pytest.raises(TypeError, match=r"^methods must be a list of Captum attribution objects or \(name, "
                                            r"method\[, kwargs\]\) tuples$"):
            method_specs(adapter, methods_arg)
    with pytest.raises(ValueError, match=r"^methods is empty; pass at least one Captum attribution object$"):
        method_specs(adapter, [])
    for item in (["name", method], ("name",), ("name", "method"), ("a", method, {}, 1)):
        with pytest.raises(TypeError, match=r"^each method must be a Captum attribution object or a"):
            method_specs(adapter, [item])


def test_method_specs_accepts_pairs_and_triples():
    adapter = FakeAdapter()
    method = Recorder(adapter)
    specs = method_specs(adapter, [("pair", method), ("triple", method, {"n": 1})])
    assert specs == [("pair", method, {}), ("triple", method, {"n": 1})]


def test_method_specs_names_the_wrong_adapter_and_forbidden_kwargs():
    adapter, other = FakeAdapter(), FakeAdapter()
    with pytest.raises(ValueError, match=r"^method 'Recorder' wraps FakeAdapter, not this adapter; build every method "
                                         r"on the same adapter, e\.g\. IntegratedGradients\(adapter\)$"):
        method_specs(adapter, [Recorder(other)])
    for forbidden in ("inputs", "target", "additional_forward_args"):
        with pytest.raises(ValueError, match=rf"^'m': compare_methods sets '{forbidden}' itself; remove it from the "
                                             "kwargs$"):
            method_specs(adapter, [("m", Recorder(adapter), {forbidden: None})])


@pytest.fixture
def alarm():
    """Fail a test that runs for more than 5 s (a loop that never ends) instead of hanging."""

    def stop(signum, frame):
        raise TimeoutError("ran for more than 5 s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(5)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_method_specs_numbers_repeated_names(alarm):
    adapter = FakeAdapter()
    a, b, c = Recorder(adapter), Recorder(adapter), Recorder(adapter)
    assert [s[0] for s in method_specs(adapter, [a, b, c])] == ["Recorder", "Recorder #2", "Recorder #3"]
    names = [s[0] for s in method_specs(adapter, [("Recorder #2", a), b, c])]
    assert names == ["Recorder #2", "Recorder", "Recorder #3"]


def test_noise_tunnel_around_ig_is_ig_like():
    adapter = FakeAdapter()
    assert is_ig_like(NoiseTunnel(IntegratedGradients(adapter))) and is_ig_like(IntegratedGradients(adapter))
    assert not is_ig_like(NoiseTunnel(Saliency(adapter)))


def test_cat_padded_pads_every_code_dimension():
    flat = _cat_padded([{"x": torch.ones(1, 2)}, {"x": torch.ones(1, 3)}])
    assert flat["x"].tolist() == [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
    nested = _cat_padded([{"x": torch.ones(1, 1, 2)}, {"x": torch.ones(1, 2, 1)}])
    assert nested["x"].tolist() == [[[1.0, 1.0], [0.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]]
    for result in (flat, nested, _cat_padded([])):
        with pytest.raises(KeyError, match=r"no feature 'y' here"):
            result["y"]


def test_evaluator_method_settings_and_errors():
    adapter = FakeAdapter()
    evaluator = EvaluatorMethod(adapter, Recorder(adapter), target_mode="label")
    assert evaluator.name == "Recorder" and evaluator.target_mode == "label"
    with pytest.raises(ValueError, match=r"^'method': compare_methods sets 'target' itself"):
        EvaluatorMethod(adapter, Recorder(adapter), target=1)
    with pytest.raises(ValueError, match=r"^target_mode must be 'predicted' or 'label', got 'true'$"):
        EvaluatorMethod(adapter, Recorder(adapter), target_mode="true")


def test_evaluator_method_attribute_asks_the_adapter_and_returns_on_the_models_device():
    adapter = FakeAdapter(device="meta")
    method = FakeLIG(adapter)
    batch = _batch([[1, 2, 0]], target=[0])
    scores = EvaluatorMethod(adapter, method, target_mode="label").attribute(**batch)
    assert ("captum_inputs", "embedding") in adapter.calls and ("captum_inputs", "token") in adapter.calls
    assert ("captum_target", "label") in adapter.calls
    (masks_call,) = [c for c in adapter.calls if c[0] == "token_masks"]
    assert masks_call[1] == (batch["extra"],) and masks_call[2] == (batch["x"],)
    (inputs,) = method.seen
    assert inputs[0] is batch["x"]  # the token-level method gets the code ids
    assert scores["x"].device.type == "meta"


# ---------------------------------------------------------------------------------------------- run_comparison


class Recorded:
    """A stand-in for a function: records its calls and returns ``result``."""

    def __init__(self, result=None):
        self.result, self.calls = result, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.result


@pytest.fixture
def driver(monkeypatch):
    """run_comparison's collaborators replaced by recorders; a clock that reads 10.0 then 12.26."""
    check = SimpleNamespace(describe=lambda: "fine")
    fakes = SimpleNamespace(
        specs=[("S", object(), {})], evaluation=object(), check=check, files={"report": "r.html"},
    )
    fakes.default_methods = Recorded(fakes.specs)
    fakes.evaluate_methods = Recorded(fakes.evaluation)
    fakes.check_model = Recorded(check)
    fakes.write_report = Recorded(fakes.files)
    fakes.warn = Recorded()
    for name in ("default_methods", "evaluate_methods", "check_model", "write_report"):
        monkeypatch.setattr(report, name, getattr(fakes, name))
    monkeypatch.setattr(report, "warn_if_chance_level", fakes.warn)
    monkeypatch.setattr(report, "time", SimpleNamespace(perf_counter=iter([10.0, 12.26]).__next__))
    return fakes


class Linear:
    """The model the adapter wraps: only its class name is read."""


class ReportAdapter(FakeAdapter):
    def __init__(self, parameter_device=None):
        super().__init__(keys=("a", "b"))
        self.model = Linear()  # not an nn.Module: the adapter has parameters only when asked for one
        if parameter_device is not None:
            self.w = torch.nn.Parameter(torch.empty(1, device=parameter_device))


def test_run_comparison_forwards_its_defaults(driver, tmp_path):
    adapter = ReportAdapter()
    batch = {"x": torch.zeros(1, 1)}
    result = run = report.run_comparison(adapter, batch, out=tmp_path)
    assert driver.default_methods.calls == [((adapter,), {"ig_steps": 50, "nt_samples": 10, "seed": 0})]
    assert driver.evaluate_methods.calls == [((adapter, batch, driver.specs), {
        "ground_truth": None, "fractions": DEFAULT_FRACTIONS, "percentages": DEFAULT_PERCENTAGES,
        "target_mode": "predicted", "infidelity_samples": 10, "sensitivity_samples": 3, "sensitivity_max_batch": 16,
        "seed": 0, "progress": True})]
    assert driver.check_model.calls == [((adapter, batch), {})]
    settings = {"model": "Linear", "feature keys": "a, b", "model on the explained patients": "fine", "device": "cpu",
                "evaluation seconds": pytest.approx(2.3)}
    assert run.settings == settings and type(run.settings["evaluation seconds"]) is float
    assert driver.warn.calls == [((driver.check,), {"stacklevel": 2})]
    assert driver.write_report.calls == [((tmp_path, adapter, driver.evaluation, batch, driver.specs), {
        "title": "Chefer relevance side by side", "settings": settings, "ground_truth": None, "show_patients": 4,
        "target_mode": "predicted", "describe_patient": None, "model_check": driver.check, "cohort": None})]
    assert result.evaluation is driver.evaluation and result.model_check is driver.check
    assert result.files == driver.files


def test_run_comparison_forwards_what_it_is_given(driver, tmp_path):
    adapter = ReportAdapter()
    batches = [{"x": torch.zeros(1, 1)}, {"x": torch.ones(1, 1)}]
    truth, describe, cohort = (lambda b: {}), (lambda b, i: ""), object()
    run = report.run_comparison(
        adapter, batches, ground_truth=truth, out=tmp_path, title="T", show_patients=2, ig_steps=7, nt_samples=3,
        infidelity_samples=5, sensitivity_samples=2, sensitivity_max_batch=4, fractions=(0.0, 1.0), percentages=(10,),
        target_mode="label", settings={"device": "mine", "x": 1}, describe_patient=describe, seed=5, progress=False,
        cohort=cohort,
    )
    assert driver.default_methods.calls == [((adapter,), {"ig_steps": 7, "nt_samples": 3, "seed": 5})]
    assert driver.evaluate_methods.calls == [((adapter, batches, driver.specs), {
        "ground_truth": truth, "fractions": (0.0, 1.0), "percentages": (10,), "target_mode": "label",
        "infidelity_samples": 5, "sensitivity_samples": 2, "sensitivity_max_batch": 4, "seed": 5, "progress": False})]
    settings = {"device": "mine", "x": 1, "model": "Linear", "feature keys": "a, b",
                "model on the explained patients": "fine", "evaluation seconds": pytest.approx(2.3)}
    assert run.settings == settings
    assert driver.write_report.calls == [((tmp_path, adapter, driver.evaluation, batches[0], driver.specs), {
        "title": "T", "settings": settings, "ground_truth": truth, "show_patients": 2, "target_mode": "label",
        "describe_patient": describe, "model_check": driver.check, "cohort": cohort})]


def test_run_comparison_uses_the_methods_given(driver):
    adapter = ReportAdapter()
    mine = (("M", object(), {}),)
    report.run_comparison(adapter, {"x": torch.zeros(1)}, methods=mine)
    assert driver.default_methods.calls == [] and driver.write_report.calls == []
    assert driver.evaluate_methods.calls[0][0][2] == list(mine)


def test_run_comparison_without_a_model_check_or_parameters(driver):
    driver.check_model.result = None
    run = report.run_comparison(ReportAdapter(), {"x": torch.zeros(1)})
    assert run.settings == {"model": "Linear", "feature keys": "a, b", "device": "cpu",
                            "evaluation seconds": pytest.approx(2.3)}
    assert run.model_check is None and driver.warn.calls == [((None,), {"stacklevel": 2})]


def test_run_comparison_moves_the_model_for_the_run_and_back(driver):
    adapter = ReportAdapter(parameter_device="meta")
    run = report.run_comparison(adapter, {"x": torch.zeros(1)}, device="cpu")
    assert adapter.moves == [torch.device("cpu"), torch.device("meta")]
    assert run.settings["device"] == "meta"  # FakeAdapter.to moves nothing: the parameter stays where it was


def test_device_checks_the_cuda_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert report._device("cuda") == torch.device("cuda")
    assert report._device("cuda:1") == torch.device("cuda", 1)
    for index in (2, 5):
        with pytest.raises(ValueError, match=rf"^device 'cuda:{index}': torch sees 2 CUDA device\(s\), 0 to 1$"):
            report._device(f"cuda:{index}")
