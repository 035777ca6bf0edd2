"""The README's "Generated text" example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(section: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"<!-- section: {section}")
    end = text.index("<!-- end section", start)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_generation_example_runs(capsys):
    import matplotlib.pyplot as plt

    (block,) = python_blocks("generation")
    namespace: dict = {}
    try:
        exec(compile(block, "README.md (Generated text)", "exec"), namespace)
    finally:
        plt.close("all")
    result, caption, results = namespace["result"], namespace["caption"], namespace["results"]
    assert result.output_tokens == ["and", "a", "dry", "cough"] and tuple(result.token_attr.shape) == (4, 4)
    assert tuple(caption.image_attr.shape) == (3, 3, 32, 32)
    assert [r.output_tokens for r in results] == [["reports", "fever"], ["since", "monday"]]
    assert "['the', 'patient', 'reports', 'fever']" in capsys.readouterr().out
