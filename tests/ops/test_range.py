"""The GFIM accumulators refuse squares that leave the accumulator's range (issue #24 §4): an underflow
to 0 or an overflow never passes silently; gradients inside the range are untouched by the check."""
from __future__ import annotations

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
