"""hyperinf-ext: kernel-accelerated HyperINF influence functions for LoRA-tuned models.

Kernel-level API (tensors in, tensors out; :mod:`hyperinf_ext.ops`): :func:`gfim`,
:func:`gfim_accumulate_`, :func:`datainf_damping`, :func:`schulz_inverse`, :func:`available_backends`.
Inverse-HVPs: :func:`inverse_hvp` (:mod:`hyperinf_ext.solvers.ihvp`), :func:`make_ihvp` (one matrix,
or gradient dicts in → preconditioned gradient dicts out; :mod:`hyperinf_ext.curvature.ihvp`); the
solvers behind ``solver="auto"`` are in :mod:`hyperinf_ext.solvers`.  The layers and what each holds:
docs/architecture.md.  Model-level API: :class:`HyperINF` (imported lazily, it needs peft).
"""
import importlib.machinery as _ilm
import importlib.util as _ilu
import os as _os
import sys as _sys


def _map_source_kernels() -> None:
    """Source checkout: register the top-level ``kernels/`` folder as the package ``hyperinf_ext.kernels``.

    ``kernels/`` has no ``__init__.py`` so that it can never be imported as a top-level ``kernels``
    (the name of Hugging Face's package, which transformers imports): see kernels/README.md.  A wheel
    gets the subpackage from setup.py, with a generated ``__init__.py``; run from a source checkout
    (tests, PYTHONPATH=repo, an editable install) the folder sits beside the package instead, and this
    makes the package module by hand, so each kernel file has exactly one import path.  Only where
    ``../setup.py`` marks a checkout, and before any import system lookup, which could resolve another
    tree's editable install.
    """
    here = _os.path.dirname(_os.path.abspath(__file__))
    root = _os.path.dirname(here)
    folder = _os.path.join(root, "kernels")
    name = f"{__name__}.kernels"
    if name in _sys.modules or _os.path.isdir(_os.path.join(here, "kernels")):
        return
    if not (_os.path.isfile(_os.path.join(root, "setup.py")) and _os.path.isfile(_os.path.join(folder, "gfim.py"))):
        return
    spec = _ilm.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations.append(folder)
    module = _ilu.module_from_spec(spec)
    module.__doc__ = "Triton kernels (the checkout's kernels/ folder; see kernels/README.md)."
    _sys.modules[name] = module
    globals()["kernels"] = module  # the attribute the import system sets for a found subpackage


_map_source_kernels()

from .curvature.ihvp import make_ihvp  # noqa: E402
from .errors import ConvergenceError  # noqa: E402
from .ops import (  # noqa: E402
    SchulzInfo,
    available_backends,
    datainf_damping,
    gfim,
    gfim_accumulate_,
    rank_gram_accumulate_,
    schulz_inverse,
)
from .solvers.ihvp import inverse_hvp  # noqa: E402
from .version import __version__  # noqa: E402

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
