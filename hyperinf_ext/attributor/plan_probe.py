"""How ``HyperINF.plan`` measures (module ``plan`` says what it predicts): the loader read once without the
model, then the fit's own per-sample gradients and GFIM products on a few batches, timed (the faster of
two runs of each) and metered (peak RSS above the level before, via the kernel's resettable peak mark
``/proc/self/clear_refs``, or the CUDA allocator's peak); the rest counted from shapes into a :class:`Plan`.
"""
from __future__ import annotations

import time
from typing import Any, Iterable

import torch

from .plan import STATE_D2_METHODS, ALLOCATOR_SLACK, SCHULZ_WORKSPACE, Plan, PlanProbe, phase_bytes, batch_shape

__all__ = ["make_plan", "rss_bytes", "peak_rss_bytes", "reset_peak_rss"]


# --------------------------------------------------------------------------------- measuring memory

def _status(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """The process's resident set size now (Linux /proc; None elsewhere)."""
    return _status("VmRSS")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Meter:
    """Peak memory above the level at ``start``: process RSS on the CPU, allocated bytes on CUDA."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device_index = device.index if self.cuda else None
        self.base: int | None = None
        self.ok = True

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device_index)
            torch.cuda.reset_peak_memory_stats(self.device_index)
            self.base = torch.cuda.memory_allocated(self.device_index)
        else:
            self.ok = reset_peak_rss()
            self.base = rss_bytes()
            self.ok = self.ok and self.base is not None

    def peak_above(self) -> int | None:
        if not self.ok or self.base is None:
            return None
        if self.cuda:
            torch.cuda.synchronize(self.device_index)
            return max(0, torch.cuda.max_memory_allocated(self.device_index) - self.base)
        hwm = _status("VmHWM")
        return None if hwm is None else max(0, hwm - self.base)




def peak_rss_bytes() -> int | None:
    """The process's peak resident set size since start or the last :func:`reset_peak_rss` (VmHWM)."""
    return _status("VmHWM")


# ------------------------------------------------------------------------------------------ making it

def _batch_cost(timed: list[tuple[int, float]]) -> tuple[float, float]:
    """(seconds per batch, seconds per token) fitted to (tokens, seconds) of the timed batches by least
    squares, both ≥ 0; per token only when the batches have one size."""
    if not timed:
        return 0.0, 0.0
    n = len(timed)
    mt, ms = sum(k for k, _ in timed) / n, sum(t for _, t in timed) / n
    var = sum((k - mt) ** 2 for k, _ in timed)
    if var > 0:
        slope = sum((k - mt) * (t - ms) for k, t in timed) / var
        intercept = ms - slope * mt
        if slope > 0 and intercept >= 0:
            return intercept, slope
    return 0.0, sum(t for _, t in timed) / max(sum(k for k, _ in timed), 1)


def make_plan(attr: Any, train_loader: Iterable, *, n_queries: int = 0, top_k: int | None = None,
              mean: bool = False, probe_batches: int = 4) -> Plan:
    """See :meth:`HyperINF.plan`."""
    from .. import ops
    from ..solvers.cost import CPU_RATES
    from .config import torch_dtype

    if isinstance(probe_batches, bool) or not isinstance(probe_batches, int) or probe_batches < 2:
        raise ValueError(f"probe_batches: expected a whole number >= 2 (one warms up), got {probe_batches!r}")
    if isinstance(n_queries, bool) or not isinstance(n_queries, int) or n_queries < 0:
        raise ValueError(f"n_queries: expected a whole number >= 0, got {n_queries!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k: expected a whole number >= 1 or None, got {top_k!r}")
    if mean and top_k is not None:
        raise ValueError("top_k: not with mean=True (the mean over the queries is one row of scores)")
    cfg = attr.config
    if not attr.layers:
        raise ValueError("model: no LoRA layers to attribute")

    # 1. the loader once, without the model: sizes, tokens, the first and the largest batches
    n_train = n_batches = tokens = 0
    first: list[tuple[int, Any]] = []
    largest: tuple[int, int, Any] | None = None
    for b, batch in enumerate(train_loader):
        n, t = batch_shape(batch)
        n_train, n_batches, tokens = n_train + n, n_batches + 1, tokens + t
        if b < probe_batches:
            first.append((b, batch))
        if largest is None or t > largest[1]:
            largest = (b, t, batch)
    if n_batches == 0:
        raise ValueError("train_loader: yielded no batches")
    # min(probe_batches, n_batches) batches: the first ones, the last of them replaced by the largest batch
    # when it is not among them (it runs last, so the untimed warm-up is never the largest)
    probe = [batch for _, batch in first]
    if largest[0] >= len(first):
        probe[-1] = largest[2]
    # 2. the fit's own code on those batches: per-sample gradients and the GFIM products
    fdtype = attr.fdtype
    gdtype = torch_dtype(cfg.grad_dtype) or attr.layers[0].module.weight.dtype
    fb, gb = torch.empty(0, dtype=fdtype).element_size(), torch.empty(0, dtype=gdtype).element_size()
    device = attr.layers[0].module.weight.device
    groups: dict[tuple[int, int], list[str]] = {}
    for l in attr.layers:
        groups.setdefault((l.dim, l.rank), []).append(l.name)
    work = attr._batch_gfim_dtype(gdtype)
    accs = {k: torch.zeros(len(v), k[0], k[0], dtype=work, device=device) for k, v in groups.items()}
    acc_bytes = sum(a.numel() * a.element_size() for a in accs.values())
    starts = [0]
    for b in probe:
        starts.append(starts[-1] + batch_shape(b)[0])
    meter = _Meter(device)
    was_progress, attr.progress = attr.progress, False
    timings = dict(attr.timings)
    # two passes over the probe batches: the memory of the first, the faster time of each batch (a batch
    # timed once on a shared machine can take twice its time)
    best: dict[int, float] = {}
    meter.start()
    try:
        for rep in range(2):
            batches = ({**b, "index": torch.arange(starts[i], starts[i + 1])} for i, b in enumerate(probe))
            t0 = time.perf_counter()
            for i, (_, _, stacked) in enumerate(attr._grad_batches(batches, "plan", groups=groups)):
                for key, s in stacked.items():
                    ops.gfim_accumulate_(accs[key], s.to(work) if s.dtype != work else s, backend=cfg.backend)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t1 = time.perf_counter()
                if i > 0 or rep > 0:
                    best[i] = min(best.get(i, float("inf")), t1 - t0)
                t0 = time.perf_counter()
            if rep == 0:
                measured = meter.peak_above()
    finally:
        attr.progress = was_progress
        attr.timings = timings
    timed = [(batch_shape(probe[i])[1], t) for i, t in sorted(best.items()) if i > 0 or len(probe) == 1]
    del accs
    batch_bytes = None if measured is None else max(0, measured - acc_bytes)
    seconds, timed_tokens = sum(t for _, t in timed), sum(k for k, _ in timed)
    per_batch, sec_per_token = _batch_cost(timed)

    # 3. shapes → bytes
    P = sum(l.rank * l.dim for l in attr.layers)
    d2 = sum(l.dim * l.dim for l in attr.layers)
    r2 = sum(l.rank * l.rank for l in attr.layers)
    largest_group = max(len(v) * k[0] * k[0] for k, v in groups.items())
    ws = torch.empty(0, dtype=work).element_size()
    comps = {
        "factors": (d2 + r2) * fb,
        "fit_copy": (d2 + r2) * fb,
        "fit_scratch": 0 if work == fdtype else sum(len(v) * k[0] * k[0] for k, v in groups.items()) * ws,
        "method_state": d2 * fb if cfg.method in STATE_D2_METHODS else 0,
        "inverse_workspace": SCHULZ_WORKSPACE * largest_group * fb if cfg.method in STATE_D2_METHODS else 0,
        "gradient_cache": n_train * P * gb if cfg.cache == "memory" else 0,
        "batch": batch_bytes or 0,
        # batches of changing shapes leave the heap fragmented (ALLOCATOR_SLACK, measured: bench/PLAN.md)
        "allocator_slack": int(ALLOCATOR_SLACK * (batch_bytes or 0)),
        "queries": n_queries * P * gb,
        "preconditioned": (min(n_queries, 1) if mean else n_queries) * P * fb,
        "scores": (n_train * fb if n_queries else 0) if mean else (
            (n_queries * 2 * top_k * (fb + 8)) if top_k else n_queries * n_train * fb),
        # a batch of training gradients in the factor dtype, for the dot products (or a second pass)
        "score_batch": batch_shape(largest[2])[0] * P * fb + ((batch_bytes or 0) if cfg.cache == "none" else 0),
    }
    notes = []
    if batch_bytes is None:
        notes.append("the batch memory could not be measured here (no /proc/self/clear_refs): the peak omits it")

    # 4. seconds
    rates = CPU_RATES.get(fdtype, CPU_RATES[torch.float64])
    fit_s = sec_per_token * tokens + per_batch * n_batches
    prepare_s = 0.0
    if cfg.method in STATE_D2_METHODS:
        prepare_s = sum(l.dim ** 3 / 3 / (rates["potrf"] * 1e9) + 2 * l.dim ** 3 / 3 / (rates["potri"] * 1e9)
                        for l in attr.layers)
    q_tokens = n_queries * tokens / max(n_train, 1)
    dots = 2.0 * (min(n_queries, 1) if mean else n_queries) * n_train * P / (rates["gemm"] * 1e9)
    q_batches = -(-n_queries * n_batches // max(n_train, 1))
    secs = {"fit": fit_s, "prepare": prepare_s, "query_gradients": sec_per_token * q_tokens + per_batch * q_batches,
            "scores": dots + (fit_s if cfg.cache == "none" and n_queries else 0.0)}
    if device.type != "cpu":
        notes.append("prepare and scores are timed with the CPU cost model (no CUDA rates yet): on a GPU they are "
                     "upper bounds")
    plan = Plan(n_train=n_train, n_batches=n_batches, train_tokens=tokens, layers=len(attr.layers),
                gradient_numbers=P, n_queries=n_queries, top_k=top_k, mean=mean, cache=cfg.cache, method=cfg.method,
                device=str(device), baseline_bytes=meter.base, components=comps, phases=phase_bytes(comps),
                seconds=secs, probe=PlanProbe(batches=len(probe), examples=sum(batch_shape(b)[0] for b in probe),
                                              tokens=sum(batch_shape(b)[1] for b in probe), seconds=seconds,
                                              timed_tokens=timed_tokens, seconds_per_token=sec_per_token,
                                              seconds_per_batch=per_batch,
                                              batch_bytes=batch_bytes,
                                              largest_batch={"index": largest[0],
                                                             "examples": batch_shape(largest[2])[0],
                                                             "tokens": largest[1]}),
                factor_bytes=fb, grad_bytes=gb, notes=notes)
    return plan
