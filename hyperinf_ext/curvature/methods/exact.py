"""``exact``: the GFIM + damping of ``hyperinf``, solved by a float64 Cholesky factorisation (the direct baseline)."""
from __future__ import annotations

from ... import solvers
from ..base import Method, layer_info


class Exact(Method):
    """GFIM + damping solved directly in float64 (Cholesky): the exact baseline."""

    name = "exact"
    # hyperinf's estimator solved by Cholesky (its reference): at hyperinf's damping, so the two agree at
    # their defaults instead of reading as if the exact inverse ranked worse (issue #16)
    damping_default = ("spectral", 1.0)
    reference_for = "hyperinf"

    def prepare(self, factors):
        self._factor = {n: solvers.Factorization(f.gfim.double(), f.damping, solver="cholesky")
                        for n, f in factors.items()}
        self.info = {n: layer_info(fac.info, 0) for n, fac in self._factor.items()}

    def precondition(self, q, factors, train_batches):
        return {n: self._factor[n].solve_rows(v.double().reshape(1, -1, v.shape[-1])).reshape(v.shape)
                for n, v in q.items()}
