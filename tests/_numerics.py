"""Explicit error slacks for numerical assertions, derived from the dtype and the conditioning.

A test that compares a computed quantity with a float64 reference must allow for the rounding of
both: BLAS libraries (MKL on Intel vs AMD, OpenBLAS) take different summation orders, so only the
a-priori bounds below are portable, never a measured value.  u is the unit roundoff (eps/2).
"""
from __future__ import annotations

import math

import torch

U64 = torch.finfo(torch.float64).eps / 2


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def cond2(A: torch.Tensor) -> torch.Tensor:
    """2-norm condition number of each SPD matrix of A [..., d, d] (float64 eigenvalues)."""
    ev = torch.linalg.eigvalsh(A.double())
    return ev[..., -1] / ev[..., 0]


def inverse_reference_slack(A: torch.Tensor) -> torch.Tensor:
    """Bound on the relative 2-norm error of a float64 reference inverse/solve of A, plus the
    rounding of a float64 residual: 2·d·u64·κ per matrix (backward-stable solvers, γ_d ≈ d·u)."""
    return 2 * A.shape[-1] * U64 * cond2(A)


def residual_slack(A: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """How far ‖I − A·X‖_F computed in ``dtype`` can be from the exact value when X ≈ A⁻¹:
    γ_d·‖|A|·|X|‖_F ≤ d·u·√d·κ (Higham, Accuracy and Stability, §3.5)."""
    d = A.shape[-1]
    return d * math.sqrt(d) * unit_roundoff(dtype) * cond2(A)


def fro(x: torch.Tensor) -> float:
    """‖x‖_F in float64 without over- or underflow of the squares (scaled by max |x|)."""
    x = x.double()
    s = float(x.abs().max()) if x.numel() else 0.0
    if s == 0.0 or not math.isfinite(s):
        return s
    return s * float((x / s).norm())


def gfim_slack(grads: torch.Tensor, acc_dtype: torch.dtype) -> float:
    """Bound on ‖Σ gᵀg computed in acc_dtype − exact‖_F relative to ‖Σ gᵀg‖_F: γ_m·‖|g|ᵀ|g|‖_F/‖gᵀg‖_F
    with m the number of rows summed (n·r), plus the float64 reference's own γ_m."""
    g = grads.double().reshape(-1, grads.shape[-3] * grads.shape[-2], grads.shape[-1])
    m = g.shape[1]
    exact = torch.matmul(g.transpose(-1, -2), g)
    absprod = torch.matmul(g.abs().transpose(-1, -2), g.abs())
    ratio = fro(absprod) / max(fro(exact), 1e-300)
    return (m + 2) * (unit_roundoff(acc_dtype) + U64) * ratio


def rank_gram_slack(grads: torch.Tensor, acc_dtype: torch.dtype) -> float:
    """Bound on ‖Σ_i g_i·g_iᵀ computed in acc_dtype − exact‖_F relative to the exact sum, for grads
    [L, n, r, d]: the same γ_m bound as ``gfim_slack`` on the r×r side, with m = n·d products summed
    per entry (plus the float64 reference's own γ_m)."""
    L, n, r, d = grads.shape
    g = grads.double().permute(0, 2, 1, 3).reshape(L, r, n * d)
    exact = torch.matmul(g, g.transpose(-1, -2))
    absprod = torch.matmul(g.abs(), g.abs().transpose(-1, -2))
    ratio = fro(absprod) / max(fro(exact), 1e-300)
    return (n * d + 2) * (unit_roundoff(acc_dtype) + U64) * ratio


def iterations_agree(it_a: torch.Tensor, it_b: torch.Tensor, stop: float) -> bool:
    """Iteration counts of two backends on the same input.  Stopping at a tolerance above the
    rounding noise, they take the same decisions; stopping at the rounding floor (float32's default,
    stop = 0), the last step's stagnation test compares residuals made of rounding noise, which another
    summation order can move by a step or two."""
    if stop > 0:
        return torch.equal(it_a, it_b)
    return bool(((it_a - it_b).abs() <= 2).all())


def inverses_agree(X: torch.Tensor, Xr: torch.Tensor, A: torch.Tensor, res: torch.Tensor, res_r: torch.Tensor,
                   dtype: torch.dtype) -> bool:
    """Two approximate inverses of A [..., d, d], each within its residual of A⁻¹ (up to the residuals'
    rounding s in ``dtype``): ‖X − Xr‖₂/‖Xr‖₂ ≤ (r + r_r + 2s)/(1 − r_r − s), per matrix."""
    d = A.shape[-1]
    A3, X3, R3 = A.double().reshape(-1, d, d), X.double().reshape(-1, d, d), Xr.double().reshape(-1, d, d)
    s = residual_slack(A3, dtype)
    r, rr = res.double().reshape(-1), res_r.double().reshape(-1)
    diff = torch.linalg.matrix_norm(X3 - R3, 2) / torch.linalg.matrix_norm(R3, 2)
    return bool((diff <= (r + rr + 2 * s) / (1 - rr - s).clamp_min(1e-3)).all())


def gfim_acc_slack(grads: torch.Tensor, acc_dtype: torch.dtype, acc0: torch.Tensor | None = None,
                   norm: str = "fro", input_roundoff: float = 0.0) -> float:
    """Bound on ‖acc − ref‖/‖ref‖ for acc = acc0 + Σ_rows gᵀg accumulated in ``acc_dtype`` from grads
    [L, m, d] (already rounded to the dtype the op sees), ref the float64 einsum of the same values:
    each entry sums m products plus acc0, so |acc − ref| ≤ γ_{m+1}·(|acc0| + |g|ᵀ|g|) entrywise
    (any order, FMA or not: Higham §3.1), plus the reference's own γ_{m+1} in float64.  ``norm`` is
    "fro" (‖·‖_F) or "max" (max |·|).  A missing row panel, layer, chunk or a transposed operand moves
    whole entries by O(1) relative to ‖ref‖ and stays far above this.  ``input_roundoff``: the unit
    roundoff the op rounds its inputs to before multiplying, where the reference does not (TF32:
    2⁻¹¹), adding (2u_in + u_in²)·|g|ᵀ|g| per entry."""
    g = grads.double().reshape(-1, grads.shape[-2], grads.shape[-1])
    m = g.shape[1]
    exact = torch.matmul(g.transpose(-1, -2), g)
    absprod = torch.matmul(g.abs().transpose(-1, -2), g.abs())
    if acc0 is not None:
        a0 = acc0.double().reshape(exact.shape)
        exact, absprod = exact + a0, absprod + a0.abs()
    if norm == "max":
        num, den = float(absprod.abs().max()), float(exact.abs().max())
    else:
        num, den = fro(absprod), fro(exact)
    u_in = 2 * input_roundoff + input_roundoff**2
    return ((m + 3) * (unit_roundoff(acc_dtype) + U64) + u_in) * num / max(den, 1e-300)


def agree_slack(slack: float) -> float:
    """Two results each within ``slack`` (relative) of one exact value are within 2·slack/(1 − slack)
    of each other, relative to either of them."""
    return 2 * slack / (1 - slack)


def schulz_runs_agree(it_a: torch.Tensor, st_a: torch.Tensor, it_b: torch.Tensor, st_b: torch.Tensor,
                      A: torch.Tensor, dtype: torch.dtype, tol: float) -> bool:
    """Statuses and iteration counts of two Schulz runs on the same batch A [B, d, d], per matrix.
    Where ``tol`` is above the rounding of the computed residual (residual_slack in ``dtype``), both
    runs take the same stopping decisions: status and count are equal.  Where it is not, the stop
    (converged below tol, or stagnated at the rounding floor just above it) is decided by rounding
    noise that another summation order moves: either of converged/stagnated, counts within 2
    (iterations_agree's rule for stop = 0).  Diverged and max-iter statuses must always agree."""
    from hyperinf_ext.backends import schedule as reference

    noisy = (residual_slack(A, dtype) >= tol).reshape(-1)
    it_a, it_b, st_a, st_b = (t.reshape(-1) for t in (it_a, it_b, st_a, st_b))
    soft = {reference.CONVERGED, reference.STAGNATED}
    for i in range(it_a.numel()):
        sa, sb = int(st_a[i]), int(st_b[i])
        if bool(noisy[i]):
            if not (sa == sb or {sa, sb} <= soft) or abs(int(it_a[i]) - int(it_b[i])) > 2:
                return False
        elif sa != sb or int(it_a[i]) != int(it_b[i]):
            return False
    return True


# torch 2.13's CPU build (MKL) fails batched LU — torch.linalg.inv/solve on a [B>1, d, d] input —
# with "Pivots given to lu_solve must all be greater or equal to 1" once any torch.set_num_threads(n>=2)
# has run in the process (the CLI's --threads restore, test_cpp_ops' thread sweep); one matrix at a
# time is unaffected.  The references below go matrix by matrix so test order cannot break them.
def ref_inv(A: torch.Tensor) -> torch.Tensor:
    """torch.linalg.inv of each matrix of A [..., d, d], one LU at a time (same dtype as A)."""
    if A.dim() == 2:
        return torch.linalg.inv(A)
    flat = A.reshape(-1, *A.shape[-2:])
    return torch.stack([torch.linalg.inv(a) for a in flat]).reshape(A.shape)


def ref_solve(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """torch.linalg.solve(A, B) for A [..., d, d] and B [..., d, k] or [d] (broadcast as linalg.solve
    does), one LU at a time."""
    if A.dim() == 2:
        return torch.linalg.solve(A, B)
    vector = B.dim() == A.dim() - 1
    Bm = B.unsqueeze(-1) if vector else B
    shape = torch.broadcast_shapes(A.shape[:-2], Bm.shape[:-2])
    Af = A.expand(*shape, *A.shape[-2:]).reshape(-1, *A.shape[-2:])
    Bf = Bm.expand(*shape, *Bm.shape[-2:]).reshape(-1, *Bm.shape[-2:])
    X = torch.stack([torch.linalg.solve(a, b) for a, b in zip(Af, Bf)]).reshape(*shape, *Bm.shape[-2:])
    return X.squeeze(-1) if vector else X


def _rms_norm_in_input_dtype(self, h):
    return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def float64_rms_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Patch every LlamaRMSNorm of ``model`` to compute in its input's dtype (returns ``model``): transformers'
    casts to float32 and back, which rounds every backpropagated signal to float32, so a float64 model would
    not be float64 end to end and a float64 brute force could not be matched to 1e-8."""
    import types

    for m in model.modules():
        if type(m).__name__ == "LlamaRMSNorm":
            m.forward = types.MethodType(_rms_norm_in_input_dtype, m)
    return model

