"""hyperinf-ext: kernel-accelerated HyperINF influence functions for LoRA-tuned models.

Kernel-level API (tensors in, tensors out): :func:`gfim`, :func:`gfim_accumulate_`,
:func:`datainf_damping`, :func:`schulz_inverse`, :func:`inverse_hvp`, :func:`make_ihvp` (one matrix,
or gradient dicts in → preconditioned gradient dicts out), :func:`available_backends`; the solvers
behind ``solver="auto"`` are in :mod:`hyperinf_ext.solvers`.  Model-level API: :class:`HyperINF` (imported lazily, it needs peft).
"""
from .errors import ConvergenceError
from .ops import (
    SchulzInfo,
    available_backends,
    datainf_damping,
    gfim,
    gfim_accumulate_,
    inverse_hvp,
    make_ihvp,
    schulz_inverse,
)

__version__ = "0.1.0"

__all__ = [
    "ConvergenceError",
    "HyperINF",
    "SchulzInfo",
    "available_backends",
    "datainf_damping",
    "gfim",
    "gfim_accumulate_",
    "inverse_hvp",
    "make_ihvp",
    "schulz_inverse",
]


def __getattr__(name: str):
    # The attributor pulls in peft/transformers; keep `import hyperinf_ext` light for kernel users.
    if name == "HyperINF":
        from .attributor import HyperINF

        return HyperINF
    raise AttributeError(f"module 'hyperinf_ext' has no attribute {name!r}")
