"""Data selection against random subsets of the same size (issue #16, "Data selection that beats random").

Per seed: fine-tune the embedded default (all-MiniLM-L6-v2 + LoRA, Rotten Tomatoes, no flipped labels;
AdamW 3e-4, batch 16, max length 64, 5 epochs — the setting the issue measured with ``select-data
--n-train 1000 --n-val 200 --epochs 5``) on the full training set, fit HyperINF once and score with the
library's default (``method="hyperinf"``, ``damping="auto"``) every training example against every
validation query ([Q, n_train]; the mean over queries is the mean-validation-loss score).  Every rule of
``hyperinf_ext.app.tasks.selection_rules.RULES`` then keeps k = fraction·n examples for each fraction of
``FRACTIONS``, and a random subset of the same k (``random_subset(n, k, [seed, k])``) is the baseline.
Each kept set trains a fresh LoRA from the same initial adapter with the same recipe and seed, and its
validation loss and accuracy are recorded.  The validation set is the one the scores were computed on
(as ``select-data --evaluate``): selection targets it, as in LESS.

Time: 3 fractions × (4 rules + random) = 15 fine-tunes per seed of 200/500/800 examples × 5 epochs, at
about 23 s per 1,000 examples per epoch: 5 × 1,500 × 5 × 23 ms ≈ 14 min, plus the full model (2 min) and
the scores: about 17 min per seed on an idle AMD 2-core machine (1.5–1.7× on the Intel ones); 3 seeds
≈ 50 min.

    python -m bench.selection               # seeds 0, 1, 2, resumable -> bench/selection_runs.jsonl, SELECTION.md
    python -m bench.selection --smoke       # 64 train, 16 val, 1 epoch, one seed -> /tmp, about 2 min
    python -m bench.selection --report-only

Records (JSON lines): ``{"kind": "selections", "config", "selections": {rule: {k: [indices]}}, ...}`` once
per seed (so a resumed run trains exactly the sets it would have), and ``{"kind": "trained", "config",
"rule", "fraction", "k", "val_loss", "val_accuracy", "class_counts", ...}`` per fine-tuned subset.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from bench.lds import LdsConfig
from bench.records import append as append_record, load as load_records
from hyperinf_ext.app.tasks.selection_rules import DEFAULT_RULE, RULES, random_subset, select

HERE = Path(__file__).resolve().parent
FRACTIONS = (0.2, 0.5, 0.8)
RANDOM = "random"


class SelectionExperiment(Protocol):
    def scores(self) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """(query_scores [Q, n_train], training labels [n_train], extra fields) from the full-data model."""

    def train_eval(self, members: np.ndarray) -> dict[str, float]:
        """Fresh model trained on ``members``: {"val_loss", "val_accuracy"}."""


def budget(n: int, fraction: float) -> int:
    return max(1, int(round(fraction * n)))


def selections(query_scores: np.ndarray, labels: np.ndarray, fractions: Sequence[float], seed: int,
               rules: Sequence[str]) -> dict[str, dict[str, list[int]]]:
    """{rule: {str(k): indices}} for every rule and budget, plus the random baseline."""
    n = query_scores.shape[1]
    out: dict[str, dict[str, list[int]]] = {}
    for rule in [*rules, RANDOM]:
        out[rule] = {}
        for f in fractions:
            k = budget(n, f)
            idx = (random_subset(n, k, [seed, k]) if rule == RANDOM else
                   select(rule, k, query_scores=query_scores, labels=labels, seed=seed))
            out[rule][str(k)] = [int(i) for i in idx]
    return out


def run(exp: SelectionExperiment, cfg: LdsConfig, runs: Path, fractions: Sequence[float],
        rules: Sequence[str] = tuple(RULES), log: Callable[[str], None] = print) -> None:
    """Compute (once) the selections of ``cfg``'s seed, then train every kept set not yet recorded."""
    key = json.loads(cfg.key())
    mine = [r for r in load_records(runs) if r["config"] == key]
    sel = next((r for r in mine if r["kind"] == "selections"), None)
    if sel is None:
        qs, labels, extra = exp.scores()
        sel = {"kind": "selections", "config": key, "labels": [int(y) for y in labels],
               "selections": selections(qs, np.asarray(labels), fractions, cfg.seed, rules), **extra}
        append_record(runs, sel)
    done = {(r["rule"], r["k"]) for r in mine if r["kind"] == "trained"}
    labels = np.asarray(sel["labels"])
    for f in fractions:
        k = budget(len(labels), f)
        for rule in [*rules, RANDOM]:
            if (rule, k) in done or str(k) not in sel["selections"].get(rule, {}):
                continue
            idx = np.asarray(sel["selections"][rule][str(k)])
            t0 = time.perf_counter()
            res = exp.train_eval(idx)
            rec = {"kind": "trained", "config": key, "rule": rule, "fraction": f, "k": k,
                   "val_loss": float(res["val_loss"]), "val_accuracy": float(res["val_accuracy"]),
                   "class_counts": np.bincount(labels[idx], minlength=int(labels.max()) + 1).tolist(),
                   "seconds": time.perf_counter() - t0}
            append_record(runs, rec)
            log(f"[selection] seed {cfg.seed} {rule} k={k}: val loss {rec['val_loss']:.4f}, "
                f"acc {rec['val_accuracy']:.3f}, classes {rec['class_counts']}")


class MiniLMSelection:
    """The embedded default through bench.lds.PipelineExperiment (same data, recipe and initial adapter)."""

    def __init__(self, cfg: LdsConfig, progress: bool = False):
        from bench.lds import PipelineExperiment

        self.exp = PipelineExperiment(cfg, progress=progress, ekfac=False)

    def scores(self) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        from hyperinf_ext.curvature.methods import METHOD_DEFAULTS
        from hyperinf_ext.app.tasks.pipeline import fit_attributor, validation_gradients

        trained = self.exp.train(None)
        attr, _ = fit_attributor(self.exp.pcfg, trained.model, self.exp.loaders.influence_train)
        try:
            queries, _ = validation_gradients(attr, self.exp.loaders.influence_val)
            qs = attr.use("hyperinf", damping="auto").scores(queries).detach().cpu().double().numpy()
        finally:
            attr.cache.close()
        rule, scale = METHOD_DEFAULTS["hyperinf"]
        return qs, np.asarray(self.exp.data.train.labels), {
            "method": "hyperinf", "damping": [rule, scale], "full_val_accuracy": trained.val["accuracy"],
            "full_val_loss": trained.val["loss"], "n_queries": int(qs.shape[0])}

    def train_eval(self, members: np.ndarray) -> dict[str, float]:
        trained = self.exp.train(np.sort(members))
        return {"val_loss": trained.val["loss"], "val_accuracy": trained.val["accuracy"]}


# ------------------------------------------------------------------------------ report


def _ms(xs: list[float]) -> str:
    return f"{xs[0]:.3f}" if len(xs) == 1 else f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def _damping(d: list | None) -> str:
    return "—" if not d else f"{d[0]} × {d[1]:g}"


def paired(records: list[dict], rule: str, k: int) -> list[tuple[float, float]]:
    """(loss − random's loss, accuracy − random's accuracy) per seed that has both."""
    by = {(json.dumps(r["config"], sort_keys=True), r["rule"], r["k"]): r for r in records if r["kind"] == "trained"}
    out = []
    for (cfg, rl, kk), r in by.items():
        base = by.get((cfg, RANDOM, kk))
        if rl == rule and kk == k and base is not None:
            out.append((r["val_loss"] - base["val_loss"], r["val_accuracy"] - base["val_accuracy"]))
    return out


def best_rule(records: list[dict], rules: Sequence[str]) -> tuple[str | None, dict[str, tuple[int, int, float]]]:
    """The rule that beats random most reliably: most (seed, fraction) pairs with a lower validation loss,
    ties broken by the mean loss difference.  Returns it (None without data) and {rule: (wins, n, mean)}."""
    ks = sorted({r["k"] for r in records if r["kind"] == "trained"})
    stats = {}
    for rule in rules:
        d = [x[0] for k in ks for x in paired(records, rule, k)]
        if d:
            stats[rule] = (sum(v < 0 for v in d), len(d), statistics.mean(d))
    if not stats:
        return None, stats
    return min(stats, key=lambda r: (-stats[r][0] / stats[r][1], stats[r][2])), stats


def report(records: list[dict], command: str, rules: Sequence[str] = tuple(RULES)) -> str:
    trained = [r for r in records if r["kind"] == "trained"]
    seeds = sorted({r["config"]["seed"] for r in trained})
    sels = [r for r in records if r["kind"] == "selections"]
    lines = ["# Data selection vs random subsets of the same size", "",
             f"Generated by `{command}` from its JSON-lines records by bench/selection.py; every number is "
             "measured. Protocol: see bench/selection.py.", ""]
    if sels:
        c = sels[0]["config"]
        lines += [f"Setting: {c['n_train']} training / {c['n_val']} validation examples, {c['epochs']} epochs, "
                  f"rank {c['rank']}; scores: {sels[0].get('method')}, damping {_damping(sels[0].get('damping'))}; seeds "
                  f"{', '.join(map(str, seeds))}; full-data model validation accuracy "
                  + ", ".join(f"{r.get('full_val_accuracy', float('nan')):.3f}" for r in sels) + ".", ""]
    lines += ["## Validation loss and accuracy (mean ± sd over seeds)", "",
              "| fraction | k | rule | val loss | val acc | loss − random | acc − random | lower loss than random |",
              "|---|---|---|---|---|---|---|---|"]
    ks = sorted({(r["fraction"], r["k"]) for r in trained})
    for f, k in ks:
        for rule in [*rules, RANDOM]:
            rs = [r for r in trained if r["rule"] == rule and r["k"] == k]
            if not rs:
                continue
            d = paired(records, rule, k)
            diff = (f"{_ms([x[0] for x in d])} | {_ms([x[1] for x in d])} | {sum(x[0] < 0 for x in d)}/{len(d)}"
                    if d and rule != RANDOM else "— | — | —")
            lines.append(f"| {f} | {k} | {rule} | {_ms([r['val_loss'] for r in rs])} | "
                         f"{_ms([r['val_accuracy'] for r in rs])} | {diff} |")
    lines.append("")
    best, stats = best_rule(records, rules)
    if best is not None:
        lines += ["## Which rule beats random", "", "| rule | (seed, fraction) pairs with lower loss | mean loss − random |",
                  "|---|---|---|"]
        lines += [f"| {r} | {w}/{n} | {m:+.4f} |" for r, (w, n, m) in stats.items()]
        every = all(statistics.mean([x[0] for x in paired(records, best, k)] or [0.0]) < 0 for _, k in ks)
        lines += ["", f"Most reliable: **{best}** ({stats[best][0]}/{stats[best][1]} pairs); it beats random on "
                  f"average over seeds at {'every' if every else 'NOT every'} fraction. "
                  f"select-data's default rule today: `{DEFAULT_RULE}`.", ""]
        for f, k in ks:
            if not any(statistics.mean([x[0] for x in paired(records, r, k)] or [0.0]) < 0 for r in rules):
                lines.append(f"- fraction {f}: no rule beats random on average.")
        lines.append("")
    lines += ["## Machine", "", f"- {platform.processor() or platform.machine()}, Python {platform.python_version()}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.selection", description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--fractions", default=",".join(map(str, FRACTIONS)))
    p.add_argument("--smoke", action="store_true", help="64 train, 16 val, 1 epoch, seed 0 -> /tmp")
    p.add_argument("--runs", type=Path, default=HERE / "selection_runs.jsonl")
    p.add_argument("--out", type=Path, default=HERE / "SELECTION.md")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    base = LdsConfig(n_train=args.n_train, n_val=args.n_val, epochs=args.epochs, max_length=args.max_length)
    if args.smoke:
        base = LdsConfig(n_train=64, n_val=16, epochs=1, max_length=32)
        args.seeds = "0"
        if args.runs == HERE / "selection_runs.jsonl":
            args.runs, args.out = Path("/tmp/hyperinf_selection_smoke.jsonl"), Path("/tmp/hyperinf_SELECTION_smoke.md")
    fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    if not args.report_only:
        import torch

        torch.set_num_threads(args.threads)
        for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
            cfg = replace(base, seed=seed)
            print(f"[selection] {cfg}", flush=True)
            run(MiniLMSelection(cfg, progress=args.progress), cfg, args.runs, fractions,
                log=lambda s: print(s, flush=True))
    text = report(load_records(args.runs), "python -m bench.selection" + (" --smoke" if args.smoke else ""))
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
