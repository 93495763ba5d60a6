"""Influence methods as small strategy objects over fitted per-layer factors.

Every method turns query gradients q_l [Q, r, d] into preconditioned gradients q̃_l ≈ q_l·H_l⁻¹;
the attributor then scores train example k against query q as  −Σ_l ⟨q̃_l, g_k,l⟩  (see
``attributor.SIGN_CONVENTION``).  Curvatures:

* ``hyperinf``  H_l = G_l + λ_l·I with the GFIM G_l = (1/n)·Σ_i g_iᵀg_i (d×d, acting on the right of the
  rank-first gradient, i.e. I_r ⊗ G_l), inverted by the solver ``solver="auto"`` picks (scaled Schulz
  with λ_l as a lower spectral bound, or Cholesky; see ``solvers.cost``), verified either way.
* ``exact``     the same H_l, solved by a float64 Cholesky factorisation (the direct baseline).
* ``datainf``   Kwon et al.'s closed form for the flattened per-layer Fisher (1/n)Σ vec(g_i)vec(g_i)ᵀ + λI:
  q̃ = (1/λ)·(q − (1/n)·Σ_i ⟨q, g_i⟩/(λ + ‖g_i‖²)·g_i).
* ``lissa``     Agarwal et al.'s recursion on the same flattened Fisher with mini-batch products:
  u ← q + u − (H_B·u)/s, result u/s, with s ≥ λmax(G_l + λ_l I) so the series converges.
* ``kronecker`` the GFIM with its r×r factor beside the d×d one: F ≈ (G_r ⊗ G_d)/t, t = trace(G), with
  G_r = (1/n)Σ g_i g_iᵀ; damped K-FAC style (π-split of λ between the factors):
  q̃ = (G_r/√t + a·I)⁻¹·q·(G_d/√t + b·I)⁻¹, a = √(λ·d/r), b = √(λ·r/d) (Kronecker.prepare).
* ``tracin``    identity curvature: q̃ = q (plain gradient dot products).
* ``paper``     the HyperINF paper's code path: Schulz from X₀ = 5e-5·I for a fixed 30 iterations (no
  scaling, no residual test); kept as a baseline, it diverges when λmax > 4·10⁴.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from . import ops, solvers
from .damping import DAMPING_RULES, check_rule
from .solvers import check_solver  # noqa: F401  (re-exported: the attributor checks its config with it)

CURVATURE_SOLVERS = solvers.INVERSE_SOLVERS  # what hyperinf/kronecker accept as solver= (they keep inverses)
GradBatches = Callable[[], Iterable[dict[str, torch.Tensor]]]  # re-iterable: train grads per batch


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
    """Base strategy: ``prepare`` once after fit, then ``precondition`` query gradients."""

    name = "base"
    needs_train_pass = False  # True when preconditioning streams over train gradients

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


class TracIn(Method):
    name = "tracin"

    def precondition(self, q, factors, train_batches):
        return dict(q)


class HyperINFMethod(Method):
    """GFIM + damping, inverted per group of layers of equal d by a verified solver (``solvers.spd_inverse``).

    ``solver`` option: "auto" (default: the cost model picks scaled Schulz or Cholesky), "schulz"
    (float64 factors of d >= 128 with λmax/λ <= 1e4 run float32 Schulz + float64 polish to the same
    residual test) or "cholesky".  ``info[layer]`` records the solver, its residual and iterations.
    """

    name = "hyperinf"

    def prepare(self, factors):
        self.info = {}
        for d, names in groups_by_dim(factors).items():
            G = torch.stack([factors[n].gfim for n in names])
            lam = torch.tensor([factors[n].damping for n in names], dtype=torch.float64, device="cpu")
            X, info = solvers.spd_inverse(G, lam, solver=self.options.get("solver") or "auto", backend=self.backend,
                                          tol=self.options.get("tol"), polish=self.options.get("warm_start", True))
            for i, n in enumerate(names):
                self.state[n] = X[i]
                self.info[n] = _layer_info(info, i)

    def precondition(self, q, factors, train_batches):
        return {n: torch.matmul(v.to(self.state[n].dtype), self.state[n]) for n, v in q.items()}


def _layer_info(info: solvers.SolveInfo, i: int) -> dict:
    its = info.iterations
    return {"solver": info.solver, "residual": float(info.residual.reshape(-1)[i]),
            "iterations": None if its is None else int(torch.as_tensor(its, device="cpu").reshape(-1)[i]),
            "warm_start": bool(info.extra.get("warm_start", False)), "reason": info.reason}


class PaperSchulz(HyperINFMethod):
    """The paper's code: X₀ = 5e-5·I, 30 unscaled Schulz steps, no convergence test (a baseline)."""

    name = "paper"
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


class Exact(Method):
    """GFIM + damping solved directly in float64 (Cholesky): the exact baseline."""

    name = "exact"

    def prepare(self, factors):
        self._factor = {n: solvers.Factorization(f.gfim.double(), f.damping, solver="cholesky")
                        for n, f in factors.items()}
        self.info = {n: _layer_info(fac.info, 0) for n, fac in self._factor.items()}

    def precondition(self, q, factors, train_batches):
        return {n: self._factor[n].solve_rows(v.double().reshape(1, -1, v.shape[-1])).reshape(v.shape)
                for n, v in q.items()}


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


class DataInf(Method):
    """Kwon et al. (2024): Sherman–Morrison per sample on the flattened per-layer Fisher, averaged."""

    name = "datainf"
    needs_train_pass = True

    def prepare(self, factors):
        # (F + λI)⁻¹ ≈ (1/n)Σ_i (I − g_i g_iᵀ/(λ + ‖g_i‖²))/λ has no finite limit as λ → 0 (the
        # component of v outside the gradients' span is divided by λ), so λ = 0 has no answer.
        zero = [n for n, f in factors.items() if not f.damping > 0]
        if zero:
            raise ValueError(
                f"damping: DataInf's closed form needs λ > 0, got {factors[zero[0]].damping} for "
                f"{len(zero)} layer(s) (e.g. {zero[0]}); use a positive damping or damping_scale"
            )

    def precondition(self, q, factors, train_batches):
        qf = {n: _flat(v).to(torch.float64) for n, v in q.items()}  # [Q, r·d]
        batches = ({n: _flat(grads[n]).to(torch.float64) for n in qf} for grads in train_batches())
        out = solvers.datainf(qf, batches, {n: factors[n].damping for n in qf}, {n: factors[n].count for n in qf})
        return {n: out[n].reshape(q[n].shape) for n in q}


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
        qf = {n: _flat(v).to(torch.float64) for n, v in q.items()}
        stream = _cycle(train_batches)

        def product(u: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            grads = next(stream)
            return {n: solvers.fisher_product(u[n], _flat(grads[n]).to(torch.float64), factors[n].damping) for n in u}

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


class Kronecker(Method):
    """Two-sided GFIM: corrects I_r ⊗ G_d with the rank-side factor G_r (both inverted by a verified solver).

    With t = trace(G_d) = trace(G_r) = trace(F), F ≈ (G_r/√t) ⊗ (G_d/√t).  The damping λ of the
    flattened curvature is split between the factors as in K-FAC: a = π√λ, b = √λ/π with
    π = √((t/r)/(t/d)) = √(d/r), so (G_r/√t + aI) ⊗ (G_d/√t + bI) ⊇ λI.
    """

    name = "kronecker"

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
            self.info[n] = {"left": _layer_info(left, 0), "right": _layer_info(right, 0)}

    def precondition(self, q, factors, train_batches):
        out = {}
        for n, v in q.items():
            v = v.to(self.right[n].dtype)
            out[n] = torch.matmul(torch.matmul(self.left[n], v), self.right[n])
        return out


METHODS: dict[str, type[Method]] = {
    m.name: m for m in (HyperINFMethod, Exact, DataInf, LiSSA, TracIn, PaperSchulz, Kronecker)
}


def make_method(name: str, **options) -> Method:
    if name not in METHODS:
        raise ValueError(f"method: unknown method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name](**options)


# ------------------------------------------------------------------------------ lists of methods and dampings
# Messages name the parameter ("methods: ...", "damping: ..."), never a command-line option: the CLI
# reports them under its own option names.

Damping = float | str
"""A parsed damping: a float > 0, a rule name, or ``"rule:factor"`` (see :func:`parse_dampings`)."""


def parse_methods(value: str | Sequence[str], what: str = "methods") -> list[str]:
    """``"hyperinf,exact"`` or a list → validated method names (duplicates dropped, order kept).

    ``what`` names the parameter in error messages (e.g. ``"method"`` for a single choice).
    """
    items = [m.strip() for m in value.split(",")] if isinstance(value, str) else [str(m).strip() for m in value]
    items = [m for m in items if m]
    if not items:
        raise ValueError(f"{what}: no method given")
    for m in items:
        if m not in METHODS:
            raise ValueError(f"{what}: unknown method {m!r}; expected one of {', '.join(sorted(METHODS))}")
    return list(dict.fromkeys(items))


def parse_dampings(value: str | Sequence[float | str]) -> list[Damping]:
    """``"datainf,1e-3,spectral:3"`` or a list → validated dampings (floats must be > 0).

    ``rule:scale`` (e.g. ``spectral:3``) gives a rule its factor (``damping_scale``); it is kept as the
    normalised string ``"spectral:3"``, which :func:`split_damping` takes apart.
    """
    raw = [d.strip() for d in value.split(",")] if isinstance(value, str) else list(value)
    out: list[Damping] = []
    for d in raw:
        if isinstance(d, str) and ":" in d:
            out.append(_rule_with_factor(d))
            continue
        if isinstance(d, str):
            if not d:
                continue
            try:
                d = float(d)
            except ValueError:
                pass
        d = check_rule(d)  # its messages start with "damping: "
        # every method but tracin divides by λ (DataInf's 1/λ, the Schulz lower bound)
        if isinstance(d, float) and d <= 0:
            raise ValueError(f"damping: a numeric damping must be > 0, got {d}")
        out.append(d)
    if not out:
        raise ValueError("damping: no value given")
    return list(dict.fromkeys(out))


def _rule_with_factor(text: str) -> str:
    """``"spectral: 3"`` → ``"spectral:3"`` after checking the rule and its factor."""
    rule, _, factor = text.partition(":")
    try:
        scale = float(factor)
    except ValueError:
        raise ValueError(f"damping: {text!r}: the factor after ':' must be a number") from None
    rule = rule.strip()
    # a factor only scales a named rule; "auto" already picks each method's own factor
    if rule not in DAMPING_RULES or rule == "auto" or not (math.isfinite(scale) and scale > 0):
        named = "|".join(r for r in DAMPING_RULES if r != "auto")
        raise ValueError(f"damping: {text!r}: expected {named}:<factor > 0>")
    return f"{rule}:{scale:g}"


def damping_label(d: Damping) -> str:
    """A parsed damping as shown in tables and file columns (``0.001`` → ``"0.001"``)."""
    return f"{d:g}" if isinstance(d, float) else str(d)


def split_damping(d: Damping) -> tuple[float | str, float | None]:
    """A parsed damping → (rule, damping_scale or None): ``"spectral:3"`` → ("spectral", 3.0)."""
    if isinstance(d, str) and ":" in d:
        rule, _, factor = d.partition(":")
        return rule, float(factor)
    return d, None
