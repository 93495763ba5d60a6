"""``eigen`` (the eigenvalue-corrected GFIM) against a float64 brute force on random gradients."""
from __future__ import annotations

import pytest
import torch

from hyperinf_ext.curvature.damping import damp_layers
from hyperinf_ext.curvature.methods import METHODS, LayerFactor, make_method, resolve


def fitted(g, damping):
    f = {"l": LayerFactor("l", g.shape[1], g.shape[2], torch.einsum("nri,nrj->ij", g, g), g.shape[0],
                          rank_sum=torch.einsum("nri,nsi->rs", g, g))}
    damp_layers(f, *resolve("eigen", damping, None))
    return f


def batches(g, size):
    return lambda: ({"l": g[i:i + size]} for i in range(0, g.shape[0], size))


def brute(g, q, lam):
    """Λ[a, k] = mean_i ((g_i U)[a, k])², then q̃ = ((qU)/(Λ + λ))Uᵀ, written as a dense (r·d)² solve."""
    n, r, d = g.shape
    _, U = torch.linalg.eigh(torch.einsum("nri,nrj->ij", g, g) / n)
    B = torch.kron(torch.eye(r, dtype=torch.float64), U.contiguous())  # the basis I_r ⊗ U of vec(g) (row-major r×d)
    P = g.reshape(n, r * d) @ B
    Lam = (P**2).mean(0)
    H = B @ torch.diag(Lam + lam) @ B.T
    return torch.linalg.solve(H, q.reshape(-1, r * d).T).T.reshape(q.shape), Lam


@pytest.mark.parametrize("r", [1, 3])
def test_eigen_equals_brute_force(r):
    gen = torch.Generator().manual_seed(r)
    g = torch.randn(20, r, 6, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 2, r * 6, dtype=torch.float64).reshape(r, 6)
    q = torch.randn(4, r, 6, generator=gen, dtype=torch.float64)
    f = fitted(g, "auto")
    lam = f["l"].damping
    assert lam == pytest.approx(float(f["l"].gfim.trace()) / (r * 6), rel=1e-14)  # 1 × mean of Λ
    m = make_method("eigen")
    m.prepare(f)
    out = m.precondition({"l": q}, f, batches(g, 7))["l"]
    want, Lam = brute(g, q, lam)
    assert torch.allclose(out, want, rtol=1e-9, atol=1e-12 * float(want.abs().max()))
    assert float(m.corrected["l"].sum()) == pytest.approx(float(f["l"].gfim.trace()), rel=1e-12)  # trace kept
    assert torch.allclose(m.corrected["l"].reshape(-1).sort().values, Lam.sort().values, rtol=1e-9)


def test_rank_one_is_the_exact_gfim():
    gen = torch.Generator().manual_seed(7)
    g = torch.randn(15, 1, 5, generator=gen, dtype=torch.float64)
    q = torch.randn(3, 1, 5, generator=gen, dtype=torch.float64)
    f = fitted(g, 0.3)
    m, exact = make_method("eigen"), make_method("exact")
    m.prepare(f)
    exact.prepare(f)
    a = m.precondition({"l": q}, f, batches(g, 4))["l"]
    b = exact.precondition({"l": q}, f, lambda: iter(()))["l"]
    assert torch.allclose(a, b, rtol=1e-10, atol=0)


def test_declarations_and_zero_damping():
    cls = METHODS["eigen"]
    assert cls.needs_train_pass and cls.damping_default == ("datainf", 1.0)
    g = torch.zeros(4, 2, 3, dtype=torch.float64)
    g[:, 0, 0] = 1.0  # rank row 1 never moves: zero corrected eigenvalues
    # n < d: G's null space gives corrected eigenvalues of rounding size (1e-31), not 0; dividing by them
    # answered 1e30-sized queries — refused as zero to within float64 now
    few = torch.randn(3, 2, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for grads in (g, few):
        f = fitted(grads, 0.0)
        f["l"].damping = 0.0
        m = make_method("eigen")
        m.prepare(f)
        with pytest.raises(ValueError, match="damping: layer 'l' has a corrected eigenvalue that is zero to "
                                             "within the gradients' precision"):
            m.precondition({"l": grads[:1]}, f, batches(grads, 2))
    m2 = make_method("eigen")
    m2.prepare(f)
    with pytest.raises(ValueError, match="eigen: the training gradients are empty"):
        m2.precondition({"l": g[:1]}, f, lambda: iter(()))
