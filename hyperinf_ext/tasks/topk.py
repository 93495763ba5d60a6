"""Streaming top-k over the columns of a score matrix that arrives in column blocks.

``attribute`` sees the pairwise scores [n_query, n_train] one training batch at a time
(:meth:`HyperINF.score_batches`); keeping only each row's k best so far makes its memory
O(n_query·(k + batch)) instead of O(n_query·n_train).

Order: by value (descending for ``largest``, ascending otherwise), ties by the smaller column index, so
the result equals a stable sort of the full row whatever the block order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TopK", "merge_topk", "topk_of_matrix"]


def _rank(values: torch.Tensor, indices: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` columns of each row ordered by (value, then smaller index): values/indices [Q, ≤k]."""
    by_index = torch.argsort(indices, dim=1, stable=True)
    values, indices = values.gather(1, by_index), indices.gather(1, by_index)
    by_value = torch.argsort(values, dim=1, descending=largest, stable=True)
    keep = by_value[:, :k]
    return values.gather(1, keep), indices.gather(1, keep)


def merge_topk(
    values: torch.Tensor, indices: torch.Tensor, block: torch.Tensor, block_index: torch.Tensor, k: int,
    largest: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a new block of columns into each row's running top-k.

    Args:
        values, indices: the running top-k, [Q, m] (float) and [Q, m] (int64), m ≤ k (m = 0 at start).
        block: the new scores [Q, B]; block_index: their column indices [B] int64.
        k: how many to keep (≥ 1); largest: keep the largest (else the smallest) values.

    Returns:
        (values [Q, min(k, m + B)], indices [Q, min(k, m + B)]), best first.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if block.dim() != 2 or block_index.shape != (block.shape[1],):
        raise ValueError(f"block must be [Q, B] with block_index [B], got {tuple(block.shape)} and "
                         f"{tuple(block_index.shape)}")
    new_idx = block_index.to(torch.long).unsqueeze(0).expand(block.shape[0], -1)
    return _rank(torch.cat([values.to(block.dtype), block], 1), torch.cat([indices, new_idx], 1), k, largest)


@dataclass
class TopK:
    """Running top-k of every row: ``update`` with column blocks, then read ``values``/``indices`` [Q, k]."""

    k: int
    largest: bool
    values: torch.Tensor | None = None
    indices: torch.Tensor | None = None

    def update(self, block: torch.Tensor, block_index: torch.Tensor) -> None:
        if self.values is None:
            self.values = block.new_zeros(block.shape[0], 0)
            self.indices = torch.zeros(block.shape[0], 0, dtype=torch.long)
        self.values, self.indices = merge_topk(self.values, self.indices, block, block_index, self.k, self.largest)


def topk_of_matrix(scores: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of a full matrix [Q, N] with the same ordering (the reference for the streaming one)."""
    cols = torch.arange(scores.shape[1]).unsqueeze(0).expand(scores.shape[0], -1)
    return _rank(scores, cols, k, largest)
