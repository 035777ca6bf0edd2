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
import json
import math
import re
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

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
    full = NOTE_INTERVALS + NOTE_DAGGER + ". A star" + NOTE_MARK + NOTE_TIME
    assert _table_note(evaluation, True, "*", True, metrics) == full
    assert _table_note(evaluation, True, "bold", False, metrics) == NOTE_INTERVALS + NOTE_DAGGER + ". Bold" + NOTE_MARK
    without_intervals = "Means over n = 3 patients. A star" + NOTE_MARK + NOTE_TIME
    assert _table_note(evaluation, False, "*", True, metrics) == without_intervals
    # by default: time is mentioned, and no metric is looked at for zero-width intervals
    assert _table_note(evaluation, True, "*") == NOTE_INTERVALS + ". A star" + NOTE_MARK + NOTE_TIME
    # only Beta's auroc [0, 3]: no zero-width interval, no dagger sentence
    beta = Evaluation({"Beta": {"auroc": _t(0, 0, 3)}}, {}, (), ())
    assert NOTE_DAGGER not in _table_note(beta, True, "*", True, ["auroc"])


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
    no_column = headline_table(Evaluation({"A": {}}, {}, (), (), {"A": 0.004}), time=False)
    assert no_column.split("\n")[:2] == ["Method", "A     "]


def test_headline_of_an_evaluation_without_methods_is_its_header_and_note():
    lines = headline_table(Evaluation({}, {}, (), ())).split("\n")
    assert lines[0] == "Method"
    assert len(lines) == 2 and lines[1].startswith("Means over n = 0 patients")


def test_comparison_report_table_passes_its_options_through():
    evaluation = three_methods()
    report = ComparisonReport(evaluation)
    assert report.table() == "\n".join([*TEXT_LINES, NOTE_INTERVALS + NOTE_DAGGER + ". A star" + NOTE_MARK + NOTE_TIME])
    assert report.table(markdown=True, intervals=False, time=False) == "\n".join([
        "| Method | Deletion AOPC ↑ | AUROC ↑ |", "|---|---:|---:|", "| Alpha | **0.200** | 1.000 |",
        "| Beta | 0.100 | 1.000 |", "| Random | 0.500 | 0.500 |", "", "Means over n = 3 patients. Bold" + NOTE_MARK])
    assert report.table(intervals=False).split("\n")[1] == "Alpha   0.200*           1.000    2.000        "


def test_comparison_report_html_path_is_the_report_file():
    assert ComparisonReport(three_methods()).html_path is None
    report = ComparisonReport(three_methods(), files={"csv": Path("r/results.csv"), "report": Path("r/report.html")})
    assert report.html_path == Path("r/report.html")


# ------------------------------------------------------------------------------------- visualization: one method

LEGEND = (
    '<div style="border-top:1px solid;margin-top:5px;padding-top:5px"><b>Legend: </b>'
    '<span style="display:inline-block;width:10px;height:10px;border:1px solid;background-color:hsl(0, 75%, 60%)">'
    '</span> Negative &nbsp;'
    '<span style="display:inline-block;width:10px;height:10px;border:1px solid;background-color:hsl(0, 75%, 100%)">'
    '</span> Neutral &nbsp;'
    '<span style="display:inline-block;width:10px;height:10px;border:1px solid;background-color:hsl(120, 75%, 50%)">'
    '</span> Positive &nbsp;'
    '</div>'
)
STYLE = "<style>body{font-family:sans-serif} td,th{padding:4px;vertical-align:top;text-align:left}</style>"
HEAD_ROW = ("<tr><th>True Label</th><th>Predicted Label</th><th>Attribution Label</th><th>Attribution Score</th>"
            "<th>Word Importance</th></tr>")


def _classname(text: str) -> str:
    return f'<td><text style="padding-right:2em"><b>{text}</b></text></td>'


def _colours(fragment: str) -> list[str]:
    return re.findall(r"background-color: (hsl\([^)]*\))", fragment)


def one_record() -> captum_viz.VisualizationDataRecord:
    # float64 scores: 0.7 in float32 is 0.69999999, so its green is 100 - int(34.99) = 66%, not 65%
    return captum_viz.VisualizationDataRecord(
        torch.tensor([0.0, 1.0, -0.5, 0.7], dtype=torch.float64), 0.876, "1", "<t>", "1 & x", 1.234,
        ["<cond>", "a<b", "x&y", "z"], None)


def test_legend_has_captums_three_colours_in_order():
    assert _legend() == LEGEND


def test_render_html_page_exactly():
    record = one_record()
    # words escaped, "<cond>" shown as "#cond"; colours: 0 white, 1 full green, -0.5 red at 80%, 0.7 green at 66%
    words = captum_viz.format_word_importances(["#cond", "a&lt;b", "x&amp;y", "z"], [0.0, 1.0, -0.5, 0.68])
    assert _colours(words) == [WHITE, GREEN, "hsl(0, 75%, 80%)", "hsl(120, 75%, 66%)"]
    row = ("<tr>" + _classname("&lt;t&gt;") + _classname("1 (0.88)") + _classname("1 &amp; x") + _classname("1.23")
           + words + "</tr>")
    page = render_html([record], title="A <b> & c", legend=False)
    assert page == (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>A &lt;b&gt; &amp; c</title>' + STYLE
        + "</head><body><h2>A &lt;b&gt; &amp; c</h2><table>" + HEAD_ROW + row + "</table></body></html>\n"
    )
    default = render_html(iter([record, record]))  # any iterable; default title, legend on
    assert default == (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Attributions</title>' + STYLE
        + "</head><body><h2>Attributions</h2>" + LEGEND + "<table>" + HEAD_ROW + row + row + "</table></body></html>\n"
    )


def test_render_html_of_no_records_is_the_header_row_and_refuses_other_objects():
    assert render_html([], legend=False).endswith("<table>" + HEAD_ROW + "</table></body></html>\n")
    with pytest.raises(TypeError, match=r"^records must be VisualizationDataRecord objects, got str$"):
        render_html([one_record(), "not a record"])


def test_write_html_creates_folders_writes_utf8_and_returns_the_path(tmp_path, ascii_locale):
    target = tmp_path / "a" / "b" / "page.html"
    path = write_html([one_record()], str(target), title="Ünïcode <x>", legend=False)
    assert isinstance(path, Path) and path == target
    assert path.read_bytes().decode("utf-8") == render_html([one_record()], title="Ünïcode <x>", legend=False)
    again = write_html([], target.with_name("other.html"))  # the folder exists already
    assert again.read_text(encoding="utf-8") == render_html([])
    text = again.read_text(encoding="utf-8")
    assert LEGEND in text and "<title>Attributions</title>" in text


# ---------------------------------------------------------------------------------------------- visualization: methods


class RecordingAdapter:
    """Stands in for an adapter: remembers each visualization_records call and returns a marker per method."""

    def __init__(self):
        self.calls = []

    def visualization_records(self, batch, scores, target, *, method=None):
        self.calls.append((batch, scores, target, method))
        return [f"records of {method}"]


def test_records_by_method_asks_the_adapter_once_per_method_with_its_name_and_target():
    adapter = RecordingAdapter()
    scores = {"M1": {"x": 1}, "M2": {"x": 2}}
    assert records_by_method(adapter, "batch", scores, 7) == {"M1": ["records of M1"], "M2": ["records of M2"]}
    assert adapter.calls == [("batch", {"x": 1}, 7, "M1"), ("batch", {"x": 2}, 7, "M2")]
    adapter.calls.clear()
    comparison = SimpleNamespace(scores={"C": {"x": 3}})  # a Comparison: its .scores are read
    assert records_by_method(adapter, "b", comparison) == {"C": ["records of C"]}
    assert adapter.calls == [("b", {"x": 3}, None, "C")]  # target None by default


@pytest.mark.parametrize("scores", [{}, SimpleNamespace(scores={}), [("M", {"x": 1})], SimpleNamespace(other={})])
def test_records_by_method_refuses_what_is_not_a_non_empty_mapping(scores):
    with pytest.raises(ValueError, match=r"^scores must map method names to feature dicts \{feature_key: scores\}, or "
                                         r"be a Comparison$"):
        records_by_method(RecordingAdapter(), "batch", scores)


def _record(score: float = 1.0, method=None):
    """A plain Captum record, or with ``method`` a MethodRecord that carries it."""
    args = (torch.tensor([float(score)]), 0.5, "1", "1", "1", score, ["w"], None)
    return captum_viz.VisualizationDataRecord(*args) if method is None else MethodRecord(*args, method=method)


def test_group_by_method_keeps_mappings_as_lists_with_text_keys():
    a, b = _record(1.0), _record(2.0)
    grouped = _group_by_method({1: (a,), "m": [b]})
    assert grouped == {"1": [a], "m": [b]} and all(type(rows) is list for rows in grouped.values())


def test_group_by_method_groups_a_flat_list_by_each_records_method_in_order():
    b1, a1, b2, a2 = _record(1, "B"), _record(2, 7), _record(3, "B"), _record(4, 7)
    grouped = _group_by_method([b1, a1, b2, a2])
    assert list(grouped) == ["B", "7"] and grouped["B"] == [b1, b2] and grouped["7"] == [a1, a2]


@pytest.mark.parametrize(("records", "error", "message"), [
    ([_record()], ValueError, "a record carries no method name; make records with adapter.visualization_records(..., "
                              "method=name) or pass {method: records}"),
    ([MethodRecord(torch.tensor([1.0]), 0.5, "1", "1", "1", 1.0, ["w"], None)], ValueError,
     "a record carries no method"),
    ([], ValueError, "every method needs one record per sample, in the same order; got no records"),
    ({}, ValueError, "every method needs one record per sample, in the same order; got no records"),
    ({"a": [_record(), _record()], "b": [_record()]}, ValueError, "got {'a': 2, 'b': 1}"),
    ({"a": ["text"]}, TypeError, "records must be VisualizationDataRecord objects, got str"),
    ([SimpleNamespace(method="m")], TypeError, "records must be VisualizationDataRecord objects, got SimpleNamespace"),
])
def test_group_by_method_refuses_records_it_cannot_align(records, error, message):
    with pytest.raises(error, match=re.escape(message)):
        _group_by_method(records)


METHODS_STYLE = ("<style>body{font-family:sans-serif} td,th{padding:4px;vertical-align:top;text-align:left} "
                 "td.method{font-weight:600;white-space:nowrap}</style>")
UNITS = "<p>The sum of scores is in each method's own units: compare colours within a row, not sums across rows.</p>"
METHODS_HEAD = ("<table><tr><th>Method</th><th>Attribution Label</th><th>Sum of scores</th><th>Codes (colour: score / "
                "max |score| of the row)</th></tr>")


def two_methods() -> dict:
    """Two methods on two samples. The second method's records name other classes: the heading of a sample reads
    the first method's record."""
    vdr = captum_viz.VisualizationDataRecord
    return {
        "M<1>": [vdr(torch.tensor([1.0, -1.0]), 0.75, "1", "0", "1 (M<1>)", 0.5, ["a<b", "<cond>"], None),
                 vdr(torch.tensor([0.0]), 0.25, "0", "1", "0 (M<1>)", -2.0, ["x&y"], None)],
        "Saliency": [vdr(torch.tensor([0.7, 0.0], dtype=torch.float64), 0.9, "9", "9", "1 (Saliency)", 1.25,
                         ["a<b", "<cond>"], None),
                     vdr(torch.tensor([-1.0]), 0.1, "8", "8", "0 (Saliency)", 3.0, ["x&y"], None)],
    }


def _method_sections() -> list[str]:
    cells = captum_viz.format_word_importances
    return [
        "<h3>&lt;p1&gt;</h3><p>true label <b>0</b>, predicted <b>1</b> (0.75)</p>" + METHODS_HEAD
        + "<tr><td class='method'>M&lt;1&gt;</td>" + _classname("1 (M&lt;1&gt;)") + _classname("0.50")
        + cells(["a&lt;b", "#cond"], [1.0, -1.0]) + "</tr>"
        + "<tr><td class='method'>Saliency</td>" + _classname("1 (Saliency)") + _classname("1.25")
        + cells(["a&lt;b", "#cond"], [0.68, 0.0]) + "</tr></table>",
        "<h3>2</h3><p>true label <b>1</b>, predicted <b>0</b> (0.25)</p>" + METHODS_HEAD
        + "<tr><td class='method'>M&lt;1&gt;</td>" + _classname("0 (M&lt;1&gt;)") + _classname("-2.00")
        + cells(["x&amp;y"], [0.0]) + "</tr>"
        + "<tr><td class='method'>Saliency</td>" + _classname("0 (Saliency)") + _classname("3.00")
        + cells(["x&amp;y"], [-1.0]) + "</tr></table>",
    ]


def test_render_methods_html_page_exactly():
    sections = _method_sections()
    assert _colours(sections[0]) == [GREEN, RED, "hsl(120, 75%, 66%)", WHITE]  # 0.7 in float32: 66%
    page = render_methods_html(two_methods(), title="T & U", sample_names=("<p1>", 2), legend=False)
    assert page == (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>T &amp; U</title>' + METHODS_STYLE
        + "</head><body><h2>T &amp; U</h2>" + UNITS + "".join(sections) + "</body></html>\n"
    )


def test_render_methods_html_defaults_name_the_samples_and_show_the_legend():
    page = render_methods_html(two_methods())
    assert page.startswith('<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Attributions by method</title>')
    assert "</head><body><h2>Attributions by method</h2>" + LEGEND + UNITS + "<h3>Sample 0</h3>" in page
    assert re.findall(r"<h3>([^<]*)</h3>", page) == ["Sample 0", "Sample 1"]
    with pytest.raises(ValueError, match=r"^sample_names has 1 names for 2 samples$"):
        render_methods_html(two_methods(), sample_names=["only one"])
    with pytest.raises(ValueError, match="sample_names has 3 names for 2 samples"):
        render_methods_html(two_methods(), sample_names=["a", "b", "c"])


def test_write_methods_html_creates_folders_and_writes_the_page(tmp_path, ascii_locale):
    target = tmp_path / "x" / "y" / "methods.html"
    path = write_methods_html(two_methods(), str(target), title="Ü & T", sample_names=["<p1>", 2], legend=False)
    assert isinstance(path, Path) and path == target
    expected = render_methods_html(two_methods(), title="Ü & T", sample_names=["<p1>", 2], legend=False)
    assert path.read_bytes().decode("utf-8") == expected and "<h3>&lt;p1&gt;</h3>" in expected
    default = write_methods_html(two_methods(), target.with_name("default.html"))  # the folder exists already
    assert default.read_text(encoding="utf-8") == render_methods_html(two_methods())


# ---------------------------------------------------------------------------------------------- patients of the report


def test_select_cuts_what_has_one_entry_per_sample_and_keeps_the_rest():
    pair_ids = torch.tensor([[1], [2], [3]])
    scalar, other, wide, shared = torch.tensor(5), torch.tensor([7, 8]), torch.zeros(2, 3), torch.tensor([9, 9])
    batch = {"ids": torch.tensor([[1, 2], [3, 4], [5, 6]]), "flat": torch.tensor([10, 20, 30]), "scalar": scalar,
             "other": other, "wide": wide, "pair": (pair_ids, shared), "names": ["a", "b", "c"], "short": ["x"],
             "text": "xyz", "number": 3}
    out = _select(batch, [2, 0], 3)
    assert list(out) == list(batch)
    assert out["ids"].tolist() == [[5, 6], [1, 2]] and out["flat"].tolist() == [30, 10]
    assert out["scalar"] is scalar and out["other"] is other and out["wide"] is wide  # not one entry per sample
    assert isinstance(out["pair"], tuple) and out["pair"][0].tolist() == [[3], [1]] and out["pair"][1] is shared
    assert out["names"] == ["c", "a"] and out["short"] == ["x"]
    assert out["text"] == "xyz" and out["number"] == 3  # a string of n characters is not a list of n samples
    none = _select(batch, [], 3)
    assert tuple(none["ids"].shape) == (0, 2) and none["names"] == [] and none["pair"][0].shape[0] == 0
    assert _select(batch, (1,), 3)["flat"].tolist() == [20]


# Two feature keys of three patients: patient 0 has a true code in "a", patient 2 in "b" (3-D), patient 1 none.
TRUTH = {"a": torch.tensor([[False, True], [False, False], [False, False]]),
         "b": torch.tensor([[[False, False]], [[False, False]], [[False, True]]])}


@pytest.mark.parametrize(("truth", "k", "shown"), [
    (None, 2, [0, 1]),
    (None, 5, [0, 1, 2]),  # no more than the batch
    (None, 1, [0]),
    (None, 0, []),
    (TRUTH, 0, []),
    (TRUTH, -1, []),
    (TRUTH, 1, [0]),  # one patient: the first with true codes
    (TRUTH, 2, [0, 1]),  # one with true codes, then one without
    (TRUTH, 3, [0, 2, 1]),  # k - 1 with true codes first, then one without
    (TRUTH, 5, [0, 2, 1]),
    ({"a": torch.ones(3, 2, dtype=torch.bool)}, 2, [0, 1]),  # every patient has true codes
    ({"a": torch.ones(3, 2, dtype=torch.bool)}, 3, [0, 1, 2]),
    ({"a": torch.zeros(3, 2, dtype=torch.bool)}, 2, [0, 1]),  # none has
])
def test_pick_patients_prefers_patients_with_true_codes_and_keeps_one_without(truth, k, shown):
    assert _pick_patients({}, truth, 3, k) == shown


class CodesAdapter:
    """Stands in for an adapter in ``_patient_rows``: two code streams ("cond" ids, "proc" ids) or one, decoded
    with a vocabulary; its records hold the raw scores of the one sample it is given (no normalisation), with a
    ``<key>`` marker before each stream when there are several, and the batch's own class texts."""

    VOCAB: ClassVar[dict[int, str]] = {1: "a<b", 2: "c", 3: "d&e", 4: "p"}

    def __init__(self, keys=("cond", "proc"), extra_word=False):
        self.feature_keys = list(keys)
        self.extra_word = extra_word

    def captum_inputs(self, batch, level="embedding"):
        assert level == "token"
        return (batch["cond"], batch["proc"]), (torch.zeros(7),)  # the args do not have one row per sample

    def decode(self, batch):
        out = []
        for i in range(batch["cond"].shape[0]):
            out.append([DecodedToken(key, self.VOCAB[int(v)], (j,)) for key in self.feature_keys
                        for j, v in enumerate(batch[key][i]) if v])
        return out

    def visualization_records(self, batch, scores):
        assert all(v.shape[0] == 1 for v in scores.values()), "one sample's scores"
        words, values = [], []
        for key in self.feature_keys:
            if len(self.feature_keys) > 1:
                words.append(f"<{key}>")
                values.append(0.0)
            for token in self.decode(batch)[0]:
                if token.feature == key:
                    words.append(token.text)
                    values.append(float(scores[key][0][token.index]))
        if self.extra_word:
            words.append("extra")
            values.append(0.0)
        record = captum_viz.VisualizationDataRecord(torch.tensor(values), float(batch["prob"][0]), batch["pred"][0],
                                                    batch["true"][0], batch["attr"][0], sum(values), words, None)
        return [record]


PATIENTS = {"cond": torch.tensor([[1, 0, 2], [3, 1, 0]]), "proc": torch.tensor([[4, 0], [0, 4]]),
            "prob": torch.tensor([0.1, 0.899]), "pred": ["p0", "P1"], "true": ["t0", "T<1>"], "attr": ["a0", "A&1"]}
PATIENT_TRUTH = {"cond": torch.tensor([[False, False, True], [True, False, False]]),
                 "proc": torch.tensor([[True, False], [False, False]])}
PATIENT_SCORES = {
    "M&1": {"cond": torch.tensor([[9.0, 9, 9], [0.5, -1.0, 0]]), "proc": torch.tensor([[9.0, 9], [0, 0.25]])},
    "Rnd": {"cond": torch.tensor([[9.0, 9, 9], [1.0, 0.0, 0]]), "proc": torch.tensor([[9.0, 9], [0, -0.5]])},
}
CODES_HEAD = ("<table class='codes'><tr><th>Method</th><th>Sum of scores</th><th>Codes (colour: score / max |score| "
              "of the row)</th></tr>")


def _code(text: str, colour: str, planted: bool = False) -> str:
    style = f"background-color: {colour}; opacity:1.0; line-height:1.75"
    if planted:
        return f"<mark class='planted' style='{style}'><font color='black'> [{text}] </font></mark>"
    return f"<mark style='{style}'><font color='black'> {text} </font></mark>"


def test_patient_rows_of_the_second_patient_with_true_codes_outlined():
    head, table = _patient_rows(CodesAdapter(), PATIENTS, PATIENT_SCORES, PATIENT_TRUTH, 1)
    # patient 1: "<cond>" d&e a<b "<proc>" p; its true code is d&e (cond, position 0)
    # M&1: 0, 0.5, -1, 0, 0.25 -> white, green 75%, red 60%, white, green 88%; sum -0.25
    # Rnd: 0, 1, 0, 0, -0.5 -> white, green 50%, white, white, red 80%; sum 0.5
    assert head == "true label <b>T&lt;1&gt;</b>, predicted <b>P1</b> (0.90), explained class <b>A&amp;1</b>"
    assert table == (
        CODES_HEAD
        + "<tr><td class='method'>M&amp;1</td><td>-0.250</td><td>" + _code("#cond", WHITE)
        + _code("d&amp;e", "hsl(120, 75%, 75%)", True) + _code("a&lt;b", RED) + _code("#proc", WHITE)
        + _code("p", "hsl(120, 75%, 88%)") + "</td></tr>"
        + "<tr><td class='method'>Rnd</td><td>0.500</td><td>" + _code("#cond", WHITE) + _code("d&amp;e", GREEN, True)
        + _code("a&lt;b", WHITE) + _code("#proc", WHITE) + _code("p", "hsl(0, 75%, 80%)") + "</td></tr></table>"
    )


def test_patient_rows_of_one_stream_mark_without_stream_markers():
    adapter = CodesAdapter(keys=("cond",))
    scores = {"S": {"cond": torch.tensor([[0.5, 0.0, -0.25], [9.0, 9, 9]])}}
    head, table = _patient_rows(adapter, PATIENTS, scores, PATIENT_TRUTH, 0)
    # patient 0: a<b (score 0.5) and c (score -0.25, the true code); sum 0.25
    assert head == "true label <b>t0</b>, predicted <b>p0</b> (0.10), explained class <b>a0</b>"
    assert table == (CODES_HEAD + "<tr><td class='method'>S</td><td>0.250</td><td>"
                     + _code("a&lt;b", "hsl(120, 75%, 75%)") + _code("c", "hsl(0, 75%, 90%)", True)
                     + "</td></tr></table>")
    _, plain = _patient_rows(adapter, PATIENTS, scores, None, 0)  # no truth: nothing outlined
    assert plain == table.replace(_code("c", "hsl(0, 75%, 90%)", True), _code("c", "hsl(0, 75%, 90%)"))


def test_patient_rows_do_not_outline_when_the_marks_do_not_fit_the_words():
    _, table = _patient_rows(CodesAdapter(extra_word=True), PATIENTS, PATIENT_SCORES, PATIENT_TRUTH, 1)
    assert "planted" not in table and table.count("<mark ") == 12  # 6 words (one extra) per method


def test_patient_rows_without_methods_are_an_empty_table():
    assert _patient_rows(CodesAdapter(), PATIENTS, {}, PATIENT_TRUTH, 0) == ("", CODES_HEAD + "</table>")


# ---------------------------------------------------------------------------------------------- the cohort section


def _cohort(features: int = 2, check: ModelCheck | None = None, agreement: bool = True, cheap: bool = False):
    """A cohort summary by hand; ``cheap``: its figure is an empty 1 x 1 inch one (for tests of the text only)."""
    import polars as pl
    from matplotlib.figure import Figure

    from captum_chefer.cohort import CohortSummary

    class Summary(CohortSummary):  # remembers what the section asks its figure for
        figure_calls: ClassVar[list] = []

        def figure(self, k=None, colors=None):
            self.figure_calls.append((k, colors))
            return Figure(figsize=(1, 1)) if cheap else super().figure(k, colors=colors)

    chefer = "Chefer (recommended)"
    codes = pl.DataFrame({
        "method": [chefer, chefer, chefer, "S&al"], "rank": [1, 2, 3, 1],
        "feature": ["cond", "proc", "cond", "proc"] if features == 2 else ["cond"] * 4,
        "code": ["C<1>", "P&2", "C3", "P&2"], "mean_score": [0.5, 0.25, 0.0001, 0.75],
        "samples": [3, 2, 1, 4], "patients": [3, 2, 1, 4],
    })
    rows = {"method_a": [chefer], "method_b": ["S&al"], "spearman": [0.123456], "top_k_overlap": [0.5], "k": [2],
            "codes": [3]}
    frame = pl.DataFrame(rows) if agreement else pl.DataFrame(rows).clear()
    return Summary(codes, frame, [chefer, "S&al"], n_samples=5, n_patients=4, n_rows=17, top_k=2, model_check=check)


BELOW = ModelCheck.from_counts(1, 3, {0: 2, 1: 1})  # 1 of 3 right, the majority class scores 2 of 3
ABOVE = ModelCheck.from_counts(12, 12, {0: 6, 1: 6})


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _section_text() -> str:
    """The paragraph on the cohort's size: 5 samples, 4 patients, 17 rows, top 2."""
    return (
        '<p class="small">5 samples (4 patients), 17 rows (one per code, sample and\nmethod). A code\'s score in a '
        "sample is summed over its occurrences there; its mean score is averaged over the samples that\nhave it (n). "
        "Agreement: Spearman rank correlation of the per-code mean scores, and the share of top-2 codes two\nmethods "
        "have in common.</p>\n"
    )


COHORT_HEADER = "<tr><th>Rank</th><th>Chefer (recommended)</th><th>S&amp;al</th></tr>"
AGREEMENT = ('<h3>Agreement between methods</h3><table class="results"><tr><th>Method A</th><th>Method B</th>'
             "<th>Spearman</th><th>Top-2 overlap</th><th>Codes</th></tr><tr><td>Chefer (recommended)</td>"
             "<td>S&amp;al</td><td>0.123</td><td>0.50</td><td>3</td></tr></table>\n")


def test_cohort_section_with_two_features_a_warning_and_the_agreement():
    summary = _cohort(2, BELOW)
    section = cohort_section(summary)
    text, image = section.split('<img alt="top codes per method" src="data:image/png;base64,')
    assert text == (
        "<h2>Cohort: the codes each method ranks highest</h2>\n"
        f"<div class='warning'><b>Warning.</b> {html.escape(BELOW.warning())}</div>\n" + _section_text()
        + '<table class="results">' + COHORT_HEADER
        + "<tr><td>1</td><td>cond:C&lt;1&gt; <span class='small'>0.500 (n=3)</span></td>"
        "<td>proc:P&amp;2 <span class='small'>0.750 (n=4)</span></td></tr>"
        "<tr><td>2</td><td>proc:P&amp;2 <span class='small'>0.250 (n=2)</span></td><td></td></tr></table>\n"
        + AGREEMENT
    )
    assert image.endswith('">\n')
    # the figure of the top 2 codes in the methods' colours: 2 panels of 7.2 x (0.3 * 2 + 1 + 0.6) inches at 110 dpi
    assert _png_size(base64.b64decode(image[: -len('">\n')])) == (792, 242)
    ((k, colors),) = summary.figure_calls
    assert k == 2 and list(colors) == ["Chefer (recommended)", "S&al"] and colors["Chefer (recommended)"] == "#d62728"


def test_cohort_section_with_one_feature_a_top_of_one_and_a_model_above_chance():
    summary = _cohort(1, ABOVE, agreement=False, cheap=True)
    text = cohort_section(summary, top=1).split("<img")[0]
    assert text == (
        "<h2>Cohort: the codes each method ranks highest</h2>\n"
        f"<p class='small'>Model on these samples: {html.escape(ABOVE.describe())}.</p>\n" + _section_text()
        + '<table class="results">' + COHORT_HEADER
        + "<tr><td>1</td><td>C&lt;1&gt; <span class='small'>0.500 (n=3)</span></td>"
        "<td>P&amp;2 <span class='small'>0.750 (n=4)</span></td></tr></table>\n\n"  # no agreement table
    )
    assert summary.figure_calls[0][0] == 1
    # three codes of the first method: the third one's small mean score in exponent form
    third = "<tr><td>3</td><td>C3 <span class='small'>1.00e-04 (n=1)</span></td><td></td></tr>"
    assert third in cohort_section(summary, top=3)


def test_cohort_section_lists_every_pair_of_methods_row_after_row():
    import polars as pl

    summary = _cohort(2, None, cheap=True)
    summary.agreement = pl.concat([summary.agreement, summary.agreement.with_columns(pl.lit("B").alias("method_b"))])
    rows = AGREEMENT.split("<th>Codes</th></tr>")[1].split("</table>")[0]
    assert rows + rows.replace("S&amp;al", "B") + "</table>" in cohort_section(summary)


def test_cohort_section_embeds_a_png_whatever_matplotlibs_default_format():
    import matplotlib

    with matplotlib.rc_context({"savefig.format": "svg"}):
        section = cohort_section(_cohort(2, None))
    image = section.split('src="data:image/png;base64,')[1].split('"')[0]
    assert _png_size(base64.b64decode(image)) == (792, 242)


class _WithoutCheck:
    """A cohort summary object that has no ``model_check`` attribute at all (an older summary)."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        if name == "model_check":
            raise AttributeError(name)
        return getattr(self._inner, name)


def test_cohort_section_without_a_model_check_says_nothing_about_the_model():
    for summary in (_cohort(2, None, cheap=True), _WithoutCheck(_cohort(2, BELOW, cheap=True))):
        section = cohort_section(summary)
        assert section.startswith("<h2>Cohort: the codes each method ranks highest</h2>\n\n" + _section_text())
        assert "warning" not in section and "Model on these samples" not in section


def test_cohort_page_wraps_the_section_in_a_page():
    summary = _cohort(2, None, cheap=True)
    page = cohort_page(summary, title="Cohort <x> & y")
    section = cohort_section(summary)  # the figure is drawn the same way each time
    assert page == (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Cohort &lt;x&gt; &amp; y</title>'
        f"<style>{report_module.CSS}</style></head>\n<body><h1>Cohort &lt;x&gt; &amp; y</h1>\n{section}\n"
        "</body></html>\n"
    )
    default = cohort_page(summary)
    assert "<title>Cohort attribution summary</title>" in default and "<h1>Cohort attribution summary</h1>" in default


# ---------------------------------------------------------------------------------------------- write_report


class Bag(nn.Module):
    """Sum of the code embeddings, then a linear layer: two logits, no attention (Saliency only)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(6, 3, padding_idx=0)
        self.head = nn.Linear(3, 2)

    def forward(self, ids):
        return self.head(self.embed(ids).sum(1))


class IdsAdapter(TransformerAdapter):
    """TransformerAdapter that lets a batch carry ``patient_id`` (the report reads it, the model does not) and
    remembers the levels its inputs are asked for."""

    levels: list
    mask_calls: list

    def captum_inputs(self, batch, level="embedding"):
        self.levels.append(level)
        return super().captum_inputs(batch, level)

    def token_masks(self, additional_forward_args, inputs=None):
        self.mask_calls.append((additional_forward_args, inputs))
        return super().token_masks(additional_forward_args, inputs)

    def _read_batch(self, batch):
        if isinstance(batch, dict):
            batch = {k: v for k, v in batch.items() if k != "patient_id"}
        return super()._read_batch(batch)


def report_evaluation() -> Evaluation:
    """Three patients. Deletion AOPC: A&B 0.2 against Bé 0.1 everywhere (clear). Comprehensiveness: A&B 0, 0, 3 (mean
    1, bootstrap [0, 3]) against Bé 0.5 everywhere: the differences -0.5, -0.5, 2.5 do not clear zero. AUROC on two
    patients (n=2 in its header): A&B 1, 1 (Wilson [0.342, 1]) against Bé 0, 0 (Wilson [0, 0.658]): clear. Random
    has no AUROC (n/a, no interval) and no time. Bé's name is not ASCII."""
    per_sample = {
        "A&B": {"deletion_aopc": _t(0.2, 0.2, 0.2), "comprehensiveness": _t(0, 0, 3), "auroc": _t(1, 1, NAN)},
        "Bé": {"deletion_aopc": _t(0.1, 0.1, 0.1), "comprehensiveness": _t(0.5, 0.5, 0.5), "auroc": _t(0, 0, NAN)},
        "Random": {"deletion_aopc": _t(0.5, 0.5, 0.5), "comprehensiveness": _t(0.25, 0.25, 0.25),
                   "auroc": _t(NAN, NAN, NAN)},
    }
    curves = {"A&B": {"deletion": torch.tensor([[0.0, 1.0, 0.5], [NAN, 0.0, 0.5], [0.0, 0.5, 0.5]]),
                      "insertion": torch.tensor([[0.25] * 3, [0.75] * 3, [0.5] * 3])},
              "Bé": {"deletion": torch.ones(3, 3), "insertion": torch.zeros(3, 3)}}
    return Evaluation(per_sample, curves, (0.0, 0.5, 1.0), (0.1, 0.25), {"A&B": 0.002, "Bé": 4e-7})


REPORT_ROWS = (
    "<tr><th>Method</th><th>Deletion AOPC ↑</th><th>Compr. ↑</th><th>AUROC ↑ (n=2)</th><th>ms / sample ↓</th></tr>"
    "<tr><td>A&amp;B</td><td class='best'>0.200<br><span class='ci'>[0.200, 0.200]†</span></td>"
    "<td class=''>1.000<br><span class='ci'>[0.000, 3.000]</span></td>"
    "<td class='best'>1.000<br><span class='ci'>[0.342, 1.000]</span></td><td class=''>2.000</td></tr>"
    "<tr><td>Bé</td><td class=''>0.100<br><span class='ci'>[0.100, 0.100]†</span></td>"
    "<td class=''>0.500<br><span class='ci'>[0.500, 0.500]†</span></td>"
    "<td class=''>0.000<br><span class='ci'>[0.000, 0.658]</span></td><td class=''>4.00e-04</td></tr>"
    "<tr><td>Random</td><td class=''>0.500<br><span class='ci'>[0.500, 0.500]†</span></td>"
    "<td class=''>0.250<br><span class='ci'>[0.250, 0.250]†</span></td><td class=''>n/a</td><td class=''>n/a</td></tr>"
)
SWATCHES = "".join(
    f"<span style='display:inline-block;width:12px;height:12px;border:1px solid #999;background:{c}'></span> "
    f"{t} &nbsp; "
    for c, t in (("hsl(0, 75%, 60%)", "negative"), ("hsl(0, 75%, 100%)", "neutral"), ("hsl(120, 75%, 50%)", "positive"))
)
PLANTED_LEGEND = (
    "<br><mark class='planted' style='background-color: hsl(0, 75%, 100%)'><font color='black'> [code] </font></mark> "
    "a planted code (the cohort's ground truth): outlined, bold and in brackets in the tables; outlined, bold and "
    "starred (<b>*code</b>) in the figures."
)
SETTINGS = {"n": 3, "path": Path("a/b"), "<k>": "x & y", "none": None, "flag": True, "f": 0.5}


def _spy(calls: list, function):
    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return function(*args, **kwargs)

    return spy


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = Bag().eval()
    adapter = IdsAdapter(model, embedding=model.embed, pad_id=0, vocabulary=["pad", "a<b", "x&y", "c", "d", "e"])
    batch = {"input": torch.tensor([[1, 2, 0, 0], [3, 4, 5, 0], [2, 3, 0, 0]]), "patient_id": ["p<0>", "p1", ""]}
    adapter.levels, adapter.mask_calls = [], []
    methods = [("Sal<1>", Saliency(adapter), {}), ("Random", RandomAttribution(adapter, seed=0), {})]
    return adapter, batch, methods


def write_full_report(tiny, tmp_path):
    """The report with everything: ground truth (code x&y, in patients 0 and 2), three patients shown, settings, a
    model below chance, a cohort, a description per patient (none for patient 1)."""
    adapter, batch, methods = tiny
    out = tmp_path / "new" / "folder"
    compare_calls, plot_calls = [], []
    adapter.levels.clear()
    adapter.mask_calls.clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report_module, "compare_methods", _spy(compare_calls, report_module.compare_methods))
        patch.setattr(report_module, "plot_methods", _spy(plot_calls, report_module.plot_methods))
        files = write_report(
            str(out), adapter, report_evaluation(), batch, methods, title="Report <1> & co", settings=SETTINGS,
            ground_truth=lambda b: {"input": b["input"] == 2}, show_patients=3, model_check=BELOW,
            describe_patient=lambda b, i: "" if i == 1 else f"rule <{i}>", cohort=_cohort(2, None),
        )
    page = files["report"].read_text(encoding="utf-8")
    return SimpleNamespace(out=out, files=files, page=page, compare_calls=compare_calls, plot_calls=plot_calls,
                           levels=list(adapter.levels), mask_calls=list(adapter.mask_calls))


def write_plain_report(tiny, tmp_path):
    """The report with the defaults: no settings, no ground truth, no model check, no cohort; the patients it would
    show are asked for and none are returned. The summary figures are stubbed (empty, 1 x 1 inch)."""
    from matplotlib.figure import Figure

    adapter, batch, methods = tiny
    out = tmp_path
    pick_calls = []
    with pytest.MonkeyPatch.context() as patch:
        for name in ("curves_figure", "metrics_figure", "time_figure"):
            patch.setattr(report_module, name, lambda evaluation: Figure(figsize=(1, 1)))
        patch.setattr(report_module, "_pick_patients", lambda *args: pick_calls.append(args) or [])
        files = write_report(out, adapter, report_evaluation(), {"input": batch["input"]}, methods)
    page = files["report"].read_text(encoding="utf-8")
    return SimpleNamespace(out=out, files=files, page=page, pick_calls=pick_calls)


@pytest.fixture
def ascii_locale():
    """Text written without an explicit encoding is ASCII during the test (LC_CTYPE "C"), so a dropped
    ``encoding="utf-8"`` fails on the first non-ASCII character instead of passing under a UTF-8 locale."""
    import locale

    old = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        yield
    finally:
        locale.setlocale(locale.LC_CTYPE, old)


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def check_writes_its_files_in_order_under_their_names(report):
    out, files = report.out, report.files
    assert list(files) == ["deletion_insertion", "metrics", "time", "patient_0", "patient_2", "patient_1", "csv",
                           "curves_csv", "json", "report"]
    names = ["deletion_insertion.png", "metrics.png", "time.png", "patient_0.png", "patient_2.png", "patient_1.png",
             "results.csv", "curves.csv", "results.json", "report.html"]
    assert [p.name for p in files.values()] == names and all(p.parent == out and p.is_file() for p in files.values())
    assert sorted(p.name for p in out.iterdir()) == sorted(names)


def check_embeds_each_figure_as_written(report):
    page, files = report.page, report.files
    for alt, key in (("deletion and insertion curves", "deletion_insertion"), ("metrics by method", "metrics"),
                     ("time per patient", "time")):
        assert f'<img alt="{alt}" src="data:image/png;base64,{_b64(files[key])}">' in page
        assert files[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for i in (0, 2, 1):
        assert f"<img alt='scores of patient {i}' src='data:image/png;base64,{_b64(files[f'patient_{i}'])}'>" in page


def check_page_head_title_banner_and_settings(report):
    page = report.page
    assert page.startswith('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Report &lt;1&gt; &amp; '
                           f"co</title><style>{report_module.CSS}</style></head>\n<body>\n"
                           "<h1>Report &lt;1&gt; &amp; co</h1>\n")
    assert re.search(r'<p class="small">Generated by <code>captum_chefer</code> on \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\n'
                     r"\(Python \d", page)
    banner = f"<div class='warning'><b>Warning.</b> {html.escape(BELOW.warning())}</div>"
    settings = ("<dt>n</dt><dd>3</dd><dt>path</dt><dd>a/b</dd><dt>&lt;k&gt;</dt><dd>x &amp; y</dd><dt>none</dt>"
                "<dd>None</dd><dt>flag</dt><dd>True</dd><dt>f</dt><dd>0.5</dd>")
    assert (f"this run.</p>\n{banner}\n<h2>Settings</h2><dl class=\"settings\">{settings}</dl>\n<h2>Results</h2>\n"
            in page)
    assert page.endswith("</body></html>\n")


def check_results_table_rows_cells_and_marks(report):
    assert f'<table class="results">{REPORT_ROWS}</table>\n' in report.page


def check_explains_the_table_below_it(report):
    page = report.page
    note = html.escape(NOTE_INTERVALS + NOTE_DAGGER + ". Bold" + NOTE_MARK + NOTE_TIME)
    assert "Wilson&#x27;s score" in note  # quotes escaped too
    assert f'</table>\n<p class="small">{note}</p>\n<h3>How to read the table</h3>\n<dl class="metrics"><dt>' in page
    metrics = page.split('<dl class="metrics">')[1].split("</dl>")[0]
    assert re.findall("<dt>(.*?)</dt>", metrics) == ["Deletion AOPC ↑", "Compr. ↑", "AUROC ↑", "ms / sample ↓"]
    assert re.fullmatch("(<dt>[^<]*</dt><dd>[^<]*</dd>)+", metrics)  # term after definition, nothing between
    compr = ("drop of the target probability when the top 10% / 25% of the codes are removed, averaged; higher is "
             "better; -1 to 1")
    assert f"<dt>Compr. ↑</dt><dd>{compr}</dd>" in metrics
    assert "The curves run over the fractions\n0, 0.5, 1.</li>" in page


def check_legend_planted_codes_and_cohort(report):
    page = report.page
    assert ("Legend: " + SWATCHES + "\n" + PLANTED_LEGEND + "</p>\n<ul class=\"small\">") in page
    time_image = page.index('<img alt="time per patient"')
    cohort = page.index("<h2>Cohort: the codes each method ranks highest</h2>")
    assert time_image < cohort < page.index("<h2>Highlighted codes</h2>")


def check_patients_in_the_order_picked_with_their_names_descriptions_and_true_codes(report):
    page = report.page
    assert "No patients shown" not in page
    # patients 0 and 2 have the true code x&y: shown first; patient 1 has none. Patient 2's id is empty: its index.
    assert re.findall(r"<h3>Patient (.*?)</h3>", page) == ["p&lt;0&gt;", "2", "p1"]
    # one patient's figure, then straight on to the next patient
    assert re.findall(r"src='data:image/png;base64,[^']*'>(<h3>Patient [^<]*</h3>)", page) == [
        "<h3>Patient 2</h3>", "<h3>Patient p1</h3>"]
    sections = page.split("<h3>Patient ")[1:]
    assert re.match(r"p&lt;0&gt;</h3><p class='small'>true label <b>n/a</b>, predicted <b>[01]</b> \(\d\.\d\d\), "
                    r"explained class <b>[01]</b>; rule &lt;0&gt;</p><table class='codes'>", sections[0])
    assert "; rule &lt;2&gt;</p><table class='codes'>" in sections[1]
    assert re.search(r"explained class <b>[01]</b></p><table class='codes'>", sections[2])  # no description
    for section, planted in zip(sections, (True, True, False), strict=True):
        assert section.count("<td class='method'>Sal&lt;1&gt;</td>") == 1
        assert section.count("<td class='method'>Random</td>") == 1
        assert (" [x&amp;y] " in section) is planted and ("class='planted'" in section) is planted


def check_compares_the_shown_patients_and_draws_them_with_their_true_codes(report, tiny):
    adapter, batch, methods = tiny
    assert report.levels[0] == "token"  # the report's own look at the codes, before the comparison
    masks_args, masks_inputs = report.mask_calls[0]  # the real codes, from the token ids and their arguments
    assert isinstance(masks_args, tuple) and masks_args[-1].tolist() == batch["input"].tolist()
    assert isinstance(masks_inputs, tuple) and masks_inputs[0].tolist() == batch["input"].tolist()
    ((args, kwargs),) = report.compare_calls
    assert args[0] is adapter and args[2] is methods and kwargs == {"target_mode": "predicted", "progress": False}
    assert args[1]["input"].tolist() == batch["input"][[0, 2, 1]].tolist()
    assert args[1]["patient_id"] == ["p<0>", "", "p1"]
    truth = (batch["input"] == 2)[[0, 2, 1]]
    assert [kw["sample"] for _, kw in report.plot_calls] == [0, 1, 2]
    assert [kw["title"] for _, kw in report.plot_calls] == [
        "Patient p<0>: scores per method", "Patient 2: scores per method", "Patient p1: scores per method"]
    for _, kw in report.plot_calls:
        assert list(kw["planted"]) == ["input"] and kw["planted"]["input"].tolist() == truth.tolist()


def check_curves_csv_by_hand(report):
    # deletion: the NaN of the second patient is left out of the first column's mean; insertion: 0.5 everywhere
    with report.files["curves_csv"].open(newline="", encoding="utf-8") as f:
        assert f.read() == ("method,curve,fraction,mean_output\r\n"
                            "A&B,deletion,0.0,0.0\r\nA&B,deletion,0.5,0.5\r\nA&B,deletion,1.0,0.5\r\n"
                            "A&B,insertion,0.0,0.5\r\nA&B,insertion,0.5,0.5\r\nA&B,insertion,1.0,0.5\r\n"
                            "Bé,deletion,0.0,1.0\r\nBé,deletion,0.5,1.0\r\nBé,deletion,1.0,1.0\r\n"
                            "Bé,insertion,0.0,0.0\r\nBé,insertion,0.5,0.0\r\nBé,insertion,1.0,0.0\r\n")
    with report.files["csv"].open(newline="", encoding="utf-8") as f:
        assert [row["method"] for row in csv.DictReader(f)] == ["A&B", "Bé", "Random"]


def check_json_settings_and_model_check(report):
    text = report.files["json"].read_text(encoding="utf-8")
    assert text.startswith('{\n  "summary": [\n    {\n      "method": "A&B",')  # indented by 2
    payload = json.loads(text)
    # numbers, text, booleans and None as they are; anything else as text
    assert payload["settings"] == {"n": 3, "path": "a/b", "<k>": "x & y", "none": None, "flag": True, "f": 0.5}
    assert payload["model_check"] == json.loads(json.dumps(BELOW.as_dict()))
    assert payload["fractions"] == [0.0, 0.5, 1.0]
    assert [r["method"] for r in payload["summary"]] == ["A&B", "Bé", "Random"]



def test_full_report(tiny, tmp_path, ascii_locale):
    """One test for the whole report, so that a mutation test run (which runs the tests that call the mutated
    function) runs every check of the report against each mutant of write_report."""
    report = write_full_report(tiny, tmp_path)
    check_writes_its_files_in_order_under_their_names(report)
    check_embeds_each_figure_as_written(report)
    check_page_head_title_banner_and_settings(report)
    check_results_table_rows_cells_and_marks(report)
    check_explains_the_table_below_it(report)
    check_legend_planted_codes_and_cohort(report)
    check_patients_in_the_order_picked_with_their_names_descriptions_and_true_codes(report)
    check_compares_the_shown_patients_and_draws_them_with_their_true_codes(report, tiny)
    check_curves_csv_by_hand(report)
    check_json_settings_and_model_check(report)


def test_report_with_the_defaults(tiny, tmp_path):
    plain_report = write_plain_report(tiny, tmp_path)
    page, files = plain_report.page, plain_report.files
    ((batch, truth, n_batch, k),) = plain_report.pick_calls  # no ground truth; 3 patients; 4 shown by default
    assert list(batch) == ["input"] and (truth, n_batch, k) == (None, 3, 4)
    assert list(files) == ["deletion_insertion", "metrics", "time", "csv", "curves_csv", "json", "report"]
    assert "<title>Chefer relevance side by side</title>" in page and "<h1>Chefer relevance side by side</h1>" in page
    assert "this run.</p>\n\n<h2>Settings</h2><dl class=\"settings\"></dl>\n" in page  # no banner, no settings
    assert "Legend: " + SWATCHES + "\n</p>" in page and "<mark class='planted'" not in page
    assert "<h2>Cohort" not in page
    assert ('<img alt="time per patient" src="data:image/png;base64,' + _b64(files["time"]) + '">\n\n'
            "<h2>Highlighted codes</h2>") in page
    assert "</ul>\n<p>No patients shown.</p>\n</body></html>\n" in page
    payload = json.loads(files["json"].read_text(encoding="utf-8"))
    assert payload["settings"] == {} and "model_check" not in payload


def write_one_patient_report(tiny, tmp_path):
    """One patient shown, no ground truth, no description, patient ids in a tuple (not read as ids). The three
    summary figures are stubbed with a 1 x 1 inch figure: only the patient's part of the page is looked at."""
    from matplotlib.figure import Figure

    adapter, batch, methods = tiny
    plot_calls = []
    with pytest.MonkeyPatch.context() as patch:
        for name in ("curves_figure", "metrics_figure", "time_figure"):
            patch.setattr(report_module, name, lambda evaluation: Figure(figsize=(1, 1)))
        patch.setattr(report_module, "plot_methods", _spy(plot_calls, report_module.plot_methods))
        files = write_report(tmp_path, adapter, report_evaluation(),
                             {**batch, "patient_id": tuple(batch["patient_id"])}, methods, show_patients=1)
    return SimpleNamespace(files=files, page=files["report"].read_text(encoding="utf-8"), plot_calls=plot_calls)


def test_report_of_one_patient_without_ids_truth_or_description(tiny, tmp_path):
    one_patient_report = write_one_patient_report(tiny, tmp_path)
    page = one_patient_report.page
    assert "patient_0" in one_patient_report.files and "patient_1" not in one_patient_report.files
    assert re.findall(r"<h3>Patient (.*?)</h3>", page) == ["0"]  # a tuple of ids is not read: the index
    assert re.search(r"<h3>Patient 0</h3><p class='small'>true label <b>n/a</b>, predicted <b>[01]</b> \(\d\.\d\d\), "
                     r"explained class <b>[01]</b></p><table class='codes'>", page)  # nothing appended
    assert "class='planted'" not in page and "No patients shown" not in page
    ((_, kwargs),) = one_patient_report.plot_calls
    assert kwargs["planted"] is None and kwargs["title"] == "Patient 0: scores per method" and kwargs["sample"] == 0


def test_headline_text_table_counts_patients_in_a_header_and_shows_small_and_missing_values():
    lines = headline_table(report_evaluation(), intervals=False).split("\n")
    # widths: Method 6, Deletion 15, Compr. 8, AUROC (n=2) 13, time 13; AUROC's best is clear (A&B), Compr.'s is not
    assert lines[:4] == [
        "Method  Deletion AOPC ↑  Compr. ↑  AUROC ↑ (n=2)  ms / sample ↓",
        "A&B" + " " * 5 + "0.200*" + " " * 11 + "1.000" + " " * 5 + "1.000*" + " " * 9 + "2.000" + " " * 8,
        "Bé" + " " * 6 + "0.100" + " " * 12 + "0.500" + " " * 5 + "0.000" + " " * 10 + "4.00e-04" + " " * 5,
        "Random" + " " * 2 + "0.500" + " " * 12 + "0.250" + " " * 5 + "n/a" + " " * 12 + "n/a" + " " * 10,
    ]
