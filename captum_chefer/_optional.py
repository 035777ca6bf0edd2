"""The optional dependencies: a feature whose packages are missing names the extra that installs them.

Each extra of ``pyproject.toml`` serves one feature. The modules that belong to it are imported where the
feature needs them, inside :func:`extra`, so a missing one says what to install instead of only its name.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["EXTRAS", "extra"]

#: Each extra and the feature it serves, as the error message names it.
EXTRAS: dict[str, str] = {
    "cohort": "Parquet output (attribute_dataset, read_cohort, summarize, tables saved as .parquet)",
    "huggingface": "HuggingFace transformers support (HuggingFaceAdapter, word_tokenizer)",
}


@contextmanager
def extra(name: str) -> Iterator[None]:
    """Imports inside the block belong to the extra ``name``; a module that is not installed raises a
    :class:`ModuleNotFoundError` that names the extra to install.

    Args:
        name: an extra of ``pyproject.toml`` (a key of :data:`EXTRAS`).

    Raises:
        ValueError: ``name`` is not an extra.
        ModuleNotFoundError: a module imported in the block is not installed; the message says
            ``pip install 'captum_chefer[name]'``.

    Example:
        >>> with extra("cohort"):
        ...     import json  # installed: nothing happens
        >>> with extra("cohort"):  # doctest: +ELLIPSIS
        ...     import no_such_module_anywhere
        Traceback (most recent call last):
        ModuleNotFoundError: ... needs 'no_such_module_anywhere', which is not installed: pip install '...[cohort]'
    """
    if name not in EXTRAS:
        raise ValueError(f"no extra {name!r}; the extras are {sorted(EXTRAS)}")
    try:
        yield
    except ModuleNotFoundError as error:
        missing = error.name or str(error)
        raise ModuleNotFoundError(
            f"{EXTRAS[name]} needs {missing!r}, which is not installed: pip install 'captum_chefer[{name}]'",
            name=error.name,
        ) from error
