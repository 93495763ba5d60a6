"""What a Schulz inverse reports: :class:`SchulzInfo` (the ops return it; their checks format it)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SchulzInfo:
    """Diagnostics of a Schulz inverse, one entry per matrix of the batch (shape = A.shape[:-2]).

    residual is ‖I − A·X‖_F, an upper bound of the relative error ‖X − A⁻¹‖₂/‖A⁻¹‖₂.  tol is the
    acceptance bound on it; extra["stop"] is where the iteration was told to stop (0.0: at the dtype's
    rounding floor, float32's default) and extra["scale_exponent"] the power of two each matrix was
    scaled by (0 for matrices within 2^±64).  "overflow": converged, but the inverse is beyond the
    dtype's range once the scaling is undone.
    """

    iterations: torch.Tensor  # int64
    residual: torch.Tensor  # float64
    status: list[str]  # "converged" | "stagnated" | "max_iter" | "diverged" | "overflow", flattened batch order
    lower: torch.Tensor  # float64, the lower spectral bound used (0 = none)
    upper: torch.Tensor  # float64, the upper spectral bound used
    backend: str
    tol: float
    extra: dict = field(default_factory=dict)

    @property
    def converged(self) -> bool:
        return all(s == "converged" for s in self.status)
