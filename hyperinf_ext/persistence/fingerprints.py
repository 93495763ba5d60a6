"""Fingerprints a resumed fit is checked against: of the model's parameters and of the batches consumed."""
from __future__ import annotations

import hashlib
from typing import Any, Iterable, Mapping

import numpy as np
import torch


def full_values(t: torch.Tensor) -> torch.Tensor:
    """``t``, or for a DTensor (a weight sharded by FSDP2 ``fully_shard``) its full value gathered from every
    rank — a collective: every rank must call this for the same tensors in the same order."""
    from ..capture.layers import is_dtensor

    return t.full_tensor() if is_dtensor(t) else t


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach()
    if t.is_meta:
        return b""  # no values; its name, dtype and shape are hashed
    # a copy: .numpy() of a weight's own storage makes it non-resizable, and FSDP2 frees an unsharded
    # weight by resizing its storage to 0
    return t.to("cpu", copy=True).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of every parameter's name, dtype, shape and values: a checkpoint resumed with another model
    (same shapes, other weights) would mix two models' gradients."""
    h = hashlib.blake2b(digest_size=16)
    for name, p in model.named_parameters():
        h.update(f"{name}{p.dtype}{tuple(p.shape)}".encode())
        h.update(_tensor_bytes(p))
    return h.hexdigest()


def base_fingerprint(model: torch.nn.Module, adapter: Iterable[torch.Tensor] | None = None,
                     samples: int = 4096) -> str:
    """Hash of the model's weights other than the adapter's: names, dtypes, shapes and up to ``samples``
    evenly strided values of each, as float64 — the same checkpoint loaded in another dtype gives another
    value, so the dtype is part of it.  Sampling keeps it cheap on a large base (reading every weight of
    an 8B model would take seconds); two different checkpoints of one architecture differ in practically
    every sampled value.

    ``adapter``: the weights of the attributed layers (LoRA matrices, a captured head) to leave out, by
    identity; every other parameter is hashed whether it requires grad or not, so the model loaded frozen for scoring (``PeftModel.from_pretrained``'s default) gives the same
    value as the model it was fitted on.  ``None``: the parameters that do not require grad (the rule of
    indexes built before this one; it depends on how the model was loaded).  Weights sharded by FSDP2 are
    gathered (``full_values``, a collective: every rank calls this)."""
    skip = None if adapter is None else {id(t) for t in adapter}
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if (p.requires_grad if skip is None else id(p) in skip):
            continue
        flat = full_values(p).detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        h.update(f"{name}{p.dtype}{tuple(p.shape)}".encode())
        h.update(_tensor_bytes(flat[::step].to(torch.float64)))
    return h.hexdigest()


def adapter_fingerprint(weights: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 of the named adapter weights (names, shapes and values as float64): factors fitted on one
    adapter are wrong for another of the same shapes.  The values are compared as numbers, so the same
    weights held in float32 or float64 give the same fingerprint."""
    h = hashlib.sha256()
    for name, t in weights:
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(_tensor_bytes(t.detach().to(torch.float64)))
    return h.hexdigest()


def _batch_digest(batch: Any) -> bytes:
    """A hash of a batch: every tensor and array (dtype, shape, every value) and plain value, inside
    mappings, lists and tuples at any depth; cheap next to a forward/backward pass."""
    h = hashlib.blake2b(digest_size=16)
    if isinstance(batch, Mapping):
        items = sorted(batch.items(), key=lambda kv: str(kv[0]))
    else:
        items = [("", batch)]
    for key, value in items:
        h.update(repr(key).encode())
        _hash_value(h, value)
    return h.digest()


def _hash_value(h: Any, value: Any) -> None:
    # a list's repr elides a large tensor's middle values and numpy arrays have no repr of every value:
    # containers are walked, so two batches that differ anywhere hash apart
    if isinstance(value, torch.Tensor):
        h.update(f"{value.dtype}{tuple(value.shape)}".encode())
        h.update(_tensor_bytes(value))
    elif isinstance(value, (str, int, float, bool, type(None), bytes)):
        h.update(repr(value).encode())
    elif isinstance(value, np.ndarray):
        h.update(f"ndarray{value.dtype}{value.shape}".encode())
        if value.dtype == object:
            _hash_value(h, value.tolist())
        else:
            h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, Mapping):
        h.update(f"mapping{len(value)}".encode())
        for k, v in sorted(value.items(), key=lambda kv: str(kv[0])):
            h.update(repr(k).encode())
            _hash_value(h, v)
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__}{len(value)}".encode())
        for v in value:
            _hash_value(h, v)
    else:  # no stable byte form (a PIL image, say): its type; the tensors beside it identify the batch
        h.update(f"<{type(value).__module__}.{type(value).__qualname__}>".encode())


class DataFingerprint:
    """Chained hash of the batches a fit consumed: after k batches, h_k = H(h_{k−1} ‖ H(batch_k))."""

    def __init__(self):
        self.count = 0
        self._digest = b""

    def update(self, batch: Any) -> None:
        self._digest = hashlib.blake2b(self._digest + _batch_digest(batch), digest_size=16).digest()
        self.count += 1

    @property
    def digest(self) -> str:
        return self._digest.hex()

    def as_dict(self) -> dict:
        return {"batches": self.count, "digest": self.digest}
