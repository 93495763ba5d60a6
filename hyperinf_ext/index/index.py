"""``Index``: fit once, ask many times.

``Index.build`` runs one HyperINF fit over the training set and, in the same pass, stores every
training example's LoRA gradient compressed (projection.py, store.py); ``Index.open`` brings back the
fitted factors, the projections and the memory-mapped store, checked against the model, and the
search methods (search.py) answer queries from the store without touching the training data.

Directory layout::

    IDX/meta.json                kind, settings, layers, fingerprints, shard folders, complete flag
    IDX/factors/                 HyperINF.save (GFIM sums and the method's inverses)
    IDX/projection.safetensors   P_l [d, k] per projected layer
    IDX/shards/rank-RRR/         one writer per rank (store.py)
    IDX/fit/                     the fit checkpoint while building (removed when complete)
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from .. import persistence
from ..attributor import HyperINF
from ..attributor.config import method_of
from ..persistence import kinds
from . import projection, store
from .config import IndexConfig
from .projection import LayerPlan
from .search import Search

__all__ = ["Index"]

FORMAT = 1
BASE_RULE = "all but the adapter"
"""What the manifest's base fingerprint covers: every parameter but the attributor's LoRA weights
(``persistence.base_fingerprint(model, adapter=...)``), whatever requires grad."""


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _rank_world()[1] > 1:
        torch.distributed.barrier()


class Index(Search):
    """A built gradient index opened for queries (``Index.open``).

    Attributes: ``attributor`` (the HyperINF whose factors the index holds: the exact preconditioner),
    ``plans`` (per layer: r, d, k and the offset in a stored row), ``n_train``, ``meta`` (the manifest).
    """

    def __init__(self, directory: Path, attributor: HyperINF, plans: list[LayerPlan],
                 matrices: dict[str, torch.Tensor], shards: list[store.Shard], meta: dict,
                 estimator: str = "regression"):
        if estimator not in projection.ESTIMATORS:
            raise ValueError(f"estimator: expected one of {projection.ESTIMATORS}, got {estimator!r}")
        self.estimator = estimator
        """How a projected layer's score is estimated from the stored g·P: ``regression`` (least squares
        given the training gradients' GFIM: q̃·G·P·(PᵀGP)⁻¹, the default) or ``unbiased`` (q̃·P)."""
        self._maps: dict[str, torch.Tensor] | None = None
        self.directory, self.attributor, self.plans = directory, attributor, plans
        self.matrices, self.shards, self.meta = matrices, shards, meta
        self.config = IndexConfig(**meta["config"])
        self.n_train = int(meta["n_train"])
        widths = torch.tensor([p.width for p in plans])
        self._column_layer = torch.repeat_interleave(torch.arange(len(plans)), widths)  # column → layer

    # ------------------------------------------------------------------------------------------ build

    @classmethod
    def build(cls, model: torch.nn.Module, train_loader: Iterable, directory: str | Path, *,
              config: IndexConfig | None = None, train_fingerprint: str | None = None,
              checkpoint_every: int = 50, loss_fn: Callable | None = None, progress: bool = True,
              estimator: str = "regression", **hyperinf_options: Any) -> "Index":
        """Fit HyperINF on ``train_loader`` and store its compressed training gradients in ``directory``.

        One pass over the data: per batch the per-sample gradients go into the GFIM sums and, projected
        and quantized, into the store.  The fit is checkpointed every ``checkpoint_every`` batches: a
        build killed at any point resumes when called again with the same arguments and loader (the
        finished shards are kept, nothing half-written is read).  Under torchrun every rank streams its
        shard of the loader and writes its own store folder; the index is their union.
        ``hyperinf_options`` go to ``HyperINF`` (method, damping, dtype, layers, ...); ``cache`` is
        not one (the store replaces it).  The batches' ``index`` must number the training examples
        0..n−1, each once (a ``ValueError`` at the end of the pass otherwise, the build left incomplete).
        ``estimator``: see :meth:`open`.  ``train_fingerprint``: the caller's fingerprint of the
        training data (the CLI's: the file's SHA-256 and reading settings), recorded and reported.
        """
        config = config or IndexConfig()
        if not isinstance(config, IndexConfig):
            raise TypeError(f"config: expected an IndexConfig, got {type(config).__name__}")
        if "cache" in hyperinf_options:
            raise ValueError("cache: not an index setting (the index stores the training gradients itself)")
        d = persistence.kinds.prepare_dir(directory, kinds.INDEX, "index")
        attr = HyperINF(model, loss_fn=loss_fn, progress=progress, cache="none", **hyperinf_options)
        if method_of(attr.config).needs_train_pass:
            raise ValueError(f"method {attr.config.method!r}: preconditions by streaming over the training data, "
                             "which an index answers without; choose another method")
        plans = projection.plan_layers([(l.name, l.rank, l.dim) for l in attr.layers], config)
        rank, world = _rank_world()
        settings = {"config": config.as_dict(), "hyperinf": dataclasses.asdict(attr.config),
                    "layers": [[p.name, p.rank, p.dim, p.columns] for p in plans], "world": world}
        meta_path = d / kinds.MANIFEST
        if meta_path.exists():
            meta = persistence.read_json(meta_path, "index manifest")
            if meta.get("complete"):
                raise ValueError(f"{d}: already holds a complete index; open it with Index.open (or "
                                 "`hyperinf-ext index query`), or build into another folder")
            for key, value in settings.items():
                if json.loads(json.dumps(value)) != meta.get(key):
                    raise ValueError(f"{d}: an interrupted build with other settings ({key}: {meta.get(key)!r}, now "
                                     f"{value!r}); resume with the same settings or build into another folder")
        elif rank == 0:
            _write_meta(d, {**kinds.manifest_kind(kinds.INDEX), "format": FORMAT, "complete": False, **settings})
        matrices = projection.draw(plans, config.seed)
        P_path = d / "projection.safetensors"
        if P_path.exists():
            saved = projection.load(P_path, plans)
            if any(not torch.equal(saved[n], m) for n, m in matrices.items()):
                raise ValueError(f"{P_path}: this torch draws other projection matrices from seed {config.seed} "
                                 "than the interrupted build did; build again in a new folder")
        elif rank == 0:
            projection.save(P_path, matrices)
        _barrier()
        writer = store.ShardWriter(d / "shards" / f"rank-{rank:03d}", plans, matrices, config.dtype,
                                   config.rows_per_shard)
        attr.fit(train_loader, checkpoint_dir=d / "fit", checkpoint_every=checkpoint_every, gradient_sink=writer)
        attr.save(d / "factors")
        _barrier()  # every rank's rows are on disk: check they number the examples before calling the index complete
        width = sum(p.width for p in plans)
        stored = [s for r in range(world)
                  for s in store.open_shards(d / "shards" / f"rank-{r:03d}", width, len(plans), config.dtype,
                                             verify=False)]
        problem = _coverage_problem(stored, attr.n_train)
        # every rank: gathering FSDP2-sharded weights is a collective
        base = persistence.base_fingerprint(model, adapter=(p for l in attr.layers for p in l.parameters))
        if problem:
            raise ValueError(f"train_loader: the batches' 'index' must number the training examples 0..n-1, each "
                             f"once ({problem}); the build in {d} stays incomplete: renumber the examples and build "
                             "into another folder")
        if rank == 0:
            fit_meta = d / "fit" / kinds.MANIFEST
            batches = persistence.read_json(fit_meta, "fit checkpoint").get("data") if fit_meta.exists() else None
            meta = {**kinds.manifest_kind(kinds.INDEX), "format": FORMAT, "complete": True, **settings,
                    "n_train": attr.n_train, "shards": [f"shards/rank-{r:03d}" for r in range(world)],
                    "fingerprints": {"base": base, "base_rule": BASE_RULE,
                                     "adapter": persistence.read_json(d / "factors" / kinds.MANIFEST,
                                                                      "saved factors").get("adapter_sha256"),
                                     "train": train_fingerprint, "batches": batches},
                    "bytes_per_example": sum(p.width for p in plans) * _itemsize(config.dtype) + 4 * len(plans) + 8,
                    # the query side reads P too: a damaged P would score every query wrongly
                    "projection_sha256": persistence.file_sha256(P_path) if P_path.exists() else None}
            _write_meta(d, meta)
            shutil.rmtree(d / "fit", ignore_errors=True)
        _barrier()
        return cls.open(d, model, loss_fn=loss_fn, progress=progress, verify=False, estimator=estimator)

    # ------------------------------------------------------------------------------------------- open

    @classmethod
    def open(cls, directory: str | Path, model: torch.nn.Module, *, loss_fn: Callable | None = None,
             progress: bool = True, verify: bool = True, estimator: str = "regression") -> "Index":
        """Open a built index for ``model`` (the base and adapter it was built with).

        ``ValueError`` naming the directory when it holds no index or an incomplete build (run the build
        again to resume), when ``model``'s base or adapter weights differ from the ones the index was
        built with (both fingerprints named), or when a shard is missing, truncated or — with ``verify``
        (SHA-256 of every shard file, about 1 s per GB) — corrupt.  ``estimator``: see
        :attr:`estimator` (it changes only the query side; the stored rows are the same).
        """
        d = Path(directory)
        kinds.require_kind(d, (kinds.INDEX,), "a gradient index")
        meta = persistence.read_json(d / kinds.MANIFEST, "index manifest")
        if not meta.get("complete"):
            raise ValueError(f"{d}: the index build did not complete; run the same build again to resume it")
        if meta.get("format") != FORMAT:
            raise ValueError(f"{d}: index format {meta.get('format')!r}, this version reads {FORMAT}")
        fp = meta.get("fingerprints", {})
        # built since BASE_RULE: the factors record the same fingerprint and HyperINF.load checks it; before,
        # the base was what did not require grad (a model loaded frozen for querying was refused)
        base = None if fp.get("base_rule") == BASE_RULE else persistence.base_fingerprint(model)
        if base is not None and fp.get("base") != base:
            raise ValueError(f"{d}: built on the base model with fingerprint {fp.get('base')}, but this model's base "
                             f"weights have fingerprint {base}; open the index with the model it was built with")
        try:
            attr = HyperINF.load(d / "factors", model, loss_fn=loss_fn, progress=progress)
        except ValueError as e:
            raise ValueError(f"{d}: {e}") from None
        plans = projection.plan_layers([(l.name, l.rank, l.dim) for l in attr.layers], IndexConfig(**meta["config"]))
        if [[p.name, p.rank, p.dim, p.columns] for p in plans] != meta.get("layers"):
            raise ValueError(f"{d}: the model's LoRA layers differ from the index's (another adapter layout)")
        P_path = d / "projection.safetensors"
        if verify and meta.get("projection_sha256") and persistence.file_sha256(P_path) != meta["projection_sha256"]:
            raise ValueError(f"{P_path}: SHA-256 differs from the one recorded at build time; the index is "
                             "corrupt: build it again")
        matrices = projection.load(P_path, plans)
        width = sum(p.width for p in plans)
        dtype = IndexConfig(**meta["config"]).dtype
        shards = [s for folder in meta["shards"]
                  for s in store.open_shards(d / folder, width, len(plans), dtype, verify=verify)]
        _check_coverage(d, shards, int(meta["n_train"]))
        return cls(d, attr, plans, matrices, shards, meta, estimator)

    # ------------------------------------------------------------------------------------------ sizes

    @property
    def nbytes(self) -> int:
        """Bytes of the stored rows (values, scales and indices) over all shards."""
        return sum(s.values.nbytes + s.scales.nbytes + s.index.nbytes for s in self.shards)

    @property
    def bytes_per_example(self) -> float:
        return self.nbytes / max(self.n_train, 1)


def _itemsize(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def _write_meta(d: Path, meta: Mapping) -> None:
    persistence.write_bytes_atomic(d / kinds.MANIFEST, json.dumps(meta, indent=1).encode(), step="index_meta")


def _coverage_problem(shards: list[store.Shard], n_train: int) -> str | None:
    """What is wrong with the stored rows' training indices (None: each of 0..n_train−1 exactly once)."""
    seen = np.zeros(n_train, dtype=np.int64)
    for s in shards:
        idx = np.asarray(s.index)
        if idx.size and (idx.min() < 0 or idx.max() >= n_train):
            return f"{s.path}: training index outside 0..{n_train - 1}"
        np.add.at(seen, idx, 1)
    if (seen > 1).any():
        return f"training examples {np.nonzero(seen > 1)[0][:5].tolist()} are stored twice"
    if (seen == 0).any():
        return (f"training examples {np.nonzero(seen == 0)[0][:5].tolist()} are stored nowhere "
                f"({int((seen == 0).sum())} of 0..{n_train - 1})")
    return None


def _check_coverage(d: Path, shards: list[store.Shard], n_train: int) -> None:
    problem = _coverage_problem(shards, n_train)
    if problem:
        raise ValueError(f"{d}: {problem}; the index is corrupt: build it again")
