"""Captum visualization records, the HTML file, the methods-by-codes figure, Captum's plotting fix."""

from __future__ import annotations

import html
import re

import matplotlib
import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients, Saliency
from captum.attr import visualization as captum_viz

from captum_chefer import CheferAttribution, PyHealthAdapter
from captum_chefer.comparison import compare_methods
from captum_chefer.visualization import (
    captum_matplotlib_compat,
    plot_methods,
    records_by_method,
    render_html,
    render_methods_html,
    visualize_timeseries_attr,
    write_html,
    write_methods_html,
)
from conftest import make_planted_samples


@pytest.fixture(scope="module")
def planted(planted_model):
    from pyhealth.datasets import get_dataloader

    batch = next(iter(get_dataloader(planted_model.dataset, batch_size=8, shuffle=False)))
    return PyHealthAdapter(planted_model), batch


@pytest.fixture(scope="module")
def chefer_records(planted):
    adapter, batch = planted
    inputs, args = adapter.captum_inputs(batch)
    attributions = CheferAttribution(adapter).attribute(
        inputs, target=adapter.captum_target(batch), additional_forward_args=args
    )
    return attributions, adapter.visualization_records(batch, attributions)


def _expected_tokens(sample: dict) -> list[str]:
    """From the raw sample, independently of the processors: markers, then codes in order."""
    tokens = ["<conditions>", *sample["conditions"], "<procedures>"]
    for v, visit in enumerate(sample["procedures"]):
        tokens += [f"v{v + 1}:{code}" for code in visit]
    return tokens


def test_records_carry_the_decoded_codes(planted, chefer_records):
    _, batch = planted
    _, records = chefer_records
    samples = {s["patient_id"]: s for s in make_planted_samples()}
    assert len(records) == batch["conditions"].shape[0]
    for record, patient in zip(records, batch["patient_id"], strict=True):
        assert record.raw_input_ids == _expected_tokens(samples[patient])
        assert len(record.word_attributions) == len(record.raw_input_ids)


def test_record_scores_classes_and_probabilities(planted, chefer_records):
    adapter, batch = planted
    attributions, records = chefer_records
    scores = adapter.to_feature_dict(attributions)
    with torch.no_grad():
        probs = adapter.model(**batch)["y_prob"]  # PyHealth's own forward as the reference
    for i, record in enumerate(records):
        words = record.word_attributions
        markers = [j for j, w in enumerate(record.raw_input_ids) if w.startswith("<")]
        assert torch.all(words[markers] == 0)
        raw = torch.cat([scores["conditions"][i][batch["conditions"][i] != 0],
                         scores["procedures"][i][batch["procedures"][i] != 0]])
        real = [j for j in range(len(words)) if j not in markers]
        torch.testing.assert_close(words[real], raw / raw.abs().max())
        assert record.attr_score == pytest.approx(float(raw.sum()), rel=1e-5)
        predicted = int(probs[i].argmax())
        assert record.pred_class == str(predicted)
        assert record.pred_prob == pytest.approx(float(probs[i, predicted]), rel=1e-5)
        assert record.true_class == str(int(batch["label"][i]))
        assert record.attr_class == str(predicted)  # target None explains the predicted class
    explained = adapter.visualization_records(batch, attributions, target=torch.zeros(len(records), dtype=torch.long))
    assert {r.attr_class for r in explained} == {"0"}


def test_feature_dict_input_and_bad_shapes(planted, chefer_records):
    adapter, batch = planted
    attributions, records = chefer_records
    from_dict = adapter.visualization_records(batch, adapter.to_feature_dict(attributions))
    assert [r.raw_input_ids for r in from_dict] == [r.raw_input_ids for r in records]
    with pytest.raises(KeyError, match="procedures"):
        adapter.visualization_records(batch, {"conditions": adapter.to_feature_dict(attributions)["conditions"]})
    with pytest.raises(ValueError, match="shape"):
        adapter.visualization_records(batch, {k: v[:2] for k, v in adapter.to_feature_dict(attributions).items()})


def test_captum_visualize_text_renders_the_records(chefer_records):
    pytest.importorskip("IPython")
    _, records = chefer_records
    html = captum_viz.visualize_text(records).data
    assert "#conditions" in html and "C0" in html


def test_html_file_highlights_the_tokens(planted, chefer_records, tmp_path):
    _, records = chefer_records
    path = write_html(records, tmp_path / "out" / "chefer.html", title="Chefer <planted>")
    text = path.read_text()
    assert "<title>Chefer &lt;planted&gt;</title>" in text
    assert not re.search(r"(src|href)=", text)  # self-contained
    marks = re.findall(r'<mark style="background-color: (hsl\([^)]*\))[^>]*><font color="black">\s*([^<\s]+)', text)
    assert len(marks) == sum(len(r.raw_input_ids) for r in records)
    # The planted code carries the largest Chefer relevance of a positive sample: full green.
    positive = [i for i, r in enumerate(records) if r.pred_class == "1"]
    assert positive
    row = text.split("<tr>")[2 + positive[0]]
    colour_and_word = r'background-color: (hsl\([^)]*\))[^>]*><font color="black">\s*([^<\s]+)'
    colours = {w: c for c, w in re.findall(colour_and_word, row)}
    assert colours["C0"] == "hsl(120, 75%, 50%)"
    assert colours["#conditions"] == "hsl(0, 75%, 100%)"


def test_html_escapes_codes():
    record = captum_viz.VisualizationDataRecord(torch.tensor([1.0]), 0.9, "1", "1", "1", 1.0, ["a<b&c"], None)
    text = render_html([record])
    assert "a&lt;b&amp;c" in text and "a<b" not in text
    with pytest.raises(TypeError, match="VisualizationDataRecord"):
        render_html(["not a record"])


def test_plot_methods_heat_maps(planted):
    adapter, batch = planted
    result = compare_methods(
        adapter, batch,
        [CheferAttribution(adapter), ("IG", IntegratedGradients(adapter), {"n_steps": 8}), Saliency(adapter)],
    )
    sample = 1
    fig = plot_methods(adapter, batch, result, sample=sample)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["conditions", "procedures"]
    n_codes = [int((batch[k][sample] != 0).sum()) for k in ("conditions", "procedures")]
    for ax, n in zip(panels, n_codes, strict=True):
        image = ax.get_images()[0].get_array()
        assert image.shape == (3, n)
        assert len(ax.get_xticklabels()) == n
    # Each method's row is scaled by its largest |score| over both streams.
    both = np.concatenate([ax.get_images()[0].get_array() for ax in panels], axis=1)
    np.testing.assert_allclose(np.abs(both).max(axis=1), 1.0, rtol=1e-6)
    assert [t.get_text() for t in panels[0].get_yticklabels()] == ["Chefer", "IG", "Saliency"]
    # From the plain scores dict, the same picture.
    again = plot_methods(adapter, batch, result.scores, sample=sample)
    np.testing.assert_array_equal(again.axes[0].get_images()[0].get_array(), panels[0].get_images()[0].get_array())
    with pytest.raises(IndexError):
        plot_methods(adapter, batch, result, sample=99)
    with pytest.raises(TypeError, match="batch"):
        plot_methods(adapter, None, result.scores)


@pytest.mark.skipif(hasattr(matplotlib.cm, "get_cmap"), reason="this matplotlib still has cm.get_cmap")
def test_captum_timeseries_plot_needs_and_gets_the_fix():
    attr, data = np.random.rand(5, 2), np.random.rand(5, 2)
    with pytest.raises(AttributeError, match="get_cmap"):
        captum_viz.visualize_timeseries_attr(attr, data, use_pyplot=False)
    fig, axes = visualize_timeseries_attr(attr, data, method="colored_graph", cmap="viridis", use_pyplot=False)
    assert len(axes) == 2 and fig is not None
    assert not hasattr(matplotlib.cm, "get_cmap")  # the shim is gone again
    with captum_matplotlib_compat():
        assert matplotlib.cm.get_cmap("viridis", 4).N == 4


def test_several_methods_on_one_page(planted, tmp_path):
    adapter, batch = planted
    inputs, args = adapter.captum_inputs(batch)
    target = adapter.captum_target(batch)
    chefer = adapter.visualization_records(
        batch, CheferAttribution(adapter).attribute(inputs, additional_forward_args=args, target=target),
        method="Chefer")
    ig = adapter.visualization_records(
        batch, IntegratedGradients(adapter).attribute(inputs, additional_forward_args=args, target=target, n_steps=4),
        method="IG")
    assert {r.method for r in chefer} == {"Chefer"} and {r.method for r in ig} == {"IG"}
    page = render_methods_html(chefer + ig, sample_names=batch["patient_id"])  # a flat list, grouped by method
    assert page == render_methods_html({"Chefer": chefer, "IG": ig}, sample_names=batch["patient_id"])
    sections = page.split("<h3>")[1:]
    assert [s.split("</h3>")[0] for s in sections] == list(batch["patient_id"])
    for section, c, i in zip(sections, chefer, ig, strict=True):
        rows = section.split("<tr>")[2:]
        assert [r.split("</td>")[0] for r in rows] == ["<td class='method'>Chefer", "<td class='method'>IG"]
        assert f"{c.attr_score:.2f}" in rows[0] and f"{i.attr_score:.2f}" in rows[1]
        for word in c.raw_input_ids:  # Captum shows "<conditions>" as "#conditions"
            assert html.escape(captum_viz.format_special_tokens(word)) in rows[0]
    # a comparison's scores give the same page
    result = compare_methods(adapter, batch, [CheferAttribution(adapter)], progress=False)
    by_method = records_by_method(adapter, batch, result)
    assert [r.word_attributions.tolist() for r in by_method["Chefer"]] == [r.word_attributions.tolist() for r in chefer]
    path = write_methods_html(by_method, tmp_path / "page.html", title="Chefer")
    assert path.read_text().count("<td class='method'>Chefer</td>") == len(chefer)


def test_several_methods_page_refuses_what_it_cannot_align(planted, chefer_records):
    _, records = chefer_records  # made without a method name
    with pytest.raises(ValueError, match="carries no method name"):
        render_methods_html(records)
    with pytest.raises(ValueError, match="one record per sample"):
        render_methods_html({"a": records, "b": records[:2]})
    with pytest.raises(ValueError, match="sample_names has 1 names"):
        render_methods_html({"a": records}, sample_names=["x"])


def test_plot_methods_outlines_the_planted_codes(planted):
    from matplotlib.patches import Rectangle

    adapter, batch = planted
    samples = {s["patient_id"]: s for s in make_planted_samples()}
    sample = next(i for i, pid in enumerate(batch["patient_id"]) if "C0" in samples[pid]["conditions"])
    position = samples[batch["patient_id"][sample]]["conditions"].index("C0")  # from the raw sample, not the adapter
    truth = {"conditions": torch.zeros_like(batch["conditions"], dtype=torch.bool),
             "procedures": torch.zeros_like(batch["procedures"], dtype=torch.bool)}
    truth["conditions"][sample, position] = True
    result = compare_methods(adapter, batch, [CheferAttribution(adapter), Saliency(adapter)], progress=False)
    fig = plot_methods(adapter, batch, result, sample=sample, planted=truth)
    conditions, procedures = [ax for ax in fig.axes if ax.get_title()]
    boxes = [p for p in conditions.patches if isinstance(p, Rectangle)]
    assert len(boxes) == 1 and boxes[0].get_x() == position - 0.5 and boxes[0].get_height() == 2  # both methods' rows
    labels = conditions.get_xticklabels()
    assert labels[position].get_text() == "*C0" and labels[position].get_fontweight() == "bold"
    assert all(not t.get_text().startswith("*") for j, t in enumerate(labels) if j != position)
    assert not procedures.patches
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["outlined *code: planted code (ground truth)"]
    # the heat maps themselves are unchanged by the marks
    plain = plot_methods(adapter, batch, result, sample=sample)
    np.testing.assert_array_equal(plain.axes[0].get_images()[0].get_array(), conditions.get_images()[0].get_array())
    assert not plain.legends
    other = next(i for i, pid in enumerate(batch["patient_id"]) if "C0" not in samples[pid]["conditions"])
    none = plot_methods(adapter, batch, result, sample=other, planted=truth)
    assert none.legends[0].get_texts()[0].get_text().endswith("; none in this sample")
    with pytest.raises(KeyError, match="planted has no mask for feature 'procedures'; it has \\['conditions'\\]"):
        plot_methods(adapter, batch, result, sample=sample, planted={"conditions": truth["conditions"]})


def test_method_colors_are_fixed_for_known_methods_and_stable_for_others():
    from matplotlib.colors import to_rgba

    from captum_chefer.report import default_methods
    from captum_chefer.synthetic import toy_model_and_batch
    from captum_chefer.visualization import METHOD_COLORS, method_color, method_colors

    names = [name for name, _, _ in default_methods(PyHealthAdapter(toy_model_and_batch()[0]))]
    colors = method_colors(names)
    assert all(name in METHOD_COLORS for name in names)  # every method of the report has its fixed colour
    assert len(set(colors.values())) == len(names) and colors["Random"] == "#7f7f7f"
    assert all(to_rgba(c) for c in colors.values())  # matplotlib colours
    # short names share the colour of the method they name; order and company do not change a colour
    assert method_color("IG") == colors["Integrated Gradients"]
    assert method_color("SmoothGrad") == colors["NoiseTunnel (SmoothGrad)"]
    assert method_color("Chefer") == colors["Chefer (PyHealth)"] and method_color("random (seed 3)") == "#7f7f7f"
    assert method_colors(reversed(names)) == colors and method_colors(["Saliency"])["Saliency"] == colors["Saliency"]
    # unknown names: the same colour in every call, none of the known colours, distinct within a figure
    others = [f"ablation {i}" for i in range(10)]
    picked = method_colors(others)
    assert picked == method_colors(list(reversed(others))) and len(set(picked.values())) == 10
    assert not set(picked.values()) & set(METHOD_COLORS.values())
    assert method_color("ablation 3") == method_color("ablation 3")
