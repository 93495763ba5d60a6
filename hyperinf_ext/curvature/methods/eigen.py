"""``eigen``: the GFIM's eigenbasis with eigenvalues re-fitted to the per-example second moments (the
eigenvalue correction of George et al.'s EK-FAC, 2018, applied to HyperINF's I_r ⊗ G).

With G = U·diag(e)·Uᵀ (d×d) and the flattened per-layer Fisher F = (1/n)·Σ_i vec(g_i)vec(g_i)ᵀ (r·d × r·d),
HyperINF's I_r ⊗ G gives every rank row a the eigenvalue e_k along u_k.  In the same basis I_r ⊗ U the
diagonal that best fits F (in Frobenius norm) is

    Λ[a, k] = (1/n)·Σ_i ((g_i·U)[a, k])²          (r×d; Σ_a Λ[a, k] = e_k, so trace(Λ) = trace(G))

and the preconditioner is q̃ = ((q·U) / (Λ + λ))·Uᵀ.  Where the rank rows of the gradient carry unequal
shares of a direction, the GFIM spreads e_k over all r of them; Λ puts it where it is.  For r = 1 it is
``exact``'s estimator.  Λ needs the per-example gradients projected on U, which exists only after the fit:
one more pass over the training gradients (the fit cache, or the loader), done on the first
preconditioning and kept until the next ``prepare`` (a new damping or fit) — so the method streams the
training gradients (``needs_train_pass``: no torch.distributed fit, no dattri adapter, no ``mix_queries``).
Damping "auto" = 1 × the mean of Λ (the "datainf" rule at scale 1: trace(G)/(r·d)), the analogue of
hyperinf's 1 × the mean eigenvalue of the matrix it inverts.
"""
from __future__ import annotations

import torch

from ..base import Method


class EigenCorrected(Method):
    """I_r ⊗ U from the GFIM, with the diagonal re-fitted per (rank row, eigenvector) from the training gradients."""

    name = "eigen"
    damping_default = ("datainf", 1.0)
    needs_train_pass = True

    def prepare(self, factors):
        self.basis = {}
        for n, f in factors.items():
            G = f.gfim.double()
            _, U = torch.linalg.eigh((G + G.T) / 2)
            self.basis[n] = U
        self.corrected: dict[str, torch.Tensor] | None = None  # Λ, [r, d] per layer: on first use

    def _correct(self, factors, train_batches) -> dict[str, torch.Tensor]:
        acc = {n: torch.zeros(f.rank, f.dim, dtype=torch.float64) for n, f in factors.items()}
        count, eps = 0, 0.0
        for grads in train_batches():
            for n, U in self.basis.items():
                p = torch.matmul(grads[n].to(torch.float64), U.to(grads[n].device))  # [B, r, d]
                acc[n] += p.square().sum(0).cpu()
                eps = max(eps, torch.finfo(grads[n].dtype).eps if grads[n].is_floating_point() else 0.0)
            count += next(iter(grads.values())).shape[0]
        if count == 0:
            raise ValueError("eigen: the training gradients are empty")
        out = {n: a / count for n, a in acc.items()}
        for n, lam in out.items():
            # along G's null space Λ is the rounding of the gradients' projections, not 0: dividing by it gives
            # 1e30-sized answers, so "zero" is relative to the gradients' precision (as singular to within it)
            floor = float(lam.max()) * eps * factors[n].dim if lam.numel() else 0.0
            if not factors[n].damping > 0 and not bool((lam > floor).all()):
                raise ValueError(f"damping: layer {n!r} has a corrected eigenvalue that is zero to within the "
                                 f"gradients' precision ({float(lam.min()):.3g} ≤ {floor:.3g}) and λ = 0 (nothing to "
                                 "divide by); use a positive damping")
        return out

    def precondition(self, q, factors, train_batches):
        if self.corrected is None:
            self.corrected = self._correct(factors, train_batches)
        out = {}
        for n, v in q.items():
            U = self.basis[n].to(v.device)
            scale = (self.corrected[n] + factors[n].damping).to(v.device)
            out[n] = torch.matmul(torch.matmul(v.double(), U) / scale, U.T)
        return out
