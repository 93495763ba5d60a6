"""HyperINF: from a PEFT LoRA model and data loaders to influence scores.

Pipeline: ``fit(train_loader)`` streams the training set once (per-sample LoRA gradients → per-layer
GFIM accumulated with the fused op, gradients optionally cached) → damping and inverse per layer
(batched over layers of equal d) → ``scores`` / ``mean_scores`` precondition the query gradients
once and stream the training gradients (from the cache, or a second pass) through dot products.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

from . import distributed as _dist
from . import ops, persistence, score_store
from .cache import CACHE_MODES, GradientCache
from .capture import ExampleError, PerSampleGradients, default_loss_fn, find_gradient_layers
from .damping import check_rule, layer_damping, resolve
from .methods import CURVATURE_SOLVERS, METHODS, LayerFactor, check_solver, groups_by_dim, make_method
from .topk import check_k

SIGN_CONVENTION = (
    "score[q, k] = −Σ_l ⟨∇_l L_q · H_l⁻¹, ∇_l L_k⟩ ≈ dL_q/dε_k, the change of query q's loss when "
    "training example k is up-weighted: POSITIVE means example k INCREASES the query loss (harmful, "
    "e.g. a mislabeled example); negative means it helps."
)


@dataclass
class HyperINFConfig:
    """Every setting of an attributor; stored with saved factors."""

    method: str = "hyperinf"
    """Influence method: hyperinf | exact | datainf | lissa | tracin | paper | kronecker (see methods.py)."""
    damping: float | str = "auto"
    """Per-layer damping λ_l: a float, or a rule of damping.py ("datainf", "spectral", "paper", or
    "auto" = the method's default: spectral ×3 for hyperinf, chosen by bench/QUALITY.md)."""
    damping_scale: float | None = None
    """The factor of the "datainf"/"spectral"/"paper" rules (None = the rule's default, 0.1, or the
    method default's under "auto")."""
    layers: list[str] | None = None
    """Names (or substrings) of the layers to use; None = every LoRA layer of the active adapter."""
    include_heads: bool = True
    """Also use trainable linear heads kept by PEFT's modules_to_save (e.g. a classifier)."""
    dtype: str = "float64"
    """dtype of the factors (GFIM, inverses) and of the preconditioned gradients."""
    gfim_dtype: str | None = "float32"
    """dtype of each batch's GFIM products and sums, which are then added to the running sum in
    ``dtype``: "float32" (fp32 GEMMs, about twice as fast on CPU; each batch's sum carries a relative
    rounding error of order 1e-7·√(batch·r)), "float64" (exact products of fp32 gradients), or None
    (= ``dtype``). Float64 gradients are always summed in float64."""
    grad_dtype: str | None = None
    """dtype in which per-sample gradients are captured and cached (None = the model's own)."""
    backend: str | None = None
    """Kernel backend for the GFIM and Schulz ops (None = fastest available)."""
    cache: str = "memory"
    """Where training gradients are kept between fit and scoring: memory | disk | none."""
    lissa_depth: int = 100
    """LiSSA: number of mini-batch recursion steps."""
    lissa_scale_factor: float = 1.5
    """LiSSA: safety factor on the spectral bound used as its scale."""
    tol: float | None = None
    """Schulz tolerance on ‖I − A·X‖_F (None = the dtype's default); also the residual test of the other solvers."""
    solver: str = "auto"
    """How hyperinf/kronecker invert G + λI: "auto" (the cost model of solvers/cost.py picks Schulz or
    Cholesky for the device, dtype, d and number of layers), "schulz" or "cholesky". Each inverse is
    verified; ``attr.method.info[layer]`` records the solver and its residual."""

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method: unknown method {self.method!r}; expected one of {sorted(METHODS)}")
        self.damping = check_rule(self.damping)
        check_solver(self.solver, allowed=CURVATURE_SOLVERS)
        if self.cache not in CACHE_MODES:
            raise ValueError(f"cache: unknown mode {self.cache!r}; expected one of {CACHE_MODES}")
        if (self.dtype not in ("float32", "float64") or self.grad_dtype not in (None, "float32", "float64")
                or self.gfim_dtype not in (None, "float32", "float64")):
            raise ValueError("dtype/grad_dtype/gfim_dtype: expected 'float32' or 'float64'")


@dataclass
class QueryGradients:
    """Per-example gradients of a query set: index [Q] int64 and {layer: [Q, r, d]}."""

    index: torch.Tensor
    grads: dict[str, torch.Tensor]


def _torch_dtype(name: str | None) -> torch.dtype | None:
    return {"float32": torch.float32, "float64": torch.float64, None: None}[name]


class HyperINF:
    """Influence of training examples on queries for a PEFT LoRA model.

    >>> attr = HyperINF(model).fit(train_loader)
    >>> s = attr.mean_scores(val_loader)          # [n_train]; positive = raises the mean val loss
    >>> S = attr.scores(query_loader)             # [n_query, n_train]

    Batches are mappings of tensors (input_ids, attention_mask, labels, ...); an ``index`` entry
    ([B] int64), when present, places each example's score at that position, so loaders may sort
    or shuffle.  ``loss_fn(model, batch) -> Tensor[B]`` gives per-example losses (default:
    classification cross-entropy, or the mean token loss for causal LMs).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        loss_fn: Callable[[torch.nn.Module, Mapping[str, Any]], torch.Tensor] | None = None,
        method: str = "hyperinf",
        layers: list[str] | None = None,
        damping: float | str = "auto",
        dtype: torch.dtype | str = torch.float64,
        progress: bool = True,
        config: HyperINFConfig | None = None,
        distributed: "bool | _dist.Comm | None" = None,
        **options: Any,
    ):
        if config is None:
            dtype_name = str(dtype).replace("torch.", "")
            config = HyperINFConfig(method=method, layers=layers, damping=damping, dtype=dtype_name, **options)
        self.config = config
        self.model = model
        self.loss_fn = loss_fn or default_loss_fn
        self.progress = progress
        self.layers = find_gradient_layers(model, include_heads=config.include_heads, layers=config.layers)
        self.factors: dict[str, LayerFactor] = {}
        self.n_train = 0
        self.batches_done = 0
        self.timings: dict[str, float] = {}
        self.cache = GradientCache("none")
        self.method = None
        self._prepared_for: tuple | None = None
        self._fit_error: str | None = None  # why the last fit failed (its factors hold partial data)
        # torch.distributed: None = use an initialised process group of > 1 rank; False = never
        self._comm = _dist.resolve(distributed)

    # ------------------------------------------------------------------------------------ utilities

    @contextlib.contextmanager
    def _timed(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t0

    def _bar(self, iterable: Iterable, desc: str):
        from tqdm.auto import tqdm

        total = len(iterable) if hasattr(iterable, "__len__") else None
        return tqdm(iterable, desc=desc, total=total, disable=not self.progress, leave=False)

    @property
    def fdtype(self) -> torch.dtype:
        return _torch_dtype(self.config.dtype)

    def _grad_batches(
        self, loader: Iterable, desc: str, skip: int = 0, groups: dict[Any, list[str]] | None = None
    ) -> Iterator[tuple[torch.Tensor, dict]]:
        """Per-sample gradients of every batch of ``loader``: (index [B], {layer: [B, r, d]}).

        With ``groups`` ({key: layer names of equal (d, r)}), the gradients of each group are written
        into one fresh [L, B, r, d] tensor, yielded as a third item {key: tensor}; the per-layer
        tensors are its slices.

        Every batch is checked here, once for all methods: a ValueError names an empty batch, a bad
        or repeated ``index`` (over the whole pass), and by index the examples without a loss or
        with a non-finite loss/gradient (which would otherwise turn every score NaN or zero).
        """
        offset = 0
        layer_of = {l.name: l for l in self.layers}
        taken = torch.zeros(0, dtype=torch.bool)  # indices already used in this pass
        with PerSampleGradients(self.model, self.layers, dtype=_torch_dtype(self.config.grad_dtype)) as psg:
            for b, batch in enumerate(self._bar(loader, desc)):
                n = _batch_size(batch)
                if n == 0:
                    raise ValueError(f"{desc}: batch {b} is empty (no examples)")
                index = _batch_index(batch, n, offset, f"{desc}: batch {b}")
                taken = _take(taken, index, f"{desc}: batch {b}")
                offset += n
                if b < skip:
                    continue
                if groups is None:
                    with self._timed("gradients"):
                        grads = _compute(psg, batch, self.loss_fn, index, desc)
                        _check_finite(psg.last_losses, grads.values(), index, desc, stacked=False)
                    yield index, grads  # outside the timer: the consumer's work is not "gradients"
                    continue
                with self._timed("gradients"):
                    stacked, out, mixed = {}, {}, []
                    for key, names in groups.items():
                        ws = [layer_of[name].module.weight for name in names]
                        dtype = _torch_dtype(self.config.grad_dtype) or ws[0].dtype
                        forced = self.config.grad_dtype is not None
                        if any(w.device != ws[0].device or (not forced and w.dtype != ws[0].dtype) for w in ws):
                            mixed.append(key)  # rare: weights of one group in several dtypes/devices
                            continue
                        first = layer_of[names[0]]
                        buf = torch.empty(len(names), n, first.rank, first.dim, dtype=dtype, device=ws[0].device)
                        stacked[key] = buf
                        out.update({name: buf[i] for i, name in enumerate(names)})
                    grads = _compute(psg, batch, self.loss_fn, index, desc, out=out)
                    for key in mixed:
                        stacked[key] = torch.stack([grads[name].to(grads[groups[key][0]]) for name in groups[key]])
                    _check_finite(psg.last_losses, stacked.values(), index, desc, stacked=True)
                yield index, grads, stacked

    def _train_batches(self, train_loader: Iterable | None) -> Callable[[], Iterator[tuple[torch.Tensor, dict]]]:
        """A re-iterable source of training gradients: the fit cache, or passes over ``train_loader``."""
        if train_loader is not None:
            return lambda: self._grad_batches(train_loader, "train gradients")
        if not self.cache.enabled or self.cache.count != self.batches_done or self.batches_done == 0:
            raise ValueError(
                "train_loader: required — the training gradients were not cached during fit "
                "(cache='none', or fit was not run / was resumed without its cache)"
            )
        return lambda: iter(self.cache)

    # ------------------------------------------------------------------------------------------ fit

    def fit(
        self,
        train_loader: Iterable,
        *,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int = 50,
    ) -> "HyperINF":
        """Stream ``train_loader`` once: accumulate each layer's GFIM (and cache gradients).

        With ``checkpoint_dir`` the state is committed atomically every ``checkpoint_every`` batches
        and at the end, and a later ``fit`` with the same directory resumes after the last commit (the
        loader must yield the same batches in the same order); the gradient cache then lives in that
        directory.  The directory is locked while a fit uses it (``CheckpointBusyError`` for a second
        fit); resuming checks the model's parameters, the fit settings and a fingerprint of the batches
        already consumed, and raises ``ValueError`` when any differs (a finished checkpoint also refuses
        a longer loader).  If ``fit`` raises, ``scores``/``mean_scores``/``save``/``use`` raise
        "fit did not complete" until a fit completes (with ``checkpoint_dir``, by resuming).
        """
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
            raise ValueError(f"checkpoint_every: expected a number of batches ≥ 0 (0 = only at the end), "
                             f"got {checkpoint_every!r}")
        self.timings = {}
        comm = self._comm
        if comm is not None:  # consistency checks first; every batch then needs its global index
            train_loader, checkpoint_dir = _dist.begin_fit(comm, self, train_loader, checkpoint_dir)
        ckpt = persistence.Checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
        # Until the pass completes the factors hold part of the data: scoring or saving them must fail.
        self._fit_error = "fit is still running"
        try:
            with ckpt if ckpt is not None else contextlib.nullcontext(), _dist.reported(comm, "fit"):
                self._accumulate(train_loader, ckpt, checkpoint_every)
            if comm is not None:
                from .dist_share import reduce_factors

                reduce_factors(comm, self)  # every rank then holds the sums over all shards
        except BaseException as e:
            resume = (f"; fit again with checkpoint_dir={str(ckpt.directory)!r} to resume from its last checkpoint"
                      if ckpt is not None and ckpt.exists and not isinstance(e, persistence.CheckpointBusyError)
                      else "")
            self._fit_error = f"{type(e).__name__}: {e}{resume}"
            raise
        self._fit_error = None
        self._prepared_for = None
        with self._timed("prepare"):
            self._prepare()
        return self

    def _accumulate(self, train_loader: Iterable, ckpt: "persistence.Checkpoint | None", checkpoint_every: int) -> None:
        """The streaming pass of ``fit``: per-layer GFIM sums, counts and the gradient cache."""
        fdtype = self.fdtype
        fingerprint = persistence.DataFingerprint()
        if ckpt is not None and ckpt.exists:
            ckpt.restore(self)  # factors and counts of the last commit, checked against model and settings
        else:
            self.factors = {
                l.name: LayerFactor(l.name, l.rank, l.dim, torch.zeros(l.dim, l.dim, dtype=fdtype), 0,
                                    rank_sum=torch.zeros(l.rank, l.rank, dtype=fdtype))
                for l in self.layers
            }
            self.n_train, self.batches_done = 0, 0
        # The sums live where the gradients are (a CUDA model accumulates on its GPU); factors
        # restored from a checkpoint come back on the CPU.
        device = self.layers[0].module.weight.device if self.layers else torch.device("cpu")
        skip = self.batches_done
        loader = ckpt.watch(train_loader, fingerprint) if ckpt is not None else train_loader
        mode = self.config.cache
        if ckpt is not None and mode != "none":
            mode = "disk"
        self.cache.close()
        self.cache = GradientCache("none")  # stays if the next line raises (e.g. a corrupt cache manifest)
        self.cache = GradientCache(mode, (ckpt.directory / "grads") if (ckpt is not None and mode == "disk") else None)
        if self.cache.count < self.batches_done:
            # the checkpoint's cached gradients are gone: cache nothing rather than a misnumbered tail
            self.cache = GradientCache("none")
        self.cache.truncate(self.batches_done)
        # Layers of equal (d, r) share one batched GFIM call on their stacked gradients.
        groups: dict[tuple[int, int], list[str]] = {}
        for n, f in self.factors.items():
            groups.setdefault((f.dim, f.rank), []).append(n)
        accs = {k: torch.stack([self.factors[n].gfim_sum for n in names]).to(device) for k, names in groups.items()}
        rank_accs = {
            k: torch.stack([self.factors[n].rank_sum if self.factors[n].rank_sum is not None
                            else torch.zeros(k[1], k[1], dtype=fdtype) for n in names]).to(device)
            for k, names in groups.items()
        }
        scratch: dict[tuple[int, int], torch.Tensor] = {}
        for index, grads, stacked_groups in self._grad_batches(loader, "fit", skip=skip, groups=groups):
            with self._timed("gfim"):
                for key, names in groups.items():
                    stacked = stacked_groups[key]  # [L, B, r, d], contiguous; grads[n] are its slices
                    work = self._batch_gfim_dtype(stacked.dtype)
                    if work == fdtype:
                        ops.gfim_accumulate_(accs[key], stacked, backend=self.config.backend)
                    else:
                        # this batch's sums in the gradients' precision, the running sum in fdtype
                        buf = scratch.get(key)
                        if buf is None or buf.dtype != work:
                            buf = scratch[key] = torch.empty(accs[key].shape, dtype=work, device=accs[key].device)
                        buf.zero_()
                        ops.gfim_accumulate_(buf, stacked, backend=self.config.backend)
                        accs[key] += buf
                    # r×r side factor Σ_i g_i·g_iᵀ: one batched GEMM, n·r²·d flops (small next to the d×d one)
                    L, B, r, d = stacked.shape
                    flat = stacked.reshape(L * B, r, d)
                    if flat.dtype not in (torch.float32, torch.float64):
                        flat = flat.float()
                    outer = torch.bmm(flat, flat.transpose(1, 2)).view(L, B, r, r).sum(1).to(fdtype)
                    # BLAS does not promise a bit-symmetric X·Xᵀ; the Schulz op refuses asymmetric input
                    rank_accs[key] += 0.5 * (outer + outer.transpose(-1, -2))
            with self._timed("cache"):
                self.cache.append(index, grads)
            self.n_train = max(self.n_train, int(index.max()) + 1)
            self.batches_done += 1
            for f in self.factors.values():
                f.count += index.numel()
            if ckpt is not None and checkpoint_every and self.batches_done % checkpoint_every == 0:
                self._sync_factors(accs, rank_accs, groups)
                ckpt.commit(self, fingerprint, complete=False)
        if self.batches_done == 0:
            raise ValueError("train_loader: yielded no batches")
        self._sync_factors(accs, rank_accs, groups)
        if ckpt is not None:
            ckpt.commit(self, fingerprint, complete=True)

    def _sync_factors(self, accs: dict, rank_accs: dict, groups: dict[tuple[int, int], list[str]]) -> None:
        for key, names in groups.items():
            for i, n in enumerate(names):
                self.factors[n].gfim_sum = accs[key][i].clone()
                self.factors[n].rank_sum = rank_accs[key][i].clone()

    def _batch_gfim_dtype(self, grad_dtype: torch.dtype) -> torch.dtype:
        """dtype of one batch's GFIM sums before they join the running sum in ``fdtype``."""
        if grad_dtype == torch.float64:
            return torch.float64  # exact as they come
        if self.fdtype == torch.float32:
            return torch.float32  # nothing finer to add into
        return _torch_dtype(self.config.gfim_dtype) or self.fdtype

    def _prepare(self) -> None:
        """Damping per layer and the method's per-layer work (e.g. the batched Schulz inverse)."""
        key = self._prepare_key()
        if self._prepared_for == key and self.method is not None:
            return
        cfg = self.config
        rule, scale = resolve(cfg.method, cfg.damping, cfg.damping_scale)
        for f in self.factors.values():
            f.damping = layer_damping(rule, f.gfim, f.rank, scale)
            if f.damping == 0.0 and not bool(f.gfim_sum.any()):
                # every gradient of this layer is zero (e.g. lora_A while lora_B is still 0): it adds
                # nothing to any score, and any positive λ keeps its (zero) solve well posed
                f.damping = 1.0
        self.method = make_method(
            cfg.method, backend=cfg.backend, tol=cfg.tol, depth=cfg.lissa_depth, scale_factor=cfg.lissa_scale_factor,
            solver=cfg.solver,
        )
        if self._comm is not None:
            from .dist_share import prepare_shared

            prepare_shared(self._comm, self.method, self.factors)  # each layer's inverse on one rank
        else:
            self.method.prepare(self.factors)
        self._prepared_for = key

    def _prepare_key(self) -> tuple:
        """What the prepared method depends on; equal keys mean ``_prepare`` has nothing to redo."""
        return (self.config.method, self.config.damping, self.config.damping_scale, self.batches_done)

    def use(self, method: str | None = None, *, damping: float | str | None = None, **options: Any) -> "HyperINF":
        """Switch method and/or damping on the same fitted factors and cached gradients (no refit).

        A new ``damping`` without ``damping_scale`` takes the rule's default scale.
        """
        if self._fit_error is not None:
            raise RuntimeError(f"fit did not complete: {self._fit_error}")
        changes = {k: v for k, v in dict(method=method, damping=damping, **options).items() if v is not None}
        if damping is not None and "damping_scale" not in options:
            changes["damping_scale"] = None
        self.config = dataclasses.replace(self.config, **changes)
        self._prepared_for = None
        with self._timed("prepare"):
            self._prepare()
        return self

    # ------------------------------------------------------------------------------------- scoring

    def _require_fit(self) -> None:
        if self._fit_error is not None:
            raise RuntimeError(f"fit did not complete: {self._fit_error}")
        if not self.factors or self.batches_done == 0:
            raise RuntimeError("HyperINF: call fit(train_loader) (or HyperINF.load) before scoring")

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
        seen = torch.zeros(self.n_train, dtype=torch.bool)
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
            from .dist_share import check_coverage

            check_coverage(self._comm, seen, self.n_train, "scores")

    def _stream(self, qt: dict[str, torch.Tensor], train_loader: Iterable | None, top_k: int | None,
                out: str | Path | None, all_ranks: bool) -> Any:
        """Score every training example against the preconditioned queries ``qt`` into the chosen sinks."""
        Q = next(iter(qt.values())).shape[0]
        sinks = score_store.Sinks(Q, self.n_train, self.fdtype, self._comm, top_k=top_k, out=out, sign=SIGN_CONVENTION)
        self._dot_with_train(qt, train_loader, sinks)
        return sinks.finish(self.n_train, all_ranks)

    def scores(self, query_loader: Iterable | QueryGradients, train_loader: Iterable | None = None, *,
               top_k: int | None = None, out: str | Path | None = None, all_ranks: bool = False) -> Any:
        """Pairwise influence [n_query, n_train] (see SIGN_CONVENTION), in the factor dtype.

        Query gradients are preconditioned once; training gradients come from the fit cache, or from a
        second pass over ``train_loader`` when given.  Rows follow the query ``index`` when present.

        ``top_k=K``: a :class:`~hyperinf_ext.topk.TopKScores` instead — per query the K most positive and
        K most negative training examples (ties → smaller index), O(n_query·K) memory.  ``out=PATH``: the
        matrix streams to ``PATH`` (see score_store.py) and comes back memory-mapped (with ``top_k``, the
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
        if self._comm is not None:
            from .dist_share import check_same_queries

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

    def self_scores(self, train_loader: Iterable | None = None, *, chunk_size: int = 256) -> torch.Tensor:
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
        out = torch.zeros(self.n_train, dtype=self.fdtype)
        seen = torch.zeros(self.n_train, dtype=torch.bool)
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
        missing = (~seen).nonzero().squeeze(1)
        if missing.numel():
            raise ValueError(f"train_loader: no gradient for training examples {missing[:5].tolist()} (indices not covered)")
        return out

    # --------------------------------------------------------------------------------- persistence
    # (the formats, checks and atomic commits live in persistence.py)

    def save(self, directory: str | Path) -> Path:
        """Write factors (safetensors: per-layer GFIM sums and the method's inverses) and meta.json.

        Under torch.distributed rank 0 writes and every rank returns once the files are committed."""
        if self._comm is not None:
            _dist.on_rank0(self._comm, "save", lambda: persistence.save(self, directory))
            return Path(directory)
        return persistence.save(self, directory)

    @classmethod
    def load(cls, directory: str | Path, model: torch.nn.Module, *, loss_fn=None, progress: bool = True) -> "HyperINF":
        """Rebuild an attributor from ``save``; scoring then needs ``train_loader`` (no cache is stored).

        Raises ``ValueError`` naming the file when it is missing, corrupt or holds NaN/Inf, and naming
        the layer when a saved shape differs from ``model``'s (another LoRA rank or hidden size).
        """
        return persistence.load(cls, directory, model, loss_fn=loss_fn, progress=progress)

    @staticmethod
    def save_scores(path: str | Path, scores: torch.Tensor, **metadata: str) -> None:
        """Write a score tensor to a safetensors file (metadata: string key/values)."""
        persistence.save_scores(path, scores, SIGN_CONVENTION, **metadata)

    @staticmethod
    def load_scores(path: str | Path) -> torch.Tensor:
        """The score tensor written by ``save_scores``, or the matrix of ``scores(out=PATH)`` memory-mapped."""
        if score_store.is_store(path):
            return score_store.load(path)
        return persistence.load_scores(path)


def _batch_size(batch: Mapping[str, Any]) -> int:
    for k in ("input_ids", "labels", "inputs_embeds"):
        if k in batch and isinstance(batch[k], torch.Tensor):
            return batch[k].shape[0]
    for v in batch.values():
        if isinstance(v, torch.Tensor):
            return v.shape[0]
    raise ValueError("batch: no tensor to take the batch size from")


def _batch_index(batch: Mapping[str, Any], n: int, offset: int, where: str) -> torch.Tensor:
    """The batch's ``index`` entry, checked ([n] non-negative integers), or positions from ``offset``."""
    if "index" not in batch:
        return torch.arange(offset, offset + n)
    index = batch["index"]
    if not isinstance(index, torch.Tensor):
        raise ValueError(f"{where}: index must be a tensor of int64, got {type(index).__name__}")
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise ValueError(f"{where}: index must be an integer tensor, got {index.dtype}")
    if index.dim() != 1 or index.numel() != n:
        raise ValueError(f"{where}: index must have shape [{n}] (one entry per example), got {tuple(index.shape)}")
    index = index.long().cpu()
    if bool((index < 0).any()):
        raise ValueError(f"{where}: index must be non-negative, got {index[index < 0][:5].tolist()}")
    return index


def _take(taken: torch.Tensor, index: torch.Tensor, where: str) -> torch.Tensor:
    """Mark ``index`` as used in this pass; a repeated index would merge two examples into one score."""
    top = int(index.max()) + 1
    if top > taken.numel():
        taken = torch.cat([taken, taken.new_zeros(max(top, 2 * taken.numel()) - taken.numel())])
    sorted_index = index.sort().values
    repeated = sorted_index[1:][sorted_index[1:] == sorted_index[:-1]]
    if repeated.numel():
        raise ValueError(f"{where}: index repeats {repeated.unique()[:5].tolist()} within the batch "
                         "(every example needs its own index)")
    again = index[taken[index]]
    if again.numel():
        raise ValueError(f"{where}: index {again[:5].tolist()} already used by an earlier batch of this pass "
                         "(every example needs its own index)")
    taken[index] = True
    return taken


def _compute(psg: PerSampleGradients, batch: Mapping[str, Any], loss_fn, index: torch.Tensor, desc: str,
             out: dict | None = None) -> dict[str, torch.Tensor]:
    """``psg.compute``, with a per-example problem of the loss reported by example index."""
    try:
        return psg.compute(batch, loss_fn, out=out)
    except ExampleError as exc:
        raise ValueError(f"{desc}: examples {index[exc.rows].tolist()[:10]} (index): {exc.problem}") from None


def _check_finite(losses: torch.Tensor, grads: Iterable[torch.Tensor], index: torch.Tensor, desc: str,
                  *, stacked: bool) -> None:
    """Raise naming the examples whose loss or gradient is NaN/Inf (they would poison every score)."""
    bad = ~torch.isfinite(losses).cpu()
    for g in grads:
        # a sum is non-finite when any term is: one reduction instead of an isfinite mask per element
        acc = torch.float64 if g.dtype == torch.float64 else torch.float32  # fp16 sums could overflow
        per_example = g.sum(dim=(-2, -1), dtype=acc)  # [L, B] or [B]
        if stacked:
            per_example = per_example.sum(0)
        bad |= ~torch.isfinite(per_example).cpu()
    if bool(bad.any()):
        raise ValueError(f"{desc}: examples {index[bad].tolist()[:10]} (index) have a non-finite (NaN/Inf) loss "
                         "or gradient; check their inputs and labels, or the model")
