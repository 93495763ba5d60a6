"""How well ``HyperINF.plan`` predicts the peak memory and the time of fit + scores (issue #23 item 3).

    python -m bench.plan_accuracy [--models minilm,smollm2] [--threads 1]

Per setting two fresh processes: one makes the plan (model, data, ``attr.plan(loader, n_queries=Q)``),
the other runs what the plan predicts — ``fit`` then ``scores`` of Q queries — with the kernel's peak-RSS
mark (VmHWM) reset when the run starts, so the measured peak is that of the run alone.  Each process
loads the same model and data the same way, so the plan's baseline (RSS before the work) stands for the
run's.  Appends one JSON line per setting to bench/plan_runs.jsonl and writes bench/PLAN.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = HERE / "plan_runs.jsonl"
REPORT = HERE / "PLAN.md"

# (model, n_train, n_query, cache, batch size, max length)
SETTINGS = {
    "minilm": [("minilm", 2000, 200, "memory", 32, 64), ("minilm", 2000, 200, "disk", 32, 64)],
    "smollm2": [("smollm2", 300, 60, "memory", 8, 128), ("smollm2", 300, 60, "disk", 8, 128)],
}


def _setup(model: str, n: int, q: int, batch: int, max_length: int):
    """(LoRA model, training loader, query loader) of an embedded model, random LoRA (lora_B nonzero)."""
    import torch

    from hyperinf_ext.app.data import make_loader, split_dataset

    from .inputs import randomize_lora_B

    if model == "minilm":
        from .inputs import pipeline_setup

        s = pipeline_setup(n, q)
        loaders = [make_loader(ds, s.tokenizer, batch_size=batch, sort_by_length=True, max_length=max_length)
                   for ds in (s.train, s.val)]
        return s.model, loaders[0], loaders[1]
    from hyperinf_ext.app.data.instruction import encode_instructions, ensure_pad_token, rotten_tomatoes_instructions
    from hyperinf_ext.app.models.causal import load_causal_lora_model
    from hyperinf_ext.app.models.llm import smollm2_model_dir
    from hyperinf_ext.app.models.training import load_tokenizer

    folder = smollm2_model_dir()
    tok = load_tokenizer(folder)
    ensure_pad_token(tok)
    lm = load_causal_lora_model(folder, seed=0)
    randomize_lora_B(lm, std=0.01)
    train, val = split_dataset(rotten_tomatoes_instructions(), n, q, seed=0)
    loaders = [make_loader(ds, tok, batch_size=batch, sort_by_length=True, max_length=max_length,
                           encodings=encode_instructions(ds, tok, max_length).encodings) for ds in (train, val)]
    torch.manual_seed(0)
    return lm, loaders[0], loaders[1]


def child(role: str, setting: list, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from hyperinf_ext import HyperINF
    from hyperinf_ext.attributor.plan_probe import peak_rss_bytes, reset_peak_rss, rss_bytes

    model, cache, q = setting[0], setting[3], setting[2]
    lm, train, queries = _setup(model, setting[1], q, setting[4], setting[5])
    attr = HyperINF(lm, progress=False, cache=cache)
    if role == "plan":
        t0 = time.perf_counter()
        plan = attr.plan(train, n_queries=q)
        return {"plan": plan.to_dict(), "plan_seconds": time.perf_counter() - t0}
    reset_peak_rss()
    base = rss_bytes()
    t0 = time.perf_counter()
    attr.fit(train)
    t_fit = time.perf_counter() - t0
    S = attr.scores(queries)
    total = time.perf_counter() - t0
    assert torch.isfinite(S).all()
    return {"baseline_bytes": base, "peak_bytes": peak_rss_bytes(), "seconds": total, "fit_seconds": t_fit,
            "timings": dict(attr.timings)}


def run_setting(setting: tuple, threads: int) -> dict:
    out = {}
    for role in ("plan", "run"):
        cmd = [sys.executable, "-m", "bench.plan_accuracy", "--child", role, "--setting", json.dumps(setting),
               "--threads", str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
        if proc.returncode != 0:
            raise RuntimeError(f"{role} of {setting} failed:\n{proc.stderr[-3000:]}")
        out[role] = json.loads(proc.stdout.strip().splitlines()[-1])
    plan, run = out["plan"]["plan"], out["run"]
    rec = {
        "setting": dict(zip(("model", "n_train", "n_query", "cache", "batch_size", "max_length"), setting)),
        "threads": threads, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "predicted_peak": plan["peak_bytes"], "measured_peak": run["peak_bytes"],
        "predicted_above": plan["phases"][plan["peak_phase"]],
        "measured_above": run["peak_bytes"] - run["baseline_bytes"],
        "plan_baseline": plan["baseline_bytes"], "run_baseline": run["baseline_bytes"],
        "peak_phase": plan["peak_phase"], "components": plan["components"],
        "predicted_seconds": plan["total_seconds"], "measured_seconds": run["seconds"],
        "predicted_fit_seconds": plan["seconds"]["fit"], "measured_fit_seconds": run["fit_seconds"],
        "plan_seconds": out["plan"]["plan_seconds"],
    }
    with open(RUNS, "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def report() -> str:
    recs = [json.loads(x) for x in RUNS.read_text().splitlines()] if RUNS.exists() else []
    recs.sort(key=lambda r: r["when"])
    mb = 2 ** 20
    lines = [
        "# Plan vs measured: peak memory and time of fit + scores (issue #23 item 3)",
        "",
        "`python -m bench.plan_accuracy` — per setting one process makes the plan (`HyperINF.plan(train, "
        "n_queries=Q)`), a fresh one runs `fit` + dense `scores` of Q queries with the peak-RSS mark reset at "
        "its start. Peak = the process's peak RSS (VmHWM); above = peak − RSS before the fit (model and data "
        "loaded). Random LoRA (lora_B nonzero), sort-by-length batches, float64 factors (the default).",
        "",
        "| model | n | Q | cache | batch | slack | threads | peak predicted / measured (MiB) | ratio | above baseline "
        "predicted / measured (MiB) | time predicted / measured (s) | ratio | plan took (s) | when |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        s = r["setting"]
        lines.append(
            f"| {s['model']} | {s['n_train']} | {s['n_query']} | {s['cache']} | {s['batch_size']} | "
            f"{r['components']['allocator_slack'] / max(r['components']['batch'], 1):.2f} | {r['threads']} | "
            f"{r['predicted_peak'] / mb:.0f} / {r['measured_peak'] / mb:.0f} | "
            f"{r['predicted_peak'] / r['measured_peak']:.2f} | {r['predicted_above'] / mb:.0f} / "
            f"{r['measured_above'] / mb:.0f} | {r['predicted_seconds']:.0f} / {r['measured_seconds']:.0f} | "
            f"{r['predicted_seconds'] / r['measured_seconds']:.2f} | {r['plan_seconds']:.1f} | {r['when']} |")
    lines += ["", "Target (issue #23): the predicted peak within 25% of the measured one on the embedded models.", "",
              "slack = the allocator slack the plan added (`ALLOCATOR_SLACK` × the largest batch's measured memory). "
              "The first run (slack 0.30, set from one 600-example MiniLM fit) matched the classifier and "
              "over-predicted the LLM by 20–26%: the LLM's fit adds about nothing over its largest batch. "
              "`ALLOCATOR_SLACK` is now 0.15 (chosen from those four runs), and the second run measured it. Both runs "
              "are listed; time = fit + scores, predicted from the probe's seconds per token and per batch (the "
              "machine was shared with other jobs: timings move by tens of percent)."]
    text = "\n".join(lines) + "\n"
    REPORT.write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="minilm,smollm2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", choices=("plan", "run"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--setting", default=None, help=argparse.SUPPRESS)
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, json.loads(a.setting), a.threads)), flush=True)
        return
    if not a.report_only:
        for model in a.models.split(","):
            for setting in SETTINGS[model]:
                rec = run_setting(setting, a.threads)
                print(json.dumps(rec), flush=True)
    print(report())


if __name__ == "__main__":
    main()
