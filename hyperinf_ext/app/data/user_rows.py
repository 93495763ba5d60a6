"""The user's own rows, kept as they were read, so that ``audit`` and ``select`` can write them back unchanged.

:func:`read_user_rows` reads a CSV or JSON-lines file (or a ``.json`` array) with the same readers as
:func:`~hyperinf_ext.app.data.files.load_text_file` and keeps every row by its file line (CSV: the header is
line 1; JSON lines: the line; a JSON array: the element number), which is what ``TextDataset.rows`` names.
:meth:`UserRows.write` writes chosen rows in the input's format: every original column (key) with its value
as read, in the given order, plus the columns a command adds (``rank``, scores).  JSON lines written
without added columns are the input's lines byte for byte.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..messages import one_line
from .dataset import DataError
from .files import _CSV_SUFFIXES, _JSONL_SUFFIXES, _read_csv_rows, _read_json_rows, jsonl_lines, open_text

__all__ = ["UserRows", "read_user_rows", "check_added_columns"]


@dataclass
class UserRows:
    """Every row of one user file, by file line, and its format (``csv``, ``jsonl`` or ``json``)."""

    path: Path
    format: str
    columns: list[str]
    """CSV: the header; JSON: the keys in the order first seen."""
    rows: dict[int, dict[str, Any]]
    raw: dict[int, str] = field(default_factory=dict)
    """JSON lines: each row's line as written (rows written without added columns are these)."""

    @property
    def suffix(self) -> str:
        """The output file suffix of this format (compressed inputs are written uncompressed)."""
        return {"csv": ".csv", "jsonl": ".jsonl", "json": ".json"}[self.format]

    def column_of(self, line: int, *candidates: str) -> str:
        """The first of ``candidates`` that row ``line`` holds (the last candidate when it holds none)."""
        row = self.rows.get(line, {})
        return next((c for c in candidates if row.get(c) not in (None, "")), candidates[-1])

    def write(self, path: str | Path, lines: Sequence[int],
              added: Sequence[Mapping[str, Any]] | None = None) -> None:
        """Write rows ``lines`` (in that order) to ``path`` in the input's format, each followed by the
        columns of ``added[i]`` (the same keys for every row)."""
        if added is not None and len(added) != len(lines):
            raise ValueError(f"added: {len(added)} entries for {len(lines)} rows")
        extra = list(added[0]) if added else []
        path = Path(path)
        if self.format == "csv":
            with open(path, "w", newline="", encoding="utf-8") as fh:
                w = csv.writer(fh, lineterminator="\n")
                w.writerow([*self.columns, *extra])
                for i, line in enumerate(lines):
                    row = self.rows[line]
                    w.writerow([*(row[c] for c in self.columns), *(_cell(added[i][c]) for c in extra)])
            return
        records = []
        for i, line in enumerate(lines):
            if not extra and self.format == "jsonl":
                records.append(self.raw[line])
            else:
                records.append(json.dumps({**self.rows[line], **(added[i] if added else {})}, ensure_ascii=False))
        with open(path, "w", encoding="utf-8") as fh:
            if self.format == "jsonl":
                fh.writelines(r + "\n" for r in records)
            else:
                fh.write("[\n" + ",\n".join(records) + "\n]\n")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)  # the shortest text that reads back as the same float64
    return str(value)


def read_user_rows(path: str | Path) -> UserRows:
    """Every row of ``path`` (CSV, JSON lines or a JSON array; optionally .gz/.bz2) by its file line.

    Raises:
        DataError: the file is missing, of an unknown type, empty, or malformed (named by line).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    name = path.name.lower()
    if name.endswith(_CSV_SUFFIXES):
        columns, rows = _read_csv_rows(path)
        return UserRows(path, "csv", columns, dict(rows))
    if not name.endswith(_JSONL_SUFFIXES):
        raise DataError(f"{path}: unsupported file type; expected one of {', '.join(_CSV_SUFFIXES + _JSONL_SUFFIXES)}")
    try:
        with open_text(path) as f:
            content = f.read()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read file ({one_line(exc)})") from None
    rows = dict(_read_json_rows(path))
    columns: dict[str, None] = {}
    for row in rows.values():
        columns.update(dict.fromkeys(map(str, row)))
    if content.lstrip().startswith("["):
        return UserRows(path, "json", list(columns), rows)
    lines = jsonl_lines(content)
    return UserRows(path, "jsonl", list(columns), rows, {line: lines[line - 1] for line in rows})


def check_added_columns(rows: UserRows, added: Sequence[str], command: str) -> None:
    """Refuse a file that already holds a column the command adds (its values would be ambiguous).

    Raises:
        DataError: naming the file, the first line holding such a column, and the column.
    """
    for line, row in rows.rows.items():
        clash = next((c for c in added if c in row), None)
        if clash is not None:
            where = "the header (line 1)" if rows.format == "csv" else f"line {line}"
            raise DataError(f"{rows.path}: {where}, column '{clash}': {command} adds a column of that name to "
                            f"its output ({', '.join(added)}); rename the column")
