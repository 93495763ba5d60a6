"""Baselines and references the benchmarks compare the library against.

Written here (the library is not used for them):
* :func:`gfim_loop_`         the paper's per-sample loop ``G += g_iᵀ·g_i``;
* :func:`gfim_batched_`      one batched GEMM over the stacked gradients (torch.baddbmm);
* :func:`bs1_pipeline`       the paper's batch-size-1 influence pipeline (see its docstring);
* :func:`forward_backward`   the model's own batched forward + backward, without hooks.
Baseline solvers come from ``hyperinf_ext.solvers`` (each algorithm has one home): the paper's
fixed-start Schulz (:func:`paper_schulz`), Cholesky (:func:`cholesky_inverse`) and conjugate
gradients for many right-hand sides at once (:func:`batched_cg`); float64 references
(:func:`inverse_f64`, :func:`solve_rows_f64`, one matrix at a time), the ``torch.linalg.inv`` baseline
(:func:`inv_per_matrix`) and the error measures (:func:`rel_err`, :func:`max_rel_diff`).
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable

import torch

from hyperinf_ext import solvers

from .inputs import default_damping

def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max over the leading batch of ‖x − ref‖_F / ‖ref‖_F, in float64 (nan/inf if x is)."""
    x64, r64 = x.double(), ref.double()
    if x64.dim() <= 2:
        x64, r64 = x64.unsqueeze(0), r64.unsqueeze(0)
    num = torch.linalg.vector_norm((x64 - r64).flatten(1), dim=1)
    den = torch.linalg.vector_norm(r64.flatten(1), dim=1)
    return float((num / den).max())


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


def paper_schulz(A: torch.Tensor, x0: float | None = None, iterations: int | None = None) -> torch.Tensor:
    """Schulz from the paper's fixed start (``hyperinf_ext.solvers.paper_schulz``; defaults 5e-5 and 30)."""
    kw = {k: v for k, v in dict(x0=x0, iterations=iterations).items() if v is not None}
    return solvers.paper_schulz(A, **kw)


def schulz_status(A: torch.Tensor, X: torch.Tensor, tol: float) -> tuple[list[str], torch.Tensor]:
    """Per matrix: 'converged' / 'not converged' / 'diverged' from the residual ‖I − A·X‖_F (float64)."""
    from hyperinf_ext.backends.schedule import divergence_limit

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


def _matrices(A: torch.Tensor) -> torch.Tensor:
    """A [..., d, d] as a [B, d, d] view (B = 1 for a single matrix)."""
    return A.reshape(-1, *A.shape[-2:])


def inverse_f64(A: torch.Tensor) -> torch.Tensor:
    """The float64 reference inverse: torch.linalg.solve(A, I) on A cast to float64, one matrix at a time.

    One at a time: torch 2.13's CPU build (MKL) fails batched LU solves/inverses ("Pivots given to
    lu_solve must all be greater or equal to 1") once the process has run with 2+ threads; single
    matrices are unaffected.
    """
    A64 = A.double()
    eye = torch.eye(A.shape[-1], dtype=torch.float64, device=A.device)
    return torch.stack([torch.linalg.solve(a, eye) for a in _matrices(A64)]).reshape(A64.shape)


def inv_per_matrix(A: torch.Tensor) -> torch.Tensor:
    """The ``torch.linalg.inv`` baseline, one matrix at a time (the batched call fails in torch 2.13's
    CPU build after set_num_threads(>= 2): see :func:`inverse_f64`)."""
    return torch.stack([torch.linalg.inv(a) for a in _matrices(A)]).reshape(A.shape)


def cholesky_inverse(A: torch.Tensor) -> torch.Tensor:
    """Direct baseline: Cholesky factor then torch.cholesky_inverse (``hyperinf_ext.solvers.cholesky_inverse``)."""
    return solvers.cholesky_inverse(A)


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
    """Reference V·A⁻¹ in float64 (A [L, d, d], V [L, k, d]; or A [d, d], V [k, d]), one matrix at a time
    (see :func:`inverse_f64` for why)."""
    A64, V64 = A.double(), V.double()
    if A64.dim() == 2:
        return torch.linalg.solve(A64, V64.transpose(-1, -2)).transpose(-1, -2)
    return torch.stack([torch.linalg.solve(a, v.transpose(-1, -2)).transpose(-1, -2) for a, v in zip(A64, V64)])


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
    from hyperinf_ext.curvature.damping import layer_damping

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
