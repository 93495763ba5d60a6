"""The readable reports of ``attribute`` (``report.md`` and ``report.html``): per query, its top helpful and
harmful training examples."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .html_report import Column, Group, Table, Text, write_html_report
from .per_token import shares_note, token_heatmap
from .pipeline_config import column_headings

__all__ = ["write_html", "write_markdown"]

SNIPPET = 160  # characters of a text shown in a table cell; the JSONL has the full texts


def _cell(text: Any) -> str:
    """One table cell: a single line, pipes escaped, long texts shortened with an ellipsis."""
    s = " ".join(str(text).split()).replace("|", "\\|")
    return s if len(s) <= SNIPPET else s[: SNIPPET - 1] + "…"


def _keys(rec: dict[str, Any], settings: dict[str, Any]) -> tuple[tuple[str, str], tuple[str, str]]:
    """(the record's keys of an example's two texts, their headings: the user's column names)."""
    causal = "prompt" in rec
    return ("prompt", "response") if causal else ("text", "label"), column_headings(settings, causal)


def write_markdown(path: str | Path, summary: dict[str, Any], records: Sequence[dict[str, Any]]) -> None:
    """Write ``report.md``: the settings in one paragraph, then one section per query with two tables."""
    lines = [
        "# Training-data attribution",
        "",
        f"{summary['n_query']} queries, {summary['n_train']} training examples, method **{summary['method']}** "
        f"(damping {summary['damping']}), top {summary['top_k']}.  Examples are named by their line in their "
        "file (CSV: the header is line 1).",
        "",
        *[f"Note: {note}" for note in summary.get("notes", [])],
        *([""] if summary.get("notes") else []),
        "Score = change of the query's loss when the training example is up-weighted: **helpful** examples "
        "(negative scores) lowered it — the model answers this way because of them; **harmful** ones "
        "(positive scores) pushed against the answer (e.g. mislabeled or contradicting examples). The harmful "
        "list holds each query's highest scores, which may still be negative when no example raised its loss.",
        "",
    ]
    for rec in records:
        (text_key, answer_key), (text_name, answer_name) = _keys(rec, summary["settings"])
        lines += [f"## Query (line {rec['query_line']})", "", f"> {_cell(rec[text_key])}", ">",
                  f"> **{answer_name}:** {_cell(rec[answer_key])}", ""]
        for name in ("helpful", "harmful"):
            lines += [f"**Most {name}**", "", f"| rank | train line | score | {text_name} | {answer_name} |",
                      "|---:|---:|---:|---|---|"]
            lines += [f"| {e['rank']} | {e['train_line']} | {e['score']:.4g} | {_cell(e[text_key])} | "
                      f"{_cell(e[answer_key])} |" for e in rec[name]]
            lines.append("")
    Path(path).write_text("\n".join(lines), encoding="utf-8")


def _g(value: Any) -> str:
    return "—" if value is None else f"{value:.4g}"


def write_html(path: str | Path, summary: dict[str, Any], records: Sequence[dict[str, Any]], *,
               tokens: Sequence[dict[str, Any]] | None = None) -> None:
    """Write ``report.html``: the settings, timings, then per query its text and one sortable table of its
    most helpful and most harmful training examples, scores drawn as bars; with ``tokens`` (the records of
    ``per_token.attribute_token_records``) also per query a heatmap of every kept pair's token shares."""
    t, ft = summary["timings"], summary.get("finetune")
    if ft is not None:
        timing = (f"Fine-tune: {ft['epochs']} epoch(s) in {ft['seconds']:.1f} s; query loss "
                  f"{_g(ft.get('query_loss'))}. Influence fit {t['fit_seconds']:.1f} s, scoring {t['score_seconds']:.1f} s.")
    else:  # answered by a gradient index: no fine-tune or fit in this run
        timing = (f"Answered by the index {summary.get('index')} ({summary.get('scores')}): opened in "
                  f"{t['open_seconds']:.1f} s, queried in {t['query_seconds']:.1f} s.")
    lines = [
        f"{summary['n_query']} queries, {summary['n_train']} training examples; method {summary['method']} "
        f"(damping {summary['damping']}), top {summary['top_k']} helpful and harmful per query.",
        *[f"Note: {note}" for note in summary.get("notes", [])],
        timing,
        "Score = change of the query's loss when the training example is up-weighted: negative (blue) = "
        "helpful, it lowered the loss; positive (red) = harmful, it pushed against the answer. Examples are "
        "named by their line in their file.",
    ]
    sections: list[Any] = []
    for rec in records:
        (text_key, answer_key), (text_name, answer_name) = _keys(rec, summary["settings"])
        line = rec["query_line"]
        columns = [Column("side", "side"), Column("rank", "rank", "int"), Column("train_line", "train line", "int"),
                   Column("score", "score", "score"), Column(text_key, text_name), Column(answer_key, answer_name)]
        rows = [{"side": name, **e} for name in ("helpful", "harmful") for e in rec[name]]
        parts: list[Any] = [Text("Query", f"{text_name}: {rec[text_key]}\n\n{answer_name}: {rec[answer_key]}"),
                            Table("Most helpful and most harmful training examples", columns, rows)]
        if tokens is not None:
            mine = [t for t in tokens if t["query_line"] == line]
            items = [(f"{t['side']}: train line {t['train_line']}, score {t['score']:.4g} — {who} tokens",
                      t[who]) for t in mine for who in ("train", "query")]
            parts.append(token_heatmap("Per-token shares of each pair (training example's tokens, then the "
                                       "query's)", items, note=shares_note(mine)))
        sections.append(Group(f"Query (line {line})", parts))
    write_html_report(path, title="Training-data attribution", summary=lines, settings=summary["settings"],
                      sections=sections)
