"""``report.html``: one self-contained page per run — settings, ranked examples, score bars, heatmaps, plots.

The page needs no server and no network: style and the table-sorting script are inline
(:mod:`.html_assets`), images are embedded as base64 ``data:`` URIs, and a Content-Security-Policy
forbids the browser to load anything else.  Every text from the data (a training example may hold
``<script>``) is HTML-escaped.  A task builds a list of sections and calls :func:`write_html_report`::

    from .html_report import Column, Group, Plot, Table, Text, TokenHeatmap, write_html_report

    cols = [Column("rank", "rank", "int"), Column("text", "text"), Column("score", "score", "score")]
    rows = [{"rank": 1, "text": "a lovely film", "score": -0.8}, {"rank": 2, "text": "dull", "score": 0.3}]
    write_html_report(stage / "report.html", title="hyperinf-ext audit",
                      summary=["300 training examples ranked by influence on target.jsonl"],
                      settings=cfg.settings(),
                      sections=[Text("Target", "what the scores are measured against"),
                                Table("Most suspicious", cols, rows, note="positive = raises the loss"),
                                Plot("Detection curve", stage / "detection.png"),
                                Group("Query (line 3)", [Text("Query", "a dull film"), Table("Top", cols, rows),
                                      TokenHeatmap("Per token", [("train line 4", ["a", " dull"], [0.1, -0.4])])])])

Column kinds: ``"text"`` (wrapped; over :data:`LONG_TEXT` characters it folds into an expandable
cell), ``"int"``, ``"number"`` (4 significant digits) and ``"score"`` (the number and a signed bar:
red for positive, blue for negative, length ∝ |value| / the column's largest |value|).  Every table
sorts by a click on a header.  A missing key, ``None`` or NaN is an empty cell (sorted last).  A
:class:`Group` puts several sections in one box under one heading (one entry of the contents line):
e.g. a query's text, its table and its per-token heatmap.
"""
from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, Union

from ...persistence.files import write_bytes_atomic
from .html_assets import CSP, NEGATIVE_RGB, POSITIVE_RGB, SCRIPT, STYLE

__all__ = ["Column", "Group", "LONG_TEXT", "MAX_ROWS", "cut_rows", "Plot", "Section", "Table", "Text", "TokenHeatmap", "render_html",
           "write_html_report"]

Kind = Literal["text", "number", "score", "int"]
KINDS = ("text", "number", "score", "int")
LONG_TEXT = 280
"""Characters of a text cell shown before it folds into an expandable cell (the full text one click away)."""
WIDE_TEXT = 60
"""A text column with a longer value is given a wider minimum width."""
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_ROWS = 1000
"""Rows of a per-example table in a report.html (the first ones in their order); the file beside it has all."""


def cut_rows(rows: list[dict[str, Any]], what: str, where: str, limit: int = MAX_ROWS, total: int | None = None
             ) -> tuple[list[dict[str, Any]], str]:
    """The first ``limit`` rows, and a note saying so (and ``where`` the rest is) when some were left out;
    ``total``: how many rows there are when ``rows`` holds only the leading ones."""
    total = len(rows) if total is None else total
    if total <= limit:
        return rows, ""
    return rows[:limit], f"The first {limit} of {total} {what} are shown; {where}."


@dataclass(frozen=True)
class Column:
    """One table column: ``key`` into each row dict, the header ``title`` and how values are shown."""

    key: str
    title: str
    kind: Kind = "text"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Column {self.key!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")


@dataclass
class Table:
    """A sortable table: one ``<tr>`` per dict of ``rows``, in the given order."""

    title: str
    columns: Sequence[Column]
    rows: Sequence[Mapping[str, Any]]
    note: str = ""
    """A line under the title (what the scores mean, how many rows were left out)."""


@dataclass
class Plot:
    """An existing PNG file, embedded in the page as a base64 data URI."""

    title: str
    png_path: str | Path
    note: str = ""


@dataclass
class TokenHeatmap:
    """Per-token values of some examples, each ``(label, tokens, shares)`` with one share per token.

    Tokens are shown inline in their order (join them and you get the text back), each on a background
    whose colour says the share's sign (red positive, blue negative) and whose strength says |share|
    relative to the largest |share| of that example; the exact share is the token's tooltip.
    """

    title: str
    items: Sequence[tuple[str, Sequence[str], Sequence[float]]]
    note: str = ""


@dataclass
class Text:
    """Free text: paragraphs separated by blank lines, line breaks kept."""

    title: str
    body: str


@dataclass
class Group:
    """Several sections in one box under one heading; theirs become sub-headings (groups do not nest)."""

    title: str
    sections: Sequence[Union[Table, Plot, TokenHeatmap, Text]]
    note: str = ""


Section = Union[Table, Plot, TokenHeatmap, Text, Group]


def write_html_report(path: str | Path, *, title: str, summary: Sequence[str], settings: Mapping[str, Any],
                      sections: Sequence[Section] = ()) -> Path:
    """Write the page atomically (``persistence.files.write_bytes_atomic``: a temporary file in the same
    folder, then a rename); returns ``path``.

    Args:
        path: the ``.html`` file (its folder must exist: a task writes into its staging folder).
        title: the page title and heading.
        summary: lines shown first, as a list (what was run, on what, the headline numbers).
        settings: the run's settings, one row each (nested values as compact JSON).
        sections: shown in order, each in its own box, linked from a contents line when there are several.
    """
    path = Path(path)
    text = render_html(title=title, summary=summary, settings=settings, sections=sections)
    write_bytes_atomic(path, text.encode("utf-8"))
    return path


def render_html(*, title: str, summary: Sequence[str], settings: Mapping[str, Any],
                sections: Sequence[Section] = ()) -> str:
    """The page :func:`write_html_report` writes, as a string."""
    from ...version import __version__

    parts = [_settings_section(settings)] + [_section(s, f"s{i + 1}") for i, s in enumerate(sections)]
    nav = ""
    if len(sections) > 1:
        links = " ".join(f'<a href="#s{i + 1}">{_esc(s.title)}</a>' for i, s in enumerate(sections))
        nav = f'<nav>Contents: <a href="#settings">Settings</a> {links}</nav>'
    items = "".join(f"<li>{_esc(line)}</li>" for line in summary)
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_esc(CSP)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title>",
        f"<style>{STYLE}</style>",
        "</head>",
        "<body>",
        "<main>",
        f"<h1>{_esc(title)}</h1>",
        f'<ul class="summary">{items}</ul>' if items else "",
        nav,
        *parts,
        f"<footer>Written by hyperinf-ext {_esc(__version__)}. Self-contained: nothing is loaded from the "
        "network. Click a column header to sort.</footer>",
        "</main>",
        f"<script>{SCRIPT}</script>",
        "</body>",
        "</html>",
        "",
    ])


# ------------------------------------------------------------------------------ sections


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _box(title: str, ident: str, body: str, note: str = "", level: int = 2) -> str:
    """A top-level section (``level`` 2, a box with an id for the contents line) or a group's part (3)."""
    note_html = f'<p class="note">{_esc(note)}</p>' if note else ""
    if level == 3:
        return f'<div class="part"><h3>{_esc(title)}</h3>{note_html}{body}</div>'
    return f'<section id="{ident}"><h2>{_esc(title)}</h2>{note_html}{body}</section>'


def _setting_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str, ensure_ascii=False)
    return "—" if value is None else str(value)


def _settings_section(settings: Mapping[str, Any]) -> str:
    pairs = "".join(f"<div><dt>{_esc(k)}</dt><dd>{_esc(_setting_text(v))}</dd></div>" for k, v in settings.items())
    return _box("Settings", "settings", f'<dl class="settings">{pairs}</dl>')


def _section(s: Section, ident: str, level: int = 2) -> str:
    if isinstance(s, Group):
        if level != 2:
            raise TypeError(f"{s.title}: a Group cannot hold another Group")
        return _box(s.title, ident, "".join(_section(part, "", 3) for part in s.sections), s.note)
    if isinstance(s, Table):
        return _box(s.title, ident, _table(s), s.note, level)
    if isinstance(s, Plot):
        return _box(s.title, ident, _plot(s), s.note, level)
    if isinstance(s, TokenHeatmap):
        return _box(s.title, ident, _heatmap(s), s.note, level)
    if isinstance(s, Text):
        paragraphs = [p for p in str(s.body).split("\n\n") if p.strip()]
        return _box(s.title, ident, '<div class="body">' + "".join(f"<p>{_esc(p)}</p>" for p in paragraphs)
                    + "</div>", level=level)
    raise TypeError(f"not a report section: {type(s).__name__}")


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None for a missing, non-numeric or non-finite value."""
    if value is None or isinstance(value, str):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _text_cell(value: Any, wide: bool) -> str:
    text = "" if value is None else str(value)
    cls = "text wide" if wide else "text"
    if len(text) <= LONG_TEXT:
        return f'<td class="{cls}">{_esc(text)}</td>'
    short = text[:LONG_TEXT].rstrip() + "…"
    return (f'<td class="{cls}" data-v="{_esc(text[:200])}"><details class="long"><summary><span class="short">'
            f'{_esc(short)}</span></summary>{_esc(text)}</details></td>')


def _score_cell(v: float | None, scale: float, signed: bool) -> str:
    if v is None:
        return '<td class="score" data-v=""></td>'
    width = 0.0 if scale <= 0 else min(100.0, 100.0 * abs(v) / scale)
    bar = f'<span class="bar {"pos" if v >= 0 else "neg"}" style="width:{width:.1f}%"></span>'
    if signed:  # negative bars grow left of the axis, positive ones right of it
        left, right = (bar, "") if v < 0 else ("", bar)
        track = f'<span class="track"><span class="half left">{left}</span><span class="half">{right}</span></span>'
    else:
        track = f'<span class="track single"><span class="half">{bar}</span></span>'
    return (f'<td class="score" data-v="{v!r}"><span class="scorecell"><span class="v">{v:.4g}</span>{track}'
            "</span></td>")


def _cell(col: Column, value: Any, scale: float, signed: bool) -> str:
    """One ``<td>``; for a score column ``scale`` is its largest |value| and ``signed`` whether it has both
    signs, for a text column ``signed`` says it holds long texts (a wider column)."""
    if col.kind == "text":
        return _text_cell(value, signed)
    v = _number(value)
    if col.kind == "score":
        return _score_cell(v, scale, signed)
    if v is None:
        return f'<td class="{col.kind}" data-v="">{_esc("" if value is None else value)}</td>'
    shown = str(int(v)) if col.kind == "int" and v.is_integer() else f"{v:.4g}"
    return f'<td class="{"int" if col.kind == "int" else "num"}" data-v="{v!r}">{shown}</td>'


def _table(t: Table) -> str:
    scales: dict[str, tuple[float, bool]] = {}
    for col in t.columns:
        if col.kind == "score":
            values = [v for v in (_number(r.get(col.key)) for r in t.rows) if v is not None]
            scales[col.key] = (max((abs(v) for v in values), default=0.0),
                               any(v < 0 for v in values) and any(v > 0 for v in values))
        elif col.kind == "text":  # a column of long texts gets the room, short labels stay narrow
            scales[col.key] = (0.0, any(len(str(r.get(col.key, ""))) > WIDE_TEXT for r in t.rows))
    head = "".join(f'<th data-kind="{"text" if c.kind == "text" else "number"}" tabindex="0" scope="col">'
                   f"{_esc(c.title)}</th>" for c in t.columns)
    body = "".join(
        "<tr>" + "".join(_cell(c, r.get(c.key), *scales.get(c.key, (0.0, False))) for c in t.columns) + "</tr>"
        for r in t.rows
    )
    legend = ""
    if any(c.kind == "score" for c in t.columns):
        legend = ('<p class="legend">Bars: <span class="swatch pos"></span> positive, <span class="swatch neg">'
                  "</span> negative; length = |score| relative to the largest in its column.</p>")
    return (f'{legend}<div class="tablewrap"><table class="sortable"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def _plot(p: Plot) -> str:
    data = Path(p.png_path).read_bytes()
    if data[:8] != PNG_MAGIC:
        raise ValueError(f"{p.png_path}: not a PNG file")
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return f'<figure><img alt="{_esc(p.title)}" src="{uri}"></figure>'


def _token_style(share: float, scale: float) -> str:
    """Background by sign and by |share| / ``scale`` (the row's largest |share|); light text on dark shades."""
    strength = 0.0 if scale <= 0 else min(1.0, abs(share) / scale)
    r, g, b = POSITIVE_RGB if share >= 0 else NEGATIVE_RGB
    ink = "; color: #fff" if strength > 0.6 else ""  # dark text is hard to read on the strongest shades
    return f"background:rgba({r}, {g}, {b}, {0.85 * strength:.3f}){ink}"


def _heatmap(h: TokenHeatmap) -> str:
    rows = []
    for label, tokens, shares in h.items:
        if len(tokens) != len(shares):
            raise ValueError(f"{h.title}: {label}: {len(tokens)} tokens but {len(shares)} shares")
        values = [_number(s) or 0.0 for s in shares]
        scale = max((abs(v) for v in values), default=0.0)
        spans = "".join(f'<span class="tok" style="{_token_style(v, scale)}" title="{v:.4g}">'
                        f"{_esc(tok)}</span>" for tok, v in zip(tokens, values))
        total = sum(values)
        rows.append(f'<div class="heatrow"><div class="heatlabel">{_esc(label)} · sum of shares {total:.4g}</div>'
                    f'<div class="tokens">{spans}</div></div>')
    legend = ('<p class="legend"><span class="gradient"></span> negative … 0 … positive share; each row is '
              "scaled to its own largest |share|; hover a token for its share.</p>")
    return legend + "".join(rows)
