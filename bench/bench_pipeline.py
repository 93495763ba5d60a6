"""The whole pipeline on the embedded default model (all-MiniLM-L6-v2 + a fresh LoRA, lora_B made
nonzero; no fine-tuning): HyperINF.fit + mean_scores, ours vs the paper's batch-size-1 code path.

* ours: sort_by_length loaders, batch 32, cache="memory" (one backward per training example);
* baseline: ``bench.baselines.bs1_pipeline`` (batch size 1, per-sample GFIM loop, paper Schulz, a second
  batch-size-1 pass over the training set for the dot products);
* forward/backward: the same batched passes ours makes, with no hooks — the model's own cost, so
  influence overhead = ours − forward/backward.
* peak RSS for several n and every cache mode, each in a fresh process (``bench.memprobe``).

pytest-benchmark: ``python -m pytest bench/bench_pipeline.py --benchmark-only`` (64 train / 16 val).
"""
from __future__ import annotations

import json
import statistics
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import torch

from .baselines import bs1_pipeline, forward_backward, max_rel_diff
from .inputs import pipeline_setup
from .timing import (REPO, Section, Table, Target, TimerConfig, fmt_ratio, fmt_sci, fmt_time, fmt_timing,
                     measure_group, progress)


@dataclass
class PipelineConfig:
    n_train: int = 1000
    n_val: int = 200
    max_length: int = 64
    batch_size: int = 32
    repeats: int = 4  # ours and forward/backward, interleaved: their difference (the overhead) is small, so it needs several
    bs1_repeats: int = 1
    # the baseline's second batch-size-1 pass (dot products) over this many training examples, its time
    # extrapolated linearly to n_train (None = all); scores are compared on those examples
    bs1_second_pass: int | None = 250
    warm_train: int = 32
    warm_val: int = 8
    speedup_target: float = 1.8
    overhead_target: float = 0.15
    mem_ns: tuple = (500, 1000, 2000)
    mem_caches: tuple = ("memory", "disk", "none")
    mem_jobs: tuple | None = None  # explicit (n, cache) runs instead of mem_ns × mem_caches
    # the same runs with glibc's mmap threshold pinned (MALLOC_MMAP_THRESHOLD_): how much of the RSS is
    # heap the allocator keeps after frees rather than live data
    malloc_jobs: tuple = ((500, "memory"),)
    malloc_threshold: int = 131072
    mem_overlap: bool = False  # start the probes while the in-process runs are timed (quick run only)
    mem_val: int = 32
    mem_workers: int = 2  # memory probes run this many at a time (RSS is per process; speed is not measured)
    mem_timeout_s: float = 1200.0
    layers: tuple | None = None  # None = every LoRA layer + the classifier head (HyperINF's default)


FULL = PipelineConfig()
QUICK = PipelineConfig(n_train=24, n_val=8, warm_train=0, warm_val=0, repeats=1, mem_val=4, mem_workers=3,
                       bs1_second_pass=12,
                       mem_jobs=((16, "memory"), (16, "disk"), (16, "none")), malloc_jobs=(), mem_overlap=True,
                       layers=("layer.0.attention.self.query",))


def loaders(setup, cfg: PipelineConfig, n_train: int | None = None, n_val: int | None = None):
    from hyperinf_ext.app.data import make_loader

    train = setup.train if n_train is None else setup.train.subset(range(n_train))
    val = setup.val if n_val is None else setup.val.subset(range(n_val))
    kw = dict(max_length=cfg.max_length)
    return {
        "train": make_loader(train, setup.tokenizer, batch_size=cfg.batch_size, sort_by_length=True, **kw),
        "val": make_loader(val, setup.tokenizer, batch_size=cfg.batch_size, sort_by_length=True, **kw),
        "train1": make_loader(train, setup.tokenizer, batch_size=1, **kw),
        "val1": make_loader(val, setup.tokenizer, batch_size=1, **kw),
    }


def run_ours(model, ld, cache: str = "memory", layers=None):
    from hyperinf_ext import HyperINF

    attr = HyperINF(model, progress=False, cache=cache, layers=list(layers) if layers else None)
    attr.fit(ld["train"])
    scores = attr.mean_scores(ld["val"], ld["train"] if cache == "none" else None)
    return scores, dict(attr.timings), attr


def pipeline_candidates(setup, ld, layer_names=None, second_pass=None):
    from hyperinf_ext.capture import find_gradient_layers

    layers = find_gradient_layers(setup.model, include_heads=True, layers=list(layer_names) if layer_names else None)
    return {
        "ours: HyperINF fit + mean_scores (batch 32, cache=memory)": lambda: run_ours(setup.model, ld, layers=layer_names),
        "forward/backward only (same batches, no hooks)": lambda: forward_backward(setup.model, [ld["train"], ld["val"]], layers),
        "paper: batch-size-1 loop (2 passes over train)":
            lambda: bs1_pipeline(setup.model, ld["train1"], ld["val1"], layers, second_pass=second_pass),
    }


def memory_probe(n: int, cache: str, cfg: PipelineConfig, threads: int, malloc: bool = False) -> dict:
    cmd = [sys.executable, "-m", "bench.memprobe", "--n", str(n), "--cache", cache, "--n-val", str(cfg.mem_val),
           "--threads", str(threads), "--max-length", str(cfg.max_length), "--batch-size", str(cfg.batch_size)]
    for layer in cfg.layers or ():
        cmd += ["--layer", layer]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = str(cfg.malloc_threshold)
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=cfg.mem_timeout_s)
    except subprocess.TimeoutExpired:
        return {"n": n, "cache": cache, "error": f"timeout after {cfg.mem_timeout_s:.0f} s"}
    for line in reversed(p.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"n": n, "cache": cache, "error": (p.stderr.strip().splitlines() or ["no output"])[-1][:200]}


def start_memory_probes(cfg: PipelineConfig):
    """Start the probe processes (a pool of cfg.mem_workers); returns (executor, jobs, futures, threads)."""
    workers = max(1, cfg.mem_workers)
    threads = max(1, torch.get_num_threads() // workers)
    jobs = list(cfg.mem_jobs) if cfg.mem_jobs else [(n, c) for n in cfg.mem_ns for c in cfg.mem_caches]
    jobs = [(n, c, False) for n, c in jobs] + [(n, c, True) for n, c in cfg.malloc_jobs]
    progress(f"memory probes: {len(jobs)} processes, {workers} at a time")
    ex = ThreadPoolExecutor(workers)
    futures = [ex.submit(memory_probe, n, c, cfg, threads, m) for n, c, m in jobs]
    return ex, jobs, futures, threads


def memory_section(cfg: PipelineConfig, sec: Section, started=None) -> None:
    ex, jobs, futures, threads = started or start_memory_probes(cfg)
    workers = max(1, cfg.mem_workers)
    results = [f.result() for f in futures]
    ex.shutdown()
    for r, j in zip(results, jobs):
        r["malloc"] = j[2]
    tab = Table(f"Peak memory (RSS) of fit + mean_scores, fresh process per run ({cfg.mem_val} validation examples, "
                f"{threads} thread(s) each, {workers} at a time)",
                ["cache", "n train", "RSS after set-up", "peak RSS during fit+scores", "growth over set-up",
                 "gradient cache size", "VmHWM (process peak)", "wall time"])
    by_cache: dict[str, list] = {}
    pinned = f" (MALLOC_MMAP_THRESHOLD_={cfg.malloc_threshold})"
    for r in results:
        label = r["cache"] + (pinned if r["malloc"] else "")
        if "error" in r:
            tab.rows.append([label, r["n"], f"error: {r['error']}", "", "", "", "", ""])
            continue
        if not r["malloc"]:
            by_cache.setdefault(r["cache"], []).append(r)
        tab.rows.append([label, r["n"], f"{r['rss_base_mb']:.0f} MB", f"{r['rss_peak_mb']:.0f} MB",
                         f"{r['growth_mb']:.0f} MB", f"{r['cache_mb']:.1f} MB", f"{r['hwm_mb']:.0f} MB",
                         fmt_time(r["seconds"])])
    for cache, rs in by_cache.items():
        if len(rs) < 2:
            continue
        rs = sorted(rs, key=lambda r: r["n"])
        lo, hi = rs[0], rs[-1]
        dn = (hi["n"] - lo["n"]) / 1000
        slope = (hi["growth_mb"] - lo["growth_mb"]) / dn
        cslope = (hi["cache_mb"] - lo["cache_mb"]) / dn
        rel = (hi["growth_mb"] - lo["growth_mb"]) / hi["rss_peak_mb"]
        tab.notes.append(f"cache={cache}: growth over set-up {lo['growth_mb']:.0f} → {hi['growth_mb']:.0f} MB for n "
                         f"{lo['n']} → {hi['n']}: {slope:+.0f} MB per 1,000 training examples ({100 * rel:+.1f}% of the "
                         f"largest run's peak); the in-RAM gradient cache grows {cslope:.0f} MB per 1,000.")
        if cache in ("disk", "none"):
            ok = abs(rel) < 0.10
            sec.targets.append(Target(f"peak memory with cache={cache} does not grow with n (n {lo['n']} → {hi['n']})",
                                      ok, f"{slope:+.0f} MB per 1,000 examples = {100 * rel:+.1f}% of the peak "
                                      f"({hi['rss_peak_mb']:.0f} MB)" + ("" if ok else " — grows")))
        else:
            sec.notes.append(f"cache=memory: the peak grows {slope:.0f} MB per 1,000 training examples, "
                             f"{slope / cslope:.1f}× the gradient cache's own {cslope:.0f} MB per 1,000."
                             if cslope > 0 else f"cache=memory: the peak grows {slope:.0f} MB per 1,000 examples.")
    plain = {(r["n"], r["cache"]): r for r in results if not r["malloc"] and "error" not in r}
    for r in results:
        base = plain.get((r["n"], r["cache"]))
        if r["malloc"] and "error" not in r and base:
            tab.notes.append(f"allocator: cache={r['cache']}, n={r['n']}: with glibc's mmap threshold pinned the peak is "
                             f"{r['rss_peak_mb']:.0f} MB instead of {base['rss_peak_mb']:.0f} MB and the growth over set-up "
                             f"{r['growth_mb']:.0f} MB instead of {base['growth_mb']:.0f} MB (gradient cache {r['cache_mb']:.0f} MB): "
                             "the difference is freed heap glibc keeps, not live data.")
    tab.notes.append("'growth over set-up' = peak − RSS after set-up; set-up ends with a forward/backward of the largest "
                     "batch, so the model's activation memory (larger for larger n: longer sequences) is not counted as "
                     "growth. 'Does not grow' = the growth changes by < 10% of the peak between the smallest and largest n.")
    sec.tables.append(tab)


def section(quick: bool, timer: TimerConfig) -> Section:
    cfg = QUICK if quick else FULL
    sec = Section("Pipeline on the default model")
    started = start_memory_probes(cfg) if cfg.mem_overlap else None
    setup = pipeline_setup(cfg.n_train, cfg.n_val)
    progress(f"pipeline {cfg.n_train}/{cfg.n_val}: model loaded")
    # warm-up on a subset (first-call costs of the model, tokenizer paths, kernels)
    warm = None
    if cfg.warm_train:
        warm = loaders(setup, cfg, cfg.warm_train, cfg.warm_val)
        for fn in pipeline_candidates(setup, warm, cfg.layers).values():
            fn()
    ld = loaders(setup, cfg)
    progress("pipeline: timing ours / forward-backward / batch-size-1")
    cands = pipeline_candidates(setup, ld, cfg.layers, cfg.bs1_second_pass)
    names = list(cands)
    t_main = measure_group({k: cands[k] for k in names[:2]}, timer, warmup=0, repeats=cfg.repeats,
                           min_repeats=cfg.repeats, budget_s=1e9, keep_result=True)
    t_bs1 = measure_group({names[2]: cands[names[2]]}, timer, warmup=0, repeats=cfg.bs1_repeats,
                          min_repeats=cfg.bs1_repeats, budget_s=1e9, keep_result=True)
    t = {**t_main, **t_bs1}
    ours, fb, bs1 = (t[n] for n in names)
    if bs1.ok and bs1.result["second_pass"][0] < bs1.result["second_pass"][1]:
        # linear extrapolation of the second pass: add the unmeasured examples at the measured rate
        done, total, secs = bs1.result["second_pass"]
        bs1.times = [x + secs * (total / done - 1) for x in bs1.times]
    tab = Table(f"Pipeline: fit + mean_scores, {cfg.n_train} train / {cfg.n_val} validation examples, max_length "
                f"{cfg.max_length} (all-MiniLM-L6-v2 + LoRA r=8 on query/value + classifier head)",
                ["run", "time (median)", "bs1 / this", "stages"])
    stages_ours = ""
    if ours.ok:
        scores, timings, _ = ours.result
        stages_ours = ", ".join(f"{k} {fmt_time(v)}" for k, v in timings.items())
    stages_bs1 = ", ".join(f"{k} {fmt_time(v)}" for k, v in bs1.result["stages"].items()) if bs1.ok else ""
    for name, tm, st in ((names[0], ours, stages_ours), (names[1], fb, ""), (names[2], bs1, stages_bs1)):
        tab.rows.append([name, fmt_timing(tm), fmt_ratio(bs1.median / tm.median) if (tm.ok and bs1.ok) else "—", st])
    if ours.ok and bs1.ok and fb.ok:
        scores = ours.result[0]
        seen = bs1.result["scored"]
        d_exact = max_rel_diff(scores[seen], bs1.result["scores_exact"][seen])
        d_paper = max_rel_diff(scores[seen], bs1.result["scores_paper"][seen])
        done, total, secs = bs1.result["second_pass"]
        if done < total:
            tab.notes.append(f"batch-size-1 baseline: its second pass over train was run on {done} of {total} examples "
                             f"({fmt_time(secs)}) and its time extrapolated linearly (+{fmt_time(secs * (total / done - 1))}); "
                             f"scores compared on those {done} examples.")
        from .baselines import status_summary

        rule, scale = bs1.result["damping"]
        tab.notes.append(f"damping (both): rule {rule!r}, scale {scale:g} — HyperINF's default configuration.")
        tab.notes.append(f"scores: max |ours − baseline| / max |baseline| = {fmt_sci(d_exact)} against the batch-size-1 "
                         f"gradients with a float64 Cholesky inverse, {fmt_sci(d_paper)} against the paper's Schulz inverse "
                         f"(paper Schulz per layer: {status_summary(bs1.result['paper_status'])}).")
        speed = bs1.median / ours.median
        overhead = (ours.median - fb.median) / ours.median
        sec.targets.append(Target(f"pipeline ≥ {cfg.speedup_target}× faster than batch-size-1 ({cfg.n_train}/{cfg.n_val})",
                                  bool(speed >= cfg.speedup_target), f"{fmt_ratio(speed)}"))
        # the same quantity by two other estimators, and the spreads that move it between runs
        paired = statistics.median((a - b) / a for a, b in zip(ours.times, fb.times))
        by_min = (ours.min - fb.min) / ours.min
        noise = (f"; other estimators: per-round paired median {100 * paired:.1f}%, by minima {100 * by_min:.1f}%; "
                 f"spread of the runs (max − min)/median: ours ±{50 * ours.spread:.0f}%, forward/backward "
                 f"±{50 * fb.spread:.0f}%")
        sec.targets.append(Target(f"influence overhead ≤ {100 * cfg.overhead_target:.0f}% of our time",
                                  bool(overhead <= cfg.overhead_target),
                                  f"{100 * overhead:.1f}% (medians: ours {fmt_time(ours.median)} − forward/backward "
                                  f"{fmt_time(fb.median)})"
                                  + ("" if overhead <= cfg.overhead_target else
                                     f"; over by {100 * (overhead - cfg.overhead_target):.1f} points") + noise))
        sec.targets.append(Target("scores agree with the batch-size-1 baseline (float64 inverse)", bool(d_exact < 1e-4),
                                  f"max relative difference {fmt_sci(d_exact)}"))
        timings = ours.result[1]
        hooks = timings.get("gradients", float("nan")) - fb.median
        tab.notes.append(f"overhead = ours − forward/backward = {fmt_time(ours.median - fb.median)} "
                         f"({100 * overhead:.1f}%); of it, capture (hooks + per-sample einsum, 'gradients' − forward/backward) "
                         f"≈ {fmt_time(hooks)}, the rest gfim/cache/prepare/precondition/dot and loader time.")
    tab.notes.append("bs1 stages: the forward/backward time of the batch-size-1 loop includes its gradient "
                     "collection; ours' stages are HyperINF.timings.")
    tab.notes.append(f"ours and forward/backward: median of {cfg.repeats} run(s), interleaved; batch-size-1 baseline: "
                     f"{cfg.bs1_repeats} run(s); " + (f"all after a warm-up on {cfg.warm_train}/{cfg.warm_val} examples."
                                                      if cfg.warm_train else "no warm-up."))
    if cfg.layers:
        tab.notes.append(f"layers restricted to {list(cfg.layers)} (quick run).")
    sec.tables.append(tab)
    for tm in t.values():
        tm.result = None
    del setup, ld, warm
    memory_section(cfg, sec, started)
    if cfg.mem_overlap:
        sec.notes.append("quick run: the memory probes ran while the pipeline was timed.")
    return sec


# --------------------------------------------------------------------------------------------------
# pytest-benchmark

BENCH = PipelineConfig(n_train=64, n_val=16)


@pytest.fixture(scope="module")
def pipe():
    setup = pipeline_setup(BENCH.n_train, BENCH.n_val)
    return setup, loaders(setup, BENCH)


@pytest.mark.parametrize("run", ["ours", "forward_backward", "bs1"])
def test_pipeline(benchmark, pipe, run):
    setup, ld = pipe
    cands = pipeline_candidates(setup, ld)
    key = {"ours": 0, "forward_backward": 1, "bs1": 2}[run]
    benchmark.group = f"pipeline {BENCH.n_train} train / {BENCH.n_val} val (MiniLM + LoRA)"
    benchmark.pedantic(list(cands.values())[key], rounds=2, warmup_rounds=1)
