"""method="hyperinf" scores equal "exact" at equal damping whatever solver inverts G + λI (float64)."""
from __future__ import annotations

import pytest
import torch

from hyperinf_ext import HyperINF
from tiny_bert import batches, make_data, tiny_model


@pytest.fixture(scope="module")
def fitted():
    model = tiny_model()
    train, query = make_data(12, 1), make_data(5, 2)
    attr = HyperINF(model, method="exact", damping="spectral", damping_scale=3.0, progress=False).fit(batches(train, 4))
    return attr, batches(query, 5)


@pytest.mark.parametrize("solver, tol", [("auto", None), ("schulz", 1e-12), ("cholesky", None)])
def test_hyperinf_equals_exact_whatever_the_solver(fitted, solver, tol):
    attr, qb = fitted
    attr.use("exact")
    exact = attr.scores(qb)
    attr.use("hyperinf", damping="spectral", damping_scale=3.0, solver=solver, tol=tol)
    got = attr.scores(qb)
    info = attr.method.info
    assert all(i["solver"] in ("schulz", "cholesky") for i in info.values())
    if solver != "auto":
        assert {i["solver"] for i in info.values()} == {solver}
    worst = max(i["residual"] for i in info.values())
    assert worst <= (tol or 1e-8)
    # per layer, ‖q·X − q·A⁻¹‖ <= residual·‖q·A⁻¹‖; summed over layers and examples, relative to the scale
    torch.testing.assert_close(got, exact, rtol=0, atol=(10 * worst + 1e-13) * float(exact.abs().max()))


def test_kronecker_records_its_solvers(fitted):
    attr, qb = fitted
    attr.use("kronecker", damping="datainf", solver="schulz")
    a = attr.scores(qb)
    assert {i["right"]["solver"] for i in attr.method.info.values()} == {"schulz"}
    attr.use("kronecker", damping="datainf", solver="cholesky")
    torch.testing.assert_close(attr.scores(qb), a, rtol=1e-7, atol=1e-7 * float(a.abs().max()))


def test_bad_solver_is_a_value_error():
    with pytest.raises(ValueError, match=r"solver: unknown solver 'cg'"):
        HyperINF(tiny_model(), solver="cg", progress=False)
