"""hyperinf-ext: kernel-accelerated HyperINF influence functions for LoRA-tuned models.

Kernel-level API (tensors in, tensors out): :func:`gfim`, :func:`gfim_accumulate_`,
:func:`datainf_damping`, :func:`schulz_inverse`, :func:`inverse_hvp`, :func:`make_ihvp` (one matrix,
or gradient dicts in → preconditioned gradient dicts out), :func:`available_backends`; the solvers
behind ``solver="auto"`` are in :mod:`hyperinf_ext.solvers`.  Model-level API: :class:`HyperINF` (imported lazily, it needs peft).
"""
import importlib.util as _ilu
import os as _os
import sys as _sys


def _map_source_kernels() -> None:
    """Source checkout: import the top-level ``kernels/`` directory as ``hyperinf_ext.kernels``.

    setup.py installs ``kernels/`` as this subpackage (``package_dir``), so installed copies and
    wheels find it inside the package.  Run from a source checkout (tests, PYTHONPATH=repo) the
    directory sits beside the package instead; register it under the same name, so each kernel file
    has exactly one import path.  Only where ``../setup.py`` marks a checkout, and before any
    import system lookup, which could resolve another tree's editable install.
    """
    here = _os.path.dirname(_os.path.abspath(__file__))
    root = _os.path.dirname(here)
    init = _os.path.join(root, "kernels", "__init__.py")
    name = f"{__name__}.kernels"
    if name in _sys.modules or _os.path.isdir(_os.path.join(here, "kernels")):
        return
    if not (_os.path.isfile(_os.path.join(root, "setup.py")) and _os.path.isfile(init)):
        return
    spec = _ilu.spec_from_file_location(name, init, submodule_search_locations=[_os.path.dirname(init)])
    module = _ilu.module_from_spec(spec)
    _sys.modules[name] = module
    spec.loader.exec_module(module)  # kernels/__init__.py imports nothing (no triton needed here)
    globals()["kernels"] = module  # the attribute the import system sets for a found subpackage


_map_source_kernels()

from .errors import ConvergenceError  # noqa: E402
from .ops import (  # noqa: E402
    SchulzInfo,
    available_backends,
    datainf_damping,
    gfim,
    gfim_accumulate_,
    rank_gram_accumulate_,
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
    "rank_gram_accumulate_",
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
