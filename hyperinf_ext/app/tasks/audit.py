"""``audit``: every training example of the user's file ranked by suspicion.

Pipeline (:func:`run_audit`): the checks and the model of ``user_run`` (without ``--adapter`` a LoRA is
fine-tuned on the training file first — an audit needs a model that learned the data) → a checkpointed
HyperINF fit over the training file → one score per example:

* ``influence_score`` (needs ``--target``) = ``HyperINF.mean_scores(target)``, the change of the target's mean
  loss when the example is up-weighted (``attributor.SIGN_CONVENTION``): positive = the example raises
  the loss on the trusted examples (suspicious: mislabeled, contradicting or off-task); by default the
  target's GFIM is mixed into the curvature with weight :data:`DETECTION_MIX_QUERIES` (``--mix-queries``),
  and hyperinf scores it at :data:`DETECTION_DAMPING` (``--damping auto``) as the cosine
  :data:`DETECTION_NORMALIZE` (``--normalize``; not with ``--index`` or ``--per-token``);
* ``self_influence`` = ``HyperINF.self_scores()``, g·H⁻¹·g ≥ 0: how far the model bends to fit the example
  (large for mislabeled and atypical examples), at the same damping; a "symmetric" influence signal takes
  the raw self-influence (its own would be 1 for every example);
* ``combined_score`` (needs ``--target``) = the mean of the two signals' ranks scaled to (0, 1]
  (``metrics.rank_average``).

``--signal`` picks the ranking signal: by default :data:`DETECTION_SIGNAL` (``influence``) with ``--target``
and ``self`` without.  The defaults are the pre-registered rule's choices on the selection data of both
detection studies (bench/DEFAULTS.md 1b–1d, amendments 2–4 of bench/defaults_rule.py);
docs/methods-and-damping.md says what mixing costs and when not to use it.

Rank 1 = the highest score = the most suspicious.  Outputs: ``ranked.jsonl`` / ``ranked.csv`` /
``ranked.json`` (the input's format: the user's rows unchanged, every column, in rank order, plus ``rank``
and the score column), ``summary.json``, ``report.md``, ``report.html`` (module ``user_report``); with
``--per-token`` (causal LMs) ``tokens.jsonl``: the scores of the ``--per-token-count`` most suspicious split
over their response tokens (module ``per_token``).  With ``--index IDX`` the scores come from a gradient
index instead of a fit (module ``user_index``): no fine-tuning, no training gradient recomputed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .output import prepare_output_dir, staged_outputs
from .per_token import PER_TOKEN_COUNT, audit_token_records, check_per_token, shares_note, write_tokens_jsonl
from .pipeline import DEFAULT_EPOCHS, Log, is_causal, log_stage
from .pipeline_config import check_query_option_use, column_headings, config_damping, damping_used, used_settings
from .metrics import rank_average
from .report import write_json
from .user_index import check_index_options, index_inputs, index_summary, read_source
from .user_report import write_audit_html
from .user_run import (RunCheckpoint, UserConfig, checkpointed_fit, load_user_files, prepare_inputs, trained_model,
                       use_method)

__all__ = ["AuditConfig", "run_audit", "audit_table", "SIGNALS", "ADDED_COLUMNS", "COLUMN_OF",
           "DETECTION_SIGNAL", "DETECTION_MIX_QUERIES", "DETECTION_DAMPING", "DETECTION_NORMALIZE"]

ADDED_COLUMNS = ("rank", "influence_score", "self_influence", "combined_score")
COLUMN_OF = {"influence": "influence_score", "self": "self_influence", "combined": "combined_score"}
SIGNALS = {
    "influence_score": "influence on the target's mean loss (--target): HyperINF.mean_scores, the change of the "
                       "target's mean loss when the example is up-weighted; POSITIVE = the example raises the "
                       "loss on the trusted examples (suspicious), negative = it helps them",
    "self_influence": "self-influence (without --target, or --signal self): HyperINF.self_scores, g·H⁻¹·g >= 0, how far the model bends "
                      "to fit the example; LARGE = suspicious (mislabeled or atypical)",
    "combined_score": "the mean of two ranks, each scaled to (0, 1]: influence on the mean loss of --target "
                      "(influence_score) and self-influence (self_influence); HIGH = suspicious by both. With "
                      "the default setting it found flipped labels less well than influence_score on the selection "
                      "data of both detection studies (mean ROC-AUC 0.804 against 0.835; bench/DEFAULTS.md 1d)",
}
DETECTION_MIX_QUERIES = 99.0
"""The default ``--mix-queries`` of ``audit`` with a target: TrackStar's 0.99 mix, the pre-registered rule's
choice (bench/DEFAULTS.md 1b: mean detection ROC-AUC 0.769 against 0.701 unmixed on the classifier, 0.849
against 0.769 on the LLM; LDS 0.031 and 0.006 lower).  ``attribute`` and ``select`` keep 0 (see
docs/methods-and-damping.md)."""
DETECTION_SIGNAL = "influence"
"""The default ``--signal`` with ``--target``: rule 1c applied to 1d's setting (bench/DEFAULTS.md) ranked the
target signal alone (mean selection ROC-AUC 0.835) above its rank average with self-influence (0.804) and
self-influence (0.746)."""
DETECTION_DAMPING = "spectral:0.1"
"""hyperinf's damping for ``audit --target`` at ``--damping auto``: with the target mixed in at w = 99 the spectral
λ is relative to the MIXED matrix, which the target part dominates, so × 1 over-damps the training curvature
(bench/DEFAULTS.md 1d, amendments 3–4).  Without ``--target`` (self-influence alone) the method's own default."""
DETECTION_NORMALIZE = "symmetric"
"""hyperinf's ``--normalize`` for ``audit --target`` when not given: the cosine in the inverse-curvature metric
(TrackStar's form; bench/DEFAULTS.md 1d).  Not with ``--index`` (no stored gradient norms) or ``--per-token``
(the shares split the raw score): those score raw."""
REPORT_ROWS = 20


@dataclass
class AuditConfig(UserConfig):
    """Settings of ``audit``."""

    scoring_only: ClassVar[tuple[str, ...]] = (*UserConfig.scoring_only, "score_signal", "per_token",
                                               "per_token_count")
    train: Path | None = None
    """The training file to audit (text/label for a classifier, prompt/response or messages for a causal LM);
    with ``index`` optional (the index's training file; when given it must be that file)."""
    per_token: bool = False
    """Also split the scores of the ``per_token_count`` most suspicious examples over their tokens (causal LMs)."""
    per_token_count: int = PER_TOKEN_COUNT
    score_signal: str | None = None
    """The ranking signal: "combined", "influence" or "self" (keys of ``COLUMN_OF``); None =
    :data:`DETECTION_SIGNAL` with ``target``, self without."""
    mix_queries: float | None = None
    """As in ``PipelineConfig``; None = :data:`DETECTION_MIX_QUERIES` when the influence signal is computed
    and the method can mix (hyperinf, exact, paper, kronecker), else 0."""
    out: Path = Path("hyperinf-out/audit")

    @property
    def resolved_epochs(self) -> int:
        if self.index is not None:
            return 0
        if self.epochs is not None:
            return int(self.epochs)
        return 0 if self.adapter is not None else DEFAULT_EPOCHS

    @property
    def resolved_signal(self) -> str:
        """"combined", "influence" or "self"."""
        return self.score_signal or (DETECTION_SIGNAL if self.target is not None else "self")

    @property
    def signal(self) -> str:
        """The ranking column: ``influence_score``, ``self_influence`` or ``combined_score``."""
        return COLUMN_OF[self.resolved_signal]

    @property
    def with_influence(self) -> bool:
        return self.resolved_signal != "self"

    def _detection_defaults(self, method: str) -> bool:
        """True where 1d's setting applies: hyperinf scoring a target with a fit of its own (no index)."""
        return self.with_influence and method == "hyperinf" and self.index is None

    def resolved_damping(self, method: str) -> Any:
        """The damping the scores use: :data:`DETECTION_DAMPING` for 1d's setting at ``--damping auto``."""
        if self.damping == "auto" and self._detection_defaults(method):
            return DETECTION_DAMPING
        return self.damping

    def default_normalize(self, method: str) -> str | None:
        if self._detection_defaults(method) and not self.per_token:
            return DETECTION_NORMALIZE
        return None

    def default_mix_queries(self, method: str) -> float:
        from ...curvature import mixing
        from ...curvature.methods import METHODS

        if not self.with_influence or method not in METHODS or not mixing.can_mix(METHODS[method]):
            return 0.0
        return DETECTION_MIX_QUERIES

    def validate(self) -> None:
        if self.score_signal is not None and self.score_signal not in COLUMN_OF:
            raise ValueError(f"--signal: expected one of {', '.join(COLUMN_OF)}, got {self.score_signal!r}")
        if self.score_signal in ("influence", "combined") and self.target is None:
            raise ValueError(f"--signal {self.score_signal}: needs --target (the trusted examples whose loss the "
                             "influence is about)")
        super().validate()
        if self.index is not None:
            check_index_options(self, "--train", self.train)
            if self.epochs is not None:
                raise ValueError("--epochs: not with --index (the index holds the model, adapter and fitted factors)")
        elif self.train is None:
            raise ValueError("--train: a file is required (or --index IDX)")
        elif not Path(self.train).is_file():
            raise ValueError(f"--train {self.train}: file not found")
        if self.per_token:
            causal = bool(read_source(self.index)["causal"]) if self.index is not None else is_causal(self)
            check_per_token(causal, self.model, self.per_token_count)
        check_query_option_use(self, queries=self.with_influence, per_token=self.per_token,
                               index=self.index is not None)


def run_audit(cfg: AuditConfig, log: Log = None) -> dict[str, Any]:
    """Rank every training example by suspicion and write the outputs; returns the summary (summary.json).

    Raises:
        DataError / ValueError: bad settings or inputs (one line naming the file, line and column).
    """
    t_start = time.perf_counter()
    cfg.validate()
    out = prepare_output_dir(cfg.out)
    ckpt, index_run, fit_seconds = None, None, 0.0
    if cfg.index is not None:  # the index holds the model, the factors and the training gradients
        index_run = index_inputs(cfg, "audit", ADDED_COLUMNS, log, given=cfg.train)
        data, loaders, trained = index_run.data, index_run.loaders, index_run.trained
        attr, scorer = index_run.idx.attributor, index_run.idx
    else:
        data = load_user_files(cfg, Path(cfg.train), command="audit", added=ADDED_COLUMNS)
        loaders, _ = prepare_inputs(cfg, data, log)
        ckpt = RunCheckpoint(out, "audit", cfg, [cfg.train, cfg.target], log)
        ckpt.start()
        trained = trained_model(cfg, data, loaders, ckpt, loaders.finetune, cfg.resolved_epochs, log,
                                "fine-tune" if cfg.resolved_epochs else "model")
        attr, fit_seconds = checkpointed_fit(cfg, trained.model, loaders, ckpt, log)
        scorer = attr
    tokens, token_seconds = None, 0.0
    method = cfg.method if index_run is None else index_run.idx.attributor.config.method
    options = cfg.score_options(method, index=index_run is not None)
    try:
        t0 = time.perf_counter()
        if index_run is None:
            use_method(cfg, attr, cfg.resolved_damping(method))
        columns = _signals(cfg, scorer, loaders, data, options, log)
        score_seconds = time.perf_counter() - t0
        scores = columns[cfg.signal]
        order = ranking(scores)
        if cfg.per_token:
            t0 = time.perf_counter()
            top = order[: cfg.per_token_count]
            log_stage(log, f"per-token: shares of the {len(top)} most suspicious examples")
            with_target = cfg.with_influence  # combined: the shares split its influence_score part
            tokens = audit_token_records(attr, loaders.influence_train, loaders.influence_val if with_target else None,
                                         len(data.target) if with_target else 0, top,
                                         columns["influence_score" if with_target else "self_influence"], data.train,
                                         loaders.tokenizer, mix_queries=options["mix_queries"] if with_target else 0.0)
            token_seconds = time.perf_counter() - t0
    finally:
        attr.cache.close()
    lines = [data.train.row(int(i)) for i in order]
    added = [{"rank": r + 1, **{c: float(v[i]) for c, v in columns.items()}} for r, i in enumerate(order)]
    name = "ranked" + data.train_rows.suffix
    paths = {"ranked": str(out / name), "report": str(out / "report.md"), "html": str(out / "report.html"),
             "summary": str(out / "summary.json")}
    if tokens is not None:
        paths["tokens"] = str(out / "tokens.jsonl")
    damping = (damping_used(method, cfg.resolved_damping(method)) if index_run is None
               else config_damping(index_run.idx.attributor.config))
    adapter = cfg.adapter if index_run is None else Path(cfg.index) / "adapter"
    summary = {
        "task": "audit", "settings": used_settings(cfg, method, damping, options),
        "train": str(cfg.train) if index_run is None else str(index_run.train_path),
        "target": None if cfg.target is None else str(cfg.target),
        "n_train": len(data.train), "n_target": 0 if data.target is None else len(data.target),
        "causal_lm": data.causal, "notes": data.notes,
        "signal": cfg.signal, "signal_meaning": SIGNALS[cfg.signal] + cfg.score_options_note(method),
        "columns": list(columns), "mix_queries": options["mix_queries"] if cfg.with_influence else None,
        "sign_convention": "rank 1 = the highest score = the most suspicious; " + SIGNALS[cfg.signal],
        "method": method, "damping": damping,
        "index": None if index_run is None else index_summary(index_run, cfg.signal),
        "finetune": {"epochs": cfg.resolved_epochs, "adapter": None if adapter is None else str(adapter),
                     "seconds": trained.seconds, "history": trained.history,
                     "eval_on": "target" if cfg.target is not None else "train",
                     "loss": trained.val["loss"], "accuracy": trained.val["accuracy"]},
        "top": [{"rank": a["rank"], "line": line, "score": a[cfg.signal]} for a, line in zip(added[:10], lines)],
        "timings": {"fit_seconds": fit_seconds, "score_seconds": score_seconds,
                    **({"per_token_seconds": token_seconds} if tokens is not None else {})},
        "per_token": None if tokens is None else {"examples": len(tokens), "sides": ["train"],
                                                  "against": tokens[0]["against"], "check": shares_note(tokens)},
        "outputs": paths,
    }
    if ckpt is not None:
        summary["checkpoint"] = ckpt.kept_note()
        summary["adapter_kept"] = str(ckpt.adapter_dir) if ckpt.has_adapter() else None
    answer = data.train.label_names
    table = ({"rank": a["rank"], "line": line, "text": data.train.texts[int(i)],
              "answer": answer[data.train.labels[int(i)]], "score": a[cfg.signal],
              **{c: a[c] for c in columns if c != cfg.signal}}
             for a, line, i in zip(added, lines, order))  # write_audit_html reads the rows it shows
    with staged_outputs(out) as stage:
        data.train_rows.write(stage / name, lines, added)
        write_report(stage / "report.md", summary, data, lines, added)
        write_audit_html(stage / "report.html", summary, table, tokens)
        if tokens is not None:
            write_tokens_jsonl(stage / "tokens.jsonl", tokens)
        summary["total_seconds"] = time.perf_counter() - t_start
        write_json(stage / "summary.json", summary)
    if ckpt is not None:
        ckpt.finish()
    return summary


def _signals(cfg: AuditConfig, scorer: Any, loaders: Any, data: Any, options: dict[str, Any],
             log: Log) -> dict[str, np.ndarray]:
    """The score columns of the chosen signal, float64 [n_train] each: ``influence_score`` (with the options),
    ``self_influence`` (``normalize`` only: there is no query set to mix; raw for "symmetric", which would
    make it 1 for every example) and, for combined, their rank average ``combined_score``."""
    out = {}
    if cfg.with_influence:
        log_stage(log, f"influence: {cfg.method} on the mean loss of {len(data.target)} target examples"
                  + (f", target curvature mixed in (weight {options['mix_queries']:g})" if options["mix_queries"] else ""))
        out["influence_score"] = scorer.mean_scores(loaders.influence_val, **options)
    if cfg.resolved_signal != "influence":
        log_stage(log, f"influence: {cfg.method} self-influence of {len(data.train)} training examples")
        out["self_influence"] = scorer.self_scores(**{k: v for k, v in options.items()
                                                      if k == "normalize" and v != "symmetric"})
    for column, s in out.items():
        out[column] = s = s.detach().cpu().double().numpy()
        if not np.isfinite(s).all():
            raise ValueError(f"{cfg.method}: {column} is not finite (damping "
                             f"{damping_used(cfg.method, cfg.resolved_damping(cfg.method))} too small?)")
    if cfg.resolved_signal == "combined":
        out["combined_score"] = rank_average(out["influence_score"], out["self_influence"])
    return out


def ranking(scores: np.ndarray) -> np.ndarray:
    """Positions by decreasing score (ties: file order): rank 1 first."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def _cell(text: Any, width: int = 120) -> str:
    """One Markdown table cell: one line, pipes escaped, long texts cut with an ellipsis."""
    s = " ".join(str(text).split()).replace("|", "\\|")
    return s if len(s) <= width else s[: width - 1] + "…"


def write_report(path: Path, summary: dict[str, Any], data: Any, lines: list[int], added: list[dict]) -> None:
    """``report.md``: the signal and its meaning, the settings, the notes and the most suspicious rows."""
    signal = summary["signal"]
    text_name, label_name = column_headings(summary["settings"], summary["causal_lm"])
    position = {line: i for i, line in enumerate(data.train.rows or [])}
    out = [
        "# Training-data audit", "",
        f"{summary['n_train']} training examples of `{summary['train']}` ranked by **{signal}** "
        f"({summary['method']}, damping {summary['damping']}): {summary['signal_meaning']}.", "",
        f"Model: {summary['settings']['model']}; "
        + (f"adapter `{summary['finetune']['adapter']}`" if summary['finetune']['adapter'] else "a fresh LoRA")
        + (f", fine-tuned {summary['finetune']['epochs']} epoch(s) on the training file" if summary['finetune']['epochs']
           else "") + f"; {summary['finetune']['eval_on']} loss {summary['finetune']['loss']:.4f}.", "",
        *[f"Note: {n}" for n in summary["notes"]], *([""] if summary["notes"] else []),
        *([f"Kept: {summary['checkpoint']}.", ""] if summary.get("adapter_kept") else []),
        f"The {min(REPORT_ROWS, len(lines))} most suspicious (every row, in rank order: "
        f"`{Path(summary['outputs']['ranked']).name}`; lines are file lines, CSV: the header is line 1):", "",
        f"| rank | line | {signal} | {text_name} | {label_name} |", "|---:|---:|---:|---|---|",
    ]
    for a, line in list(zip(added, lines))[:REPORT_ROWS]:
        i = position.get(line, line)
        out.append(f"| {a['rank']} | {line} | {a[signal]:.4g} | {_cell(data.train.texts[i])} | "
                   f"{_cell(data.train.label_names[data.train.labels[i]])} |")
    Path(path).write_text("\n".join(out) + "\n", encoding="utf-8")


def audit_table(summary: dict[str, Any]) -> str:
    """What the command line prints: the signal used, the notes, the top of the ranking, timings, outputs."""
    t = summary["timings"]
    signal = summary["signal"]
    lines = [
        f"audit: {summary['n_train']} training examples of {summary['train']} ranked by {signal} "
        f"({summary['method']}, damping {summary['damping']})",
        f"signal: {summary['signal_meaning']}",
        *(f"note: {n}" for n in summary.get("notes", [])),
        "most suspicious (rank: file line, score): " + ", ".join(
            f"{e['rank']}: line {e['line']} ({e['score']:.4g})" for e in summary["top"][:5]),
        (f"index {summary['index']['path']}: scores {summary['index']['scores']}; opened in "
         f"{summary['index']['open_seconds']:.1f} s, scoring {t['score_seconds']:.1f} s" if summary.get("index") else
         f"fine-tune {summary['finetune']['seconds']:.1f} s, influence fit {t['fit_seconds']:.1f} s, "
         f"scoring {t['score_seconds']:.1f} s"),
        *([f"per-token: {summary['per_token']['examples']} examples in {t['per_token_seconds']:.1f} s; "
           + summary["per_token"]["check"]] if summary.get("per_token") else []),
        f"outputs: {', '.join(summary['outputs'].values())}",
        *([f"kept: {summary['checkpoint']}"] if summary.get("adapter_kept") else []),
    ]
    return "\n".join(lines)
