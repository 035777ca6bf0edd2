"""A griffe extension for the API reference: the docstrings are read as the package writes them.

* ``Example:`` heads the doctests, as Google's style and Napoleon read it; griffe reads only ``Examples:`` as an
  examples section (anything else is an admonition whose ``>>>`` lines would render as text).
* Sphinx roles (``:class:`Foo```, ``:func:`~mod.bar```) become code spans, as they render in an editor.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", flags=re.M)
ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):`~?([^`]+)`")


class ReadAsWritten(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
            obj.docstring.value = ROLE.sub(r"`\1`", text)
