"""Timing, machine description and formatting of the benchmark suite.

:func:`measure_group` runs several candidates on the same inputs, interleaved round-robin (so drifting
machine load hits every candidate alike), after warm-up, and keeps the median of the repeats.  It never
changes the thread count: whatever ``torch.set_num_threads`` set is used and recorded.  A per-candidate
time budget caps the repeats of slow cases (at least ``min_repeats``).  Results go into :class:`Table`
and :class:`Section` (the report of one ``bench_<name>`` module).
"""
from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Timing:
    """Wall-clock seconds of the timed repeats of one candidate (warm-up runs excluded)."""

    name: str
    times: list[float] = field(default_factory=list)
    warmup: int = 0
    scale: float = 1.0  # times are multiplied by this when reported (linear extrapolation)
    error: str | None = None
    result: Any = None  # what the last run returned (for accuracy checks)

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times) * self.scale if self.times else math.nan

    @property
    def min(self) -> float:
        return min(self.times) * self.scale if self.times else math.nan

    @property
    def spread(self) -> float:
        """(max − min)/median of the repeats: a noise indicator (0 for a single repeat)."""
        if len(self.times) < 2:
            return 0.0
        return (max(self.times) - min(self.times)) / statistics.median(self.times)

    @property
    def repeats(self) -> int:
        return len(self.times)


@dataclass
class TimerConfig:
    """How every case is timed: warm-up runs, repeats, and a time budget per candidate."""

    warmup: int = 1
    repeats: int = 5
    min_repeats: int = 2
    budget_s: float = 8.0  # stop repeating a candidate once its timed runs have used this much


def _sync() -> None:
    if torch.cuda.is_available():  # pragma: no cover - CPU machine
        torch.cuda.synchronize()


def measure_group(
    candidates: dict[str, Callable[[], Any]],
    timer: TimerConfig,
    *,
    warmup: int | None = None,
    repeats: int | None = None,
    min_repeats: int | None = None,
    budget_s: float | None = None,
    keep_result: bool = False,
) -> dict[str, Timing]:
    """Time every candidate: ``warmup`` untimed runs each, then timed rounds, interleaved.

    Round k runs the still-active candidates in a rotated order.  A candidate stops after
    ``repeats`` timed runs, or once ``min_repeats`` are done and its timed runs exceed ``budget_s``.
    A candidate that raises is recorded with its error and dropped (the others go on).
    """
    warmup = timer.warmup if warmup is None else warmup
    repeats = timer.repeats if repeats is None else repeats
    min_repeats = min(timer.min_repeats if min_repeats is None else min_repeats, repeats)
    budget_s = timer.budget_s if budget_s is None else budget_s
    out = {name: Timing(name, warmup=warmup) for name in candidates}
    names = list(candidates)
    for name in names:
        for _ in range(warmup):
            try:
                r = candidates[name]()
                if keep_result:
                    out[name].result = r
                del r
            except Exception as exc:  # noqa: BLE001 - report, do not crash the suite
                out[name].error = f"{type(exc).__name__}: {exc}"
                break
    active = [n for n in names if out[n].error is None]
    k = 0
    while active:
        order = active[k % len(active):] + active[: k % len(active)]
        for name in order:
            t = out[name]
            try:
                _sync()
                t0 = time.perf_counter()
                r = candidates[name]()
                _sync()
                t.times.append(time.perf_counter() - t0)
                if keep_result:
                    t.result = r
                del r
            except Exception as exc:  # noqa: BLE001
                t.error = f"{type(exc).__name__}: {exc}"
        active = [
            n for n in active
            if out[n].error is None
            and out[n].repeats < repeats
            and not (out[n].repeats >= min_repeats and sum(out[n].times) >= budget_s)
        ]
        k += 1
    return out


def measure(fn: Callable[[], Any], timer: TimerConfig, name: str = "fn", **kw) -> Timing:
    """:func:`measure_group` for one candidate."""
    return measure_group({name: fn}, timer, **kw)[name]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                keep = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
                return [f for f in keep if f in flags]
    except OSError:
        pass
    return []


def _mkl_version() -> str:
    for line in torch.__config__.show().splitlines():
        if "Math Kernel Library" in line:
            return line.strip().lstrip("- ")
    return "not linked" if not torch.backends.mkl.is_available() else "linked (version unknown)"


def _git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{head}{' (+ uncommitted changes)' if dirty else ''}" if head else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict[str, str]:
    """A description of this machine and software, all read from the system (nothing typed in)."""
    import psutil

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = "not installed"
    from hyperinf_ext import available_backends

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        affinity = os.cpu_count() or 0
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return {
        "CPU": _cpu_model(),
        "cores": f"{psutil.cpu_count(logical=False)} physical / {psutil.cpu_count()} logical, {affinity} usable by this process",
        "CPU flags (relevant)": ", ".join(_cpu_flags()) or "none found",
        "memory": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "python": platform.python_version(),
        "torch": f"{torch.__version__} (CPU capability {torch.backends.cpu.get_cpu_capability()})",
        "triton": triton_version,
        "BLAS": _mkl_version(),
        "threads": f"torch intra-op {torch.get_num_threads()} (also MKL's), inter-op {torch.get_num_interop_threads()}; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, MKL_NUM_THREADS={os.environ.get('MKL_NUM_THREADS', 'unset')}",
        "hyperinf_ext backends (cpu)": ", ".join(available_backends("cpu")),
        "git": _git_state(),
        "load average at start (1/5/15 min)": " / ".join(f"{x:.2f}" for x in load),
    }


_T0 = time.perf_counter()


def progress(msg: str) -> None:
    """One progress line on stderr (elapsed time since import, load average)."""
    print(f"  [{time.perf_counter() - _T0:7.1f} s | load {load_average()}] {msg}", file=sys.stderr, flush=True)


def load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def fmt_time(s: float) -> str:
    if s is None or not math.isfinite(s):
        return "—"
    if s >= 100:
        return f"{s:.0f} s"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


def fmt_ratio(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "—"
    return f"{x:.3g}×"


def fmt_sci(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "—" if x is None or math.isnan(x) else str(x)
    return f"{x:.1e}"


def fmt_timing(t: Timing) -> str:
    """'median (±spread, ×repeats)' or the error."""
    if t.error:
        return f"error: {t.error[:80]}"
    if not t.times:
        return "—"
    return f"{fmt_time(t.median)} (±{100 * t.spread:.0f}%, n={t.repeats})"


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"#### {self.title}", "", "| " + " | ".join(self.headers) + " |",
                 "|" + "|".join("---" for _ in self.headers) + "|"]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in self.rows]
        if self.notes:
            lines.append("")
            lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines)

    def text(self) -> str:
        cols = [self.headers] + self.rows
        widths = [max(len(str(r[i])) for r in cols) for i in range(len(self.headers))]
        sep = "  "
        out = [f"== {self.title}", sep.join(h.ljust(w) for h, w in zip(self.headers, widths))]
        out.append(sep.join("-" * w for w in widths))
        out += [sep.join(str(c).ljust(w) for c, w in zip(r, widths)) for r in self.rows]
        out += [f"  * {n}" for n in self.notes]
        return "\n".join(out)


@dataclass
class Target:
    """A target of the issue, evaluated from measured numbers."""

    name: str
    met: bool | None  # None = could not be evaluated
    detail: str


@dataclass
class Section:
    name: str
    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
