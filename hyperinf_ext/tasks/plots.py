"""Figures of the tasks, drawn off-screen (Agg) so they work without a display.

A bare :class:`matplotlib.figure.Figure` with an Agg canvas is used instead of ``pyplot``: pyplot
keeps global figure state and would switch the process-wide backend of a caller that uses it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["plot_detection_curves"]


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
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(5.5, 4.5), dpi=120)
    FigureCanvasAgg(fig)
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
