"""Detection quality on the embedded causal LM, with the external peers (issue #25 items 1, 3 and 4).

Per configuration (seed, flip rate, training size, LoRA rank): SmolLM2-135M-Instruct + LoRA (r, alpha 2r, on
q_proj/v_proj) fine-tuned through the library's own pipeline (hyperinf_ext.app.tasks.pipeline: Rotten
Tomatoes reviews as sentiment instructions in the chat template, the answer a fraction of the training rows
flipped, AdamW 3e-4, 3 epochs, max length 128), the validation rows clean; then, on that ONE model:

* every hyperinf / peer setting of the LLM LDS study (bench/lds.py ``LLM_LABELS``' library part) and the
  query-side variants of bench/variants.py, scored on the mean validation loss (``mean_scores``, positive =
  up-weighting raises the validation loss = suspicious): the VALIDATION signal;
* the same settings' self-influence (``self_scores``, no validation set; under labels "self: <label>");
  a variant keeps only its ``normalize`` there (bench/variants.py ``self_options``);
* bergson 2.5.1's TrackStar (mixed, unmixed) and EK-FAC, and Kronfluence 1.0.1's EK-FAC on its damping grid,
  on the same adapter and encodings (bench/lds_bergson.py, bench/lds_ekfac.py): their [Q, n_train] scores
  averaged over the validation rows (our sign), the validation signal only;

and records, per signal, the ROC-AUC of flipped vs clean rows and the fraction of flipped rows in the top
10% / 20%.  One JSON line per configuration and part ("library", "bergson", "kronfluence"), appended as
soon as the part is scored: an interrupted run resumes at the first part missing (retraining the model,
which is deterministic given the configuration).

    PYTHONPATH=/tmp/kfsite:/tmp/bgsite HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python -m bench.quality_llm
                                        # the 10 configurations, selection seeds first -> bench/quality_llm_runs.jsonl
    python -m bench.quality_llm --only 1,2,3 --parts library      # the library's settings only (a rerun adds the peers)
    python -m bench.quality_llm --report-only          # rewrite bench/QUALITY_LLM.md from the records
    python -m bench.quality_llm --smoke                # a tiny run (24 train / 8 val, 1 epoch) -> /tmp

The grid follows the classifier's (bench/quality.py): three seeds at 20% flips, flip rates 10% and 30%, ranks
4 and 16, and a fourth seed: the issue's 8 configurations.  bench/defaults_rule.py reads the configurations of
seeds 0–1 (selection) and reports on seeds 2–3; amendment 4 added two fresh reporting configurations (seeds 4
and 5, 20% flips, rank 8; ``FRESH_SEEDS``), grid indices 8 and 9, recorded after the amendment was committed:
the settings chosen after seeds 2–3 were looked at are reported on them.  Times are in each record
(``seconds`` per part and setting).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from bench import variants
from bench.records import append as append_record, load as load_records

HERE = Path(__file__).resolve().parent
PARTS = ("library", "bergson", "kronfluence")
SELF, COMBINED = variants.SELF, variants.COMBINED


@dataclass(frozen=True)
class LlmRunConfig:
    seed: int = 0
    flip: float = 0.2
    n_train: int = 200
    n_val: int = 40
    rank: int = 8
    epochs: int = 3
    max_length: int = 128

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


# the fresh reporting configurations' seeds (amendment 4 of bench/defaults_rule.py)
FRESH_SEEDS: tuple[int, ...] = (4, 5)
ISSUE_SEEDS = frozenset({0, 1, 2, 3})  # the issue's 8-configuration grid


def grid(smoke: bool = False) -> list[LlmRunConfig]:
    """The study's configurations: the issue's 8 (the selection seeds' (0, 1) first), then the fresh ones."""
    if smoke:
        return [LlmRunConfig(seed=0, n_train=24, n_val=8, epochs=1, max_length=64)]
    return [LlmRunConfig(seed=0), LlmRunConfig(seed=1), LlmRunConfig(seed=0, flip=0.1), LlmRunConfig(seed=1, flip=0.3),
            LlmRunConfig(seed=2), LlmRunConfig(seed=3), LlmRunConfig(seed=2, rank=4), LlmRunConfig(seed=3, rank=16)] + [
        LlmRunConfig(seed=s) for s in FRESH_SEEDS]


def library_candidates() -> list[tuple[str, str, str, dict]]:
    """(label, method, damping, options) of every library setting scored: the LLM LDS study's and the variants."""
    from bench.lds import CANDIDATES, LLM_LABELS, VARIANT_CANDIDATES

    rows = [(l, m, d, {}) for l, m, d in CANDIDATES if l in LLM_LABELS]
    return rows + [(l, m, d, dict(variants.OPTIONS[l])) for l, m, d in VARIANT_CANDIDATES]


def settings_table() -> dict[str, Any]:
    """{label: bench.defaults_rule.Setting} of the library candidates, damping resolved as the LDS records
    hold it: the table bench/defaults_rule.py reads this study's records with (self signal: "self: " + label)."""
    from bench.defaults_rule import Setting, options_of
    from hyperinf_ext.curvature.methods import resolve, split_damping

    out: dict[str, Any] = {}
    for label, method, damping, options in library_candidates():
        if method == "tracin":
            out[label] = Setting("tracin")
            continue
        rule, scale = resolve(method, *split_damping(damping))
        out[label] = Setting(method, rule, float(scale), options_of(options))
    return out


def peer_table() -> dict[str, Any]:
    """{label: Setting} of the external peers this study records (bergson's three, Kronfluence's grid)."""
    from bench.defaults_rule import Setting
    from bench.lds import EKFAC_SCALES
    from bench.lds_bergson import LABELS as BERGSON

    return {**{l: Setting(l) for l in BERGSON},
            **{l: Setting("ekfac", "kronfluence heuristic", float(s)) for l, s in EKFAC_SCALES.items()}}


def pipeline_config(cfg: LlmRunConfig, progress: bool = False) -> Any:
    from hyperinf_ext.app.tasks.pipeline import PipelineConfig

    return PipelineConfig(n_train=cfg.n_train, n_val=cfg.n_val, flip_rate=cfg.flip, rank=cfg.rank, alpha=2 * cfg.rank,
                          epochs=cfg.epochs, max_length=cfg.max_length, seed=cfg.seed, progress=progress,
                          model="smollm2")


_metrics = variants.detection_metrics


def _library_part(run: Any, flipped: np.ndarray, labels: set[str] | None = None) -> dict[str, dict]:
    """Validation and self signal of every library candidate (or of the validation ``labels`` only, with their
    self and combined signals), from the run's one fit.  A combined signal whose self ingredient is not among
    them (a mixed-only variant takes its damping's) computes that ingredient without recording it."""
    from hyperinf_ext.curvature.methods import split_damping

    cands = library_candidates()
    want = {c[0] for c in cands} if labels is None else set(labels)
    need = {SELF + variants.base_label(variants.SCALES[l]) for l in want if l in variants.SCALES}
    attr, queries, out, raw = run.attr, run.queries, {}, {}
    for label, method, damping, options in cands:
        jobs = [(k, call) for k, call in variants.signal_jobs(attr, queries, label, options)
                if label in want or k in need]
        if not jobs:
            continue
        rule, scale = split_damping(damping)
        attr.use(method, damping=rule, **({} if scale is None else {"damping_scale": scale}))
        for key, call in jobs:
            t0 = time.perf_counter()
            try:
                raw[key] = call().detach().cpu().double().numpy()
                if label in want:
                    out[key] = _metrics(raw[key], flipped, time.perf_counter() - t0)
            except (ValueError, ArithmeticError, RuntimeError) as exc:
                if label in want:
                    out[key] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    for key, scores in variants.combined_signals(raw).items():
        if key[len(COMBINED):] in want:
            out[key] = _metrics(scores, flipped, 0.0)
    return out


def missing_library_labels(run_record: dict | None) -> list[str]:
    """The library candidates' validation labels a configuration's merged record lacks (all when None), or
    whose combined signal it lacks although the self signal that goes with it was scored (a variant's
    combined signal added by amendment 4): a rerun of its library part scores those."""
    if run_record is None:
        return [c[0] for c in library_candidates()]
    results = run_record["results"]
    have = {k for k, v in results.items() if "error" not in v}
    return [c[0] for c in library_candidates() if c[0] not in results
            or (c[0] in have and COMBINED + c[0] not in results and variants.self_source(c[0], have) is not None)]


def _peer_part(part: str, run: Any, cfg: LlmRunConfig, flipped: np.ndarray) -> dict[str, dict]:
    """bergson's three score sets or Kronfluence's EK-FAC grid, averaged over the validation rows."""
    from bench.lds import EKFAC_SCALES
    from hyperinf_ext.app.data.instruction import encode_instructions
    from hyperinf_ext.app.tasks.pipeline_data import CAUSAL_FIT_BATCH_SIZE

    tok = run.loaders.tokenizer
    train_enc = run.loaders.train_encodings
    val_enc = encode_instructions(run.data.val, tok, cfg.max_length).encodings
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix=f"quality_llm_{part}_", dir="/tmp") as workdir:
        if part == "bergson":
            from bench.lds_bergson import LABELS, bergson_score_sets

            t0 = time.perf_counter()
            for label, s, extra in bergson_score_sets(run.trained.model, tok, train_enc, val_enc, workdir, LABELS):
                seconds = float(extra.get("seconds", time.perf_counter() - t0))
                out[label] = ({"error": extra.get("error", "failed")} if s is None
                              else _metrics(np.asarray(s).mean(axis=0), flipped, seconds))
                t0 = time.perf_counter()
        else:
            from bench.lds_ekfac import ekfac_causal_pairwise_grid

            labels = {v: k for k, v in EKFAC_SCALES.items()}
            for scale, s, seconds in ekfac_causal_pairwise_grid(run.trained.model, tok, train_enc, val_enc, workdir,
                                                                sorted(labels), max_length=cfg.max_length,
                                                                batch_size=CAUSAL_FIT_BATCH_SIZE):
                out[labels[scale]] = _metrics(s.double().numpy().mean(axis=0), flipped, seconds)
    return out


def available_parts() -> list[str]:
    import importlib.util

    from bench.lds_bergson import have_bergson

    return ["library"] + (["bergson"] if have_bergson() else []) + \
        (["kronfluence"] if importlib.util.find_spec("kronfluence") is not None else [])


def run_config(cfg: LlmRunConfig, parts: list[str], progress: bool = False,
               library_labels: list[str] | None = None) -> Iterator[dict]:
    """Train the configuration's model once and yield one record per part of ``parts`` (library first: the
    peers save or wrap the model afterwards); ``library_labels``: the library part scores only these
    validation labels (and their self and combined signals)."""
    from hyperinf_ext.app.tasks.pipeline import fit_and_query

    t0 = time.perf_counter()
    run = fit_and_query(pipeline_config(cfg, progress))
    base = {"config": asdict(cfg), "val_accuracy": float(run.trained.val["accuracy"]),
            "train_seconds": run.trained.seconds, "fit_seconds": run.fit_seconds,
            "n_flipped": int(run.data.flipped.sum())}
    flipped = np.asarray(run.data.flipped, dtype=bool)
    try:
        for part in [p for p in PARTS if p in parts]:
            t1 = time.perf_counter()
            results = (_library_part(run, flipped, None if library_labels is None else set(library_labels))
                       if part == "library" else _peer_part(part, run, cfg, flipped))
            yield {**base, "part": part, "results": results, "part_seconds": time.perf_counter() - t1,
                   "wall_seconds": time.perf_counter() - t0}
    finally:
        run.release()


def load_runs(path: Path) -> list[dict]:
    """One merged record per configuration: the parts' results together (later parts add labels)."""
    merged: dict[str, dict] = {}
    for r in load_records(path):
        k = json.dumps(r["config"], sort_keys=True)
        m = merged.setdefault(k, {**r, "results": {}, "parts": []})
        m["results"].update(r["results"])
        m["parts"].append(r["part"])
    return list(merged.values())


def _auc(r: dict, label: str) -> float | None:
    v = r["results"].get(label)
    return None if v is None or "auc" not in v else v["auc"]


def report(runs: list[dict], command: str) -> str:
    from bench.lds import EKFAC_SCALES
    from bench.lds_bergson import LABELS as BERGSON

    lib = [c[0] for c in library_candidates()]
    labels = lib + list(BERGSON) + list(EKFAC_SCALES)
    self_labels = [SELF + l for l in lib if any(SELF + l in r["results"] for r in runs)]
    lines = ["# Detection quality on the embedded LLM (issue #25)", "",
             f"Generated by `{command}` from `bench/quality_llm_runs.jsonl`; every number is measured. Protocol: "
             "bench/quality_llm.py's docstring (SmolLM2-135M-Instruct + LoRA, flipped answers, one model per "
             "configuration scored by every system). Seeds 0–1 select (bench/defaults_rule.py), seeds 2–3 report; "
             "seeds 4–5 are the fresh reporting configurations of amendment 4.", ""]
    if not runs:
        return "\n".join(lines + ["No configuration measured yet.", ""])
    lines += ["## Configurations", "", "| seed | flip | n | rank | val acc | parts | minutes |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        c = r["config"]
        lines.append(f"| {c['seed']} | {c['flip']} | {c['n_train']} | {c['rank']} | {r['val_accuracy']:.3f} | "
                     f"{', '.join(r['parts'])} | {r['wall_seconds'] / 60:.0f} |")
    lines.append("")
    sections = (("Selection configurations (seeds 0–1)", {0, 1}), ("Reporting configurations (seeds 2–3)", {2, 3}),
                ("Fresh reporting configurations (seeds 4–5, amendment 4)", set(FRESH_SEEDS)),
                ("The issue's 8 configurations (seeds 0–3; selection ones included, so the issue's target, "
                 "not a clean report)", set(ISSUE_SEEDS)))
    for title, seeds in sections:
        sub = [r for r in runs if r["config"]["seed"] in seeds]
        if not sub:
            lines += [f"## {title}", "", "Not measured yet.", ""]
            continue
        lines += [f"## {title}: ROC-AUC of flipped vs clean, mean ± sd over {len(sub)} configurations", "",
                  "| setting | validation signal | n | self-influence | combined (ranks averaged) | top 10% (validation) |",
                  "|---|---|---|---|---|---|"]
        for l in labels:
            v = [a for a in (_auc(r, l) for r in sub) if a is not None]
            sv = [a for a in (_auc(r, SELF + l) for r in sub) if a is not None] if SELF + l in self_labels else []
            cv = [a for a in (_auc(r, COMBINED + l) for r in sub) if a is not None]
            t10 = [r["results"][l]["top10"] for r in sub if _auc(r, l) is not None]
            if not v and not sv:
                continue
            lines.append(f"| {l} | {_ms(v)} | {len(v)} | {_ms(sv)} | {_ms(cv)} | {_ms(t10)} |")
        lines.append("")
    lines += ["## Machine", "", f"- {platform.processor() or platform.machine()}, torch threads as run, Python "
              f"{platform.python_version()}", ""]
    return "\n".join(lines)


def _ms(xs: list[float]) -> str:
    if not xs:
        return "—"
    return f"{xs[0]:.3f}" if len(xs) == 1 else f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality_llm", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="one tiny configuration -> /tmp")
    p.add_argument("--runs", type=Path, default=None, help="default bench/quality_llm_runs.jsonl")
    p.add_argument("--out", type=Path, default=None, help="default bench/QUALITY_LLM.md")
    p.add_argument("--only", default=None, help="comma list of configuration indices of the grid to run")
    p.add_argument("--parts", default=None,
                   help="comma list of library, bergson, kronfluence: score only these (default: every one installed)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    tmp = Path("/tmp")
    runs = args.runs or (tmp / "quality_llm_smoke.jsonl" if args.smoke else HERE / "quality_llm_runs.jsonl")
    out = args.out or (tmp / "QUALITY_LLM_smoke.md" if args.smoke else HERE / "QUALITY_LLM.md")
    if not args.report_only:
        import torch

        torch.set_num_threads(args.threads)
        parts = available_parts()
        if args.parts:
            wanted = args.parts.split(",")
            unknown = [x for x in wanted if x not in PARTS]
            if unknown:
                p.error(f"--parts: unknown {unknown} (known: {', '.join(PARTS)})")
            parts = [x for x in parts if x in wanted]
        todo = grid(args.smoke)
        if args.only:
            todo = [todo[int(i)] for i in args.only.split(",")]
        for cfg in todo:
            record = next((r for r in load_runs(runs) if r["config"] == asdict(cfg)), None)
            done = set(record["parts"]) if record else set()
            labels = None
            if "library" in done and (labels := missing_library_labels(record)):
                done.discard("library")  # candidates added since: the rerun scores those alone
            missing = [p for p in parts if p not in done]
            if not missing:
                continue
            what = ", ".join(missing) + (f" (library: {len(labels)} new labels)" if labels else "")
            print(f"[quality_llm] {cfg}: {what}", flush=True)
            for rec in run_config(cfg, missing, args.progress, labels or None):
                append_record(runs, rec)
                print(f"[quality_llm] {cfg.seed}/{cfg.flip}/{cfg.rank}: {rec['part']} recorded "
                      f"({rec['part_seconds']:.0f} s)", flush=True)
    cmd = "python -m bench.quality_llm" + (" --smoke" if args.smoke else "")
    out.write_text(report(load_runs(runs), cmd))
    print(f"[quality_llm] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
