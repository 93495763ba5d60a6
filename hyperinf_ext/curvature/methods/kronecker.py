"""``kronecker``: the GFIM with its r×r factor beside the d×d one, F ≈ (G_r ⊗ G_d)/t with t = trace(G),
damped K-FAC style (π-split of λ between the factors)."""
from __future__ import annotations

import torch

from ... import solvers
from ..base import Method, layer_info


class Kronecker(Method):
    """Two-sided GFIM: corrects I_r ⊗ G_d with the rank-side factor G_r (both inverted by a verified solver).

    With t = trace(G_d) = trace(G_r) = trace(F), F ≈ (G_r/√t) ⊗ (G_d/√t).  The damping λ of the
    flattened curvature is split between the factors as in K-FAC: a = π√λ, b = √λ/π with
    π = √((t/r)/(t/d)) = √(d/r), so (G_r/√t + aI) ⊗ (G_d/√t + bI) ⊇ λI.
    """

    name = "kronecker"
    damping_default = ("spectral", 1.0)
    fits = ("gfim_sum", "rank_sum")

    def prepare(self, factors):
        self.left, self.right, self.info = {}, {}, {}
        solver = self.options.get("solver") or "auto"
        for n, f in factors.items():
            if f.rank_sum is None:
                raise ValueError("kronecker: the fit did not accumulate the rank-side factor")
            G_d = f.gfim
            G_r = f.rank_sum / max(f.count, 1)
            t = float(G_d.trace())
            root = t**0.5 if t > 0 else 1.0
            pi = (f.dim / f.rank) ** 0.5
            a, b = pi * f.damping**0.5, f.damping**0.5 / pi
            self.left[n], left = solvers.spd_inverse(G_r / root, a, solver=solver, backend=self.backend, polish=False)
            self.right[n], right = solvers.spd_inverse(G_d / root, b, solver=solver, backend=self.backend, polish=False)
            self.info[n] = {"left": layer_info(left, 0), "right": layer_info(right, 0)}

    def precondition(self, q, factors, train_batches):
        out = {}
        for n, v in q.items():
            v = v.to(self.right[n].dtype)
            # a Schulz inverse's residual bounds rows V·X; the rank-side one acts on columns: as Xᵀ·V
            out[n] = torch.matmul(torch.matmul(self.left[n].mT, v), self.right[n])
        return out
