"""Mislabeled-data detection: flip a fraction of training labels, fine-tune, rank by influence.

Experiment (:func:`run_detect_mislabeled`): the shared pipeline (:func:`.pipeline.fit_and_query`: load
and split the data, flip ``flip_rate`` of the training labels (seeded), fine-tune a LoRA model on the
noisy labels, fit :class:`HyperINF` ONCE with the gradients cached, validation gradients once) → for
every method/damping, ``attr.use(...)`` + ``mean_scores`` (all methods share the cached gradients) →
ROC-AUC and detection curves of "flipped vs clean" with the score as suspicion.

Signals (``signal``): "validation" — the influence on the mean validation loss; a positive score means
up-weighting the example raises the validation loss (``attributor.SIGN_CONVENTION``), so mislabeled
examples should score HIGH; "self" — the self-influence ``g_kᵀH⁻¹g_k`` (``attr.self_scores``), which
needs no clean validation set: examples the model bends most for score HIGH; "both".
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ...errors import ConvergenceError
from ..messages import one_line
from ...curvature.methods import METHODS, Damping, damping_label, parse_dampings, parse_methods, resolve, split_damping
from .experiment_reports import write_detection_html
from .metrics import detection_curve, found_at, roc_auc
from .output import prepare_output_dir, staged_outputs
from .pipeline import (
    Log, PipelineConfig, PreparedData, fit_and_query, log_stage, score_method, self_score_method, write_top_k,
)
from .report import accuracy_name, column_table, damping_text, figure, strip_right, write_csv, write_json

__all__ = ["ALL_METHODS", "SIGNALS", "DetectConfig", "MethodResult", "DetectResult", "run_detect_mislabeled"]

ALL_METHODS: tuple[str, ...] = ("hyperinf", "datainf", "lissa", "tracin", "exact")
"""The methods compared by default (``paper`` is available but not run unless asked for)."""
FOUND_FRACTIONS = (0.1, 0.2)
SIGNALS = ("validation", "self", "both")


@dataclass
class DetectConfig(PipelineConfig):
    """Settings of ``detect-mislabeled``."""

    flip_rate: float = 0.2
    methods: Sequence[str] = ALL_METHODS
    dampings: Sequence[Damping] = ("auto",)
    signal: str = "validation"
    """Suspicion score: "validation" (influence on the validation loss), "self" (self-influence) or "both"."""
    out: Path = Path("hyperinf-out/detect")

    @property
    def signals(self) -> tuple[str, ...]:
        return ("validation", "self") if self.signal == "both" else (self.signal,)

    def validate(self) -> None:
        super().validate()
        if self.signal not in SIGNALS:
            raise ValueError(f"--score-signal must be one of {', '.join(SIGNALS)}, got {self.signal!r}")
        parse_methods(list(self.methods))
        parse_dampings(list(self.dampings))
        if round(self.flip_rate * self.n_train) < 1:
            raise ValueError(
                f"--flip-rate {self.flip_rate} flips no label of {self.n_train} training examples: nothing to detect"
            )
        if round(self.flip_rate * self.n_train) >= self.n_train:
            raise ValueError("--flip-rate flips every training label: there are no clean examples to compare with")


@dataclass
class MethodResult:
    """Detection quality and cost of one method/damping."""

    method: str
    damping: str
    label: str
    column: str
    signal: str = "validation"
    auc: float | None = None
    found: dict[str, float] = field(default_factory=dict)  # "10%" -> fraction of flipped found
    seconds: float = 0.0
    timing: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    damping_rule: str = "-"
    """The resolved rule and factor ("spectral × 3"; "-" for a method without curvature, e.g. tracin)."""
    damping_values: tuple[float, float] | None = None
    """Smallest and largest per-layer λ this run used."""
    same_as: str | None = None
    """Label of a row this one equals mathematically (same estimator, same damping), e.g. exact for hyperinf."""


@dataclass
class DetectResult:
    """Everything ``detect-mislabeled`` measured; ``summary()`` is what summary.json holds."""

    config: DetectConfig
    n_train: int
    n_val: int
    n_flipped: int
    source: str
    finetune_seconds: float
    finetune_history: list[dict]
    val_accuracy: float
    val_loss: float
    fit_seconds: float
    fit_timings: dict[str, float]
    query_seconds: float
    warmup_seconds: float
    methods: list[MethodResult]
    paths: dict[str, str]
    total_seconds: float = 0.0

    @property
    def found_fractions(self) -> tuple[float, ...]:
        """Fractions of the training set inspected at which ``MethodResult.found`` is measured."""
        return FOUND_FRACTIONS

    def summary(self) -> dict[str, Any]:
        return {
            "task": "detect-mislabeled",
            "settings": self.config.settings(),
            "data": {"source": self.source, "n_train": self.n_train, "n_val": self.n_val,
                     "n_flipped": self.n_flipped},
            "finetune": {"seconds": self.finetune_seconds, "history": self.finetune_history,
                         "val_accuracy": self.val_accuracy, "val_loss": self.val_loss},
            "influence_fit": {"seconds": self.fit_seconds, "timings": self.fit_timings,
                              "note": "shared by every method: one backward per training example, gradients cached"},
            "query_gradient_seconds": self.query_seconds,
            "warmup_seconds": self.warmup_seconds,
            "methods": [asdict(m) for m in self.methods],
            "outputs": self.paths,
            "total_seconds": self.total_seconds,
        }


def run_detect_mislabeled(cfg: DetectConfig, log: Log = None) -> DetectResult:
    """Run the mislabeled-data detection experiment and write its outputs into ``cfg.out``.

    Outputs: ``detection.png`` (fraction of flipped found vs fraction inspected, per method, with the
    random diagonal), ``scores.csv`` (one row per training example), ``summary.json`` and ``report.html``.

    Raises:
        DataError / ValueError: bad settings or inputs (one-line messages).
    """
    t_start = time.perf_counter()
    cfg.validate()
    methods = parse_methods(list(cfg.methods))
    dampings = parse_dampings(list(cfg.dampings))
    out = prepare_output_dir(cfg.out)  # fail on an unusable folder before minutes of work

    run = fit_and_query(cfg, log, queries="validation" in cfg.signals)
    data, trained, attr, queries = run.data, run.trained, run.attr, run.queries
    n_flipped = int(data.flipped.sum())
    # The first pass over the cached gradients pays one-off costs (fresh float64 buffers, page
    # faults) that would otherwise be billed to whichever method is scored first: a separate
    # tracin pass takes them (in a default run the first pass was ~6x a later one).
    try:
        t0 = time.perf_counter()
        attr.use("tracin")
        attr.mean_scores(queries) if queries is not None else attr.self_scores()
        warmup_seconds = time.perf_counter() - t0
        results, scores, curves = _score_all(attr, queries, methods, dampings, data.flipped, log, cfg.signals)
    finally:
        run.release()  # the cached gradients are the run's largest allocation

    paths = {
        "plot": str(out / "detection.png"),
        "scores": str(out / "scores.csv"),
        "summary": str(out / "summary.json"),
        "html": str(out / "report.html"),
    }
    with staged_outputs(out) as stage:
        plot_detection_curves(
            curves, stage / "detection.png",
            title=f"Mislabeled detection ({n_flipped}/{len(data.train)} flipped)",
        )
        write_detection_scores(stage / "scores.csv", data, scores)
        write_top_k(run, stage)
        result = DetectResult(
            config=cfg, n_train=len(data.train), n_val=len(data.val), n_flipped=n_flipped, source=data.source,
            finetune_seconds=trained.seconds, finetune_history=trained.history,
            val_accuracy=trained.val["accuracy"], val_loss=trained.val["loss"],
            fit_seconds=run.fit_seconds, fit_timings=run.fit_timings, query_seconds=run.query_seconds,
            warmup_seconds=warmup_seconds, methods=results, paths=paths,
        )
        result.total_seconds = time.perf_counter() - t_start
        write_json(stage / "summary.json", result.summary())
        write_detection_html(stage / "report.html", result, detection_table(result).split("\n\n")[0].splitlines(),
                             data, scores, stage / "detection.png")
    return result


def _score_all(
    attr: Any, queries: Any, methods: list[str], dampings: list[Damping], flipped: np.ndarray, log: Log,
    signals: Sequence[str] = ("validation",),
) -> tuple[list[MethodResult], dict[str, np.ndarray], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Score every method/damping run under every signal; returns (results, scores by CSV column,
    detection curves by label).  Validation scores go to ``score_<run>`` columns, self-influence to
    ``self_<run>`` (labels gain " · self" when both signals are shown).

    A run whose solver fails (or gives non-finite scores) is reported as failed; the others go on.
    """
    results: list[MethodResult] = []
    scores: dict[str, np.ndarray] = {}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for (method, damping), signal in ((r, sig) for r in _runs(methods, dampings) for sig in signals):
        curved = _has_curvature(method)
        dl = damping_label(damping) if curved else "-"
        label = method if len(dampings) == 1 or not curved else f"{method} (λ={dl})"
        column = method if len(dampings) == 1 or not curved else f"{method}@{dl}"
        if signal == "self":
            label += " · self" if len(signals) > 1 else ""
            column = f"self_{column}"
        else:
            column = f"score_{column}"
        log_stage(log, f"scoring: {label}" + (" (self-influence)" if signal == "self" else ""))
        res = MethodResult(method, dl, label, column, signal)
        if curved:  # a method without curvature has no damping
            rule, scale = resolve(method, *split_damping(damping))
            res.damping_rule = f"{damping_label(rule)} × {scale:g}" if isinstance(rule, str) else damping_label(rule)
        results.append(res)
        try:
            if signal == "self":
                s, timing = self_score_method(attr, method, damping)
            else:
                s, timing = score_method(attr, queries, method, damping)
            if not np.isfinite(s).all():
                raise ConvergenceError(f"{label}: scores are not finite (damping too small?)")
        except ConvergenceError as exc:
            res.error = one_line(exc)
            continue
        res.timing, res.seconds = timing, timing["seconds"]
        if curved:  # the per-layer λ the method just used
            lams = [float(f.damping) for f in attr.factors.values()]
            res.damping_values = (min(lams), max(lams))
        res.auc = roc_auc(s, flipped)
        res.found = {f"{round(f * 100)}%": found_at(s, flipped, f) for f in FOUND_FRACTIONS}
        scores[res.column] = s
        curves[label] = detection_curve(s, flipped)
    _mark_equal(results)
    return results, scores, curves


# Methods that solve the same system (GFIM + λ) by another route (a method's ``reference_for``): at equal
# damping their scores agree to solver tolerance, so a table must not present them as different estimators.
SAME_ESTIMATOR = {cls.reference_for: name for name, cls in METHODS.items() if cls.reference_for}


def _has_curvature(method: str) -> bool:
    return METHODS[method].damping_default is not None


def _mark_equal(results: list[MethodResult]) -> None:
    """Set ``same_as`` on each row whose estimator, signal and resolved damping equal another row's."""
    for r in results:
        twin = SAME_ESTIMATOR.get(r.method)
        for o in results:
            if (twin and o.method == twin and o.signal == r.signal and not r.error and not o.error
                    and (o.damping_rule, o.damping_values) == (r.damping_rule, r.damping_values)):
                r.same_as = o.label


def _runs(methods: list[str], dampings: list[Damping]) -> list[tuple[str, Damping]]:
    runs = []
    for m in methods:
        # a method without curvature ignores the damping, so one run covers every damping
        for d in dampings if _has_curvature(m) else dampings[:1]:
            runs.append((m, d))
    return runs

# ------------------------------------------------------------------------------ report

_SIGNAL_TEXT = {
    "validation": "influence on the mean validation loss",
    "self": "self-influence g·H⁻¹·g (no validation set used)",
    "both": "influence on the mean validation loss, and self-influence g·H⁻¹·g (rows marked · self)",
}


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


def detection_table(result: DetectResult) -> str:
    """Plain-text report of detect-mislabeled: one row per method/damping, then the shared costs."""
    fractions = result.found_fractions
    found_keys = [f"{round(f * 100)}%" for f in fractions]
    rows = []
    for m in result.methods:
        if m.error:
            rows.append([m.label, damping_text(m), "failed", *([""] * len(found_keys)), m.error, ""])
        else:
            note = f"= {m.same_as} (same estimator and damping)" if m.same_as else ""
            rows.append([m.label, damping_text(m), f"{m.auc:.4f}", *(f"{m.found[k]:.3f}" for k in found_keys),
                         f"{m.seconds:.2f}", note])
    rows.append(["random", "", "0.5000", *(f"{f:.3f}" for f in fractions), "", ""])
    lines = [
        f"Mislabeled-data detection: {result.n_flipped} of {result.n_train} training labels flipped "
        f"({result.source}), {result.n_val} validation examples",
        f"fine-tune: {result.config.resolved_epochs} epoch(s) in {result.finetune_seconds:.1f} s, "
        f"validation {accuracy_name(result.config)} {result.val_accuracy:.4f}",
        f"suspicion score: {_SIGNAL_TEXT[getattr(result.config, 'signal', 'validation')]}",
        f"influence fit (shared by all methods): {result.fit_seconds:.1f} s "
        f"(per-example gradients {result.fit_timings.get('gradients', 0.0):.1f} s); "
        f"validation gradient (shared): {result.query_seconds:.1f} s, warm-up pass {result.warmup_seconds:.1f} s",
        "",
        *strip_right(column_table(["method", "damping (rule: λ per layer)", "ROC-AUC",
                                    *(f"found@{k}" for k in found_keys), "seconds", "note"], rows,
                                   left=(0, 1, len(found_keys) + 4))),
        "",
        "seconds = the method's own work (prepare + scoring against the cached training gradients); "
        "each method at the damping shown (damping=auto: its own default)",
        f"outputs: {', '.join(result.paths.values())}",
    ]
    return "\n".join(lines)


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
            :func:`hyperinf_ext.app.tasks.metrics.detection_curve` per method).
        path: output image (format from the suffix, e.g. ``.png``); parent folders are created.
        random_baseline: also draw the diagonal of inspecting in random order.

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = figure(5.5, 4.5, 120)
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
