"""What every curvature method is: the fitted per-layer state it reads (:class:`LayerFactor`) and the
strategy interface (:class:`Method`), with the class attributes by which a method describes itself.

A method module (one per method in ``curvature/methods/``) defines one :class:`Method` subclass with a
``name``; defining it registers it (``Method.__init_subclass__``), and ``curvature.methods`` imports every
module of its folder, so adding a method is adding its module (and its test).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable

import torch

from .. import solvers
from .damping import DEFAULT_SCALE

GradBatches = Callable[[], Iterable[dict[str, torch.Tensor]]]  # re-iterable: train grads per batch
REGISTRY: dict[str, type["Method"]] = {}


@dataclass
class LayerFactor:
    """Fitted state of one layer: the GFIM sum over n samples, its rank-first shape and the damping."""

    name: str
    rank: int
    dim: int
    gfim_sum: torch.Tensor  # [d, d], Σ_i g_iᵀg_i in the factor dtype
    count: int  # n samples accumulated
    damping: float = 0.0
    rank_sum: torch.Tensor | None = None  # [r, r], Σ_i g_i·g_iᵀ: the rank-side factor (kronecker method)

    @property
    def gfim(self) -> torch.Tensor:
        """(1/n)·Σ_i g_iᵀg_i, [d, d]."""
        return self.gfim_sum / max(self.count, 1)


def groups_by_dim(factors: dict[str, LayerFactor]) -> dict[int, list[str]]:
    """Layer names grouped by d, so layers of equal d share one batched kernel call."""
    out: dict[int, list[str]] = {}
    for name, f in factors.items():
        out.setdefault(f.dim, []).append(name)
    return out

class Method:
    """Base strategy: ``prepare`` once after fit, then ``precondition`` query gradients.

    What a method says about itself (class attributes, read by the attributor, the damping rules, the
    saved state, torch.distributed and the commands — none of them names a method):

    * ``name``: the ``method=`` value; defining a subclass with a name registers it.
    * ``damping_default``: the (rule, scale) of ``damping="auto"``; None for a method without curvature.
    * ``needs_train_pass``: preconditioning streams over the training gradients (so no distributed fit
      and no dattri adapter).
    * ``fits``: the fitted statistics it reads from each :class:`LayerFactor` (``gfim_sum``, ``rank_sum``).
    * saved and shared state: every per-layer tensor it keeps in ``self.state`` is saved with the factors
      (and reused on load); every dict of per-layer data on the instance is computed once per layer and
      broadcast under torch.distributed.
    * ``reference_for``: the method whose estimator it solves exactly (tables mark the two as equal).
    """

    name: ClassVar[str] = "base"
    damping_default: ClassVar[tuple[str, float] | None] = ("datainf", DEFAULT_SCALE)
    needs_train_pass: ClassVar[bool] = False
    fits: ClassVar[tuple[str, ...]] = ("gfim_sum",)
    reference_for: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in vars(cls):
            if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
                raise TypeError(f"curvature method {cls.name!r} is defined twice ({REGISTRY[cls.name]} and {cls})")
            REGISTRY[cls.name] = cls

    @property
    def has_curvature(self) -> bool:
        return self.damping_default is not None

    def __init__(self, *, backend: str | None = None, **options):
        self.backend = backend
        self.options = options
        self.state: dict[str, torch.Tensor] = {}

    def prepare(self, factors: dict[str, LayerFactor]) -> None:
        """Per-layer work that depends on the factors only (inverses, factorizations)."""

    def precondition(
        self, q: dict[str, torch.Tensor], factors: dict[str, LayerFactor], train_batches: GradBatches
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def layer_info(info: solvers.SolveInfo, i: int) -> dict:
    """Matrix ``i`` of a batched solve's info, as the per-layer record methods keep in ``info``."""
    its = info.iterations
    return {"solver": info.solver, "residual": float(info.residual.reshape(-1)[i]),
            "iterations": None if its is None else int(torch.as_tensor(its, device="cpu").reshape(-1)[i]),
            "warm_start": bool(info.extra.get("warm_start", False)), "reason": info.reason}


def flat(x: torch.Tensor) -> torch.Tensor:
    """[n, r, d] → [n, r·d]: the flattened per-layer gradient of the methods on the flattened Fisher."""
    return x.reshape(x.shape[0], -1)
