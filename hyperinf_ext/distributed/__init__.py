"""HyperINF inside an initialised torch.distributed process group (e.g. launched by ``torchrun``).

The collectives (:class:`Comm`: arrival checks, heartbeat, failure reports) are in ``comm.py``;
here: choosing the group (:func:`resolve`), reporting a rank's failure (:func:`reported`), the
consistency check every fit begins with (:func:`begin_fit`), sharding loaders and ``init_from_env``.
The sharing of factors, inverses and scores across ranks is in ``share.py``.  Nothing here knows the
attributor: it passes its configuration (as a dict) and its layers.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from ..capture.layers import is_dtensor as _dtensor
from ..errors import DistributedError
from ..version import __version__
from .comm import DEAD_ENV, DEFAULT_DEAD_AFTER_S, DEFAULT_TIMEOUT_S, TIMEOUT_ENV, Comm, is_active, rank

if TYPE_CHECKING:
    from ..capture.layers import GradientLayer

__all__ = [
    "DEAD_ENV", "DEFAULT_DEAD_AFTER_S", "DEFAULT_TIMEOUT_S", "TIMEOUT_ENV", "Comm", "DistributedError", "ShardSampler",
    "begin_fit", "check_consistent", "init_from_env", "is_active", "on_rank0", "rank", "reported", "resolve",
    "shard_loader", "signature",
]


def resolve(option: "bool | Comm | None") -> Comm | None:
    """``HyperINF(distributed=...)``: None = use the process group when one with > 1 rank is initialised."""
    if isinstance(option, Comm):
        return option
    if option is None:
        return Comm() if is_active() else None
    if option:
        return Comm()
    return None


@contextlib.contextmanager
def reported(comm: Comm | None, stage: str) -> Iterator[None]:
    """Run a rank-local step; if it raises, post the error for the other ranks, then re-raise it here."""
    try:
        yield
    except DistributedError:
        raise
    except BaseException as e:
        if comm is not None:
            comm.abort(stage, f"{type(e).__name__}: {e}")
        raise


def on_rank0(comm: Comm, stage: str, fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 only (e.g. writing files); every rank returns once it is done (or raises its error)."""
    result = None
    if comm.rank == 0:
        with reported(comm, stage):
            result = fn()
    comm.barrier(stage)
    return result


# --------------------------------------------------------------------------------- consistency checks


def _sharding(t: torch.Tensor) -> str | None:
    """How a DTensor weight is laid out (placements over its mesh's shape), None for a plain tensor."""
    if not _dtensor(t):
        return None
    return f"{tuple(t.placements)} over mesh {tuple(t.device_mesh.shape)}"


def _digest(tensors: Iterable[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        # a copy: .numpy() of the weight's own storage would make it non-resizable, and FSDP2 frees an
        # unsharded weight (left in place by reshard_after_forward=False) by resizing its storage to 0
        t = t.detach().to("cpu", copy=True).contiguous()
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def signature(config: dict[str, Any], layers: Sequence["GradientLayer"]) -> dict[str, Any]:
    """What every rank must agree on before the first collective: settings (the attributor's
    configuration as a dict) and the layers' shapes, layouts and adapter weights.

    The digest covers the plain (unsharded) weights only: a DTensor's values are spread over the ranks,
    and gathering them is itself a collective, so :func:`begin_fit` compares those after this check."""
    # the adapter weights themselves (small): ranks that fine-tuned differently would mix two models
    return {
        "adapter_weights_sha256": _digest(l.module.weight for l in layers if not _dtensor(l.module.weight)),
        "hyperinf_ext": __version__,
        "config": config,
        "layers": {l.name: {"kind": l.kind, "rank": l.rank, "dim": l.dim, "dtype": str(l.module.weight.dtype),
                            "device": l.module.weight.device.type, "sharding": _sharding(l.module.weight),
                            "fsdp": l.fsdp}
                   for l in layers},
    }


def _check_sharded_weights(comm: Comm, layers: Sequence["GradientLayer"], stage: str) -> None:
    """Compare the full values of DTensor adapter weights across ranks (after :func:`check_consistent` of the
    signatures, so every rank gathers the same layers over the same meshes, in the same order).

    Weights sharded over every rank (FSDP2 ``Shard(0)``) are one copy and agree by construction; replicated
    mesh dimensions (HSDP) hold copies that may not."""
    sharded = [l.module.weight for l in layers if _dtensor(l.module.weight)]
    if not sharded:
        return

    def gather() -> str:
        with torch.no_grad():
            return _digest(w.detach().full_tensor() for w in sharded)

    check_consistent(comm, {"sharded_adapter_weights_sha256": comm._run(f"{stage}: gather the sharded adapter "
                                                                       "weights", gather)}, stage)


def _differences(mine: dict, ref: dict) -> list[str]:
    out = []
    for key in sorted(set(mine) | set(ref)):
        a, b = mine.get(key), ref.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
            if only_a:
                out.append(f"{key} {only_a[:3]}{'…' if len(only_a) > 3 else ''} only here")
            if only_b:
                out.append(f"{key} {only_b[:3]}{'…' if len(only_b) > 3 else ''} missing")
            out += [f"{key}.{k}: {d}" for k in sorted(set(a) & set(b)) if a[k] != b[k]
                    for d in (_differences(a[k], b[k]) if isinstance(a[k], dict) and isinstance(b[k], dict)
                              else [f"{a[k]!r} vs {b[k]!r}"])][:6]
        else:
            out.append(f"{key}: {a!r} vs {b!r}")
    return out


def check_consistent(comm: Comm, sig: dict[str, Any], stage: str) -> None:
    """Raise the same ValueError on every rank when any rank's ``sig`` differs from rank 0's."""
    sigs = comm.all_gather_object(sig, stage)
    problems = [f"{comm.name(p)} vs rank 0: " + "; ".join(_differences(s, sigs[0])[:6])
                for p, s in enumerate(sigs) if s != sigs[0]]
    if problems:
        raise ValueError(f"distributed: the ranks disagree ({stage}), so none of them starts — " + " | ".join(problems))


def begin_fit(comm: Comm, config: dict[str, Any], layers: Sequence["GradientLayer"], train_loader: Iterable,
              checkpoint_dir: str | Path | None):
    """Checks before a distributed fit; returns (train_loader, checkpoint_dir) to use on this rank.

    ``config``: the attributor's configuration as a dict (its ``method`` names the curvature). A model
    wrapped by FSDP2 ``fully_shard`` (layers marked ``fsdp``) has its sharded adapter weights compared
    too, ``checkpoint_dir`` refused, and its loader run in lockstep (:class:`_Lockstep`)."""
    check_consistent(comm, signature(config, layers), "fit")
    _check_sharded_weights(comm, layers, "fit")
    from ..curvature.methods import METHODS

    if METHODS[config["method"]].needs_train_pass:
        raise ValueError(f"distributed: method {config['method']!r} streams every training gradient while "
                         "preconditioning, which a sharded training set does not give it; fit with another "
                         "method (hyperinf, exact, kronecker, tracin, paper)")
    sampler = getattr(train_loader, "sampler", None)
    if isinstance(sampler, torch.utils.data.DistributedSampler) and not sampler.drop_last \
            and sampler.total_size > len(sampler.dataset):
        raise ValueError(
            f"train_loader: its DistributedSampler pads the shards with {sampler.total_size - len(sampler.dataset)} "
            "repeated example(s), which would count twice; use hyperinf_ext.distributed.ShardSampler(dataset) "
            "(uneven shards, nothing repeated)")
    fsdp = any(l.fsdp for l in layers)  # the same on every rank: part of the signature
    if fsdp and checkpoint_dir is not None:
        raise ValueError("checkpoint_dir: not supported for a model wrapped by FSDP2 fully_shard (the checkpoint "
                         "fingerprints the model's parameters, which are DTensor shards); fit without it")
    if checkpoint_dir is not None:  # each rank commits its own partial sums; the reduction runs after
        checkpoint_dir = Path(checkpoint_dir) / f"rank{comm.rank}-of-{comm.world}"
    sized = hasattr(train_loader, "__len__")
    loader = (_SizedIndexRequired if sized else _IndexRequired)(train_loader)
    if fsdp:
        loader = (_SizedLockstep if sized else _Lockstep)(loader, comm, "train_loader")
    return loader, checkpoint_dir


class _IndexRequired:
    """The loader, with each batch required to carry its global ``index`` (positions would collide across ranks)."""

    def __init__(self, loader: Iterable):
        self.loader = loader

    def __iter__(self) -> Iterator:
        for b, batch in enumerate(self.loader):
            if not (hasattr(batch, "keys") and "index" in batch):
                raise ValueError(f"train_loader: batch {b} has no 'index' entry; under torch.distributed every batch "
                                 "must carry the global training index of its examples")
            yield batch


class _SizedIndexRequired(_IndexRequired):
    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]


class _Lockstep:
    """The loader, with the ranks agreeing before each batch that every one of them has it.

    Under FSDP2 ``fully_shard`` every forward all-gathers the weights: a collective that all ranks must
    enter. A rank with one batch more than another would wait in it for the process group's timeout
    (30 min by default); here every rank raises the same ValueError instead, before that forward. Costs one
    small gather per batch (next to a forward and backward of the model)."""

    def __init__(self, loader: Iterable, comm: Comm, what: str):
        self.loader, self.comm, self.what = loader, comm, what

    def __iter__(self) -> Iterator:
        it = iter(self.loader)
        k = 0
        while True:
            try:
                batch, has = next(it), True
            except StopIteration:
                batch, has = None, False
            flags = self.comm.all_gather_object(has, f"{self.what}: batch {k} on every rank (FSDP2)")
            if not any(flags):
                return
            if not all(flags):
                done = ", ".join(self.comm.name(p) for p, f in enumerate(flags) if not f)
                more = ", ".join(self.comm.name(p) for p, f in enumerate(flags) if f)
                raise ValueError(
                    f"{self.what}: {done} ran out after {k} batch(es) while {more} still had more; under FSDP2 "
                    "fully_shard every forward is a collective of all ranks, so every rank must run the same number "
                    "of batches (shards of equal size, or batch sizes that give each rank as many batches)")
            yield batch
            k += 1


class _SizedLockstep(_Lockstep):
    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]


class ShardSampler(torch.utils.data.Sampler):
    """Rank r's examples r, r + world, r + 2·world, … of ``range(len(dataset))``: uneven, nothing repeated.

    Unlike ``DistributedSampler`` it never pads the last shard with repeated examples (they would be
    counted twice in the GFIM).  Batches must still carry each example's global ``index``.
    """

    def __init__(self, dataset: Sequence | int, rank: int | None = None, world: int | None = None):
        self.n = dataset if isinstance(dataset, int) else len(dataset)
        self.rank = dist.get_rank() if rank is None else rank
        self.world = dist.get_world_size() if world is None else world

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def shard_loader(loader: Iterable, comm: "Comm | None" = None) -> Iterable:
    """``loader`` reduced to this rank's examples (global ``index`` ≡ rank mod world) when distributed.

    For loaders that every rank builds over the whole training set (e.g. the CLI's): each batch is cut
    to its examples of this rank (every tensor or list entry with the batch's length along dim 0).
    Loading is repeated on every rank; the gradients — the expensive part — are not.  Outside a process
    group the loader is returned as it is.
    """
    if comm is None:
        if not is_active():
            return loader
        r, w = dist.get_rank(), dist.get_world_size()
    else:
        r, w = comm.rank, comm.world
    return _Sharded(loader, r, w)


class _Sharded:
    def __init__(self, loader: Iterable, rank: int, world: int):
        self.loader, self.rank, self.world = loader, rank, world

    def __iter__(self) -> Iterator:
        for b, batch in enumerate(self.loader):
            if "index" not in batch:
                raise ValueError(f"train_loader: batch {b} has no 'index' entry to shard it by")
            index = batch["index"]
            keep = (index % self.world) == self.rank
            if not bool(keep.any()):
                continue
            n = index.shape[0]
            rows = keep.nonzero().squeeze(1).tolist()
            yield type(batch)({k: (v[keep.to(v.device)] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n
                                   else [v[i] for i in rows] if isinstance(v, list) and len(v) == n else v)
                               for k, v in batch.items()})


def init_from_env(device: str = "cpu") -> bool:
    """Initialise the default process group from torchrun's environment (WORLD_SIZE > 1); True if done.

    gloo for a CPU ``device``, nccl (with this process's LOCAL_RANK GPU as the current device) for CUDA.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    backend = "gloo"
    if str(device).startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    return True
