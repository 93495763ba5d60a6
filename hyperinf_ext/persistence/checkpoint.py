"""Fit checkpoints: the locked ``checkpoint_dir`` (``Checkpoint``), checked on resume against the
fingerprints (fingerprints.py) of the model and of the batches consumed.  Takes factors, configuration
values and the model, never the attributor."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping, Sequence

import torch

from ..errors import CheckpointBusyError
from . import kinds
from .files import hold_lock, json_field, json_int
from .fingerprints import DataFingerprint, model_fingerprint
from .state import META, StoredState, check_layers, read_state, write_state

if TYPE_CHECKING:
    from ..curvature.methods import LayerFactor

LOCK = "lock"


class _Watched:
    """Passes a loader's batches through, fingerprinting them and checking them against a checkpoint."""

    def __init__(self, loader: Iterable, fingerprint: DataFingerprint, expected: dict | None, complete: bool,
                 where: Path):
        self.loader, self.fingerprint, self.expected, self.complete, self.where = loader, fingerprint, expected, complete, where

    def __iter__(self) -> Iterator:
        k = self.expected["batches"] if self.expected else 0
        redo = "use another checkpoint_dir, or delete this one to fit afresh"
        for batch in self.loader:
            self.fingerprint.update(batch)
            n = self.fingerprint.count
            if n == k and self.fingerprint.digest != self.expected["digest"]:
                raise ValueError(f"checkpoint_dir {self.where}: the loader's first {k} batches differ from the data "
                                 f"this checkpoint was fitted on (data fingerprint mismatch); {redo}")
            if self.complete and n > k:
                raise ValueError(f"checkpoint_dir {self.where}: holds a finished fit of {k} batches, but the loader "
                                 f"yields more; {redo}")
            yield batch
        if self.fingerprint.count < k:
            raise ValueError(f"checkpoint_dir {self.where}: the loader yielded {self.fingerprint.count} batches, "
                             f"but this checkpoint has already consumed {k}; {redo}")


class _SizedWatched(_Watched):
    def __len__(self) -> int:
        return len(self.loader)


# settings that change the accumulated numbers: a resumed fit must use the checkpoint's
_FIT_SETTINGS = ("dtype", "gfim_dtype", "grad_dtype", "include_heads", "layers")


class Checkpoint:
    """A fit's ``checkpoint_dir``, held exclusively (an flock on ``lock``) inside ``with``.

    The OS drops the lock when the process ends, so a killed fit never leaves the directory locked.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._fd: int | None = None
        self.stored: StoredState | None = None
        self._model_digest: str | None = None

    def _model(self, model: torch.nn.Module) -> str:
        if self._model_digest is None:  # the weights do not change during a fit: hash them once
            self._model_digest = model_fingerprint(model)
        return self._model_digest

    def __enter__(self) -> "Checkpoint":
        # before the lock file, which would make saved factors or a score store look like a checkpoint
        kinds.prepare_dir(self.directory, kinds.CHECKPOINT, "checkpoint_dir")
        self._fd = hold_lock(self.directory / LOCK, f"checkpoint_dir {self.directory}: in use by another fit (its lock "
                             f"file {LOCK} is held); wait for that fit to finish or use another directory",
                             CheckpointBusyError)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    @property
    def exists(self) -> bool:
        return (self.directory / META).exists() and kinds.kind_of(self.directory) == kinds.CHECKPOINT

    def restore(self, config: Mapping[str, object], layers: Sequence[tuple[str, int, int]],
                model: torch.nn.Module, lora_scaling: Mapping[str, float] | None = None) -> StoredState:
        """The last committed state, checked against this fit's ``config`` (the attributor's settings as a
        dict), its ``layers`` [(name, rank, dim)], ``model`` and its ``lora_scaling`` per layer (not a
        parameter, so the model fingerprint misses it); the caller installs it."""
        stored = read_state(self.directory, (kinds.CHECKPOINT,), "a fit checkpoint")
        saved_cfg = stored.meta["config"]
        ours = dict(config)
        diff = [f"{k}: {saved_cfg.get(k)!r} saved, {ours[k]!r} now" for k in _FIT_SETTINGS if saved_cfg.get(k) != ours[k]]
        if diff:
            raise ValueError(f"checkpoint_dir {self.directory}: fitted with other settings ({'; '.join(diff)}); "
                             f"use the same settings, or another checkpoint_dir")
        if stored.meta.get("data") is None:
            raise ValueError(f"checkpoint_dir {self.directory}: {META} has no data fingerprint (written by save() "
                             f"or by an older version, not a resumable fit checkpoint); use another checkpoint_dir")
        data = json_field(stored.meta, "data", dict, str(self.directory / META))
        if json_int(data, "batches", f"{self.directory / META}: data") != stored.meta["batches_done"]:
            raise ValueError(f"{self.directory / META}: data fingerprint covers {data['batches']} batches, "
                             f"but batches_done is {stored.meta['batches_done']}")
        json_field(data, "digest", str, f"{self.directory / META}: data")
        check_layers(stored, layers)  # a shape mismatch says more than "another model"
        if stored.meta.get("model") != self._model(model):
            raise ValueError(f"checkpoint_dir {self.directory}: fitted with another model (its parameters differ "
                             f"from this model's); use another checkpoint_dir, or delete this one to fit afresh")
        saved = stored.meta.get("lora_scaling")
        if isinstance(saved, dict) and lora_scaling:
            other = [(n, saved[n], v) for n, v in lora_scaling.items()
                     if isinstance(saved.get(n), (int, float)) and not math.isclose(saved[n], v, rel_tol=1e-12)]
            if other:
                n, was, now = other[0]
                raise ValueError(f"checkpoint_dir {self.directory}: fitted with another LoRA scaling (layer {n!r}: "
                                 f"{was!r} saved, {now!r} now: lora_alpha or use_rslora changed), so the resumed "
                                 "sums would mix two scalings' gradients; use the same LoRA configuration, or "
                                 "another checkpoint_dir")
        self.stored = stored
        return stored

    def watch(self, loader: Iterable, fingerprint: DataFingerprint) -> Iterable:
        """``loader`` with every batch fingerprinted; with a restored state, checked against it."""
        expected = self.stored.meta["data"] if self.stored is not None else None
        complete = self.stored is not None and self.stored.complete
        cls = _SizedWatched if hasattr(loader, "__len__") else _Watched
        return cls(loader, fingerprint, expected, complete, self.directory)

    def commit(self, fingerprint: DataFingerprint, *, complete: bool, factors: Mapping[str, "LayerFactor"],
               config: Mapping[str, object], n_train: int, batches_done: int, model: torch.nn.Module,
               adapter_digest: str | None = None, lora_scaling: Mapping[str, float] | None = None) -> None:
        """Write the fit's state so far (``factors``, ``config`` as a dict, counts, the LoRA scaling per
        layer) as the next generation."""
        if fingerprint.count != batches_done:
            raise RuntimeError(f"internal: fingerprint of {fingerprint.count} batches at batch {batches_done}")
        write_state(self.directory, factors=factors, config=config, n_train=n_train, batches_done=batches_done,
                    complete=complete, fingerprint=fingerprint, model_digest=self._model(model),
                    adapter_digest=adapter_digest, lora_scaling=lora_scaling, kind=kinds.CHECKPOINT)
