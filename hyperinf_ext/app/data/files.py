"""Labelled text files (CSV, JSON lines, optionally compressed) into a :class:`TextDataset`."""
from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
from pathlib import Path
from typing import Any, Iterator

from ..messages import one_line
from .dataset import DataError, TextDataset

__all__ = ["load_text_file", "open_text"]

_CSV_SUFFIXES = (".csv", ".csv.bz2", ".csv.gz")
_JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.bz2", ".jsonl.gz", ".json.bz2", ".json.gz")


def open_text(path: Path) -> io.TextIOBase:
    """Open a (possibly .bz2/.gz compressed) text file for reading as UTF-8."""
    # utf-8-sig: spreadsheet exports often start with a BOM, which would
    # otherwise become part of the first column name.
    name = path.name.lower()
    if name.endswith(".bz2"):
        return bz2.open(path, "rt", encoding="utf-8-sig", newline="")
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, "rt", encoding="utf-8-sig", newline="")


def _read_csv_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    try:
        with open_text(path) as f:
            reader = csv.DictReader(f)
            fieldnames = list(reader.fieldnames or ())
            # line_num counts physical lines, so for multi-line quoted fields it
            # points at the row's end; good enough for an error message.
            rows = [(reader.line_num, row) for row in reader]
    except (csv.Error, OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read CSV ({one_line(exc)})") from None
    if not fieldnames:
        raise DataError(f"{path}: file is empty (no header row)")
    return fieldnames, rows


def _read_json_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        with open_text(path) as f:
            content = f.read()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read file ({one_line(exc)})") from None
    stripped = content.lstrip()
    if stripped.startswith("["):
        # A .json file holding one array of objects is accepted too.
        try:
            records = json.loads(content)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON ({one_line(exc)})") from None
        for i, rec in enumerate(records, start=1):
            if not isinstance(rec, dict):
                raise DataError(f"{path}: array element {i} is not a JSON object")
            yield i, rec
        return
    for lineno, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {lineno} is not valid JSON ({one_line(exc)})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}: line {lineno} is not a JSON object")
        yield lineno, rec


def _is_int_label(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    if isinstance(v, float):
        return v.is_integer()
    if isinstance(v, str):
        s = v.strip()
        return s.lstrip("+-").isdigit()
    return False


def load_text_file(
    path: str | Path, text_column: str = "text", label_column: str = "label", *, min_classes: int = 2
) -> TextDataset:
    """Load a labelled text-classification file.

    Formats (by extension): CSV with a header row (``.csv``, ``.csv.bz2``,
    ``.csv.gz``) or JSON lines, one object per line (``.jsonl``, ``.json``,
    optionally ``.bz2``/``.gz``; a ``.json`` file holding one array of objects
    also works).

    Labels:
        * all integers (``0``, ``"1"``, ``2.0``) -> used as class ids directly,
          ``label_names = ["0", "1", ..., str(max)]``; negative ids are an error;
        * otherwise -> every label is taken as a string and mapped to ids in
          sorted order, e.g. ``{"neg", "pos"}`` -> ``neg=0, pos=1``.

    Rows whose text is empty after stripping are skipped; duplicates are kept.  ``min_classes=1``
    accepts a file of one class (e.g. queries to attribute, whose classes come from the training file).

    Raises:
        DataError: missing file, unknown extension, empty file, missing column
            (the message lists the columns present), missing label value,
            fewer than two distinct classes.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    name = path.name.lower()
    if name.endswith(_CSV_SUFFIXES):
        columns, rows = _read_csv_rows(path)
        for col in (text_column, label_column):
            if col not in columns:
                raise DataError(
                    f"{path}: column '{col}' not found; columns present: {', '.join(columns)}"
                )
    elif name.endswith(_JSONL_SUFFIXES):
        rows = _read_json_rows(path)
    else:
        raise DataError(
            f"{path}: unsupported file type; expected one of "
            f"{', '.join(_CSV_SUFFIXES + _JSONL_SUFFIXES)}"
        )

    texts: list[str] = []
    raw_labels: list[Any] = []
    for where, row in rows:
        for col in (text_column, label_column):
            if col not in row:
                raise DataError(
                    f"{path}: column '{col}' not found (line {where}); columns present: "
                    f"{', '.join(map(str, row.keys())) or '(none)'}"
                )
        text = row[text_column]
        text = "" if text is None else str(text).strip()
        if not text:
            continue
        y = row[label_column]
        if y is None or (isinstance(y, str) and not y.strip()):
            raise DataError(f"{path}: empty value in column '{label_column}' (line {where})")
        if isinstance(y, (list, dict)):
            raise DataError(
                f"{path}: column '{label_column}' must hold a number or string (line {where})"
            )
        texts.append(text)
        raw_labels.append(y)

    if not texts:
        raise DataError(f"{path}: file is empty (no rows with text)")

    if all(_is_int_label(y) for y in raw_labels):
        labels = [int(float(y)) if not isinstance(y, str) else int(y.strip()) for y in raw_labels]
        if min(labels) < 0:
            raise DataError(
                f"{path}: integer labels in column '{label_column}' must be >= 0 (found {min(labels)})"
            )
        label_names = [str(k) for k in range(max(labels) + 1)]
    else:
        as_str = [y.strip() if isinstance(y, str) else str(y) for y in raw_labels]
        label_names = sorted(set(as_str))
        to_id = {n: k for k, n in enumerate(label_names)}
        labels = [to_id[s] for s in as_str]

    present = sorted(set(labels))
    if len(present) < min_classes:
        only = label_names[present[0]]
        raise DataError(
            f"{path}: column '{label_column}' has a single class ('{only}'); need at least two"
        )
    return TextDataset(texts, labels, label_names)
