"""``select``: the part of the user's pool that serves the user's target task (the LESS workflow).

Pipeline (:func:`run_select`): the checks and the model of ``user_run`` — without ``--adapter`` a short
warm-up LoRA on a seeded random part of the pool (``--warmup-fraction``, default 5 %, at least
``WARMUP_MIN`` examples), as LESS (Xia et al., 2024) warms up on 5 % → a checkpointed HyperINF fit over the
whole pool → each pool example's influence on the target's mean loss (``HyperINF.mean_scores``; negative
= up-weighting it lowers the target loss = helpful) → the selection rule keeps ``--count`` examples (or
``--fraction`` of the pool): ``class-balanced`` where the examples have labels (a classifier's classes, or a
causal LM's responses when they are few distinct answers), else ``drop-harmful``; see :func:`auto_rule`.

Outputs: ``selected.jsonl`` / ``.csv`` / ``.json`` (the user's rows unchanged, in pool order),
``scores.csv`` (every pool row: its file line, score and whether it was kept), ``summary.json``,
``report.md`` and ``report.html`` (module ``user_report``).  With ``--index IDX`` (module ``user_index``)
the pool is the index's training file, there is no warm-up (the index's adapter plays its role) and the
scores are ``Index.mean_scores``.  ``--evaluate`` fine-tunes fresh LoRA adapters on the selection and on a random subset of
the same size (``selection.compare_with_random``, as select-data) and reports the target loss of each.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .output import prepare_output_dir, staged_outputs
from .pipeline import DEFAULT_EPOCHS, Log, finetune_loader, log_stage
from .pipeline_config import check_query_option_use, config_damping, damping_used, used_settings
from .report import column_table, write_csv, write_json
from .selection import compare_with_random
from .selection_rules import RULES, rule_effect, select
from .user_index import check_index_options, index_inputs, index_summary, read_source
from .user_report import write_select_html
from .user_run import (RunCheckpoint, UserConfig, UserData, checkpointed_fit, load_user_files, prepare_inputs,
                       trained_model, use_method)

__all__ = ["SelectPoolConfig", "run_select", "select_table", "auto_rule", "WARMUP_MIN"]

WARMUP_MIN = 32
"""The smallest warm-up set: a LoRA fine-tuned on fewer examples barely moves from its initialisation."""
NO_LABEL_RULE = "drop-harmful"
"""The rule for examples without labels: of the rules that need none, the one with the lowest mean loss
against random subsets in bench/SELECTION.md (top and drop-harmful beat random on 3 of 9 seed × fraction
pairs each; drop-harmful's mean excess loss was the smaller, +0.057 vs +0.065)."""
MAX_LABEL_RESPONSES = 50
MAX_ONE_OFF_SHARE = 0.05
"""A causal LM's responses are labels only when those given once cover at most this share of the pool."""


@dataclass
class SelectPoolConfig(UserConfig):
    """Settings of ``select``."""

    scoring_only: ClassVar[tuple[str, ...]] = (*UserConfig.scoring_only, "fraction", "count", "rule", "evaluate")
    pool: Path | None = None
    fraction: float | None = None
    count: int | None = None
    warmup_fraction: float = 0.05
    rule: str = "auto"
    evaluate: bool = False
    out: Path = Path("hyperinf-out/select")

    def validate(self) -> None:
        super().validate()
        if self.index is not None:
            check_index_options(self, "--pool", self.pool)
            if self.epochs is not None and not self.evaluate:
                raise ValueError("--epochs: with --index only for --evaluate (the index's adapter replaces the "
                                 "warm-up)")
        elif self.pool is None or not Path(self.pool).is_file():
            raise ValueError(f"--pool {self.pool}: file not found" if self.pool else
                             "--pool: a file is required (or --index IDX)")
        if self.target is None:
            raise ValueError("--target: a file is required (the examples the selection should serve)")
        if (self.fraction is None) == (self.count is None):
            raise ValueError("give exactly one of --fraction F and --count N")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"--fraction must be in (0, 1], got {self.fraction}")
        if self.count is not None and self.count < 1:
            raise ValueError(f"--count must be >= 1, got {self.count}")
        if not 0.0 < self.warmup_fraction <= 1.0:
            raise ValueError(f"--warmup-fraction must be in (0, 1], got {self.warmup_fraction}")
        check_query_option_use(self, queries=True, index=self.index is not None)
        if self.rule != "auto" and self.rule not in RULES:
            raise ValueError(f"--rule: unknown selection rule {self.rule!r}; expected auto or one of {', '.join(RULES)}")

    def budget(self, n: int) -> int:
        """Examples to keep of a pool of ``n``."""
        # halves round up (Python's round() would keep 2 of 5 at --fraction 0.5, and 4 of 7)
        k = self.count if self.count is not None else max(1, math.floor(self.fraction * n + 0.5))
        if k > n:
            pool = self.pool if self.pool is not None else f"of the index {self.index}"
            raise ValueError(f"--count {k}: the pool {pool} has only {n} examples")
        return k


def _one_off_answers(data: UserData) -> int:
    """How many of the responses occur once in the pool."""
    return sum(1 for c in Counter(data.train.labels).values() if c == 1)


def has_labels(data: UserData) -> bool:
    """A classifier's examples have labels; a causal LM's have them when its responses are a few answers,
    each given more than once — free-form answers that repeat a few stock replies are not labels (their
    one-off answers would each make a class of one, whose share of a selection rounds to nothing)."""
    n, distinct = len(data.train), data.train.num_classes
    return not data.causal or (distinct <= min(MAX_LABEL_RESPONSES, n // 2)
                               and _one_off_answers(data) <= MAX_ONE_OFF_SHARE * n)


def auto_rule(data: UserData) -> tuple[str, str]:
    """(rule, why) for ``--rule auto``."""
    if has_labels(data):
        return "class-balanced", ("the examples have labels: the most helpful of each class at the pool's class "
                                  "shares (the rule that beat random most reliably, bench/SELECTION.md)")
    n, distinct, once = len(data.train), data.train.num_classes, _one_off_answers(data)
    what = (f"{distinct} distinct answers of {n}" if distinct > min(MAX_LABEL_RESPONSES, n // 2)
            else f"{distinct} distinct answers of {n}, {once} of them given once")
    return NO_LABEL_RULE, (f"the responses are {what}, not labels: drop-harmful, the best measured rule that needs "
                           "no labels (bench/SELECTION.md)")


def warmup_indices(n: int, fraction: float, seed: int) -> list[int]:
    """The seeded random part of the pool the warm-up LoRA trains on (pool order)."""
    k = min(n, max(WARMUP_MIN, int(round(fraction * n))))
    return sorted(int(i) for i in np.random.default_rng(seed).permutation(n)[:k])


def run_select(cfg: SelectPoolConfig, log: Log = None) -> dict[str, Any]:
    """Score the pool on the target and write the selection; returns the summary (summary.json).

    Raises:
        DataError / ValueError: bad settings or inputs (one line naming the file, line and column).
    """
    t_start = time.perf_counter()
    cfg.validate()
    out = prepare_output_dir(cfg.out)
    if cfg.index is not None:
        cfg.budget(int(read_source(cfg.index)["n_train"]))  # a --count larger than the pool: before any work
    index_run = index_inputs(cfg, "select", (), log, given=cfg.pool) if cfg.index is not None else None
    rcfg = cfg if index_run is None else index_run.cfg  # with --index: its columns, model and LoRA settings
    data = load_user_files(cfg, Path(cfg.pool), command="select", added=()) if index_run is None else index_run.data
    n = len(data.train)
    k = cfg.budget(n)
    rule, why = (cfg.rule, "chosen with --rule") if cfg.rule != "auto" else auto_rule(data)
    ckpt, warm, fit_seconds = None, [], 0.0
    if index_run is not None:  # the index's adapter plays the warm-up's role; its factors, the fit's
        loaders, trained, epochs = index_run.loaders, index_run.trained, cfg.epochs or DEFAULT_EPOCHS
        attr, scorer = index_run.idx.attributor, index_run.idx
    else:
        loaders, _ = prepare_inputs(cfg, data, log)
        ckpt = RunCheckpoint(out, "select", cfg, [cfg.pool, cfg.target], log)
        ckpt.start()
        epochs = cfg.resolved_epochs
        warm = warmup_indices(n, cfg.warmup_fraction, cfg.seed) if epochs > 0 else []
        finetune = finetune_loader(cfg, data.train.subset(warm or range(n)), loaders.tokenizer,
                                   [loaders.train_encodings[i] for i in (warm or range(n))])
        trained = trained_model(cfg, data, loaders, ckpt, finetune, epochs, log,
                                f"warm-up ({len(warm)} of {n})" if warm else "model")
        attr, fit_seconds = checkpointed_fit(cfg, trained.model, loaders, ckpt, log)
        scorer = attr
    try:
        t0 = time.perf_counter()
        options = cfg.score_options(None if index_run is None else index_run.idx.attributor.config.method,
                                    index=index_run is not None)
        if index_run is None:
            use_method(cfg, attr)
        log_stage(log, f"influence: {cfg.method} on the mean loss of {len(data.target)} target examples")
        scores = scorer.mean_scores(loaders.influence_val, **options).detach().cpu().double().numpy()
        query_scores = (scorer.scores(loaders.influence_val, **options).detach().cpu().double().numpy()
                        if rule == "query-round-robin" else None)
        score_seconds = time.perf_counter() - t0
    finally:
        attr.cache.close()
    if not np.isfinite(scores).all():
        raise ValueError(f"{cfg.method}: scores are not finite (damping {damping_used(cfg.method, cfg.damping)} too small?)")
    chosen = select(rule, k, scores=scores, query_scores=query_scores, labels=np.asarray(data.train.labels),
                    seed=cfg.seed)
    kept = np.zeros(n, dtype=bool)
    kept[chosen] = True
    evaluation = None
    if cfg.evaluate:
        evaluation = compare_with_random(rcfg, data.train, loaders.tokenizer, loaders.train_encodings,
                                         loaders.evaluation, data.num_labels, [int(i) for i in chosen], log,
                                         epochs=epochs or DEFAULT_EPOCHS)
        evaluation["warmup_model"] = {"val_loss": trained.val["loss"], "val_accuracy": trained.val["accuracy"]}
    name = "selected" + data.train_rows.suffix
    paths = {"selected": str(out / name), "scores": str(out / "scores.csv"), "report": str(out / "report.md"),
             "html": str(out / "report.html"), "summary": str(out / "summary.json")}
    pool = str(cfg.pool) if index_run is None else str(index_run.train_path)
    method = cfg.method if index_run is None else index_run.idx.attributor.config.method
    damping = (damping_used(method, cfg.damping) if index_run is None
               else config_damping(index_run.idx.attributor.config))
    summary = {
        "task": "select", "settings": used_settings(cfg, method, damping, options), "pool": pool,
        "target": str(cfg.target),
        "n_pool": n, "n_target": len(data.target), "n_selected": int(k), "causal_lm": data.causal,
        "notes": data.notes, "rule": rule, "rule_reason": why, "rule_effect": rule_effect(rule, scores, chosen),
        "method": method, "damping": damping,
        "signal": "influence_score: HyperINF.mean_scores on the target, the change of the target's mean loss when "
                  "the example is up-weighted; NEGATIVE = helpful (kept first), positive = harmful",
        "index": None if index_run is None else index_summary(index_run, "influence_score"),
        "warmup": {"n_examples": len(warm), "fraction": cfg.warmup_fraction if warm else None, "epochs": epochs,
                   "adapter": (None if cfg.adapter is None else str(cfg.adapter)) if index_run is None
                   else str(Path(cfg.index) / "adapter"),
                   "lines": [data.train.row(i) for i in warm], "seconds": trained.seconds,
                   "history": trained.history, "target_loss": trained.val["loss"],
                   "target_accuracy": trained.val["accuracy"]},
        "score_range_selected": [float(scores[kept].min()), float(scores[kept].max())],
        "timings": {"fit_seconds": fit_seconds, "score_seconds": score_seconds},
        "evaluation": evaluation, "outputs": paths,
    }
    if ckpt is not None:
        summary["checkpoint"] = ckpt.kept_note()
        summary["adapter_kept"] = str(ckpt.adapter_dir) if ckpt.has_adapter() else None
    names = data.train.label_names
    rows = [{"line": data.train.row(i), "text": data.train.texts[i], "answer": names[data.train.labels[i]],
             "score": float(scores[i]), "selected": bool(kept[i])} for i in range(n)]
    with staged_outputs(out) as stage:
        data.train_rows.write(stage / name, [data.train.row(i) for i in range(n) if kept[i]])
        write_csv(stage / "scores.csv", ["line", "influence_score", "selected"],
                  ([data.train.row(i), repr(float(scores[i])), int(kept[i])] for i in range(n)))
        write_report(stage / "report.md", summary)
        write_select_html(stage / "report.html", summary, rows)
        summary["total_seconds"] = time.perf_counter() - t_start
        write_json(stage / "summary.json", summary)
    if ckpt is not None:
        ckpt.finish()
    return summary


def _evaluation_lines(summary: dict[str, Any]) -> list[str]:
    ev = summary.get("evaluation")
    if not ev:
        return []
    rows = [(name, ev["n_examples"], f"{ev[key]['val_loss']:.4f}", f"{ev[key]['val_accuracy']:.4f}")
            for name, key in (("selected (influence)", "selected"), ("random subset", "random"))]
    return [f"evaluation: fresh LoRA, {ev['epochs']} epoch(s), seed {summary['settings']['seed']}, on the target",
            *column_table(("training set", "examples", "target loss", "target accuracy"), rows)]


def write_report(path: Path, summary: dict[str, Any]) -> None:
    """``report.md``: what was kept and why, the warm-up, the notes and the evaluation."""
    w = summary["warmup"]
    model = (f"adapter `{w['adapter']}`" if w["adapter"] else "a fresh LoRA") + (
        f", warmed up {w['epochs']} epoch(s) on {w['n_examples']} random pool examples" if w["n_examples"] else "")
    lines = [
        "# Data selection", "",
        f"Kept **{summary['n_selected']} of {summary['n_pool']}** examples of `{summary['pool']}` for the target "
        f"`{summary['target']}` ({summary['n_target']} examples), rule **{summary['rule']}** ({summary['rule_reason']}): "
        f"{summary['rule_effect']}.",
        "", f"Scores: {summary['method']} (damping {summary['damping']}); {summary['signal']}.", "",
        f"Model: {summary['settings']['model']}, {model}; target loss {w['target_loss']:.4f}.", "",
        *[f"Note: {n}" for n in summary["notes"]], *([""] if summary["notes"] else []),
        *([f"Kept: {summary['checkpoint']}.", ""] if summary.get("adapter_kept") else []),
        f"`{Path(summary['outputs']['selected']).name}` holds the kept rows as written, in pool order; "
        "`scores.csv` every pool row by file line (CSV: the header is line 1).", "",
    ]
    ev = _evaluation_lines(summary)
    if ev:
        lines += ["```", *ev, "```", ""]
    Path(path).write_text("\n".join(lines), encoding="utf-8")


def select_table(summary: dict[str, Any]) -> str:
    """What the command line prints: what was kept by which rule, the warm-up, notes, timings, outputs."""
    w, t = summary["warmup"], summary["timings"]
    return "\n".join([
        f"select: kept {summary['n_selected']} of {summary['n_pool']} pool examples for {summary['n_target']} target "
        f"examples, rule {summary['rule']} ({summary['rule_reason']})",
        f"rule: {summary['rule_effect']}",
        f"scores: {summary['method']} (damping {summary['damping']}) influence on the target's mean loss; "
        "negative = helpful",
        *(f"note: {n}" for n in summary.get("notes", [])),
        (f"warm-up: {w['n_examples']} random pool examples, {w['epochs']} epoch(s) in {w['seconds']:.1f} s; "
         if w["n_examples"] else "model: as given; ") + f"target loss {w['target_loss']:.4f}",
        (f"index {summary['index']['path']}: scores {summary['index']['scores']}; opened in "
         f"{summary['index']['open_seconds']:.1f} s, scoring {t['score_seconds']:.1f} s" if summary.get("index") else
         f"influence fit {t['fit_seconds']:.1f} s, scoring {t['score_seconds']:.1f} s"),
        *_evaluation_lines(summary),
        f"outputs: {', '.join(summary['outputs'].values())}",
        *([f"kept: {summary['checkpoint']}"] if summary.get("adapter_kept") else []),
    ])
