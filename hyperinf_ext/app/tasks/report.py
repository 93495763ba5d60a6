"""Everything the tasks write or print: text tables, CSV and JSON files, figures.

Each task module owns its own report (tables, figures, files); this module holds what they share and
imports no task module, so results are read by attribute.  Figures are drawn on a bare
:class:`matplotlib.figure.Figure` with an Agg canvas instead of ``pyplot``: pyplot keeps global
figure state and would switch the process-wide backend of a caller that uses it.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import numpy as np

__all__ = ["accuracy_name", "column_table", "damping_text", "figure", "json_ready", "strip_right", "write_csv",
           "write_json"]


# ------------------------------------------------------------------------------ JSON and CSV


def json_ready(obj: Any, nonfinite: Literal["null", "string"] = "null") -> Any:
    """``obj`` with numpy scalars as Python numbers, paths as strings and dict keys as strings.

    Strict JSON has no NaN/Infinity: ``nonfinite="null"`` writes them as ``null`` (a missing value,
    e.g. an undefined AUC); ``"string"`` as ``"nan"``/``"inf"``/``"-inf"`` (a diverged solver's error,
    kept visible).
    """
    if isinstance(obj, dict):
        return {str(k): json_ready(v, nonfinite) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v, nonfinite) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        if math.isfinite(v):
            return v
        return None if nonfinite == "null" else str(v)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | Path, payload: Any, nonfinite: Literal["null", "string"] = "null") -> None:
    """``payload`` (through :func:`json_ready`) as indented strict JSON, UTF-8, ending in a newline."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(json_ready(payload, nonfinite), fh, indent=2, ensure_ascii=False, allow_nan=False)
        fh.write("\n")


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A UTF-8 CSV file: ``header`` then ``rows``."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def accuracy_name(cfg: Any) -> str:
    from ..models.family import is_causal

    return "answer exact-match accuracy" if is_causal(cfg) else "accuracy"


# ------------------------------------------------------------------------------ text tables


def column_table(header: Sequence[str], rows: Sequence[Sequence[Any]], left: Sequence[int] = (0,)) -> list[str]:
    """Fixed-width lines: the ``left`` columns (default: the first) left-aligned, the others right-aligned
    (numbers), dashes under the header."""
    table = [list(map(str, header)), *(list(map(str, r)) for r in rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return [line(table[0]), line(["-" * w for w in widths]), *(line(r) for r in table[1:])]


def damping_text(m: Any) -> str:
    """"spectral × 3: 1.2e-04…3.4e-03" (the rule, then the smallest and largest per-layer λ)."""
    if m.damping_values is None:
        return m.damping_rule if m.damping_rule != "-" else "none"
    lo, hi = m.damping_values
    values = f"{lo:.2g}" if lo == hi else f"{lo:.2g}…{hi:.2g}"
    return f"{m.damping_rule}: {values}" if m.damping_rule != values else values


def strip_right(lines: list[str]) -> list[str]:
    return [line.rstrip() for line in lines]


# ------------------------------------------------------------------------------ figures


def figure(width: float, height: float, dpi: int) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


