"""The synthetic convergence study (hyperinf_ext.app.tasks.convergence) on toy sizes (d=16, N=50)."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from hyperinf_ext import ops
from hyperinf_ext.app.tasks import convergence as C
from hyperinf_ext.app.tasks import report
from _numerics import ref_solve

D, N, T = 16, 50, 30


@pytest.fixture(scope="module")
def problem() -> C.Problem:
    return C.make_problem(D, N, seed=0)


def test_problem_is_the_papers_setup(problem):
    p = problem
    G = p.x.T @ p.x / N
    lam = 0.1 * float(torch.trace(G)) / D
    assert p.A.dtype == torch.float64 and torch.equal(p.A, p.A.T)
    assert p.lam == pytest.approx(lam, rel=1e-14)
    torch.testing.assert_close(p.A, G + lam * torch.eye(D, dtype=torch.float64), rtol=1e-14, atol=1e-15)
    # the per-dimension spread makes the data ill-conditioned; the damping is then what bounds κ(A)
    ev = torch.linalg.eigvalsh(G)
    assert float(ev[-1] / ev[0]) > 1e3
    lmin, lmax = p.eigen_range()
    assert lmin >= p.lam * (1 - 1e-12) and p.upper >= lmax
    assert p.series_scale == pytest.approx(1.5 * float(ops.spectral_upper_bound(p.A)))


def test_exact_solution(problem):
    p = problem
    residual = torch.linalg.vector_norm(p.A @ p.x_star - p.v) / torch.linalg.vector_norm(p.v)
    assert float(residual) < 1e-14
    cross = torch.linalg.lstsq(p.A, p.v.unsqueeze(1)).solution.squeeze(1)
    assert C.relative_error(cross, p.x_star) < 1e-12
    assert C.relative_error(p.x_star, p.x_star) == 0.0


def test_problem_is_deterministic_per_cell():
    a, b = C.make_problem(D, N, seed=3), C.make_problem(D, N, seed=3)
    assert torch.equal(a.A, b.A) and torch.equal(a.v, b.v) and a.lissa_seed == b.lissa_seed
    assert not torch.equal(a.v, C.make_problem(D, N, seed=4).v)


def test_schulz_converges_and_replays_the_library(problem):
    p = problem
    trace = C.schulz_curve(p, T)
    e = trace.errors
    assert len(e) == T and min(e) < 1e-10 and e[-1] < 1e-10
    # strictly decreasing until the float64 floor, then it stays there
    floor = next(t for t, x in enumerate(e) if x < 1e-12)
    assert all(b < a for a, b in zip(e[:floor], e[1 : floor + 1]))
    assert max(e[floor:]) < 1e-12
    assert trace.status == "stagnated" and trace.iterations < T

    # torch backend = the reference algorithm: identical iterate, count and status
    X, info = ops.schulz_inverse(
        p.A, lower_bound=p.lam, max_iter=T, tol=C.SCHULZ_TOL, check=False, return_info=True, backend="torch"
    )
    assert torch.equal(X, trace.X)
    assert int(info.iterations) == trace.iterations and info.status == [trace.status]
    assert float(info.residual) == trace.residual

    # default backend (the C++ one when built): same iterate up to rounding; its stagnation test may
    # fire one step apart at the float64 floor, where the iterates no longer change
    X, info = ops.schulz_inverse(p.A, lower_bound=p.lam, max_iter=T, tol=C.SCHULZ_TOL, check=False, return_info=True)
    assert abs(int(info.iterations) - trace.iterations) <= 1
    assert C.relative_error(X @ p.v, p.x_star) < 1e-10
    torch.testing.assert_close(X, trace.X, rtol=0, atol=1e-10 * float(X.abs().max()))


@pytest.mark.parametrize("budget", [1, 3, 6])
def test_schulz_curve_is_the_library_at_each_budget(problem, budget):
    p = problem
    e = C.schulz_curve(p, T).errors
    X, info = ops.schulz_inverse(
        p.A, lower_bound=p.lam, max_iter=budget, tol=C.SCHULZ_TOL, check=False, return_info=True, backend="torch"
    )
    assert int(info.iterations) == budget and info.status == ["max_iter"]
    assert C.relative_error(X @ p.v, p.x_star) == e[budget - 1]


def test_cg_reaches_1e10_within_d(problem):
    e = C.cg_curve(problem, D)
    assert min(e) < 1e-10
    assert all(math.isfinite(x) for x in C.cg_curve(problem, 3 * D))  # no 0/0 past convergence


def test_neumann_monotone_and_lissa_near_it(problem):
    e = C.neumann_curve(problem, 200)
    assert all(b <= a for a, b in zip(e, e[1:]))
    assert e[-1] < 0.5 * e[0]
    lissa = C.lissa_curve(problem, 200)
    assert lissa == C.lissa_curve(problem, 200)  # seeded
    assert all(math.isfinite(x) for x in lissa) and lissa[-1] < 0.5 * lissa[0]
    assert lissa != e  # the mini-batches do differ from the full A


def test_datainf_is_a_constant_approximation(problem):
    p = problem
    e = C.datainf_curve(p, 5)
    assert len(set(e)) == 1 and 1e-3 < e[0] < 1.5
    # Sherman–Morrison per sample, averaged: check against explicit per-sample inverses
    eye = torch.eye(D, dtype=torch.float64)
    avg = sum(ref_solve(torch.outer(xi, xi) + p.lam * eye, p.v) for xi in p.x) / N
    assert e[0] == pytest.approx(C.relative_error(avg, p.x_star), rel=1e-9)


def test_paper_start_diverges_past_4e4_and_converges_below():
    big = C.make_problem(D, N, seed=0, x_scale=300.0)
    assert big.eigen_range()[1] > 4e4
    e = C.paper_schulz_curve(big, T)
    assert any(not math.isfinite(x) or x > 1 for x in e)
    assert not math.isfinite(e[-1]) or e[-1] > 1  # reported as they are, not clipped

    small = C.make_problem(D, N, seed=0)
    assert small.eigen_range()[1] < 4e4
    e = C.paper_schulz_curve(small, 40)
    assert all(math.isfinite(x) for x in e) and e[-1] < 1e-10
    assert e[4] > 0.9  # the tiny start wastes the first iterations (paper's X₀ = 5e-5·I)


def test_run_convergence_outputs(tmp_path):
    sizes, samples, iters = [8, 16], [50], 12
    out = tmp_path / "out"
    res = C.run_convergence(sizes, samples, iters, seed=0, out_dir=out, progress=False)

    assert set(res["curves"]) == set(sizes)
    for d in sizes:
        assert list(res["curves"][d]) == samples
        assert list(res["curves"][d][50]) == list(C.SOLVERS)
        assert all(len(c) == iters for c in res["curves"][d][50].values())
    # the same cell gives the same curves whatever else is in the grid
    assert res["curves"][16][50] == C.solve_all(C.make_problem(16, 50, 0), iters)[0]

    assert res["png"] == out / "convergence.png" and res["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(res["csv"], newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(sizes) * len(samples) * len(C.SOLVERS) * iters
    assert set(rows[0]) == {"d", "N", "solver", "iteration", "error"}
    r = next(r for r in rows if r["d"] == "16" and r["solver"] == C.CG and r["iteration"] == "5")
    assert float(r["error"]) == res["curves"][16][50][C.CG][4]

    data = json.loads((out / "convergence.json").read_text(encoding="utf-8"))
    assert data["settings"]["sizes"] == sizes and data["settings"]["iterations"] == iters
    assert data["settings"]["seed"] == 0 and data["settings"]["damping_scale"] == 0.1
    assert len(data["table"]) == len(sizes) * len(samples) * len(C.SOLVERS)
    assert set(data["table"][0]["errors"]) == {"1", "5", "10", "12"}
    for prob in data["problems"]:
        assert prob["library"]["status"] == prob["schulz_status"]
        assert abs(prob["library"]["iterations"] - prob["schulz_iterations"]) <= 1

    table = res["table"]
    for head in ("t=1", "t=5", "t=10", "t=12 (final)", "first t <= 1e-06"):
        assert head in table
    assert "t=20" not in table  # checkpoints past the budget are left out
    assert "—" in table  # neumann never reaches 1e-6 in 12 steps
    schulz_row = next(r for r in res["rows"] if r["d"] == 16 and r["solver"] == C.SCHULZ)
    assert schulz_row["first_iteration_below_target"] is not None


def test_plot_and_json_tolerate_divergence(tmp_path):
    nan, inf = float("nan"), float("inf")
    curves = {4: {10: {C.SCHULZ: [1e-1, 1e-20, 0.0], C.PAPER: [1e10, inf, nan]}}}
    C.plot_convergence(tmp_path / "x.png", curves, {(4, 10): {"condition_number": 10.0, "damping": 0.1}}, 3,
                            target=C.TARGET, clip=C.PLOT_CLIP, styles=C.LINE_STYLES)
    assert (tmp_path / "x.png").stat().st_size > 0
    rows = C.table_rows(curves, 3)
    report.write_json(tmp_path / "x.json", {"settings": {}, "problems": [], "table": rows}, nonfinite="string")
    paper = json.loads((tmp_path / "x.json").read_text(encoding="utf-8"))["table"][1]
    assert paper["errors"] == {"1": 1e10, "3": "nan"} and paper["first_iteration_below_target"] is None
    assert "nan" in C.convergence_table(rows, C.TARGET)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sizes": []},
        {"sizes": [0]},
        {"samples": [True]},
        {"iterations": 0},
        {"seed": -1},
        {"damping_scale": 0.0},
        {"damping_scale": float("nan")},
    ],
)
def test_run_convergence_rejects_bad_arguments(tmp_path, kwargs):
    args = dict(sizes=[8], samples=[20], iterations=3, seed=0, out_dir=tmp_path, progress=False) | kwargs
    with pytest.raises(ValueError):
        C.run_convergence(**args)
