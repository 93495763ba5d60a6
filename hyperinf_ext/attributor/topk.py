"""Streaming per-query top-K: the K most positive and K most negative training examples per query.

The one home of top-K over score matrices that arrive in column blocks (``attr.scores(top_k=K)``, the
``attribute`` task): memory O(n_query·K), never O(n_query·n_train).

* :func:`merge_topk` merges a block of columns into one side's running top-k (the algorithm).
* :class:`TopKSide` keeps one side (the largest or the smallest values) of every row.
* :class:`TopK` keeps both sides, merges parts built on other batches or other ranks
  (:meth:`TopK.merge`) and returns a :class:`TopKScores`.

Ties are broken deterministically by the training index (the smaller index first), so the kept set is a
function of the scores alone — independent of the batch order, the batch size and the rank split: each
side is the first K of the strict order (value desc, index asc) for the most positive, (value asc, index
asc) for the most negative.  That is also what :func:`topk_of_matrix` computes on a full matrix.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["TopKScores", "TopK", "TopKSide", "merge_topk", "side_of_matrix", "topk_of_matrix", "check_k"]

_NO_INDEX = torch.iinfo(torch.int64).max  # an empty slot: loses every tie, so real examples come first


def _best(values: torch.Tensor, index: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` of each row of values [Q, M] / index [Q, M] int64 in (value, then index asc) order.

    Two stable sorts: by index, then by value; equal values keep their index order.
    """
    order = index.argsort(dim=1, stable=True)
    values, index = values.gather(1, order), index.gather(1, order)
    order = values.argsort(dim=1, descending=largest, stable=True)[:, :k]
    return values.gather(1, order), index.gather(1, order)


def merge_topk(
    values: torch.Tensor, indices: torch.Tensor, block: torch.Tensor, block_index: torch.Tensor, k: int,
    largest: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a new block of columns into each row's running top-k (one side).

    Args:
        values, indices: the running top-k, [Q, m] (float) and [Q, m] (int64), m ≤ k (m = 0 at start).
        block: the new scores [Q, B]; block_index: their column indices [B] int64.
        k: how many to keep (≥ 1); largest: keep the largest (else the smallest) values.

    Returns:
        (values [Q, min(k, m + B)] in block's dtype, indices [Q, min(k, m + B)] int64), best first.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if block.dim() != 2 or block_index.shape != (block.shape[1],):
        raise ValueError(f"block must be [Q, B] with block_index [B], got {tuple(block.shape)} and "
                         f"{tuple(block_index.shape)}")
    new_idx = block_index.to(torch.int64).unsqueeze(0).expand(block.shape[0], -1)
    return _best(torch.cat([values.to(block.dtype), block], 1), torch.cat([indices, new_idx], 1), k, largest)


@dataclass
class TopKSide:
    """Running top-k of every row, one side: ``update`` with column blocks, read ``values``/``indices`` [Q, ≤k].

    Starts empty (``values`` None) unless given [Q, k] buffers; :class:`TopK` starts its sides full of
    empty slots (±inf, index ``_NO_INDEX``) so a part always has the [Q, K] shape other ranks expect.
    """

    k: int
    largest: bool
    values: torch.Tensor | None = None
    indices: torch.Tensor | None = None

    def update(self, block: torch.Tensor, block_index: torch.Tensor) -> None:
        """Take in scores ``block`` [Q, B] of the columns ``block_index`` [B] int64."""
        if self.values is None:
            self.values = block.new_zeros(block.shape[0], 0)
            self.indices = torch.zeros(block.shape[0], 0, dtype=torch.int64, device=block_index.device)
        self.values, self.indices = merge_topk(self.values, self.indices, block, block_index, self.k, self.largest)

    def take(self, other: "TopKSide") -> None:
        """Fold in another part's kept values and indices (same rows, any columns)."""
        values = torch.cat([self.values, other.values.to(self.values.dtype)], 1)
        self.values, self.indices = _best(values, torch.cat([self.indices, other.indices], 1), self.k, self.largest)


def side_of_matrix(scores: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One side's top-k of each row of a full matrix [Q, N]: (values [Q, min(k, N)], indices [Q, min(k, N)])."""
    side = TopKSide(k, largest)
    side.update(scores, torch.arange(scores.shape[1], device=scores.device))
    return side.values, side.indices


@dataclass
class TopKScores:
    """Per query (rows, in query-index order), the K most positive and K most negative training examples.

    ``positive_values``/``negative_values`` [Q, K'] in the score dtype, best first (largest / smallest);
    ``positive_index``/``negative_index`` [Q, K'] int64 training indices; K' = min(K, n_train).  See
    ``attributor.SIGN_CONVENTION``: positive = the example raises the query's loss (harmful).
    """

    positive_values: torch.Tensor
    positive_index: torch.Tensor
    negative_values: torch.Tensor
    negative_index: torch.Tensor
    n_train: int

    @property
    def k(self) -> int:
        return self.positive_values.shape[1]

    def save(self, path: str | Path, **metadata: str) -> None:
        """Write the four tensors to a safetensors file atomically (metadata: string key/values)."""
        from ..persistence import save_tensors_atomic

        tensors = {f: getattr(self, f).detach().cpu().contiguous() for f in _FIELDS}
        save_tensors_atomic(path, tensors, {"n_train": str(self.n_train), "kind": "topk", **metadata})

    @classmethod
    def load(cls, path: str | Path) -> "TopKScores":
        from ..persistence import read_tensors

        tensors, meta = read_tensors(path, "top-k scores")
        missing = [f for f in _FIELDS if f not in tensors]
        if missing or meta.get("kind") != "topk":
            raise ValueError(f"{path}: not a top-k score file (missing {missing or 'kind=topk'})")
        return cls(**{f: tensors[f] for f in _FIELDS}, n_train=int(meta["n_train"]))


_FIELDS = ("positive_values", "positive_index", "negative_values", "negative_index")


def check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k: expected an integer ≥ 1, got {k!r}")
    return k


class TopK:
    """Running top-K per query, both sides; ``update`` with score blocks, ``merge`` partial results, ``result``."""

    def __init__(self, n_query: int, k: int, dtype: torch.dtype = torch.float64):
        self.k = check_k(k)
        empty = torch.full((n_query, k), _NO_INDEX, dtype=torch.int64, device="cpu")
        self.pos = TopKSide(k, True, torch.full((n_query, k), -torch.inf, dtype=dtype, device="cpu"), empty)
        self.neg = TopKSide(k, False, torch.full((n_query, k), torch.inf, dtype=dtype, device="cpu"), empty.clone())
        self.seen = 0  # training examples taken in (so far, over the merged parts)

    @property
    def n_query(self) -> int:
        return self.pos.values.shape[0]

    def update(self, block: torch.Tensor, index: torch.Tensor) -> None:
        """Take in scores ``block`` [Q, B] of the training examples ``index`` [B] int64."""
        if block.dim() != 2 or block.shape != (self.n_query, index.numel()):
            raise ValueError(f"top_k: a score block must be [{self.n_query}, {index.numel()}], got {tuple(block.shape)}")
        block, index = block.to(self.pos.values.dtype).cpu(), index.reshape(-1).cpu()
        self.pos.update(block, index)
        self.neg.update(block, index)
        self.seen += index.numel()

    def merge(self, other: "TopK") -> None:
        """Fold in another part (other batches, another rank) of the same queries and K."""
        if other.k != self.k or other.n_query != self.n_query:
            raise ValueError(f"top_k: cannot merge K={other.k} × {other.n_query} queries into K={self.k} × {self.n_query}")
        self.pos.take(other.pos)
        self.neg.take(other.neg)
        self.seen += other.seen

    def state(self) -> list[torch.Tensor]:
        """The four [Q, K] tensors (for sending to another rank); :meth:`from_state` rebuilds."""
        return [self.pos.values, self.pos.indices, self.neg.values, self.neg.indices]

    @classmethod
    def from_state(cls, tensors: list[torch.Tensor], seen: int) -> "TopK":
        pos_v, pos_i, neg_v, neg_i = tensors
        part = cls(pos_v.shape[0], pos_v.shape[1], pos_v.dtype)
        part.pos.values, part.pos.indices, part.neg.values, part.neg.indices = pos_v, pos_i, neg_v, neg_i
        part.seen = seen
        return part

    def result(self) -> TopKScores:
        """The kept examples, trimmed to K' = min(K, examples seen)."""
        k = min(self.k, self.seen)
        return TopKScores(self.pos.values[:, :k].clone(), self.pos.indices[:, :k].clone(),
                          self.neg.values[:, :k].clone(), self.neg.indices[:, :k].clone(), n_train=self.seen)


def topk_of_matrix(scores: torch.Tensor, k: int) -> TopKScores:
    """The same selection on a full [Q, n_train] matrix (columns = training indices 0..n_train-1)."""
    k, scores = check_k(k), scores.cpu()
    pos_v, pos_i = side_of_matrix(scores, k, largest=True)
    neg_v, neg_i = side_of_matrix(scores, k, largest=False)
    return TopKScores(pos_v, pos_i, neg_v, neg_i, n_train=scores.shape[1])
