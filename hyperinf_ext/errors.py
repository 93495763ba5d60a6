"""Exceptions raised by hyperinf-ext (their one home; modules re-export the ones their callers import)."""
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


class DataError(ValueError):
    """A user-facing data/model-location problem.

    The message is always a single line naming the file, column or problem,
    so a CLI can print it verbatim instead of a traceback.
    """


class DirectoryBusyError(RuntimeError):
    """Another process holds the lock of the directory being written (saved factors, a score store, an
    index, a CLI run's folder): two writers there would mix or delete each other's files."""


class CheckpointBusyError(DirectoryBusyError):
    """Another fit holds the checkpoint directory's lock."""


class DistributedError(RuntimeError):
    """Another rank died, timed out or failed; the message names it."""
