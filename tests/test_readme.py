"""The README's examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(section: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"<!-- section: {section}")
    end = text.index("<!-- end section", start)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_api_example_runs(capsys):
    (block,) = python_blocks("api")
    namespace: dict = {}
    exec(compile(block, "README.md (API)", "exec"), namespace)
    scores, model = namespace["scores"], namespace["model"]
    assert sorted(scores) == sorted(model.feature_keys)
    assert "conditions" in capsys.readouterr().out
