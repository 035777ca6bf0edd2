"""The notebooks are saved with their outputs at the small size, and re-executing them gives those outputs.

``tools/run_notebooks.py`` executes and saves them (``make notebooks``); its ``comparable_outputs`` says
what must match: every text output of every code cell not tagged ``unseeded``, and which cells show images.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "tools" / "run_notebooks.py")
run_notebooks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_notebooks)

NOTEBOOKS = run_notebooks.all_notebooks()


def test_the_notebooks_are_there():
    assert [p.stem for p in NOTEBOOKS] == ["01_quickstart", "02_side_by_side", "03_ablation", "04_images_and_text", "05_generation"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_saved_with_outputs_of_the_small_run(path):
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code), f"{path.name}: run tools/run_notebooks.py {path.name}"
    first = "".join(output.get("text", "") for output in code[0].outputs)
    assert "small run" in first, f"{path.name}: save it executed at the small size (tools/run_notebooks.py)"
    assert run_notebooks.problems(notebook) == [], f"{path.name}: saved with errors or stderr output"


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
