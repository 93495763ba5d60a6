"""Peak memory of ``scores(top_k=K)`` and of the full ``scores()`` after a fit, in a fresh process.

    python -m bench.memprobe_scores --n-train 4000 --n-query 1000 [--top-k 10]

Prints one JSON line: for each call, the peak RSS *growth* during it (MB) — the kernel's VmHWM reset
before the call (``/proc/self/clear_refs`` = 5) minus the RSS just before it — and what the full
[n_query, n_train] float64 matrix takes.  The query gradients are computed and the training gradients
cached (memory) before either call, so the growth is the scoring's own.  Used by tests/attributor/test_topk_scores.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _status_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak_growth(fn) -> float:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS
    before = _status_mb("VmRSS")
    result = fn()
    peak = _status_mb("VmHWM")
    del result
    return peak - before


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n-train", type=int, required=True)
    p.add_argument("--n-query", type=int, default=1000)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3, help="calls measured per kind; the least growth is kept")
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from persist_child import make_data, tiny_model  # the tests' tiny float64 LoRA model

    from hyperinf_ext import HyperINF

    def batches(data, size=256):
        n = data["labels"].shape[0]
        return [{k: v[i:i + size] for k, v in data.items()} for i in range(0, n, size)]

    attr = HyperINF(tiny_model(), progress=False, distributed=False).fit(batches(make_data(a.n_train, 1)))
    queries = attr.query_gradients(batches(make_data(a.n_query, 2)))
    attr.scores(queries, top_k=a.top_k)  # warm up: first-call allocations are not the scoring's growth
    # the least of three calls: a single peak is sometimes several MB high (transparent huge pages filled
    # or collapsed in the background, malloc trimming), seen as an 18 MB outlier on a loaded machine
    topk = min(_peak_growth(lambda: attr.scores(queries, top_k=a.top_k)) for _ in range(a.repeats))
    full = min(_peak_growth(lambda: attr.scores(queries)) for _ in range(a.repeats))
    print(json.dumps({"n_train": a.n_train, "n_query": a.n_query, "top_k": a.top_k, "topk_growth_mb": topk,
                      "full_growth_mb": full, "matrix_mb": a.n_query * a.n_train * 8 / 2**20}))


if __name__ == "__main__":
    main()
