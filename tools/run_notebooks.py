"""Execute the notebooks at the small size the tests use and save them with their outputs.

    python tools/run_notebooks.py                      # every notebooks/*.ipynb
    python tools/run_notebooks.py notebooks/02_side_by_side.ipynb
    python tools/run_notebooks.py --check              # execute, compare with the saved outputs, write nothing
    make notebooks                                     # the same as the first line

How a notebook runs
-------------------
Each notebook runs in a fresh kernel, from the notebooks folder, with ``CAPTUM_CHEFER_SMALL=1`` (the small
size), progress bars off (``TQDM_DISABLE=1``), ``PYTHONHASHSEED=0`` and this checkout first on
``PYTHONPATH``. Before the first cell the kernel calls ``torch.use_deterministic_algorithms(True)`` and seeds
torch, ``random`` and numpy with 0; before every cell it sets torch's number of threads (whatever the
notebook itself asks for) and the torch settings below. Run to run on one machine, the outputs are then the
same to the last bit.

On x86-64 the kernel also takes one vector code path whatever the CPU offers (:data:`PINNED_CPU`):
``ATEN_CPU_CAPABILITY=avx2`` (torch's own kernels), ``MKL_CBWR=AVX2`` (MKL's reproducible mode) and
``ONEDNN_MAX_CPU_ISA=AVX2`` (oneDNN). Without the pins, a model trained in a notebook on an AVX-512 CPU and on
an AVX2-only one differs in its last bits from the first steps, and the difference grows with training: the hit
counts of notebook 05 moved from 31 to 26 of 32 (17 to 31 over four code paths). With them, the AVX-512 CPU
reproduces the AVX2 one's outputs exactly. A variable already set in the environment is kept, so another code
path can be imitated.

Two variables change what the kernel does, to show that the comparison below holds on another machine
(``make test`` leaves them unset):

* ``CAPTUM_CHEFER_NOTEBOOK_THREADS``: torch's intra-op threads in the kernel (default 1), also set as
  ``OMP_NUM_THREADS``; ``--threads N`` sets it.
* ``CAPTUM_CHEFER_NOTEBOOK_TORCH``: comma-separated torch settings: ``no-mkldnn``
  (``torch.backends.mkldnn.enabled = False``), ``flush-denormal`` (``torch.set_flush_denormal(True)``),
  ``matmul=medium`` (``torch.set_float32_matmul_precision("medium")``: bfloat16 products where the CPU has
  them, a far larger change than another CPU makes); ``--torch SETTINGS`` sets it.

The kernel inherits this process's environment, so the vector code path the pins choose can be changed
too: AVX-512 (``ATEN_CPU_CAPABILITY=avx512 MKL_CBWR=AUTO ONEDNN_MAX_CPU_ISA=ALL``, on a CPU that has it), or
none of the vector units (``ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE``, slow). For example::

    CAPTUM_CHEFER_NOTEBOOK_THREADS=2 ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE \\
        python -m pytest tests/test_notebooks.py
    python tools/run_notebooks.py --check --threads 2 --torch no-mkldnn,flush-denormal --out /tmp/fresh

``--check`` also says how many compared numbers came out written differently from the saved ones (the
tolerance at work); ``--out DIR`` writes the executed notebooks there instead of in place; ``--full --out DIR``
runs them at the full size, to see that their claims hold there too.

What must match when the tests re-execute a notebook
-----------------------------------------------------
Floating-point results of training differ between CPUs, so a saved output is not compared character by
character. What a reader relies on is (:func:`differences`):

* **The text, with the numbers taken out, exactly**: every stream, ``text/plain``, ``text/markdown`` and
  ``text/html`` output (tables included) and every error of every code cell, with each number replaced by a
  placeholder and each run of spaces or tabs read as one space (column alignment is layout). Words,
  names, identifiers such as ``p00146`` or ``C056`` (digits that touch a letter or ``_`` are not numbers),
  bold marks and verdicts must be the same.
* **Each number within a tolerance** (:class:`Tolerance`). A number is an optional sign, digits, an
  optional fraction and exponent; a ``%`` after it stays in the text. A *count* (a plain integer) must
  equal the saved one within ``counts`` (default 0: exact). A *measurement* (written with a fraction, an
  exponent or a ``%``) must satisfy ``|fresh - saved| <= atol + rtol * |saved| + unit``, where ``unit`` is
  one unit of the saved number's last printed digit (0.001 for ``0.378``, 1 for ``70%``): rounding at the
  printed precision is not a difference. Defaults: ``rtol=0.01``, ``atol=0``.
* **Figures render**: which outputs are images, not their bytes.

A cell whose outputs depend on a trained model states its own tolerance in its metadata, for example
``"tolerance": {"rtol": 0.1, "atol": 0.02, "counts": 2, "why": "hit counts over 16 words of a trained
model"}`` (a count of 16 may move by 2; ``atol`` is in the printed units, percentage points for a ``%``).
A colour-coded figure drawn in HTML (Captum's ``visualize_text``) states ``"ignore_numbers": true``: its
words are compared, its colours and numbers are not, as an image's bytes are not (the colour of a score near
zero may turn from red to green). So does a cell whose numbers swing with the last bits of a training run
(notebook 05's hit counts): its words and its claims are compared, and its ``why`` gives the range seen.

The conclusions the prose draws must not ride on such tolerances: the cell that computes them prints each
claim of the prose as ``holds: <claim> (<numbers>)`` or ``DOES NOT HOLD: <claim> (...)``, decided from
intervals, and words are compared exactly; a statement generated from the numbers names a method only where
its interval clears the others. A silently changed conclusion then fails the test, a changed last digit does
not; and no notebook is saved with a claim that does not hold (``tests/test_notebooks.py``; the run says so).
Choose claims that hold with a margin, not ones that sit on the edge of their interval, and that hold at the
full size too (``--full --out DIR``).

Not compared: image bytes, execution counts, and every output of cells tagged ``unseeded`` (cell metadata
``"tags": ["unseeded"]``), which hold wall times or anything else that is not seeded. Put such numbers in
cells of their own and tag them.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
UNSEEDED = "unseeded"
TOLERANCE = "tolerance"
THREADS = "CAPTUM_CHEFER_NOTEBOOK_THREADS"
TORCH_SETTINGS = "CAPTUM_CHEFER_NOTEBOOK_TORCH"
ENVIRONMENT = {"CAPTUM_CHEFER_SMALL": "1", "TQDM_DISABLE": "1", "PYTHONHASHSEED": "0"}
# One vector code path on every x86-64 CPU (the module docstring); a value set in the environment wins.
PINNED_CPU = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
TEXT_TYPES = ("text/plain", "text/html", "text/markdown")

# Runs in the kernel before the first cell (an IPython startup file of a profile made for the run).
KERNEL_SETUP = f'''
import os as _os
import random as _random

import torch as _torch


def _captum_chefer_settings(*_ignored):
    """Threads and last-bit settings, applied before every cell (a notebook may set its own threads)."""
    _torch.set_num_threads(int(_os.environ.get("{THREADS}") or 1))
    for _setting in filter(None, (_os.environ.get("{TORCH_SETTINGS}") or "").split(",")):
        _name, _, _value = _setting.strip().partition("=")
        if _name == "no-mkldnn":
            _torch.backends.mkldnn.enabled = False
        elif _name == "flush-denormal":
            _torch.set_flush_denormal(True)
        elif _name == "matmul":
            _torch.set_float32_matmul_precision(_value)
        else:
            raise ValueError(
                f"unknown setting {{_setting!r}} in {TORCH_SETTINGS}: use no-mkldnn, flush-denormal, matmul=high"
            )


_torch.use_deterministic_algorithms(True)
_torch.manual_seed(0)
_random.seed(0)
try:
    import numpy as _numpy

    _numpy.random.seed(0)
except ImportError:
    pass
_captum_chefer_settings()
get_ipython().events.register("pre_run_cell", _captum_chefer_settings)
'''


def all_notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


@contextmanager
def _environment(extra: Mapping[str, str]) -> Iterator[None]:
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


def execute(path: Path, timeout: int = 900, small: bool = True) -> Any:
    """The notebook at ``path`` executed top to bottom in a fresh kernel (the file is not changed); ``small=False``
    runs the full size (``CAPTUM_CHEFER_SMALL=0``)."""
    for setting in filter(None, (os.environ.get(TORCH_SETTINGS) or "").split(",")):
        name, _, value = setting.strip().partition("=")
        known = name in ("no-mkldnn", "flush-denormal") and not value
        known |= name == "matmul" and value in ("highest", "high", "medium")
        if not known:
            raise ValueError(
                f"unknown setting {setting!r} in {TORCH_SETTINGS}: use no-mkldnn, flush-denormal, matmul=medium")
    notebook = nbformat.read(path, as_version=4)
    python_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    threads = os.environ.get(THREADS) or "1"
    with tempfile.TemporaryDirectory(prefix="ipython-") as ipython_dir:
        startup = Path(ipython_dir) / "profile_default" / "startup"
        startup.mkdir(parents=True)
        (startup / "00-deterministic.py").write_text(KERNEL_SETUP)
        pinned = PINNED_CPU if platform.machine().lower() in ("x86_64", "amd64") else {}
        extra = {
            **{key: os.environ.get(key) or value for key, value in pinned.items()}, **ENVIRONMENT,
            "CAPTUM_CHEFER_SMALL": "1" if small else "0", "PYTHONPATH": python_path,
            "IPYTHONDIR": ipython_dir, "OMP_NUM_THREADS": threads,
        }
        with _environment(extra):
            client = NotebookClient(
                notebook, timeout=timeout, kernel_name="python3", record_timing=False,
                resources={"metadata": {"path": str(path.parent)}},
            )
            client.execute()
    return notebook


# ----------------------------------------------------------------------------------------------------------
# What is compared


@dataclass(frozen=True)
class Tolerance:
    """How far a fresh number may lie from the saved one (see the module docstring).

    Example (``0.378`` saved: one printed unit, 0.001, plus 1% of 0.378 is allowed by default):
        >>> Tolerance().allows("0.378", "0.382"), Tolerance().allows("0.378", "0.383")
        (True, False)
        >>> Tolerance().allows("19", "20"), Tolerance(counts=2).allows("19", "21")
        (False, True)
    """

    rtol: float = 0.01
    atol: float = 0.0
    counts: int = 0
    ignore_numbers: bool = False

    def allows(self, saved: str, fresh: str) -> bool:
        """Whether the number written ``fresh`` matches the number written ``saved``."""
        if self.ignore_numbers:
            return True
        a, b = _value(saved), _value(fresh)
        if _is_count(saved) and _is_count(fresh):
            return abs(a - b) <= self.counts
        return abs(a - b) <= self.atol + self.rtol * abs(a) + _unit(saved)


def cell_tolerance(cell: Any) -> Tolerance:
    """The tolerance a code cell states in its metadata (``"tolerance": {...}``), else the defaults."""
    stated = dict(cell.get("metadata", {}).get(TOLERANCE, {}))
    stated.pop("why", None)
    unknown = set(stated) - {"rtol", "atol", "counts", "ignore_numbers"}
    if unknown:
        raise ValueError(
            f"unknown tolerance keys {sorted(unknown)} in a cell's metadata: "
            "use rtol, atol, counts, ignore_numbers (and why)")
    return Tolerance(**stated)


# A number: not glued to a letter, digit, "_" or "." before it (so p00146, C056, v2 and vit_b_16 stay text),
# optional sign, digits, optional fraction and exponent, not followed by a letter, digit or "_" (10px, 1340x490
# stay text). "nan" and "inf" are words: they stay in the text.
NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?(?:%|(?!\.?\w))")
SPACES = re.compile(r"[ \t]+")


def _value(number: str) -> float:
    return float(number.rstrip("%"))


def _is_count(number: str) -> bool:
    return not any(c in number for c in ".eE%")


def _unit(number: str) -> float:
    """One unit of the last printed digit of a measurement (0.001 for "0.378", 1 for "70" in "70%")."""
    mantissa, _, exponent = number.rstrip("%").lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 10.0 ** (int(exponent or 0) - decimals)


def split_numbers(text: str) -> tuple[str, list[str]]:
    """``text`` with each number replaced by ``#`` and runs of spaces read as one, and the numbers as written.

    Example:
        >>> split_numbers("p00146: 19 of  27 (70%), C056 -0.135 [1e-3], 4.9x, 10px.")
        ('p00146: # of # (#%), C056 # [#], 4.9x, 10px.', ['19', '27', '70%', '-0.135', '1e-3'])
    """
    numbers = NUMBER.findall(text)
    template = NUMBER.sub(lambda m: "#%" if m.group().endswith("%") else "#", text)
    return SPACES.sub(" ", template), numbers


def comparable_outputs(notebook: Any) -> list[list[tuple[str, str]] | None]:
    """Per code cell, its outputs as ``(kind, text)``: ``None`` for cells tagged ``unseeded``.

    Kinds: ``stream:stdout`` (consecutive chunks of a stream merged), the text MIME types, ``image`` (the
    text ``an image``: that an image is there, not its bytes) and ``error``.
    """
    cells: list[list[tuple[str, str]] | None] = []
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


def text_difference(saved: str, fresh: str, tolerance: Tolerance = Tolerance()) -> str | None:
    """Where ``fresh`` departs from ``saved`` under the rule of the module docstring; ``None`` if it does not.

    Example:
        >>> text_difference("hit 19 of 27 (70%)", "hit 19 of 27 (71%)") is None
        True
        >>> text_difference("hit 19 of 27 (70%)", "hit 21 of 27 (78%)")
        'number 1: saved 19, now 21; number 3: saved 70%, now 78%'
        >>> text_difference("IG is better", "Chefer is better")
        "the text differs: saved 'IG is better', now 'Chefer is better'"
    """
    saved_text, saved_numbers = split_numbers(saved)
    fresh_text, fresh_numbers = split_numbers(fresh)
    if saved_text != fresh_text:
        return f"the text differs: {_first_difference(saved_text, fresh_text)}"
    far = [
        f"number {i + 1}: saved {a}, now {b}"
        for i, (a, b) in enumerate(zip(saved_numbers, fresh_numbers, strict=True))  # same template, same count
        if not tolerance.allows(a, b)
    ]
    return "; ".join(far) or None


def _first_difference(a: str, b: str) -> str:
    """The line where two texts first differ, as saved and as now."""
    for x, y in zip(a.splitlines(), b.splitlines(), strict=False):  # one text may have more lines
        if x != y:
            return f"saved {x.strip()[:300]!r}, now {y.strip()[:300]!r}"
    return f"saved {len(a.splitlines())} lines, now {len(b.splitlines())}"


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


def claims_not_holding(notebook: Any) -> list[str]:
    """The lines of a notebook's compared outputs that print a claim of its prose as not holding."""
    return [
        f"code cell {index}: {line.strip()[:300]}"
        for index, cell in enumerate(comparable_outputs(notebook)) for _, text in cell or []
        for line in text.splitlines() if "DOES NOT HOLD" in line
    ]


def differences(saved: Any, fresh: Any) -> list[str]:
    """Where the comparable outputs of two runs of one notebook differ, under the saved cells' tolerances."""
    a, b = comparable_outputs(saved), comparable_outputs(fresh)
    if len(a) != len(b):
        return [f"{len(a)} code cells saved, {len(b)} executed"]
    tolerances = [cell_tolerance(cell) for cell in saved.cells if cell.cell_type == "code"]
    out = []
    for index, (x, y, tolerance) in enumerate(zip(a, b, tolerances, strict=True)):
        if x is None and y is None:
            continue
        if x is None or y is None or [kind for kind, _ in x] != [kind for kind, _ in y]:
            out.append(f"code cell {index}: saved outputs {_kinds(x)}, now {_kinds(y)}")
            continue
        for (kind, saved_text), (_, fresh_text) in zip(x, y, strict=True):  # the same kinds, checked above
            found = text_difference(saved_text, fresh_text, tolerance)
            if found:
                out.append(f"code cell {index} ({kind}): {found}")
    return out


def _kinds(outputs: list[tuple[str, str]] | None) -> list[str] | None:
    """The kinds of a cell's compared outputs (``None`` for an unseeded cell)."""
    return None if outputs is None else [kind for kind, _ in outputs]


def moved_numbers(saved: Any, fresh: Any) -> tuple[int, int]:
    """How many compared numbers are written differently in ``fresh`` than in ``saved``, and how many there are
    (outputs whose text differs apart from the numbers are left out: :func:`differences` reports them)."""
    moved = total = 0
    # the cells and their outputs may differ in number (differences reports that): compare those both have
    for x, y in zip(comparable_outputs(saved), comparable_outputs(fresh), strict=False):
        for (_, a), (_, b) in zip(x or [], y or [], strict=False):
            (a_text, a_numbers), (b_text, b_numbers) = split_numbers(a), split_numbers(b)
            if a_text == b_text:
                total += len(a_numbers)
                moved += sum(p != q for p, q in zip(a_numbers, b_numbers, strict=True))  # same template
    return moved, total


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks to run (default: every notebooks/*.ipynb)")
    parser.add_argument("--check", action="store_true", help="compare with the saved outputs instead of saving")
    parser.add_argument("--threads", type=int, help=f"torch threads in the kernel (sets {THREADS}; default 1)")
    parser.add_argument("--torch", metavar="SETTINGS", help=f"last-bit settings in the kernel (sets {TORCH_SETTINGS})")
    parser.add_argument("--out", type=Path, help="write the executed notebooks to this folder instead of in place")
    parser.add_argument("--full", action="store_true",
                        help="run the full size (needs --out; the saved notebooks are small)")
    args = parser.parse_args(argv)
    if args.full and (args.out is None or args.check):
        parser.error("--full needs --out and no --check: the saved notebooks and the tests are at the small size")
    if args.threads is not None:
        os.environ[THREADS] = str(args.threads)
    if args.torch is not None:
        os.environ[TORCH_SETTINGS] = args.torch
    paths = [p.resolve() for p in args.notebooks] or all_notebooks()
    failed = False
    for path in paths:
        print(f"executing {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} ...", flush=True)
        try:
            fresh = execute(path, timeout=3600 if args.full else 900, small=not args.full)
        except CellExecutionError as error:
            print(f"  {str(error).strip().splitlines()[-1]}\n  (the cell: {str(error).splitlines()[2][:200]!r} ...)")
            failed = True
            continue
        trouble = problems(fresh)
        if args.check:
            saved = nbformat.read(path, as_version=4)
            trouble += differences(saved, fresh)
            moved, total = moved_numbers(saved, fresh)
            print(f"  {moved} of {total} compared numbers are written differently from the saved ones")
        for line in trouble:
            print(f"  {line}")
        failed |= bool(trouble)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            nbformat.write(fresh, args.out / path.name)
            print(f"  written to {args.out / path.name}")
        elif not args.check and not problems(fresh):
            nbformat.write(fresh, path)
            print("  saved with outputs")
        for line in claims_not_holding(fresh):  # saved all the same: the prose must change, or the code
            print(f"  a claim of the prose does not hold: {line}")
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
