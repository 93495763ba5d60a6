"""Inputs of the benchmark suite: synthetic per-sample gradients, SPD and GFIM-like matrix batches, the
damping HyperINF uses by default, and the pipeline setup (embedded model + Rotten Tomatoes split)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

def cpu_backends() -> list[str]:
    """The library's CPU backends, fastest first, minus Triton (interpreter only on CPU: not timed)."""
    from hyperinf_ext import available_backends

    return [b for b in available_backends("cpu") if b != "triton"]


def make_grads(L: int, n: int, r: int, d: int, dtype: torch.dtype, seed: int = 0, decay: float = 0.0) -> torch.Tensor:
    """Per-sample rank-first gradients [L, n, r, d]; column j scaled by (j+1)^-decay (a decaying GFIM spectrum)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(L, n, r, d, generator=g)
    if decay:
        x.mul_(torch.arange(1, d + 1, dtype=torch.float32).pow(-decay))
    return x.to(dtype)


_SPD_CACHE: dict[tuple, torch.Tensor] = {}


def random_orthogonal(B: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(B, d, d, generator=g, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1)).unsqueeze(-2)


def spd_batch(d: int, B: int, lam: float, kappa: float, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """B symmetric positive-definite d×d matrices with eigenvalues log-spaced in [lam, lam·kappa].

    Built in float64 as Q·diag(e)·Qᵀ (Q random orthogonal), symmetrised, then cast (exactly symmetric).
    """
    key = (d, B, lam, kappa, seed)
    if key not in _SPD_CACHE:
        Q = random_orthogonal(B, d, seed)
        e = lam * torch.logspace(0, math.log10(kappa), d, dtype=torch.float64)
        A = (Q * e) @ Q.mT
        _SPD_CACHE[key] = 0.5 * (A + A.mT)
    return _SPD_CACHE[key].to(dtype)


def gfim_like(L: int, d: int, power: float, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """L symmetric PSD 'GFIMs' [L, d, d] with a power-law spectrum e_i = (i+1)^-power (max 1)."""
    Q = random_orthogonal(L, d, seed)
    e = torch.arange(1, d + 1, dtype=torch.float64).pow(-power)
    G = (Q * e) @ Q.mT
    return (0.5 * (G + G.mT)).to(dtype)


def randomize_lora_B(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """PEFT starts lora_B at zero (so lora_A gradients vanish); give it small random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(std).to(p.dtype))


@dataclass
class PipelineSetup:
    model: Any
    tokenizer: Any
    train: Any  # TextDataset
    val: Any


def pipeline_setup(n_train: int, n_val: int, seed: int = 0) -> PipelineSetup:
    """The embedded default model (random LoRA init, lora_B nonzero) and a Rotten Tomatoes split."""
    from hyperinf_ext.app.data import load_rotten_tomatoes, split_dataset
    from hyperinf_ext.app.models.training import load_lora_model, load_tokenizer

    model = load_lora_model(seed=seed)
    randomize_lora_B(model, seed=seed)
    tok = load_tokenizer()
    train, val = split_dataset(load_rotten_tomatoes(), n_train, n_val, seed=seed)
    return PipelineSetup(model, tok, train, val)


def default_damping() -> tuple[Any, float]:
    """The (rule, scale) HyperINF uses with its default configuration (read from the library)."""
    from hyperinf_ext.attributor.hyperinf import HyperINFConfig

    cfg = HyperINFConfig()
    try:
        from hyperinf_ext.curvature.methods import resolve
    except ImportError:  # older library: no "auto" rule
        return cfg.damping, getattr(cfg, "damping_scale", None) or 0.1
    return resolve(cfg.method, cfg.damping, cfg.damping_scale)


def pad_causal_batch(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded causal-LM batch of encoded rows ({"input_ids", "labels"} lists): input_ids (pad_id),
    attention_mask, labels (-100 at pads)."""
    T = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), T), int(pad_id), dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(r["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
