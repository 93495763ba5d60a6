"""``tracin``: identity curvature, q̃ = q (plain gradient dot products; Pruthi et al., 2020)."""
from __future__ import annotations

from ..base import Method


class TracIn(Method):
    name = "tracin"
    damping_default = None  # identity curvature: nothing to damp

    def precondition(self, q, factors, train_batches):
        return dict(q)
