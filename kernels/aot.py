"""Ahead-of-time compilation of every Triton kernel for an NVIDIA target, without a GPU.

``compile_all(arch)`` builds each kernel variant the launchers use on CUDA (GPU tile
configuration, one variant per dtype) for ``GPUTarget("cuda", arch, 32)`` and returns the
``CompiledKernel`` objects (``.asm["ptx"]``, ``.asm["cubin"]``, ``.metadata``).  Used by the tests
(code generation checks: tensor-core instructions on the fp16/bf16 paths) and the benchmarks.

Signatures mirror the launches: pointers typed per dtype, every size and stride ``i32``, the
tile sizes and mode flags as constexprs.  The JIT additionally specializes integer arguments
(== 1 becomes a constant, divisible by 16 an attribute) and 16-byte-aligned pointers at launch.  The
GFIM variants are compiled with the specialisation of the launch the GPU path guarantees for
fp16/bf16 grads and gets for any contiguous grads with d a multiple of 16 (``gfim.is_pipelinable``):
d-stride 1, the other strides, ``d_load`` and both pointers divisible by 16 (d and m stay generic).
Without it the fp16/bf16 loads cannot use cp.async (see kernels/gfim.py), so the generic variant would
describe code the GPU never runs; ``gfim_source(..., aligned=False)`` still builds it, for comparison.
The Schulz variants are the generic ones.

Under TRITON_INTERPRET=1 every ``@triton.jit`` function, triton.language's own helpers
(tl.zeros, tl.sum, ...) included, is an interpreter object that cannot be code-generated in that
process.  ``compile_all`` then compiles in a child process with TRITON_INTERPRET=0 and loads the
results back from Triton's on-disk cache, so it works from the interpreter test session too.

Command line: ``python -m <package>.kernels.aot --arch 90 [--out result.json]`` (the package that
installs this directory as its ``kernels`` subpackage).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

from . import gfim as _gfim
from . import project as _project
from . import schulz as _schulz

_TRITON_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}

# name -> (grads dtype, acc dtype, input precision)
GFIM_VARIANTS = {
    "gfim_fp32": (torch.float32, torch.float32, "ieee"),
    "gfim_fp32_tf32": (torch.float32, torch.float32, "tf32"),
    "gfim_bf16": (torch.bfloat16, torch.float32, "ieee"),
    "gfim_fp16": (torch.float16, torch.float32, "ieee"),
    "gfim_fp64": (torch.float64, torch.float64, "ieee"),
}
# name -> grads dtype of gfim_tma_kernel (float32 acc), compiled for sm_90+ only: the launcher uses
# it only there, and below sm_90 Triton lowers its descriptor loads to scalar loads.
GFIM_TMA_VARIANTS = {"gfim_tma_bf16": torch.bfloat16, "gfim_tma_fp16": torch.float16}
TMA_MIN_ARCH = 90
# name suffix -> (matrix dtype, input precision)
SCHULZ_VARIANTS = {
    "fp32": (torch.float32, "ieee"),
    "fp32_tf32x3": (torch.float32, "tf32x3"),
    "fp64": (torch.float64, "ieee"),
}

# name -> (grads dtype, proj dtype, per-example amax epilogue): project_kernel as ops.project (no amax)
# and ops.project_quantize (amax) launch it on CUDA.
PROJECT_VARIANTS = {
    "project_fp32": (torch.float32, torch.float32, False),
    "project_fp64": (torch.float64, torch.float64, False),
    "project_amax_fp32": (torch.float32, torch.float32, True),
    "project_amax_bf16": (torch.bfloat16, torch.float32, True),
    "project_amax_fp16": (torch.float16, torch.float32, True),
    "project_amax_fp64": (torch.float64, torch.float64, True),
}
# name -> (y dtype, out dtype) of scale_cast_kernel (the second launch of ops.project_quantize).
SCALE_CAST_VARIANTS = {
    "scale_cast_fp32_fp16": (torch.float32, torch.float16),
    "scale_cast_fp32_bf16": (torch.float32, torch.bfloat16),
    "scale_cast_fp32_fp32": (torch.float32, torch.float32),
    "scale_cast_fp64_fp16": (torch.float64, torch.float16),
}


def _options(num_warps: int, num_stages: int) -> dict:
    return {"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True}


def gfim_source(in_dtype: torch.dtype, acc_dtype: torch.dtype, input_precision: str = "ieee", aligned: bool = True):
    """(ASTSource, options) of ``gfim_kernel`` for grads of ``in_dtype`` into an ``acc_dtype`` acc.

    ``aligned``: specialise as the JIT does for a launch on vectorisable grads (module docstring).
    """
    cfg = _gfim.config(in_dtype, acc_dtype, interpret=False)
    signature = {
        "acc_ptr": "*" + _TRITON_TYPE[acc_dtype],
        "g_ptr": "*" + _TRITON_TYPE[in_dtype],
        "d": "i32",
        "d_load": "i32",
        "m": "i32",
        "stride_gl": "i32",
        "stride_gm": "i32",
        "stride_gd": "i32",
        "BLOCK_D": "constexpr",
        "BLOCK_K": "constexpr",
        "CAST_TO_ACC": "constexpr",
        "INPUT_PRECISION": "constexpr",
    }
    constexprs = {
        "BLOCK_D": cfg.block_d,
        "BLOCK_K": cfg.block_k,
        "CAST_TO_ACC": _gfim.cast_to_acc(in_dtype, acc_dtype, interpret=False),
        "INPUT_PRECISION": input_precision,
    }
    attrs = {}
    if aligned:
        signature["stride_gd"] = "constexpr"
        constexprs["stride_gd"] = 1
        names = _gfim.gfim_kernel.arg_names
        attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in ("acc_ptr", "g_ptr", "d_load", "stride_gl", "stride_gm")}
    src = triton.compiler.ASTSource(fn=_gfim.gfim_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return src, _options(cfg.num_warps, cfg.num_stages)


def gfim_tma_source(in_dtype: torch.dtype):
    """(ASTSource, options) of ``gfim_tma_kernel`` for fp16/bf16 grads into a float32 acc."""
    cfg = _gfim.config(in_dtype, torch.float32, interpret=False)
    block = ",".join(str(b) for b in _gfim.tma_block(cfg))
    signature = {
        "acc_ptr": "*fp32",
        "g_desc": f"tensordesc<{_TRITON_TYPE[in_dtype]}[{block}]>",
        "d": "i32",
        "m": "i32",
        "BLOCK_D": "constexpr",
        "BLOCK_K": "constexpr",
        "CAST_TO_ACC": "constexpr",
    }
    constexprs = {"BLOCK_D": cfg.block_d, "BLOCK_K": cfg.block_k, "CAST_TO_ACC": False}
    attrs = {(0,): [["tt.divisibility", 16]]}
    src = triton.compiler.ASTSource(fn=_gfim.gfim_tma_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return src, _options(cfg.num_warps, cfg.num_stages)


def project_source(in_dtype: torch.dtype, proj_dtype: torch.dtype, amax: bool):
    """(ASTSource, options) of ``project_kernel`` for grads of ``in_dtype`` times a ``proj_dtype`` proj.

    Specialised as the JIT does for the launch of contiguous grads with d and k multiples of 16 (the
    index's shapes; fp16/bf16 grads are brought to that layout by the launcher): unit d-stride, the other
    strides, d_load, k and every pointer divisible by 16.  M, d and r stay generic.
    """
    cfg = _project.config(proj_dtype, interpret=False)
    p = "*" + _TRITON_TYPE[proj_dtype]
    signature = {
        "g_ptr": "*" + _TRITON_TYPE[in_dtype],
        "p_ptr": p,
        "y_ptr": p,
        "amax_ptr": ("*i32" if proj_dtype == torch.float32 else "*i64") if amax else p,
        "M": "i32",
        "d": "i32",
        "d_load": "i32",
        "k": "i32",
        "r": "i32",
        "stride_gb": "i32",
        "stride_gr": "i32",
        "stride_gd": "constexpr",
        "BLOCK_M": "constexpr",
        "BLOCK_N": "constexpr",
        "BLOCK_K": "constexpr",
        "CAST_TO_ACC": "constexpr",
        "COMPUTE_AMAX": "constexpr",
        "INPUT_PRECISION": "constexpr",
    }
    constexprs = {
        "stride_gd": 1,
        "BLOCK_M": cfg.block_m,
        "BLOCK_N": cfg.block_n,
        "BLOCK_K": cfg.block_k,
        "CAST_TO_ACC": in_dtype != proj_dtype,
        "COMPUTE_AMAX": amax,
        "INPUT_PRECISION": "ieee",
    }
    names = _project.project_kernel.arg_names
    aligned = ("g_ptr", "p_ptr", "y_ptr", "amax_ptr", "d_load", "k", "stride_gb", "stride_gr")
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = triton.compiler.ASTSource(fn=_project.project_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return src, _options(cfg.num_warps, cfg.num_stages)


def scale_cast_source(y_dtype: torch.dtype, out_dtype: torch.dtype):
    """(ASTSource, options) of ``scale_cast_kernel`` from a ``y_dtype`` projection to ``out_dtype`` values."""
    cfg = _project.cast_config(interpret=False)
    signature = {
        "y_ptr": "*" + _TRITON_TYPE[y_dtype],
        "inv_ptr": "*" + _TRITON_TYPE[y_dtype],
        "out_ptr": "*" + _TRITON_TYPE[out_dtype],
        "M": "i32",
        "k": "i32",
        "r": "i32",
        "BLOCK_M": "constexpr",
        "BLOCK_N": "constexpr",
        "VIA_FP32": "constexpr",
        "RNE_BY_HAND": "constexpr",
    }
    constexprs = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                  "VIA_FP32": out_dtype == torch.bfloat16 and y_dtype == torch.float64, "RNE_BY_HAND": False}
    names = _project.scale_cast_kernel.arg_names
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in ("y_ptr", "inv_ptr", "out_ptr", "k")}
    src = triton.compiler.ASTSource(fn=_project.scale_cast_kernel, signature=signature, constexprs=constexprs,
                                    attrs=attrs)
    return src, _options(cfg.num_warps, 1)


def _schulz_constexprs(cfg: _schulz.SchulzConfig, input_precision: str) -> dict:
    return {
        "BLOCK_M": cfg.block_m,
        "BLOCK_N": cfg.block_n,
        "BLOCK_K": cfg.block_k,
        "GROUP_M": cfg.group_m,
        "INPUT_PRECISION": input_precision,
    }


def schulz_residual_source(dtype: torch.dtype, input_precision: str = "ieee"):
    """(ASTSource, options) of ``schulz_residual_kernel`` for float32/float64 matrices."""
    cfg = _schulz.config(dtype, interpret=False)
    p = "*" + _TRITON_TYPE[dtype]
    constexprs = _schulz_constexprs(cfg, input_precision)
    signature = {"a_ptr": p, "x_ptr": p, "r_ptr": p, "part_ptr": p, "active_ptr": "*i32", "d": "i32", "n_tiles": "i32"}
    signature.update({name: "constexpr" for name in constexprs})
    src = triton.compiler.ASTSource(fn=_schulz.schulz_residual_kernel, signature=signature, constexprs=constexprs)
    return src, _options(cfg.num_warps, cfg.num_stages)


def schulz_update_source(dtype: torch.dtype, input_precision: str = "ieee"):
    """(ASTSource, options) of ``schulz_update_kernel`` for float32/float64 matrices."""
    cfg = _schulz.config(dtype, interpret=False)
    p = "*" + _TRITON_TYPE[dtype]
    constexprs = _schulz_constexprs(cfg, input_precision)
    signature = {"x_ptr": p, "r_ptr": p, "out_ptr": p, "coef_ptr": p, "active_ptr": "*i32", "d": "i32"}
    signature.update({name: "constexpr" for name in constexprs})
    src = triton.compiler.ASTSource(fn=_schulz.schulz_update_kernel, signature=signature, constexprs=constexprs)
    return src, _options(cfg.num_warps, cfg.num_stages)


def sources(arch: int = TMA_MIN_ARCH) -> dict:
    """name -> (ASTSource, options) for every kernel variant used on sm_``arch``."""
    out = {name: gfim_source(*variant) for name, variant in GFIM_VARIANTS.items()}
    if arch >= TMA_MIN_ARCH:
        out.update({name: gfim_tma_source(dtype) for name, dtype in GFIM_TMA_VARIANTS.items()})
    for tag, (dtype, precision) in SCHULZ_VARIANTS.items():
        out[f"schulz_residual_{tag}"] = schulz_residual_source(dtype, precision)
        out[f"schulz_update_{tag}"] = schulz_update_source(dtype, precision)
    out.update({name: project_source(*variant) for name, variant in PROJECT_VARIANTS.items()})
    out.update({name: scale_cast_source(*variant) for name, variant in SCALE_CAST_VARIANTS.items()})
    return out


def _can_codegen() -> bool:
    return isinstance(_gfim.gfim_kernel, JITFunction)


def _selected(arch: int, only: tuple[str, ...] | None) -> dict:
    """sources(arch), restricted to the names that start with one of ``only`` (all when None)."""
    return {n: v for n, v in sources(arch).items() if only is None or n.startswith(tuple(only))}


def _compile_here(arch: int, only: tuple[str, ...] | None = None) -> dict:
    target = GPUTarget("cuda", arch, 32)
    return {name: triton.compile(src, target=target, options=opts) for name, (src, opts) in _selected(arch, only).items()}


def _compile_in_child(arch: int, only: tuple[str, ...] | None = None) -> dict:
    """compile_all in a TRITON_INTERPRET=0 child; rebuild the kernels from the cache files it names."""
    # This file does not know the package it is installed in: the child runs this module under the
    # name it was imported as, with the directory above the top-level package on its path.
    module = __spec__.name
    top = importlib.import_module(module.split(".")[0])
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(top.__file__)))
    env = dict(os.environ, TRITON_INTERPRET="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "aot.json")
        proc = subprocess.run(
            [sys.executable, "-m", module, "--arch", str(arch), "--out", out]
            + (["--only", ",".join(only)] if only is not None else []),
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"AOT compilation for sm_{arch} failed in the child process:\n{proc.stderr[-4000:]}")
        with open(out) as f:
            groups = json.load(f)
    srcs = sources(arch)
    return {
        name: triton.compiler.compiler.CompiledKernel(srcs[name][0], entry["metadata_group"], entry["hash"])
        for name, entry in groups.items()
    }


def compile_all(arch: int, only: tuple[str, ...] | None = None) -> dict:
    """Compile every kernel variant for sm_``arch`` (e.g. 80, 90); returns name -> CompiledKernel.

    ``only``: just the variants whose names start with one of these prefixes (e.g. ``("project",
    "scale_cast")``).  Needs no GPU.  ~1–2 s per kernel on a cold Triton cache, near-instant on a warm one.
    """
    only = tuple(only) if only is not None else None
    return _compile_here(arch, only) if _can_codegen() else _compile_in_child(arch, only)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, required=True, help="SM version, e.g. 80 or 90")
    parser.add_argument("--out", help="write {name: {hash, metadata_group}} JSON here")
    parser.add_argument("--only", help="comma-separated name prefixes: compile just those variants")
    args = parser.parse_args(argv)
    kernels = compile_all(args.arch, tuple(args.only.split(",")) if args.only else None)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({n: {"hash": k.hash, "metadata_group": k.metadata_group} for n, k in kernels.items()}, f)
    else:
        for name, k in kernels.items():
            print(f"{name}: {len(k.asm['cubin'])} B cubin, {k.metadata.num_warps} warps, {k.metadata.shared} B smem")


if __name__ == "__main__":
    main()
