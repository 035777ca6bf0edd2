"""tools/mutation_report.py reads its own reports back, so notes written after a run's directory is gone still count."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("mutation_report", ROOT / "tools" / "mutation_report.py")
mutation_report = importlib.util.module_from_spec(_spec)
sys.modules["mutation_report"] = mutation_report
_spec.loader.exec_module(mutation_report)

PARTS = {name: part for name, part in mutation_report.load_parts().items() if part.report.exists()}


@pytest.mark.parametrize("name", sorted(PARTS))
def test_a_report_read_back_has_the_counts_its_first_line_states(name):
    part = PARTS[name]
    mutants, info = mutation_report.from_report(part)
    figures = mutation_report.report_summary(part.report)
    counts = Counter(m.status for m in mutants)
    assert len(mutants) == figures["mutants"]
    assert counts["killed"] == figures["killed"]
    survivors = [m for m in mutants if m.status != "killed"]
    assert survivors and all(m.diff.startswith("--- original\n+++ mutant") for m in survivors)
    assert all(m.change[0] != m.change[1] for m in survivors)
    assert info["jobs"] == figures["jobs"] and info["seconds"] / 60 == pytest.approx(figures["minutes"], abs=0.05)


@pytest.mark.parametrize("name", sorted(PARTS))
def test_a_report_written_again_from_itself_is_the_same_report(name, tmp_path, monkeypatch):
    part = PARTS[name]
    mutants, info = mutation_report.from_report(part)
    copy = dataclasses.replace(part, report=tmp_path / part.report.name)
    versions = {"mutmut": "0", "torch": "0"}
    monkeypatch.setattr(mutation_report.metadata, "version", versions.get)
    mutation_report.write_report(copy, mutants, mutation_report.load_notes(part), 0.90, info)

    def without_tool_line(text):
        return [line for line in text.splitlines() if not line.startswith("- tool: ")]

    assert without_tool_line(copy.report.read_text()) == without_tool_line(part.report.read_text())


def test_a_note_follows_its_function_to_another_module_only_where_the_move_is_unambiguous():
    Mutant, Note = mutation_report.Mutant, mutation_report.Note
    diff = "--- original\n+++ mutant\n-    return a + b\n+    return a - b"
    moved = Mutant("captum_chefer.report.html.x__cell__mutmut_3", "survived", diff)
    method = Mutant("captum_chefer.store.xǁStoreǁrows__mutmut_1", "survived", diff)
    notes = [
        Note("captum_chefer.report._cell", "return a + b", "return a - b", equivalent="..."),  # cell moved
        Note("captum_chefer.cohort.Store.rows", "return a + b", "return a - b", equivalent="..."),  # class moved
        Note("captum_chefer.report._other", "return a + b", "return a - b", equivalent="..."),  # no such function
        Note("captum_chefer.report._cell", "return a + b", "return a * b", equivalent="..."),  # another change
    ]
    moves = mutation_report.follow_moves(notes, [moved, method])
    assert moves == [
        ("captum_chefer.report._cell", "captum_chefer.report.html._cell"),
        ("captum_chefer.cohort.Store.rows", "captum_chefer.store.Store.rows"),
    ]
    assert notes[0].match(moved) and notes[1].match(method)
    assert not notes[2].match(moved) and not notes[3].match(moved)


def test_functions_of_a_module_by_qualified_name():
    source = (
        "import x\n\n\ndef f(a):\n    def inner():\n        return a\n    return inner\n\n\n"
        "class C:\n    k = 1\n\n    def m(self):  # note\n        return 2\n\n    async def n(self):\n        pass\n"
    )
    found = mutation_report.functions_of(source)
    assert list(found) == ["f", "C.m", "C.n"]  # the nested function is inside f's text, not a function of its own
    assert found["f"].startswith("def f(a):") and "return inner" in found["f"]
    assert found["C.m"] == "def m(self):  # note\n        return 2"  # comments count: a change is never missed


@pytest.mark.parametrize("name", sorted(PARTS))
def test_the_stem_of_a_changed_function_is_the_one_mutmut_names_its_mutants_with(name, monkeypatch):
    # with every function "changed" (a revision that has none of the files), each survivor of the report is named
    # by the stem rerun_changed would select it with
    part = PARTS[name]
    monkeypatch.setattr(mutation_report.subprocess, "run",
                        lambda *a, **k: mutation_report.subprocess.CompletedProcess(a, 128, "", "no such file"))
    stems = mutation_report.changed_functions(part, "none")
    survivors = [m for m in mutation_report.from_report(part)[0] if m.status != "killed"]
    moved = [m for m in survivors if m.function not in stems]  # functions gone from the code since the run
    assert len(moved) < len(survivors) / 2
    for m in survivors:
        if m.function in stems:
            assert m.name.startswith(stems[m.function] + "__mutmut_"), m.name


def test_nothing_changed_against_the_working_tree_itself(monkeypatch):
    part = PARTS["metrics"]
    files = {f: (ROOT / f).read_text() for f in part.module_files()}
    def git_show(command, **kwargs):
        return mutation_report.subprocess.CompletedProcess(command, 0, files[command[-1].split(":", 1)[1]], "")

    monkeypatch.setattr(mutation_report.subprocess, "run", git_show)
    assert mutation_report.changed_functions(part, "HEAD") == {}


def test_collect_counts_the_mutants_a_rerun_carried_over_as_killed(tmp_path, monkeypatch):
    # --rerun-changed and --rerun-survivors run some mutants only; the others' killed is kept in the run's info
    monkeypatch.setattr(mutation_report, "ROOT", tmp_path)
    part = dataclasses.replace(PARTS["metrics"], patterns=[])
    part.mutants.mkdir(parents=True)
    part.run_info.write_text(json.dumps({"carried": ["m.x_f__mutmut_1", "m.x_f__mutmut_3"]}))
    results = "m.x_f__mutmut_1: not checked\nm.x_f__mutmut_2: not checked\nm.x_f__mutmut_3: survived\n"
    monkeypatch.setattr(mutation_report, "mutmut",
                        lambda *args: mutation_report.subprocess.CompletedProcess(args, 0, results, ""))
    found = [(m.name, m.status) for m in mutation_report.collect(part)]
    # carried and not run: killed; not carried: still not checked; run again: its new status stands
    assert found == [("m.x_f__mutmut_1", "killed"), ("m.x_f__mutmut_2", "not checked"), ("m.x_f__mutmut_3", "survived")]
