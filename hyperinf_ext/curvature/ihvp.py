"""Gradients in, preconditioned gradients out: HyperINF's curvature for code that holds gradient dicts.

``make_ihvp(train_grads, ...)`` (``hyperinf_ext.make_ihvp`` with a dict or an iterable of dicts) lands here:

    ihvp = make_ihvp({"layer": grads_nrd, ...})          # or an iterable of such dicts (streamed)
    pre = ihvp({"layer": query_grads})                   # {"layer": q·(G + λI)⁻¹}, same shapes

Per layer, G = (1/n)·Σ_i g_iᵀg_i is accumulated from rank-first gradients g_i [r, d] (or flattened
[r·d] with ``shapes={name: (r, d)}``), damped by the rule of ``damping.py`` (``"auto"`` = HyperINF's
default) and inverted by the verified solver of :class:`methods.HyperINFMethod`.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

import math

from .. import ops
from ..solvers import ihvp as matrix_ihvp
from ..solvers.direct import unscaled_rows
from .damping import PAPER_ABSOLUTE, damp_layers, layer_damping
from .methods import CURVATURE_SOLVERS, HyperINFMethod, LayerFactor, check_solver, resolve

Shapes = Mapping[str, tuple[int, int]]


def _batches(train_grads) -> Iterable[Mapping[str, torch.Tensor]]:
    if isinstance(train_grads, Mapping):
        return [train_grads]
    if isinstance(train_grads, (torch.Tensor, str, bytes)) or not isinstance(train_grads, Iterable):
        raise ValueError("train_grads: expected a dict {layer: [n, r, d] tensor} or an iterable of such dicts, "
                         f"got {type(train_grads).__name__}")
    return train_grads


def _shape_of(name: str, shapes: Shapes | None) -> tuple[int, int] | None:
    if shapes is None or name not in shapes:
        return None
    rd = tuple(shapes[name])
    if len(rd) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in rd):
        raise ValueError(f"shapes[{name!r}]: expected (r, d) with positive ints, got {shapes[name]!r}")
    return rd  # type: ignore[return-value]


def _as_nrd(name: str, g: object, rd: tuple[int, int] | None) -> torch.Tensor:
    """One layer's training gradients as [n, r, d]: given so, or flattened [n, r·d] with shapes[name]."""
    where = f"train_grads[{name!r}]"
    ops.check_tensor(where, g, (2, 3))
    if g.dim() == 2:
        if rd is None:
            raise ValueError(f"{where}: flattened [n, m] gradients need shapes={{{name!r}: (r, d)}}")
        if g.shape[1] != rd[0] * rd[1]:
            raise ValueError(f"{where}: {g.shape[1]} values per example, but shapes[{name!r}] = {rd} "
                             f"needs {rd[0] * rd[1]}")
        return g.reshape(g.shape[0], *rd)
    if rd is not None and tuple(g.shape[1:]) != rd:
        raise ValueError(f"{where}: shape {tuple(g.shape)} does not match shapes[{name!r}] = {rd}")
    return g


_HIGH_EXPONENT = {torch.float32: 64, torch.float64: 512}  # half of each dtype's exponent range


def _pow2(k: int) -> torch.Tensor:
    return torch.tensor([float(k)], dtype=torch.float64, device="cpu")


def _scaled(g: torch.Tensor, k: int) -> torch.Tensor:
    if k == 0:
        return g
    return ops.ldexp(g.to(ops.compute_dtype(g.dtype)).unsqueeze(0), _pow2(-k))[0]


def _accumulate(acc: torch.Tensor, g3: torch.Tensor, k: int, backend: str | None, where: str) -> int:
    """acc += Σ (g·2^-k)ᵀ(g·2^-k); returns the exponent k for this layer from now on.

    The squares of gradients far from 1 leave the dtype (float64 gradients at 1e-170 square to 1e-340):
    the op refuses that, and a still-empty accumulator (PSD: a zero diagonal is a zero matrix; an O(d)
    test) is then refilled from the gradients scaled by a power of two — the only case in which they are
    read again.  A sum that grows past 2^(maxexp/2) is scaled down (with k) so later batches stay in range."""
    diag = torch.diagonal(acc)
    fresh = not bool(diag.any())
    try:
        ops.gfim_accumulate_(acc, _scaled(g3, k), backend=backend)
    except ValueError as exc:
        if not fresh or not bool(torch.isfinite(g3).all()):
            raise ValueError(f"{where}: {exc}") from None
        acc.zero_()
        k = int(ops.range_exponents(g3.abs().amax(), 0)[0])
        try:
            ops.gfim_accumulate_(acc, _scaled(g3, k), backend=backend)
        except ValueError as exc2:
            raise ValueError(f"{where}: {exc2}") from None
    top = float(diag.amax()) if diag.numel() else 0.0
    if top > 2.0 ** _HIGH_EXPONENT[acc.dtype]:
        j = (math.frexp(top)[1] + 1) // 2
        acc.copy_(ops.ldexp(acc.unsqueeze(0), _pow2(-2 * j))[0])
        k += j
    return k


def _absolute_damping(f: LayerFactor, k: int, absolute: float, rule, scale: float) -> int:
    """Set the damping of a layer whose gradients were scaled by 2^-k when its rule has a part given in the
    gradients' own units (a float λ, the paper's absolute term): that part is scaled by 2^-2k too, and
    where it then dwarfs the scaled G the factor is scaled down further (its new k returned), so that
    λ·2^-2k stays in range — the answer, about q/λ, is representable even where G is not."""
    relative = 0.0 if isinstance(rule, float) else layer_damping("datainf", f.gfim, f.rank, scale)
    top = max(float(torch.diagonal(f.gfim).amax()) if f.dim else 0.0, relative)
    shift = max(0, (math.frexp(absolute)[1] - 2 * k - (math.frexp(top)[1] if top > 0 else 0)) // 2)
    if shift:
        f.gfim_sum.copy_(ops.ldexp(f.gfim_sum.unsqueeze(0), _pow2(-2 * shift))[0])
        relative, k = math.ldexp(relative, -2 * shift), k + shift
    f.damping = relative + math.ldexp(absolute, -2 * k)
    return k


class GradientIHVP:
    """Fitted per-layer curvature; ``self(query)`` preconditions a dict of query gradients.

    ``factors`` ({layer: LayerFactor}: GFIM sum, count, rank, damping) and ``inverses`` ({layer:
    (G + λI)⁻¹ [d, d]}) are what to save; ``info[layer]`` records the solver and its residual.
    ``scale_exponents[layer]`` = k: that layer's factors, damping and inverse are those of its gradients
    times 2^-k (0 unless their squares would leave the dtype's range; queries are scaled to match).
    """

    def __init__(self, factors: dict[str, LayerFactor], dtypes: dict[str, torch.dtype], method: HyperINFMethod,
                 scale_exponents: dict[str, int] | None = None):
        self.factors, self.dtypes, self._method = factors, dtypes, method
        self.scale_exponents = {n: 0 for n in factors} if scale_exponents is None else scale_exponents
        self.inverses: dict[str, torch.Tensor] = method.state
        self.info: dict[str, dict] = method.info

    def __call__(self, query: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{layer: q [..., r, d] or flattened [..., r·d]} → {layer: q·(G + λI)⁻¹}, same shapes and dtypes."""
        if not isinstance(query, Mapping):
            raise ValueError(f"query: expected a dict {{layer: tensor}}, got {type(query).__name__}")
        missing, extra = set(self.factors) - set(query), set(query) - set(self.factors)
        if missing or extra:
            name = sorted(missing or extra)[0]
            what = "missing (fitted, not in the query)" if missing else "not fitted"
            raise ValueError(f"query[{name!r}]: layer {what}; fitted layers: {sorted(self.factors)}")
        out = {}
        for name, q in query.items():
            f, where = self.factors[name], f"query[{name!r}]"
            ops.check_tensor(where, q, tuple(range(1, 10)))
            if q.dtype != self.dtypes[name]:
                raise ValueError(f"{where}: dtype {q.dtype} does not match the fitted gradients' {self.dtypes[name]}")
            if q.dim() >= 2 and tuple(q.shape[-2:]) == (f.rank, f.dim):
                q3 = q
            elif q.shape[-1] == f.rank * f.dim:
                q3 = q.reshape(*q.shape[:-1], f.rank, f.dim)
            else:
                raise ValueError(f"{where}: shape {tuple(q.shape)} matches neither [..., {f.rank}, {f.dim}] nor "
                                 f"the flattened [..., {f.rank * f.dim}] of the fitted layer")
            ops.check_finite(where, q)
            k = self.scale_exponents.get(name, 0)
            if k == 0:
                pre = self._method.precondition({name: q3}, self.factors, lambda: iter(()))[name]
            elif q.numel() == 0:
                pre = q3
            else:  # q·(2^2k·A')⁻¹, A' the layer's scaled factor
                shape = q3.shape

                def solve(W: torch.Tensor, name=name, shape=shape) -> torch.Tensor:
                    return self._method.precondition({name: W.reshape(shape)}, self.factors, lambda: iter(()))[name]

                q1 = q3.to(ops.compute_dtype(q3.dtype)).reshape(1, -1, f.dim)
                pre = unscaled_rows(lambda W: solve(W).reshape(W.shape), q1, _pow2(2 * k))
            pre = pre.to(q.dtype)
            if not bool(torch.isfinite(pre).all()):  # a float16/bfloat16 query's answer can overflow its dtype
                raise ValueError(f"{where}: the preconditioned gradient is not finite in {q.dtype} (max |value| "
                                 f"{float(pre.abs().max() if pre.numel() else 0):.3g} after the cast from the solve's "
                                 "dtype); pass float32 gradients, or more damping")
            out[name] = pre.reshape(q.shape)
        return out


def make_gradient_ihvp(
    train_grads,
    *,
    damping: float | str = "auto",
    solver: str = "auto",
    shapes: Shapes | None = None,
    damping_scale: float | None = None,
    backend: str | None = None,
    tol: float | None = None,
) -> GradientIHVP:
    """Fit HyperINF's per-layer curvature on gradient dicts and return the preconditioner.

    train_grads: {layer: [n, r, d]} (rank-first, e.g. lora_A as r×d_in, lora_B transposed), or an
    iterable of such dicts (batches, streamed: memory independent of n), or flattened [n, r·d] tensors
    with ``shapes={layer: (r, d)}``.  Any float dtype; GFIMs are summed in float32 (float64 for
    float64 gradients).  damping: a float or a rule of ``damping.py`` ("auto" = HyperINF's default,
    ``METHOD_DEFAULTS["hyperinf"]`` of curvature.methods: today 1 × the mean eigenvalue); solver: "auto" | "schulz" | "cholesky" (verified: ConvergenceError
    otherwise).  Mismatched layers, shapes or dtypes raise ValueError naming the layer.
    """
    check_solver(solver, allowed=CURVATURE_SOLVERS)
    acc: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}
    exps: dict[str, int] = {}
    meta: dict[str, tuple[int, int, torch.dtype]] = {}
    for b, batch in enumerate(_batches(train_grads)):
        if not isinstance(batch, Mapping) or not batch:
            raise ValueError(f"train_grads: batch {b} is not a non-empty dict {{layer: tensor}}")
        if b and set(batch) != set(acc):
            name = sorted(set(batch) ^ set(acc))[0]
            raise ValueError(f"train_grads[{name!r}]: layer in batch {b} but not in every batch")
        for name, g in batch.items():
            g3 = _as_nrd(name, g, _shape_of(name, shapes))
            key = (g3.shape[1], g3.shape[2], g3.dtype)
            if name not in acc:
                meta[name] = key
                acc[name] = torch.zeros(g3.shape[2], g3.shape[2], dtype=ops.compute_dtype(g3.dtype), device=g3.device)
                count[name], exps[name] = 0, 0
            elif key != meta[name]:
                r, d, dt = meta[name]
                raise ValueError(f"train_grads[{name!r}]: batch {b} has [r, d] = {list(key[:2])}, {key[2]}; "
                                 f"earlier batches [{r}, {d}], {dt}")
            exps[name] = _accumulate(acc[name], g3, exps[name], backend, f"train_grads[{name!r}]")
            count[name] += g3.shape[0]
    if not acc:
        raise ValueError("train_grads: no batches")
    empty = [n for n, c in count.items() if c == 0]
    if empty:
        raise ValueError(f"train_grads[{empty[0]!r}]: no examples (n = 0)")
    factors = {name: LayerFactor(name, meta[name][0], meta[name][1], G_sum, count[name]) for name, G_sum in acc.items()}
    rule, scale = resolve("hyperinf", damping, damping_scale)
    damp_layers(factors, rule, scale)
    absolute = rule if isinstance(rule, float) else PAPER_ABSOLUTE if rule == "paper" else 0.0
    for name, k in exps.items():
        if k and absolute:
            exps[name] = _absolute_damping(factors[name], k, absolute, rule, scale)
    method = HyperINFMethod(backend=backend, tol=tol, solver=solver)
    method.prepare(factors)
    return GradientIHVP(factors, {n: m[2] for n, m in meta.items()}, method, exps)


def make_ihvp(
    G,
    *,
    damping: float | str | torch.Tensor = "auto",
    shapes: dict[str, tuple[int, int]] | None = None,
    damping_scale: float | None = None,
    **options,
):
    """Factor (G + damping·I) once and return ``apply(v) -> v·(G + damping·I)⁻¹``; or, given gradients, the same per layer.

    * ``G`` a tensor [d, d] or [L, d, d]: ``damping`` a number (or [L]); ``apply`` takes v [..., d]
      (for 3-D G: [L, ..., d]) and returns the same shape, in the promoted dtype of v and the compute
      dtype; ``apply.info`` records the solver and its verified residual (:class:`solvers.SolveInfo`).
    * ``G`` = ``train_grads``, a dict {layer: [n, r, d]} (or an iterable of such dicts, streamed; or
      flattened [n, r·d] with ``shapes={layer: (r, d)}``): returns a callable mapping query gradient
      dicts to preconditioned dicts of the same names and shapes, with ``.factors`` for saving
      (see :func:`make_gradient_ihvp`; ``damping`` "auto" = HyperINF's rule).

    ``options`` (:class:`hyperinf_ext.solvers.ihvp.SolverOptions`): solver (alias ``method``, its old
    name) "auto" (default: the cost model of ``solvers.cost``; Schulz when a ``backend`` is given),
    "schulz" (scaled, the damping as a free lower spectral bound) or "cholesky"; backend; tol.  The
    result is verified against ``tol`` or ConvergenceError is raised.
    """
    if isinstance(G, torch.Tensor):
        if isinstance(damping, str):
            raise ValueError(f"damping: expected a non-negative number (or an [L] tensor) for a matrix G, got "
                             f"{damping!r}; damping rules need the gradients (pass the gradient dict instead)")
        if shapes is not None or damping_scale is not None:
            raise ValueError("shapes/damping_scale: only with gradient dicts (train_grads)")
        return matrix_ihvp.make_ihvp(G, damping=damping, **options)
    solver, backend, tol = matrix_ihvp.solver_options(options, "make_ihvp")
    return make_gradient_ihvp(G, damping=damping, solver=solver, shapes=shapes, damping_scale=damping_scale,
                              backend=backend, tol=tol)
