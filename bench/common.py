"""Shared pieces of the benchmark suite: timing, machine description, inputs and baselines.

Timing: :func:`measure_group` runs several candidates on the same inputs, interleaved round-robin
(so drifting machine load hits every candidate alike), after warm-up, and keeps the median of the
repeats.  It never changes the thread count: whatever ``torch.set_num_threads`` set is used and
recorded.  A per-candidate time budget caps the repeats of slow cases (at least ``min_repeats``).

Baselines written here (the library is not used for them):
* :func:`gfim_loop_`         the paper's per-sample loop ``G += g_iᵀ·g_i``;
* :func:`gfim_batched_`      one batched GEMM over the stacked gradients (torch.baddbmm);
* :func:`bs1_pipeline`       the paper's batch-size-1 influence pipeline (see its docstring).
Baseline solvers come from ``hyperinf_ext.solvers`` (each algorithm has one home): the paper's
fixed-start Schulz (:func:`paper_schulz`), Cholesky (:func:`cholesky_inverse`) and conjugate
gradients for many right-hand sides at once (:func:`batched_cg`).
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
from typing import Any, Callable, Iterable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from hyperinf_ext import solvers  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------------------------------
# timing


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


# --------------------------------------------------------------------------------------------------
# machine description


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


# --------------------------------------------------------------------------------------------------
# formatting


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


# --------------------------------------------------------------------------------------------------
# inputs


def cpu_backends() -> list[str]:
    """The library's CPU backends, fastest first, minus Triton (interpreter only on CPU: not timed)."""
    from hyperinf_ext import available_backends

    return [b for b in available_backends("cpu") if b != "triton"]


def make_grads(L: int, n: int, r: int, d: int, dtype: torch.dtype, seed: int = 0, decay: float = 0.0) -> torch.Tensor:
    """Per-sample rank-first gradients [L, n, r, d]; column j scaled by (j+1)^-decay (a decaying GFIM spectrum)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(L, n, r, d, generator=g)
    if decay:
        x.mul_(torch.arange(1, d + 1, dtype=torch.float32).pow(-decay))
    return x.to(dtype)


_SPD_CACHE: dict[tuple, torch.Tensor] = {}


def random_orthogonal(B: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(B, d, d, generator=g, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1)).unsqueeze(-2)


def spd_batch(d: int, B: int, lam: float, kappa: float, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """B symmetric positive-definite d×d matrices with eigenvalues log-spaced in [lam, lam·kappa].

    Built in float64 as Q·diag(e)·Qᵀ (Q random orthogonal), symmetrised, then cast (exactly symmetric).
    """
    key = (d, B, lam, kappa, seed)
    if key not in _SPD_CACHE:
        Q = random_orthogonal(B, d, seed)
        e = lam * torch.logspace(0, math.log10(kappa), d, dtype=torch.float64)
        A = (Q * e) @ Q.mT
        _SPD_CACHE[key] = 0.5 * (A + A.mT)
    return _SPD_CACHE[key].to(dtype)


def gfim_like(L: int, d: int, power: float, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """L symmetric PSD 'GFIMs' [L, d, d] with a power-law spectrum e_i = (i+1)^-power (max 1)."""
    Q = random_orthogonal(L, d, seed)
    e = torch.arange(1, d + 1, dtype=torch.float64).pow(-power)
    G = (Q * e) @ Q.mT
    return (0.5 * (G + G.mT)).to(dtype)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max over the leading batch of ‖x − ref‖_F / ‖ref‖_F, in float64 (nan/inf if x is)."""
    x64, r64 = x.double(), ref.double()
    if x64.dim() <= 2:
        x64, r64 = x64.unsqueeze(0), r64.unsqueeze(0)
    num = torch.linalg.vector_norm((x64 - r64).flatten(1), dim=1)
    den = torch.linalg.vector_norm(r64.flatten(1), dim=1)
    return float((num / den).max())


# --------------------------------------------------------------------------------------------------
# GFIM baselines


def gfim_loop_(acc: torch.Tensor, grads: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """The paper's code: for each layer, for each sample, ``G += g_iᵀ·g_i`` (first n samples).

    acc: [L, d, d] float32/float64; grads: [L, n, r, d] (low precision is upcast per sample).
    """
    L = grads.shape[0]
    n = grads.shape[1] if n is None else n
    for l in range(L):
        G = acc[l]
        for i in range(n):
            g = grads[l, i]
            if g.dtype != acc.dtype:
                g = g.to(acc.dtype)
            G += g.T @ g
    return acc


def gfim_batched_(acc: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """One batched GEMM over the stacked gradients: acc[l] += Gᵀ·G with G = grads[l] as [n·r, d]."""
    L, d = grads.shape[0], grads.shape[-1]
    g = grads.reshape(L, -1, d)
    if g.dtype != acc.dtype:
        g = g.to(acc.dtype)
    return acc.baddbmm_(g.transpose(1, 2), g)


# --------------------------------------------------------------------------------------------------
# inverse baselines


def paper_schulz(A: torch.Tensor, x0: float | None = None, iterations: int | None = None) -> torch.Tensor:
    """Schulz from the paper's fixed start (``hyperinf_ext.solvers.paper_schulz``; defaults 5e-5 and 30)."""
    kw = {k: v for k, v in dict(x0=x0, iterations=iterations).items() if v is not None}
    return solvers.paper_schulz(A, **kw)


def schulz_status(A: torch.Tensor, X: torch.Tensor, tol: float) -> tuple[list[str], torch.Tensor]:
    """Per matrix: 'converged' / 'not converged' / 'diverged' from the residual ‖I − A·X‖_F (float64)."""
    from hyperinf_ext.reference import divergence_limit

    A64, X64 = A.double(), X.double()
    if A64.dim() == 2:
        A64, X64 = A64.unsqueeze(0), X64.unsqueeze(0)
    d = A64.shape[-1]
    eye = torch.eye(d, dtype=torch.float64)
    res = torch.linalg.matrix_norm(eye - A64 @ X64)
    out = []
    for r in res.tolist():
        if not math.isfinite(r) or r > divergence_limit(d):
            out.append("diverged")
        elif r <= tol:
            out.append("converged")
        else:
            out.append("not converged")
    return out, res


def status_summary(status: Iterable[str]) -> str:
    counts: dict[str, int] = {}
    for s in status:
        counts[s] = counts.get(s, 0) + 1
    return ", ".join(f"{v} {k}" for k, v in counts.items())


def inverse_f64(A: torch.Tensor) -> torch.Tensor:
    """The float64 reference inverse: torch.linalg.solve(A, I) on A cast to float64."""
    A64 = A.double()
    eye = torch.eye(A.shape[-1], dtype=torch.float64).expand(A64.shape)
    return torch.linalg.solve(A64, eye)


def cholesky_inverse(A: torch.Tensor) -> torch.Tensor:
    """Direct baseline: Cholesky factor then torch.cholesky_inverse (``hyperinf_ext.solvers.cholesky_inverse``)."""
    return solvers.cholesky_inverse(A)


# --------------------------------------------------------------------------------------------------
# conjugate gradients


def batched_cg(A: torch.Tensor, B: torch.Tensor, iterations: int, track: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Solve X·A = B for every row of B [L, k, d] by exactly ``iterations`` CG steps (``solvers.cg``).

    No residual test, so no extra work: the count is chosen by :func:`cg_iterations_for` to reach a
    target accuracy.  ``track(i, X)`` sees the iterate.
    """
    return solvers.cg(A, B, max_iter=iterations, callback=track)[0]


def cg_iterations_for(A: torch.Tensor, B: torch.Tensor, ref: torch.Tensor, target: float, max_iter: int) -> tuple[int | None, float]:
    """Fewest CG iterations whose error rel_err(X, ref) <= target (None if not within max_iter), best error."""
    hit: list[int] = []
    best = [math.inf]

    class _Stop(Exception):
        pass

    def track(i, X):
        e = rel_err(X, ref)
        best[0] = min(best[0], e)
        if e <= target:
            hit.append(i)
            raise _Stop

    try:
        batched_cg(A, B, max_iter, track)
    except _Stop:
        pass
    return (hit[0] if hit else None), best[0]


def solve_rows_f64(A: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Reference V·A⁻¹ in float64 (A [L, d, d], V [L, k, d])."""
    return torch.linalg.solve(A.double(), V.double().transpose(-1, -2)).transpose(-1, -2)


# --------------------------------------------------------------------------------------------------
# pipeline: model, data, the batch-size-1 baseline


def randomize_lora_B(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """PEFT starts lora_B at zero (so lora_A gradients vanish); give it small random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(std).to(p.dtype))


@dataclass
class PipelineSetup:
    model: Any
    tokenizer: Any
    train: Any  # TextDataset
    val: Any


def pipeline_setup(n_train: int, n_val: int, seed: int = 0) -> PipelineSetup:
    """The embedded default model (random LoRA init, lora_B nonzero) and a Rotten Tomatoes split."""
    from hyperinf_ext.data import load_rotten_tomatoes, split_dataset
    from hyperinf_ext.training import load_lora_model, load_tokenizer

    model = load_lora_model(seed=seed)
    randomize_lora_B(model, seed=seed)
    tok = load_tokenizer()
    train, val = split_dataset(load_rotten_tomatoes(), n_train, n_val, seed=seed)
    return PipelineSetup(model, tok, train, val)


def rank_first(layer, grads: list[torch.Tensor]) -> torch.Tensor:
    """Weight (and bias) gradient of one layer in the library's rank-first layout [r, d]."""
    gw = grads[0]
    if layer.kind == "lora_B":
        return gw.T
    if len(grads) > 1:  # head with bias: bias gradient as the last column
        return torch.cat([gw, grads[1][:, None]], 1)
    return gw


def forward_backward(model, loaders: Iterable, layers) -> None:
    """The same batched forward + backward HyperINF runs, with no hooks: the model's own cost."""
    from hyperinf_ext.capture import default_loss_fn

    params = [p for l in layers for p in l.parameters]
    model.eval()
    for loader in loaders:
        for batch in loader:
            with torch.enable_grad():
                loss = default_loss_fn(model, batch).sum()
                torch.autograd.grad(loss, params, allow_unused=True)


def default_damping() -> tuple[Any, float]:
    """The (rule, scale) HyperINF uses with its default configuration (read from the library)."""
    from hyperinf_ext.attributor import HyperINFConfig

    cfg = HyperINFConfig()
    try:
        from hyperinf_ext.damping import resolve
    except ImportError:  # older library: no "auto" rule
        return cfg.damping, getattr(cfg, "damping_scale", None) or 0.1
    return resolve(cfg.method, cfg.damping, cfg.damping_scale)


def bs1_pipeline(model, train_loader, val_loader, layers, *, dtype=torch.float64, damping: Any = None,
                 damping_scale: float | None = None, second_pass: int | None = None) -> dict[str, Any]:
    """The paper's code path, influence of every training example on the mean validation loss.

    1. for each training example at batch size 1: forward/backward, collect the LoRA (and head)
       gradients, ``G_l += g_lᵀ·g_l`` per layer (float64, as our default);
    2. G_l /= n; damping λ_l by the same rule as ours (default: HyperINF's default rule, see
       :func:`default_damping`); inverse of G_l + λ_l·I by the paper's Schulz
       (X₀ = 5e-5·I, 30 iterations) — and, for the accuracy check, by a float64 Cholesky solve;
    3. the mean validation gradient (batch size 1 over the validation set), q̃_l = v_l·H_l⁻¹;
    4. a second batch-size-1 pass over the training set: score_k = −Σ_l ⟨q̃_l, g_k,l⟩ (over the first
       ``second_pass`` examples only when given: the caller extrapolates its time).

    Returns {"scores_paper", "scores_exact" (NaN where not scored), "scored" (bool mask), "stages":
    {name: seconds}, "paper_status", "damping", "second_pass": (examples scored, n, seconds)}.
    """
    from hyperinf_ext.capture import default_loss_fn
    from hyperinf_ext.damping import layer_damping

    if damping is None:
        damping, default_scale = default_damping()
        damping_scale = default_scale if damping_scale is None else damping_scale
    damping_scale = 0.1 if damping_scale is None else damping_scale
    params_of = [l.parameters for l in layers]
    params = [p for ps in params_of for p in ps]
    stages = {"forward/backward": 0.0, "gfim": 0.0, "inverse": 0.0, "dot": 0.0}
    model.eval()

    def example_grads(batch):
        t0 = time.perf_counter()
        with torch.enable_grad():
            loss = default_loss_fn(model, batch).sum()
            flat = torch.autograd.grad(loss, params, allow_unused=True)
        out, i = [], 0
        for layer, ps in zip(layers, params_of):
            gs = [g if g is not None else torch.zeros_like(p) for g, p in zip(flat[i:i + len(ps)], ps)]
            out.append(rank_first(layer, gs).to(dtype))
            i += len(ps)
        stages["forward/backward"] += time.perf_counter() - t0
        return out

    G = [torch.zeros(l.dim, l.dim, dtype=dtype) for l in layers]
    n = 0
    for batch in train_loader:
        gs = example_grads(batch)
        t0 = time.perf_counter()
        for Gl, g in zip(G, gs):
            Gl += g.T @ g
        n += 1
        stages["gfim"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    X_paper, X_exact, status = [], [], []
    for Gl, layer in zip(G, layers):
        Gl /= n
        lam = layer_damping(damping, Gl, layer.rank, damping_scale)
        A = Gl.clone()
        A.diagonal().add_(lam)
        X = paper_schulz(A)
        X_paper.append(X)
        status.append(schulz_status(A, X, 1e-2)[0][0])
        X_exact.append(torch.cholesky_inverse(torch.linalg.cholesky(A)))
    stages["inverse"] += time.perf_counter() - t0

    v = [torch.zeros(l.rank, l.dim, dtype=dtype) for l in layers]
    m = 0
    for batch in val_loader:
        for vl, g in zip(v, example_grads(batch)):
            vl += g
        m += 1
    q_paper = [(vl / m) @ X for vl, X in zip(v, X_paper)]
    q_exact = [(vl / m) @ X for vl, X in zip(v, X_exact)]

    s_paper, s_exact, index = [], [], []
    t_pass2 = time.perf_counter()
    for batch in train_loader:
        if second_pass is not None and len(index) >= second_pass:
            break
        gs = example_grads(batch)
        t0 = time.perf_counter()
        s_paper.append(-sum(float((q * g).sum()) for q, g in zip(q_paper, gs)))
        s_exact.append(-sum(float((q * g).sum()) for q, g in zip(q_exact, gs)))
        index.append(int(batch["index"][0]) if "index" in batch else len(index))
        stages["dot"] += time.perf_counter() - t0
    t_pass2 = time.perf_counter() - t_pass2
    sp = torch.full((n,), float("nan"), dtype=torch.float64)
    se = torch.full((n,), float("nan"), dtype=torch.float64)
    scored = torch.zeros(n, dtype=torch.bool)
    idx = torch.tensor(index, dtype=torch.long)
    sp[idx] = torch.tensor(s_paper, dtype=torch.float64)
    se[idx] = torch.tensor(s_exact, dtype=torch.float64)
    scored[idx] = True
    return {"scores_paper": sp, "scores_exact": se, "scored": scored, "stages": stages, "paper_status": status,
            "damping": (damping, damping_scale), "second_pass": (len(index), n, t_pass2)}


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max_k |a_k − b_k| / max_k |b_k| (relative to the largest reference score)."""
    a64, b64 = a.double(), b.double()
    den = float(b64.abs().max())
    return float((a64 - b64).abs().max()) / den if den > 0 else float((a64 - b64).abs().max())
