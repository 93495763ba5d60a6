"""Where streamed scores go: in memory, into a top-K, or to disk as a memory-mappable matrix.

Each sink takes score blocks ``[n_query, B]`` (rows in query-index order) of the training examples
``index`` [B] as the training gradients stream past, and ``finish`` gives the result (gathered or
merged across ranks under torch.distributed).

On disk (``scores(out=PATH)``) the matrix is a directory ``PATH`` with ``scores-<id>.npy`` (a fresh id per
run), stored *training-major* ``[n_train, n_query]`` so that each training example's scores are one
contiguous row — a batch of B examples is B row writes at its training indices, whatever order the loader
yields them in, and every rank of a distributed run writes its own rows straight into the one file (it must
be on a filesystem every rank sees; rank 0 creates and commits it).  The run writes ``scores-<id>.npy.partial``;
the commit renames it and then replaces ``meta.json`` (kind "hyperinf-ext/score-store", naming the file), so a
rerun onto a store replaces it atomically and a run that fails leaves the previous store as it was (its
unfinished file is removed).  Rank 0 holds ``.write.lock`` there from creation to commit, so a second run
onto the same store is refused instead of removing this one's unfinished file at its commit.  A directory
holding another kind of artefact is refused (hyperinf_ext/persistence/kinds.py).  Why ``.npy`` and not safetensors: a ``.npy`` opens with ``numpy.load(mmap_mode=...)`` with zero copies and can be
filled in place row by row; safetensors serialises whole tensors and its loaders copy them into memory.
:func:`load` returns the ``[n_query, n_train]`` transpose view of the memory map (no read until used).
"""
from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..persistence import kinds
from ..persistence.files import WRITE_LOCK, hold_lock
from .topk import TopK, TopKScores

if TYPE_CHECKING:
    from ..distributed import Comm

META, PARTIAL, LEGACY_SCORES = kinds.MANIFEST, ".partial", "scores.npy"
_STORE_FILE = re.compile(r"^scores(-[0-9a-f]{16})?\.npy(\.partial)?$")


class DenseSink:
    """The full [n_query, n_train] matrix in memory (one process), or this rank's columns (gathered later)."""

    def __init__(self, n_query: int, n_train: int, dtype: torch.dtype, comm: "Comm | None"):
        self.comm = comm
        self.out = torch.zeros(n_query, n_train if comm is None else 0, dtype=dtype, device="cpu")
        self.blocks: list[torch.Tensor] = []
        self.indices: list[torch.Tensor] = []

    def add(self, block: torch.Tensor, index: torch.Tensor) -> None:
        if self.comm is not None:
            self.blocks.append(block)
            self.indices.append(index)
            return
        top = int(index.max()) + 1
        if top > self.out.shape[1]:  # a second-pass loader may reach beyond fit's n_train
            self.out = torch.cat([self.out, self.out.new_zeros(self.out.shape[0], top - self.out.shape[1])], 1)
        self.out[:, index] = block

    def finish(self, n_train: int, all_ranks: bool) -> torch.Tensor | None:
        if self.comm is None:
            return self.out
        from ..distributed.share import gather_columns

        values = torch.cat(self.blocks, 1) if self.blocks else self.out
        index = torch.cat(self.indices) if self.indices else torch.zeros(0, dtype=torch.int64, device="cpu")
        self.blocks, self.indices = [], []
        return gather_columns(self.comm, values, index, n_train, all_ranks, "scores: gather")


class TopKSink:
    def __init__(self, n_query: int, k: int, dtype: torch.dtype, comm: "Comm | None"):
        self.part, self.comm = TopK(n_query, k, dtype), comm

    def add(self, block: torch.Tensor, index: torch.Tensor) -> None:
        self.part.update(block, index)

    def finish(self, n_train: int, all_ranks: bool) -> TopKScores | None:
        if self.comm is None:
            return self.part.result()
        # every rank's part merged, in rank order (the result does not depend on it)
        parts = self.comm.all_gather_object((self.part.state(), self.part.seen), "scores: top-k")
        if not (all_ranks or self.comm.rank == 0):
            return None
        merged = TopK.from_state(*parts[0])
        for state, seen in parts[1:]:
            merged.merge(TopK.from_state(state, seen))
        return merged.result()


class FileSink:
    """Rows of the store's score file ([n_train, n_query]) written as blocks arrive; see the module doc."""

    def __init__(self, path: str | Path, n_query: int, n_train: int, dtype: torch.dtype, comm: "Comm | None",
                 sign: str):
        self.dir, self.comm, self.sign = Path(path), comm, sign
        self.shape, self.dtype = (n_train, n_query), dtype
        self.mm: Any = None
        self._lock: int | None = None
        # a fresh name per run: the previous store's file and manifest stay untouched until the commit
        self.name = f"scores-{secrets.token_hex(8)}.npy"
        try:
            self._open()
        except BaseException:
            self._unlock()  # a lock left held would refuse every later run of this process
            raise

    def _open(self) -> None:
        comm, name = self.comm, self.name
        if comm is None or comm.rank == 0:
            from ..distributed import reported

            with reported(comm, "scores: create the score file"):
                kinds.prepare_dir(self.dir, kinds.SCORE_STORE, "out")
                # until the commit or abort: a second run's commit would remove this one's unfinished file
                self._lock = hold_lock(self.dir / WRITE_LOCK, (
                    f"out {self.dir}: another run is writing a score store there (its lock file {WRITE_LOCK} "
                    "is held); wait for it to finish or choose another out"))
                np.lib.format.open_memmap(self.dir / (name + PARTIAL), mode="w+", dtype=_np(self.dtype),
                                          shape=self.shape).flush()
        if comm is not None:
            name = comm.all_gather_object(name, "scores: open the score file")[0]
            ok = comm.all_gather_object((self.dir / (name + PARTIAL)).exists(), "scores: open the score file")
            if not all(ok):
                self.name, self.partial = name, self.dir / (name + PARTIAL)
                self.abort()
                raise ValueError(f"out: {self.dir} must be on a filesystem every rank sees "
                                 f"(not seen by ranks {[p for p, x in enumerate(ok) if not x]}); "
                                 "or use top_k, or the in-memory scores")
        self.name, self.partial = name, self.dir / (name + PARTIAL)
        self.mm = np.lib.format.open_memmap(self.partial, mode="r+")

    def add(self, block: torch.Tensor, index: torch.Tensor) -> None:
        if int(index.max()) >= self.shape[0]:
            raise ValueError(f"train_loader: index {int(index.max())} beyond the fitted n_train={self.shape[0]} "
                             "(a score file is sized at the start)")
        rows = block.T.to(self.dtype).contiguous().numpy()
        lo, hi = int(index.min()), int(index.max()) + 1
        if hi - lo == index.numel() and bool((index[1:] > index[:-1]).all()):
            self.mm[lo:hi] = rows  # a run of consecutive indices: one contiguous write
        else:
            self.mm[index.numpy()] = rows

    def _unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def abort(self) -> None:
        """After a failure: drop this run's unfinished file; the previous store (if any) stays as it was."""
        self.mm = None
        if self.comm is None or self.comm.rank == 0:
            try:
                self.partial.unlink(missing_ok=True)
            except OSError:
                pass  # the run's own error is the one to raise; the next commit removes leftovers
        self._unlock()

    def finish(self, n_train: int, all_ranks: bool) -> torch.Tensor | None:
        self.mm.flush()
        self.mm = None
        comm = self.comm

        def commit() -> None:
            from ..persistence import write_bytes_atomic

            os.replace(self.partial, self.dir / self.name)
            meta = {**kinds.manifest_kind(kinds.SCORE_STORE), "format": kinds.STORE_FORMAT, "scores": self.name,
                    "n_query": self.shape[1], "n_train": self.shape[0],
                    "dtype": str(self.dtype).replace("torch.", ""), "sign": self.sign}
            write_bytes_atomic(self.dir / META, json.dumps(meta, indent=1).encode())  # the commit
            for p in self.dir.iterdir():  # the replaced store's file, leftovers of killed or failed runs
                if p.name != self.name and _STORE_FILE.match(p.name) or p.name == ".writer":
                    p.unlink(missing_ok=True)

        if comm is None:
            try:
                commit()
            finally:
                self._unlock()
            return load(self.dir)
        from ..distributed import on_rank0

        comm.barrier("scores: rows written")
        try:
            on_rank0(comm, "scores: commit the score file", commit)
        finally:
            self._unlock()
        return load(self.dir) if all_ranks or comm.rank == 0 else None


class Sinks:
    """What one ``scores`` call feeds: a top-K and/or a file when asked for, else the dense matrix."""

    def __init__(self, n_query: int, n_train: int, dtype: torch.dtype, comm: "Comm | None", *,
                 top_k: int | None = None, out: str | Path | None = None, sign: str = ""):
        self.sinks: list[Any] = []
        if top_k is not None:
            self.sinks.append(TopKSink(n_query, top_k, dtype, comm))
        if out is not None:
            self.sinks.append(FileSink(out, n_query, n_train, dtype, comm, sign))
        if not self.sinks:
            self.sinks.append(DenseSink(n_query, n_train, dtype, comm))

    def add(self, block: torch.Tensor, index: torch.Tensor) -> None:
        for s in self.sinks:
            s.add(block, index)

    def abort(self) -> None:
        """After a failure: what the file sink began is removed (the sinks in memory need nothing)."""
        for s in self.sinks:
            if isinstance(s, FileSink):
                s.abort()

    def finish(self, n_train: int, all_ranks: bool) -> Any:
        """The first sink's result (the top-K when asked for); every sink is finished (files committed)."""
        return [s.finish(n_train, all_ranks) for s in self.sinks][0]


def _np(dtype: torch.dtype) -> Any:
    return {torch.float64: np.float64, torch.float32: np.float32}[dtype]


def check_out(path: str | Path) -> None:
    """``ValueError`` when ``path`` cannot take a score store: a file, or a directory holding another kind
    of artefact (checked before any gradient is computed; the writer checks again when it creates it)."""
    kinds.check_dir(path, kinds.SCORE_STORE, "out")


def is_store(path: str | Path) -> bool:
    """Whether ``path`` is a score store (complete or not) of ``scores(out=PATH)``."""
    return kinds.kind_of(path) == kinds.SCORE_STORE


def load(path: str | Path) -> torch.Tensor:
    """The [n_query, n_train] matrix written by ``scores(out=PATH)``, memory-mapped (copy-on-write).

    ``ValueError`` naming the path when it holds another kind of artefact, no finished store, or a store
    whose manifest or file is missing, corrupt or inconsistent."""
    from ..persistence import read_json
    from ..persistence.files import json_field, json_int

    p = Path(path)
    if p.is_dir() and kinds.kind_of(p) in (None, kinds.SCORE_STORE) and not (p / META).exists():
        raise ValueError(f"{p}: no complete score matrix (no {META}; the writing run did not finish)")
    kinds.require_kind(p, (kinds.SCORE_STORE,), "a score store (scores(out=...))")
    meta = read_json(p / META, "score matrix")
    where = str(p / META)
    if meta.get("format") != kinds.STORE_FORMAT:
        raise ValueError(f"{where}: not a hyperinf-ext score matrix (format {meta.get('format')!r})")
    name = json_field(meta, "scores", str, where) if "scores" in meta else LEGACY_SCORES
    if _STORE_FILE.match(name) is None or name.endswith(PARTIAL):
        raise ValueError(f"{where}: 'scores' must name a scores-<id>.npy file, got {name!r}")
    shape = (json_int(meta, "n_train", where), json_int(meta, "n_query", where))
    if not (p / name).is_file():
        raise ValueError(f"{p / name}: missing (the score file {META} names); the store is incomplete")
    try:
        # "c": pages are read lazily and writes stay private, so torch gets a writable array without a copy
        arr = np.load(p / name, mmap_mode="c")
    except (OSError, ValueError) as e:
        raise ValueError(f"{p / name}: unreadable score matrix ({e})") from None
    if arr.shape != shape:
        raise ValueError(f"{p / name}: shape {arr.shape} differs from {META}'s "
                         f"[{shape[0]}, {shape[1]}] (truncated or replaced)")
    return torch.from_numpy(arr).T
