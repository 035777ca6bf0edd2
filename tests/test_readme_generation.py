"""The "Generated text" examples run as written: the README's short one and docs/generation.md's full one."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(path: Path, section: str | None = None) -> list[str]:
    text = path.read_text()
    if section is not None:
        start = text.index(f"<!-- section: {section}")
        text = text[start : text.index("<!-- end section", start)]
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _run(block: str, name: str) -> dict:
    import matplotlib.pyplot as plt

    namespace: dict = {}
    try:
        exec(compile(block, name, "exec"), namespace)
    finally:
        plt.close("all")
    return namespace


def test_readme_generation_example_runs(capsys):
    (block,) = python_blocks(ROOT / "README.md", "example-generation")
    result = _run(block, "README.md (Generated text)")["result"]
    assert result.output_tokens == ["and", "a", "dry", "cough"] and tuple(result.token_attr.shape) == (4, 4)
    assert "['and', 'a', 'dry', 'cough'] torch.Size([4, 4])" in capsys.readouterr().out


def test_docs_generation_example_runs(capsys):
    (block,) = python_blocks(ROOT / "docs" / "generation.md")
    namespace = _run(block, "docs/generation.md")
    result, caption, results = namespace["result"], namespace["caption"], namespace["results"]
    assert result.output_tokens == ["and", "a", "dry", "cough"] and tuple(result.token_attr.shape) == (4, 4)
    assert tuple(caption.image_attr.shape) == (3, 3, 32, 32)
    assert [r.output_tokens for r in results] == [["reports", "fever"], ["since", "monday"]]
    assert "['the', 'patient', 'reports', 'fever']" in capsys.readouterr().out
