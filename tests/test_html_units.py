"""Unit tests of the HTML and text-table writers, on inputs built by hand (no PyHealth, no training).

What is tested (the mutation part ``html`` of setup.cfg): in ``captum_chefer/report.py`` the headline
table and its helpers (``_leaders``, ``_header``, ``_cell``, ``_table_note``, ``_isnan``, ``_num``),
``ComparisonReport``, the patient helpers (``_select``, ``_pick_patients``, ``_patient_rows``),
``write_report``, ``cohort_section`` and ``cohort_page``; in ``captum_chefer/visualization.py``
``render_html``, ``write_html``, ``records_by_method``, ``_group_by_method``, ``render_methods_html``,
``write_methods_html`` and ``_legend``.

Evaluations are built from tiny tensors whose intervals can be worked out by hand: a column of equal values
has a zero-width bootstrap interval (marked with a dagger), ``k`` of ``n`` zeros and ones have Wilson's
interval (with z^2 = 3.841459: 3 of 3 reaches down to 3 / (3 + z^2) = 0.439, 2 of 2 to 0.342, 0 of 2 up to
z^2 / (2 + z^2) = 0.658), and the bootstrap of [0, 0, 3] with seed 0 is [0, 3] (see ``bootstrap_interval``).
``write_report`` runs once per module on a bag-of-embeddings model behind ``TransformerAdapter``.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import re
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from captum.attr import Saliency
from captum.attr import visualization as captum_viz
from torch import nn

from captum_chefer import report as report_module
from captum_chefer.adapters.base import DecodedToken, MethodRecord
from captum_chefer.adapters.torch import TransformerAdapter
from captum_chefer.comparison import Evaluation, ModelCheck, RandomAttribution
from captum_chefer.report import (
    ComparisonReport,
    _cell,
    _header,
    _isnan,
    _leaders,
    _num,
    _patient_rows,
    _pick_patients,
    _select,
    _table_note,
    cohort_page,
    cohort_section,
    headline_table,
    write_report,
)
from captum_chefer.visualization import (
    _group_by_method,
    _legend,
    records_by_method,
    render_html,
    render_methods_html,
    write_html,
    write_methods_html,
)

NAN = math.nan
# Captum's colours (captum.attr.visualization._get_color): > 0 green, lightness 100 - int(50 x); else red,
# lightness 100 - int(-40 x).
WHITE, GREEN, RED = "hsl(0, 75%, 100%)", "hsl(120, 75%, 50%)", "hsl(0, 75%, 60%)"

NOTE_INTERVALS = (
    "Means over n = 3 patients; [low, high]: 95% interval over patients, Wilson's score interval where every "
    "patient's value is 0 or 1 (a share of patients), else the percentile bootstrap (2000 resamples, seed 0)"
)
NOTE_DAGGER = ("; †: every patient has the same value, so the bootstrap has no spread to resample and the interval's "
               "zero width is no certainty")
NOTE_MARK = (": the best mean of a column (Random excluded), marked only where the bootstrap interval of its paired "
             "difference to the runner-up, on the same patients, lies above zero.")
NOTE_TIME = " Time is one measurement."


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def three_methods() -> Evaluation:
    """Three patients. Deletion AOPC: Alpha 0.2 and Beta 0.1 on every patient, so the paired difference is 0.1
    on every resample: Alpha is clearly best (Random's 0.5 does not count). AUROC: Alpha 1, 1, 1 (Wilson 3 of 3:
    [0.439, 1]) and Beta 0, 0, 3 (mean 1 too, bootstrap [0, 3]): a tie, no mark. Sufficiency: NaN everywhere,
    so no column. Time: 2 ms, 0.5 ms, 0.1 ms."""
    per_sample = {
        "Alpha": {"deletion_aopc": _t(0.2, 0.2, 0.2), "auroc": _t(1, 1, 1), "sufficiency": _t(NAN, NAN, NAN)},
        "Beta": {"deletion_aopc": _t(0.1, 0.1, 0.1), "auroc": _t(0, 0, 3), "sufficiency": _t(NAN, NAN, NAN)},
        "Random": {"deletion_aopc": _t(0.5, 0.5, 0.5), "auroc": _t(0.5, 0.5, 0.5), "sufficiency": _t(NAN, NAN, NAN)},
    }
    return Evaluation(per_sample, {}, (0.0, 1.0), (0.1,), {"Alpha": 0.002, "Beta": 0.0005, "Random": 0.0001})


# ---------------------------------------------------------------------------------------------- numbers


def test_isnan_is_true_only_for_float_nan():
    assert _isnan(NAN) is True
    assert _isnan(1.0) is False and _isnan(math.inf) is False
    assert _isnan("nan") is False and _isnan(None) is False  # not floats: no math.isnan call


@pytest.mark.parametrize(("value", "digits", "text"), [
    (1.23456, 3, "1.235"),
    (1.23456, 2, "1.23"),
    (7, 3, "7.000"),  # an int is a number
    (0, 3, "0.000"),  # zero is not "small"
    (0.001, 3, "0.001"),  # exactly 10^-3: fixed point
    (0.0009, 3, "9.00e-04"),  # below 10^-3: digits - 1 decimals in exponent form
    (0.0005, 3, "5.00e-04"),
    (-0.0005, 3, "-5.00e-04"),  # the size counts, not the sign
    (0.005, 2, "5.0e-03"),  # below 10^-2
    (12.5, 1, "12.5"),
    (NAN, 3, "n/a"),
    (None, 3, "n/a"),
    ("0.5", 3, "n/a"),  # text is not a number
])
def test_num_formats_fixed_point_small_values_in_exponent_form_and_non_numbers_as_na(value, digits, text):
    assert _num(value, digits) == text


def test_num_has_three_digits_by_default():
    assert _num(2 / 3) == "0.667" and _num(0.0001234) == "1.23e-04"


# ---------------------------------------------------------------------------------------------- leaders, headers, cells


def test_leaders_keep_only_clear_columns_and_skip_metrics_without_values():
    evaluation = three_methods()
    # sufficiency has no value (ValueError) and "bogus" is unknown (KeyError): both skipped, the loop goes on
    assert _leaders(evaluation, ["sufficiency", "bogus", "deletion_aopc", "auroc", "seconds_per_sample"]) == {
        "deletion_aopc": "Alpha"}  # auroc is a tie, time is never marked
    assert _leaders(evaluation, []) == {}


def test_header_counts_patients_only_when_fewer_than_the_total():
    per = {"A": {"auroc": _t(0.2, 0.4, NAN, 0.6), "infidelity": _t(0.1, 0.2, 0.3, 0.4)},
           "B": {"auroc": _t(NAN, 0.5, NAN, 0.9), "infidelity": _t(0.1, 0.2, 0.3, 0.5)},
           "C": {"infidelity": _t(1.0, 2.0, 3.0, 4.0)}}  # C has no auroc at all: not counted, not asked
    evaluation = Evaluation(per, {}, (), ())
    assert _header(evaluation, "auroc", "AUROC ↑", 4) == "AUROC ↑ (n=3)"  # the largest count, A's 3
    assert _header(evaluation, "infidelity", "Infidelity ↓", 4) == "Infidelity ↓"  # every method has all 4
    assert _header(evaluation, "infidelity", "Infidelity ↓", 5) == "Infidelity ↓ (n=4)"


def test_header_of_the_time_column_is_its_label_whatever_the_counts():
    evaluation = Evaluation({"A": {"seconds_per_sample": _t(1.0, NAN)}}, {}, (), ())
    assert _header(evaluation, "seconds_per_sample", "ms / sample ↓", 2) == "ms / sample ↓"


def test_cell_shows_time_in_milliseconds_without_interval_or_mark():
    evaluation = three_methods()
    row = {"method": "Alpha", "seconds_per_sample": 0.00125}
    assert _cell(evaluation, row, "seconds_per_sample", 3, True, True, True) == "1.250"  # 0.00125 s = 1.25 ms
    assert _cell(evaluation, row, "seconds_per_sample", 2, True, False, False) == "1.25"
    assert _cell(evaluation, {"method": "Alpha"}, "seconds_per_sample", 3, True, False, False) == "n/a"


def test_cell_marks_the_best_with_bold_or_a_star_and_appends_the_interval():
    evaluation = three_methods()
    row = {"method": "Alpha", "deletion_aopc": 0.2, "auroc": 1.0}
    assert _cell(evaluation, row, "deletion_aopc", 3, True, True, True) == "**0.200** [0.200, 0.200]†"
    assert _cell(evaluation, row, "deletion_aopc", 3, True, True, False) == "0.200* [0.200, 0.200]†"
    assert _cell(evaluation, row, "deletion_aopc", 3, False, True, False) == "0.200*"
    assert _cell(evaluation, row, "deletion_aopc", 3, False, False, True) == "0.200"
    assert _cell(evaluation, row, "auroc", 2, True, False, False) == "1.00 [0.44, 1.00]"  # Wilson 3 of 3, 2 digits
    beta = {"method": "Beta", "auroc": 1.0}
    assert _cell(evaluation, beta, "auroc", 3, True, False, True) == "1.000 [0.000, 3.000]"  # bootstrap of 0, 0, 3
    # a metric the method lacks: n/a and no interval
    assert _cell(evaluation, {"method": "Alpha"}, "infidelity", 3, True, False, False) == "n/a"


def test_table_note_sentences():
    evaluation = three_methods()
    metrics = ["deletion_aopc", "auroc"]
    assert _table_note(evaluation, True, "*", True, metrics) == NOTE_INTERVALS + NOTE_DAGGER + ". A star" + NOTE_MARK + NOTE_TIME
    assert _table_note(evaluation, True, "bold", False, metrics) == NOTE_INTERVALS + NOTE_DAGGER + ". Bold" + NOTE_MARK
    assert _table_note(evaluation, False, "*", True, metrics) == "Means over n = 3 patients. A star" + NOTE_MARK + NOTE_TIME
    # by default: time is mentioned, and no metric is looked at for zero-width intervals
    assert _table_note(evaluation, True, "*") == NOTE_INTERVALS + ". A star" + NOTE_MARK + NOTE_TIME
    # only Beta's auroc [0, 3]: no zero-width interval, no dagger sentence
    assert NOTE_DAGGER not in _table_note(Evaluation({"Beta": {"auroc": _t(0, 0, 3)}}, {}, (), ()), True, "*", True, ["auroc"])


def test_table_note_reads_the_level_resamples_and_seed_of_the_evaluation():
    evaluation = Evaluation({"A": {"auroc": _t(0.1, 0.5)}}, {}, (), (), level=0.9, n_resamples=500, seed=7)
    assert _table_note(evaluation, True, "*", False, ["auroc"]).startswith(
        "Means over n = 2 patients; [low, high]: 90% interval over patients,")
    assert "(500 resamples, seed 7). A star:" in _table_note(evaluation, True, "*", False, ["auroc"])


# ---------------------------------------------------------------------------------------------- the headline table

# Worked out from three_methods(): columns Deletion AOPC (width of its widest cell, Alpha's, 22), AUROC (Random's
# cell, 21) and time (its label, 13); cells padded with spaces, two spaces between columns.
TEXT_LINES = [
    "Method  Deletion AOPC ↑         AUROC ↑                ms / sample ↓",
    "Alpha   0.200* [0.200, 0.200]†  1.000 [0.439, 1.000]   2.000        ",
    "Beta    0.100 [0.100, 0.100]†   1.000 [0.000, 3.000]   0.500        ",
    "Random  0.500 [0.500, 0.500]†   0.500 [0.500, 0.500]†  0.100        ",
]


def test_headline_text_table_line_by_line():
    lines = headline_table(three_methods()).split("\n")
    assert lines[:4] == TEXT_LINES
    assert lines[4:] == [NOTE_INTERVALS + NOTE_DAGGER + ". A star" + NOTE_MARK + NOTE_TIME]


def test_headline_markdown_table_line_by_line():
    table = headline_table(three_methods(), markdown=True)
    assert table.split("\n") == [
        "| Method | Deletion AOPC ↑ | AUROC ↑ | ms / sample ↓ |",
        "|---|---:|---:|---:|",
        "| Alpha | **0.200** [0.200, 0.200]† | 1.000 [0.439, 1.000] | 2.000 |",
        "| Beta | 0.100 [0.100, 0.100]† | 1.000 [0.000, 3.000] | 0.500 |",
        "| Random | 0.500 [0.500, 0.500]† | 0.500 [0.500, 0.500]† | 0.100 |",
        "",
        NOTE_INTERVALS + NOTE_DAGGER + ". Bold" + NOTE_MARK + NOTE_TIME,
    ]


def test_headline_without_intervals_or_time_and_with_two_digits():
    table = headline_table(three_methods(), markdown=True, digits=2, intervals=False, time=False)
    assert table.split("\n") == [
        "| Method | Deletion AOPC ↑ | AUROC ↑ |",
        "|---|---:|---:|",
        "| Alpha | **0.20** | 1.00 |",
        "| Beta | 0.10 | 1.00 |",
        "| Random | 0.50 | 0.50 |",
        "",
        "Means over n = 3 patients. Bold" + NOTE_MARK,
    ]
    text = headline_table(three_methods(), intervals=False, time=False).split("\n")
    assert text[:2] == ["Method  Deletion AOPC ↑  AUROC ↑", "Alpha   0.200*           1.000  "]


def test_headline_with_only_the_time_column_and_a_method_missing_a_metric():
    per = {"A": {"infidelity": _t(0.25, 0.25)}, "B": {"auroc": _t(NAN, NAN)}}
    evaluation = Evaluation(per, {}, (), (), {"A": 0.001, "B": 0.003})
    lines = headline_table(evaluation, intervals=False).split("\n")
    # B's AUROC is NaN everywhere: no AUROC column. A's infidelity is its only value (no runner-up: no star).
    assert lines[:3] == ["Method  Infidelity ↓  ms / sample ↓", "A       0.250         1.000        ",
                         "B       n/a           3.000        "]
    only_time = headline_table(Evaluation({"A": {}}, {}, (), (), {"A": 0.004}), intervals=False).split("\n")
    assert only_time[:2] == ["Method  ms / sample ↓", "A       4.000        "]
    assert headline_table(Evaluation({"A": {}}, {}, (), (), {"A": 0.004}), time=False).split("\n")[:2] == ["Method", "A     "]


@pytest.mark.xfail(strict=True, raises=TypeError, reason="headline_table of an evaluation without methods: "
                   "max(len('Method')) of no rows raises TypeError; Evaluation.table returns its header instead")
def test_headline_of_an_evaluation_without_methods_is_its_header_and_note():
    lines = headline_table(Evaluation({}, {}, (), ())).split("\n")
    assert lines[0] == "Method"


def test_comparison_report_table_passes_its_options_through():
    evaluation = three_methods()
    report = ComparisonReport(evaluation)
    assert report.table() == "\n".join(TEXT_LINES + [NOTE_INTERVALS + NOTE_DAGGER + ". A star" + NOTE_MARK + NOTE_TIME])
    assert report.table(markdown=True, intervals=False, time=False) == "\n".join([
        "| Method | Deletion AOPC ↑ | AUROC ↑ |", "|---|---:|---:|", "| Alpha | **0.200** | 1.000 |",
        "| Beta | 0.100 | 1.000 |", "| Random | 0.500 | 0.500 |", "", "Means over n = 3 patients. Bold" + NOTE_MARK])
    assert report.table(intervals=False).split("\n")[1] == "Alpha   0.200*           1.000    2.000        "


def test_comparison_report_html_path_is_the_report_file():
    assert ComparisonReport(three_methods()).html_path is None
    report = ComparisonReport(three_methods(), files={"csv": Path("r/results.csv"), "report": Path("r/report.html")})
    assert report.html_path == Path("r/report.html")
