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
from typing import Any, Sequence

import numpy as np

from ..errors import ConvergenceError
from ..messages import one_line
from ..damping import resolve
from ..methods import Damping, damping_label, parse_dampings, parse_methods, split_damping
from .metrics import detection_curve, found_at, roc_auc
from .output import prepare_output_dir
from .pipeline import Log, PipelineConfig, fit_and_query, log_stage, score_method, self_score_method
from .report import plot_detection_curves, write_detection_scores, write_json

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
            raise ValueError(f"--signal must be one of {', '.join(SIGNALS)}, got {self.signal!r}")
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
    """The resolved rule and factor ("spectral × 3"; "-" for tracin, which has no curvature)."""
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
    random diagonal), ``scores.csv`` (one row per training example) and ``summary.json``.

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
    }
    plot_detection_curves(
        curves, paths["plot"],
        title=f"Mislabeled detection ({n_flipped}/{len(data.train)} flipped)",
    )
    write_detection_scores(paths["scores"], data, scores)
    result = DetectResult(
        config=cfg, n_train=len(data.train), n_val=len(data.val), n_flipped=n_flipped, source=data.source,
        finetune_seconds=trained.seconds, finetune_history=trained.history,
        val_accuracy=trained.val["accuracy"], val_loss=trained.val["loss"],
        fit_seconds=run.fit_seconds, fit_timings=run.fit_timings, query_seconds=run.query_seconds,
        warmup_seconds=warmup_seconds, methods=results, paths=paths,
    )
    result.total_seconds = time.perf_counter() - t_start
    write_json(paths["summary"], result.summary())
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
        dl = damping_label(damping) if method != "tracin" else "-"
        label = method if len(dampings) == 1 or method == "tracin" else f"{method} (λ={dl})"
        column = method if len(dampings) == 1 or method == "tracin" else f"{method}@{dl}"
        if signal == "self":
            label += " · self" if len(signals) > 1 else ""
            column = f"self_{column}"
        else:
            column = f"score_{column}"
        log_stage(log, f"scoring: {label}" + (" (self-influence)" if signal == "self" else ""))
        res = MethodResult(method, dl, label, column, signal)
        if method != "tracin":  # tracin has no curvature, hence no damping
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
        if method != "tracin":  # the per-layer λ the method just used
            lams = [float(f.damping) for f in attr.factors.values()]
            res.damping_values = (min(lams), max(lams))
        res.auc = roc_auc(s, flipped)
        res.found = {f"{round(f * 100)}%": found_at(s, flipped, f) for f in FOUND_FRACTIONS}
        scores[res.column] = s
        curves[label] = detection_curve(s, flipped)
    _mark_equal(results)
    return results, scores, curves


# Methods that solve the same system (GFIM + λ) by another route: at equal damping their scores agree to
# solver tolerance, so a table must not present them as different estimators.
SAME_ESTIMATOR = {"hyperinf": "exact"}


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
        # tracin ignores the curvature, so one run covers every damping
        for d in dampings[:1] if m == "tracin" else dampings:
            runs.append((m, d))
    return runs
