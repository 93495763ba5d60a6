"""The settings of an attributor (``HyperINFConfig``), the sign convention of its scores and the query
gradients it can reuse; the attributor, the fitting pass, scoring and persistence all read these."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

from .cache import CACHE_MODES
from ..curvature.damping import check_rule, damp_layers
from ..curvature.methods import CURVATURE_SOLVERS, METHODS, LayerFactor, check_solver, make_method, resolve

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
        if self.layers is not None:
            # a bare string would be read as a list of one-letter substrings, matching nearly every layer
            if isinstance(self.layers, str) or not all(isinstance(n, str) and n for n in self.layers):
                raise ValueError(f"layers: expected a list of layer names (or None), got {self.layers!r}")
            self.layers = list(self.layers)
        if not isinstance(self.include_heads, bool):
            raise ValueError(f"include_heads: expected True or False, got {self.include_heads!r}")
        if self.backend is not None and not isinstance(self.backend, str):
            raise ValueError(f"backend: expected a backend name or None, got {self.backend!r}")
        # Out of range, each of these runs without error and gives other numbers (a LiSSA of no steps is
        # TracIn, a negative scale flips the damping's sign), so it is refused here, where it enters.
        if self.damping_scale is not None:
            self.damping_scale = _positive("damping_scale", self.damping_scale)
        if self.tol is not None:
            self.tol = _positive("tol", self.tol)
        self.lissa_scale_factor = _positive("lissa_scale_factor", self.lissa_scale_factor)
        if isinstance(self.lissa_depth, bool) or not isinstance(self.lissa_depth, int) or self.lissa_depth < 1:
            raise ValueError(f"lissa_depth: expected a whole number of recursion steps ≥ 1, got {self.lissa_depth!r}")


FIXED_BY_FIT = ("layers", "include_heads", "dtype", "gfim_dtype", "grad_dtype", "cache")
"""Settings the fitted factors and cached gradients were made with: changing them needs a new fit."""


def config_defaults() -> dict[str, object]:
    """Every setting's default value (``use(option=None)`` restores these)."""
    return {f.name: f.default for f in fields(HyperINFConfig)}


def method_of(config: HyperINFConfig):
    """The (unprepared) curvature method ``config`` names, with its options."""
    return make_method(config.method, backend=config.backend, tol=config.tol, depth=config.lissa_depth,
                       scale_factor=config.lissa_scale_factor, solver=config.solver)


def check_method_options(config: HyperINFConfig) -> None:
    """Prepare the configured method on a 1×1 identity GFIM: refuses, before any data is read, what the
    method would refuse only after a fit (e.g. a closed form that divides by a damping of 0).  The method
    says what it refuses; nothing here names a method."""
    one = torch.ones(1, 1, dtype=torch.float64, device="cpu")  # the check runs whatever the default device
    probe = {"probe": LayerFactor("probe", 1, 1, one, 1, rank_sum=one.clone())}
    damp_layers(probe, *resolve(config.method, config.damping, config.damping_scale))
    # on the CPU with the default kernels: a backend meant for the fit's device is checked by the fit
    method_of(replace(config, backend=None)).prepare(probe)


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return float(value)


@dataclass
class QueryGradients:
    """Per-example gradients of a query set: index [Q] int64 and {layer: [Q, r, d]}."""

    index: torch.Tensor
    grads: dict[str, torch.Tensor]


def torch_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype of a config dtype name ("float32", "float64" or None)."""
    return {"float32": torch.float32, "float64": torch.float64, None: None}[name]
