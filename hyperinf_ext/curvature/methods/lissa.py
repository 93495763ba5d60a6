"""``lissa``: Agarwal et al.'s recursion on the flattened per-layer Fisher with mini-batch products:
u ← q + u − (H_B·u)/s, result u/s, with s ≥ λmax(G_l + λ_l I) so the series converges."""
from __future__ import annotations

import torch

from ... import ops, solvers
from ..base import GradBatches, Method, flat


class LiSSA(Method):
    """Agarwal et al. (2017) on the flattened per-layer Fisher F = (1/n)Σ vec(g_i)vec(g_i)ᵀ, convergent scale.

    u₀ = q; u_{j+1} = q + u_j − (u_j·(F_B + λI))/s over ``depth`` mini-batches B (cycling through the
    training gradients in order); returns u/s (``solvers.neumann`` with ``solvers.fisher_product``).
    The series converges when s > λmax(F + λI); since ⟨u, g⟩² ≤ r·Σ_a (u_a·g_a)², λmax(F) ≤
    min(r·λmax(G), trace(G)) with G the GFIM, so s = scale_factor·(min(r·ub(G), trace(G)) + λ), ub the
    cheap upper bound of ops.  (Research code that uses a fixed scale of 10 with the sign flipped
    diverges or solves the wrong system.)
    """

    name = "lissa"
    needs_train_pass = True

    def prepare(self, factors):
        self.scale = {}
        for n, f in factors.items():
            bound = min(f.rank * float(ops.spectral_upper_bound(f.gfim)), float(f.gfim.trace()))
            # the safety factor covers mini-batch fluctuations of F_B around F
            self.scale[n] = self.options.get("scale_factor", 1.5) * (bound + f.damping)

    def precondition(self, q, factors, train_batches):
        depth = int(self.options.get("depth", 100))
        qf = {n: flat(v).to(torch.float64) for n, v in q.items()}
        stream = _cycle(train_batches)

        def product(u: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            grads = next(stream)
            return {n: solvers.fisher_product(u[n], flat(grads[n]).to(torch.float64), factors[n].damping) for n in u}

        out = solvers.neumann(qf, product, {n: self.scale[n] for n in qf}, depth)
        return {n: out[n].reshape(q[n].shape) for n in qf}


def _cycle(train_batches: GradBatches):
    """The training gradient batches in order, again and again; ValueError if there are none."""
    while True:
        empty = True
        for grads in train_batches():
            empty = False
            yield grads
        if empty:
            raise ValueError("lissa: the training gradients are empty")
