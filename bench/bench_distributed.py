"""One process vs ``torchrun --nproc-per-node 2`` (gloo) on the embedded default: wall time, the
influence fit's time and the peak RSS of the largest process.

    python -m bench.bench_distributed [--n-train 600 --n-val 64 --epochs 0]

Runs ``hyperinf-ext detect-mislabeled`` three times — one process with 1 thread, one process with 2
threads, two ranks with 1 thread each — and prints one JSON line per run and a Markdown table.
Each run is wrapped in a fresh Python process that reports RUSAGE_CHILDREN's ru_maxrss (the peak of
its largest descendant: for torchrun, the largest rank or the launcher).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WRAP = ("import resource, subprocess, sys, time; t = time.perf_counter(); rc = subprocess.call(sys.argv[1:]); "
        "print(rc, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(label: str, launcher: list[str], args: list[str], threads: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    cmd = launcher + ["-m", "hyperinf_ext", "detect-mislabeled", *args, "--threads", str(threads),
                      "--no-progress", "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads), GLOO_SOCKET_IFNAME="lo")
    res = subprocess.run([sys.executable, "-c", WRAP, *cmd], env=env, capture_output=True, text=True, timeout=3600)
    rc, wall, maxrss = res.stdout.strip().splitlines()[-1].split()
    if rc != "0":
        raise SystemExit(f"{label} failed:\n{res.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"run": label, "wall_s": round(float(wall), 2), "pipeline_s": round(summary["total_seconds"], 2),
            "fit_s": round(summary["influence_fit"]["seconds"], 2),
            "scoring_s": round(sum(m["seconds"] for m in summary["methods"]), 2),
            "peak_rss_mb": round(int(maxrss) / 1024, 1)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n-train", type=int, default=600)
    p.add_argument("--n-val", type=int, default=64)
    p.add_argument("--epochs", type=int, default=0)
    a = p.parse_args(argv)
    args = ["--n-train", str(a.n_train), "--n-val", str(a.n_val), "--epochs", str(a.epochs),
            "--methods", "hyperinf,exact", "--top-k", "10"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                "--monitor-interval", "0.2", "--master-addr", "127.0.0.1", "--master-port", str(_port())]
    rows = [run("1 process, 1 thread", [sys.executable], args, 1),
            run("1 process, 2 threads", [sys.executable], args, 2),
            run("torchrun 2 ranks x 1 thread", torchrun, args, 1)]
    for r in rows:
        print(json.dumps(r))
    print("\n| run | wall s | pipeline s | influence fit s | scoring s | peak RSS MB (largest process) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['wall_s']} | {r['pipeline_s']} | {r['fit_s']} | {r['scoring_s']} | {r['peak_rss_mb']} |")


if __name__ == "__main__":
    main()
