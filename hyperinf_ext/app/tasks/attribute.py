"""``attribute``: which training examples made the model answer each query as it does.

Pipeline (:func:`run_attribute`): load the training and query files (prompt/response instructions for a
causal LM, text/label rows for a classifier) → the LoRA model (a saved ``--adapter``, fine-tuned only
when ``--epochs N`` asks) → fit HyperINF once over the training set → precondition the query
gradients once → stream the training gradients batch by batch into a top-k (``scores(top_k=...)``, merged across ranks under torchrun), so memory
stays O(n_query·k) (the training gradients are cached on disk, not in memory) → per query the k most HELPFUL (most negative score: up-weighting them lowers the
query's loss) and k most HARMFUL (most positive) training examples.

Outputs: ``attribution.jsonl`` (one object per query), ``report.md`` and ``report.html`` (readable) and
``summary.json``; with ``--per-token`` (causal LMs) also ``tokens.jsonl``: every kept (query, training
example) pair's score split over the query's and the training example's tokens (``per_token``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..data.dataset import DataError, TextDataset
from ..data.files import load_text_file
from ...curvature.methods import Damping, damping_label, parse_dampings, parse_methods, split_damping
from .attribute_report import write_html, write_markdown
from .output import prepare_output_dir, staged_outputs
from .planning import plan_gate
from .pipeline_config import check_query_option_use, damping_used, used_settings
from .per_token import attribute_token_records, check_per_token, shares_note, write_tokens_jsonl
from .pipeline import (
    Log,
    PipelineConfig,
    PreparedData,
    build_loaders,
    fit_attributor,
    is_causal,
    load_instruction,
    load_model,
    log_stage,
    model_dir,
    train_model,
)
from .report import write_json

__all__ = ["AttributeConfig", "run_attribute"]


@dataclass
class AttributeConfig(PipelineConfig):
    """Settings of ``attribute`` (``data``, ``n_train``, ``n_val`` and ``flip_rate`` are unused)."""

    reads_own_file: ClassVar[bool] = True

    train: Path | None = None
    """Training file: prompt/response (or messages) for a causal LM, text/label for a classifier."""
    query: Path | None = None
    """Query file, same format as ``train``."""
    top_k: int = 10
    method: str = "hyperinf"
    damping: Damping = "auto"
    per_token: bool = False
    """Also split every kept pair's score over the query's and the training example's tokens (causal LMs)."""
    out: Path = Path("hyperinf-out/attribute")

    @property
    def resolved_epochs(self) -> int:
        return 0 if self.epochs is None else int(self.epochs)  # fine-tune only when asked

    def validate(self) -> None:
        super().validate()
        for option, path in (("--train", self.train), ("--query", self.query)):
            if path is None:
                raise ValueError(f"{option}: a file is required")
            if not Path(path).is_file():
                raise ValueError(f"{option} {path}: file not found")
        if self.top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {self.top_k}")
        self.method = parse_methods([self.method], what="method")[0]
        self.damping = parse_dampings([self.damping])[0]
        if self.per_token:
            check_per_token(is_causal(self), self.model)
        check_query_option_use(self, queries=True, per_token=self.per_token)

    def settings(self) -> dict[str, Any]:
        out = super().settings()
        for unused in ("data", "n_train", "n_val", "flip_rate"):
            out.pop(unused, None)
        out["damping"] = damping_label(self.damping)
        return out


def _load(cfg: AttributeConfig, causal: bool) -> tuple[TextDataset, TextDataset]:
    if causal:
        return load_instruction(cfg.train, cfg), load_instruction(cfg.query, cfg)
    train = load_text_file(cfg.train, cfg.text_column, cfg.label_column)
    query = load_text_file(cfg.query, cfg.text_column, cfg.label_column, min_classes=1)
    if train.label_names != query.label_names:
        # class ids are positions in label_names: both files must name the same classes
        query_names = [query.label_names[y] for y in query.labels]
        unknown = sorted(set(query_names) - set(train.label_names))
        if unknown:
            raise DataError(f"{cfg.query}: label(s) {unknown[:5]} do not occur in {cfg.train}")
        to_id = {n: i for i, n in enumerate(train.label_names)}
        query = TextDataset(query.texts, [to_id[n] for n in query_names], list(train.label_names), rows=query.rows,
                            notes=query.notes)
    return train, query


def _example(ds: TextDataset, i: int, causal: bool) -> dict[str, Any]:
    if causal:
        return {"prompt": ds.texts[i], "response": ds.label_names[ds.labels[i]]}
    return {"text": ds.texts[i], "label": ds.label_names[ds.labels[i]]}


def run_attribute(cfg: AttributeConfig, log: Log = None) -> dict[str, Any]:
    """Write each query's top-k helpful and harmful training examples; returns the summary (as summary.json).

    Raises:
        DataError / ValueError: bad settings or inputs (one-line messages).
    """
    from ..models.training import load_tokenizer

    t_start = time.perf_counter()
    cfg.validate()
    out = prepare_output_dir(cfg.out)
    folder = model_dir(cfg, log)
    causal = is_causal(cfg)
    train, query = _load(cfg, causal)
    log_stage(log, f"data: {len(train)} training and {len(query)} query examples")
    for note in train.notes + query.notes:
        log_stage(log, f"data: {note}")
    data = PreparedData(train, query, list(train.labels), np.zeros(len(train), dtype=bool), str(cfg.train),
                        len(train), causal)
    loaders = build_loaders(cfg, data, load_tokenizer(folder))
    for note in loaders.notes:
        log_stage(log, f"data: {note}")
    model = load_model(cfg, max(train.num_classes, 2))
    plan_gate(cfg, model, loaders, command="attribute", epochs=cfg.resolved_epochs, finetune=loaders.finetune,
              n_queries=len(query), mean=False, top_k=cfg.top_k, cache="disk", log=log)
    trained = train_model(cfg, model, loaders.finetune, loaders.evaluation,
                          log=log, what="fine-tune" if cfg.resolved_epochs else "model")
    # the training gradients wait on disk, so memory holds the model, the queries and O(n_query·k) scores
    attr, fit_seconds = fit_attributor(cfg, trained.model, loaders.influence_train, log=log, cache="disk")
    try:
        t0 = time.perf_counter()
        rule, scale = split_damping(cfg.damping)
        attr.use(cfg.method, damping=rule, **({} if scale is None else {"damping_scale": scale}))
        log_stage(log, f"influence: {cfg.method} scores of {len(query)} queries, top {cfg.top_k} streamed")
        queries = attr.query_gradients(loaders.influence_val, "query gradients")
        # scores(top_k=...) merges every rank's top-k under torchrun (a local TopK would see one shard);
        # all_ranks: every rank goes on to write its (discarded, on ranks > 0) outputs
        kept = attr.scores(queries, top_k=cfg.top_k, all_ranks=True, **cfg.score_options())
        score_seconds = time.perf_counter() - t0
        tokens, token_seconds = None, 0.0
        if cfg.per_token:
            t0 = time.perf_counter()
            log_stage(log, f"per-token: shares of the kept pairs of {len(query)} queries (both sides)")
            tokens = attribute_token_records(attr, loaders.influence_val, loaders.influence_train, kept,
                                             loaders.tokenizer, train, query, mix_queries=cfg.mix_weight(),
                                             mix_with=queries)
            token_seconds = time.perf_counter() - t0
    finally:
        attr.cache.close()

    records = attribution_records(train, query, kept, causal)
    damping = damping_used(cfg.method, cfg.damping)
    paths = {"attribution": str(out / "attribution.jsonl"), "report": str(out / "report.md"),
             "html": str(out / "report.html"), "summary": str(out / "summary.json")}
    if tokens is not None:
        paths["tokens"] = str(out / "tokens.jsonl")
    summary = {
        "task": "attribute", "settings": used_settings(cfg, cfg.method, damping, cfg.score_options()),
        "n_train": len(train), "n_query": len(query), "causal_lm": causal,
        "notes": train.notes + query.notes + loaders.notes,  # tokenizing's too (pad token, truncated prompts)
        "method": cfg.method, "damping": damping, "top_k": cfg.top_k,
        "finetune": {"epochs": cfg.resolved_epochs, "seconds": trained.seconds, "history": trained.history,
                     "query_loss": trained.val["loss"], "query_accuracy": trained.val["accuracy"]},
        "timings": {"fit_seconds": fit_seconds, "score_seconds": score_seconds,
                    **({"per_token_seconds": token_seconds} if tokens is not None else {})},
        "per_token": None if tokens is None else {"pairs": len(tokens), "sides": ["query", "train"],
                                                  "check": shares_note(tokens)},
        "outputs": paths,
    }
    write_attribution_outputs(out, summary, records, tokens, t_start)
    return summary


def write_attribution_outputs(out: Path, summary: dict[str, Any], records: list[dict[str, Any]],
                              tokens: list[dict[str, Any]] | None, t_start: float) -> None:
    """Write an attribution's files into ``out`` all at once (``staged_outputs``: an interrupted run leaves the
    previous outputs whole): attribution.jsonl, report.md, report.html, tokens.jsonl (per-token shares, when
    ``tokens`` is given) and summary.json, whose ``total_seconds`` counts from ``t_start``
    (``time.perf_counter``)."""
    with staged_outputs(out) as stage:
        write_jsonl(stage / "attribution.jsonl", records)
        write_markdown(stage / "report.md", summary, records)
        write_html(stage / "report.html", summary, records, tokens=tokens)
        if tokens is not None:
            write_tokens_jsonl(stage / "tokens.jsonl", tokens)
        summary["total_seconds"] = time.perf_counter() - t_start
        write_json(stage / "summary.json", summary)


def attribution_records(train: TextDataset, query: TextDataset, kept: Any, causal: bool) -> list[dict[str, Any]]:
    """One record per query: its top helpful and harmful training examples (``kept``: a ``TopK`` result).

    Examples are named by their line in their file (``query_line``, ``train_line``; ``TextDataset.rows``),
    never by position: a row the reader skipped would shift every position after it."""
    records = []
    for q in range(len(query)):
        rec: dict[str, Any] = {"query_line": query.row(q), **_example(query, q, causal)}
        # helpful = most negative (up-weighting them lowers the query's loss), harmful = most positive
        for name, values, index in (("helpful", kept.negative_values, kept.negative_index),
                                    ("harmful", kept.positive_values, kept.positive_index)):
            rec[name] = [{"rank": r + 1, "train_line": train.row(int(i)), "score": float(v),
                          **_example(train, int(i), causal)}
                         for r, (v, i) in enumerate(zip(values[q].tolist(), index[q].tolist()))]
        records.append(rec)
    return records


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> None:
    """One JSON object per line (UTF-8, non-ASCII kept)."""
    import json

    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def attribute_table(summary: dict[str, Any]) -> str:
    """What the command line prints: sizes, the notes on the input (rows skipped, by file line), timings and
    where the outputs are.  The notes are printed even with --no-progress: they say what was left out."""
    t = summary["timings"]
    return "\n".join([
        f"attribute: top {summary['top_k']} helpful and harmful of {summary['n_train']} training examples for "
        f"{summary['n_query']} queries ({summary['method']}, damping {summary['damping']})",
        *(f"note: {n}" for n in summary.get("notes", [])),
        f"influence fit {t['fit_seconds']:.1f} s, scoring {t['score_seconds']:.1f} s",
        f"outputs: {', '.join(summary['outputs'].values())}",
    ])
