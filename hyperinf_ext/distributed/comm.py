"""Fail-fast collectives of a torch.distributed process group: the store-based rendezvous and heartbeat.

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

The high-level API (``resolve``, ``reported``, ``begin_fit``, sharding) is in ``distributed/__init__.py``; the
sharing of factors, inverses and scores across ranks in ``share.py``.
"""
from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import threading
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..errors import DistributedError

TIMEOUT_ENV = "HYPERINF_EXT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0  # torch's own default for gloo/nccl process groups
DEAD_ENV = "HYPERINF_EXT_DIST_DEAD_AFTER"
DEFAULT_DEAD_AFTER_S = 60.0  # a rank whose heartbeat stopped this long ago is dead (or hung with the GIL held)
BEAT_S = 1.0
# Comms take ids in the order of their first collective, which every rank runs in the same order (as the
# process group requires): equal ids, equal store keys; a Comm that never communicates takes none.
_comm_ids = itertools.count()


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


_heartbeat: dict[str, Any] = {"pg": None, "stop": None, "thread": None}  # the group beaten for, its stop event


@atexit.register
def _stop_heartbeat() -> None:
    """Stop and join the beat thread before the interpreter tears down: a daemon thread still inside a
    store call while the store (or, on rank 0, its server) is destroyed aborts the process ("terminate
    called without an active exception") — seen under load when a script exits right after its work."""
    if _heartbeat["stop"] is not None:
        _heartbeat["stop"].set()
    thread = _heartbeat["thread"]
    if thread is not None and thread.is_alive():
        thread.join(timeout=4 * BEAT_S)


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

    thread = threading.Thread(target=beat, name="hyperinf-ext-heartbeat", daemon=True)
    thread.start()
    _heartbeat.update(pg=pg, stop=stop, thread=thread)
