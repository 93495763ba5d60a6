"""Everything the tasks write or print: text tables, CSV and JSON files, figures.

The task modules compute; this module only presents.  It imports no task module at run time (they
import it), so results are read by attribute.  Figures are drawn on a bare
:class:`matplotlib.figure.Figure` with an Agg canvas instead of ``pyplot``: pyplot keeps global
figure state and would switch the process-wide backend of a caller that uses it.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Literal, Mapping, Sequence

import numpy as np

from ..methods import damping_label

if TYPE_CHECKING:  # the task modules import this one
    from .mislabeled import DetectResult
    from .pipeline import PreparedData
    from .selection import SelectResult

__all__ = [
    "json_ready",
    "write_json",
    "write_csv",
    "write_detection_scores",
    "write_selection",
    "write_convergence_csv",
    "column_table",
    "detection_table",
    "selection_table",
    "convergence_table",
    "plot_detection_curves",
    "plot_convergence",
]


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


def write_detection_scores(path: str | Path, data: PreparedData, scores: Mapping[str, np.ndarray]) -> None:
    """``scores.csv`` of detect-mislabeled: one row per training example, one score column per run."""
    names = data.label_names
    cols = list(scores.values())
    train = data.train
    write_csv(path, ["index", "text", "label", "original_label", "flipped", *scores], (
        [i, text, names[train.labels[i]], names[data.original_labels[i]], int(data.flipped[i]),
         *(f"{c[i]:.10g}" for c in cols)]
        for i, text in enumerate(train.texts)
    ))


def write_selection(
    path: str | Path, data: PreparedData, selected: Sequence[int], scores: np.ndarray, *, with_flipped: bool
) -> None:
    """``selected.csv`` of select-data, most helpful first; ``with_flipped`` adds the ``flipped`` column."""
    names = data.label_names
    noisy = with_flipped
    write_csv(path, ["index", "text", "label", "score", *(["flipped"] if noisy else [])], (
        [i, data.train.texts[i], names[data.train.labels[i]], f"{scores[i]:.10g}",
         *([int(data.flipped[i])] if noisy else [])]
        for i in selected
    ))


def write_convergence_csv(path: str | Path, curves: Mapping[int, Mapping[int, Mapping[str, Sequence[float]]]]) -> None:
    """``convergence.csv``: one row per (d, N, solver, iteration); errors as ``repr`` (round-trips exactly)."""
    write_csv(path, ["d", "N", "solver", "iteration", "error"], (
        [d, n, solver, t, repr(float(e))]
        for d, by_n in curves.items()
        for n, by_solver in by_n.items()
        for solver, errs in by_solver.items()
        for t, e in enumerate(errs, start=1)
    ))


# ------------------------------------------------------------------------------ text tables


def column_table(header: Sequence[str], rows: Sequence[Sequence[Any]], left: Sequence[int] = (0,)) -> list[str]:
    """Fixed-width lines: the ``left`` columns (default: the first) left-aligned, the others right-aligned
    (numbers), dashes under the header."""
    table = [list(map(str, header)), *(list(map(str, r)) for r in rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return [line(table[0]), line(["-" * w for w in widths]), *(line(r) for r in table[1:])]


_SIGNAL_TEXT = {
    "validation": "influence on the mean validation loss",
    "self": "self-influence g·H⁻¹·g (no validation set used)",
    "both": "influence on the mean validation loss, and self-influence g·H⁻¹·g (rows marked · self)",
}


def _accuracy_name(cfg: Any) -> str:
    from .family import is_causal

    return "answer exact-match accuracy" if is_causal(cfg) else "accuracy"


def detection_table(result: DetectResult) -> str:
    """Plain-text report of detect-mislabeled: one row per method/damping, then the shared costs."""
    fractions = result.found_fractions
    found_keys = [f"{round(f * 100)}%" for f in fractions]
    rows = []
    for m in result.methods:
        if m.error:
            rows.append([m.label, _damping_text(m), "failed", *([""] * len(found_keys)), m.error, ""])
        else:
            note = f"= {m.same_as} (same estimator and damping)" if m.same_as else ""
            rows.append([m.label, _damping_text(m), f"{m.auc:.4f}", *(f"{m.found[k]:.3f}" for k in found_keys),
                         f"{m.seconds:.2f}", note])
    rows.append(["random", "", "0.5000", *(f"{f:.3f}" for f in fractions), "", ""])
    lines = [
        f"Mislabeled-data detection: {result.n_flipped} of {result.n_train} training labels flipped "
        f"({result.source}), {result.n_val} validation examples",
        f"fine-tune: {result.config.resolved_epochs} epoch(s) in {result.finetune_seconds:.1f} s, "
        f"validation {_accuracy_name(result.config)} {result.val_accuracy:.4f}",
        f"suspicion score: {_SIGNAL_TEXT[getattr(result.config, 'signal', 'validation')]}",
        f"influence fit (shared by all methods): {result.fit_seconds:.1f} s "
        f"(per-example gradients {result.fit_timings.get('gradients', 0.0):.1f} s); "
        f"validation gradient (shared): {result.query_seconds:.1f} s, warm-up pass {result.warmup_seconds:.1f} s",
        "",
        *_strip_right(column_table(["method", "damping (rule: λ per layer)", "ROC-AUC",
                                    *(f"found@{k}" for k in found_keys), "seconds", "note"], rows,
                                   left=(0, 1, len(found_keys) + 4))),
        "",
        "seconds = the method's own work (prepare + scoring against the cached training gradients); "
        "each method at the damping shown (damping=auto: its own default)",
        f"outputs: {result.paths['plot']}, {result.paths['scores']}, {result.paths['summary']}",
    ]
    return "\n".join(lines)


def _damping_text(m: Any) -> str:
    """"spectral × 3: 1.2e-04…3.4e-03" (the rule, then the smallest and largest per-layer λ)."""
    if m.damping_values is None:
        return m.damping_rule if m.damping_rule != "-" else "none"
    lo, hi = m.damping_values
    values = f"{lo:.2g}" if lo == hi else f"{lo:.2g}…{hi:.2g}"
    return f"{m.damping_rule}: {values}" if m.damping_rule != values else values


def _strip_right(lines: list[str]) -> list[str]:
    return [line.rstrip() for line in lines]


def selection_table(result: SelectResult) -> str:
    """Plain-text report of select-data (with the evaluation against a random subset when it ran)."""
    cfg = result.config
    lines = [
        f"Data selection with {cfg.method} (damping {damping_label(cfg.damping)}), rule {cfg.rule}: kept "
        f"{len(result.selected)} of {result.n_train} training examples ({result.source})",
        f"fine-tune: {cfg.resolved_epochs} epoch(s) in {result.finetune_seconds:.1f} s, "
        f"validation {_accuracy_name(cfg)} {result.val_accuracy:.4f}",
        f"influence: fit {result.fit_seconds:.1f} s, validation gradient {result.query_seconds:.1f} s, "
        f"{cfg.method} {result.method_seconds:.2f} s",
    ]
    if result.n_flipped:
        lines.append(f"flipped labels among the selected: {result.n_flipped_selected} of {len(result.selected)} "
                     f"(overall {result.n_flipped} of {result.n_train})")
    if result.evaluation:
        ev = result.evaluation
        rows = [("selected (influence)", ev["n_examples"], f"{ev['selected']['val_accuracy']:.4f}",
                 f"{ev['selected']['val_loss']:.4f}"),
                ("random subset", ev["n_examples"], f"{ev['random']['val_accuracy']:.4f}",
                 f"{ev['random']['val_loss']:.4f}"),
                ("main model (full set)", result.n_train, f"{ev['full_train_val_accuracy']:.4f}", "")]
        lines += ["", f"evaluation: fresh LoRA, {ev['epochs']} epoch(s), seed {cfg.seed}; accuracy = "
                      f"{_accuracy_name(cfg)}"]
        lines += column_table(("training set", "examples", "val accuracy", "val loss"), rows)
    lines.append(f"outputs: {result.paths['selected']}, {result.paths['summary']}")
    return "\n".join(lines)


def _error_text(e: float) -> str:
    return f"{e:.2e}" if math.isfinite(e) else str(e)


def convergence_table(rows: Sequence[Mapping[str, Any]], target: float) -> str:
    """Fixed-width table of the convergence study: the error at each checkpoint of ``rows[*]["errors"]``
    (the last one is the final iteration) and the first iteration reaching ``target``."""
    cps = [int(t) for t in rows[0]["errors"]] if rows else []
    heads = [f"t={t}" for t in cps[:-1]] + [f"t={t} (final)" for t in cps[-1:]]
    reach = f"first t <= {target:g}"
    wsolver = max([len("solver")] + [len(r["solver"]) for r in rows])
    wcols = [max(len(h), 9) for h in heads]
    header = f"{'d':>6} {'N':>7}  {'solver':<{wsolver}}  " + "  ".join(f"{h:>{w}}" for h, w in zip(heads, wcols))
    header += f"  {reach:>{len(reach)}}"
    lines = [header, "-" * len(header)]
    prev = None
    for r in rows:
        if prev is not None and (r["d"], r["N"]) != prev:
            lines.append("")
        prev = (r["d"], r["N"])
        errs = [_error_text(r["errors"][str(t)]) for t in cps]
        first = r["first_iteration_below_target"]
        cells = "  ".join(f"{e:>{w}}" for e, w in zip(errs, wcols))
        lines.append(
            f"{r['d']:>6} {r['N']:>7}  {r['solver']:<{wsolver}}  {cells}  "
            f"{('—' if first is None else str(first)):>{len(reach)}}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------ figures


def _figure(width: float, height: float, dpi: int) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def plot_detection_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    title: str = "Mislabeled data detection",
    random_baseline: bool = True,
) -> Path:
    """Line plot of fraction of flipped labels found vs fraction of training data inspected.

    Args:
        curves: ``{label: (fraction_inspected, fraction_found)}``, one line each (e.g. the output of
            :func:`hyperinf_ext.tasks.metrics.detection_curve` per method).
        path: output image (format from the suffix, e.g. ``.png``); parent folders are created.
        random_baseline: also draw the diagonal of inspecting in random order.

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = _figure(5.5, 4.5, 120)
    ax = fig.add_subplot(1, 1, 1)
    # methods that agree (e.g. hyperinf and exact) draw identical curves: distinct dash patterns keep
    # every line visible where they overlap
    styles = ["-", "--", "-.", ":", (0, (5, 1, 1, 1))]
    for i, (label, (x, y)) in enumerate(curves.items()):
        ax.plot(x, y, label=label, linewidth=1.6, linestyle=styles[i % len(styles)])
    if random_baseline:
        ax.plot([0, 1], [0, 1], linestyle=(0, (1, 2)), color="black", linewidth=1.0, label="random")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("fraction of training data inspected")
    ax.set_ylabel("fraction of flipped labels found")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_convergence(
    path: str | Path,
    curves: Mapping[int, Mapping[int, Mapping[str, Sequence[float]]]],
    problems: Mapping[tuple[int, int], Mapping[str, float]],
    iterations: int,
    *,
    target: float,
    clip: tuple[float, float],
    styles: Mapping[str, str],
) -> None:
    """One log-scale panel of error per iteration for each (d, N), one line per solver.

    ``problems[(d, N)]`` gives the panel title's ``condition_number`` and ``damping``; errors outside
    ``clip`` (or inf/NaN: a diverged solver) are drawn pinned to its edge and the line is labelled so;
    ``target`` is drawn as a dotted line; ``styles`` maps solver names to line styles.
    """
    sizes = list(curves)
    samples = list(next(iter(curves.values())))
    nr, nc = len(sizes), len(samples)
    fig = _figure(5.2 * nc, 3.9 * nr + 0.6, 110)
    axes = fig.subplots(nr, nc, squeeze=False)
    lo, hi = clip
    ts = np.arange(1, iterations + 1)
    for i, d in enumerate(sizes):
        for j, n in enumerate(samples):
            ax = axes[i][j]
            for solver, errs in curves[d][n].items():
                e = np.asarray(errs, dtype=np.float64)
                bad = ~np.isfinite(e) | (e > hi)
                y = np.clip(np.where(np.isfinite(e), e, hi), lo, hi)
                label = solver + (" (diverged: clipped)" if bad.any() else "")
                ax.semilogy(ts, y, styles.get(solver, "-"), lw=1.6, label=label)
            ax.axhline(target, color="0.6", lw=0.8, ls=":")
            info = problems[(d, n)]
            ax.set_title(f"d={d}, N={n}  (κ(A)={info['condition_number']:.3g}, λ={info['damping']:.2g})", fontsize=9)
            ax.set_ylim(lo, hi * 10)
            ax.set_xlim(1, max(iterations, 2))
            ax.grid(True, which="major", alpha=0.3)
            if i == nr - 1:
                ax.set_xlabel("iteration")
            if j == 0:
                ax.set_ylabel("‖x̂ − A⁻¹v‖ / ‖A⁻¹v‖")
            ax.legend(fontsize=7, loc="lower left")
    # short enough for a single 5-inch column: a long title is clipped at both edges
    fig.suptitle("Inverse-HVP solvers: error per iteration", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
