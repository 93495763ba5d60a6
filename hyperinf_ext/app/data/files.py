"""Labelled text files (CSV, JSON lines, optionally compressed) into a :class:`TextDataset`."""
from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import math
from pathlib import Path
from typing import Any, Iterator

from ..messages import one_line
from .dataset import DataError, TextDataset

__all__ = ["load_text_file", "open_text", "jsonl_lines"]

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
            dup = sorted({c for c in fieldnames if fieldnames.count(c) > 1})
            if dup:  # DictReader would keep the last of them and silently drop the others
                raise DataError(f"{path}: the header (line 1) names column '{dup[0]}' "
                                f"{fieldnames.count(dup[0])} times; column names must be distinct")
            # line_num counts physical lines and points at a row's LAST line; a row with quoted newlines
            # is named by its first line (end minus the newlines inside its fields), as an editor shows it
            rows = []
            for row in reader:
                if None in row or None in row.values():  # restkey (extra fields) / restval (missing ones)
                    n = len(fieldnames) + len(row.get(None) or ()) - sum(v is None for v in row.values())
                    raise DataError(f"{path}: line {reader.line_num} has {n} fields but the header has "
                                    f"{len(fieldnames)} ({', '.join(fieldnames)}); quote fields that contain commas")
                rows.append((reader.line_num - sum(v.count("\n") for v in row.values() if isinstance(v, str)), row))
    except (csv.Error, OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read CSV ({one_line(exc)})") from None
    if not fieldnames:
        raise DataError(f"{path}: file is empty (no header row)")
    return fieldnames, rows


def jsonl_lines(content: str) -> list[str]:
    """The lines of a JSON-lines text: split at "\n" only (a "\r" before it dropped).  ``str.splitlines``
    would also split at U+2028, U+2029, U+0085 and other separators, which JSON strings may hold unescaped
    (``json.dumps(..., ensure_ascii=False)`` writes them so), and so break a valid row in two."""
    lines = content.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


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
    for lineno, line in enumerate(jsonl_lines(content), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {lineno} is not valid JSON ({one_line(exc)})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}: line {lineno} is not a JSON object")
        yield lineno, rec


def _number(v: Any) -> float | None:
    """A label's numeric value (ints, floats, numeric strings such as "1", "1.0", "1e0"), or None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v) if math.isfinite(v) else None
    try:
        x = float(str(v).strip())
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _class_labels(path: Path, column: str, raw: list[tuple[int, Any]]) -> tuple[list[int], list[str]]:
    """(class ids, label_names) of the raw labels ``(line, value)``.

    All numeric and integer-valued → class ids; all numeric with a fraction (soft labels, a regression
    target) → DataError, as the classifier would truncate them; otherwise names, sorted.  One class written
    two ways ("1" and "1.0", "01") is refused: naming both lines is clearer than guessing."""
    nums = [_number(y) for _, y in raw]
    numeric = all(x is not None for x in nums)
    spelled: dict[Any, tuple[int, str]] = {}
    for (where, y), x in zip(raw, nums):
        if not isinstance(y, str):
            continue
        text = y.strip()
        key = x if x is not None else text
        first = spelled.setdefault(key, (where, text))
        if first[1] != text:
            raise DataError(f"{path}: column '{column}' writes one class two ways: '{first[1]}' (line {first[0]}) "
                            f"and '{text}' (line {where}); use one spelling")
    if numeric:
        frac = next(((w, y) for (w, y), x in zip(raw, nums) if not float(x).is_integer()), None)
        if frac is not None:
            raise DataError(f"{path}: column '{column}' holds {frac[1]!r} (line {frac[0]}), which is not a class id: "
                            "classification needs integer class ids or class names (soft or regression labels "
                            "are not supported)")
        labels = [int(x) for x in nums]
        if min(labels) < 0:
            raise DataError(
                f"{path}: integer labels in column '{column}' must be >= 0 (found {min(labels)})"
            )
        return labels, [str(k) for k in range(max(labels) + 1)]
    as_str = [y.strip() if isinstance(y, str) else str(y) for _, y in raw]
    label_names = sorted(set(as_str))
    to_id = {n: k for k, n in enumerate(label_names)}
    return [to_id[s] for s in as_str], label_names


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
        * all numbers, some with a fraction (soft labels) -> an error;
        * one class spelled two ways (``"1"`` and ``"1.0"``) -> an error naming both lines;
        * otherwise -> every label is taken as a string and mapped to ids in
          sorted order, e.g. ``{"neg", "pos"}`` -> ``neg=0, pos=1``.

    Rows whose text is empty after stripping are skipped, and said so in ``notes``; duplicates are kept.
    ``rows`` holds each example's file line (CSV: the header is line 1; JSON array: the element number).  ``min_classes=1``
    accepts a file of one class (e.g. queries to attribute, whose classes come from the training file).

    Raises:
        DataError: missing file, unknown extension, empty file, missing column
            (the message lists the columns present), missing label value,
            fewer than two distinct classes, a duplicate header column, a CSV row with
            more or fewer fields than the header (named by line).
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
                    f"{path}: column '{col}' not found in the header (line 1); columns present: {', '.join(columns)}"
                )
    elif name.endswith(_JSONL_SUFFIXES):
        rows = _read_json_rows(path)
    else:
        raise DataError(
            f"{path}: unsupported file type; expected one of "
            f"{', '.join(_CSV_SUFFIXES + _JSONL_SUFFIXES)}"
        )

    texts: list[str] = []
    raw_labels: list[tuple[int, Any]] = []
    skipped: list[int] = []
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
            skipped.append(where)
            continue
        y = row[label_column]
        if y is None or (isinstance(y, str) and not y.strip()):
            raise DataError(f"{path}: empty value in column '{label_column}' (line {where})")
        if isinstance(y, (list, dict)):
            raise DataError(
                f"{path}: column '{label_column}' must hold a number or string (line {where})"
            )
        texts.append(text)
        raw_labels.append((where, y))

    if not texts:
        raise DataError(f"{path}: file is empty (no rows with text)")
    labels, label_names = _class_labels(path, label_column, raw_labels)
    notes = []
    if skipped:
        shown = ", ".join(map(str, skipped[:10])) + (", …" if len(skipped) > 10 else "")
        notes.append(f"{path}: skipped {len(skipped)} row(s) with empty '{text_column}' at line(s) {shown} "
                     "(file lines; outputs number examples by file line)")

    present = sorted(set(labels))
    if len(present) < min_classes:
        only = label_names[present[0]]
        raise DataError(
            f"{path}: column '{label_column}' has a single class ('{only}'); need at least two"
        )
    return TextDataset(texts, labels, label_names, rows=[w for w, _ in raw_labels], notes=notes)
