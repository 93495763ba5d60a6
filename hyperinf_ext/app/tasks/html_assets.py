"""The inline style sheet, script and page policy of ``report.html`` (see :mod:`.html_report`).

Everything a report needs travels inside the file: no font, style sheet, script or image is fetched,
and the Content-Security-Policy below forbids the browser to fetch any (images only as ``data:``
URIs).  The script only sorts tables: a click on a header sorts its rows by that column (numbers
numerically, texts lexically, empty cells last), a second click reverses the order.
"""
from __future__ import annotations

__all__ = ["CSP", "POSITIVE_RGB", "NEGATIVE_RGB", "SCRIPT", "STYLE"]

POSITIVE_RGB = (202, 64, 52)
"""Colour of positive scores and shares (red: under the sign convention they raise the query loss)."""
NEGATIVE_RGB = (33, 113, 181)
"""Colour of negative scores and shares (blue: they lower the query loss)."""

CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
       "base-uri 'none'; form-action 'none'")
"""No network: nothing may be loaded but the page's own inline style, script and data: images."""

_POS = "rgb({}, {}, {})".format(*POSITIVE_RGB)
_NEG = "rgb({}, {}, {})".format(*NEGATIVE_RGB)

STYLE = """
:root { --pos: %(pos)s; --neg: %(neg)s; --line: #d8dde3; --muted: #5b6470; --head: #eef1f5; }
* { box-sizing: border-box; }
body { margin: 0; background: #f7f8fa; color: #1d232b;
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", "Liberation Sans", sans-serif; }
main { max-width: 1240px; margin: 0 auto; padding: 20px 28px 40px; }
h1 { font-size: 22px; margin: 6px 0 10px; }
h2 { font-size: 17px; margin: 0 0 8px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 14px 18px;
  margin: 14px 0; }
ul.summary { margin: 0 0 8px; padding-left: 20px; }
ul.summary li { margin: 2px 0; }
nav { font-size: 13px; color: var(--muted); margin: 6px 0 0; }
nav a { color: #24528a; margin-right: 12px; text-decoration: none; white-space: nowrap; }
nav a:hover { text-decoration: underline; }
p.note, p.legend, footer { color: var(--muted); font-size: 12.5px; margin: 6px 0; }
.body p { margin: 4px 0; white-space: pre-wrap; overflow-wrap: anywhere; }
.tablewrap { max-height: 640px; overflow: auto; border: 1px solid var(--line); border-radius: 4px; }
table { border-collapse: collapse; width: 100%%; font-size: 13px; }
th, td { padding: 4px 8px; border-bottom: 1px solid #edf0f3; vertical-align: top; text-align: left; }
th { background: var(--head); position: sticky; top: 0; z-index: 1; font-weight: 600; vertical-align: bottom;
  border-bottom: 1px solid var(--line); }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th::after { content: "\\00a0\\2195"; color: #9aa3ad; font-weight: 400; }
table.sortable th[aria-sort=ascending]::after { content: "\\00a0\\25B2"; color: #1d232b; }
table.sortable th[aria-sort=descending]::after { content: "\\00a0\\25BC"; color: #1d232b; }
tbody tr:nth-child(even) { background: #fafbfc; }
tbody tr:hover { background: #f1f5fb; }
td.num, td.int { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.text { max-width: 40em; white-space: pre-wrap; overflow-wrap: anywhere; }
td.wide { min-width: 22em; }
dl.settings { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 2px 18px;
  margin: 0; font-size: 13px; }
dl.settings div { display: flex; gap: 10px; padding: 3px 0; border-bottom: 1px solid #edf0f3; min-width: 0; }
dl.settings dt { color: var(--muted); flex: 0 0 9.5em; overflow-wrap: anywhere; }
dl.settings dd { margin: 0; white-space: pre-wrap; overflow-wrap: anywhere; min-width: 0; }
h3 { font-size: 14.5px; margin: 14px 0 6px; }
.part:first-of-type h3 { margin-top: 4px; }
details.long summary { cursor: pointer; list-style-position: outside; }
details.long[open] .short { display: none; }
td.score { white-space: nowrap; }
.scorecell { display: flex; align-items: center; gap: 8px; justify-content: flex-end; }
.scorecell .v { font-variant-numeric: tabular-nums; min-width: 5.2em; text-align: right; }
.track { display: inline-flex; width: 110px; height: 11px; background: #f0f2f5; border-radius: 2px;
  flex: none; }
.half { display: flex; width: 50%%; height: 100%%; }
.half.left { justify-content: flex-end; border-right: 1px solid #9aa3ad; }
.track.single .half { width: 100%%; }
.bar { display: block; height: 100%%; border-radius: 1px; }
.bar.pos { background: var(--pos); }
.bar.neg { background: var(--neg); }
.swatch { display: inline-block; width: 12px; height: 10px; border-radius: 2px; vertical-align: -1px; }
.swatch.pos { background: var(--pos); }
.swatch.neg { background: var(--neg); }
.gradient { display: inline-block; width: 160px; height: 10px; vertical-align: -1px; border-radius: 2px;
  background: linear-gradient(to right, var(--neg), #fff, var(--pos)); border: 1px solid var(--line); }
figure { margin: 0; }
figure img { max-width: 100%%; height: auto; border: 1px solid var(--line); border-radius: 4px; background: #fff; }
.heatrow { margin: 8px 0 12px; }
.heatlabel { font-weight: 600; font-size: 12.5px; color: #333b45; margin-bottom: 2px; }
.tokens { font-family: ui-monospace, "DejaVu Sans Mono", "Liberation Mono", Menlo, monospace; font-size: 13px;
  line-height: 1.9; white-space: pre-wrap; overflow-wrap: anywhere; background: #fcfcfd;
  border: 1px solid #edf0f3; border-radius: 4px; padding: 4px 6px; }
.tok { border-radius: 2px; padding: 1px 0; }
""" % {"pos": _POS, "neg": _NEG}

SCRIPT = """
(function () {
  function key(cell) {
    var v = cell.getAttribute('data-v');
    return v === null ? cell.textContent.trim() : v;
  }
  function sortBy(table, th, col) {
    var ths = table.tHead.rows[0].cells;
    var asc = th.getAttribute('aria-sort') !== 'ascending';
    for (var j = 0; j < ths.length; j++) { ths[j].removeAttribute('aria-sort'); }
    th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
    var numeric = th.getAttribute('data-kind') !== 'text';
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows).map(function (r, i) {
      var k = key(r.cells[col]);
      return { row: r, i: i, k: numeric ? (k === '' ? NaN : parseFloat(k)) : k };
    });
    rows.sort(function (a, b) {
      var empty = function (x) { return numeric ? isNaN(x.k) : x.k === ''; };
      if (empty(a) !== empty(b)) { return empty(a) ? 1 : -1; }
      var c = 0;
      if (!empty(a)) { c = numeric ? a.k - b.k : a.k.localeCompare(b.k); }
      if (!asc) { c = -c; }
      return c !== 0 ? c : a.i - b.i;
    });
    rows.forEach(function (x) { body.appendChild(x.row); });
  }
  var tables = document.querySelectorAll('table.sortable');
  Array.prototype.forEach.call(tables, function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      th.addEventListener('click', function () { sortBy(table, th, col); });
      th.addEventListener('keydown', function (e) {
        if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); sortBy(table, th, col); }
      });
    });
  });
})();
"""
