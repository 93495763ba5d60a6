"""``report.html`` of the experiments ``detect-mislabeled`` and ``select-data`` (built on :mod:`.html_report`).

Each writer takes the task's result object (a ``DetectResult`` / ``SelectResult``, read by attribute so
that this module imports neither task), the lines the command prints first, and the split data; the
scores per training example come from the task.  Tables of every training example show the first
:data:`MAX_ROWS` in the order they are ranked (the CSV beside the report has all of them).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .html_report import MAX_ROWS as HTML_MAX_ROWS
from .html_report import Column, Plot, Section, Table, cut_rows, write_html_report
from .pipeline_data import PreparedData
from .report import damping_text

__all__ = ["MAX_ROWS", "write_detection_html", "write_selection_html"]

MAX_ROWS = HTML_MAX_ROWS  # a module global, so a test can lower it here


def _example(data: PreparedData, i: int) -> dict[str, Any]:
    names = data.label_names
    return {"index": i, "text": data.train.texts[i], "label": names[data.train.labels[i]]}


def write_detection_html(path: str | Path, result: Any, headline: Sequence[str], data: PreparedData,
                         scores: Mapping[str, np.ndarray], plot: str | Path | None) -> None:
    """``report.html`` of detect-mislabeled: the settings, the detection table (ROC-AUC, found@, seconds per
    method), the detection plot, and the training examples ranked by the first method's score, every
    method's score as a bar and the flipped ones marked.

    Args:
        result: the ``DetectResult`` (``config``, ``methods``, ``found_fractions``, ``n_train``).
        headline: the printed report's first lines (sizes, fine-tune, suspicion score, shared costs).
        scores: ``{scores.csv column: score per training example}`` of the runs that succeeded.
        plot: ``detection.png`` (embedded), or None.
    """
    found_keys = [f"{round(f * 100)}%" for f in result.found_fractions]
    columns = [Column("label", "method"), Column("damping", "damping (rule: λ per layer)"),
               Column("auc", "ROC-AUC", "number"), *(Column(k, f"found@{k}", "number") for k in found_keys),
               Column("seconds", "seconds", "number"), Column("note", "note")]
    rows: list[dict[str, Any]] = []
    for m in result.methods:
        note = m.error or (f"= {m.same_as} (same estimator and damping)" if m.same_as else "")
        rows.append({"label": m.label, "damping": damping_text(m), "auc": m.auc, **m.found,
                     "seconds": None if m.error else m.seconds, "note": note})
    rows.append({"label": "random", "auc": 0.5, **{k: f for k, f in zip(found_keys, result.found_fractions)}})
    sections: list[Section] = [Table("Detection quality", columns, rows,
                                     note="found@x = fraction of the flipped labels among the x most suspicious "
                                          "examples; seconds = the method's own work on the cached gradients.")]
    if plot is not None:
        sections.append(Plot("Flipped labels found vs training data inspected", plot))
    if scores:
        first = next(iter(scores))
        order = np.argsort(-np.asarray(scores[first]), kind="stable")
        flipped = data.flipped
        names = data.label_names
        examples = [{**_example(data, int(i)), "original": names[data.original_labels[int(i)]],
                     "flipped": "flipped" if flipped[int(i)] else "",
                     **{col: float(s[int(i)]) for col, s in scores.items()}} for i in order]
        examples, cut = cut_rows(examples, "training examples", "scores.csv has all of them", MAX_ROWS)
        score_cols = [Column(col, col, "score") for col in scores]
        sections.append(Table(
            f"Training examples, most suspicious first (by {first})",
            [Column("index", "index", "int"), Column("text", "text"), Column("label", "label (trained on)"),
             Column("original", "original label"), Column("flipped", "flipped"), *score_cols],
            examples, note=" ".join(filter(None, [
                "Higher = more suspicious. index = position in the training split (as in scores.csv).", cut]))))
    write_html_report(path, title="Mislabeled-data detection", summary=list(headline),
                      settings=result.config.settings(), sections=sections)


def write_selection_html(path: str | Path, result: Any, headline: Sequence[str], data: PreparedData) -> None:
    """``report.html`` of select-data: the settings, the selected examples (in the order of selected.csv),
    every training example ranked by score (most helpful first) with the selected ones marked, and the
    evaluation against a random subset when it ran.

    Args:
        result: the ``SelectResult`` (``config``, ``selected``, ``scores``, ``evaluation``, ``n_train``).
        headline: the printed report's first lines.
    """
    scores = np.asarray(result.scores, dtype=float)
    noisy = bool(result.n_flipped)
    flip_col = [Column("flipped", "flipped")] if noisy else []

    def row(i: int) -> dict[str, Any]:
        return {**_example(data, i), "score": float(scores[i]), "flipped": "flipped" if data.flipped[i] else ""}

    chosen = set(result.selected)
    selected_rows = [{"position": p + 1, **row(i)} for p, i in enumerate(result.selected)]
    selected_rows, cut_sel = cut_rows(selected_rows, "selected examples", "selected.csv has all of them",
                                      MAX_ROWS)
    base = [Column("index", "index", "int"), Column("text", "text"), Column("label", "label"),
            Column("score", "score", "score")]
    sections: list[Section] = [Table(
        f"Selected: {len(result.selected)} of {result.n_train} (rule {result.config.rule})",
        [Column("position", "#", "int"), *base, *flip_col], selected_rows,
        note=" ".join(filter(None, ["In the order of selected.csv. Negative score = up-weighting the example "
                                    "lowers the validation loss (helpful).", cut_sel])))]
    order = np.argsort(scores, kind="stable")
    pool = [{"rank": r + 1, **row(int(i)), "selected": "selected" if int(i) in chosen else ""}
            for r, i in enumerate(order)]
    pool, cut_pool = cut_rows(pool, "training examples", "selected.csv has every selected one", MAX_ROWS)
    sections.append(Table("Every training example, most helpful first",
                          [Column("rank", "rank", "int"), *base, Column("selected", "selected"), *flip_col], pool,
                          note=cut_pool))
    ev = result.evaluation
    if ev:
        eval_cols = [Column("set", "training set"), Column("n", "examples", "int"),
                     Column("acc", "validation accuracy", "number"), Column("loss", "validation loss", "number"),
                     Column("seconds", "seconds", "number")]
        eval_rows = [{"set": label, "n": ev["n_examples"], "acc": ev[key]["val_accuracy"],
                      "loss": ev[key]["val_loss"], "seconds": ev[key]["seconds"]}
                     for label, key in (("selected (influence)", "selected"), ("random subset", "random"))]
        if "full_train_val_accuracy" in ev:
            eval_rows.append({"set": "main model (full set)", "n": result.n_train, "acc": ev["full_train_val_accuracy"]})
        sections.append(Table("Evaluation: fresh LoRA on the selection vs a random subset", eval_cols, eval_rows,
                              note=f"{ev['epochs']} epoch(s), seed {result.config.seed}, same recipe for both."))
    write_html_report(path, title="Data selection", summary=list(headline), settings=result.config.settings(),
                      sections=sections)
