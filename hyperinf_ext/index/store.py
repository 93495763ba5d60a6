"""The index's store of compressed training gradients: shard files written by one writer per rank.

A writer directory holds ``shards.json`` (the committed shards, written atomically last) and per shard
``<name>.values.npy`` ([rows, width] in the store dtype, memory-mapped when read; bfloat16 rows are
kept as their uint16 bit patterns since numpy has no bfloat16), ``<name>.scales.npy`` ([rows, L]
float32) and ``<name>.index.npy`` ([rows] int64 training indices).  A shard's files are complete
before ``shards.json`` names them, so a kill leaves at worst files nobody reads (removed on the next
open for writing); every file's size and SHA-256 are recorded and checked on open.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .. import persistence
from .projection import LayerPlan, quantize_rows

MANIFEST = "shards.json"
_PARTS = ("values", "scales", "index")
_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _save_npy(path: Path, array: np.ndarray) -> dict:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"bytes": path.stat().st_size, "sha256": persistence.file_sha256(path)}


class ShardWriter:
    """A ``GradientSink`` that projects, quantizes and stores every batch ``HyperINF.fit`` computes.

    Rows are buffered in memory and written as a shard once ``rows_per_shard`` are buffered, and at
    every ``flush`` (the fit's checkpoint commits), so every committed checkpoint ends on a shard
    boundary and ``truncate`` only ever drops whole shards.
    """

    def __init__(self, directory: Path, plans: list[LayerPlan], matrices: dict[str, torch.Tensor], dtype: str,
                 rows_per_shard: int):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.plans, self.matrices, self.dtype = plans, matrices, dtype
        self.rows_per_shard = rows_per_shard
        self.shards: list[dict] = []
        manifest = self.directory / MANIFEST
        if manifest.exists():
            self.shards = _read_manifest(self.directory)
        else:  # written at once: a rank whose share of the data is empty still has a (shardless) store
            self._write_manifest()
        named = {f"{s['name']}.{part}.npy" for s in self.shards for part in _PARTS}
        for stale in self.directory.iterdir():  # files of a shard a kill left unnamed, temporaries
            if stale.name != MANIFEST and stale.name not in named:
                stale.unlink()
        self._buffer: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._buffered_batches = 0
        self._buffered_rows = 0

    @property
    def count(self) -> int:
        """Batches held: committed shards plus the buffer."""
        return sum(s["batches"] for s in self.shards) + self._buffered_batches

    def truncate(self, batches: int) -> None:
        kept, total = [], 0
        for s in self.shards:
            if total + s["batches"] <= batches:
                kept.append(s)
                total += s["batches"]
            elif total < batches:
                raise ValueError(f"{self.directory}: shard {s['name']} spans the fit checkpoint at batch {batches}; "
                                 "the index is corrupt: build it again in a new folder")
        self._buffer, self._buffered_batches, self._buffered_rows = [], 0, 0
        if len(kept) != len(self.shards):
            dropped = self.shards[len(kept):]
            self.shards = kept
            self._write_manifest()
            for s in dropped:
                for part in _PARTS:
                    (self.directory / f"{s['name']}.{part}.npy").unlink(missing_ok=True)
        if total != batches:
            raise ValueError(f"{self.directory}: holds {total} batches, the fit resumes after {batches}; "
                             "build the index again in a new folder")

    def append(self, index: torch.Tensor, grads: dict[str, torch.Tensor]) -> None:
        values, scales = quantize_rows(self.plans, self.matrices, grads, _TORCH_DTYPES[self.dtype])
        self._buffer.append((index.cpu().to(torch.int64), values.cpu(), scales.cpu()))
        self._buffered_batches += 1
        self._buffered_rows += index.numel()
        if self._buffered_rows >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        index = torch.cat([b[0] for b in self._buffer]).numpy()
        values = torch.cat([b[1] for b in self._buffer])
        if values.dtype == torch.bfloat16:
            values = values.view(torch.uint16)
        scales = torch.cat([b[2] for b in self._buffer]).numpy()
        first = self.count - self._buffered_batches
        name = f"shard-{first:08d}"
        files = {}
        for part, array in (("values", values.numpy()), ("scales", scales), ("index", index)):
            files[part] = _save_npy(self.directory / f"{name}.{part}.npy", np.ascontiguousarray(array))
        persistence.files.crash_point("index_shard_written")
        self.shards.append({"name": name, "first_batch": first, "batches": self._buffered_batches,
                            "rows": int(index.shape[0]), "files": files})
        self._buffer, self._buffered_batches, self._buffered_rows = [], 0, 0
        self._write_manifest()

    def _write_manifest(self) -> None:
        data = {"format": 1, "dtype": self.dtype, "width": sum(p.width for p in self.plans),
                "layers": len(self.plans), "shards": self.shards}
        persistence.write_bytes_atomic(self.directory / MANIFEST, json.dumps(data, indent=1).encode(),
                                       step="index_manifest")


def _read_manifest(directory: Path) -> list[dict]:
    meta = persistence.read_json(directory / MANIFEST, "index shard manifest")
    shards = meta.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and {"name", "batches", "rows", "files"} <= set(s)
                                               for s in shards):
        raise ValueError(f"{directory / MANIFEST}: 'shards' is not a list of shard records; the index is corrupt")
    return shards


@dataclass
class Shard:
    """One shard opened for reading: values [rows, width] (memory-mapped), scales [rows, L], index [rows]."""

    path: Path
    values: np.ndarray
    scales: np.ndarray
    index: np.ndarray


def open_shards(directory: Path, width: int, layers: int, dtype: str, *, verify: bool = True) -> list[Shard]:
    """Every committed shard of a writer directory, each file checked against its recorded size (and
    SHA-256 when ``verify``); a ``ValueError`` names the first missing, truncated or corrupt file."""
    out = []
    recorded = persistence.read_json(directory / MANIFEST, "index shard manifest").get("dtype")
    if recorded != dtype:
        raise ValueError(f"{directory / MANIFEST}: rows stored as {recorded!r}, the index says {dtype!r}; the index "
                         "is corrupt: rebuild it")
    for s in _read_manifest(directory):
        arrays = {}
        for part in _PARTS:
            path = directory / f"{s['name']}.{part}.npy"
            rec = s["files"].get(part, {})
            if not path.is_file():
                raise ValueError(f"{path}: missing (shard {s['name']} of the index); rebuild the index")
            size = path.stat().st_size
            if size != rec.get("bytes"):
                raise ValueError(f"{path}: {size} bytes, the manifest records {rec.get('bytes')}: the shard is "
                                 "truncated or was replaced; rebuild the index")
            if verify and persistence.file_sha256(path) != rec.get("sha256"):
                raise ValueError(f"{path}: checksum mismatch (SHA-256 differs from the manifest): the shard is "
                                 "corrupt; rebuild the index")
            try:
                arrays[part] = np.load(path, mmap_mode="r" if part == "values" else None, allow_pickle=False)
            except (ValueError, OSError) as e:
                raise ValueError(f"{path}: unreadable ({e}); rebuild the index") from None
        rows = s["rows"]
        want = {"values": (rows, width), "scales": (rows, layers), "index": (rows,)}
        for part, shape in want.items():
            if tuple(arrays[part].shape) != shape:
                raise ValueError(f"{directory / (s['name'] + '.' + part + '.npy')}: shape {arrays[part].shape}, "
                                 f"expected {shape}; the index is corrupt")
        out.append(Shard(directory / s["name"], arrays["values"], arrays["scales"], arrays["index"]))
    return out


def blocks(shards: list[Shard], dtype: str, rows: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(index [b] int64, values [b, width] float32 before scaling, scales [b, L] float32), ``rows`` at a time."""
    for sh in shards:
        for lo in range(0, sh.index.shape[0], rows):
            v = torch.from_numpy(np.array(sh.values[lo:lo + rows]))  # a copy: the map is read-only
            if dtype == "bfloat16":
                v = v.view(torch.bfloat16)
            yield (torch.from_numpy(np.asarray(sh.index[lo:lo + rows])), v.to(torch.float32),
                   torch.from_numpy(np.asarray(sh.scales[lo:lo + rows])))
