"""``paper``: the HyperINF paper's code path — Schulz from X₀ = 5e-5·I for a fixed 30 iterations (no
scaling, no residual test); kept as a baseline, it diverges when λmax > 4·10⁴."""
from __future__ import annotations

import torch

from ... import solvers
from ..damping import DEFAULT_SCALE
from .hyperinf import HyperINFMethod


class PaperSchulz(HyperINFMethod):
    """The paper's code: X₀ = 5e-5·I, 30 unscaled Schulz steps, no convergence test (a baseline)."""

    name = "paper"
    damping_default = ("paper", DEFAULT_SCALE)
    X0_SCALE = solvers.PAPER_X0
    ITERATIONS = solvers.PAPER_ITERATIONS

    def prepare(self, factors):
        self.info = {}
        for n, f in factors.items():
            A, _ = solvers.damp(f.gfim, f.damping)
            X = solvers.paper_schulz(A, x0=self.X0_SCALE, iterations=self.ITERATIONS)
            self.state[n] = X
            resid = float(torch.linalg.matrix_norm(torch.eye(f.dim, dtype=A.dtype, device=A.device) - A @ X))
            self.info[n] = {"solver": "paper", "iterations": self.ITERATIONS, "residual": resid}
