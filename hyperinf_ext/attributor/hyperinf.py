"""HyperINF: from a PEFT LoRA model and data loaders to influence scores.

Pipeline: ``fit(train_loader)`` streams the training set once (per-sample LoRA gradients → per-layer
GFIM accumulated with the fused op, gradients optionally cached) → damping and inverse per layer
(batched over layers of equal d) → ``scores`` / ``mean_scores`` precondition the query gradients
once and stream the training gradients (from the cache, or a second pass) through dot products.

This module is the façade: configuration lives in config.py, the fitting pass in fitting.py, scoring
in scoring.py and the file formats in persistence/.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import torch

from .. import distributed as _dist
from .. import persistence
from . import sinks
from .cache import GradientCache, GradientSink
from ..capture import default_loss_fn, find_gradient_layers
from .config import (FIXED_BY_FIT, SIGN_CONVENTION, HyperINFConfig, QueryGradients, check_method_options,
                     config_defaults, method_of, torch_dtype)
from ..curvature.damping import damp_layers
from .fitting import FitPass
from ..curvature.methods import LayerFactor, resolve
from .scoring import Scoring
from .stored import StoredStateIO
from .tokens import TokenScoring

if TYPE_CHECKING:
    from .plan import Plan

__all__ = ["SIGN_CONVENTION", "HyperINF", "HyperINFConfig", "QueryGradients"]

_KEEP = object()  # use(damping=...) not given: keep the current damping (None restores the default)


class HyperINF(FitPass, Scoring, TokenScoring, StoredStateIO):
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
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module (a PEFT LoRA model), got {type(model).__name__}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable loss_fn(model, batch) -> Tensor[B], got "
                            f"{type(loss_fn).__name__}")
        if config is None:
            unknown = sorted(set(options) - set(config_defaults()))
            if unknown:
                raise ValueError(f"{unknown[0]}: unknown HyperINF setting; expected one of {sorted(config_defaults())}")
            dtype_name = str(dtype).replace("torch.", "")
            config = HyperINFConfig(method=method, layers=layers, damping=damping, dtype=dtype_name, **options)
        elif not isinstance(config, HyperINFConfig):
            raise TypeError(f"config: expected a HyperINFConfig, got {type(config).__name__}")
        check_method_options(config)  # before the model's layers are hooked or any data is read
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
        self._mixed: tuple | None = None  # scoring's cache of the curvature mixed with a query set's GFIM
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
        return torch_dtype(self.config.dtype)

    # ------------------------------------------------------------------------------------------ fit

    def fit(
        self,
        train_loader: Iterable,
        *,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int = 50,
        gradient_sink: "GradientSink | None" = None,
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

        ``gradient_sink`` (a :class:`~hyperinf_ext.attributor.cache.GradientSink`) also receives every
        batch's gradients, e.g. the writer of a gradient index: it is told the batches a resumed fit
        keeps (``truncate``) and flushed before every checkpoint commit, so what it committed always
        covers the checkpoint's batches.
        """
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
            raise ValueError(f"checkpoint_every: expected a number of batches ≥ 0 (0 = only at the end), "
                             f"got {checkpoint_every!r}")
        self.timings = {}
        comm = self._comm
        if comm is not None:  # consistency checks first; every batch then needs its global index
            train_loader, checkpoint_dir = _dist.begin_fit(comm, dataclasses.asdict(self.config), self.layers,
                                                           train_loader, checkpoint_dir)
        ckpt = persistence.Checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
        # Until the pass completes the factors hold part of the data: scoring or saving them must fail.
        self._fit_error = "fit is still running"
        try:
            with ckpt if ckpt is not None else contextlib.nullcontext(), _dist.reported(comm, "fit"):
                self._accumulate(train_loader, ckpt, checkpoint_every, gradient_sink)
            if comm is not None:
                from ..distributed.share import reduce_factors

                # every rank then holds the sums over all shards
                self.n_train = reduce_factors(comm, self.factors, self.n_train, read=self.fit_read)
        except BaseException as e:
            resume = (f"; fit again with checkpoint_dir={str(ckpt.directory)!r} to resume from its last checkpoint"
                      if ckpt is not None and ckpt.exists and not isinstance(e, persistence.CheckpointBusyError)
                      else "")
            self._fit_error = f"{type(e).__name__}: {e}{resume}"
            raise
        self._fit_error = None
        self._prepared_for = self._mixed = None
        with self._timed("prepare"):
            self._prepare()
        return self

    def _prepare(self) -> None:
        """Damping per layer and the method's per-layer work (e.g. the batched Schulz inverse)."""
        key = self._prepare_key()
        if self._prepared_for == key and self.method is not None:
            return
        cfg = self.config
        damp_layers(self.factors, *resolve(cfg.method, cfg.damping, cfg.damping_scale))
        self.method = method_of(cfg)
        if self._comm is not None:
            from ..distributed.share import prepare_shared

            prepare_shared(self._comm, self.method, self.factors)  # each layer's inverse on one rank
        else:
            self.method.prepare(self.factors)
        self._prepared_for = key

    def _prepare_key(self) -> tuple:
        """What the prepared method depends on; equal keys mean ``_prepare`` has nothing to redo."""
        return (self.config.method, self.config.damping, self.config.damping_scale, self.batches_done)

    def plan(self, train_loader: Iterable, *, n_queries: int = 0, top_k: int | None = None, mean: bool = False,
             probe_batches: int = 4) -> "Plan":
        """Memory and time of ``fit(train_loader)`` and of scoring ``n_queries`` queries, before the run.

        Reads ``train_loader`` once without the model (examples, batches, padded tokens), then runs the
        fit's per-sample gradients and GFIM products on ``probe_batches`` batches — the first warms up,
        the largest is always among them — to measure seconds per token and the memory one batch takes.
        The factors, inverses, gradient cache (``cache="memory"``), query gradients and the score matrix
        (dense, 2·k per query with ``top_k``, or one row with ``mean=True``, as ``mean_scores``) are
        counted from their shapes and dtypes.  Nothing is
        fitted: the attributor's state is unchanged.  See :class:`~hyperinf_ext.attributor.plan.Plan`
        (``peak_bytes``, ``seconds``, ``advice(max_memory)``, ``table()``) and docs/api.md "Plan".

        Raises:
            ValueError: an empty loader, a batch without tensors, bad ``n_queries``/``top_k``/
                ``probe_batches``, or any error the fit would raise on the probed batches.
        """
        from .plan_probe import make_plan

        return make_plan(self, train_loader, n_queries=n_queries, top_k=top_k, mean=mean, probe_batches=probe_batches)

    def use(self, method: str | None = None, *, damping: Any = _KEEP, **options: Any) -> "HyperINF":
        """Switch method and/or damping on the same fitted factors and cached gradients (no refit).

        ``method=None`` keeps the current method; any other option (``damping`` included) given as None
        takes its default again.  A new ``damping`` without ``damping_scale`` takes the rule's default
        scale.  Settings the fit fixed (``layers``, ``include_heads``, ``cache`` and the dtypes) cannot
        change here: fit a new attributor for them.  When ``use`` raises, the attributor is as before.
        """
        if self._fit_error is not None:
            raise RuntimeError(f"fit did not complete: {self._fit_error}")
        defaults = config_defaults()
        unknown = sorted(set(options) - set(defaults) - {"method", "damping"})
        if unknown or "method" in options or "damping" in options:
            bad = unknown[0] if unknown else sorted({"method", "damping"} & set(options))[0]
            raise ValueError(f"{bad}: not a setting use() takes; expected method, damping or one of "
                             f"{sorted(set(defaults) - set(FIXED_BY_FIT) - {'method', 'damping'})}")
        changes = {k: defaults[k] if v is None else str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v
                   for k, v in options.items()}
        if method is not None:
            changes["method"] = method
        if damping is not _KEEP:
            changes["damping"] = defaults["damping"] if damping is None else damping
            changes.setdefault("damping_scale", None)
        refit = sorted(k for k in FIXED_BY_FIT if k in changes and changes[k] != getattr(self.config, k))
        if refit:
            raise ValueError(f"{refit[0]}: fixed by the fit (the factors and cached gradients were made with "
                             f"{refit[0]}={getattr(self.config, refit[0])!r}); fit a new HyperINF(model, "
                             f"{refit[0]}=...) to change it")
        candidate = dataclasses.replace(self.config, **changes)  # validates every option
        saved = (self.config, self.method, self._prepared_for, {n: f.damping for n, f in self.factors.items()})
        # the mixed inverse of the last query set was made with the old solver, tol and backend too
        self.config, self._prepared_for, self._mixed = candidate, None, None
        try:
            with self._timed("prepare"):
                self._prepare()
        except BaseException:
            # the method's own refusal (or a failed inverse) must not leave half a switch behind
            self.config, self.method, self._prepared_for, dampings = saved
            for n, lam in dampings.items():
                self.factors[n].damping = lam
            raise
        return self

    # ------------------------------------------------------------------------------------- scoring

    def _require_fit(self) -> None:
        if self._fit_error is not None:
            raise RuntimeError(f"fit did not complete: {self._fit_error}")
        # counts, not this rank's batches: under torch.distributed a rank's shard may be empty
        if not self.factors or not any(f.count for f in self.factors.values()):
            raise RuntimeError("HyperINF: call fit(train_loader) (or HyperINF.load) before scoring")

    # --------------------------------------------------------------------------------- persistence
    # (the formats, checks and atomic commits live in persistence/; the attributor's side in stored.py)

    def save(self, directory: str | Path) -> Path:
        """Write factors (safetensors: per-layer GFIM sums and the method's inverses) and meta.json.

        Under torch.distributed rank 0 writes and every rank returns once the files are committed."""
        if self._comm is not None:
            # every rank: gathering FSDP2-sharded weights is a collective
            digests = (self._adapter_digest(), self._base_digest())
            _dist.on_rank0(self._comm, "save", lambda: self._write_saved(directory, digests))
            return Path(directory)
        return self._write_saved(directory)

    @classmethod
    def load(cls, directory: str | Path, model: torch.nn.Module, *, loss_fn=None, progress: bool = True,
             allow_other_weights: bool = False) -> "HyperINF":
        """Rebuild an attributor from ``save``; scoring then needs ``train_loader`` (no cache is stored).

        Raises ``ValueError`` naming the file when it is missing, corrupt or holds NaN/Inf, naming the
        layer when a saved shape differs from ``model``'s (another LoRA rank or hidden size), and naming
        both fingerprints when the factors were fitted on other adapter weights than ``model``'s, or with
        other base weights (another checkpoint or dtype; ``base_fingerprint``, which does not depend on which
        weights require grad) (``allow_other_weights=True`` loads them anyway).  Factors saved before fingerprints existed
        load with a warning.
        """
        return cls._read_saved(directory, model, loss_fn=loss_fn, progress=progress,
                               allow_other_weights=allow_other_weights)

    @staticmethod
    def save_scores(path: str | Path, scores: torch.Tensor, **metadata: str) -> None:
        """Write a score tensor to a safetensors file (metadata: string key/values)."""
        persistence.save_scores(path, scores, SIGN_CONVENTION, **metadata)

    @staticmethod
    def load_scores(path: str | Path) -> torch.Tensor:
        """The score tensor written by ``save_scores``, or the matrix of ``scores(out=PATH)`` memory-mapped.

        ``ValueError`` naming ``path`` when it is missing, holds another kind of artefact (saved factors,
        a checkpoint), or is an incomplete, corrupt or inconsistent store or file."""
        p = Path(path)
        if p.is_dir():
            return sinks.load(p)
        if not p.exists():
            raise ValueError(f"{p}: missing (scores)")
        return persistence.load_scores(p)
