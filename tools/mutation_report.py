"""Mutation testing of the package, one part at a time (``make mutation PART=<part>``), and its reports.

mutmut changes the mutated modules one small edit at a time (a ``+`` for a ``-``, a constant, a dropped
argument, ...) and runs the fast tests against each change; a change no test notices "survives". A run over
the whole package would take hours on two cores, so the package is mutated in parts that run separately.
Each part is a section of ``setup.cfg``:

* ``[mutmut]`` holds the settings every part shares and the default part, ``math`` (the relevance math and
  the capture layer), so a bare ``mutmut run`` still means what ``make mutation`` means;
* ``[mutmut:<part>]`` is another part: it replaces ``only_mutate`` (the modules, one glob per line) and
  ``pytest_add_cli_args_test_selection`` (the part's fast tests), and may set ``mutants`` (only the
  mutants whose names match these patterns, e.g. the HTML writers of a module), ``title``, ``notes``,
  ``report``, ``estimate`` (the expected wall time, measured with ``--estimate``) and any other mutmut
  setting (``also_copy`` for files the tests read; ``process_isolation = forkserver`` where the tests leave
  threads behind that a forked worker would hang on).

Each part runs in its own directory, ``mutants/<part>/`` (a copy of the package and the tests, with the
part's settings as its ``setup.cfg``; mutmut's own working directory is ``mutants/<part>/mutants/``), so the
results of one part stay while another runs (``--estimate`` uses ``mutants/<part>-sample/``). Why a surviving
mutant cannot be caught (it computes the same thing), or which test kills a mutant the suite once let survive, is
written in the part's notes file (``tools/mutation_notes.toml`` for ``math``, ``tools/mutation_notes_<part>.toml``
otherwise), which this script merges into the part's report, ``benchmarks/MUTATION-<part>.md``, so a rerun keeps
it. Every report also updates the summary of all parts, ``benchmarks/MUTATION.md``.

Usage (from the repository root, with the project's Python)::

    python tools/mutation_report.py --part metrics        # a fresh mutmut run of a part, then its report
    python tools/mutation_report.py                       # the same for the default part, math
    python tools/mutation_report.py --part all            # every part in turn (hours)
    python tools/mutation_report.py --part metrics --report-only  # the report of the last run (after editing notes)
    python tools/mutation_report.py --part metrics --rerun-survivors  # only the last report's survivors, after
                                                                      # tests were added (the code unchanged)
    python tools/mutation_report.py --part llm --rerun-changed REV  # the survivors and the functions changed
                                                                   # since REV, the commit the last run mutated
    python tools/mutation_report.py --part metrics --killers NAME [NAME ...]  # first failing test per mutant
        [--with-tests tests/test_x.py::test_y]                    # (of these tests, e.g. ones added after the run)
    python tools/mutation_report.py --part metrics --template     # note stubs for the survivors without one
    python tools/mutation_report.py --part llm --estimate 2       # time a sample (mutant 2 of each function)
    python tools/mutation_report.py --list                        # the parts, their modules and tests
    python tools/mutation_report.py --summary                     # rewrite benchmarks/MUTATION.md only

Exit status 1 when a part's score is below ``--min-score`` or a surviving mutant has no explanation.
"""

from __future__ import annotations

import argparse
import ast
import configparser
import contextlib
import dataclasses
import datetime as dt
import difflib
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "setup.cfg"
SUMMARY = ROOT / "benchmarks" / "MUTATION.md"
DEFAULT_PART = "math"
CLASS_SEPARATOR = "ǁ"
STATUS_ORDER = [
    "killed", "timeout", "survived", "no tests", "suspicious", "skipped", "segfault", "caught by type check",
    "not checked",
]
# keys of a part's section that describe the part; every other key is a mutmut setting
PART_KEYS = ("part", "title", "notes", "report", "mutants", "estimate")
# what a part's directory holds: mutmut copies these (and also_copy) into its own working directory
COPIED = ("captum_chefer", "tests", "conftest.py", "pyproject.toml")
SUMMARY_TAG = "<!-- mutation-part "


@dataclass
class Part:
    """One separately run part of the mutation testing, as configured in setup.cfg."""

    name: str
    title: str
    settings: dict[str, str]  # the [mutmut] settings of its run
    patterns: list[str]  # only mutants whose names match one of these (fnmatch); empty: every mutant
    notes: Path
    report: Path
    estimate: str = ""

    @property
    def workdir(self) -> Path:
        return ROOT / "mutants" / self.name

    @property
    def mutants(self) -> Path:
        return self.workdir / "mutants"

    @property
    def run_info(self) -> Path:
        return self.mutants / "report-run.json"

    @property
    def modules(self) -> list[str]:
        """The mutated module globs, e.g. ``captum_chefer/adapters/*.py``."""
        return _lines(self.settings["only_mutate"])

    @property
    def tests(self) -> list[str]:
        return _lines(self.settings["pytest_add_cli_args_test_selection"])

    def module_files(self) -> list[str]:
        """The mutated files, globs expanded, in the configured order."""
        files: list[str] = []
        for pattern in self.modules:
            glob = any(c in pattern for c in "*?[")
            for path in sorted(ROOT.glob(pattern)) if glob else [ROOT / pattern]:
                rel = path.relative_to(ROOT).as_posix()
                if rel not in files and not (glob and rel.endswith("__init__.py")):  # a package's own code when named
                    files.append(rel)
        return files

    def selects(self, name: str) -> bool:
        return not self.patterns or any(fnmatch.fnmatch(name, p) for p in self.patterns)


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_parts(config_path: Path = CONFIG) -> dict[str, Part]:
    """The parts: ``[mutmut]`` (the default part) and every ``[mutmut:<part>]`` section, in file order."""
    config = configparser.ConfigParser(interpolation=None)
    config.read(config_path, encoding="utf-8")
    base = dict(config["mutmut"])
    parts = {}
    for section in config.sections():
        if section != "mutmut" and not section.startswith("mutmut:"):
            continue
        own = dict(config[section])
        name = own.get("part", DEFAULT_PART) if section == "mutmut" else section.split(":", 1)[1].strip()
        settings = {k: v for k, v in {**base, **own}.items() if k not in PART_KEYS}
        for key in ("only_mutate", "pytest_add_cli_args_test_selection"):
            if not _lines(settings.get(key, "")):
                raise SystemExit(f"setup.cfg [{section}] needs {key} (one entry per line)")
        default_notes = "tools/mutation_notes.toml" if name == DEFAULT_PART else f"tools/mutation_notes_{name}.toml"
        parts[name] = Part(
            name=name,
            title=own.get("title", f"Mutation testing of the {name} part"),
            settings=settings,
            patterns=_lines(own.get("mutants", "")),
            notes=ROOT / own.get("notes", default_notes),
            report=ROOT / own.get("report", f"benchmarks/MUTATION-{name}.md"),
            estimate=" ".join(_lines(own.get("estimate", ""))),
        )
    return parts


@dataclass
class Mutant:
    name: str  # mutmut's, e.g. captum_chefer.relevance.x_weighted_attention__mutmut_12
    status: str
    diff: str = ""

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0]

    @property
    def function(self) -> str:
        """``module.qualname`` of the mutated function.

        E.g. ``captum_chefer.attribution.CheferAttribution.attribute``.
        """
        mangled = self.name.rsplit(".", 1)[1].rsplit("__mutmut_", 1)[0]
        if mangled.startswith("x" + CLASS_SEPARATOR):
            qualname = ".".join(mangled[2:].split(CLASS_SEPARATOR))
        else:
            qualname = mangled.removeprefix("x_")
        return f"{self.module}.{qualname}"

    @property
    def change(self) -> tuple[str, str]:
        """The changed source lines, stripped: (before, after), several lines joined by newlines."""
        lines = self.diff.splitlines()
        before = [line[1:].strip() for line in lines if line.startswith("-") and not line.startswith("---")]
        after = [line[1:].strip() for line in lines if line.startswith("+") and not line.startswith("+++")]
        return "\n".join(before), "\n".join(after)


@dataclass
class Note:
    function: str
    before: str
    after: str
    equivalent: str | None = None
    killed_by: str | None = None
    killed_after: str | None = None  # a survivor of the reported run, killed by a test added after it
    matches: list[Mutant] = field(default_factory=list)

    def match(self, mutant: Mutant) -> bool:
        return (mutant.function, *mutant.change) == (self.function, self.before.strip(), self.after.strip())


def follow_moves(notes: list[Note], mutants: list[Mutant]) -> list[tuple[str, str]]:
    """Notes whose function moved to another module (a refactoring) follow it, where the move is unambiguous.

    A note that matches no mutant of its own function but the same change in one function of the same
    qualified name (``Class.method`` or ``function``) in another module takes that function. Returns the moves
    (old, new), for the notes file to be updated.
    """
    moves = []
    for note in notes:
        if any(note.match(m) for m in mutants):
            continue
        change = (note.before.strip(), note.after.strip())
        found = {m.function for m in mutants if m.change == change
                 and note.function.endswith("." + m.function[len(m.module) + 1:])}
        if len(found) == 1:
            new = found.pop()
            moves.append((note.function, new))
            note.function = new
    return moves


# ---------------------------------------------------------------------------------------------- running mutmut


def mutmut(part: Part, *args: str, capture: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=part.workdir, text=True, capture_output=capture)


def prepare_workdir(part: Part) -> None:
    """A fresh directory for the part: a copy of the package and the tests, and the part's settings as setup.cfg."""
    shutil.rmtree(part.workdir, ignore_errors=True)
    part.workdir.mkdir(parents=True)
    extra = _lines(part.settings.get("also_copy", ""))
    for name in dict.fromkeys([*COPIED, *extra]):
        source, target = ROOT / name, part.workdir / name
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif source.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    config = configparser.ConfigParser(interpolation=None)
    config["mutmut"] = part.settings
    with open(part.workdir / "setup.cfg", "w", encoding="utf-8") as f:
        f.write(f"# written by tools/mutation_report.py for the part {part.name!r} from the repository's setup.cfg\n")
        config.write(f)


def run_mutmut(part: Part, jobs: int, names: list[str] | None = None, note: str = "") -> float:
    """A fresh run of the part (or of the mutants ``names`` matches): nothing cached from an earlier run."""
    prepare_workdir(part)
    started, start = dt.datetime.now(dt.UTC), time.perf_counter()
    selection = names if names is not None else part.patterns
    command = [sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs), *selection]
    proc = subprocess.Popen(command, cwd=part.workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tail = b""
    while chunk := proc.stdout.read1(65536):  # shown as it comes; the end kept for the rate mutmut prints
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        tail = (tail + chunk)[-65536:]
    proc.wait()
    seconds = time.perf_counter() - start
    if not part.mutants.exists():
        raise SystemExit(f"mutmut run failed (exit {proc.returncode}) before it made any mutant")
    rate = re.findall(rb"([0-9.]+) mutations/second", tail)
    info = {
        "part": part.name, "started": started.isoformat(timespec="seconds"), "seconds": round(seconds, 1),
        "jobs": jobs, "cpus": os.cpu_count(), "exit": proc.returncode,
        "mutants_per_second": float(rate[-1]) if rate else None,
    }
    if names is not None:
        info["sample"] = names
    if note:
        info["note"] = note
    part.run_info.write_text(json.dumps(info))
    return seconds


def run_info(part: Part) -> dict:
    return json.loads(part.run_info.read_text()) if part.run_info.exists() else {}


def collect(part: Part) -> list[Mutant]:
    """The part's mutants and their status (``not checked`` for those the last run did not try)."""
    if not part.mutants.exists():
        raise SystemExit(f"no run of the part {part.name!r} in {part.mutants.relative_to(ROOT)}: "
                         f"run `make mutation PART={part.name}` first")
    proc = mutmut(part, "results", "--all", "true")
    if proc.returncode:
        raise SystemExit(f"mutmut results failed: {proc.stderr[-2000:]}")
    carried = set(run_info(part).get("carried", ()))  # killed in an earlier run, not run again (--rerun-*)
    mutants = []
    for line in proc.stdout.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and "__mutmut_" in name and part.selects(name):
            mutants.append(Mutant(name, "killed" if status == "not checked" and name in carried else status))
    return mutants


def from_report(part: Part) -> tuple[list[Mutant], dict]:
    """The mutants of the part's last report and its run's figures, for notes written after the run's directory
    (``mutants/<part>/``) is gone: the survivors with their status and diff as the report shows them, and one
    placeholder per killed mutant (the report keeps only their number, per module).
    """
    if not part.report.exists():
        raise SystemExit(f"neither a run of the part {part.name!r} in {part.mutants.relative_to(ROOT)} nor a report "
                         f"{_rel(part.report)}: run `make mutation PART={part.name}` first")
    text = part.report.read_text()
    figures = report_summary(part.report) or {}
    info: dict = {}
    run = re.search(r"^- run: ([0-9.]+) min wall time, ([0-9]+) parallel workers? on ([0-9]+) cores$", text, re.M)
    if run and figures.get("date"):
        info = {"started": figures["date"], "seconds": float(run[1]) * 60, "jobs": int(run[2]), "cpus": int(run[3])}
    note = re.search(r"^- note: (.*)$", text, re.M)
    if note:
        info["note"] = note[1]
    header = re.search(r"^\| module \| mutants \| (.*) \| killed \|$", text, re.M)
    if not header:
        raise SystemExit(f"{_rel(part.report)} has no table of mutants per module")
    statuses = header[1].split(" | ")
    mutants: list[Mutant] = []
    for path, cells in re.findall(r"^\| `([^`]+)` \| [0-9]+ \| (.*) \| [^|]* \|$", text, re.M):
        module = path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        killed = int(dict(zip(statuses, cells.split(" | "), strict=True)).get("killed", 0))
        mutants += [Mutant(f"{module}.x_killed_in_the_report__mutmut_{i}", "killed") for i in range(killed)]
    for function, status, name, diff in re.findall(
        r"^### `([^`]+)` \(([a-z ]+), `([^`]+)`\)\n.*?^```diff\n(.*?)\n```$", text, re.M | re.S
    ):
        mutants.append(Mutant(f"{_module_of(function)}.{name}", status, diff))
    # the killed mutants a killed_by note names, as the report's last table shows them (in the notes' order)
    killers = [n for n in load_notes(part) if n.killed_by]
    table = text.split("## Mutants the suite once let survive", 1)[-1]
    now = [row.rsplit(" | ", 1)[1].removesuffix(" |") for row in re.findall(r"^\| `.*\|$", table, re.M)]
    for k, (note, statuses) in enumerate(zip(killers, now if len(now) == len(killers) else [], strict=False)):
        if "killed" not in statuses.split(", "):
            continue
        module = _module_of(note.function)
        mangled = mangled_name(note.function[len(module) + 1:])
        placeholder = next(i for i, m in enumerate(mutants)
                           if m.module == module and m.status == "killed" and not m.diff)
        diff = "--- original\n+++ mutant\n" + "".join(f"-{line}\n" for line in note.before.splitlines()) + "".join(
            f"+{line}\n" for line in note.after.splitlines())
        mutants[placeholder] = Mutant(f"{module}.{mangled}__mutmut_killer{k}", "killed", diff.rstrip("\n"))
    return mutants, info


def mangled_name(qualname: str) -> str:
    """mutmut's stem of the mutants of a function (``x_function``) or a method (``xǁClassǁmethod``), the inverse of
    :attr:`Mutant.function`."""
    parts = qualname.split(".")
    return "x" + CLASS_SEPARATOR + CLASS_SEPARATOR.join(parts) if len(parts) > 1 else "x_" + parts[0]


def _module_of(function: str) -> str:
    """The module of a dotted function (``module.function`` or ``module.Class.method``)."""
    return next(m for m in (function.rsplit(".", k)[0] for k in (1, 2)) if Path(ROOT, module_path(m)).exists())


def load_diffs(part: Part, mutants: list[Mutant]) -> None:
    """Each mutant's diff against the original function, read from the generated files under the part's mutants/.

    mutmut writes every mutant as a copy of its function named like the mutant (methods inside their
    class), next to an unmutated copy ``<function>__mutmut_orig``; the diff is between the two.
    """
    by_module: dict[str, list[Mutant]] = {}
    for m in mutants:
        by_module.setdefault(m.module, []).append(m)
    for module, group in by_module.items():
        text = (part.mutants / module_path(module)).read_text()
        sources = {}
        for node in ast.parse(text).body:
            for item in node.body if isinstance(node, ast.ClassDef) else [node]:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and "__mutmut_" in item.name:
                    sources[item.name] = ast.get_source_segment(text, item)
        for m in group:
            generated = m.name.rsplit(".", 1)[1]
            stem = generated.rsplit("__mutmut_", 1)[0]
            plain = m.function.rsplit(".", 1)[1]
            original = sources[stem + "__mutmut_orig"].replace(f"def {stem}__mutmut_orig(", f"def {plain}(", 1)
            mutated = sources[generated].replace(f"def {generated}(", f"def {plain}(", 1)
            diff = difflib.unified_diff(
                original.splitlines(), mutated.splitlines(), "original", "mutant", n=2, lineterm=""
            )
            m.diff = "\n".join(line for line in diff if not line.startswith("@@"))


def load_notes(part: Part) -> list[Note]:
    data = tomllib.loads(part.notes.read_text()) if part.notes.exists() else {}
    return [Note(**entry) for entry in data.get("mutant", [])]


def module_path(module: str) -> str:
    """The file of a dotted module name, relative to the repository root (a package's is its ``__init__.py``)."""
    path = module.replace(".", "/")
    return f"{path}/__init__.py" if (ROOT / path).is_dir() else f"{path}.py"


def score_line(counts: Counter) -> tuple[float, str]:
    total = sum(counts.values())
    killed = counts["killed"]
    score = killed / total if total else 0.0
    return score, f"{killed} / {total} = {100 * score:.1f}%"


def _toml_string(text: str) -> str:
    return "'''" + text + "'''" if "\n" in text or "'" in text else "'" + text + "'"


def template(mutants: list[Mutant], notes: list[Note]) -> str:
    out = []
    for m in mutants:
        if m.status == "survived" and not any(n.match(m) for n in notes):
            before, after = m.change
            out.append(f"[[mutant]]  # {m.name}\nfunction = \"{m.function}\"\nbefore = {_toml_string(before)}\n"
                       f"after = {_toml_string(after)}\nequivalent = \"\"\n")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- reports


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def write_report(part: Part, mutants: list[Mutant], notes: list[Note], min_score: float,
                 info: dict | None = None) -> tuple[float, list[Mutant]]:
    info = run_info(part) if info is None else info
    by_module = {path: Counter() for path in part.module_files()}
    for m in mutants:
        by_module.setdefault(module_path(m.module), Counter())[m.status] += 1
    by_module = {path: counts for path, counts in by_module.items() if counts or not part.patterns}
    overall = sum(by_module.values(), Counter())
    score, score_text = score_line(overall)
    for m in mutants:
        for note in notes:
            if note.match(m):
                note.matches.append(m)
    survivors = [m for m in mutants if m.status != "killed"]
    unexplained = [m for m in survivors if not any((n.equivalent or n.killed_after) and n.match(m) for n in notes)]

    summary = {
        "part": part.name, "date": info.get("started", ""), "minutes": round(info["seconds"] / 60, 1) if info else None,
        "jobs": info.get("jobs"), "mutants": sum(overall.values()), "killed": overall["killed"],
        "unexplained": len(unexplained),
    }
    statuses = [s for s in STATUS_ORDER if overall[s]] + sorted(s for s in overall if s not in STATUS_ORDER)
    lines = [
        SUMMARY_TAG + json.dumps(summary) + " -->",
        f"# {part.title}",
        "",
        f"Generated by `make mutation PART={part.name}` (`tools/mutation_report.py`); "
        "do not edit by hand: explanations",
        f"go in `{_rel(part.notes)}`, the mutated modules and the tests in `setup.cfg` "
        f"(`[{'mutmut' if part.name == DEFAULT_PART else 'mutmut:' + part.name}]`). All parts: "
        f"[{SUMMARY.name}]({SUMMARY.name}).",
        "",
        f"- date: {info.get('started', 'unknown (report regenerated without a run)')}",
        f"- tool: mutmut {metadata.version('mutmut')} (Python {sys.version.split()[0]}, torch "
        f"{metadata.version('torch')})",
        f"- run: {info['seconds'] / 60:.1f} min wall time, "
        f"{info['jobs']} parallel worker{'s' if info['jobs'] != 1 else ''} on {info['cpus']} cores"
        if info else "- run: unknown",
        *([f"- note: {info['note']}"] if info.get("note") else []),
        *(["- mutated functions: only the mutants matching " + ", ".join(f"`{p}`" for p in part.patterns)]
          if part.patterns else []),
        "- tests (the fast ones; each mutant runs only those that reach the mutated function): "
        + ", ".join(f"`{t}`" for t in part.tests),
        f"- score: **{score_text}** killed (threshold {100 * min_score:.0f}%); every mutant not killed counts "
        "against it, timeouts and mutants no test reaches included",
        "",
        "| module | mutants | " + " | ".join(statuses) + " | killed |",
        "|---|---:|" + "---:|" * len(statuses) + "---:|",
    ]
    for path, counts in [*by_module.items(), ("all", overall)]:
        name = f"`{path}`" if path != "all" else "**all**"
        lines.append(f"| {name} | {sum(counts.values())} | " + " | ".join(str(counts[s]) for s in statuses)
                     + f" | {score_line(counts)[1] if counts else '-'} |")
    lines += [
        "",
        f"## Mutants not killed ({len(survivors)})",
        "",
        "Each is equivalent to the original (no test can tell them apart), with the reason, or was killed by a test",
        "added after this run (named; checked by running that mutant against it); one marked UNEXPLAINED needs a",
        "test or a reason.",
        "",
    ]
    for m in survivors:
        why = next((n.equivalent for n in notes if n.equivalent and n.match(m)), None)
        after = next((n.killed_after for n in notes if n.killed_after and n.match(m)), None)
        verdict = (f"Equivalent: {why}" if why else f"Not equivalent: killed by `{after}`, added after this run"
                   if after else "**UNEXPLAINED**")
        lines += [f"### `{m.function}` ({m.status}, `{m.name.rsplit('.', 1)[1]}`)", "", verdict, "", "```diff", m.diff,
                  "```", ""]
    killers = [n for n in notes if n.killed_by]
    lines += [
        f"## Mutants the suite once let survive, and the test that kills each now ({len(killers)})",
        "",
        "| function | before | after | killed by | status now |",
        "|---|---|---|---|---|",
    ]
    for n in killers:
        now = ", ".join(sorted({m.status for m in n.matches})) or "no such mutant any more"
        cells = [f"`{n.function.rsplit('.', 1)[-1]}`", _cell(n.before), _cell(n.after), f"`{n.killed_by}`", now]
        lines.append("| " + " | ".join(cells) + " |")
    part.report.write_text("\n".join(lines) + "\n")
    return score, unexplained


def _cell(code: str) -> str:
    text = code.replace("\n", " ").replace("|", "\\|")
    return f"`{text}`" if text else "(removed)"


def report_summary(report: Path) -> dict | None:
    """The figures a part's report carries on its first line (None when the part has no report yet)."""
    if not report.exists():
        return None
    first = report.read_text().split("\n", 1)[0]
    return json.loads(first[len(SUMMARY_TAG):].removesuffix("-->").strip()) if first.startswith(SUMMARY_TAG) else None


def write_summary(parts: dict[str, Part], min_score: float = 0.90) -> None:
    """benchmarks/MUTATION.md: every part's score and date, from the first line of each part's report."""
    lines = [
        "# Mutation testing",
        "",
        "Generated by `tools/mutation_report.py`; do not edit by hand. The parts and their fast tests are set in",
        "`setup.cfg` (`[mutmut]` for `math`, `[mutmut:<part>]` for the others).",
        "",
        "mutmut changes the code one small edit at a time (a `+` for a `-`, a constant, a dropped argument, ...)",
        "and runs the fast tests against each change; a change no test notices survives. The package is mutated in",
        "parts that run separately (all of it at once would take hours on two cores): `make mutation PART=<part>`",
        "runs one part and writes its report, `make mutation` alone runs `math`, `make mutation PART=all` every",
        f"part in turn. Each part must kill at least {100 * min_score:.0f}% of its mutants, and its report explains",
        "every mutant not killed (equivalent to the original, with the reason, or killed by a test named there).",
        "After a small change, `make mutation PART=<part> MUTATION_ARGS='--rerun-changed REV'` runs only the last",
        "report's survivors and every mutant of the functions changed since REV (the commit that report's run",
        "mutated); the others keep their killed. Such a report says so in its note, and its wall time is that run's.",
        "",
        "| part | mutated | mutants | killed | score | unexplained | date | wall time | report |",
        "|---|---|---:|---:|---:|---:|---|---|---|",
    ]
    for part in parts.values():
        mutated = ", ".join(f"`{m.removeprefix('captum_chefer/')}`" for m in part.modules)
        if part.patterns:
            mutated += f" ({len(part.patterns)} name patterns in setup.cfg)"
        figures = report_summary(part.report)
        if figures and figures.get("mutants"):
            score = figures["killed"] / figures["mutants"]
            if figures.get("minutes") is not None:
                wall = f"{figures['minutes']:.0f} min, {figures['jobs']} worker{'s' if figures['jobs'] != 1 else ''}"
            else:
                wall = "unknown"
            lines.append(
                f"| `{part.name}` | {mutated} | {figures['mutants']} | {figures['killed']} | **{100 * score:.1f}%** | "
                f"{figures['unexplained']} | {(figures['date'] or 'unknown')[:10]} | {wall} | "
                f"[{part.report.name}]({part.report.name}) |"
            )
        else:
            estimate = f"not run yet; estimated {part.estimate}" if part.estimate else "not run yet"
            lines.append(f"| `{part.name}` | {mutated} | - | - | - | - | - | {estimate} | - |")
    SUMMARY.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------- helpers


def find_killers(part: Part, names: list[str], with_tests: list[str] | None = None) -> None:
    """For each mutant, the first test (fastest first, as mutmut orders them) that fails with it.

    The tests are copied afresh into the run's directory first, so a test written after the run counts;
    ``with_tests`` (pytest node ids or files) replaces the tests the run recorded as reaching each mutant,
    which cannot name a test the run did not know.
    """
    stats = json.loads((part.mutants / "mutmut-stats.json").read_text())
    tests_by_function, durations = stats["tests_by_mangled_function_name"], stats["duration_by_test"]
    shutil.copytree(ROOT / "tests", part.mutants / "tests", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    os.chdir(part.mutants)
    sys.path.insert(0, str(part.mutants))
    import pytest

    with contextlib.redirect_stdout(open(os.devnull, "w")):  # import and collect once; each mutant forks from here
        pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "--rootdir=.", *part.tests])
    for name in names:
        function = name.rsplit("__mutmut_", 1)[0]
        if function not in tests_by_function:  # a name as a report heading writes it, without its module
            full = [f for f in tests_by_function if f.endswith("." + function)]
            if len(full) > 1:  # e.g. _fmt in two modules: the short name does not say which
                print(f"{name}\tAMBIGUOUS: give the module too ({', '.join(sorted(full))})", flush=True)
                continue
            if len(full) == 1:
                name = full[0] + name[len(function):]
        tests = with_tests or sorted(tests_by_function.get(name.rsplit("__mutmut_", 1)[0], ()),
                                     key=lambda t: durations.get(t, 0.0))
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            os.environ["MUTANT_UNDER_TEST"] = name

            class Recorder:
                def __init__(self) -> None:
                    self.failed: list[str] = []

                def pytest_runtest_logreport(self, report):
                    if report.failed:
                        self.failed.append(report.nodeid)

            recorder = Recorder()
            with contextlib.redirect_stdout(open(os.devnull, "w")):
                pytest.main(["-x", "-q", "-p", "no:cacheprovider", "--rootdir=.", *tests], plugins=[recorder])
            failed = recorder.failed
            os.write(write_end, (failed[0] if failed else "").encode())
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end) as pipe:
            killer = pipe.read()
        os.waitpid(pid, 0)
        print(f"{name}\t{killer or ('SURVIVED' if tests else 'NO TESTS')}", flush=True)


def sample_patterns(part: Part, number: str) -> list[str]:
    """The part's mutants numbered ``number`` in each function (an fnmatch pattern: ``2``, or ``*5``, one in ten)."""
    if not re.fullmatch(r"[0-9*?\[\]]+", number):
        raise SystemExit(f"--estimate takes a mutant number or a pattern of one, e.g. 2 or '*5'; got {number!r}")
    if not part.patterns:
        return [f"*__mutmut_{number}"]
    return [re.sub(r"(__mutmut_)?\*$", "", p) + f"*__mutmut_{number}" for p in part.patterns]


def estimate(part: Part, jobs: int, number: str) -> None:
    """Run a sample of the part's mutants and extrapolate the wall time of the whole part.

    The sample takes the mutants numbered ``number`` in each function (``2``: one per function). Whole part
    = this run (the one-off stats and clean-test runs included) + the mutants not sampled at the sample's
    rate (mutants per second of wall time, all workers together, as mutmut reports it). Where mutmut records
    each mutant's time (not with ``process_isolation = forkserver``), a second figure weights each function
    by its own mutants' time (a function's mutants run the same tests). A bound too: every mutant running
    every test that reaches its function, as a surviving mutant does.
    """
    part = dataclasses.replace(part, name=f"{part.name}-sample")  # its own directory: the part's last run stays
    seconds = run_mutmut(part, jobs, sample_patterns(part, number))
    info = run_info(part)
    if info["exit"]:
        raise SystemExit(f"mutmut failed (exit {info['exit']}); its output is above")
    mutants = collect(part)
    sampled = [m for m in mutants if m.status != "not checked"]
    if not sampled:
        raise SystemExit("the sample ran no mutant: the pattern matches none")
    left = [m for m in mutants if m.status == "not checked"]
    counts = Counter(m.status for m in sampled)
    statuses = ", ".join(f"{n} {s}" for s, n in counts.most_common())
    print(f"\npart {part.name}: {len(mutants)} mutants in {len({m.function for m in mutants})} functions; a sample of "
          f"{len(sampled)} ({statuses}) in {seconds / 60:.1f} min wall time")
    figures = []
    if info.get("mutants_per_second"):
        figures.append(f"{(seconds + len(left) / info['mutants_per_second']) / 60:.0f} min at the sample's "
                       f"{info['mutants_per_second']} mutants/s")
    durations: dict[str, float] = {}
    for meta in part.mutants.rglob("*.py.meta"):
        durations.update(json.loads(meta.read_text())["durations_by_key"])
    time_of = {m.name: durations.get(m.name, 0.0) for m in sampled}  # no duration: no test reaches it
    if any(time_of.values()):
        by_function: dict[str, list[float]] = {}
        for m in sampled:
            by_function.setdefault(m.function, []).append(time_of[m.name])
        mean = sum(time_of.values()) / len(time_of)
        rest = sum(sum(by_function[m.function]) / len(by_function[m.function]) if m.function in by_function else mean
                   for m in left)
        figures.append(f"{(seconds + rest / jobs) / 60:.0f} min from each function's time per mutant")
    stats = json.loads((part.mutants / "mutmut-stats.json").read_text())
    tests_by_function, test_seconds = stats["tests_by_mangled_function_name"], stats["duration_by_test"]
    worst = sum(sum(test_seconds.get(t, 0.0) for t in tests_by_function.get(m.name.rsplit("__mutmut_", 1)[0], ()))
                for m in left)
    figures.append(f"at most about {(seconds + worst / jobs) / 60:.0f} min if every mutant ran every test that "
                   "reaches it (fixtures set up once)")
    print(f"estimated full run with {jobs} workers: " + "; ".join(figures))
    print(f"sampled score {100 * counts['killed'] / len(sampled):.0f}%")


def functions_of(source: str) -> dict[str, str]:
    """The source text of each function mutmut mutates in a module (its functions and the methods of its
    classes, nested functions inside their parent's text), by qualified name (``function``, ``Class.method``)."""
    tree = ast.parse(source)
    found = {}
    for node in tree.body:
        owner, items = (node.name + ".", node.body) if isinstance(node, ast.ClassDef) else ("", [node])
        for item in items:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found[owner + item.name] = ast.get_source_segment(source, item) or ""
    return found


def changed_functions(part: Part, rev: str) -> dict[str, str]:
    """The part's functions whose source differs between the commit ``rev`` and the working tree, or that
    ``rev`` does not have: ``{module.qualname: mutmut's name stem of its mutants}``."""
    changed = {}
    for file in part.module_files():
        module = file.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        old = subprocess.run(["git", "show", f"{rev}:{file}"], cwd=ROOT, capture_output=True, text=True)
        before = functions_of(old.stdout) if old.returncode == 0 else {}
        for qualname, text in functions_of((ROOT / file).read_text()).items():
            if before.get(qualname) != text:
                changed[f"{module}.{qualname}"] = f"{module}.{mangled_name(qualname)}"
    return changed


def rerun_changed(part: Part, jobs: int, rev: str) -> tuple[list[Mutant], dict]:
    """Run again the last report's survivors and every mutant of a function that changed since ``rev``, the
    commit whose code the report's run mutated; the other mutants keep the report's ``killed``.

    mutmut derives a function's mutants from its source alone, so a function whose text is the same at ``rev``
    and now has the same mutants, and a test added since cannot revive one it killed. (A change outside the
    function, to a constant or a helper it calls, could in principle let one of them survive: run the whole
    part where much changed.)
    """
    reported, old = from_report(part)
    survivors = {m.name: m for m in reported if m.status != "killed"}
    changed = {f: stem for f, stem in changed_functions(part, rev).items() if part.selects(stem + "__mutmut_1")}
    patterns = sorted({*survivors, *(stem + "__mutmut_*" for stem in changed.values())})
    seconds = run_mutmut(part, jobs, patterns)
    mutants = collect(part)
    load_diffs(part, mutants)
    # a survivor of a function unchanged since rev must be there with the same change: else the run did not mutate rev
    now = {m.name: m for m in mutants}
    differ = [name for name, m in survivors.items() if m.function not in changed
              and (name not in now or now[name].change != m.change)]
    if differ:
        raise SystemExit(f"{_rel(part.report)} does not describe the code of {rev}: its survivor {differ[0]} (of a "
                         f"function unchanged since) is not the same mutant now ({len(differ)} such); give the commit "
                         "its run mutated, or run the whole part")
    kept = []
    for m in mutants:
        if m.status == "not checked" and m.function not in changed and m.name not in survivors:
            m.status = "killed"
            kept.append(m.name)
    carried = len(kept)
    info = {**run_info(part), "jobs": jobs, "cpus": os.cpu_count(), "carried": kept}
    info.pop("sample", None)
    then = old.get("started", "unknown")[:10]
    info["note"] = (f"{len(mutants) - carried} mutants (the {len(survivors)} the run of {then} "
                    f"did not kill, and every mutant of the {len(changed)} functions changed since {rev[:12]}, the "
                    f"commit that run mutated) were run on {dt.datetime.now(dt.UTC).date()} ({seconds / 60:.1f} min, "
                    f"{jobs} worker{'s' if jobs != 1 else ''}); the other {carried}, in functions unchanged since, "
                    "keep that run's killed")
    part.run_info.write_text(json.dumps(info))
    return mutants, info


def rerun_survivors(part: Part, jobs: int) -> tuple[list[Mutant], dict]:
    """Run again only the mutants the part's last report shows not killed; the others keep their ``killed``.

    For tests added since that run: a test added cannot revive a killed mutant, so this gives what a whole run
    would, in the time of the survivors alone. Refused where the mutated code changed since (another number
    of mutants, or a survivor whose change differs from the report's): then run the whole part.
    """
    reported, old = from_report(part)
    survivors = {m.name: m for m in reported if m.status != "killed"}
    seconds = run_mutmut(part, jobs, sorted(survivors))
    mutants = collect(part)
    load_diffs(part, mutants)
    changed = [m.name for m in mutants if m.name in survivors and m.change != survivors[m.name].change]
    missing = survivors.keys() - {m.name for m in mutants}
    if len(mutants) != len(reported) or missing or changed:
        example = f", e.g. {(changed or sorted(missing))[0]}" if changed or missing else ""
        raise SystemExit(f"the mutated code of {part.name!r} changed since {_rel(part.report)} was written "
                         f"({len(mutants)} mutants now, {len(reported)} then{example}): "
                         f"run the whole part (`make mutation PART={part.name}`)")
    kept = []
    for m in mutants:
        if m.name not in survivors:
            m.status = "killed"
            kept.append(m.name)
    info = {**run_info(part), "started": old.get("started", ""), "seconds": old.get("seconds", 0.0) + seconds,
            "jobs": old.get("jobs", jobs), "cpus": old.get("cpus", os.cpu_count()), "carried": kept}
    info.pop("sample", None)
    today = dt.datetime.now(dt.UTC).date()
    info["note"] = (f"the {len(survivors)} mutants the run of {old.get('started', 'unknown')[:10]} did not kill were "
                    f"run again on {today} with the tests added since ({seconds / 60:.1f} min, "
                    f"{jobs} worker{'s' if jobs != 1 else ''}; the wall time above is both runs together); the others "
                    "were killed in that run")
    part.run_info.write_text(json.dumps(info))
    return mutants, info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--part", default=DEFAULT_PART, help=f"the part to run or report, or 'all' (default {DEFAULT_PART})"
    )
    parser.add_argument("--report-only", action="store_true", help="no new run: report the last one")
    parser.add_argument("--rerun-survivors", action="store_true",
                        help="run again only the mutants the last report did not see killed (after tests were added)")
    parser.add_argument("--rerun-changed", metavar="REV",
                        help="run the last report's survivors and the functions changed since REV, the commit its run "
                             "mutated; the others keep their killed")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel mutmut workers")
    parser.add_argument("--min-score", type=float, default=0.90, help="the share of mutants that must be killed")
    parser.add_argument("--killers", nargs="+", metavar="NAME", help="print the first failing test for each mutant")
    parser.add_argument("--with-tests", nargs="+", metavar="TEST", help="with --killers: run these tests instead")
    parser.add_argument("--template", action="store_true", help="print note stubs for unexplained survivors")
    parser.add_argument("--estimate", metavar="NUMBER", help="time mutant NUMBER (a pattern: '*5') of each function "
                        "and extrapolate the part's wall time")
    parser.add_argument("--list", action="store_true", help="list the parts")
    parser.add_argument("--summary", action="store_true", help=f"rewrite {_rel(SUMMARY)} from the parts' reports")
    args = parser.parse_args(argv)
    parts = load_parts()
    if args.list:
        for part in parts.values():
            patterns = f" (mutants {part.patterns})" if part.patterns else ""
            print(f"{part.name}: {', '.join(part.module_files())}{patterns}")
            print(f"    tests: {' '.join(part.tests)}")
        return 0
    if args.summary:
        write_summary(parts, args.min_score)
        return 0
    names = list(parts) if args.part == "all" else [args.part]
    unknown = [n for n in names if n not in parts]
    if unknown:
        raise SystemExit(f"no part {unknown[0]!r} in setup.cfg; the parts are {', '.join(parts)} (or 'all')")
    if len(names) > 1 and (args.killers or args.template or args.estimate):
        raise SystemExit("--killers, --template and --estimate take one part")
    status = 0
    for name in names:
        part = parts[name]
        if args.killers:
            find_killers(part, args.killers, args.with_tests)
            return 0
        if args.estimate:
            estimate(part, args.jobs, args.estimate)
            return 0
        info = None
        if args.rerun_changed:
            mutants, info = rerun_changed(part, args.jobs, args.rerun_changed)
        elif args.rerun_survivors:
            mutants, info = rerun_survivors(part, args.jobs)
        elif not (args.report_only or args.template):
            run_mutmut(part, args.jobs)
        elif run_info(part).get("sample"):
            raise SystemExit(f"the last run of {part.name!r} was a sample (--estimate or --killers' preparation): "
                             "run the whole part first")
        if args.rerun_survivors or args.rerun_changed:
            pass
        elif not part.mutants.exists() and (args.report_only or args.template):
            mutants, info = from_report(part)  # the run's directory is gone: its report still holds its results
            print(f"no run of {part.name!r} in {_rel(part.mutants)}: notes merged into the results of "
                  f"{_rel(part.report)}")
        else:
            mutants = collect(part)
            if not mutants:
                raise SystemExit(f"no mutants found: run `make mutation PART={part.name}` first")
            load_diffs(part, mutants)
        notes = load_notes(part)
        for old, new in follow_moves(notes, mutants):
            print(f"  MOVED NOTE {old} -> {new}: write the new function into {_rel(part.notes)}")
        if args.template:
            print(template(mutants, notes))
            return 0
        score, unexplained = write_report(part, mutants, notes, args.min_score, info)
        write_summary(parts, args.min_score)
        print(f"wrote {_rel(part.report)}: {100 * score:.1f}% of {len(mutants)} mutants killed, "
              f"{len(unexplained)} not killed without an explanation")
        for m in unexplained:
            print(f"  UNEXPLAINED {m.name}: {' -> '.join(m.change)}")
        stale = [n for n in notes if (n.equivalent or n.killed_after) and not n.matches]
        for n in stale:  # the code it explains changed: the note is to be deleted or rewritten
            print(f"  STALE NOTE (matches no mutant) {n.function}: {n.before.strip()!r} -> {n.after.strip()!r}")
        if unexplained or score < args.min_score:
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
