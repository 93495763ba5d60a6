"""A store of per-sample training gradients, batch by batch, so each example is back-propagated once.

``memory`` keeps the batches in RAM (fastest; grows with n), ``disk`` writes one safetensors file per
batch (peak memory independent of n; reading back costs far less than a forward/backward pass).
Disk files (batches and ``manifest.json``, the count of complete batches) are written atomically, so a
killed fit leaves the previous count, and a resumed fit overwrites any batch beyond it.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Protocol

import torch

from .. import persistence
from ..persistence import read_json, read_tensors, save_tensors_atomic, write_bytes_atomic

CACHE_MODES = ("memory", "disk", "none")


class GradientSink(Protocol):
    """What ``HyperINF.fit(gradient_sink=...)`` feeds: every batch's per-sample gradients, in order.

    ``count``: batches held (committed or buffered).  ``truncate(b)``: keep only the first b batches (a
    resumed fit re-sends the rest).  ``append(index [B] int64, {layer: [B, r, d]})``: one batch.
    ``flush()``: make everything appended durable; called before each fit checkpoint commit and at
    the end, so after a kill the sink holds at least the batches of the last commit.
    """

    count: int

    def truncate(self, batches: int) -> None: ...

    def append(self, index: torch.Tensor, grads: dict[str, torch.Tensor]) -> None: ...

    def flush(self) -> None: ...


class GradientCache:
    """Append-only list of (index [B] int64, {layer: [B, r, d]}) batches."""

    def __init__(self, mode: str = "memory", directory: str | Path | None = None):
        if mode not in CACHE_MODES:
            raise ValueError(f"cache: unknown mode {mode!r}; expected one of {CACHE_MODES}")
        self.mode = mode
        self._batches: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []
        self._owns_dir = False
        self.directory: Path | None = None
        self.count = 0  # batches stored
        if mode == "disk":
            if directory is None:
                directory = tempfile.mkdtemp(prefix="hyperinf-grads-")
                self._owns_dir = True
            self.directory = Path(directory)
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob("*.tmp*"):  # temporaries of a killed writer
                stale.unlink(missing_ok=True)
            manifest = self.directory / "manifest.json"
            if manifest.exists():  # resuming an interrupted fit
                count = read_json(manifest, "gradient-cache manifest").get("batches")
                if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                    raise ValueError(f"{manifest}: 'batches' must be a count ≥ 0, got {count!r}; the gradient "
                                     f"cache is corrupt: delete {self.directory} to rebuild it")
                self.count = count

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def truncate(self, batches: int) -> None:
        """Forget everything after the first ``batches`` batches (a resumed fit re-adds them)."""
        if self.mode == "memory":
            del self._batches[batches:]
        self.count = min(self.count, batches)
        self._write_manifest()

    def append(self, index: torch.Tensor, grads: dict[str, torch.Tensor]) -> None:
        if self.mode == "none":
            return
        if self.mode == "memory":
            self._batches.append((index.cpu(), {k: v.detach().cpu() for k, v in grads.items()}))
        else:
            # safetensors stores whole storages: slices of one stacked buffer are written as copies
            tensors = {f"g.{k}": _own_storage(v.detach().cpu()) for k, v in grads.items()}
            tensors["index"] = index.cpu().contiguous()
            save_tensors_atomic(self._batch_path(self.count), tensors)
            persistence.files.crash_point("grads_batch_written")
        self.count += 1
        self._write_manifest()

    def _write_manifest(self) -> None:
        if self.mode == "disk":
            # atomic: a kill while writing must leave the previous count, never an empty file
            write_bytes_atomic(self.directory / "manifest.json", json.dumps({"batches": self.count}).encode(),
                               step="grads_manifest")

    def _batch_path(self, i: int) -> Path:
        return self.directory / f"batch_{i:07d}.safetensors"

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        if self.mode == "memory":
            yield from self._batches[: self.count]
        elif self.mode == "disk":
            for i in range(self.count):
                t, _ = read_tensors(self._batch_path(i), f"cached gradients of batch {i}")
                if "index" not in t:
                    raise ValueError(f"{self._batch_path(i)}: no 'index' tensor; the gradient cache is corrupt")
                index = t.pop("index")
                yield index, {k[2:]: v for k, v in t.items()}

    def nbytes(self) -> int:
        if self.mode == "memory":
            return sum(v.numel() * v.element_size() for _, g in self._batches for v in g.values())
        if self.mode == "disk":
            return sum(p.stat().st_size for p in self.directory.glob("batch_*.safetensors"))
        return 0

    def close(self) -> None:
        self._batches = []
        if self._owns_dir and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self._owns_dir = False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and alone in its storage (a copy when it is a view into a larger one)."""
    t = t.contiguous()
    if t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t
