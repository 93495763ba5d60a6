"""Data selection: keep the training examples whose up-weighting most LOWERS the validation loss.

Pipeline (:func:`run_select_data`): load/split (optionally flip labels) → fine-tune → fit HyperINF
once → ``mean_scores`` on the validation set with one method → rank from the most negative score
(most helpful, see ``attributor.SIGN_CONVENTION``) → write the top ``fraction``.  With
``evaluate``, a fresh LoRA is fine-tuned on the selection and on a random subset of the same size
(same seed, epochs and hyper-parameters) and both validation accuracies are reported.
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import TextDataset, make_loader
from .mislabeled import (
    DEFAULT_EPOCHS,
    Log,
    PipelineConfig,
    _json_safe,
    _log,
    damping_label,
    fit_attributor,
    load_model,
    parse_dampings,
    parse_methods,
    prepare_data,
    score_method,
    train_model,
    validation_gradients,
)
from .output import prepare_output_dir

__all__ = ["SelectConfig", "SelectResult", "run_select_data", "format_selection"]


@dataclass
class SelectConfig(PipelineConfig):
    """Settings of ``select-data``."""

    fraction: float = 0.2
    """Fraction of the training set to keep, in (0, 1]."""
    method: str = "hyperinf"
    damping: float | str = "auto"
    evaluate: bool = False
    """Also fine-tune fresh LoRA models on the selection and on a random subset of equal size."""
    out: Path = Path("hyperinf-out/select")

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"--fraction must be in (0, 1], got {self.fraction}")
        self.method = parse_methods([self.method], option="--method")[0]
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
    ``detect-mislabeled``'s scores.csv) and ``summary.json``.

    Raises:
        DataError / ValueError: bad settings or inputs (one-line messages).
    """
    t_start = time.perf_counter()
    cfg.validate()
    out = prepare_output_dir(cfg.out)  # fail on an unusable folder before minutes of work
    data = prepare_data(cfg)
    _log(log, f"data: {data.source}: {len(data.train)} train ({int(data.flipped.sum())} flipped) / {len(data.val)} val")
    trained = train_model(cfg, data.train, data.val, log=log)
    attr, fit_seconds = fit_attributor(cfg, trained, data.train, log=log)
    try:
        val_loader = make_loader(data.val, trained.tokenizer, batch_size=cfg.fit_batch_size, sort_by_length=True,
                                 max_length=cfg.max_length)
        _log(log, f"influence: gradient of the mean validation loss ({len(data.val)} examples)")
        queries, query_seconds = validation_gradients(attr, val_loader)
        _log(log, f"scoring: {cfg.method}")
        scores, timing = score_method(attr, queries, cfg.method, cfg.damping)
    finally:
        attr.cache.close()
    del attr
    if not np.isfinite(scores).all():
        raise ValueError(f"{cfg.method}: scores are not finite (damping {damping_label(cfg.damping)} too small?)")

    # most negative first: up-weighting these lowers the validation loss the most
    order = np.argsort(scores, kind="stable")
    selected = [int(i) for i in order[: cfg.n_selected]]

    evaluation = None
    if cfg.evaluate:
        evaluation = _evaluate_selection(cfg, data.train, data.val, selected, trained.val["accuracy"], log)

    paths = {"selected": str(out / "selected.csv"), "summary": str(out / "summary.json")}
    names = data.label_names
    noisy = cfg.flip_rate > 0  # then also say which selected labels were flipped
    with open(paths["selected"], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["index", "text", "label", "score", *(["flipped"] if noisy else [])])
        for i in selected:
            w.writerow([i, data.train.texts[i], names[data.train.labels[i]], f"{scores[i]:.10g}",
                        *([int(data.flipped[i])] if noisy else [])])
    result = SelectResult(
        config=cfg, source=data.source, n_train=len(data.train), n_val=len(data.val),
        n_flipped=int(data.flipped.sum()), selected=selected, scores=scores,
        finetune_seconds=trained.seconds, val_accuracy=trained.val["accuracy"], fit_seconds=fit_seconds,
        query_seconds=query_seconds, method_seconds=timing["seconds"],
        n_flipped_selected=int(data.flipped[selected].sum()), evaluation=evaluation, paths=paths,
    )
    result.total_seconds = time.perf_counter() - t_start
    Path(paths["summary"]).write_text(json.dumps(_json_safe(result.summary()), indent=2) + "\n")
    return result


def _evaluate_selection(
    cfg: SelectConfig, train: TextDataset, val: TextDataset, selected: list[int], full_accuracy: float, log: Log
) -> dict[str, Any]:
    """Validation accuracy of fresh LoRA models trained on the selection vs a random subset."""
    k = len(selected)
    g = torch.Generator().manual_seed(int(cfg.seed))
    random_idx = torch.randperm(len(train), generator=g)[:k].tolist()
    epochs = cfg.evaluation_epochs
    num_labels = max(train.num_classes, val.num_classes)
    out: dict[str, Any] = {"n_examples": k, "epochs": epochs, "full_train_val_accuracy": full_accuracy}
    for name, idx in (("selected", selected), ("random", random_idx)):
        # a fresh LoRA on the base model (never the adapter): the comparison must not inherit training
        # on the full set
        model_tok = load_model(cfg, num_labels, adapter=None)
        trained = train_model(cfg, train.subset(idx), val, epochs=epochs, model_and_tokenizer=model_tok,
                              log=log, what=f"evaluate ({name} {k})")
        out[name] = {"val_accuracy": trained.val["accuracy"], "val_loss": trained.val["loss"],
                     "seconds": trained.seconds}
        del model_tok, trained
    return out


def format_selection(result: SelectResult) -> str:
    """Plain-text report of a ``select-data`` run."""
    cfg = result.config
    lines = [
        f"Data selection with {cfg.method} (damping {damping_label(cfg.damping)}): kept the "
        f"{len(result.selected)} most helpful of {result.n_train} training examples ({result.source})",
        f"fine-tune: {cfg.resolved_epochs} epoch(s) in {result.finetune_seconds:.1f} s, "
        f"validation accuracy {result.val_accuracy:.4f}",
        f"influence: fit {result.fit_seconds:.1f} s, validation gradient {result.query_seconds:.1f} s, "
        f"{cfg.method} {result.method_seconds:.2f} s",
    ]
    if result.n_flipped:
        lines.append(f"flipped labels among the selected: {result.n_flipped_selected} of {len(result.selected)} "
                     f"(overall {result.n_flipped} of {result.n_train})")
    if result.evaluation:
        ev = result.evaluation
        rows = [("training set", "examples", "val accuracy"),
                ("selected (influence)", str(ev["n_examples"]), f"{ev['selected']['val_accuracy']:.4f}"),
                ("random subset", str(ev["n_examples"]), f"{ev['random']['val_accuracy']:.4f}"),
                ("main model (full set)", str(result.n_train), f"{ev['full_train_val_accuracy']:.4f}")]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines += ["", f"evaluation: fresh LoRA, {ev['epochs']} epoch(s), seed {cfg.seed}"]
        for j, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
    lines.append(f"outputs: {result.paths['selected']}, {result.paths['summary']}")
    return "\n".join(lines)
