"""Streaming per-query top-K: the K most positive and K most negative training examples per query.

A :class:`TopK` takes score blocks ``[n_query, B]`` with their training indices ``[B]`` in any order and
keeps, per query, only the K largest and K smallest scores: memory O(n_query·K), never
O(n_query·n_train).  Parts built on other batches or other ranks merge with :meth:`TopK.merge`.

Ties are broken deterministically by the training index (the smaller index first), so the kept set is a
function of the scores alone — independent of the batch order, the batch size and the rank split: each
side is the first K of the strict order (value desc, index asc) for the most positive, (value asc, index
asc) for the most negative.  That is also what :func:`topk_of_matrix` computes on a full matrix.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

_NO_INDEX = torch.iinfo(torch.int64).max  # an empty slot: loses every tie, so real examples come first


def _best(values: torch.Tensor, index: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` of each row of values [Q, M] / index [Q, M] int64 in (value, then index asc) order.

    Two stable sorts: by index, then by value; equal values keep their index order.
    """
    order = index.argsort(dim=1, stable=True)
    values, index = values.gather(1, order), index.gather(1, order)
    order = values.argsort(dim=1, descending=largest, stable=True)[:, :k]
    return values.gather(1, order), index.gather(1, order)


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
        from .persistence import save_tensors_atomic

        tensors = {f: getattr(self, f).detach().cpu().contiguous() for f in _FIELDS}
        save_tensors_atomic(path, tensors, {"n_train": str(self.n_train), "kind": "topk", **metadata})

    @classmethod
    def load(cls, path: str | Path) -> "TopKScores":
        from .persistence import read_tensors

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
    """Running top-K per query; ``update`` with score blocks, ``merge`` partial results, ``result``."""

    def __init__(self, n_query: int, k: int, dtype: torch.dtype = torch.float64):
        self.k = check_k(k)
        self.pos_v = torch.full((n_query, k), -torch.inf, dtype=dtype)
        self.neg_v = torch.full((n_query, k), torch.inf, dtype=dtype)
        self.pos_i = torch.full((n_query, k), _NO_INDEX, dtype=torch.int64)
        self.neg_i = self.pos_i.clone()
        self.seen = 0  # training examples taken in (so far, over the merged parts)

    @property
    def n_query(self) -> int:
        return self.pos_v.shape[0]

    def update(self, block: torch.Tensor, index: torch.Tensor) -> None:
        """Take in scores ``block`` [Q, B] of the training examples ``index`` [B] int64."""
        if block.dim() != 2 or block.shape != (self.n_query, index.numel()):
            raise ValueError(f"top_k: a score block must be [{self.n_query}, {index.numel()}], got {tuple(block.shape)}")
        block = block.to(self.pos_v.dtype).cpu()
        idx = index.to(torch.int64).cpu().expand(self.n_query, -1)
        self._take(block, idx, block, idx)
        self.seen += index.numel()

    def _take(self, pos_v, pos_i, neg_v, neg_i) -> None:
        self.pos_v, self.pos_i = _best(torch.cat([self.pos_v, pos_v], 1), torch.cat([self.pos_i, pos_i], 1), self.k, True)
        self.neg_v, self.neg_i = _best(torch.cat([self.neg_v, neg_v], 1), torch.cat([self.neg_i, neg_i], 1), self.k, False)

    def merge(self, other: "TopK") -> None:
        """Fold in another part (other batches, another rank) of the same queries and K."""
        if other.k != self.k or other.n_query != self.n_query:
            raise ValueError(f"top_k: cannot merge K={other.k} × {other.n_query} queries into K={self.k} × {self.n_query}")
        self._take(other.pos_v, other.pos_i, other.neg_v, other.neg_i)
        self.seen += other.seen

    def state(self) -> list[torch.Tensor]:
        """The four [Q, K] tensors (for sending to another rank); :meth:`from_state` rebuilds."""
        return [self.pos_v, self.pos_i, self.neg_v, self.neg_i]

    @classmethod
    def from_state(cls, tensors: list[torch.Tensor], seen: int) -> "TopK":
        pos_v, pos_i, neg_v, neg_i = tensors
        part = cls(pos_v.shape[0], pos_v.shape[1], pos_v.dtype)
        part.pos_v, part.pos_i, part.neg_v, part.neg_i = pos_v, pos_i, neg_v, neg_i
        part.seen = seen
        return part

    def result(self) -> TopKScores:
        """The kept examples, trimmed to K' = min(K, examples seen)."""
        k = min(self.k, self.seen)
        return TopKScores(self.pos_v[:, :k].clone(), self.pos_i[:, :k].clone(), self.neg_v[:, :k].clone(),
                          self.neg_i[:, :k].clone(), n_train=self.seen)


def topk_of_matrix(scores: torch.Tensor, k: int) -> TopKScores:
    """The same selection on a full [Q, n_train] matrix (columns = training indices 0..n_train-1)."""
    t = TopK(scores.shape[0], k, scores.dtype)
    t.update(scores, torch.arange(scores.shape[1]))
    return t.result()
