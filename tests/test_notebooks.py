"""The notebooks are saved with their outputs at the small size, and re-executing them gives those outputs.

``tools/run_notebooks.py`` executes and saves them (``make notebooks``); its docstring states what must match:
the text of every output of every code cell not tagged ``unseeded`` with the numbers taken out, exactly; each
number within the cell's tolerance; and which outputs are images. The rule itself is tested here on hand-made
cells, with cases that must pass and cases that must fail.
"""

from __future__ import annotations

import copy
import doctest
import importlib.util
import os
import platform
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "tools" / "run_notebooks.py")
run_notebooks = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = run_notebooks  # dataclasses look their module up here
spec.loader.exec_module(run_notebooks)

NOTEBOOKS = run_notebooks.all_notebooks()


def test_the_notebooks_are_there():
    assert [p.stem for p in NOTEBOOKS] == [
        "01_quickstart", "02_side_by_side", "03_ablation", "04_images_and_text", "05_generation",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_saved_with_outputs_of_the_small_run(path):
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code), (
        f"{path.name}: run tools/run_notebooks.py {path.name}"
    )
    first = "".join(output.get("text", "") for output in code[0].outputs)
    assert "small run" in first, f"{path.name}: save it executed at the small size (tools/run_notebooks.py)"
    assert run_notebooks.problems(notebook) == [], f"{path.name}: saved with errors or stderr output"
    for cell in code:  # a stated tolerance is well formed
        run_notebooks.cell_tolerance(cell)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_claim_of_a_saved_notebook_holds(path):
    """A notebook prints each claim its prose makes as 'holds: ...'; none is saved as not holding."""
    notebook = nbformat.read(path, as_version=4)
    text = "".join(text for cell in run_notebooks.comparable_outputs(notebook) if cell for _, text in cell)
    assert "holds: " in text, f"{path.name}: no claim is checked"
    assert run_notebooks.claims_not_holding(notebook) == [], f"{path.name}: change the prose or the code"


def test_comparable_outputs_rule():
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = [
        nbformat.v4.new_output("stream", name="stdout", text="a"),
        nbformat.v4.new_output("stream", name="stdout", text="b\n"),
        nbformat.v4.new_output("display_data", data={"image/png": "iVBOR", "text/plain": "<Figure>"}),
    ]
    timed = nbformat.v4.new_code_cell("t")
    timed.metadata["tags"] = ["unseeded"]
    timed.outputs = [nbformat.v4.new_output("stream", name="stdout", text="12 ms")]
    notebook = nbformat.v4.new_notebook(cells=[cell, nbformat.v4.new_markdown_cell("m"), timed])
    assert run_notebooks.comparable_outputs(notebook) == [
        [("stream:stdout", "ab\n"), ("text/plain", "<Figure>"), ("image", "an image")],
        None,
    ]


def test_the_rule_of_the_module_docstring():
    """The examples in tools/run_notebooks.py (numbers, tolerances, text differences) run as doctests."""
    failures, tried = doctest.testmod(run_notebooks, optionflags=doctest.ELLIPSIS)
    assert tried >= 6 and failures == 0


def _notebook(text: str, tolerance: dict | None = None, unseeded: str = "3 ms", image: str = "iVBOR") -> Any:
    """A notebook of one printing cell (with a stated tolerance), one unseeded cell and one figure."""
    cell = nbformat.v4.new_code_cell("print(...)")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=text)]
    if tolerance is not None:
        cell.metadata["tolerance"] = tolerance
    timed = nbformat.v4.new_code_cell("print(time)")
    timed.metadata["tags"] = ["unseeded"]
    timed.outputs = [nbformat.v4.new_output("stream", name="stdout", text=unseeded)]
    figure = nbformat.v4.new_code_cell("figure")
    data = {"image/png": image, "text/plain": "<Figure size 640x480 with 1 Axes>"}
    figure.outputs = [nbformat.v4.new_output("display_data", data=data)]
    return nbformat.v4.new_notebook(cells=[cell, timed, figure])


SAVED = "p00146: top code planted for 19 of 27 (70%), AUROC 0.378 [0.301, 0.451]\nholds: IG is better (+0.051)\n"
TRAINED = {"rtol": 0.1, "atol": 0.02, "counts": 2, "why": "a trained model"}

MUST_PASS = [
    ("the same text", SAVED, None),
    ("a last digit rounds the other way", SAVED.replace("0.378", "0.379").replace("70%", "71%"), None),
    ("within 1% plus a printed unit", SAVED.replace("0.451", "0.456"), None),
    ("column alignment", SAVED.replace("of 27", "of  27").replace(" [", "\t["), None),
    ("a count within the cell's stated counts", SAVED.replace("19 of", "21 of"), TRAINED),
    ("a measurement within the cell's rtol and atol",
     SAVED.replace("0.378", "0.41").replace("+0.051", "+0.06"), TRAINED),
    ("a difference of about zero changes its sign", SAVED.replace("+0.051", "-0.000"), {"atol": 0.06}),
    ("a figure's numbers, where the cell ignores them", SAVED.replace("70%", "12%").replace("19 of", "3 of"),
     {"ignore_numbers": True, "why": "a colour-coded figure"}),
]

MUST_FAIL = [
    ("a changed verdict", SAVED.replace("IG is better", "Chefer is better"), TRAINED),
    ("a claim that no longer holds", SAVED.replace("holds:", "DOES NOT HOLD:"), TRAINED),
    ("a changed identifier", SAVED.replace("p00146", "p00147"), TRAINED),
    ("a count off by one, counts exact by default", SAVED.replace("19 of", "20 of"), None),
    ("a count beyond the stated counts", SAVED.replace("19 of", "22 of"), TRAINED),
    ("a number far outside the tolerance", SAVED.replace("70%", "12%"), TRAINED),
    ("a measurement just beyond the default", SAVED.replace("0.378", "0.384"), None),
    ("a number more", SAVED.replace("(+0.051)", "(+0.051, 35 patients)"), TRAINED),
    ("a line less", SAVED.split("\n")[0] + "\n", TRAINED),
    ("a percentage that became a fraction", SAVED.replace("(70%)", "(0.70)"), TRAINED),
    ("a figure's words, where the cell ignores its numbers",
     SAVED.replace("IG is", "Chefer is"), {"ignore_numbers": True}),
]


@pytest.mark.parametrize("case, fresh, tolerance", MUST_PASS, ids=[c[0] for c in MUST_PASS])
def test_rule_passes(case, fresh, tolerance):
    saved = _notebook(SAVED, tolerance)
    again = _notebook(fresh, tolerance, unseeded="97 ms", image="R0lGOD")  # wall time and image bytes: not compared
    assert run_notebooks.differences(saved, again) == [], case


@pytest.mark.parametrize("case, fresh, tolerance", MUST_FAIL, ids=[c[0] for c in MUST_FAIL])
def test_rule_fails(case, fresh, tolerance):
    found = run_notebooks.differences(_notebook(SAVED, tolerance), _notebook(fresh, tolerance))
    assert len(found) == 1 and found[0].startswith("code cell 0 (stream:stdout): "), (case, found)


def test_rule_fails_when_a_figure_is_gone_or_a_cell_errs():
    saved = _notebook(SAVED)
    without_figure = copy.deepcopy(saved)
    without_figure.cells[2].outputs[0]["data"].pop("image/png")
    assert run_notebooks.differences(saved, without_figure) == [
        "code cell 2: saved outputs ['text/plain', 'image'], now ['text/plain']"]
    failed = copy.deepcopy(saved)
    failed.cells[0].outputs = [nbformat.v4.new_output("error", ename="KeyError", evalue="'Chefer'", traceback=[])]
    assert run_notebooks.differences(saved, failed) == ["code cell 0: saved outputs ['stream:stdout'], now ['error']"]


def test_a_stated_tolerance_must_be_well_formed():
    cell = nbformat.v4.new_code_cell("x")
    cell.metadata["tolerance"] = {"rtol": 0.1, "relative": 0.1}
    with pytest.raises(ValueError, match="unknown tolerance keys \\['relative'\\]"):
        run_notebooks.cell_tolerance(cell)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_an_edited_conclusion_or_number_of_a_saved_notebook_fails(path):
    """On the real saved outputs: a number of a compared cell moved far outside its tolerance, or a word of a
    claim changed, is a difference; the saved notebook against itself is none."""
    saved = nbformat.read(path, as_version=4)
    assert run_notebooks.differences(saved, saved) == []
    claims = [cell for cell in saved.cells if cell.cell_type == "code" and any(
        "holds" in output.get("text", "") for output in cell.outputs)]
    assert claims, f"{path.name}: no cell prints a checked claim"
    reworded = copy.deepcopy(saved)
    for cell in reworded.cells:
        for output in cell.get("outputs", []):
            if "holds" in output.get("text", ""):
                output["text"] = output["text"].replace("holds", "DOES NOT HOLD", 1)
                break
        else:
            continue
        break
    assert len(run_notebooks.differences(saved, reworded)) == 1
    moved = copy.deepcopy(saved)
    cell = next(cell for cell in moved.cells if cell.cell_type == "code" and "tags" not in cell.metadata and any(
        run_notebooks.split_numbers(output.get("text", ""))[1] for output in cell.outputs))
    output = next(output for output in cell.outputs if run_notebooks.split_numbers(output.get("text", ""))[1])
    number = run_notebooks.NUMBER.search(output["text"])
    far = f"{float(number.group().rstrip('%')) * 10 + 1000:g}" + ("%" if number.group().endswith("%") else "")
    output["text"] = output["text"][: number.start()] + far + output["text"][number.end():]
    assert len(run_notebooks.differences(saved, moved)) == 1


def test_the_kernel_runs_deterministic_with_the_threads_and_settings_asked_for(tmp_path, monkeypatch):
    """The kernel's own settings: deterministic algorithms, seeds, and the threads and last-bit settings of the
    variables, applied before every cell even where a notebook sets its own threads; on x86-64 torch's kernels
    and oneDNN pinned to AVX2 and MKL in its reproducible mode, where the environment does not say otherwise."""
    cell = nbformat.v4.new_code_cell(
        "import os\nimport torch\ntorch.set_num_threads(1)\n")
    probe = nbformat.v4.new_code_cell(
        "print(torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.backends.mkldnn.enabled,\n"
        "      torch.get_float32_matmul_precision(), torch.initial_seed(), torch.backends.cpu.get_cpu_capability(),\n"
        "      os.environ.get('MKL_CBWR'), os.environ.get('ONEDNN_MAX_CPU_ISA'))")
    path = tmp_path / "probe.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[cell, probe]), path)
    monkeypatch.setenv(run_notebooks.THREADS, "2")
    monkeypatch.setenv(run_notebooks.TORCH_SETTINGS, "no-mkldnn,matmul=medium")
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")  # set by the user: kept
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    executed = run_notebooks.execute(path, timeout=120)
    assert run_notebooks.problems(executed) == []
    settings = "2 True False medium 0"
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert executed.cells[1].outputs[0]["text"] == settings + " AVX2 COMPATIBLE AVX2\n"
    else:
        assert executed.cells[1].outputs[0]["text"].startswith(settings + " ")
    assert "ATEN_CPU_CAPABILITY" not in os.environ  # the pins are set for the kernel only


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_reproduces_its_saved_outputs(path):
    saved = nbformat.read(path, as_version=4)
    fresh = run_notebooks.execute(path)
    assert run_notebooks.problems(fresh) == []  # no error, no warning or progress bar on stderr
    assert run_notebooks.differences(saved, fresh) == [], f"{path.name}: rerun tools/run_notebooks.py {path.name}"
    for cell in fresh.cells:  # a figure shows as an image, not as "<Figure size ...>" text alone
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if str(data.get("text/plain", "")).startswith("<Figure"):
                assert "image/png" in data, f"{path.name}: a figure did not render"


def test_an_unknown_torch_setting_is_refused_before_a_kernel_starts(monkeypatch):
    monkeypatch.setenv(run_notebooks.TORCH_SETTINGS, "no-mkldnn,matmul=low")
    with pytest.raises(ValueError, match="unknown setting 'matmul=low' in CAPTUM_CHEFER_NOTEBOOK_TORCH"):
        run_notebooks.execute(NOTEBOOKS[0])
