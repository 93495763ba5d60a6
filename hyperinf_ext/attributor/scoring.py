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
from .config import SIGN_CONVENTION, QueryGradients, method_of
from .topk import check_k
from ..curvature import mixing, normalize as unit
from ..curvature.damping import damp_layers
from ..curvature.methods import METHODS, resolve


class ScoreOptions:
    """``mix_queries`` and ``normalize``: checked before any gradient is computed, then the curvature that
    preconditions (fitted, or mixed with the queries' GFIM: cached) and the normalisations of both sides."""

    def _score_options(self, mix_queries: object, normalize: object) -> tuple[float, str | None]:
        weight, mode = mixing.check_weight(mix_queries), unit.check_mode(normalize)
        cls = METHODS[self.config.method]
        if weight:
            mixing.check_method(cls)
        if mode == "symmetric" and cls.needs_train_pass:
            raise ValueError(f"{unit.OPTION}: 'symmetric' needs every training gradient preconditioned, which method "
                             f"{cls.name!r} does only by a pass over the training data; use 'unit' or 'query'")
        return weight, mode

    def _self_options(self, normalize: object) -> str | None:
        mode = unit.check_mode(normalize)
        if mode == "symmetric":
            raise ValueError(f"{unit.OPTION}: 'symmetric' self-influence is 1 for every example; use 'unit' or 'query'")
        if mode is not None and METHODS[self.config.method].damping_default is None:
            # no curvature (H = I): ‖g‖²/‖g‖² and cos(g, g) are 1 for every example
            raise ValueError(f"{unit.OPTION}: normalised self-influence of method {self.config.method!r} (no "
                             "curvature) is 1 for every example; leave normalize out")
        return mode

    def _moments(self, weight: float, grads: dict | None) -> "mixing.QueryMoments | None":
        """The query set's second moments when mixing (from ``grads``, or empty to be filled batch by batch)."""
        if not weight:
            return None
        moments = mixing.QueryMoments(self.fdtype)
        return moments if grads is None else moments.add(grads)

    def _curvature(self, weight: float, moments: "mixing.QueryMoments | None") -> tuple[Any, dict]:
        """(method, factors) that precondition: the fitted ones, or those of G + w·Q (cached per query set:
        the same w, settings and query GFIM reuse the mixed inverse)."""
        self._prepare()
        if not weight:
            return self.method, self.factors
        key = (self._prepare_key(), weight)
        cached = getattr(self, "_mixed", None)
        hit = cached is not None and cached[0] == key and moments.same_as(cached[1])
        if self._comm is not None:  # every rank holds all queries; agree, so that all prepare together
            hit = all(self._comm.all_gather_object(hit, "mix_queries: cache"))
        if hit:
            return cached[2], cached[3]
        cfg = self.config
        factors = mixing.mixed_factors(self.factors, moments, weight)
        damp_layers(factors, *resolve(cfg.method, cfg.damping, cfg.damping_scale))  # the rule sees G_mix
        method = method_of(cfg)
        with self._timed("prepare"):
            if self._comm is not None:
                from ..distributed.share import prepare_shared

                prepare_shared(self._comm, method, factors)  # one owner per layer: identical on every rank
            else:
                method.prepare(factors)
        self._mixed = (key, moments, method, factors)
        return method, factors

    def _prepared(self, q: dict, train_loader: Iterable | None, weight: float, mode: str | None,
                  moments: "mixing.QueryMoments | None") -> tuple[dict[str, torch.Tensor], Any]:
        """The preconditioned (and, with ``mode``, normalised) queries, and the training side's scale."""
        method, factors = self._curvature(weight, moments)
        qt = self._precondition(q, train_loader, method, factors)
        bad = next((n for n, t in qt.items() if not bool(torch.isfinite(t).all())), None)
        if bad is not None:
            # a diverged inverse (the paper's fixed schedule, say) would rank NaN first: never a silent number
            raise ValueError(f"method {self.config.method!r}: the preconditioned queries of layer {bad} are not "
                             "finite (the inverse curvature diverged or overflowed); use another method or damping")
        if mode is None:
            return qt, None
        dt = self.fdtype
        norms = {"unit": lambda: unit.joint_norms(q, dt), "query": lambda: unit.joint_norms(qt, dt),
                 "symmetric": lambda: unit.dual_norms(qt, q, dt)}[mode]()
        qt = unit.scale_rows(qt, unit.reciprocal(norms))
        if mode != "symmetric":
            return qt, lambda g: unit.reciprocal(unit.joint_norms(g, dt))
        none = lambda: iter(())  # noqa: E731  (checked above: the method needs no training pass)
        return qt, lambda g: unit.reciprocal(unit.dual_norms(method.precondition(g, factors, none), g, dt))

    def _self_scale(self, mode: str, g: dict, gt: dict) -> torch.Tensor:
        """The factor of ⟨g·H⁻¹, g⟩ under ``normalize``: 1/‖g‖² ("unit") or 1/(‖g·H⁻¹‖·‖g‖) ("query")."""
        inv = unit.reciprocal(unit.joint_norms(g, self.fdtype))
        return inv * (inv if mode == "unit" else unit.reciprocal(unit.joint_norms(gt, self.fdtype)))


class Scoring(ScoreOptions):
    """The scoring methods of the attributor (they need ``fit`` or ``load`` first: ``_require_fit``).

    ``mix_queries=w`` (``scores``, ``mean_scores``, ``score_batches``, ``precondition``) preconditions with
    G + w·(query set's GFIM) and ``normalize`` (those and ``self_scores``) unit-normalises the gradients:
    ``ScoreOptions`` above, curvature/mixing.py, curvature/normalize.py and docs/methods-and-damping.md."""

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

    def precondition(self, queries: Iterable | QueryGradients, *, mix_queries: float = 0.0,
                     mix_with: Iterable | QueryGradients | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The query gradients times the method's inverse curvature, per layer: (index [Q] int64 sorted,
        {layer: [Q, r, d]} in the factor dtype, rows in that index order).

        ``−Σ_l ⟨q̃_l, g_k,l⟩`` with these is ``scores``' entry for training example k.  Methods that need a
        pass over the training data to precondition (``needs_train_pass``) are refused: call ``scores``.
        ``mix_queries=w`` mixes the GFIM of ``mix_with`` (default: ``queries`` themselves) into the curvature,
        as ``scores`` does; ``mix_with`` lets a part of a query set (its mean gradient, the rows kept for
        per-token shares) be preconditioned with the whole set's mixed curvature.
        """
        self._require_fit()
        self._prepare()
        if self.method.needs_train_pass:
            raise ValueError(f"method {self.config.method!r}: preconditioning needs a pass over the training "
                             "data; precondition() takes only methods that do not (use scores())")
        weight, _ = self._score_options(mix_queries, False)
        q = self.query_gradients(queries)
        order = q.index.argsort()
        grads = {n: g[order.to(g.device)] for n, g in q.grads.items()}
        mixed = grads if mix_with is None or not weight else self.query_gradients(mix_with, "mixed query gradients").grads
        qt, _ = self._prepared(grads, None, weight, None, self._moments(weight, mixed))
        return q.index[order], qt

    def _precondition(self, q: dict[str, torch.Tensor], train_loader: Iterable | None, method: Any = None,
                      factors: dict | None = None) -> dict[str, torch.Tensor]:
        """``q`` times the inverse curvature of ``method``/``factors`` (default: the fitted ones)."""
        self._prepare()
        method, factors = method or self.method, factors or self.factors
        source = self._train_batches(train_loader) if method.needs_train_pass else (lambda: iter(()))
        with self._timed("precondition"):
            return method.precondition(q, factors, lambda: (g for _, g in source()))

    def _dot_with_train(self, qt: dict[str, torch.Tensor], train_loader: Iterable | None, sink: Any,
                        train_scale: Any = None) -> None:
        """−Σ_l ⟨q̃_l, g_k,l⟩ for every query row and training example, fed to ``sink`` block by block
        (column k times ``train_scale(grads)[k]`` when given: the normalisation of the training side)."""
        names = list(qt)
        Q = next(iter(qt.values())).shape[0]
        qflat = torch.cat([qt[n].reshape(Q, -1).to(self.fdtype) for n in names], dim=1)  # [Q, P]
        seen = torch.zeros(self.n_train, dtype=torch.bool, device="cpu")
        with _dist.reported(self._comm, "scores"):
            for index, grads in self._train_batches(train_loader)():
                with self._timed("dot"):
                    g = torch.cat([grads[n].reshape(index.numel(), -1).to(self.fdtype) for n in names], dim=1)
                    # scores stay on the CPU (n_train can be large); the product runs where the gradients are
                    block = -(qflat.to(g.device) @ g.T)
                    if train_scale is not None:
                        block = block * train_scale(grads).to(block)
                    sink.add(block.cpu(), index)
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
                out: str | Path | None, all_ranks: bool, train_scale: Any = None) -> Any:
        """Score every training example against the preconditioned queries ``qt`` into the chosen sinks."""
        Q = next(iter(qt.values())).shape[0]
        sinks = Sinks(Q, self.n_train, self.fdtype, self._comm, top_k=top_k, out=out, sign=SIGN_CONVENTION)
        try:
            self._dot_with_train(qt, train_loader, sinks, train_scale)
            return sinks.finish(self.n_train, all_ranks)
        except BaseException:
            sinks.abort()  # an earlier store at ``out`` must stay loadable
            raise

    def scores(self, query_loader: Iterable | QueryGradients, train_loader: Iterable | None = None, *,
               top_k: int | None = None, out: str | Path | None = None, all_ranks: bool = False,
               mix_queries: float = 0.0, normalize: bool | str = False) -> Any:
        """Pairwise influence [n_query, n_train] (see SIGN_CONVENTION), in the factor dtype.

        Query gradients are preconditioned once; training gradients come from the fit cache, or from a
        second pass over ``train_loader`` when given.  Rows follow the query ``index`` when present.

        ``top_k=K``: a :class:`~hyperinf_ext.attributor.topk.TopKScores` instead — per query the K most positive and
        K most negative training examples (ties → smaller index), O(n_query·K) memory.  ``out=PATH``: the
        matrix streams to ``PATH`` (see sinks.py) and comes back memory-mapped (with ``top_k``, the
        file is written and the top-K returned).  Under torch.distributed every rank passes the whole
        query set and its shard of the training set; the result is returned on rank 0 (None elsewhere)
        or, with ``all_ranks``, on every rank.

        ``mix_queries=w`` (w ≥ 0): precondition with G + w·(1/m)·Σ_j q_jᵀq_j, the GFIM of these m queries
        mixed in, damped by the rule on the mixed matrix (one inverse per layer per query set, cached while
        the queries' GFIM, w and the settings stay the same).  ``normalize``: True/"unit", "query" or
        "symmetric" unit-normalised gradients (cosine influence; curvature/normalize.py).
        """
        self._require_fit()
        weight, mode = self._score_options(mix_queries, normalize)
        if top_k is not None:
            check_k(top_k)  # before any gradient is computed
        if out is not None and self._comm is None:  # ranks check it together when the file is created
            check_out(out)
        queries = self.query_gradients(query_loader)
        qidx, q = queries.index, queries.grads
        if qidx.numel() and int(qidx.max()) >= qidx.numel():
            raise ValueError(
                f"query_loader: index must number the {qidx.numel()} query examples 0..{qidx.numel() - 1} "
                f"(it gives each its row of the scores), got index {int(qidx.max())}"
            )
        if self._comm is not None:
            from ..distributed.share import check_same_queries

            check_same_queries(self._comm, qidx)
        order = qidx.argsort()  # qidx is a permutation of 0..Q-1: put the rows in index order once
        q = {n: g[order.to(g.device)] for n, g in q.items()}
        qt, train_scale = self._prepared(q, train_loader, weight, mode, self._moments(weight, q))
        return self._stream(qt, train_loader, top_k, out, all_ranks, train_scale)

    def mean_scores(self, val_loader: Iterable | QueryGradients, train_loader: Iterable | None = None, *,
                    all_ranks: bool = False, mix_queries: float = 0.0,
                    normalize: bool | str = False) -> torch.Tensor | None:
        """Influence on the mean validation loss, [n_train] (see SIGN_CONVENTION).

        The gradient of the mean loss is the mean of per-example gradients; it is preconditioned
        once, so this costs one query regardless of the validation set's size.  Under torch.distributed
        (whole validation set on every rank) the result is on rank 0, or every rank with ``all_ranks``.

        ``mix_queries``/``normalize`` as in ``scores``; the result is then ``scores(...).mean(0)`` with the
        same options.  ``normalize`` needs each validation example's own gradient: they are all held in
        memory (m × the LoRA parameters, in the gradients' dtype) instead of summed.
        """
        self._require_fit()
        weight, mode = self._score_options(mix_queries, normalize)
        if mode is not None:
            grads = self.query_gradients(val_loader, "validation gradients").grads
            qt, train_scale = self._prepared(grads, train_loader, weight, mode, self._moments(weight, grads))
            qt = {n: t.mean(0, keepdim=True) for n, t in qt.items()}
            s = self._stream(qt, train_loader, None, None, all_ranks, train_scale)
            return None if s is None else s[0]
        moments = self._moments(weight, None)
        if isinstance(val_loader, QueryGradients):
            q = {n: g.to(self.fdtype).mean(0, keepdim=True) for n, g in val_loader.grads.items()}
            if moments is not None:
                moments.add(val_loader.grads)
        else:
            total: dict[str, torch.Tensor] = {}
            count = 0
            for _, grads in self._grad_batches(val_loader, "validation gradients"):
                for n, g in grads.items():
                    s = g.to(self.fdtype).sum(0, keepdim=True)
                    total[n] = total[n] + s if n in total else s
                count += next(iter(grads.values())).shape[0]
                if moments is not None:
                    moments.add(grads)
            if count == 0:
                raise ValueError("val_loader: yielded no examples")
            q = {n: t / count for n, t in total.items()}
        qt, _ = self._prepared(q, train_loader, weight, None, moments)
        s = self._stream(qt, train_loader, None, None, all_ranks)
        return None if s is None else s[0]

    def score_batches(self, query_loader: Iterable | QueryGradients, train_loader: Iterable | None = None, *,
                      mix_queries: float = 0.0, normalize: bool | str = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``scores`` streamed by training batch: yields (train index [B] int64, scores [Q, B] in the factor
        dtype), rows in query-index order, so a caller can reduce them (e.g. top-k) in O(Q·B) memory.
        ``mix_queries``/``normalize`` as in ``scores``, checked at the call (the gradients at the first next)."""
        self._require_fit()
        return self._score_stream(query_loader, train_loader, *self._score_options(mix_queries, normalize))

    def _score_stream(self, query_loader, train_loader, weight: float, mode: str | None) -> Iterator:
        queries = self.query_gradients(query_loader)
        qidx = queries.index
        if qidx.numel() and (int(qidx.max()) >= qidx.numel()):
            raise ValueError(f"query_loader: index must number the {qidx.numel()} query examples "
                             f"0..{qidx.numel() - 1}, got index {int(qidx.max())}")
        order = torch.argsort(qidx)  # row r of the output is query r
        q = {n: g[order.to(g.device)] for n, g in queries.grads.items()}
        qt, train_scale = self._prepared(q, train_loader, weight, mode, self._moments(weight, q))
        names = list(qt)
        qflat = torch.cat([qt[n].reshape(qidx.numel(), -1).to(self.fdtype) for n in names], dim=1)
        for index, grads in self._train_batches(train_loader)():
            with self._timed("dot"):
                g = torch.cat([grads[n].reshape(index.numel(), -1).to(self.fdtype) for n in names], dim=1)
                block = -(qflat.to(g.device) @ g.T)
                if train_scale is not None:
                    block = block * train_scale(grads).to(block)
            yield index, block

    def self_scores(self, train_loader: Iterable | None = None, *, chunk_size: int = 256,
                    all_ranks: bool = False, normalize: bool | str = False) -> torch.Tensor | None:
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

        ``normalize``: True/"unit" gives ``g_kᵀH⁻¹g_k/‖g_k‖²`` (the curvature's Rayleigh quotient: where the
        gradient points, not how large it is), "query" the cosine of g_k·H⁻¹ and g_k; "symmetric" is refused
        (it is 1 for every example).  There is no query set, so no ``mix_queries``.
        """
        self._require_fit()
        mode = self._self_options(normalize)
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
                if mode is not None:
                    s = s * self._self_scale(mode, q, qt).to(s)
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
