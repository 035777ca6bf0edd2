"""The package's modules import each other in one direction only (DESIGN.md), lazy imports included: the math
imports nothing of the package, the interface (protocol) only the math, and the Captum method and the adapters
depend on the interface, never on each other."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "captum_chefer"

# Lower layers never import higher ones; modules of one layer do not import each other unless listed.
LAYERS = [
    {"_optional"},  # the ImportError that names an extra: imports nothing of the package
    {"relevance"},  # the pure tensor math
    {"protocol"},  # what an attention model offers the algorithm
    {"capture", "layernorm"},  # model plumbing: attention capture, LayerNorm's fixed scale
    {"attribution", "adapters"},  # the Captum method and the adapters: neither imports the other
    {"comparison", "visualization", "cohort", "synthetic", "llm"},
    {"report"},
    {"cli"},
    {"__main__"},
]
SAME_LAYER_ALLOWED = {("comparison", "synthetic"), ("cohort", "comparison"), ("llm", "comparison")}


def _unit(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0] if parts[0] != "__init__" else "__init__"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    package_parts = path.relative_to(PACKAGE).parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = list(package_parts[: len(package_parts) - (node.level - 1)])
                target = base + (node.module.split(".") if node.module else [])
                if not target:
                    target = [alias.name for alias in node.names]
                found.add(target[0])
            elif node.module and node.module.startswith("captum_chefer."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("captum_chefer."):
                    found.add(alias.name.split(".")[1])
    return found


def _layer(unit: str) -> int:
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    raise AssertionError(f"module {unit!r} is not in LAYERS; place it in tests/test_layout.py")


def test_imports_point_one_way():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = _unit(path)
        if unit == "__init__":
            continue
        for imported in _imports(path) - {unit}:
            if imported == "__init__":
                continue
            mine, theirs = _layer(unit), _layer(imported)
            if theirs > mine or (theirs == mine and (unit, imported) not in SAME_LAYER_ALLOWED):
                problems.append(f"{path.relative_to(PACKAGE.parent)} imports {imported}")
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


def test_the_method_and_the_adapters_meet_only_in_the_protocol():
    # the same-layer rule above forbids it; said here by name, as the design states it
    adapters = {p.relative_to(PACKAGE).as_posix(): _imports(p) for p in (PACKAGE / "adapters").rglob("*.py")}
    assert {name for name, found in adapters.items() if "attribution" in found} == set()
    assert "adapters" not in _imports(PACKAGE / "attribution.py")
    assert _imports(PACKAGE / "protocol.py") == set() and _imports(PACKAGE / "relevance.py") == set()
