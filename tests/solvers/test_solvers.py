"""The solvers layer against float64 references: awkward sizes, scales and dtypes; callbacks; auto."""
from __future__ import annotations

import math

import pytest
import torch

import hyperinf_ext as hx
from hyperinf_ext import ConvergenceError, ops, solvers
from hyperinf_ext.solvers import cost, ihvp
from _numerics import ref_inv, ref_solve

F64 = torch.float64


def spd(d: int, kappa: float, scale: float = 1.0, seed: int = 0, dtype=F64) -> torch.Tensor:
    """Q·diag(e)·Qᵀ with e log-spaced over [scale, scale·κ], built in float64, exactly symmetric."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    e = scale * torch.logspace(0, math.log10(kappa), d, dtype=F64)
    A = (Q * e) @ Q.T
    return (0.5 * (A + A.T)).to(dtype)


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm((x.double() - ref).flatten()) / torch.linalg.vector_norm(ref.flatten()))


def eps(dtype) -> float:
    return torch.finfo(ops.compute_dtype(dtype)).eps


CASES = [(1, 1.0, 1e-6), (3, 10.0, 1e4), (17, 1e3, 1e-3), (130, 1e3, 1.0)]  # (d, κ, scale)


# ---------------------------------------------------------------------------------------- inverses


@pytest.mark.parametrize("d, kappa, scale", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("solver", ["schulz", "cholesky", "auto"])
def test_spd_inverse_matches_float64(d, kappa, scale, dtype, solver):
    G = spd(d, kappa, scale, dtype=dtype)
    lam = 0.5 * scale  # the spectrum of G + λI lies in [1.5·scale, (κ + 0.5)·scale]
    X, info = solvers.spd_inverse(G, lam, solver=solver)
    A64 = G.double() + lam * torch.eye(d, dtype=F64)
    k = float(torch.linalg.cond(A64))
    assert X.dtype == ops.compute_dtype(dtype) and X.shape == (d, d) and torch.equal(X, X.T)
    assert info.solver in ("schulz", "cholesky") and (solver == "auto" or info.solver == solver)
    assert float(info.residual) <= info.tol
    # the residual bounds the relative error of the computed X; rounding of A itself adds ~κ·u
    assert rel(X, ref_inv(A64)) <= float(info.residual) + 20 * math.sqrt(d) * k * eps(dtype)


def test_schulz_polish_is_used_and_meets_float64_tol():
    G = torch.stack([spd(160, 1e2, seed=s) for s in range(2)])  # ub/λ <= 1e4: eligible for the float32 phase
    X, info = solvers.spd_inverse(G, 1.0, solver="schulz")
    assert info.extra["warm_start"] and bool((info.residual <= 1e-8).all())
    A = G + torch.eye(160, dtype=F64)
    assert rel(X, ref_inv(A)) < 1e-8 + 1e-10
    X2, info2 = solvers.spd_inverse(G, 1.0, solver="schulz", polish=False)
    assert not info2.extra["warm_start"] and rel(X2, ref_inv(A)) < 1e-8 + 1e-10


def test_scaled_schulz_callback_sees_every_iterate():
    A = spd(24, 1e3, 1e-2)
    seen = []
    X, info = solvers.scaled_schulz(A, lower=1e-2, callback=lambda t, X: seen.append((t, X.clone())))
    k = int(info.iterations)
    assert [t for t, _ in seen] == list(range(1, k + 1)) and info.converged and k > 3
    assert torch.equal(seen[-1][1], X)  # converged: the last iterate is the answer
    for t in (1, k // 2):  # the iterate seen at step t is what a budget of t steps returns
        Xt, it = ops.schulz_inverse(A, lower_bound=1e-2, max_iter=t, check=False, return_info=True, backend="torch")
        assert int(it.iterations) == t and torch.equal(seen[t - 1][1], Xt)
    with pytest.raises(ValueError, match="callback: per-step callbacks take one matrix"):
        ops.schulz_inverse(A.expand(2, 24, 24), callback=lambda t, X: None)
    with pytest.raises(ValueError, match="callback: only the torch"):
        ops.schulz_inverse(A, backend="cpp" if "cpp" in ops.available_backends("cpu") else "triton",
                           callback=lambda t, X: None)


def test_paper_schulz_callback_once_per_step():
    A = spd(12, 50.0, 1e-2)
    seen = []
    X = solvers.paper_schulz(A, iterations=6, callback=lambda t, X: seen.append((t, X.clone())))
    assert [t for t, _ in seen] == list(range(1, 7)) and torch.equal(seen[-1][1], X)
    for t, Xt in seen:
        assert torch.equal(Xt, solvers.paper_schulz(A, iterations=t))
    # from 5e-5·I it converges only while λmax < 4e4, and does so slowly: the baseline, unverified
    assert rel(solvers.paper_schulz(A, iterations=80), ref_inv(A)) < 1e-10


# ------------------------------------------------------------------------------------- row solvers


@pytest.mark.parametrize("d, kappa, scale", CASES)
def test_cg_rows_and_callback(d, kappa, scale):
    A = torch.stack([spd(d, kappa, scale, seed=s) for s in range(2)])
    V = torch.randn(2, 3, d, dtype=F64)
    ref = ref_solve(A, V.mT).mT
    seen = []
    X, steps = solvers.cg(A, V, max_iter=3 * d + 10, tol=1e-13, callback=lambda t, X: seen.append((t, X.clone())))
    assert [t for t, _ in seen] == list(range(1, steps + 1)) and torch.equal(seen[-1][1], X)
    k = kappa  # exact: the spectrum is constructed
    assert rel(X, ref) <= 10 * 1e-13 * k + 100 * d * k * eps(F64)
    # the iterate seen at step t is what t steps return
    t = max(1, steps // 2)
    assert torch.equal(seen[t - 1][1], solvers.cg(A, V, max_iter=t)[0])


def test_cg_checkpoint_gives_up_or_goes_on():
    A = spd(60, 1e4, 1e-2).unsqueeze(0)
    V = torch.randn(1, 3, 60, dtype=F64)
    # a residual target no 4 steps reach: it returns after step 4, with exactly 4 steps' iterate
    X, steps = solvers.cg(A, V, max_iter=200, tol=1e-12, checkpoint=(4, 1e-12))
    assert steps == 4 and torch.equal(X, solvers.cg(A, V, max_iter=4)[0])
    # a target every row has met (r = 1e6 > any residual growth): the run is the run without checkpoint
    X2, s2 = solvers.cg(A, V, max_iter=200, tol=1e-12, checkpoint=(4, 1e6))
    X3, s3 = solvers.cg(A, V, max_iter=200, tol=1e-12)
    assert s2 == s3 > 4 and torch.equal(X2, X3)


def test_cg_freezes_converged_rows():
    A = spd(4, 10.0)
    v = torch.zeros(2, 4, dtype=F64)
    v[1] = torch.randn(4, dtype=F64)
    X, _ = solvers.cg(A, v, max_iter=40)  # far past d: no 0/0
    assert torch.equal(X[0], torch.zeros(4, dtype=F64)) and bool(torch.isfinite(X).all())
    assert rel(X[1], ref_solve(A, v[1])) < 1e-12


def test_neumann_is_the_truncated_series():
    A = spd(6, 20.0, 0.1)
    v = torch.randn(6, dtype=F64)
    s = 1.5 * float(torch.linalg.eigvalsh(A)[-1])
    seen = []
    out = solvers.neumann(v, lambda u: A @ u, s, 5, callback=lambda t, est: seen.append(est.clone()))
    assert len(seen) == 5 and torch.equal(seen[-1], out)
    M = torch.eye(6, dtype=F64) - A / s
    for t, est in enumerate(seen, start=1):
        series = sum(torch.linalg.matrix_power(M, k) @ v for k in range(t + 1)) / s
        torch.testing.assert_close(est, series, rtol=1e-12, atol=0)
    far = solvers.neumann(v, lambda u: A @ u, s, 2000)
    assert rel(far, ref_solve(A, v)) < 1e-10
    # dict form: keys advance together, each with its own scale
    both = solvers.neumann({"a": v, "b": 2 * v}, lambda u: {k: A @ x for k, x in u.items()}, {"a": s, "b": s}, 5)
    torch.testing.assert_close(both["a"], out, rtol=0, atol=0)
    torch.testing.assert_close(both["b"], 2 * out, rtol=1e-15, atol=0)


def test_datainf_is_averaged_sherman_morrison():
    g = torch.randn(9, 5, dtype=F64)
    v = torch.randn(2, 5, dtype=F64)
    lam = 0.3
    eye = torch.eye(5, dtype=F64)
    avg = sum(ref_inv(torch.outer(x, x) + lam * eye) for x in g) / 9
    seen = []
    out = solvers.datainf(v, [g[:4], g[4:]], lam, 9, callback=lambda t, est: seen.append(t))
    torch.testing.assert_close(out, v @ avg, rtol=1e-12, atol=1e-14)
    assert seen == [1, 2]
    d = solvers.datainf({"x": v}, [{"x": g}], {"x": lam}, {"x": 9})
    torch.testing.assert_close(d["x"], out, rtol=1e-13, atol=0)


# ---------------------------------------------------------------------------------------- auto


def test_cost_model_picks():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    kw = dict(lower=1e-3, upper=1.0, tol=1e-8, dtype=F64)
    assert cost.choose(d=768, batch=12, rows=None, device=cpu, want="inverse", **kw).solver == "cholesky"
    assert cost.choose(d=768, batch=12, rows=None, device=cuda, want="inverse", **kw).solver == "schulz"
    many = cost.choose(d=64, batch=1, rows=10**7, device=cpu, **kw)
    assert many.solver == "schulz" and many.costs["schulz"] < many.costs["cholesky"]  # GEMM rows beat TRSM
    easy = cost.choose(d=2048, batch=1, rows=1, device=cpu, lower=1.0, upper=2.0, tol=1e-8, dtype=F64)
    assert easy.solver == "cg"  # κ ≤ 2: a few matrix-vector products beat any factorisation
    # CG must reach a residual tol/κ that rounding allows: not in float32 at κ = 1e3
    assert "cg" in cost.choose(d=2048, batch=1, rows=1, device=cpu, lower=1.0, upper=2.0, tol=1e-2,
                               dtype=torch.float32).costs
    assert "cg" not in cost.choose(d=2048, batch=1, rows=1, device=cpu, lower=1.0, upper=1e3, tol=1e-2,
                                   dtype=torch.float32).costs


@pytest.mark.parametrize("kappa", [2.0, 1e2, 1e4, 1e6])
def test_schulz_iteration_prediction_is_an_upper_bound(kappa):
    d, lam = 40, 1e-2
    A = spd(d, kappa, lam)
    _, info = ops.schulz_inverse(A, lower_bound=lam, return_info=True)
    predicted = cost.schulz_iterations(lam, float(ops.spectral_upper_bound(A)), d, info.tol)
    assert int(info.iterations) <= predicted <= int(info.iterations) + 8


def test_auto_records_solver_and_residual():
    G = spd(20, 1e3, 1e-3)
    v = torch.randn(3, 20, dtype=F64)
    out, info = ihvp.inverse_hvp(G, v, damping=1e-3, return_info=True)
    assert info.solver in cost.SOLVERS and "cost model" in info.reason and float(info.residual.max()) <= info.tol
    ref = ref_solve(G + 1e-3 * torch.eye(20, dtype=F64), v.T).T
    assert rel(out, ref) <= 1e-8
    apply = ihvp.make_ihvp(G, damping=1e-3)
    assert apply.info.solver in ("schulz", "cholesky") and rel(apply(v), ref) <= 1e-8
    # an explicit backend means that backend's Schulz
    assert ihvp.make_ihvp(G, damping=1e-3, backend="torch").info.solver == "schulz"


def test_unverified_answers_raise():
    G = spd(30, 1e8, 1.0, dtype=torch.float32)  # κ = 1e8 is beyond float32: no solver may pass its check
    for solver in ("auto", "schulz"):
        with pytest.raises(ConvergenceError):
            solvers.spd_inverse(G, 0.0, solver=solver)
    with pytest.raises(ConvergenceError, match="cholesky: relative residual"):
        solvers.spd_inverse(G, 0.0, solver="cholesky", tol=1e-2)
    # an explicit "cholesky" without tol is the direct baseline as before: residual recorded, not enforced
    _, info = solvers.spd_inverse(G, 0.0, solver="cholesky")
    assert info.solver == "cholesky" and float(info.residual) > 1e-2
    A = spd(30, 1e4, 1e-2)
    with pytest.raises(ConvergenceError, match="cg: relative residual"):
        solvers.solve_rows(A.unsqueeze(0), 1e-4, torch.randn(1, 2, 30, dtype=F64), solver="cg", max_iter=2)
    with pytest.raises(ConvergenceError, match="not positive definite"):
        solvers.spd_inverse(-torch.eye(3, dtype=F64), 0.0, solver="cholesky")
    # CG said "too ill-conditioned" for a non-symmetric G: named as the other solvers name it
    lopsided = A.clone()
    lopsided[0, 1] += 1.0
    with pytest.raises(ValueError, match="G: matrices must be symmetric"):
        solvers.solve_rows(lopsided.unsqueeze(0), 1e-2, torch.randn(1, 2, 30, dtype=F64), solver="cg")


def power_law_gfim(d: int, p: float, seed: int = 0) -> torch.Tensor:
    """Q·diag((i+1)^-p)·Qᵀ: the decaying spectrum of a LoRA layer's GFIM (max eigenvalue 1)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    G = (Q * torch.arange(1, d + 1, dtype=F64).pow(-p)) @ Q.T
    return 0.5 * (G + G.T)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_auto_picks_cg_on_few_rows_and_meets_its_bound(dtype):
    """A GFIM-like spectrum at HyperINF's damping, a few rows: CG within a step budget, verified.
    Error bound: the verified residual (κ_ub·relative residual bounds the relative error) plus the
    float64 reference's own 2·d·u64·κ."""
    d = 512
    G = power_law_gfim(d, 1.0).unsqueeze(0)
    lam = 0.1
    V = torch.randn(1, 2, d, dtype=F64)
    Y, info = solvers.solve_rows(G.to(dtype), lam, V.to(dtype))
    assert info.solver == "cg" and info.iterations < d
    choice_steps = int(info.reason.split("cg within ")[1].split(" steps")[0])
    assert info.iterations <= choice_steps
    A = G[0] + lam * torch.eye(d, dtype=F64)
    ref = ref_solve(A, V[0].T).T
    kappa = float(torch.linalg.eigvalsh(A).max()) / lam
    assert rel(Y[0], ref) <= float(info.residual.max()) + 2 * d * eps(F64) * kappa
    assert float(info.residual.max()) <= info.tol


def test_cost_model_budgets_cg_at_the_break_even():
    kw = dict(d=768, batch=2, rows=8, device=torch.device("cpu"), lower=1.0, upper=30.0, tol=1e-8, dtype=F64)
    c = cost.choose(**kw)
    assert c.solver == "cg" and c.cg_steps is not None
    rates = cost.CPU_RATES[F64]
    per_step = 2 * 2.0 * 8 * 768 * 768 / (rates["rows"] * 1e9) + rates["cg_step_s"]
    # the budget: where CG would cost what Cholesky costs (and never below the expected steps)
    assert c.cg_steps == max(math.ceil(c.costs["cg"] / per_step), math.floor(c.costs["cholesky"] / per_step))
    assert c.cg_steps * per_step <= c.costs["cholesky"] + per_step
    assert cost.choose(**{**kw, "rows": 2400}).cg_steps is None  # not CG: no budget


def test_auto_cg_that_lags_gives_up_at_half_its_budget(monkeypatch):
    A = spd(60, 1e4, 1e-2).unsqueeze(0)  # κ 1e4: 8 steps do not come near
    monkeypatch.setattr(cost, "choose", lambda **kw: cost.Choice("cg", "cost model (forced)", {}, 8))
    V = torch.randn(1, 2, 60, dtype=F64)
    Y, info = solvers.solve_rows(A, 1e-4, V)
    assert info.solver == "cholesky" and "after 4 steps (gave up at half its budget of 8)" in info.reason
    assert rel(Y[0], ref_solve(A[0] + 1e-4 * torch.eye(60, dtype=F64), V[0].T).T) <= float(info.residual.max()) + 1e-9


def test_auto_falls_back_from_cg_and_says_so(monkeypatch):
    A = spd(30, 1e4, 1e-2).unsqueeze(0)
    monkeypatch.setattr(cost, "choose", lambda **kw: cost.Choice("cg", "cost model (forced)"))
    Y, info = solvers.solve_rows(A, 1e-4, torch.randn(1, 2, 30, dtype=F64), max_iter=2)
    assert info.solver == "cholesky" and "fell back" in info.reason and float(info.residual.max()) <= info.tol


@pytest.mark.parametrize("bad, match", [
    (dict(solver="lu"), r"solver: unknown solver 'lu'"),
    (dict(method="lu"), r"method: unknown method 'lu'"),
    (dict(solver="cg"), r"solver: 'cg' solves given right-hand sides"),
])
def test_bad_solver_names(bad, match):
    with pytest.raises(ValueError, match=match):
        ihvp.make_ihvp(torch.eye(3, dtype=F64), damping=0.1, **bad)


def test_solvers_right_after_set_num_threads():
    """torch 2.13's batched LU (linalg.inv/solve) breaks once set_num_threads(n>=2) has run; no solver of
    ours may lean on it, since users set threads (the CLI's --threads does).  Error bound: κ·d·u64."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    try:
        G = torch.stack([spd(96, 1e3, seed=s) for s in range(3)])
        ref = ref_inv(G + 0.5 * torch.eye(96, dtype=F64))
        for solver in ("auto", "schulz", "cholesky"):
            X, _ = solvers.spd_inverse(G, 0.5, solver=solver)
            assert rel(X, ref) < 1e-10, solver
            F = solvers.Factorization(G, 0.5, solver=solver)
            V = torch.randn(3, 4, 96, dtype=F64, generator=torch.Generator().manual_seed(1))
            assert rel(F.solve_rows(V), V @ ref) < 1e-10, solver
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------- the lean Cholesky path and auto's fallback


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("shape", [(5,), (), (2, 3)])
def test_auto_cholesky_inverse_is_exactly_symmetric_and_verified(dtype, shape):
    d, lam = 40, 1e-2
    G = torch.stack([spd(d, 1e3, 1e-2, seed=s) for s in range(max(1, math.prod(shape)))]).reshape(*shape, d, d).to(dtype)
    G_before = G.clone()
    X, info = solvers.spd_inverse(G, lam)
    assert info.solver == "cholesky" and "cost model" in info.reason
    assert torch.equal(G, G_before)  # the damping went into a fresh buffer, not into G
    assert X.shape == G.shape and X.dtype == dtype and X.is_contiguous() and torch.equal(X, X.mT)
    assert info.residual.shape == shape and bool((info.residual <= info.tol).all())
    A64 = G.double() + lam * torch.eye(d, dtype=F64)
    k = float(cond2_max(A64))
    # the residual (a probe estimate of ‖I − X·A‖_F) bounds the relative error; the rounding of A adds ~κ·u
    assert rel(X, ref_inv(A64)) <= float(info.residual.max()) + 20 * math.sqrt(d) * k * eps(dtype)


def cond2_max(A: torch.Tensor) -> torch.Tensor:
    ev = torch.linalg.eigvalsh(A.double().reshape(-1, *A.shape[-2:]))
    return (ev[..., -1] / ev[..., 0]).max()


def _spoiled_cholesky(monkeypatch, factor: float = 1.5):
    """auto's Cholesky inverse returns factor·X (a wrong answer its own check must reject)."""
    from hyperinf_ext.solvers import auto, direct

    def bad(G, lam):
        X, _ = direct.verified_cholesky_inverse(G, lam)
        X = factor * X
        return X, direct.inverse_residual_f64(G, lam, X)

    monkeypatch.setattr(auto, "verified_cholesky_inverse", bad)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_auto_falls_back_to_schulz_when_cholesky_fails_verification(monkeypatch, dtype):
    d, lam = 48, 1e-2
    G = torch.stack([spd(d, 1e2, 1e-2, seed=s) for s in range(3)]).to(dtype)
    _spoiled_cholesky(monkeypatch)
    X, info = solvers.spd_inverse(G, lam)
    assert info.solver == "schulz" and "cholesky failed verification" in info.reason and "fell back to schulz" in info.reason
    assert bool((info.residual <= info.tol).all()) and torch.equal(X, X.mT)
    A64 = G.double() + lam * torch.eye(d, dtype=F64)
    k = float(cond2_max(A64))
    # Schulz's residual ‖I − A·X‖_F bounds the relative error; rounding of A and of the symmetrisation add ~κ·u
    assert rel(X, ref_inv(A64)) <= float(info.residual.max()) + 20 * math.sqrt(d) * k * eps(dtype)
    # an explicit "cholesky" never falls back
    with pytest.raises(ConvergenceError, match="cholesky: relative residual"):
        solvers.spd_inverse(G, lam, solver="cholesky", tol=ops.DEFAULT_TOL[dtype])


def test_factorization_falls_back_to_schulz_when_cholesky_fails_verification(monkeypatch):
    from hyperinf_ext.solvers import auto

    d, lam = 48, 1e-2
    G = torch.stack([spd(d, 1e2, 1e-2, seed=s) for s in range(2)])
    real = auto.cholesky_factor
    monkeypatch.setattr(auto, "cholesky_factor", lambda A: 0.8 * real(A))  # a wrong factor
    F = solvers.Factorization(G, lam)
    assert F.info.solver == "schulz" and "fell back to schulz" in F.info.reason
    V = torch.randn(2, 3, d, dtype=F64, generator=torch.Generator().manual_seed(2))
    A64 = G + lam * torch.eye(d, dtype=F64)
    ref = ref_solve(A64, V.mT).mT
    k = float(cond2_max(A64))
    assert rel(F.solve_rows(V), ref) <= float(F.info.residual.max()) + 20 * math.sqrt(d) * k * eps(F64)
    with pytest.raises(ConvergenceError, match="cholesky: relative residual"):
        solvers.Factorization(G, lam, solver="cholesky", tol=1e-8)


def test_auto_raises_naming_both_attempts_when_nothing_verifies():
    G = spd(30, 1e8, 1.0, dtype=torch.float32)  # beyond float32 for Cholesky and Schulz alike
    with pytest.raises(ConvergenceError, match=r"cholesky failed .*fallback schulz failed"):
        solvers.spd_inverse(G, 0.0)


def test_float32_residual_is_remeasured_in_float64_before_failing():
    """Near float32's limit the float32 evaluation of the probe residual carries its own rounding (≈ √d·u·κ):
    a residual above tol is measured again with float64 products of the same stored X before the check
    fails.  tol is set between the two measurements (both are computed here, so no BLAS-specific value)."""
    from hyperinf_ext.solvers import direct

    d, lam = 128, 1e-3
    G = torch.stack([spd(d, 3e4, 1e-3, seed=s) for s in range(2)]).float()
    lamt = direct.damping_tensor(G, lam)
    X, r32 = direct.verified_cholesky_inverse(G, lamt)
    r64 = direct.inverse_residual_f64(G, lamt, X)
    if not float(r32.max()) > 1.05 * float(r64.max()):
        pytest.skip(f"float32 evaluation not above the float64 one here ({float(r32.max()):.2e} vs {float(r64.max()):.2e})")
    tol = 0.5 * (float(r32.max()) + float(r64.max()))
    X2, info = solvers.spd_inverse(G, lam, tol=tol)
    assert info.solver == "cholesky" and "re-measured in float64" in info.reason
    torch.testing.assert_close(info.residual, r64, rtol=0, atol=0)
    assert torch.equal(X2, X)


def test_cholesky_residual_is_the_finiteness_check():
    # a NaN in the upper triangle is not read by the factorisation, but the residual multiplies all of G
    G = spd(20, 10.0)
    G[7, 2] = float("nan")  # (the factorisation reads the other triangle)
    with pytest.raises(ConvergenceError, match="cholesky: relative residual nan"):
        solvers.spd_inverse(G, 0.1, solver="cholesky")
    with pytest.raises(ValueError, match="NaN or Inf"):  # auto: its Schulz fallback then refuses the input
        solvers.spd_inverse(G, 0.1)
    # an inverse beyond float32's range: X overflows to inf, so the residual is not finite
    tiny = torch.eye(8) * 1e-39
    with pytest.raises(ConvergenceError):
        solvers.spd_inverse(tiny, 0.0, solver="cholesky")


def test_auto_inverse_skips_the_spectral_bound_when_cholesky_wins_anyway(monkeypatch):
    from hyperinf_ext.solvers import auto

    calls = []
    real = auto._bracket
    monkeypatch.setattr(auto, "_bracket", lambda A, lam: calls.append(1) or real(A, lam))
    G = torch.stack([spd(64, 1e3, seed=s) for s in range(4)])
    _, info = solvers.spd_inverse(G, 1e-2)
    assert info.solver == "cholesky" and "schulz >=" in info.reason and not calls
    solvers.Factorization(G, 1e-2)
    assert not calls
    # the bracket is still computed where it decides the pick (a one-shot solve: CG is a candidate)
    solvers.solve_rows(G, 1e-2, torch.randn(4, 2, 64, dtype=F64))
    assert calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [17, 64])
def test_a_returned_schulz_answer_is_as_accurate_as_its_residual_says(dtype, d):
    """Schulz's residual ‖I − A·X‖ is one-sided; the solvers return the symmetric (X + Xᵀ)/2, whose rows along
    A's large eigenvalues were off by up to κ × that residual (500 % at κ = 10⁵ in float32, residual 6e-3).
    Now the residual reported is that of the matrix returned, ‖I − A·X_sym‖_F, which bounds the relative error
    of any rows V·X_sym (V·X − V·A⁻¹ = V·A⁻¹·(A·X − I)); or ConvergenceError.  Slack 2 for the float64
    evaluation of the check against an exact reference."""
    gen = torch.Generator().manual_seed(d)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    seen = set()
    for kappa in (1e2, 1e3, 1e4, 1e5, 1e6):
        ev = torch.logspace(0, -math.log10(kappa), d, dtype=torch.float64)
        A = Q @ torch.diag(ev) @ Q.T
        G = ((A + A.T) / 2).to(dtype)
        Gd = G.double()
        V = Q[:, :3].T.contiguous()  # rows along the largest eigenvalues, where the symmetric part hurt
        ref = torch.linalg.solve(Gd, V.T).T
        for solver in ("schulz", "auto"):
            try:
                Y, info = hx.inverse_hvp(G, V.to(dtype), damping=0.0, solver=solver, return_info=True)
            except ConvergenceError:
                continue
            rel = float((Y.double() - ref).norm() / ref.norm())
            assert rel <= 2 * float(info.residual.max()) + 4 * torch.finfo(dtype).eps, (kappa, solver, info.solver)
            seen.add(bool(info.extra.get("symmetric", True)))
    if dtype == torch.float32 and d == 17:
        assert seen == {True, False}  # both outcomes occur on this sweep: symmetric, and X as iterated
