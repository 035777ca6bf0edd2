"""Execute the notebooks at the small size the tests use and save them with their outputs.

    python tools/run_notebooks.py                      # every notebooks/*.ipynb
    python tools/run_notebooks.py notebooks/02_side_by_side.ipynb
    python tools/run_notebooks.py --check              # execute, compare with the saved outputs, write nothing
    make notebooks                                     # the same as the first line

Each notebook runs in a fresh kernel with ``CAPTUM_CHEFER_SMALL=1`` (the small size), progress bars off
(``TQDM_DISABLE=1``), one torch thread and this checkout first on ``PYTHONPATH``, from the notebooks folder.

What must match when the tests re-execute a notebook (:func:`comparable_outputs`): the text of every output
(streams, ``text/plain``, ``text/html``, ``text/markdown``, errors) of every code cell, and which cells show
an image. Not compared: image bytes (they depend on the renderer), execution counts, and the outputs of
cells tagged ``unseeded`` (cell metadata ``"tags": ["unseeded"]``), which hold wall times or anything else
that is not seeded. Put such numbers in cells of their own and tag them.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
UNSEEDED = "unseeded"
ENVIRONMENT = {"CAPTUM_CHEFER_SMALL": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
TEXT_TYPES = ("text/plain", "text/html", "text/markdown")


def all_notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


@contextmanager
def _environment(extra: dict[str, str]) -> Iterator[None]:
    """The kernel inherits this process's environment: set the variables for the duration."""
    saved = {key: os.environ.get(key) for key in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def execute(path: Path, timeout: int = 900) -> Any:
    """The notebook at ``path`` executed top to bottom in a fresh kernel (the file is not changed)."""
    notebook = nbformat.read(path, as_version=4)
    python_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    with _environment({**ENVIRONMENT, "PYTHONPATH": python_path}):
        client = NotebookClient(
            notebook, timeout=timeout, kernel_name="python3", record_timing=False,
            resources={"metadata": {"path": str(path.parent)}},
        )
        client.execute()
    return notebook


def comparable_outputs(notebook: Any) -> list[Optional[list[tuple[str, str]]]]:
    """Per code cell, what must be the same run after run: ``None`` for cells tagged ``unseeded``."""
    cells: list[Optional[list[tuple[str, str]]]] = []
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        if UNSEEDED in cell.get("metadata", {}).get("tags", []):
            cells.append(None)
            continue
        outputs = []
        for output in cell.get("outputs", []):
            kind = output.get("output_type")
            if kind == "stream":
                outputs.append((f"stream:{output.get('name')}", output.get("text", "")))
            elif kind in ("display_data", "execute_result"):
                data = output.get("data", {})
                for mime in TEXT_TYPES:
                    if mime in data:
                        text = data[mime]
                        outputs.append((mime, text if isinstance(text, str) else "".join(text)))
                if any(mime.startswith("image/") for mime in data):
                    outputs.append(("image", "an image"))
            elif kind == "error":
                outputs.append(("error", f"{output.get('ename')}: {output.get('evalue')}"))
        cells.append(_merge_streams(outputs))
    return cells


def _merge_streams(outputs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Consecutive chunks of one stream as one text (the kernel splits streams where it likes)."""
    merged: list[tuple[str, str]] = []
    for kind, text in outputs:
        if merged and kind.startswith("stream:") and merged[-1][0] == kind:
            merged[-1] = (kind, merged[-1][1] + text)
        else:
            merged.append((kind, text))
    return merged


def problems(notebook: Any) -> list[str]:
    """Errors and anything written to stderr (warnings, progress bars) in a notebook's outputs."""
    found = []
    for index, cell in enumerate(c for c in notebook.cells if c.cell_type == "code"):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                found.append(f"code cell {index}: {output.get('ename')}: {output.get('evalue')}")
            elif output.get("output_type") == "stream" and output.get("name") == "stderr":
                found.append(f"code cell {index} wrote to stderr: {output.get('text', '')[:300]!r}")
    return found


def differences(saved: Any, fresh: Any) -> list[str]:
    """Where the comparable outputs of two runs of one notebook differ."""
    a, b = comparable_outputs(saved), comparable_outputs(fresh)
    if len(a) != len(b):
        return [f"{len(a)} code cells saved, {len(b)} executed"]
    out = []
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            out.append(f"code cell {index}: saved {x!r:.400} but now {y!r:.400}")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks to run (default: every notebooks/*.ipynb)")
    parser.add_argument("--check", action="store_true", help="compare with the saved outputs instead of saving")
    args = parser.parse_args(argv)
    paths = [p.resolve() for p in args.notebooks] or all_notebooks()
    failed = False
    for path in paths:
        print(f"executing {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} ...", flush=True)
        fresh = execute(path)
        trouble = problems(fresh)
        if args.check:
            trouble += differences(nbformat.read(path, as_version=4), fresh)
        for line in trouble:
            print(f"  {line}")
        failed |= bool(trouble)
        if not args.check and not problems(fresh):
            nbformat.write(fresh, path)
            print(f"  saved with outputs")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
