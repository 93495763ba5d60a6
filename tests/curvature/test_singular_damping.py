"""A singular GFIM at damping 0 has no inverse: every method that inverts it raises (ConvergenceError),
never returns finite scores; the explicit Cholesky baseline of make_ihvp likewise (issue #24).

A GFIM (1/n)·Σ g_iᵀg_i of n·r < d rows is singular; rounding lets Cholesky's pivots through, so only a
check of the answer (or of the pivots against float64's resolution) tells.
"""
import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from hyperinf_ext import ConvergenceError, HyperINF, make_ihvp  # noqa: E402
from tiny_bert import tiny_bert_lora  # noqa: E402

VOCAB = 30


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, VOCAB, (n, 6), generator=g),
             "attention_mask": torch.ones(n, 6, dtype=torch.long),
             "labels": torch.randint(0, 2, (n,), generator=g), "index": torch.arange(n)}]


@pytest.mark.parametrize("method", ["exact", "hyperinf", "kronecker"])
def test_singular_curvature_at_zero_damping_raises(method):
    # hidden 12, r = 2, 2 examples: each GFIM has rank ≤ 4 < d = 12
    model = tiny_bert_lora(vocab=VOCAB, hidden=12, intermediate=16, max_positions=16, rank=2, layers=1)
    attr = HyperINF(model, method="tracin", progress=False).fit(data(2, 0))
    with pytest.raises((ConvergenceError, ValueError), match="singular|not positive definite|residual"):
        attr.use(method, damping=0.0)
    assert attr.config.method == "tracin"  # the refused switch left the attributor as it was


@pytest.mark.parametrize("d, k", [(8, 7), (32, 31), (64, 63), (64, 10)])
def test_make_ihvp_cholesky_refuses_a_singular_matrix(d, k):
    g = torch.Generator().manual_seed(0)
    U = torch.randn(d, k, generator=g, dtype=torch.float64)
    with pytest.raises(ConvergenceError, match="singular|not positive definite"):
        make_ihvp(U @ U.T, damping=0.0, solver="cholesky")
    # the same matrix made invertible by a damping is solved as before
    apply = make_ihvp(U @ U.T, damping=1.0, solver="cholesky")
    assert apply.info.solver == "cholesky"
