"""report.html (issue #22 item 4): one self-contained page, checked with Python's HTML parser.

The page is parsed into a small element tree; the tests count what a reader must find there (the
settings, each section, table headers and rows, score bars, heatmap tokens, the embedded PNG) and
what must not be there (a tag from the data, anything loaded from outside the file).  The commands
that write it (attribute, detect-mislabeled, select-data) are run at toy sizes.
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest

from hyperinf_ext.app.tasks.html_report import (
    LONG_TEXT, Column, Group, Plot, Table, Text, TokenHeatmap, render_html, write_html_report,
)

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VOID = {"meta", "img", "br", "hr", "input", "link", "source", "wbr"}
EVIL = "<script>alert('x')</script> & \"quoted\""


# ------------------------------------------------------------------------------ a small element tree


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    items: list["Node | str"] = field(default_factory=list)  # child elements and text, in document order

    @property
    def children(self) -> list["Node"]:
        return [c for c in self.items if isinstance(c, Node)]

    def all(self, tag: str | None = None, cls: str | None = None) -> list["Node"]:
        """Every descendant (depth first) with this tag and/or class."""
        found = []
        for c in self.children:
            if (tag is None or c.tag == tag) and (cls is None or cls in c.attrs.get("class", "").split()):
                found.append(c)
            found += c.all(tag, cls)
        return found

    def content(self) -> str:
        """All text inside, as a reader sees it (entities decoded)."""
        return "".join(c if isinstance(c, str) else c.content() for c in self.items)


class TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]
        self.declarations: list[str] = []

    def handle_decl(self, decl: str) -> None:
        self.declarations.append(decl)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].items.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag, attrs):
        self.stack[-1].items.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data):
        self.stack[-1].items.append(data)


def parse(page: str) -> Node:
    builder = TreeBuilder()
    builder.feed(page)
    builder.close()
    assert builder.stack == [builder.root], "unclosed elements: " + ", ".join(n.tag for n in builder.stack[1:])
    assert builder.declarations == ["DOCTYPE html"]
    return builder.root


def sections_by_title(doc: Node) -> dict[str, Node]:
    return {s.all("h2")[0].content(): s for s in doc.all("section")}


def tiny_png(path: Path) -> Path:
    """A valid 2x1 RGB PNG written by hand (no image library)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"\x00" + bytes([255, 0, 0, 0, 0, 255])
    path.write_bytes(PNG_MAGIC + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 1, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


# ------------------------------------------------------------------------------ the page


COLUMNS = [Column("rank", "rank", "int"), Column("text", "text"), Column("score", "score", "score"),
           Column("self", "self-influence", "score"), Column("auc", "AUC", "number")]
ROWS = [
    {"rank": 1, "text": "a lovely film", "score": -2.0, "self": 4.0, "auc": 0.75},
    {"rank": 2, "text": EVIL, "score": 0.5, "self": 1.0, "auc": None},
    {"rank": 3, "text": "word " * 100, "score": 1.0, "self": 0.0, "auc": float("nan")},
    {"rank": 4, "text": "missing score"},
]
SETTINGS = {"model": "tiny", "lr": 3e-4, "methods": ["hyperinf", "exact"], "adapter": None, "note": EVIL}
HEAT = [("train line 4", ["a", " dull", " <b>film</b>"], [0.25, -1.0, 0.0]), ("query 1", ["ok"], [2.0])]


@pytest.fixture
def page(tmp_path):
    png = tiny_png(tmp_path / "plot.png")
    sections = [Table("Ranked examples", COLUMNS, ROWS, note="positive = harmful"),
                Plot("Detection curve", png),
                TokenHeatmap("Per-token shares", HEAT),
                Text("About " + EVIL, "first paragraph\n\nsecond " + EVIL),
                Group("Query (line 3)", [Text("Query", "a dull film"), Table("Top", COLUMNS[:3], ROWS[:2])])]
    path = write_html_report(tmp_path / "report.html", title="Audit <of> my data", summary=["300 examples", EVIL],
                             settings=SETTINGS, sections=sections)
    assert path == tmp_path / "report.html" and sorted(p.name for p in tmp_path.iterdir()) == ["plot.png",
                                                                                                "report.html"]
    return path.read_text(encoding="utf-8")


def test_one_document_title_summary_and_settings(page):
    doc = parse(page)
    assert [n.tag for n in doc.children] == ["html"]
    assert len(doc.all("head")) == 1 and len(doc.all("body")) == 1
    assert doc.all("title")[0].content() == "Audit <of> my data" == doc.all("h1")[0].content()
    assert [li.content() for li in doc.all("ul", "summary")[0].all("li")] == ["300 examples", EVIL]
    pairs = {d.all("dt")[0].content(): d.all("dd")[0].content() for d in doc.all("dl", "settings")[0].all("div")}
    assert pairs == {"model": "tiny", "lr": "0.0003", "methods": '["hyperinf", "exact"]', "adapter": "—",
                     "note": EVIL}
    titles = list(sections_by_title(doc))
    assert titles == ["Settings", "Ranked examples", "Detection curve", "Per-token shares", "About " + EVIL,
                      "Query (line 3)"]
    # the contents line links every section by its id
    assert [a.attrs["href"] for a in doc.all("nav")[0].all("a")] == ["#settings", *(f"#s{i}" for i in range(1, 6))]
    assert [s.attrs["id"] for s in doc.all("section")] == ["settings", *(f"s{i}" for i in range(1, 6))]
    group = sections_by_title(doc)["Query (line 3)"]
    assert [h.content() for h in group.all("h3")] == ["Query", "Top"] and len(group.all("table")) == 1


def test_tables_headers_rows_and_sorting_keys(page):
    table = sections_by_title(parse(page))["Ranked examples"].all("table")[0]
    heads = table.all("thead")[0].all("th")
    assert [h.content() for h in heads] == [c.title for c in COLUMNS]
    assert [h.attrs["data-kind"] for h in heads] == ["number", "text", "number", "number", "number"]
    rows = table.all("tbody")[0].all("tr")
    assert len(rows) == len(ROWS) and all(len(r.all("td")) == len(COLUMNS) for r in rows)
    assert "sortable" in table.attrs["class"]
    # numbers sort by data-v (the exact value); missing, None and NaN are empty (sorted last by the script)
    auc = [r.all("td")[4] for r in rows]
    assert [c.attrs["data-v"] for c in auc] == ["0.75", "", "", ""]
    assert [float(r.all("td")[2].attrs["data-v"]) for r in rows[:3]] == [-2.0, 0.5, 1.0]
    assert rows[3].all("td")[2].attrs["data-v"] == ""
    # a long text folds into an expandable cell with the full text inside
    long_cell = rows[2].all("td")[1]
    assert len(long_cell.all("details")) == 1 and long_cell.all("details")[0].content().endswith(ROWS[2]["text"])
    assert len(long_cell.all("span", "short")[0].content()) <= LONG_TEXT + 1
    assert not rows[0].all("td")[1].all("details")


def test_score_bars_signed_and_scaled(page):
    table = sections_by_title(parse(page))["Ranked examples"].all("table")[0]
    rows = table.all("tbody")[0].all("tr")
    for col, values in ((2, [-2.0, 0.5, 1.0, None]), (3, [4.0, 1.0, 0.0, None])):
        scale = max(abs(v) for v in values if v is not None)
        for row, v in zip(rows, values):
            bars = row.all("td")[col].all("span", "bar")
            if v is None:
                assert not bars
                continue
            (bar,) = bars
            width = float(re.fullmatch(r"width:([0-9.]+)%", bar.attrs["style"]).group(1))
            assert 0.0 <= width <= 100.0 and width == pytest.approx(100 * abs(v) / scale, abs=0.06)
            assert ("neg" if v < 0 else "pos") in bar.attrs["class"].split()
    # mixed signs draw around a centre axis, one sign only from the left edge
    assert table.all("tbody")[0].all("tr")[0].all("td")[2].all("span", "track")[0].attrs["class"] == "track"
    assert "single" in rows[0].all("td")[3].all("span", "track")[0].attrs["class"]


def test_nothing_is_loaded_from_outside_the_file(page):
    doc = parse(page)
    for node in doc.all():
        for name in ("src", "href", "srcset", "action", "data", "poster", "background"):
            if name in node.attrs:
                value = node.attrs[name]
                assert value.startswith("data:image/png;base64,") or value.startswith("#"), (node.tag, value)
        assert node.tag not in ("link", "iframe", "object", "embed", "base")
        assert "url(" not in node.attrs.get("style", "")
    assert [s.attrs for s in doc.all("script")] == [{}]  # one inline script, no src
    style = "".join(s.content() for s in doc.all("style"))
    assert "url(" not in style and "@import" not in style and "http" not in style
    csp = [m.attrs["content"] for m in doc.all("meta") if m.attrs.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0]
    assert "http://" not in page and "https://" not in page


def test_text_from_the_data_is_escaped(page):
    doc = parse(page)
    assert len(doc.all("script")) == 1 and len(doc.all("b")) == 0  # only the page's own script
    assert "<script>alert" not in page
    cell = sections_by_title(doc)["Ranked examples"].all("tbody")[0].all("tr")[1].all("td")[1]
    assert cell.content() == EVIL
    body = sections_by_title(doc)["About " + EVIL]
    assert [p.content() for p in body.all("p")] == ["first paragraph", "second " + EVIL]


def test_token_heatmap(page):
    heat = sections_by_title(parse(page))["Per-token shares"]
    rows = heat.all("div", "heatrow")
    assert len(rows) == len(HEAT)
    for row, (label, tokens, shares) in zip(rows, HEAT):
        spans = row.all("span", "tok")
        assert len(spans) == len(tokens)
        assert [s.content() for s in spans] == tokens
        assert [float(s.attrs["title"]) for s in spans] == pytest.approx(shares)
        assert row.all("div", "heatlabel")[0].content().startswith(label)
        alphas = [float(re.search(r"rgba\(\d+, \d+, \d+, ([0-9.]+)\)", s.attrs["style"]).group(1)) for s in spans]
        assert max(alphas) == pytest.approx(0.85) and all(0 <= a <= 0.85 for a in alphas)
    assert heat.all("span", "gradient"), "the legend"
    with pytest.raises(ValueError, match="2 tokens but 1 shares"):
        render_html(title="t", summary=[], settings={}, sections=[TokenHeatmap("h", [("x", ["a", "b"], [1.0])])])


def test_embedded_png_decodes(page, tmp_path):
    (img,) = sections_by_title(parse(page))["Detection curve"].all("img")
    prefix = "data:image/png;base64,"
    data = base64.b64decode(img.attrs["src"][len(prefix):], validate=True)
    assert data[:8] == PNG_MAGIC and data == (tmp_path / "plot.png").read_bytes()
    (tmp_path / "fake.png").write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match="not a PNG"):
        render_html(title="t", summary=[], settings={}, sections=[Plot("p", tmp_path / "fake.png")])


def test_api_errors_and_atomic_rewrite(tmp_path):
    with pytest.raises(ValueError, match="kind must be one of"):
        Column("x", "x", "bar")
    with pytest.raises(TypeError, match="cannot hold another Group"):
        render_html(title="t", summary=[], settings={}, sections=[Group("a", [Group("b", [])])])
    path = tmp_path / "report.html"
    path.write_text("old")
    write_html_report(path, title="new", summary=[], settings={}, sections=[])
    assert "<title>new</title>" in path.read_text() and [p.name for p in tmp_path.iterdir()] == ["report.html"]
    assert parse(path.read_text()).all("nav") == []  # no contents line without sections


# ------------------------------------------------------------------------------ the commands write it


def run_cli(args: list[str]) -> tuple[int, str, str]:
    from hyperinf_ext.app.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def written_report(out: Path, stdout: str) -> Node:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["outputs"]["html"] == str(out / "report.html") and str(out / "report.html") in stdout
    return parse((out / "report.html").read_text(encoding="utf-8"))


def test_attribute_writes_report_html(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from tiny_llm import make_tiny_llama, sentiment_rows, write_instructions

    folder = make_tiny_llama(tmp_path / "model")
    rows = sentiment_rows(8, seed=1)
    rows[2]["prompt"] = "<script>alert(1)</script> " + rows[2]["prompt"]
    train = write_instructions(tmp_path / "train.jsonl", rows)
    query = write_instructions(tmp_path / "query.jsonl", sentiment_rows(2, seed=2))
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["attribute", "--model", str(folder), "--train", str(train), "--query", str(query),
                                    "--top-k", "8", "--out", str(out), "--no-progress", "--threads", "1"])
    assert code == 0, stderr
    doc = written_report(out, stdout)
    assert len(doc.all("script")) == 1
    records = [json.loads(line) for line in (out / "attribution.jsonl").read_text().splitlines()]
    groups = [s for s in doc.all("section") if s.all("h2")[0].content().startswith("Query (line")]
    assert len(groups) == len(records) == 2
    for group, rec in zip(groups, records):
        assert rec["prompt"] in group.content()
        body = group.all("tbody")[0].all("tr")
        assert len(body) == len(rec["helpful"]) + len(rec["harmful"]) == 16
        assert [float(r.all("td")[3].attrs["data-v"]) for r in body] == pytest.approx(
            [e["score"] for e in rec["helpful"] + rec["harmful"]])
        assert len(group.all("span", "bar")) == 16
    assert rows[2]["prompt"].startswith("<script>") and rows[2]["prompt"] in doc.content()  # shown, as text


TOY = ["--n-train", "16", "--n-val", "8", "--epochs", "0", "--max-length", "24", "--no-progress", "--threads", "1"]


def test_detect_mislabeled_writes_report_html(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("matplotlib")
    code, stdout, stderr = run_cli(["detect-mislabeled", *TOY, "--methods", "exact,tracin", "--damping", "0.01",
                                    "--out", str(tmp_path)])
    assert code == 0, stderr
    doc = written_report(tmp_path, stdout)
    sections = sections_by_title(doc)
    quality = sections["Detection quality"].all("tbody")[0].all("tr")
    assert [r.all("td")[0].content() for r in quality] == ["exact", "tracin", "random"]
    (img,) = doc.all("img")
    assert base64.b64decode(img.attrs["src"].split(",", 1)[1]) == (tmp_path / "detection.png").read_bytes()
    (ranked,) = [s for t, s in sections.items() if t.startswith("Training examples, most suspicious first")]
    rows = ranked.all("tbody")[0].all("tr")
    assert len(rows) == 16
    first = [float(r.all("td")[5].attrs["data-v"]) for r in rows]
    assert first == sorted(first, reverse=True)  # most suspicious first
    flips = sum(r.all("td")[4].content() == "flipped" for r in rows)
    assert flips == json.loads((tmp_path / "summary.json").read_text())["data"]["n_flipped"]


def test_select_data_writes_report_html(tmp_path):
    pytest.importorskip("peft")
    code, stdout, stderr = run_cli(["select-data", *TOY, "--fraction", "0.25", "--rule", "top", "--damping", "0.01",
                                    "--out", str(tmp_path)])
    assert code == 0, stderr
    sections = sections_by_title(written_report(tmp_path, stdout))
    (chosen,) = [s for t, s in sections.items() if t.startswith("Selected: 4 of 16")]
    picked = [int(r.all("td")[1].content()) for r in chosen.all("tbody")[0].all("tr")]
    with open(tmp_path / "selected.csv", encoding="utf-8") as f:
        assert picked == [int(line.split(",", 1)[0]) for line in f.read().splitlines()[1:]]
    pool = sections["Every training example, most helpful first"].all("tbody")[0].all("tr")
    assert len(pool) == 16 and sum(r.all("td")[5].content() == "selected" for r in pool) == 4


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium")
def test_render_script_makes_a_png(page, tmp_path):
    png = tmp_path / "shot.png"
    run = subprocess.run(["bash", str(REPO / "scripts" / "render_report.sh"), str(tmp_path / "report.html"), str(png),
                          "800,600"], capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_cut_rows_says_how_many_there_are_also_when_given_only_the_leading_rows():
    from hyperinf_ext.app.tasks.html_report import cut_rows

    rows = [{"i": i} for i in range(5)]
    assert cut_rows(rows, "examples", "x.csv has every one", 5) == (rows, "")
    assert cut_rows(rows, "examples", "x.csv has every one", 3) == (rows[:3], "The first 3 of 5 examples are shown; "
                                                                               "x.csv has every one.")
    # a caller that built only the shown rows (audit: a generator cut at the limit) passes the total
    assert cut_rows(rows[:3], "examples", "x.csv has every one", 3, total=1000)[1] == (
        "The first 3 of 1000 examples are shown; x.csv has every one.")
    assert cut_rows(rows[:3], "examples", "x.csv has every one", 3, total=3) == (rows[:3], "")
