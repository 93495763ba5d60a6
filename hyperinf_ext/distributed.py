"""HyperINF inside an initialised torch.distributed process group (e.g. launched by ``torchrun``).

:class:`Comm` wraps the group's collectives so that they fail fast instead of hanging:

* before every collective each rank *arrives* at a numbered step on the group's key-value store and
  waits (polling, with a timeout) until every rank has arrived — a rank that died or stopped is then
  named in a :class:`DistributedError` on every other rank, instead of a collective that blocks for the
  process group's own (30 min) timeout;
* every rank beats a counter on the store once a second (a daemon thread with its own store client), so
  a rank that died is named within ``$HYPERINF_EXT_DIST_DEAD_AFTER`` seconds (default 60), long before
  the timeout, which is left to cover slow ranks;
* a rank that fails between collectives (bad data, a method error) posts its error on the store
  (:func:`reported`), so the others stop at their next arrival with that error, naming the rank;
* the first collective of a fit compares what every rank is about to do (:func:`check_consistent`: LoRA
  layers, ranks, dims, dtypes, method and settings) — ranks that disagree all raise the same ValueError.

The sharing of factors, inverses and scores across ranks is in ``dist_share.py``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import os
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from .attributor import HyperINF

TIMEOUT_ENV = "HYPERINF_EXT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0  # torch's own default for gloo/nccl process groups
DEAD_ENV = "HYPERINF_EXT_DIST_DEAD_AFTER"
DEFAULT_DEAD_AFTER_S = 60.0  # a rank whose heartbeat stopped this long ago is dead (or hung with the GIL held)
BEAT_S = 1.0
# Comms take ids in the order of their first collective, which every rank runs in the same order (as the
# process group requires): equal ids, equal store keys; a Comm that never communicates takes none.
_comm_ids = itertools.count()


class DistributedError(RuntimeError):
    """Another rank died, timed out or failed; the message names it."""


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class Comm:
    """Collectives of one process group with arrival checks, a timeout and failure reports.

    ``timeout`` (seconds) bounds how long a rank waits for the others at a collective — it must cover the
    imbalance between ranks' shards; default ``$HYPERINF_EXT_DIST_TIMEOUT`` or 1800 s.
    """

    def __init__(self, group: Any = None, timeout: float | None = None):
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("distributed: no initialised torch.distributed process group "
                             "(call torch.distributed.init_process_group, e.g. under torchrun)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.backend = dist.get_backend(group)
        # nccl moves only CUDA tensors; gloo takes CPU tensors
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        self.timeout = float(timeout if timeout is not None else os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
        self._step = 0
        self._broken: str | None = None
        self._store: Any = None  # keyed on first use, so only Comms that do collectives take an id
        self.dead_after = float(os.environ.get(DEAD_ENV, DEFAULT_DEAD_AFTER_S))
        base = dist.distributed_c10d._get_default_store()
        self._beats = dist.PrefixStore("hyperinf_ext/beat/", base)
        _start_heartbeat(base, dist.get_rank())

    @property
    def store(self) -> Any:
        if self._store is None:
            base = dist.distributed_c10d._get_default_store()
            self._store = dist.PrefixStore(f"hyperinf_ext/{next(_comm_ids)}/", base)
        return self._store

    def name(self, p: int) -> str:
        """Group rank p as the launcher numbers it (the global rank)."""
        return f"rank {p if self.group is None else dist.get_global_rank(self.group, p)}"

    # ---------------------------------------------------------------------------- arrival and aborts

    def abort(self, stage: str, message: str) -> None:
        """Post this rank's failure; every other rank raises it at its next arrival."""
        text = f"{self.name(self.rank)} failed during {stage}: {message}"
        self._broken = text
        with contextlib.suppress(Exception):  # the store may be gone too; this rank raises anyway
            self.store.set("abort", text)

    def _posted_abort(self) -> str | None:
        if self.store.check(["abort"]):
            return self.store.get("abort").decode(errors="replace")
        return None

    def arrive(self, stage: str) -> None:
        """Wait until every rank reaches this step (a barrier through the store, with the timeout)."""
        if self._broken is not None:
            raise DistributedError(f"{stage}: an earlier collective failed: {self._broken}")
        self._step += 1
        step = self._step
        try:
            self.store.set(f"{step}/{self.rank}", stage)  # per-rank marker: names the absent on a timeout
            n = self.store.add(f"{step}/n", 1)
            deadline = time.monotonic() + self.timeout
            delay, next_pulse, pulses = 0.0005, time.monotonic() + BEAT_S, {}
            while n < self.world:
                posted = self._posted_abort()
                if posted is not None:
                    self._broken = posted
                    raise DistributedError(f"{stage}: {posted}")
                if time.monotonic() > next_pulse:
                    next_pulse = time.monotonic() + BEAT_S
                    dead = self._dead(step, pulses)
                    if dead:
                        message = (f"{', '.join(dead)} stopped before this step: no heartbeat for "
                                   f"{self.dead_after:g} s (it died or hangs; see its own output)")
                        self.abort(stage, message)
                        raise DistributedError(f"{stage}: {message}")
                if time.monotonic() > deadline:
                    absent = [self.name(p) for p in range(self.world) if not self.store.check([f"{step}/{p}"])]
                    message = (f"{', '.join(absent)} did not arrive within {self.timeout:g} s (it died, hangs or is "
                               f"still working; raise {TIMEOUT_ENV} for very uneven shards)")
                    self.abort(stage, message)
                    raise DistributedError(f"{stage}: {message}")
                time.sleep(delay)
                delay = min(2 * delay, 0.05)
                n = self.store.add(f"{step}/n", 0)
        except DistributedError:
            raise
        except Exception as e:  # the store itself is unreachable: whoever hosts it (rank 0 or the launcher) died
            self._broken = f"the rendezvous store is unreachable ({type(e).__name__}: {e})"
            raise DistributedError(f"{stage}: {self._broken} — rank 0 or the launcher died") from None

    def _dead(self, step: int, pulses: dict[int, tuple[int, float]]) -> list[str]:
        """Absent ranks whose heartbeat has not moved for ``dead_after`` s (a rank yet to beat is not judged)."""
        now, dead = time.monotonic(), []
        for p in range(self.world):
            if self.store.check([f"{step}/{p}"]):
                continue
            beats = self._beats.add(str(self._global(p)), 0)
            last = pulses.get(p)
            if last is None or last[0] != beats:
                pulses[p] = (beats, now)
            elif beats > 0 and now - last[1] > self.dead_after:
                dead.append(self.name(p))
        return dead

    def _run(self, stage: str, fn: Callable[[], Any]) -> Any:
        self.arrive(stage)
        try:
            return fn()
        except Exception as e:  # every rank arrived, so a rank died during the transfer itself
            self._broken = f"the collective failed: {type(e).__name__}: {e}"
            raise DistributedError(f"{stage}: {self._broken} (a rank died or its link failed)") from None

    # ---------------------------------------------------------------------------------- collectives

    def barrier(self, stage: str) -> None:
        self.arrive(stage)

    def all_reduce_(self, t: torch.Tensor, stage: str, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """In-place all-reduce of ``t``, moved through ``self.device``; returns ``t``."""
        buf = t.to(self.device)
        self._run(stage, lambda: dist.all_reduce(buf, op=op, group=self.group))
        if buf is not t:
            t.copy_(buf)
        return t

    def broadcast(self, t: torch.Tensor, src: int, stage: str) -> torch.Tensor:
        """``t`` of rank ``src`` on every rank (others pass a buffer of the same shape/dtype)."""
        buf = t.to(self.device)
        self._run(stage, lambda: dist.broadcast(buf, self._global(src), group=self.group))
        return buf

    def send_to_0(self, t: torch.Tensor, src: int, stage: str) -> torch.Tensor | None:
        """Rank ``src``'s ``t`` on rank 0 (others pass a buffer of that shape/dtype; non-0 get None)."""
        buf = t.to(self.device)

        def move():
            if self.rank == src and src != 0:
                dist.send(buf, self._global(0), group=self.group)
            elif self.rank == 0 and src != 0:
                dist.recv(buf, self._global(src), group=self.group)

        self._run(stage, move)
        return buf if self.rank == 0 else None

    def all_gather_object(self, obj: Any, stage: str) -> list[Any]:
        out: list[Any] = [None] * self.world
        self._run(stage, lambda: dist.all_gather_object(out, obj, group=self.group))
        return out

    def _global(self, p: int) -> int:
        return p if self.group is None else dist.get_global_rank(self.group, p)


_heartbeat: dict[str, Any] = {"pg": None, "stop": None}  # the process group beaten for, and its stop event


def _start_heartbeat(base: Any, global_rank: int) -> None:
    """Once per process group: a daemon thread adds 1 to this rank's counter on the store every BEAT_S s."""
    pg = dist.group.WORLD
    if _heartbeat["pg"] is pg:
        return
    if _heartbeat["stop"] is not None:
        _heartbeat["stop"].set()  # a re-initialised group: the old store's beats end
    try:
        store = dist.PrefixStore("hyperinf_ext/beat/", base.clone())  # its own connection: stores are not shared
    except Exception:  # noqa: BLE001 — a store without clone(): no heartbeat, the timeout still applies
        return
    stop = threading.Event()

    def beat() -> None:
        while dist.is_initialized():
            try:
                store.add(str(global_rank), 1)
            except Exception:  # noqa: BLE001 — the store is gone; the main thread will say so
                return
            if stop.wait(BEAT_S):
                return

    threading.Thread(target=beat, name="hyperinf-ext-heartbeat", daemon=True).start()
    _heartbeat.update(pg=pg, stop=stop)


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


def signature(attr: "HyperINF") -> dict[str, Any]:
    """What every rank must agree on before the first collective: settings and the layers' shapes."""
    from . import __version__

    config = dataclasses.asdict(attr.config)
    # the adapter weights themselves (small): ranks that fine-tuned differently would mix two models
    digest = hashlib.sha256()
    for l in attr.layers:
        digest.update(l.module.weight.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return {
        "adapter_weights_sha256": digest.hexdigest()[:16],
        "hyperinf_ext": __version__,
        "config": config,
        "layers": {l.name: {"kind": l.kind, "rank": l.rank, "dim": l.dim, "dtype": str(l.module.weight.dtype),
                            "device": l.module.weight.device.type} for l in attr.layers},
    }


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


def begin_fit(comm: Comm, attr: "HyperINF", train_loader: Iterable, checkpoint_dir: str | Path | None):
    """Checks before a distributed fit; returns (train_loader, checkpoint_dir) to use on this rank."""
    check_consistent(comm, signature(attr), "fit")
    from .methods import METHODS

    if METHODS[attr.config.method].needs_train_pass:
        raise ValueError(f"distributed: method {attr.config.method!r} streams every training gradient while "
                         "preconditioning, which a sharded training set does not give it; fit with another "
                         "method (hyperinf, exact, kronecker, tracin, paper)")
    sampler = getattr(train_loader, "sampler", None)
    if isinstance(sampler, torch.utils.data.DistributedSampler) and not sampler.drop_last \
            and sampler.total_size > len(sampler.dataset):
        raise ValueError(
            f"train_loader: its DistributedSampler pads the shards with {sampler.total_size - len(sampler.dataset)} "
            "repeated example(s), which would count twice; use hyperinf_ext.distributed.ShardSampler(dataset) "
            "(uneven shards, nothing repeated)")
    if checkpoint_dir is not None:  # each rank commits its own partial sums; the reduction runs after
        checkpoint_dir = Path(checkpoint_dir) / f"rank{comm.rank}-of-{comm.world}"
    wrap = _SizedIndexRequired if hasattr(train_loader, "__len__") else _IndexRequired
    return wrap(train_loader), checkpoint_dir


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
