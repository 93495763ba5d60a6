"""Peak memory of one HyperINF fit + mean_scores, in a fresh process (so peaks of runs do not mix).

    python -m bench.memprobe --n 1000 --cache disk [--n-val 32] [--threads 1]

Prints one JSON line: RSS after set-up (model loaded, loaders built, a forward/backward of the largest
batch), the peak RSS
during fit + mean_scores (psutil, sampled every 2 ms), the kernel's VmHWM (peak of the whole process), the
gradient cache's size (GradientCache.nbytes) and the wall time.
"""
from __future__ import annotations

import argparse
import json
import resource
import threading
import time


def _vm_hwm_mb() -> float:
    """The kernel's peak RSS of this address space (VmHWM; unlike ru_maxrss it is not inherited
    from the parent across fork + exec)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--cache", choices=("memory", "disk", "none"), required=True)
    p.add_argument("--n-val", type=int, default=32)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layer", action="append", default=None, help="restrict to these layer names (repeatable)")
    a = p.parse_args(argv)

    import psutil
    import torch

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    from hyperinf_ext import HyperINF
    from hyperinf_ext.app.data import make_loader

    from .baselines import forward_backward
    from .inputs import pipeline_setup

    s = pipeline_setup(a.n, a.n_val, seed=a.seed)
    train = make_loader(s.train, s.tokenizer, batch_size=a.batch_size, sort_by_length=True, max_length=a.max_length)
    val = make_loader(s.val, s.tokenizer, batch_size=a.batch_size, sort_by_length=True, max_length=a.max_length)
    attr = HyperINF(s.model, progress=False, cache=a.cache, layers=a.layer)
    # warm-up on the loader's largest batch, so the model's peak activation memory is in the baseline
    # and the growth over it is what depends on n
    largest = max(train, key=lambda b: b["input_ids"].numel())
    forward_backward(s.model, [[largest]], attr.layers)
    del largest
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    attr.fit(train)
    cache_bytes = attr.cache.nbytes()
    scores = attr.mean_scores(val, train if a.cache == "none" else None)
    seconds = time.perf_counter() - t0
    stop.set()
    th.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    print(json.dumps({
        "n": a.n, "cache": a.cache, "n_val": a.n_val, "threads": torch.get_num_threads(),
        "rss_base_mb": base / 2**20, "rss_peak_mb": peak[0] / 2**20, "growth_mb": (peak[0] - base) / 2**20,
        "hwm_mb": _vm_hwm_mb(),
        "cache_mb": cache_bytes / 2**20, "seconds": seconds, "finite": bool(torch.isfinite(scores).all()),
    }), flush=True)


if __name__ == "__main__":
    main()
