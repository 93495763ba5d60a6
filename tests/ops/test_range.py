"""The GFIM accumulators refuse squares that leave the accumulator's range (issue #24 §4): an underflow
to 0 or an overflow never passes silently; gradients inside the range are untouched by the check."""
from __future__ import annotations

import math

import pytest
import torch

import hyperinf_ext as hx


@pytest.mark.parametrize("dtype, tiny, huge", [(torch.float32, 2.0**-70, 2.0**70), (torch.float64, 2.0**-540, 2.0**520)])
def test_accumulators_refuse_squares_beyond_the_range(dtype, tiny, huge):
    g = torch.randn(6, 2, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    with pytest.raises(ValueError, match=r"^grads: the squares of gradients up to .* underflow"):
        hx.gfim(g * tiny)
    with pytest.raises(ValueError, match=r"^grads: .*overflow"):
        hx.gfim(g * huge)
    with pytest.raises(ValueError, match=r"^grads: the squares of gradients up to .* underflow"):
        hx.rank_gram_accumulate_(torch.zeros(1, 2, 2, dtype=dtype), (g * tiny).unsqueeze(0))
    G = hx.gfim(g * 2.0**-20)  # well inside: exact power-of-two rescaling of the unit GFIM
    assert torch.allclose(G * 2.0**40, hx.gfim(g), rtol=1e-5 if dtype == torch.float32 else 1e-12)
    assert not hx.gfim(torch.zeros_like(g)).any()  # zero gradients are no underflow


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_squares_that_stay_normal_pass_and_are_resolved(dtype):
    """Squares at a few hundred times the smallest normal number are still resolved to the dtype's
    precision: accepted, and equal to the exactly rescaled unit GFIM (a power of two changes no bits)."""
    fi = torch.finfo(dtype)
    g = torch.randn(6, 2, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    e = math.floor(math.log2(fi.tiny)) // 2 + 5  # squares ≈ 2^10·tiny, above m·tiny = 12·tiny
    G = hx.gfim(g * 2.0**e)
    G_ref = hx.gfim(g)
    # the off-diagonal products reach below tiny; each is off by at most tiny·eps, m of them per entry:
    # relative to the largest entry (≥ 2^10·tiny/… by construction) that is within a few eps
    slack = 12 * fi.tiny * fi.eps * 2.0 ** (-2 * e) / float(G_ref.abs().max()) + 8 * fi.eps
    assert float(((G * 2.0 ** (-2 * e)) - G_ref).abs().max() / G_ref.abs().max()) <= slack
