"""Which part of TrackStar's estimator ranks flipped answers higher on the embedded LLM (issue #25 item 2c).

On the LLM detection study (bench/QUALITY_LLM.md) bergson's TrackStar WITHOUT the query set mixed in (0.861,
the issue's 8 configurations) leads every unmixed GFIM variant of this library (hyperinf "symmetric" 0.809,
"unit" 0.814, spectral × 0.1 raw 0.805): so most of its lead is not the mixing.  What else differs:

* the curvature's SHAPE — the library's GFIM per layer, G = (1/n)·Σ_i g_iᵀg_i (d×d: the r rows of every
  per-example gradient g_i [r, d] pooled as if independent), against the full second moment of the flattened
  gradient, F = (1/n)·Σ_i vec(g_i)·vec(g_i)ᵀ ((r·d)×(r·d): what bergson's "autocorrelation Hessian" is, in
  its projected space);
* the random PROJECTION: bergson projects each module's gradient to k×k = 16×16 on both sides (A·g·Bᵀ with
  Gaussian A [k, r], B [k, d]) before anything else;
* the LOSS: bergson's TrackStar differentiates the SUMMED token loss, ours the mean (a per-example factor T_i,
  the number of answer tokens; it cancels in a cosine except through the curvature's weighting).

This study scores, on the SAME fine-tuned model and per-example gradients as the library (the detection
study's pipeline, float64 from the library's own per-example LoRA gradients), every combination of
curvature ∈ {gfim, full, projected 16 (then full)} × mixing ∈ {none, c = 0.99 (w = 99)} × damping
λ = s × the mean eigenvalue of the matrix inverted, s ∈ {0.1, 1} × scoring ∈ {raw, symmetric} × loss
∈ {mean, summed}, and records the validation-signal ROC-AUC (flipped vs clean; the validation rows' scores
averaged, positive = suspicious).  "gfim" at (s, w, scoring) IS the library's "hyperinf, spectral s[, mixed
99][, symmetric]" in float64: the report checks it against the detection study's record of the same model.
A curvature is inverted exactly: gfim by a d×d solve, full by Woodbury on the n (+ Q) rows that span it.

    python -m bench.trackstar_ablation --only 0,1,2,3     # the detection study's selection configurations
    python -m bench.trackstar_ablation --report-only     # rewrite bench/TRACKSTAR_ABLATION.md

A diagnosis, not a candidate: no rule of bench/defaults_rule.py reads these records.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from bench import records as jsonl

HERE = Path(__file__).resolve().parent
RECORDS = HERE / "trackstar_ablation_runs.jsonl"
REPORT = HERE / "TRACKSTAR_ABLATION.md"
CURVATURES = ("gfim", "full", "projected")
MIXES = (0.0, 99.0)
SCALES = (0.1, 1.0)
SCORINGS = ("raw", "symmetric")
LOSSES = ("mean", "summed")
PROJECTION = 16  # bergson's TrackstarIndexConfig projection_dim
Preconditioner = Callable[[torch.Tensor], torch.Tensor]


def gfim_preconditioner(train: torch.Tensor, query: torch.Tensor, w: float, scale: float) -> Preconditioner:
    """x ↦ x·(G + λI)⁻¹ per row for x [m, r, d], with G = (1/n)Σ g_iᵀg_i + w·(1/Q)Σ q_jᵀq_j [d, d] and
    λ = scale·tr(G)/d (the library's "spectral" rule on the mixed matrix); train [n, r, d], query [Q, r, d]."""
    d = train.shape[-1]
    G = torch.einsum("nri,nrj->ij", train, train) / train.shape[0]
    if w:
        G = G + w * torch.einsum("nri,nrj->ij", query, query) / query.shape[0]
    lam = scale * torch.diagonal(G).sum() / d
    lam = lam if lam > 0 else torch.ones_like(lam)  # an all-zero layer: any λ leaves its zero scores zero
    inv = torch.linalg.inv(G + lam * torch.eye(d, dtype=G.dtype))
    return lambda x: x @ inv


def full_preconditioner(train: torch.Tensor, query: torch.Tensor, w: float, scale: float) -> Preconditioner:
    """x ↦ x·(F + λI)⁻¹ for x [m, D], with F = (1/n)·UᵀU + w·(1/Q)·VᵀV [D, D] (U = train [n, D], V = query
    [Q, D]) and λ = scale·tr(F)/D, by Woodbury on the rows M that span F (F = MᵀM):
    (MᵀM + λI)⁻¹ = (I − Mᵀ(λI + MMᵀ)⁻¹M)/λ."""
    M = train / train.shape[0] ** 0.5
    if w:
        M = torch.cat([M, query * (w / query.shape[0]) ** 0.5])
    D = M.shape[1]
    lam = scale * M.pow(2).sum() / D
    lam = lam if lam > 0 else torch.ones_like(lam)
    inner = torch.linalg.inv(lam * torch.eye(M.shape[0], dtype=M.dtype) + M @ M.T)
    return lambda x: (x - (x @ M.T) @ inner @ M) / lam


def project(g: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """A·g_i·Bᵀ flattened, [m, k·k], for g [m, r, d], A [k, r], B [k, d] (bergson's double-sided projection)."""
    return torch.einsum("kr,mrd,ld->mkl", A, g, B).reshape(g.shape[0], -1)


def layer_scores(train: Mapping[str, torch.Tensor], query: Mapping[str, torch.Tensor], curvature: str, w: float,
                 scale: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed over layers: ⟨q_j·H⁻¹, g_i⟩ [Q, n], ⟨q_j·H⁻¹, q_j⟩ [Q] and ⟨g_i·H⁻¹, g_i⟩ [n] (float64).

    ``train``/``query``: {layer: [n, r, d]} / {layer: [Q, r, d]} per-example gradients, float64."""
    cross = qq = gg = None
    for name in sorted(train):
        g, q = train[name], query[name]
        if curvature == "gfim":
            pre = gfim_preconditioner(g, q, w, scale)
            qh, gh = pre(q).flatten(1), pre(g).flatten(1)
            gf, qf = g.flatten(1), q.flatten(1)
        else:
            if curvature == "projected":
                k = PROJECTION
                # each layer's projection from its own name: the same whatever other layers are scored
                gen = torch.Generator().manual_seed(seed * 2 ** 32 + zlib.crc32(name.encode()))
                A = torch.randn(k, g.shape[1], generator=gen, dtype=g.dtype) / k ** 0.5
                B = torch.randn(k, g.shape[2], generator=gen, dtype=g.dtype) / k ** 0.5
                gf, qf = project(g, A, B), project(q, A, B)
            elif curvature == "full":
                gf, qf = g.flatten(1), q.flatten(1)
            else:
                raise ValueError(f"curvature: expected one of {CURVATURES}, got {curvature!r}")
            pre = full_preconditioner(gf, qf, w, scale)
            qh, gh = pre(qf), pre(gf)
        c, a, b = qh @ gf.T, (qh * qf).sum(1), (gh * gf).sum(1)
        cross, qq, gg = (c, a, b) if cross is None else (cross + c, qq + a, gg + b)
    return cross, qq, gg


def validation_signal(cross: torch.Tensor, qq: torch.Tensor, gg: torch.Tensor, scoring: str) -> np.ndarray:
    """[n]: the mean over queries of −⟨q·H⁻¹, g⟩ ("raw") or of its cosine in the H⁻¹ inner product
    ("symmetric"); positive = up-weighting the example raises the validation loss (suspicious)."""
    s = -cross
    if scoring == "symmetric":
        s = s / (qq.clamp_min(0).sqrt()[:, None] * gg.clamp_min(0).sqrt()[None, :]).clamp_min(1e-300)
    elif scoring != "raw":
        raise ValueError(f"scoring: expected one of {SCORINGS}, got {scoring!r}")
    return s.mean(0).numpy()


def label(curvature: str, w: float, scale: float, scoring: str, loss: str) -> str:
    parts = [curvature, f"spectral {scale:g}"] + ([f"mixed {w:g}"] if w else []) + \
        ([scoring] if scoring != "raw" else []) + ([f"{loss} loss"] if loss != "mean" else [])
    return ", ".join(parts)


def _ordered(batches, n: int) -> dict[str, torch.Tensor]:
    """{layer: [n, r, d]} float64 in example order from (index [B], {layer: [B, r, d]}) batches."""
    out: dict[str, torch.Tensor] = {}
    for index, grads in batches:
        for k, v in grads.items():
            if k not in out:
                out[k] = torch.zeros(n, *v.shape[1:], dtype=torch.float64)
            out[k][index.long()] = v.double()
    return out


def answer_tokens(encodings) -> torch.Tensor:
    """[m]: the number of labelled (answer) tokens per encoded example (the summed loss's factor)."""
    return torch.tensor([sum(1 for t in e["labels"] if t != -100) for e in encodings], dtype=torch.float64)


def score_config(train: Mapping[str, torch.Tensor], query: Mapping[str, torch.Tensor], t_train: torch.Tensor,
                 t_query: torch.Tensor, flipped: np.ndarray) -> dict[str, dict]:
    """Every combination's validation-signal metrics (bench/variants.detection_metrics)."""
    from bench.variants import detection_metrics

    out: dict[str, dict] = {}
    for loss in LOSSES:
        if loss == "summed":  # the summed loss's gradient is T_i times the mean loss's
            tr = {k: v * t_train.reshape(-1, 1, 1) for k, v in train.items()}
            qu = {k: v * t_query.reshape(-1, 1, 1) for k, v in query.items()}
        else:
            tr, qu = train, query
        for curvature, w, scale in itertools.product(CURVATURES, MIXES, SCALES):
            t0 = time.perf_counter()
            cross, qq, gg = layer_scores(tr, qu, curvature, w, scale)
            for scoring in SCORINGS:
                out[label(curvature, w, scale, scoring, loss)] = detection_metrics(
                    validation_signal(cross, qq, gg, scoring), flipped, time.perf_counter() - t0)
    return out


def run_config(cfg) -> dict:
    """Train the detection study's configuration ``cfg`` (bench/quality_llm.py) and score every combination."""
    from bench.quality_llm import pipeline_config
    from hyperinf_ext.app.data.instruction import encode_instructions
    from hyperinf_ext.app.tasks.pipeline import fit_and_query

    t0 = time.perf_counter()
    run = fit_and_query(pipeline_config(cfg))
    try:
        n, flipped = len(run.data.train), np.asarray(run.data.flipped, dtype=bool)
        train = _ordered(iter(run.attr.cache), n)
        query = _ordered([(run.queries.index, run.queries.grads)], len(run.data.val))
        t_train = answer_tokens(run.loaders.train_encodings)
        t_query = answer_tokens(encode_instructions(run.data.val, run.loaders.tokenizer, cfg.max_length).encodings)
        results = score_config(train, query, t_train, t_query, flipped)
    finally:
        run.release()
    return {"config": asdict(cfg), "val_accuracy": float(run.trained.val["accuracy"]),
            "answer_tokens": [float(t_train.min()), float(t_train.max())], "results": results,
            "seconds": time.perf_counter() - t0}


def load_records(path: Path = RECORDS) -> list[dict]:
    return jsonl.load(path)


def report(records: list[dict], library: list[dict]) -> str:
    """The Markdown report: per combination the mean ± sd AUC over the configurations, and the check of
    "gfim" against the detection study's records of the same models (``library``: its merged records)."""
    lib = {json.dumps(r["config"], sort_keys=True): r["results"] for r in library}
    labels = list(records[0]["results"]) if records else []
    lines = ["# Which part of TrackStar's estimator matters on the LLM detection study (issue #25 item 2c)", "",
             "Generated by `python -m bench.trackstar_ablation` (bench/trackstar_ablation.py says what each "
             "combination is); every number is measured on the detection study's own models "
             "(bench/quality_llm.py configurations, the library's per-example LoRA gradients in float64). "
             "A diagnosis: no rule reads it.", "",
             "| configuration (seed, flip, rank) | val acc | answer tokens (min–max) |", "|---|---|---|"]
    for r in records:
        c = r["config"]
        lines.append(f"| {c['seed']}, {c['flip']:g}, {c['rank']} | {r['val_accuracy']:.3f} | "
                     f"{r['answer_tokens'][0]:g}–{r['answer_tokens'][1]:g} |")
    summed = [l for l in labels if l.endswith(", summed loss")]
    same = all(r["results"][l]["auc"] == r["results"][l[: -len(", summed loss")]]["auc"] for r in records for l in summed)
    if summed and same:  # every answer has the same token count: the summed loss only rescales every gradient
        labels = [l for l in labels if l not in summed]
    lines += ["", f"## Validation-signal ROC-AUC, mean ± sd over {len(records)} configurations", ""]
    if summed and same:
        lines += ["The summed loss ranks exactly as the mean loss on every configuration (the same AUC for every "
                  "combination): each answer has the same number of tokens, so the factor T_i is one constant. "
                  "Its rows are left out.", ""]
    lines += ["| combination | ROC-AUC | top 10% |", "|---|---|---|"]
    for l in labels:
        aucs = [r["results"][l]["auc"] for r in records]
        top = [r["results"][l]["top10"] for r in records]
        sd = f" ± {statistics.stdev(aucs):.3f}" if len(aucs) > 1 else ""
        lines.append(f"| {l} | {statistics.mean(aucs):.3f}{sd} | {statistics.mean(top):.3f} |")
    checks = [("gfim, spectral 0.1", "hyperinf, spectral 0.1"), ("gfim, spectral 1", "hyperinf, spectral 1"),
              ("gfim, spectral 1, symmetric", "hyperinf, spectral 1, symmetric"),
              ("gfim, spectral 0.1, mixed 99", "hyperinf, spectral 0.1, mixed 99"),
              ("gfim, spectral 0.1, mixed 99, symmetric", "hyperinf, spectral 0.1, mixed 99, symmetric"),
              ("projected, spectral 0.1, mixed 99, symmetric, summed loss", "bergson TrackStar"),
              ("projected, spectral 0.1, symmetric, summed loss", "bergson TrackStar, no mixing")]
    lines += ["", "## Against the detection study's records of the same models", "",
              "The library's settings in float64 here against the study's float32 records (the same AUC up to "
              "rounding), and the TrackStar emulation against bergson's (another random projection, bergson's "
              "own mixing: close, not equal).", "",
              "| here | recorded as | AUC here | AUC recorded | configurations |", "|---|---|---|---|---|"]
    for here, rec in checks:
        pairs = [(r["results"][here]["auc"], lib[k][rec]["auc"]) for r in records
                 if here in r["results"] and (k := json.dumps(r["config"], sort_keys=True)) in lib
                 and "auc" in lib[k].get(rec, {})]
        if pairs:
            lines.append(f"| {here} | {rec} | {statistics.mean(p[0] for p in pairs):.3f} | "
                         f"{statistics.mean(p[1] for p in pairs):.3f} | {len(pairs)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from bench.quality_llm import HERE as QHERE, grid, load_runs

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="0,1,2,3", help="grid indices of bench/quality_llm.py (default: selection)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.report_only:
        done = {json.dumps(r["config"], sort_keys=True) for r in load_records()}
        configs = grid()
        for i in [int(x) for x in args.only.split(",") if x.strip()]:
            cfg = configs[i]
            if json.dumps(asdict(cfg), sort_keys=True) in done:
                continue
            print(f"[trackstar_ablation] {cfg}", flush=True)
            rec = run_config(cfg)
            jsonl.append(RECORDS, rec)
    REPORT.write_text(report(load_records(), load_runs(QHERE / "quality_llm_runs.jsonl")))
    print(f"[trackstar_ablation] wrote {REPORT}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
