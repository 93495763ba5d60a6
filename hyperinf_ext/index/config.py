"""Settings of a gradient index: how the training gradients are compressed and stored."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

STORE_DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class IndexConfig:
    """How ``Index.build`` compresses each LoRA layer's r×d training gradient.

    The d side of every layer is projected by a seeded Gaussian matrix P_l [d, k] with entries
    N(0, 1/k), so E[P Pᵀ] = I and ⟨q̃P, gP⟩ is an unbiased estimate of ⟨q̃, g⟩ (the GFIM's own
    structure: the r rows share one d×d curvature, so they share one projection).
    """

    proj_dim: int = 1024
    """Numbers kept per LoRA layer and example: k = proj_dim // r columns of the d side.  0, or any
    value with k ≥ d, keeps that layer exact (no projection)."""
    store_dtype: str = "auto"
    """Element type of the stored rows: float16 (default with a projection; each row carries a
    power-of-two scale, so only the last rounding is lost), bfloat16, or float32 (default for
    ``proj_dim=0``: then the store holds the gradients exactly)."""
    seed: int = 0
    """Seed of the projection matrices (layer l uses ``seed`` and its position)."""
    rows_per_shard: int = 4096
    """Training examples per shard file; a shard is also closed at every fit checkpoint."""

    def __post_init__(self) -> None:
        if isinstance(self.proj_dim, bool) or not isinstance(self.proj_dim, int) or self.proj_dim < 0:
            raise ValueError(f"proj_dim: expected an integer ≥ 0 (0 = exact gradients), got {self.proj_dim!r}")
        if self.store_dtype not in STORE_DTYPES + ("auto",):
            raise ValueError(f"store_dtype: expected one of {STORE_DTYPES + ('auto',)}, got {self.store_dtype!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: expected an integer ≥ 0, got {self.seed!r}")
        if isinstance(self.rows_per_shard, bool) or not isinstance(self.rows_per_shard, int) or self.rows_per_shard < 1:
            raise ValueError(f"rows_per_shard: expected an integer ≥ 1, got {self.rows_per_shard!r}")

    @property
    def dtype(self) -> str:
        """The store dtype with ``auto`` resolved."""
        if self.store_dtype != "auto":
            return self.store_dtype
        return "float32" if self.proj_dim == 0 else "float16"

    def columns(self, rank: int, dim: int) -> int:
        """k of a layer of rank ``rank`` and width ``dim``: ``dim`` when the layer is kept exact."""
        if self.proj_dim == 0:
            return dim
        return min(dim, max(1, self.proj_dim // rank))

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
