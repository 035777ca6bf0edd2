"""Rows of results to CSV, JSON or Parquet files and back, the format chosen by the file's suffix.

``Comparison.save`` / ``Evaluation.save`` write their rows through :func:`write_rows`; the ``load``
class methods read them back with :func:`read_rows`. Parquet goes through ``pyarrow``, which PyHealth
already installs.

Example:
    >>> import tempfile
    >>> rows = [{"method": "Chefer", "sample": 0, "score": 0.5, "patient_id": None}]
    >>> for suffix in (".csv", ".json", ".parquet"):
    ...     path = write_rows(rows, tempfile.mkdtemp() + "/rows" + suffix)
    ...     assert read_rows(path) == rows, suffix
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Iterable, Optional

from .._optional import extra

__all__ = ["FORMATS", "read_rows", "table_format", "write_rows"]

FORMATS = (".csv", ".json", ".parquet")


def table_format(path: str | Path) -> str:
    """The format of ``path`` from its suffix: ``".csv"``, ``".json"`` or ``".parquet"``."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"cannot tell the format of {str(path)!r}: name the file .csv, .json or .parquet")
    return suffix


def write_rows(rows: Iterable[dict[str, Any]], path: str | Path, columns: Optional[list[str]] = None) -> Path:
    """Write rows (dicts of ints, floats, strings, bools or ``None``) to ``path``; parents are created."""
    rows = list(rows)
    path = Path(path)
    suffix = table_format(path)
    columns = columns or _columns(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            for row in rows:
                writer.writerow([_csv_cell(row.get(c)) for c in columns])
    elif suffix == ".json":
        path.write_text(json.dumps({"columns": columns, "rows": [[_json_cell(row.get(c)) for c in columns] for row in rows]}))
    else:
        with extra("cohort"):
            import pyarrow as pa
            import pyarrow.parquet as pq

        pq.write_table(pa.table({c: [row.get(c) for row in rows] for c in columns}), path)
    return path


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows written by :func:`write_rows` (CSV cells are read back as int, float, string or ``None``)."""
    path = Path(path)
    suffix = table_format(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file {str(path)!r}")
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            columns = next(reader, [])
            return [{c: _parse_cell(v) for c, v in zip(columns, line)} for line in reader]
    if suffix == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or "columns" not in data or "rows" not in data:
            raise ValueError(f"{str(path)!r} is not a table written by captum_chefer (no 'columns' and 'rows')")
        return [dict(zip(data["columns"], [_unjson_cell(v) for v in line])) for line in data["rows"]]
    with extra("cohort"):
        import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(key, None)
    return list(seen)


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # round-trips exactly, "nan" and "inf" included
    return value


def _parse_cell(text: str) -> Any:
    """A CSV cell back as the value :func:`_csv_cell` wrote: a number only where the text is exactly how that
    number is written, so that strings such as a patient id ``"007"`` or an ICD code ``"0389"`` stay strings."""
    if text == "":
        return None
    for kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            continue
        if repr(value) == text:
            return value
    return text


def _json_cell(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": repr(value)}  # JSON has no NaN or infinity
    return value


def _unjson_cell(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"float"}:
        return float(value["float"])
    return value
