"""Data selection: keep the training examples whose up-weighting most LOWERS the validation loss.

Pipeline (:func:`run_select_data`): load/split (optionally flip labels) → fine-tune → fit HyperINF
once → ``mean_scores`` on the validation set with one method → rank from the most negative score
(most helpful, see ``attributor.SIGN_CONVENTION``) → write the top ``fraction`` (or the selection
of another ``rule`` of :mod:`hyperinf_ext.app.tasks.selection_rules`).  With
``evaluate``, a fresh LoRA is fine-tuned on the selection and on a random subset of the same size
(same seed, epochs and hyper-parameters) and both validation accuracies are reported.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..data.dataset import TextDataset
from ...curvature.methods import Damping, damping_label, parse_dampings, parse_methods
from .experiment_reports import write_selection_html
from .selection_rules import DEFAULT_RULE, RULES, select
from .output import prepare_output_dir, staged_outputs
from .pipeline import (
    PreparedData,
    DEFAULT_EPOCHS,
    FittedRun,
    Log,
    PipelineConfig,
    finetune_loader,
    fit_and_query,
    load_model,
    log_stage,
    score_method,
    train_model,
    write_top_k,
)
from .report import accuracy_name, column_table, write_csv, write_json

__all__ = ["SelectConfig", "SelectResult", "run_select_data", "compare_with_random"]


@dataclass
class SelectConfig(PipelineConfig):
    """Settings of ``select-data``."""

    fraction: float = 0.2
    """Fraction of the training set to keep, in (0, 1]."""
    method: str = "hyperinf"
    damping: Damping = "auto"
    rule: str = DEFAULT_RULE
    """Selection rule (``hyperinf_ext.app.tasks.selection_rules.RULES``); the default keeps the most helpful."""
    evaluate: bool = False
    """Also fine-tune fresh LoRA models on the selection and on a random subset of equal size."""
    out: Path = Path("hyperinf-out/select")

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"--fraction must be in (0, 1], got {self.fraction}")
        if self.rule not in RULES:
            raise ValueError(f"--rule: unknown selection rule {self.rule!r}; expected one of {', '.join(RULES)}")
        self.method = parse_methods([self.method], what="method")[0]
        self.damping = parse_dampings([self.damping])[0]

    @property
    def n_selected(self) -> int:
        return max(1, int(round(self.fraction * self.n_train)))

    @property
    def evaluation_epochs(self) -> int:
        # with a pre-trained adapter the main run may fine-tune 0 epochs; a fresh model still needs training
        return self.resolved_epochs if self.resolved_epochs > 0 else DEFAULT_EPOCHS


@dataclass
class SelectResult:
    """Outcome of ``select-data``; ``summary()`` is what summary.json holds."""

    config: SelectConfig
    source: str
    n_train: int
    n_val: int
    n_flipped: int
    selected: list[int]
    scores: np.ndarray
    finetune_seconds: float
    val_accuracy: float
    fit_seconds: float
    query_seconds: float
    method_seconds: float
    n_flipped_selected: int
    evaluation: dict[str, Any] | None = None
    paths: dict[str, str] = field(default_factory=dict)
    total_seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        sel = self.scores[self.selected]
        return {
            "task": "select-data",
            "settings": self.config.settings(),
            "data": {"source": self.source, "n_train": self.n_train, "n_val": self.n_val,
                     "n_flipped": self.n_flipped},
            "selection": {
                "rule": self.config.rule,
                "method": self.config.method,
                "damping": damping_label(self.config.damping),
                "n_selected": len(self.selected),
                "score_range_selected": [float(sel.min()), float(sel.max())],
                "score_mean_all": float(self.scores.mean()),
                "n_flipped_selected": self.n_flipped_selected,
            },
            "finetune": {"seconds": self.finetune_seconds, "val_accuracy": self.val_accuracy},
            "timings": {"fit_seconds": self.fit_seconds, "query_gradient_seconds": self.query_seconds,
                        "method_seconds": self.method_seconds},
            "evaluation": self.evaluation,
            "outputs": self.paths,
            "total_seconds": self.total_seconds,
        }


def run_select_data(cfg: SelectConfig, log: Log = None) -> SelectResult:
    """Rank training examples by helpfulness and write the top ``cfg.fraction`` to ``cfg.out``.

    Outputs: ``selected.csv`` (index, text, label, score — plus flipped when labels were flipped;
    most helpful first; ``index`` is the position in the training split, as in
    ``detect-mislabeled``'s scores.csv), ``summary.json`` and ``report.html``.

    Raises:
        DataError / ValueError: bad settings or inputs (one-line messages).
    """
    t_start = time.perf_counter()
    cfg.validate()
    out = prepare_output_dir(cfg.out)  # fail on an unusable folder before minutes of work
    run = fit_and_query(cfg, log)
    data = run.data
    try:
        log_stage(log, f"scoring: {cfg.method}")
        scores, timing = score_method(run.attr, run.queries, cfg.method, cfg.damping)
        # the LESS rule ranks per validation example: the same method/damping, one row per query
        query_scores = (run.attr.scores(run.queries).detach().cpu().double().numpy()
                        if cfg.rule == "query-round-robin" else None)
    finally:
        run.release()
    if not np.isfinite(scores).all():
        raise ValueError(f"{cfg.method}: scores are not finite (damping {damping_label(cfg.damping)} too small?)")

    # "top": most negative first (up-weighting these lowers the validation loss the most)
    selected = [int(i) for i in select(cfg.rule, cfg.n_selected, scores=scores, query_scores=query_scores,
                                       labels=np.asarray(data.train.labels), seed=cfg.seed)]

    evaluation = None
    if cfg.evaluate:
        evaluation = _evaluate_selection(cfg, run, selected, log)

    paths = {"selected": str(out / "selected.csv"), "summary": str(out / "summary.json"),
             "html": str(out / "report.html")}
    with staged_outputs(out) as stage:
        # with flipped labels, also say which selected labels were flipped
        write_selection(stage / "selected.csv", data, selected, scores, with_flipped=cfg.flip_rate > 0)
        write_top_k(run, stage)
        result = SelectResult(
            config=cfg, source=data.source, n_train=len(data.train), n_val=len(data.val),
            n_flipped=int(data.flipped.sum()), selected=selected, scores=scores,
            finetune_seconds=run.trained.seconds, val_accuracy=run.trained.val["accuracy"],
            fit_seconds=run.fit_seconds, query_seconds=run.query_seconds, method_seconds=timing["seconds"],
            n_flipped_selected=int(data.flipped[selected].sum()), evaluation=evaluation, paths=paths,
        )
        result.total_seconds = time.perf_counter() - t_start
        write_json(stage / "summary.json", result.summary())
        write_selection_html(stage / "report.html", result, _headline(result), data)
    return result


def _evaluate_selection(cfg: SelectConfig, run: FittedRun, selected: list[int], log: Log) -> dict[str, Any]:
    """Validation accuracy of fresh LoRA models trained on the selection vs a random subset."""
    out = compare_with_random(cfg, run.data.train, run.loaders.tokenizer, run.loaders.train_encodings,
                              run.loaders.evaluation, run.data.num_labels, selected, log,
                              epochs=cfg.evaluation_epochs)
    return {**out, "full_train_val_accuracy": run.trained.val["accuracy"]}


def compare_with_random(cfg: PipelineConfig, train: TextDataset, tokenizer: Any, encodings: Sequence[dict],
                        eval_loader: Any, num_labels: int, selected: Sequence[int], log: Log, *,
                        epochs: int) -> dict[str, Any]:
    """Fine-tune a fresh LoRA (``epochs``, ``cfg``'s recipe and seed) on ``train.subset(selected)`` and on a
    seeded random subset of the same size, and evaluate both on ``eval_loader`` (select-data's
    validation set, select's target): ``{"n_examples", "epochs", "selected": {...}, "random": {...}}``
    with ``val_accuracy``, ``val_loss`` and ``seconds`` each.  ``encodings``: the token ids of ``train``."""
    k = len(selected)
    g = torch.Generator().manual_seed(int(cfg.seed))
    random_idx = torch.randperm(len(train), generator=g, device="cpu")[:k].tolist()
    out: dict[str, Any] = {"n_examples": k, "epochs": epochs}
    for name, idx in (("selected", list(selected)), ("random", random_idx)):
        # a fresh LoRA on the base model (never the adapter): the comparison must not inherit training
        # on the full set; the subset's token ids are taken from the training split's
        model = load_model(cfg, num_labels, adapter=None)
        loader = finetune_loader(cfg, train.subset(idx), tokenizer, [encodings[i] for i in idx])
        trained = train_model(cfg, model, loader, eval_loader, epochs=epochs, log=log,
                              what=f"evaluate ({name} {k})")
        out[name] = {"val_accuracy": trained.val["accuracy"], "val_loss": trained.val["loss"],
                     "seconds": trained.seconds}
        del model, trained
    return out

# ------------------------------------------------------------------------------ report


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


def selection_table(result: SelectResult) -> str:
    """Plain-text report of select-data (with the evaluation against a random subset when it ran)."""
    cfg = result.config
    lines = [
        f"Data selection with {cfg.method} (damping {damping_label(cfg.damping)}), rule {cfg.rule}: kept "
        f"{len(result.selected)} of {result.n_train} training examples ({result.source})",
        f"fine-tune: {cfg.resolved_epochs} epoch(s) in {result.finetune_seconds:.1f} s, "
        f"validation {accuracy_name(cfg)} {result.val_accuracy:.4f}",
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
                      f"{accuracy_name(cfg)}"]
        lines += column_table(("training set", "examples", "val accuracy", "val loss"), rows)
    lines.append(f"outputs: {', '.join(result.paths.values())}")
    return "\n".join(lines)


def _headline(result: SelectResult) -> list[str]:
    """The printed report's lines before its evaluation table and outputs (report.html's summary)."""
    return [line for line in selection_table(result).split("\n\n")[0].splitlines() if not line.startswith("outputs:")]
