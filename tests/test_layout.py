"""The package's modules import each other in one direction only, as the layer table of docs/architecture.md
states, lazy imports included: the math imports nothing of the package, the interface (protocol) nothing either,
and the Captum method and the adapters depend on the interface, never on each other."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "captum_chefer"

ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"


def _between(text: str, tag: str) -> list[str]:
    start, end = f"<!-- {tag}: read by tests/test_layout.py -->", "<!-- end " + tag + " -->"
    assert start in text and end in text, f"docs/architecture.md has no {start} ... {end} block"
    return [line.strip() for line in text.split(start, 1)[1].split(end, 1)[0].splitlines() if line.strip()]


def _documented_layers() -> tuple[list[set[str]], set[tuple[str, str]]]:
    """The layer table and the allowed same-layer imports, as docs/architecture.md states them."""
    text = ARCHITECTURE.read_text()
    layers = []
    for row in _between(text, "layers")[2:]:  # past the header and the rule
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == str(len(layers)), f"layer numbers out of order at {row!r}"
        layers.append(set(re.findall(r"`([^`]+)`", cells[1])))
    allowed = set()
    for item in _between(text, "same-layer"):
        found = re.fullmatch(r"- `(\w+)` -> `(\w+)`", item)
        assert found, f"not a '- `module` -> `module`' line: {item!r}"
        allowed.add((found.group(1), found.group(2)))
    return layers, allowed


# Lower layers never import higher ones; modules of one layer do not import each other unless listed.
LAYERS, SAME_LAYER_ALLOWED = _documented_layers()


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
    raise AssertionError(f"module {unit!r} is in no layer of docs/architecture.md; add it to the layer table")


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


def test_the_documented_layers_name_every_module_once():
    units = {_unit(p) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    named = [m for layer in LAYERS for m in layer]
    assert sorted(named) == sorted(set(named)), "a module sits in two layers of docs/architecture.md"
    assert set(named) == units, f"undocumented {sorted(units - set(named))}, gone {sorted(set(named) - units)}"
    assert all(a in named and b in named for a, b in SAME_LAYER_ALLOWED)


# the algorithm and its interface: the math, the protocol, the Captum method, LayerNorm's fixed scale
GENERIC = ("relevance.py", "protocol.py", "attribution.py", "layernorm.py")


def _code_words(path: Path) -> set[str]:
    """The identifiers and string constants of a module's code, docstrings and comments left out."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value) for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
        and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }
    words = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.update(re.findall(r"\w+", node.value))
    return words


def _model_classes() -> set[str]:
    """Every model class PyHealth, torchvision and transformers export (the libraries the adapters serve)."""
    import pyhealth.models
    import torchvision.models
    import transformers

    names = {n for n in dir(pyhealth.models) if n[:1].isupper()}
    names |= {n for n in dir(torchvision.models) if n[:1].isupper()}
    names |= {n for n in dir(transformers) if re.search(r"(Model|For[A-Z]\w+|Attention|Layer)$", n)}
    return names - {"Model"}


def test_the_algorithm_names_no_model_class():
    classes = _model_classes()
    assert {"Transformer", "StageAttentionNet", "VisionTransformer", "BertForSequenceClassification"} <= classes
    found = {name: sorted(_code_words(PACKAGE / name) & classes) for name in GENERIC}
    assert found == {name: [] for name in GENERIC}, "model classes named in the generic algorithm"
