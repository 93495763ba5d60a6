"""Exceptions raised by hyperinf-ext."""
from __future__ import annotations

from typing import Any


class ConvergenceError(RuntimeError):
    """An iterative solver could not reach the requested accuracy, or the matrix is not positive definite.

    ``info`` holds the solver's per-matrix diagnostics (for Schulz a :class:`~hyperinf_ext.ops.SchulzInfo`)
    so callers can see which matrices failed and how far they got.
    """

    def __init__(self, message: str, info: Any = None):
        super().__init__(message)
        self.info = info
