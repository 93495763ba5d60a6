"""The solvers layer: every way this library applies or inverts G + λI, each written once.

* :mod:`.direct`  damping, symmetrising, Cholesky, residual checks
* :mod:`.schulz`  scaled Schulz (+ float32 → float64 polish) and the paper's fixed-start Schulz
* :mod:`.mixed`   mixed-precision Schulz: bf16/TF32 GEMMs, then float32 (``scaled_schulz(precision="mixed")``)
* :mod:`.krylov`  conjugate gradients, the Neumann series / LiSSA, DataInf's closed form
* :mod:`.cost`    the cost model behind ``solver="auto"``
* :mod:`.auto`    verified solves (pick, solve, check the residual or raise ConvergenceError)
* :mod:`.ihvp`    ``make_ihvp`` / ``inverse_hvp`` for one matrix or a stack (what ``ops`` exports)

Iterative solvers take ``callback(t, estimate)``, called once per step with the current estimate.
Data flows one way: methods / tasks / bench → solvers → ops → backends.
"""
from .auto import INVERSE_SOLVERS, SOLVER_CHOICES, Factorization, SolveInfo, check_solver, solve_rows, spd_inverse
from .cost import Choice, choose
from .direct import (
    cholesky_factor,
    cholesky_inverse,
    cholesky_solve_rows,
    damp,
    inverse_residual,
    rows_residual,
    symmetrise,
)
from .krylov import cg, datainf, fisher_product, neumann
from .mixed import mixed_schulz
from .schulz import MIXED_PRECISIONS, PAPER_ITERATIONS, PAPER_X0, paper_schulz, scaled_schulz

__all__ = [
    "INVERSE_SOLVERS", "MIXED_PRECISIONS", "SOLVER_CHOICES", "Choice", "Factorization", "PAPER_ITERATIONS", "PAPER_X0", "SolveInfo", "cg",
    "check_solver", "cholesky_factor", "cholesky_inverse", "cholesky_solve_rows", "choose", "damp", "datainf",
    "fisher_product", "inverse_residual", "mixed_schulz", "neumann", "paper_schulz", "rows_residual", "scaled_schulz",
    "solve_rows", "spd_inverse", "symmetrise",
]
