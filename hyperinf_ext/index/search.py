"""Answers from an index: the query side is exact (per-example gradients, preconditioned by the
fitted method), the training side comes from the compressed store, one blocked matmul per block.

score[q, k] ≈ −Σ_l ⟨q̃_l P_l, g_k,l P_l⟩ (SIGN_CONVENTION of the attributor); exact layers have P = I.
``exact_rerank`` recomputes the exact scores of the best candidates from the training rows.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Iterable

import torch

from ..attributor.config import QueryGradients
from ..attributor.topk import TopK, TopKScores, check_k
from . import projection, store

TrainSubset = Callable[[list[int]], Iterable]
"""``train_subset(indices)`` → a loader over exactly those training examples, whose batches carry the
original training ``index`` of every row (what ``exact_rerank`` back-propagates)."""

BLOCK_ROWS = 4096
SKETCH_CHUNK_VALUES = 1 << 25
"""Most values of padded P columns preconditioned at once by ``self_scores`` (128 MiB in float32)."""


class Search:
    """Query methods of :class:`~hyperinf_ext.index.index.Index` (uses its attributor, plans, matrices, shards)."""

    def _work_dtype(self) -> torch.dtype:
        # a float32 store is exact: keep the attributor's precision; compressed rows lose far more than float32
        return self.attributor.fdtype if self.config.dtype == "float32" else torch.float32

    def _projected(self, queries: Iterable | QueryGradients, mix_queries: float = 0.0,
                   mix_with: QueryGradients | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """(query index [Q] sorted, preconditioned gradients {layer: [Q, r, d]}, stored-row form [Q, W])."""
        index, qt = self.attributor.precondition(queries, mix_queries=mix_queries, mix_with=mix_with)
        rows = projection.project_rows(self.plans, self._query_maps(), qt, self.attributor.fdtype)
        return index, qt, rows.to(self._work_dtype()).cpu()

    def _query_maps(self) -> dict[str, torch.Tensor]:
        """Per projected layer, the [d, k] map of a preconditioned query onto the stored rows (``estimator``)."""
        if self.estimator == "unbiased":
            return self.matrices
        if self._maps is None:
            f = self.attributor.factors
            self._maps = {n: projection.regression_map(P, f[n].gfim) for n, P in self.matrices.items()}
        return self._maps

    def _stream(self, rows: torch.Tensor, take: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
        """−rows · storedᵀ for every stored block: ``take(block [Q, b], index [b])``."""
        for index, values, scales in store.blocks(self.shards, self.config.dtype, BLOCK_ROWS):
            train = values.to(rows.dtype) * scales[:, self._column_layer].to(rows.dtype)  # exact: powers of two
            take(-(rows @ train.T), index)

    def scores(self, queries: Iterable | QueryGradients, *, mix_queries: float = 0.0) -> torch.Tensor:
        """Approximate pairwise influence [Q, n_train] (query-index order), float32 (float64 for an exact
        float32 store of a float64 attributor).  ``mix_queries=w``: the queries' GFIM mixed into the
        curvature with weight w, as ``HyperINF.scores`` does (the query side is exact, so is the mixing)."""
        return self._dense(self._projected(queries, mix_queries)[2])

    def mean_scores(self, val: Iterable | QueryGradients, *, mix_queries: float = 0.0) -> torch.Tensor:
        """Influence on the mean loss of ``val`` [n_train]: its mean gradient is one query (``mix_queries``:
        preconditioned with the GFIM of every example of ``val`` mixed in, as ``HyperINF.mean_scores``)."""
        q = self.attributor.query_gradients(val, "validation gradients")
        mean = QueryGradients(torch.zeros(1, dtype=torch.int64),
                              {n: g.to(self.attributor.fdtype).mean(0, keepdim=True) for n, g in q.grads.items()})
        return self._dense(self._projected(mean, mix_queries, q)[2])[0]

    def _dense(self, rows: torch.Tensor) -> torch.Tensor:
        """−rows · storedᵀ for every stored row: [Q, n_train] in the rows' dtype."""
        out = torch.zeros(rows.shape[0], self.n_train, dtype=rows.dtype)

        def take(block: torch.Tensor, index: torch.Tensor) -> None:
            out[:, index] = block

        self._stream(rows, take)
        return out

    def query(self, queries: Iterable | QueryGradients, *, top_k: int = 10, exact_rerank: int = 0,
              train_subset: TrainSubset | None = None, mix_queries: float = 0.0) -> TopKScores:
        """Per query the ``top_k`` most positive and most negative training examples.

        ``exact_rerank=M`` (≥ top_k): the M best candidates of each side and query (their union over the
        queries) are scored exactly from ``train_subset`` and re-ranked; the returned values are then
        exact scores.  Without it, values are the index's approximations.  ``mix_queries`` as in ``scores``.
        """
        check_k(top_k)
        if isinstance(exact_rerank, bool) or not isinstance(exact_rerank, int) or exact_rerank < 0:
            raise ValueError(f"exact_rerank: expected a number of candidates ≥ 0, got {exact_rerank!r}")
        if exact_rerank and exact_rerank < top_k:
            raise ValueError(f"exact_rerank: {exact_rerank} candidates cannot re-rank a top {top_k}; use ≥ {top_k}")
        if exact_rerank and train_subset is None:
            raise ValueError("train_subset: required with exact_rerank (a loader over the candidate training rows)")
        _, qt, rows = self._projected(queries, mix_queries)
        keep = TopK(rows.shape[0], max(top_k, exact_rerank), rows.dtype)
        self._stream(rows, keep.update)
        approx = keep.result()
        if not exact_rerank:
            return _trim(approx, top_k)
        candidates = torch.cat([approx.positive_index, approx.negative_index], dim=1).unique()
        exact = TopK(rows.shape[0], top_k, self.attributor.fdtype)
        for lo in range(0, candidates.numel(), 256):
            chunk = candidates[lo:lo + 256].tolist()
            g = self.attributor.query_gradients(train_subset(chunk), "re-rank gradients")
            if sorted(g.index.tolist()) != sorted(chunk):
                raise ValueError(f"train_subset: returned examples {sorted(g.index.tolist())[:5]}... for the "
                                 f"requested {sorted(chunk)[:5]}... (index must be the training index)")
            block = -sum(torch.einsum("qrd,brd->qb", qt[n].to(self.attributor.fdtype), g.grads[n].to(self.attributor.fdtype)
                                      .to(qt[n].device)) for n in qt)
            exact.update(block.cpu(), g.index)
        # the kept indices are training indices: n_train is the index's, not the number of candidates
        return replace(exact.result(), n_train=self.n_train)

    def self_scores(self) -> torch.Tensor:
        """Self-influence g_kᵀ H⁻¹ g_k of every training example [n_train] (positive; ``HyperINF.self_scores``).

        Exact layers use H⁻¹ as the method preconditions; a projected layer uses the sketch
        ĝ (Pᵀ H⁻¹ P) ĝᵀ with ĝ = gP, whose expectation over P is close to gH⁻¹gᵀ for k ≫ 1 (accuracy
        measured in bench/INDEX.md).  Needs a method whose curvature acts on the d side only (its
        ``fits`` are ``gfim_sum``): P's columns are preconditioned as queries.
        """
        method = self.attributor.method
        if method is not None and tuple(method.fits) != ("gfim_sum",):
            raise ValueError(f"method {self.attributor.config.method!r}: its curvature also acts on the rank side "
                             "(fits rank_sum), so the index cannot sketch it; use HyperINF.self_scores")
        sketches = self._sketched_inverses()
        out = torch.zeros(self.n_train, dtype=torch.float64)
        for index, values, scales in store.blocks(self.shards, self.config.dtype, BLOCK_ROWS):
            s = torch.zeros(index.numel(), dtype=torch.float64)
            for l, p in enumerate(self.plans):
                g = (values[:, p.offset:p.offset + p.width].to(torch.float64) * scales[:, l:l + 1].to(torch.float64))
                g = g.reshape(-1, p.rank, p.columns)
                s += ((g @ sketches[p.name]) * g).sum(dim=(1, 2))
            out[index] = s
        return out

    def _sketched_inverses(self) -> dict[str, torch.Tensor]:
        """M_l = P_lᵀ H_l⁻¹ P_l [k, k] float64 per layer: P_lᵀ's rows preconditioned as r-row queries.

        Every layer's k rows become ⌈k/r⌉ queries of r rows, padded to the longest layer's count; they are
        preconditioned a chunk of queries at a time (each query is preconditioned on its own, so chunks
        give the same rows) so that the padded queries of all layers never stand in memory at once —
        on an exact index of a large model they would take layers × d² values (``SKETCH_CHUNK_VALUES``)."""
        Q = max(math.ceil(p.columns / p.rank) for p in self.plans)
        fdtype = self.attributor.fdtype
        per_query = sum(p.rank * p.dim for p in self.plans)
        chunk = max(1, min(Q, SKETCH_CHUNK_VALUES // per_query))
        Ps = {p.name: self.matrices[p.name].to(torch.float64) if not p.exact else None for p in self.plans}
        out = {p.name: torch.zeros(p.columns, p.columns, dtype=torch.float64) for p in self.plans}
        for q0 in range(0, Q, chunk):
            q1 = min(Q, q0 + chunk)
            rows = {p.name: (q0 * p.rank, min(p.columns, q1 * p.rank)) for p in self.plans}
            grads = {}
            for p in self.plans:
                lo, hi = rows[p.name]
                padded = torch.zeros((q1 - q0) * p.rank, p.dim, dtype=fdtype)
                if hi > lo:
                    padded[:hi - lo] = (Ps[p.name].T[lo:hi].to(fdtype) if not p.exact
                                        else torch.eye(p.dim, dtype=fdtype)[lo:hi])
                grads[p.name] = padded.reshape(q1 - q0, p.rank, p.dim)
            _, qt = self.attributor.precondition(QueryGradients(torch.arange(q1 - q0), grads))
            for p in self.plans:
                lo, hi = rows[p.name]
                if hi <= lo:
                    continue
                HPt = qt[p.name].reshape(-1, p.dim)[:hi - lo].to(torch.float64).cpu()  # rows lo..hi of Pᵀ H⁻¹ [., d]
                out[p.name][lo:hi] = HPt @ Ps[p.name] if not p.exact else HPt
            del grads, qt
        return {n: (M + M.T) / 2 for n, M in out.items()}  # symmetric up to the solver's rounding


def _trim(t: TopKScores, k: int) -> TopKScores:
    return TopKScores(t.positive_values[:, :k], t.positive_index[:, :k], t.negative_values[:, :k],
                      t.negative_index[:, :k], n_train=t.n_train)
