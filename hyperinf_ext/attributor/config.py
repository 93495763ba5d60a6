"""The settings of an attributor (``HyperINFConfig``), the sign convention of its scores and the query
gradients it can reuse; the attributor, the fitting pass, scoring and persistence all read these."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import CACHE_MODES
from ..curvature.damping import check_rule
from ..curvature.methods import CURVATURE_SOLVERS, METHODS, check_solver

SIGN_CONVENTION = (
    "score[q, k] = −Σ_l ⟨∇_l L_q · H_l⁻¹, ∇_l L_k⟩ ≈ dL_q/dε_k, the change of query q's loss when "
    "training example k is up-weighted: POSITIVE means example k INCREASES the query loss (harmful, "
    "e.g. a mislabeled example); negative means it helps."
)


@dataclass
class HyperINFConfig:
    """Every setting of an attributor; stored with saved factors."""

    method: str = "hyperinf"
    """Influence method: hyperinf | exact | datainf | lissa | tracin | paper | kronecker (one module each in curvature/methods/)."""
    damping: float | str = "auto"
    """Per-layer damping λ_l: a float, or a rule of damping.py ("datainf", "spectral", "paper", or
    "auto" = the method's default: spectral ×1 for hyperinf, chosen from bench/LDS.md and bench/QUALITY.md)."""
    damping_scale: float | None = None
    """The factor of the "datainf"/"spectral"/"paper" rules (None = the rule's default, 0.1, or the
    method default's under "auto")."""
    layers: list[str] | None = None
    """Names (or substrings) of the layers to use; None = every LoRA layer of the active adapter."""
    include_heads: bool = True
    """Also use trainable linear heads kept by PEFT's modules_to_save (e.g. a classifier)."""
    dtype: str = "float64"
    """dtype of the factors (GFIM, inverses) and of the preconditioned gradients."""
    gfim_dtype: str | None = "float32"
    """dtype of each batch's GFIM products and sums, which are then added to the running sum in
    ``dtype``: "float32" (fp32 GEMMs, about twice as fast on CPU; each batch's sum carries a relative
    rounding error of order 1e-7·√(batch·r)), "float64" (exact products of fp32 gradients), or None
    (= ``dtype``). Float64 gradients are always summed in float64."""
    grad_dtype: str | None = None
    """dtype in which per-sample gradients are captured and cached (None = the model's own)."""
    backend: str | None = None
    """Kernel backend for the GFIM and Schulz ops (None = fastest available)."""
    cache: str = "memory"
    """Where training gradients are kept between fit and scoring: memory | disk | none."""
    lissa_depth: int = 100
    """LiSSA: number of mini-batch recursion steps."""
    lissa_scale_factor: float = 1.5
    """LiSSA: safety factor on the spectral bound used as its scale."""
    tol: float | None = None
    """Schulz tolerance on ‖I − A·X‖_F (None = the dtype's default); also the residual test of the other solvers."""
    solver: str = "auto"
    """How hyperinf/kronecker invert G + λI: "auto" (the cost model of solvers/cost.py picks Schulz or
    Cholesky for the device, dtype, d and number of layers), "schulz" or "cholesky". Each inverse is
    verified; ``attr.method.info[layer]`` records the solver and its residual."""

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method: unknown method {self.method!r}; expected one of {sorted(METHODS)}")
        self.damping = check_rule(self.damping)
        check_solver(self.solver, allowed=CURVATURE_SOLVERS)
        if self.cache not in CACHE_MODES:
            raise ValueError(f"cache: unknown mode {self.cache!r}; expected one of {CACHE_MODES}")
        if (self.dtype not in ("float32", "float64") or self.grad_dtype not in (None, "float32", "float64")
                or self.gfim_dtype not in (None, "float32", "float64")):
            raise ValueError("dtype/grad_dtype/gfim_dtype: expected 'float32' or 'float64'")


@dataclass
class QueryGradients:
    """Per-example gradients of a query set: index [Q] int64 and {layer: [Q, r, d]}."""

    index: torch.Tensor
    grads: dict[str, torch.Tensor]


def torch_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype of a config dtype name ("float32", "float64" or None)."""
    return {"float32": torch.float32, "float64": torch.float64, None: None}[name]
