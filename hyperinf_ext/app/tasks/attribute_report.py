"""The readable Markdown report of ``attribute``: per query, its top helpful and harmful training examples."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

__all__ = ["write_markdown"]

SNIPPET = 160  # characters of a text shown in a table cell; the JSONL has the full texts


def _cell(text: Any) -> str:
    """One table cell: a single line, pipes escaped, long texts shortened with an ellipsis."""
    s = " ".join(str(text).split()).replace("|", "\\|")
    return s if len(s) <= SNIPPET else s[: SNIPPET - 1] + "…"


def _answer_key(rec: dict[str, Any]) -> tuple[str, str]:
    return ("prompt", "response") if "prompt" in rec else ("text", "label")


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
        text_key, answer_key = _answer_key(rec)
        lines += [f"## Query (line {rec['query_line']})", "", f"> {_cell(rec[text_key])}", ">",
                  f"> **{answer_key}:** {_cell(rec[answer_key])}", ""]
        for name in ("helpful", "harmful"):
            lines += [f"**Most {name}**", "", f"| rank | train line | score | {text_key} | {answer_key} |",
                      "|---:|---:|---:|---|---|"]
            lines += [f"| {e['rank']} | {e['train_line']} | {e['score']:.4g} | {_cell(e[text_key])} | "
                      f"{_cell(e[answer_key])} |" for e in rec[name]]
            lines.append("")
    Path(path).write_text("\n".join(lines), encoding="utf-8")
