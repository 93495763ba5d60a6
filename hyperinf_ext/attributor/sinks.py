"""Where streamed scores go: in memory, into a top-K, or to disk as a memory-mappable matrix.

Each sink takes score blocks ``[n_query, B]`` (rows in query-index order) of the training examples
``index`` [B] as the training gradients stream past, and ``finish`` gives the result (gathered or
merged across ranks under torch.distributed).

On disk (``scores(out=PATH)``) the matrix is a directory ``PATH`` with ``scores.npy``, stored
*training-major* ``[n_train, n_query]`` so that each training example's scores are one contiguous row —
a batch of B examples is B row writes at its training indices, whatever order the loader yields them in,
and every rank of a distributed run writes its own rows straight into the one file (it must be on a
filesystem every rank sees).  ``meta.json`` is written last and marks the file complete.  Why ``.npy``
and not safetensors: a ``.npy`` opens with ``numpy.load(mmap_mode=...)`` with zero copies and can be
filled in place row by row; safetensors serialises whole tensors and its loaders copy them into memory.
:func:`load` returns the ``[n_query, n_train]`` transpose view of the memory map (no read until used).
"""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .topk import TopK, TopKScores

if TYPE_CHECKING:
    from ..distributed import Comm

SCORES, META, FORMAT = "scores.npy", "meta.json", "hyperinf-ext scores (training-major npy)"


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
    """Rows of ``PATH/scores.npy`` ([n_train, n_query]) written as blocks arrive; see the module doc."""

    def __init__(self, path: str | Path, n_query: int, n_train: int, dtype: torch.dtype, comm: "Comm | None",
                 sign: str):
        self.dir, self.comm, self.sign = Path(path), comm, sign
        self.partial = self.dir / (SCORES + ".partial")
        self.shape, self.dtype = (n_train, n_query), dtype
        nonce = secrets.token_hex(8)
        if comm is None or comm.rank == 0:
            from ..distributed import reported

            with reported(comm, "scores: create the score file"):
                self.dir.mkdir(parents=True, exist_ok=True)
                (self.dir / META).unlink(missing_ok=True)  # no longer complete
                np.lib.format.open_memmap(self.partial, mode="w+", dtype=_np(dtype), shape=self.shape).flush()
                (self.dir / ".writer").write_text(nonce)
        if comm is not None:
            nonce = comm.all_gather_object(nonce, "scores: open the score file")[0]
            seen = (self.dir / ".writer").read_text() if (self.dir / ".writer").exists() else None
            ok = comm.all_gather_object(seen == nonce, "scores: open the score file")
            if not all(ok):
                raise ValueError(f"out: {self.dir} must be on a filesystem every rank sees "
                                 f"(not seen by ranks {[p for p, x in enumerate(ok) if not x]}); "
                                 "or use top_k, or the in-memory scores")
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

    def finish(self, n_train: int, all_ranks: bool) -> torch.Tensor | None:
        self.mm.flush()
        del self.mm
        comm = self.comm

        def commit() -> None:
            os.replace(self.partial, self.dir / SCORES)
            (self.dir / ".writer").unlink(missing_ok=True)
            from ..persistence import write_bytes_atomic

            meta = {"format": FORMAT, "n_query": self.shape[1], "n_train": self.shape[0],
                    "dtype": str(self.dtype).replace("torch.", ""), "sign": self.sign}
            write_bytes_atomic(self.dir / META, json.dumps(meta, indent=1).encode())

        if comm is None:
            commit()
            return load(self.dir)
        from ..distributed import on_rank0

        comm.barrier("scores: rows written")
        on_rank0(comm, "scores: commit the score file", commit)
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

    def finish(self, n_train: int, all_ranks: bool) -> Any:
        """The first sink's result (the top-K when asked for); every sink is finished (files committed)."""
        return [s.finish(n_train, all_ranks) for s in self.sinks][0]


def _np(dtype: torch.dtype) -> Any:
    return {torch.float64: np.float64, torch.float32: np.float32}[dtype]


def is_store(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / META).exists() or (p / (SCORES + ".partial")).exists())


def load(path: str | Path) -> torch.Tensor:
    """The [n_query, n_train] matrix written by ``scores(out=PATH)``, memory-mapped (copy-on-write)."""
    p = Path(path)
    if not (p / META).exists():
        raise ValueError(f"{p}: no complete score matrix (no {META}; the writing run did not finish)")
    from ..persistence import read_json

    meta = read_json(p / META, "score matrix")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{p / META}: not a hyperinf-ext score matrix (format {meta.get('format')!r})")
    try:
        # "c": pages are read lazily and writes stay private, so torch gets a writable array without a copy
        arr = np.load(p / SCORES, mmap_mode="c")
    except (OSError, ValueError) as e:
        raise ValueError(f"{p / SCORES}: unreadable score matrix ({e})") from None
    if arr.shape != (meta["n_train"], meta["n_query"]):
        raise ValueError(f"{p / SCORES}: shape {arr.shape} differs from meta.json's "
                         f"[{meta['n_train']}, {meta['n_query']}] (truncated or replaced)")
    return torch.from_numpy(arr).T
