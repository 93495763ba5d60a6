"""Matrix-free solvers of x·A = v: conjugate gradients, the Neumann series (LiSSA) and DataInf's form.

CG takes A explicitly ([..., d, d]); the Neumann series takes a product ``u ↦ u·A`` (LiSSA: a fresh
mini-batch curvature each step); DataInf needs only the training gradients.  The series and DataInf
work on one tensor or on a dict of tensors (one entry per layer, advanced together so a stream of
training batches is read once per step for all layers).
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, TypeVar

import torch

from .direct import Callback

T = TypeVar("T", torch.Tensor, Mapping[str, torch.Tensor])


def cg(
    A: torch.Tensor,
    V: torch.Tensor,
    *,
    max_iter: int,
    tol: float | None = None,
    callback: Callback | None = None,
    checkpoint: tuple[int, float] | None = None,
) -> tuple[torch.Tensor, int]:
    """Solve X·A = V row by row by conjugate gradients from X₀ = 0; returns (X, steps taken).

    A: [d, d] or [L, d, d] SPD; V: [..., d] (with 3-D A: [L, ..., d]), A's dtype.  Every row is its own
    CG run, all advanced together (one batched product per step).  A row whose residual is exactly
    zero, or whose curvature pᵀAp is not positive (only rounding does that for SPD A), is frozen at
    its iterate, since another step would divide by zero.  With ``tol`` the loop stops once every
    row's recursive residual is <= tol·‖v‖; otherwise it runs ``max_iter`` steps (no test, no extra
    work).  ``callback(t, X)`` sees the iterate (V's shape) after each step t.  ``checkpoint=(t, r)``:
    after step t, give up (return the iterate and t) unless every row's recursive residual is <= r·‖v‖ —
    a run that cannot finish within its step budget stops there instead of spending the rest.
    """
    d = A.shape[-1]
    A3 = A if A.dim() == 3 else A.unsqueeze(0)
    V3 = V.reshape(A3.shape[0], -1, d)
    X = torch.zeros_like(V3)
    R = V3.clone()
    P = R.clone()
    rs = (R * R).sum(-1, keepdim=True)
    stop = None if tol is None else (tol * tol) * rs
    check_at, needed = (0, None) if checkpoint is None else (checkpoint[0], (checkpoint[1] ** 2) * rs)
    for t in range(1, max_iter + 1):
        AP = torch.matmul(P, A3)  # rows: p·A (A symmetric)
        pAp = (P * AP).sum(-1, keepdim=True)
        active = (rs > 0) & (pAp > 0)
        alpha = torch.where(active, rs / torch.where(active, pAp, torch.ones_like(pAp)), torch.zeros_like(rs))
        X.addcmul_(alpha, P)
        R.addcmul_(alpha, AP, value=-1.0)
        rs_new = torch.where(active, (R * R).sum(-1, keepdim=True), torch.zeros_like(rs))
        beta = torch.where(active, rs_new / torch.where(active, rs, torch.ones_like(rs)), torch.zeros_like(rs))
        P.mul_(beta).add_(R)
        rs = rs_new
        if callback is not None:
            callback(t, X.reshape(V.shape))
        if stop is not None and bool((rs <= stop).all()):
            return X.reshape(V.shape), t
        if t == check_at and not bool((rs <= needed).all()):
            return X.reshape(V.shape), t
    return X.reshape(V.shape), max_iter


def _as_dict(x) -> tuple[dict, bool]:
    return ({"": x}, True) if isinstance(x, torch.Tensor) else (dict(x), False)


def _per_key(x, keys) -> dict:
    return dict(x) if isinstance(x, Mapping) else {k: x for k in keys}


def neumann(
    v: T,
    product: Callable[[T], T],
    scale: float | Mapping[str, float],
    iterations: int,
    *,
    callback: Callback | None = None,
) -> T:
    """Truncated Neumann series A⁻¹ = (1/s)·Σ_k (I − A/s)^k applied to v (LiSSA's recursion).

    u₀ = v; u_t = v + u_t−1 − product(u_t−1)/s for t = 1..iterations; returns u_T/s, which holds the
    first T+1 terms.  Converges when s > λmax(A) (per key when v is a dict and scale is one too).
    ``product(u)`` returns u·A — with a fresh mini-batch curvature each call this is LiSSA.
    ``callback(t, u_t/s)`` sees the estimate after each step.
    """
    vd, single = _as_dict(v)
    s = _per_key(scale, vd)
    prod = (lambda u: {"": product(u[""])}) if single else product
    u = {k: x.clone() for k, x in vd.items()}
    for t in range(1, iterations + 1):
        Hu = prod(u)
        for k in vd:
            # in place: with LiSSA's self-influence u is [chunk, r·d] over every layer (GBs for an LLM),
            # and the out-of-place update made three such temporaries per step
            h = Hu[k].clone() if Hu[k].data_ptr() == u[k].data_ptr() else Hu[k]
            u[k].sub_(h, alpha=1.0 / s[k]).add_(vd[k])
        if callback is not None:
            est = {k: u[k] / s[k] for k in u}
            callback(t, est[""] if single else est)
    out = {k: u[k] / s[k] for k in u}
    return out[""] if single else out


def fisher_product(u: torch.Tensor, g: torch.Tensor, damping: float) -> torch.Tensor:
    """u·(F_B + λI) for the mini-batch Fisher F_B = (1/B)·gᵀg: u [..., m], g [B, m] flattened gradients."""
    if u.dim() == 2:
        return torch.addmm(u, u @ g.T, g, beta=damping, alpha=1.0 / g.shape[0])  # one [Q, m] result, no temporaries
    return (u @ g.T) @ g / g.shape[0] + damping * u


def datainf(
    v: T,
    batches: Iterable[T],
    damping: float | Mapping[str, float],
    count: int | Mapping[str, int],
    *,
    callback: Callback | None = None,
) -> T:
    """Kwon et al.'s closed form (1/λ)·(v − (1/n)·Σ_i ⟨v, g_i⟩/(λ + ‖g_i‖²)·g_i).

    v: [Q, m] (or [m]) rows, or a dict of them; batches: the n training gradients g_i as [B, m]
    tensors (dicts with v's keys), streamed once; count = n (per key for dicts, or one int).
    Sherman–Morrison inverts each rank-one term g_iᵀg_i + λI exactly and averages the inverses
    instead of inverting the average:
    a fixed approximation of (F + λI)⁻¹, not a convergent iteration.  λ must be > 0.
    ``callback(t, estimate)`` sees the estimate from the first t batches (scaled to n).
    """
    vd, single = _as_dict(v)
    lam, n = _per_key(damping, vd), _per_key(count, vd)
    acc = {k: torch.zeros_like(x) for k, x in vd.items()}
    for t, batch in enumerate(batches, start=1):
        bd = {"": batch} if single else batch
        for k, x in vd.items():
            g = bd[k]
            coef = (x @ g.T) / (lam[k] + (g * g).sum(-1))  # [Q, B]
            acc[k].add_(coef @ g)
        if callback is not None:
            est = {k: (x - acc[k] / n[k]) / lam[k] for k, x in vd.items()}
            callback(t, est[""] if single else est)
    out = {k: (x - acc[k] / n[k]) / lam[k] for k, x in vd.items()}
    return out[""] if single else out
