"""The package as it is installed: every module it imports is declared in pyproject.toml (a dependency, or the
extra of the one feature that needs it, whose absence names the extra), one version, and a wheel with the package,
its ``py.typed`` and no tests."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import captum_chefer
from captum_chefer._optional import EXTRAS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "captum_chefer"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
TOOL_EXTRAS = {"lint", "docs", "dev", "all"}  # extras for developers, or of other extras, not features
# Imports of an extra's modules that need no guard, and why.
UNGUARDED = {
    # the attention functions transformers itself calls: only a transformers model gets here, so it is imported
    "captum_chefer/capture.py": "transformers",
}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(specs: list[str]) -> set[str]:
    return {_normalize(Requirement(spec).name) for spec in specs}


def _feature_extras() -> dict[str, set[str]]:
    extras = PROJECT["optional-dependencies"]
    return {name: _requirements(specs) for name, specs in extras.items() if name not in TOOL_EXTRAS}


def _imports() -> list[tuple[Path, ast.AST, str, list[ast.AST]]]:
    """Every import of another top-level module in the package: (file, node, module, its enclosing nodes)."""
    found = []

    def visit(path: Path, node: ast.AST, parents: list[ast.AST]) -> None:
        modules: list[str] = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            modules = [node.module]
        for module in modules:
            top = module.split(".")[0]
            if top not in sys.stdlib_module_names and top != "captum_chefer":
                found.append((path, node, top, parents))
        for child in ast.iter_child_nodes(node):
            visit(path, child, [*parents, node])

    for path in sorted(PACKAGE.rglob("*.py")):
        visit(path, ast.parse(path.read_text()), [])
    return found


@functools.cache
def _packages_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()  # reads every installed distribution's file list: once


@functools.cache
def _distribution(module: str) -> str:
    names = _packages_distributions().get(module)
    assert names, f"{module} is imported by the package but no installed distribution provides it"
    return _normalize(names[0])


def test_every_imported_module_is_declared_and_every_declaration_imported():
    imported = {_distribution(module) for _, _, module, _ in _imports()}
    dependencies = _requirements(PROJECT["dependencies"])
    extras = _feature_extras()
    declared = dependencies.union(*extras.values())
    assert imported - declared == set(), "imported by the package, declared nowhere in pyproject.toml"
    assert declared - imported == set(), "declared in pyproject.toml, imported nowhere in the package"
    for name, members in extras.items():
        assert not members & dependencies, f"extra {name!r} repeats a dependency: {members & dependencies}"


def _guard(parents: list[ast.AST]) -> str | None:
    """How an import is guarded: 'extra:<name>', 'type-checking' or 'try'; None when it is not."""
    for parent in reversed(parents):
        if isinstance(parent, ast.With):
            for item in parent.items:
                call = item.context_expr
                if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "extra" and call.args:
                    return f"extra:{ast.literal_eval(call.args[0])}"
        if isinstance(parent, ast.If) and "TYPE_CHECKING" in ast.unparse(parent.test):
            return "type-checking"
        if isinstance(parent, ast.Try) and any(
            handler.type is not None and re.search(r"\b(ImportError|ModuleNotFoundError)\b", ast.unparse(handler.type))
            for handler in parent.handlers
        ):
            return "try"
    return None


def test_an_extra_module_is_imported_inside_its_extra():
    """A module of an extra is imported inside ``with extra(<that extra>)``, so its absence names the extra."""
    extras = _feature_extras()
    dependencies = _requirements(PROJECT["dependencies"])
    problems = []
    for path, node, module, parents in _imports():
        distribution = _distribution(module)
        if distribution in dependencies:
            continue
        (owner,) = [name for name, members in extras.items() if distribution in members]
        where = f"{path.relative_to(ROOT)}:{node.lineno} imports {module}"
        guard = _guard(parents)
        if UNGUARDED.get(str(path.relative_to(ROOT))) == module or guard in ("type-checking", "try"):
            continue
        if guard != f"extra:{owner}":
            problems.append(f"{where} outside `with extra({owner!r}):` ({guard or 'unguarded'})")
    assert not problems, "\n".join(problems)


def test_the_helper_knows_every_feature_extra():
    assert set(EXTRAS) == set(_feature_extras())
    assert PROJECT["optional-dependencies"]["all"] == [f"captum_chefer[{','.join(sorted(EXTRAS))}]"]
    dev = PROJECT["optional-dependencies"]["dev"]
    assert "captum_chefer[all,lint,docs]" in dev, "make test installs every extra and the lint and docs tools"


def test_lint_and_docs_tools_are_pinned():
    for extra in ("lint", "docs"):
        for spec in PROJECT["optional-dependencies"][extra]:
            specifier = Requirement(spec).specifier
            assert len(specifier) == 1 and next(iter(specifier)).operator == "==", spec


@pytest.mark.parametrize(
    ("hidden", "extra", "call"),
    [
        ("polars", "cohort", "read_cohort"),
        ("polars", "cohort", "summarize"),
        ("pyarrow", "cohort", "write_rows"),
        ("tokenizers", "huggingface", "word_tokenizer"),
        ("transformers", "huggingface", "HuggingFaceAdapter"),
    ],
)
def test_a_missing_extra_is_named(hidden, extra, call, monkeypatch, tmp_path):
    """With the module hidden (None in sys.modules: importing it fails as if it were not installed), the feature
    raises a ModuleNotFoundError that says which extra to install."""
    from torch import nn

    from captum_chefer import HuggingFaceAdapter
    from captum_chefer.cohort import read_cohort, summarize
    from captum_chefer.comparison.tables import write_rows
    from captum_chefer.llm import word_tokenizer

    calls = {
        "read_cohort": lambda: read_cohort(tmp_path),
        "summarize": lambda: summarize(tmp_path),
        "write_rows": lambda: write_rows([{"a": 1}], tmp_path / "rows.parquet"),
        "word_tokenizer": lambda: word_tokenizer(["fever"]),
        "HuggingFaceAdapter": lambda: HuggingFaceAdapter(nn.Linear(2, 2)),
    }
    monkeypatch.setitem(sys.modules, hidden, None)
    with pytest.raises(ModuleNotFoundError) as raised:
        calls[call]()
    assert f"needs {hidden!r}, which is not installed: pip install 'captum_chefer[{extra}]'" in str(raised.value)
    assert raised.value.name == hidden


def test_an_unknown_extra_is_refused():
    from captum_chefer._optional import extra

    with pytest.raises(ValueError, match="no extra 'parquet'; the extras are"), extra("parquet"):
        pass


def test_one_version():
    """``captum_chefer.__version__`` is the one source: pyproject.toml reads it from the file's text (a literal, so
    building imports nothing), and it is a release version that CHANGELOG.md lists."""
    assert PROJECT["dynamic"] == ["version"] and "version" not in PROJECT
    attr = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["dynamic"]["version"]
    assert attr == {"attr": "captum_chefer.__version__"}
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    literals = [
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and [getattr(t, "id", None) for t in node.targets] == ["__version__"]
        and isinstance(node.value, ast.Constant)
    ]
    assert literals == [captum_chefer.__version__]
    assert str(Version(captum_chefer.__version__)) == captum_chefer.__version__
    assert f"## [{captum_chefer.__version__}]" in (ROOT / "CHANGELOG.md").read_text()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (the checkout is left as it is), offline."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "setup.cfg", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(PACKAGE, source / "captum_chefer", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "tests", source / "tests", ignore=shutil.ignore_patterns("__pycache__"))  # must stay out
    out = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
               "--disable-pip-version-check", "-w", str(out), str(source)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = out.glob("captum_chefer-*.whl")
    return path


def test_the_wheel_holds_the_package_and_py_typed_and_no_tests(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    modules = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")}
    assert modules <= set(names), modules - set(names)
    assert "captum_chefer/py.typed" in names
    assert not [n for n in names if n.startswith(("tests/", "conftest")) or "/tests/" in n]
    assert {n.split("/")[0] for n in names} == {"captum_chefer", f"captum_chefer-{captum_chefer.__version__}.dist-info"}


def test_the_wheel_metadata_is_pyproject(wheel):
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(archive.read(name).decode())
        entry_points = archive.read(name.replace("METADATA", "entry_points.txt")).decode()
    assert metadata["Version"] == captum_chefer.__version__
    assert SpecifierSet(metadata["Requires-Python"]) == SpecifierSet(PROJECT["requires-python"])
    extras = set(metadata.get_all("Provides-Extra"))
    assert extras == set(PROJECT["optional-dependencies"])
    requires = metadata.get_all("Requires-Dist")
    unconditional = {_normalize(Requirement(r).name) for r in requires if Requirement(r).marker is None}
    assert unconditional == _requirements(PROJECT["dependencies"])
    for extra, members in _feature_extras().items():
        assert members == {
            _normalize(Requirement(r).name)
            for r in requires
            if Requirement(r).marker is not None and Requirement(r).marker.evaluate({"extra": extra})
        }, extra
    assert "captum-chefer = captum_chefer.cli:main" in entry_points


def test_the_changelog_parses():
    """Keep a Changelog: an Unreleased section, then released versions newest first, each with an ISO date and
    sections of the known kinds holding entries; the package's version is among them."""
    text = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## \[([^\]]+)\](.*)$", text, flags=re.M)
    assert headings[0] == ("Unreleased", "")
    released = [(name, rest) for name, rest in headings[1:]]
    assert released, "no released version"
    for name, rest in released:
        Version(name)
        assert re.fullmatch(r" - \d{4}-\d{2}-\d{2}", rest), f"{name}: '## [x.y.z] - YYYY-MM-DD'"
    versions = [Version(name) for name, _ in released]
    assert versions == sorted(versions, reverse=True) and len(set(versions)) == len(versions)
    assert captum_chefer.__version__ in [name for name, _ in released]
    kinds = {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}
    unreleased = text[text.index("## [Unreleased]") : text.index(f"## [{released[0][0]}]")]
    found = re.findall(r"^### (.+)$", unreleased, flags=re.M)
    assert found and set(found) <= kinds, found
    for section in re.split(r"^### .+$", unreleased, flags=re.M)[1:]:
        assert re.search(r"^- \S", section, flags=re.M), "a section without entries"
