"""Mutation testing of the math and the capture layer (``make mutation``) and its report,
``benchmarks/MUTATION.md``.

mutmut changes the mutated modules one small edit at a time (a ``+`` for a ``-``, a constant, a dropped
argument, ...) and runs the fast tests against each change; a change no test notices "survives". What is
mutated and which tests run is set in ``setup.cfg`` (section ``[mutmut]``: ``only_mutate`` lists the
modules, one per line). Why a surviving mutant cannot be caught (it computes the same thing), or which test
now kills a mutant the suite once let survive, is written in ``tools/mutation_notes.toml``, which this
script merges into the report, so a rerun keeps it.

Usage (from the repository root, with the project's Python)::

    python tools/mutation_report.py                # a fresh mutmut run, then the report
    python tools/mutation_report.py --report-only  # the report from the last run (after editing the notes)
    python tools/mutation_report.py --killers NAME [NAME ...]   # the first test that fails for each mutant
    python tools/mutation_report.py --template     # note stubs for the survivors that have none

Exit status 1 when the score is below ``--min-score`` or a surviving mutant has no explanation.
"""

from __future__ import annotations

import argparse
import ast
import configparser
import contextlib
import datetime as dt
import difflib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
MUTANTS = ROOT / "mutants"
NOTES = ROOT / "tools" / "mutation_notes.toml"
REPORT = ROOT / "benchmarks" / "MUTATION.md"
RUN_INFO = MUTANTS / "report-run.json"
CLASS_SEPARATOR = "ǁ"
STATUS_ORDER = ["killed", "timeout", "survived", "no tests", "suspicious", "skipped", "segfault", "caught by type check",
                "not checked"]


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
        """``module.qualname`` of the mutated function, e.g. ``captum_chefer.attribution.CheferAttribution.attribute``."""
        mangled = self.name.rsplit(".", 1)[1].rsplit("__mutmut_", 1)[0]
        if mangled.startswith("x" + CLASS_SEPARATOR):
            qualname = ".".join(mangled[2:].split(CLASS_SEPARATOR))
        else:
            qualname = mangled.removeprefix("x_")
        return f"{self.module}.{qualname}"

    @property
    def change(self) -> tuple[str, str]:
        """The changed source lines, stripped: (before, after), several lines joined by newlines."""
        before = [line[1:].strip() for line in self.diff.splitlines() if line.startswith("-") and not line.startswith("---")]
        after = [line[1:].strip() for line in self.diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
        return "\n".join(before), "\n".join(after)


@dataclass
class Note:
    function: str
    before: str
    after: str
    equivalent: Optional[str] = None
    killed_by: Optional[str] = None
    killed_after: Optional[str] = None  # a survivor of the reported run, killed by a test added after it
    matches: list[Mutant] = field(default_factory=list)

    def match(self, mutant: Mutant) -> bool:
        return (mutant.function, *mutant.change) == (self.function, self.before.strip(), self.after.strip())


def configured_modules() -> list[str]:
    """The mutated modules, as listed in setup.cfg's [mutmut] only_mutate."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return [line.strip() for line in config.get("mutmut", "only_mutate").splitlines() if line.strip()]


def configured_tests() -> list[str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return [line.strip() for line in config.get("mutmut", "pytest_add_cli_args_test_selection").splitlines() if line.strip()]


def mutmut(*args: str, capture: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=ROOT, text=True, capture_output=capture)


def run_mutmut(jobs: int) -> None:
    """A fresh run: no results cached from an earlier run of other tests or code."""
    shutil.rmtree(MUTANTS, ignore_errors=True)
    started, start = dt.datetime.now(dt.timezone.utc), time.perf_counter()
    proc = mutmut("run", "--max-children", str(jobs), capture=False)
    seconds = time.perf_counter() - start
    if not MUTANTS.exists():
        raise SystemExit(f"mutmut run failed (exit {proc.returncode}) before it made any mutant")
    RUN_INFO.write_text(json.dumps({
        "started": started.isoformat(timespec="seconds"), "seconds": round(seconds, 1), "jobs": jobs,
        "cpus": os.cpu_count(), "exit": proc.returncode,
    }))


def collect() -> list[Mutant]:
    proc = mutmut("results", "--all", "true")
    if proc.returncode:
        raise SystemExit(f"mutmut results failed: {proc.stderr[-2000:]}")
    mutants = []
    for line in proc.stdout.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and "__mutmut_" in name:
            mutants.append(Mutant(name, status))
    return mutants


def load_diffs(mutants: list[Mutant]) -> None:
    """Each mutant's diff against the original function, read from the generated files under mutants/.

    mutmut writes every mutant as a copy of its function named like the mutant (methods inside their
    class), next to an unmutated copy ``<function>__mutmut_orig``; the diff is between the two.
    """
    by_module: dict[str, list[Mutant]] = {}
    for m in mutants:
        by_module.setdefault(m.module, []).append(m)
    for module, group in by_module.items():
        text = (MUTANTS / module_path(module)).read_text()
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


def load_notes() -> list[Note]:
    data = tomllib.loads(NOTES.read_text()) if NOTES.exists() else {}
    return [Note(**entry) for entry in data.get("mutant", [])]


def module_path(module: str) -> str:
    return module.replace(".", "/") + ".py"


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


def write_report(mutants: list[Mutant], notes: list[Note], min_score: float) -> tuple[float, list[Mutant]]:
    info = json.loads(RUN_INFO.read_text()) if RUN_INFO.exists() else {}
    modules = configured_modules()
    by_module = {path: Counter() for path in modules}
    for m in mutants:
        by_module.setdefault(module_path(m.module), Counter())[m.status] += 1
    overall = sum(by_module.values(), Counter())
    score, score_text = score_line(overall)
    for m in mutants:
        for note in notes:
            if note.match(m):
                note.matches.append(m)
    survivors = [m for m in mutants if m.status != "killed"]
    unexplained = [m for m in survivors if not any((n.equivalent or n.killed_after) and n.match(m) for n in notes)]

    statuses = [s for s in STATUS_ORDER if overall[s]] + sorted(s for s in overall if s not in STATUS_ORDER)
    lines = [
        "# Mutation testing of the math and the capture layer",
        "",
        "Generated by `make mutation` (`tools/mutation_report.py`); do not edit by hand: explanations go in",
        "`tools/mutation_notes.toml`, the mutated modules and the tests in `setup.cfg` (`[mutmut]`).",
        "",
        f"- date: {info.get('started', 'unknown (report regenerated without a run)')}",
        f"- tool: mutmut {metadata.version('mutmut')} (Python {sys.version.split()[0]}, torch "
        f"{metadata.version('torch')})",
        f"- run: {info['seconds'] / 60:.1f} min wall time, {info['jobs']} parallel workers on {info['cpus']} cores"
        if info else "- run: unknown",
        *([f"- note: {info['note']}"] if info.get("note") else []),
        f"- tests (the fast ones; each mutant runs only those that reach the mutated function): "
        + ", ".join(f"`{t}`" for t in configured_tests()),
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
    REPORT.write_text("\n".join(lines) + "\n")
    return score, unexplained


def _cell(code: str) -> str:
    text = code.replace("\n", " ").replace("|", "\\|")
    return f"`{text}`" if text else "(removed)"


def find_killers(names: list[str]) -> None:
    """For each mutant, the first test (fastest first, as mutmut orders them) that fails with it."""
    stats = json.loads((MUTANTS / "mutmut-stats.json").read_text())
    tests_by_function, durations = stats["tests_by_mangled_function_name"], stats["duration_by_test"]
    os.chdir(MUTANTS)
    sys.path.insert(0, str(MUTANTS))
    import pytest

    with contextlib.redirect_stdout(open(os.devnull, "w")):  # import and collect once; each mutant forks from here
        pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "--rootdir=.", *configured_tests()])
    for name in names:
        tests = sorted(tests_by_function.get(name.rsplit("__mutmut_", 1)[0], ()), key=lambda t: durations.get(t, 0.0))
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            os.environ["MUTANT_UNDER_TEST"] = name
            failed: list[str] = []

            class Recorder:
                def pytest_runtest_logreport(self, report):
                    if report.failed:
                        failed.append(report.nodeid)

            with contextlib.redirect_stdout(open(os.devnull, "w")):
                pytest.main(["-x", "-q", "-p", "no:cacheprovider", "--rootdir=.", *tests], plugins=[Recorder()])
            os.write(write_end, (failed[0] if failed else "").encode())
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end) as pipe:
            killer = pipe.read()
        os.waitpid(pid, 0)
        print(f"{name}\t{killer or ('SURVIVED' if tests else 'NO TESTS')}", flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report-only", action="store_true", help="no new run: report the last one")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel mutmut workers")
    parser.add_argument("--min-score", type=float, default=0.90, help="the share of mutants that must be killed")
    parser.add_argument("--killers", nargs="+", metavar="NAME", help="print the first failing test for each mutant")
    parser.add_argument("--template", action="store_true", help="print note stubs for unexplained survivors")
    args = parser.parse_args(argv)
    if args.killers:
        find_killers(args.killers)
        return 0
    if not (args.report_only or args.template):
        run_mutmut(args.jobs)
    mutants = collect()
    if not mutants:
        raise SystemExit("no mutants found: run `make mutation` first")
    load_diffs(mutants)
    notes = load_notes()
    if args.template:
        print(template(mutants, notes))
        return 0
    score, unexplained = write_report(mutants, notes, args.min_score)
    print(f"wrote {REPORT.relative_to(ROOT)}: {100 * score:.1f}% of {len(mutants)} mutants killed, "
          f"{len(unexplained)} not killed without an explanation")
    for m in unexplained:
        print(f"  UNEXPLAINED {m.name}: {' -> '.join(m.change)}")
    stale = [n for n in notes if (n.equivalent or n.killed_after) and not n.matches]
    for n in stale:  # the code it explains changed: the note is to be deleted or rewritten
        print(f"  STALE NOTE (matches no mutant) {n.function}: {n.before.strip()!r} -> {n.after.strip()!r}")
    return 1 if unexplained or score < args.min_score else 0


if __name__ == "__main__":
    sys.exit(main())
