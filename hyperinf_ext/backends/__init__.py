"""Which backends are present, and the one place that picks a backend for a call.

The host-side drivers live here, one module per backend: ``torch`` (the plain-torch oracle),
``cpp`` (wrappers of the C++ extension ``hyperinf_ext._C`` and its fake kernels) and ``triton``
(host drivers of the Triton kernels in the top-level ``kernels/`` directory).  Each has the functions
``gfim_accumulate_(acc [L,d,d], grads [L,m,d])`` and
``schulz_inverse(A [B,d,d], lower [B], upper [B], tol, max_iter) -> (X, iterations, residual, status)``
(layouts in ``backends/torch.py``); ops without a kernel of their own (``rank_gram_accumulate_``)
run on the torch backend.  Ops that only some backends (or builds) implement are dispatched with
``op=`` (``select(backend, device, op="project")``): ``implements`` says which backend has it — all
three have ``project`` and ``project_quantize``, but a C++ extension built before them does not.
"""
from __future__ import annotations

import os
from types import ModuleType

# Aliased: importing the submodule `backends.torch` binds the package attribute `torch`, which would
# shadow the library under its plain name in this module.
import torch as _torch

BACKENDS = ("torch", "cpp", "triton")


def _load_torch() -> ModuleType:
    from . import torch as torch_backend

    return torch_backend


def _load_cpp() -> ModuleType | None:
    try:
        from . import cpp
    except (ImportError, OSError):
        return None
    return cpp if cpp.is_available() else None


def _load_triton() -> ModuleType | None:
    try:
        from . import triton as triton_backend
    except ImportError:
        return None
    return triton_backend


_LOADED: dict[str, ModuleType | None] = {}


def _module(name: str) -> ModuleType | None:
    if name not in _LOADED:
        _LOADED[name] = {"torch": _load_torch, "cpp": _load_cpp, "triton": _load_triton}[name]()
    return _LOADED[name]


def triton_interpreter() -> bool:
    """True when TRITON_INTERPRET=1 was set (then Triton kernels run on CPU tensors, slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _usable(name: str, device: _torch.device) -> bool:
    if _module(name) is None:
        return False
    if name == "torch":
        return True
    if name == "cpp":
        return device.type == "cpu"
    # Triton: compiled kernels on CUDA devices, or the interpreter on CPU tensors.
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreter())


def implements(name: str, op: str) -> bool:
    """Whether backend ``name`` is loaded and has the op ``op`` (the cpp backend: in this build too)."""
    module = _module(name)
    if module is None or not callable(getattr(module, op, None)):
        return False
    has_op = getattr(module, "has_op", None)
    return has_op is None or bool(has_op(op))


def available_backends(device: _torch.device | str | None = None, op: str | None = None) -> list[str]:
    """Backends usable for tensors on ``device`` (default: CUDA if present, else CPU), fastest first.

    ``"torch"`` is always there; ``"cpp"`` when the extension ``hyperinf_ext._C`` was built (CPU
    tensors); ``"triton"`` when triton imports and either the device is CUDA or ``TRITON_INTERPRET=1``
    was set before import (CPU tensors then run through the Triton interpreter).  With ``op``, only
    the backends that implement that op (:func:`implements`).
    """
    if device is None:
        device = "cuda" if _torch.cuda.is_available() else "cpu"
    device = _torch.device(device)
    order = ("triton", "torch") if device.type == "cuda" else ("cpp", "torch", "triton")
    return [name for name in order if _usable(name, device) and (op is None or implements(name, op))]


def select(backend: str | None, device: _torch.device, op: str | None = None) -> tuple[str, ModuleType]:
    """The one dispatch point: the requested backend, or the fastest for ``device`` when None.

    On the CPU the default is the C++ backend (then torch); the Triton interpreter is never picked
    by default because it is orders of magnitude slower than either.  With ``op``, the backend must
    implement that op (the default skips those that do not).
    """
    if backend is None:
        name = available_backends(device, op)[0]
    else:
        if backend not in BACKENDS:
            raise ValueError(f"backend: unknown backend {backend!r}; expected one of {BACKENDS}")
        if not _usable(backend, device):
            raise ValueError(
                f"backend: {backend!r} is not available for tensors on {device} "
                f"(available: {available_backends(device)})"
            )
        if op is not None and not implements(backend, op):
            raise ValueError(
                f"backend: {backend!r} does not implement {op} (this build; available: {available_backends(device, op)})"
            )
        name = backend
    module = _module(name)
    assert module is not None
    return name, module
