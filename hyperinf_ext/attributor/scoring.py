"""Scoring with a fitted attributor: query gradients, preconditioning by the current method, and the
dot products with every training gradient (pairwise, mean-query, streamed by batch, self-influence).

``Scoring`` is a mixin of :class:`~hyperinf_ext.attributor.hyperinf.HyperINF`; the sign of every score is
``config.SIGN_CONVENTION``.  Results go to the sinks of sinks.py (dense, top-k, file).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from .. import distributed as _dist
from .sinks import Sinks, check_out
from .cache import GradientCache
from .config import SIGN_CONVENTION, QueryGradients
from .topk import check_k


class Scoring:
    """The scoring methods of the attributor (they need ``fit`` or ``load`` first: ``_require_fit``)."""

    def query_gradients(self, loader: Iterable | QueryGradients, desc: str = "query gradients") -> QueryGradients:
        """Per-example gradients of a query/validation loader, reusable across ``use()`` switches.

        ``scores`` and ``mean_scores`` accept the result in place of a loader, which saves the
        forward/backward passes when several methods or dampings are compared on the same queries.
        """
        if isinstance(loader, QueryGradients):
            return loader
        idx, parts = [], {l.name: [] for l in self.layers}
        for index, grads in self._grad_batches(loader, desc):
            idx.append(index)
            for n, g in grads.items():
                parts[n].append(g)
        if not idx:
            raise ValueError(f"{desc}: the loader yielded no batches")
        return QueryGradients(torch.cat(idx), {n: torch.cat(p) for n, p in parts.items()})

    def precondition(self, queries: Iterable | QueryGradients) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The query gradients times the method's inverse curvature, per layer: (index [Q] int64 sorted,
        {layer: [Q, r, d]} in the factor dtype, rows in that index order).

        ``−Σ_l ⟨q̃_l, g_k,l⟩`` with these is ``scores``' entry for training example k.  Methods that need a
        pass over the training data to precondition (``needs_train_pass``) are refused: call ``scores``.
        """
        self._require_fit()
        self._prepare()
        if self.method.needs_train_pass:
            raise ValueError(f"method {self.config.method!r}: preconditioning needs a pass over the training "
                             "data; precondition() takes only methods that do not (use scores())")
        q = self.query_gradients(queries)
        order = q.index.argsort()
        grads = {n: g[order.to(g.device)] for n, g in q.grads.items()}
        return q.index[order], self._precondition(grads, None)

    def _precondition(self, q: dict[str, torch.Tensor], train_loader: Iterable | None) -> dict[str, torch.Tensor]:
        self._prepare()
        source = self._train_batches(train_loader) if self.method.needs_train_pass else (lambda: iter(()))
        with self._timed("precondition"):
            return self.method.precondition(q, self.factors, lambda: (g for _, g in source()))

    def _dot_with_train(self, qt: dict[str, torch.Tensor], train_loader: Iterable | None, sink: Any) -> None:
        """−Σ_l ⟨q̃_l, g_k,l⟩ for every query row and training example, fed to ``sink`` block by block."""
        names = list(qt)
        Q = next(iter(qt.values())).shape[0]
        qflat = torch.cat([qt[n].reshape(Q, -1).to(self.fdtype) for n in names], dim=1)  # [Q, P]
        seen = torch.zeros(self.n_train, dtype=torch.bool, device="cpu")
        with _dist.reported(self._comm, "scores"):
            for index, grads in self._train_batches(train_loader)():
                with self._timed("dot"):
                    g = torch.cat([grads[n].reshape(index.numel(), -1).to(self.fdtype) for n in names], dim=1)
                    # scores stay on the CPU (n_train can be large); the product runs where the gradients are
                    sink.add((-(qflat.to(g.device) @ g.T)).cpu(), index)
                    if int(index.max()) >= seen.numel():
                        seen = torch.cat([seen, seen.new_zeros(int(index.max()) + 1 - seen.numel())])
                    seen[index] = True
            if self._comm is None and not bool(seen.all()):
                missing = (~seen).nonzero().squeeze(1)[:5].tolist()
                raise ValueError(f"train_loader: no gradient for training examples {missing}... (indices not covered)")
        if self._comm is not None:
            from ..distributed.share import check_coverage

            check_coverage(self._comm, seen, self.n_train, "scores")

    def _stream(self, qt: dict[str, torch.Tensor], train_loader: Iterable | None, top_k: int | None,
                out: str | Path | None, all_ranks: bool) -> Any:
        """Score every training example against the preconditioned queries ``qt`` into the chosen sinks."""
        Q = next(iter(qt.values())).shape[0]
        sinks = Sinks(Q, self.n_train, self.fdtype, self._comm, top_k=top_k, out=out, sign=SIGN_CONVENTION)
        try:
            self._dot_with_train(qt, train_loader, sinks)
            return sinks.finish(self.n_train, all_ranks)
        except BaseException:
            sinks.abort()  # an earlier store at ``out`` must stay loadable
            raise

    def scores(self, query_loader: Iterable | QueryGradients, train_loader: Iterable | None = None, *,
               top_k: int | None = None, out: str | Path | None = None, all_ranks: bool = False) -> Any:
        """Pairwise influence [n_query, n_train] (see SIGN_CONVENTION), in the factor dtype.

        Query gradients are preconditioned once; training gradients come from the fit cache, or from a
        second pass over ``train_loader`` when given.  Rows follow the query ``index`` when present.

        ``top_k=K``: a :class:`~hyperinf_ext.attributor.topk.TopKScores` instead — per query the K most positive and
        K most negative training examples (ties → smaller index), O(n_query·K) memory.  ``out=PATH``: the
        matrix streams to ``PATH`` (see sinks.py) and comes back memory-mapped (with ``top_k``, the
        file is written and the top-K returned).  Under torch.distributed every rank passes the whole
        query set and its shard of the training set; the result is returned on rank 0 (None elsewhere)
        or, with ``all_ranks``, on every rank.
        """
        self._require_fit()
        queries = self.query_gradients(query_loader)
        qidx, q = queries.index, queries.grads
        if qidx.numel() and int(qidx.max()) >= qidx.numel():
            raise ValueError(
                f"query_loader: index must number the {qidx.numel()} query examples 0..{qidx.numel() - 1} "
                f"(it gives each its row of the scores), got index {int(qidx.max())}"
            )
        if top_k is not None:
            check_k(top_k)  # before any gradient is computed
        if out is not None and self._comm is None:  # ranks check it together when the file is created
            check_out(out)
        if self._comm is not None:
            from ..distributed.share import check_same_queries

            check_same_queries(self._comm, qidx)
        order = qidx.argsort()  # qidx is a permutation of 0..Q-1: put the rows in index order once
        q = {n: g[order.to(g.device)] for n, g in q.items()}
        return self._stream(self._precondition(q, train_loader), train_loader, top_k, out, all_ranks)

    def mean_scores(self, val_loader: Iterable | QueryGradients, train_loader: Iterable | None = None, *,
                    all_ranks: bool = False) -> torch.Tensor | None:
        """Influence on the mean validation loss, [n_train] (see SIGN_CONVENTION).

        The gradient of the mean loss is the mean of per-example gradients; it is preconditioned
        once, so this costs one query regardless of the validation set's size.  Under torch.distributed
        (whole validation set on every rank) the result is on rank 0, or every rank with ``all_ranks``.
        """
        self._require_fit()
        if isinstance(val_loader, QueryGradients):
            q = {n: g.to(self.fdtype).mean(0, keepdim=True) for n, g in val_loader.grads.items()}
        else:
            total: dict[str, torch.Tensor] = {}
            count = 0
            for _, grads in self._grad_batches(val_loader, "validation gradients"):
                for n, g in grads.items():
                    s = g.to(self.fdtype).sum(0, keepdim=True)
                    total[n] = total[n] + s if n in total else s
                count += next(iter(grads.values())).shape[0]
            if count == 0:
                raise ValueError("val_loader: yielded no examples")
            q = {n: t / count for n, t in total.items()}
        s = self._stream(self._precondition(q, train_loader), train_loader, None, None, all_ranks)
        return None if s is None else s[0]

    def score_batches(
        self, query_loader: Iterable | QueryGradients, train_loader: Iterable | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``scores`` streamed by training batch: yields (train index [B] int64, scores [Q, B] in the factor
        dtype), rows in query-index order, so a caller can reduce them (e.g. top-k) in O(Q·B) memory."""
        self._require_fit()
        queries = self.query_gradients(query_loader)
        qidx = queries.index
        if qidx.numel() and (int(qidx.max()) >= qidx.numel()):
            raise ValueError(f"query_loader: index must number the {qidx.numel()} query examples "
                             f"0..{qidx.numel() - 1}, got index {int(qidx.max())}")
        qt = self._precondition(queries.grads, train_loader)
        names = list(qt)
        order = torch.argsort(qidx)  # row r of the output is query r
        qflat = torch.cat([qt[n].reshape(qidx.numel(), -1).to(self.fdtype) for n in names], dim=1)[order]
        for index, grads in self._train_batches(train_loader)():
            with self._timed("dot"):
                g = torch.cat([grads[n].reshape(index.numel(), -1).to(self.fdtype) for n in names], dim=1)
                block = -(qflat @ g.T)
            yield index, block

    def self_scores(self, train_loader: Iterable | None = None, *, chunk_size: int = 256,
                    all_ranks: bool = False) -> torch.Tensor | None:
        """Self-influence ``g_kᵀ·H⁻¹·g_k`` of every training example, [n_train] in the factor dtype.

        Each training gradient is preconditioned by the current method exactly as a query would be
        (``hyperinf``/``exact``/``kronecker`` through their inverses, ``datainf``/``lissa`` streaming
        over the training gradients, ``tracin`` = ‖g_k‖²), ``chunk_size`` examples at a time, and
        dotted with itself.  Large values mark examples the model bends most for — the usual
        mislabeled-data signal without a validation set.  Sign: POSITIVE for a positive-definite
        curvature, i.e. minus the diagonal of ``scores(train as queries)``.

        Gradients come from the fit cache, or from ``train_loader`` (for ``datainf``/``lissa``, whose
        preconditioning re-reads the training gradients, that pass is kept in a temporary disk cache).
        Cost: one preconditioning per chunk — for ``datainf`` a pass over the training gradients, for
        ``lissa`` ``lissa_depth`` mini-batch steps — so a larger ``chunk_size`` (memory: chunk_size
        gradients) means fewer passes.

        Under torch.distributed each rank scores its shard (from its cache or its ``train_loader``
        shard); the ranks check that the shards cover every example once and gather the result on
        rank 0 (None elsewhere) or, with ``all_ranks``, on every rank.
        """
        self._require_fit()
        self._prepare()
        spill = None
        if train_loader is not None and self.method.needs_train_pass:
            # a nested gradient pass inside the outer one would share the model's hooks: spill instead
            spill = GradientCache("disk")
            for index, grads in self._grad_batches(train_loader, "train gradients"):
                spill.append(index, grads)
            source = lambda: iter(spill)  # noqa: E731
        else:
            source = self._train_batches(train_loader)
        out = torch.zeros(self.n_train, dtype=self.fdtype, device="cpu")
        seen = torch.zeros(self.n_train, dtype=torch.bool, device="cpu")
        idx: list[torch.Tensor] = []
        parts: dict[str, list[torch.Tensor]] = {}

        def flush() -> None:
            index = torch.cat(idx)
            q = {n: torch.cat(p) for n, p in parts.items()}
            with self._timed("precondition"):
                qt = self.method.precondition(q, self.factors, lambda: (g for _, g in source()))
            with self._timed("dot"):
                s = sum((qt[n].to(self.fdtype) * q[n].to(self.fdtype)).sum(dim=(-2, -1)) for n in qt)
            if int(index.max()) >= out.numel():
                raise ValueError(f"train_loader: index {int(index.max())} beyond the {out.numel()} fitted examples")
            out[index] = s
            seen[index] = True
            idx.clear()
            parts.clear()

        try:
            with _dist.reported(self._comm, "self_scores"):
                for index, grads in source():
                    idx.append(index)
                    for n, g in grads.items():
                        parts.setdefault(n, []).append(g)
                    if sum(i.numel() for i in idx) >= chunk_size:
                        flush()
                if idx:
                    flush()
        finally:
            if spill is not None:
                spill.close()
        if self._comm is not None:
            from ..distributed.share import check_coverage, gather_columns

            check_coverage(self._comm, seen, self.n_train, "self_scores")
            mine = seen.nonzero().squeeze(1)
            gathered = gather_columns(self._comm, out[mine].unsqueeze(0), mine, self.n_train, all_ranks,
                                      "self_scores: gather")
            return None if gathered is None else gathered[0]
        missing = (~seen).nonzero().squeeze(1)
        if missing.numel():
            raise ValueError(f"train_loader: no gradient for training examples {missing[:5].tolist()} (indices not covered)")
        return out
