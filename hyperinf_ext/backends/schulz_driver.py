"""The host loop of scaled Schulz, written once for the Python backends; a backend supplies its two GEMM steps.

The ``schulz_inverse(A, lower, upper, tol, max_iter, **options)`` of the torch and Triton backends is
a :class:`SchulzDriver`: one ``reference.SchulzSchedule`` per matrix takes every decision (start, β,
stop, status), the iterates live in two [B, d, d] buffers used alternately (so the previous iterate,
the stagnation rollback target, is always the other one), and the backend's :class:`SchulzSteps`
does the GEMMs: R = I − A·X with ‖R‖_F, then X_new = c1·X + c2·X·R.

Layouts (as ``ops/`` hands them over, unchecked): A [B, d, d] float32/float64 contiguous, lower and
upper [B] float64 spectral bounds.  Returns (X [B, d, d] A's dtype and device, iterations [B] int64,
residual [B] float64, status [B] int64), the last three on the CPU.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from .schedule import SchulzSchedule, update_coefficients

SchulzResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class SchulzSteps(Protocol):
    """A backend's two GEMMs of one Schulz step, on the matrices b with ``active[b]`` (the set only shrinks)."""

    def residual(self, X: torch.Tensor, R: torch.Tensor, active: list[bool]) -> list[float]:
        """R[b] = I − A[b]·X[b]; returns ‖R[b]‖_F per matrix (any value where not active).  X, R: [B, d, d]."""

    def update(self, X: torch.Tensor, R: torch.Tensor, out: torch.Tensor, coef: list[tuple[float, float]],
               active: list[bool]) -> None:
        """out[b] = c1·X[b] + c2·X[b]·R[b] with (c1, c2) = coef[b]; out is neither X nor R."""


class SchulzDriver:
    """``schulz_inverse(A, lower, upper, tol, max_iter, **options)`` over the steps ``make_steps(A, **options)``.

    ``one_at_a_time``: run the loop on each matrix in turn (buffers of one matrix, and a callback of
    the steps sees the iterates matrix after matrix) instead of on the whole batch at once.
    """

    def __init__(self, make_steps: Callable[..., SchulzSteps], *, one_at_a_time: bool = False, doc: str = "") -> None:
        self.make_steps, self.one_at_a_time = make_steps, one_at_a_time
        self.__doc__ = doc or type(self).__doc__  # the backend's own description of its schulz_inverse

    def __call__(self, A: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, tol: float, max_iter: int,
                 **options: Any) -> SchulzResult:
        lower, upper = lower.reshape(-1), upper.reshape(-1)
        if not self.one_at_a_time or A.shape[0] <= 1:
            return _iterate(A, lower.tolist(), upper.tolist(), tol, max_iter, self.make_steps(A, **options))
        X = torch.empty_like(A)
        info = []
        for i in range(A.shape[0]):
            Ai = A[i : i + 1]
            Xi, *rest = _iterate(Ai, lower[i : i + 1].tolist(), upper[i : i + 1].tolist(), tol, max_iter,
                                 self.make_steps(Ai, **options))
            X[i] = Xi[0]
            info.append(rest)
        iters, resid, status = (torch.cat(parts) for parts in zip(*info))
        return X, iters, resid, status


def _iterate(A: torch.Tensor, lower: list[float], upper: list[float], tol: float, max_iter: int,
             steps: SchulzSteps) -> SchulzResult:
    B, d, _ = A.shape
    schedules = [SchulzSchedule(d, tol, max_iter) for _ in range(B)]
    beta0 = [s.start(lo, up) for s, lo, up in zip(schedules, lower, upper)]
    bufs = (torch.zeros_like(A), torch.empty_like(A))
    bufs[0].diagonal(dim1=-2, dim2=-1).copy_(torch.tensor(beta0, dtype=A.dtype, device=A.device).unsqueeze(-1))
    R = torch.empty_like(A)
    coef = [(0.0, 0.0)] * B
    final_buf = [0] * B  # which of `bufs` holds the returned X of each matrix
    active = [True] * B
    cur = 0
    while any(active):
        norms = steps.residual(bufs[cur], R, active)
        for i, s in enumerate(schedules):
            if not active[i]:
                continue
            if s.decide(norms[i]) is not None:
                # On rollback X_{k-1} is intact in the other buffer: this round's update has not run.
                final_buf[i] = 1 - cur if s.rollback else cur
                active[i] = False
                continue
            coef[i] = update_coefficients(s.next_beta())
        if not any(active):
            break
        steps.update(bufs[cur], R, bufs[1 - cur], coef, active)
        cur = 1 - cur

    X = bufs[0]
    take = [i for i in range(B) if final_buf[i] == 1]
    if take:
        idx = torch.tensor(take, dtype=torch.int64, device=A.device)
        X[idx] = bufs[1][idx]
    iters = torch.tensor([s.iterations for s in schedules], dtype=torch.int64, device="cpu")
    resid = torch.tensor([s.residual for s in schedules], dtype=torch.float64, device="cpu")
    status = torch.tensor([s.status for s in schedules], dtype=torch.int64, device="cpu")
    return X, iters, resid, status
