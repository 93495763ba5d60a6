"""``report.html`` of the user commands ``audit`` and ``select`` (built on :mod:`.html_report`).

``audit``: the settings, the signal and what it means, the training examples in rank order (rank, file line,
texts, the score as a bar) and, with ``--per-token``, a heatmap of each top example's token shares.
``select``: the settings, the rule and the count, every pool example by score (most helpful first) with a
``selected`` flag, and the evaluation against a random subset when ``--evaluate`` ran.  Per-example tables
show the first :data:`MAX_ROWS` rows; the file beside the report (ranked / scores.csv) has all of them.
"""
from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Sequence

from .html_report import MAX_ROWS as HTML_MAX_ROWS
from .html_report import Column, Section, Table, Text, cut_rows, write_html_report
from .per_token import shares_note, token_heatmap
from .pipeline_config import column_headings

__all__ = ["MAX_ROWS", "write_audit_html", "write_select_html"]

MAX_ROWS = HTML_MAX_ROWS  # a module global, so a test can lower it here


def _model_line(summary: dict[str, Any], model: str) -> str:
    index = summary.get("index")
    if index:
        return (f"Scores from the gradient index {index['path']} ({index['scores']}; method {index['method']}), "
                f"opened in {index['open_seconds']:.1f} s.")
    return model


def write_audit_html(path: str | Path, summary: dict[str, Any], rows: Iterable[dict[str, Any]],
                     tokens: Sequence[dict[str, Any]] | None = None) -> None:
    """``report.html`` of audit.

    ``rows``: one dict per training example in rank order with ``rank``, ``line``, ``text``, ``answer``
    (label or response), ``score`` and the other columns of ``summary["columns"]`` (only the first
    :data:`MAX_ROWS` are read: a generator saves building the rest); ``tokens``: the ``tokens.jsonl``
    records of ``--per-token``."""
    signal = summary["signal"]
    text_key, answer_key = column_headings(summary["settings"], summary["causal_lm"])
    ft = summary["finetune"]
    model = (f"Model {summary['settings']['model']}, "
             + (f"adapter {ft['adapter']}" if ft["adapter"] else "a fresh LoRA")
             + (f" fine-tuned {ft['epochs']} epoch(s) on the training file in {ft['seconds']:.1f} s" if ft["epochs"]
                else "") + f"; {ft['eval_on']} loss {ft['loss']:.4f}.")
    lines = [f"{summary['n_train']} training examples of {summary['train']} ranked by {signal} "
             f"({summary['method']}, damping {summary['damping']}); rank 1 = the most suspicious.",
             _model_line(summary, model),
             *[f"Note: {n}" for n in summary.get("notes", [])]]
    if summary.get("target"):
        lines.insert(1, f"Target: {summary['target']} ({summary['n_target']} trusted examples).")
    columns = [Column("rank", "rank", "int"), Column("line", "line", "int"), Column("text", text_key),
               Column("answer", answer_key), Column("score", signal, "score"),
               *[Column(c, c, "score") for c in summary.get("columns", [signal]) if c != signal]]  # combined's parts
    shown, cut = cut_rows(list(islice(rows, MAX_ROWS)), "examples",
                          f"{Path(summary['outputs']['ranked']).name} has every one", MAX_ROWS,
                          total=summary["n_train"])
    sections: list[Section] = [
        # sign_convention repeats signal_meaning: the page says the meaning once
        Text("Signal", f"{signal}: {summary['signal_meaning']}.\n\nRank 1 = the highest score = the most suspicious. "
                       "Lines are file lines (CSV: the header is line 1; a row spanning several lines is named by "
                       "its first)."),
        Table("Training examples, most suspicious first", columns, shown, note=cut),
    ]
    if tokens:
        items = [(f"rank {t['rank']}: line {t['train_line']}, {signal} {t['score']:.4g}", t["train"]) for t in tokens]
        sections.append(token_heatmap(
            f"Per-token shares of the {len(tokens)} most suspicious (against {tokens[0]['against']})", items,
            note=shares_note(tokens)))
    write_html_report(path, title="Training-data audit", summary=lines, settings=summary["settings"],
                      sections=sections)


def write_select_html(path: str | Path, summary: dict[str, Any], rows: Sequence[dict[str, Any]]) -> None:
    """``report.html`` of select.

    ``rows``: one dict per pool example in pool order with ``line``, ``text``, ``answer``, ``score`` and
    ``selected`` (bool); the table shows them most helpful (most negative) first."""
    text_key, answer_key = column_headings(summary["settings"], summary["causal_lm"])
    w = summary["warmup"]
    model = (f"Model {summary['settings']['model']}, "
             + (f"adapter {w['adapter']}" if w["adapter"] else "a fresh LoRA")
             + (f", warmed up {w['epochs']} epoch(s) on {w['n_examples']} random pool examples in "
                f"{w['seconds']:.1f} s" if w["n_examples"] else "") + f"; target loss {w['target_loss']:.4f}.")
    lines = [f"Kept {summary['n_selected']} of {summary['n_pool']} examples of {summary['pool']} for the target "
             f"{summary['target']} ({summary['n_target']} examples), rule {summary['rule']}.",
             f"Scores: {summary['method']} (damping {summary['damping']}); {summary['signal']}.",
             _model_line(summary, model),
             *[f"Note: {n}" for n in summary.get("notes", [])]]
    ordered = sorted(rows, key=lambda r: (r["score"], r["line"]))
    table = [{**r, "selected": "selected" if r["selected"] else ""} for r in ordered]
    shown, cut = cut_rows(table, "pool examples", "scores.csv has every one", MAX_ROWS)
    columns = [Column("line", "line", "int"), Column("text", text_key), Column("answer", answer_key),
               Column("score", "influence_score", "score"), Column("selected", "selected")]
    sections: list[Section] = [
        Text("Rule", f"{summary['rule']}: {summary['rule_reason']}.\n\n{summary['rule_effect']}.\n\n"
                     f"{summary['n_selected']} of "
                     f"{summary['n_pool']} kept; {Path(summary['outputs']['selected']).name} holds them as written, in "
                     "pool order. Lines are file lines (CSV: the header is line 1)."),
        Table("Every pool example, most helpful first", columns, shown,
              note=" ".join(x for x in ("Negative (blue) = up-weighting the example lowers the target loss "
                                        "(helpful); positive (red) = it raises it.", cut) if x)),
    ]
    ev = summary.get("evaluation")
    if ev:
        ev_rows = [{"set": name, "n": ev["n_examples"], "loss": ev[key]["val_loss"],
                    "accuracy": ev[key]["val_accuracy"], "seconds": ev[key]["seconds"]}
                   for name, key in (("selected (influence)", "selected"), ("random subset", "random"))]
        sections.append(Table(
            f"Evaluation: fresh LoRA, {ev['epochs']} epoch(s), on the target",
            [Column("set", "training set"), Column("n", "examples", "int"), Column("loss", "target loss", "number"),
             Column("accuracy", "target accuracy", "number"), Column("seconds", "seconds", "number")], ev_rows))
    write_html_report(path, title="Data selection", summary=lines, settings=summary["settings"], sections=sections)
