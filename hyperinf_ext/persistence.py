"""Reading and writing fitted factors, fit checkpoints and score files (safetensors + JSON).

A factor directory (``HyperINF.save``) and a fit's ``checkpoint_dir`` share one layout::

    meta.json                        the manifest: format, configuration, counts, per-layer (r, d),
                                     the data fingerprint and the name of the factors file
    factors-<generation>.safetensors per-layer GFIM sums Σ g_iᵀg_i [d, d], rank-side sums [r, r] and,
                                     from ``save``, the method's inverses [d, d]
    grads/                           (checkpoints) the disk gradient cache, see cache.py
    lock                             (checkpoints) flock-ed by the fit using the directory

A commit writes a complete factors file under a fresh generation name, then replaces ``meta.json``
(which names it) with one ``os.replace``: a reader sees the previous commit or the new one, never
factors of one and counts of the other.  Every file is written to a temporary name, fsync-ed and
renamed.  Everything read back is checked (JSON structure, tensor names, shapes against the model,
finiteness) and a problem raises ``ValueError`` naming the file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .methods import LayerFactor, make_method

if TYPE_CHECKING:  # the attributor imports this module
    from .attributor import HyperINF

try:
    import fcntl
except ImportError:  # not POSIX: checkpoints are not locked
    fcntl = None

FORMAT_VERSION = 2
"""Format 2: meta.json names its generation's factors file; format 1 (read only) used factors.safetensors."""
META = "meta.json"
LOCK = "lock"
_FACTORS_RE = re.compile(r"^factors-(\d+)\.safetensors$")

CRASH_ENV = "HYPERINF_EXT_TEST_CRASH_AT"
"""Test hook: ``step`` or ``step:n`` makes the process ``os._exit(77)`` at the n-th (default first)
time it reaches that step of a write (see ``crash_point``), to test recovery from a kill there."""
_crash_counts: dict[str, int] = {}


class CheckpointBusyError(RuntimeError):
    """Another fit holds the checkpoint directory's lock."""


def crash_point(step: str) -> None:
    """Exit the process at once when ``HYPERINF_EXT_TEST_CRASH_AT`` names ``step`` (fault-injection tests)."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != step:
        return
    _crash_counts[step] = _crash_counts.get(step, 0) + 1
    if _crash_counts[step] == int(nth or 1):
        os._exit(77)


# ------------------------------------------------------------------------------ atomic file writes


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # e.g. platforms without directory handles: the rename itself is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def write_bytes_atomic(path: str | Path, data: bytes, *, step: str | None = None) -> None:
    """Write ``data`` to ``path`` so that a reader (or a crash) sees the old file or the new one."""
    path = Path(path)
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if step:
        crash_point(f"{step}_tmp")
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_tensors_atomic(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                        *, step: str | None = None) -> None:
    """``safetensors.torch.save_file`` to a temporary name, fsync, then rename onto ``path``."""
    path = Path(path)
    tmp = _tmp_name(path)
    save_file(tensors, str(tmp), metadata=metadata)
    _fsync_file(tmp)
    if step:
        crash_point(f"{step}_tmp")
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ------------------------------------------------------------------------------- checked reading


def read_json(path: str | Path, what: str) -> dict:
    """A JSON object from ``path``; ``ValueError`` naming the file when missing, unreadable or corrupt."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ValueError(f"{path}: missing ({what})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read {what} ({e})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: {what} is not valid JSON ({e}); the file is corrupt or truncated") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: {what} must be a JSON object, got {type(obj).__name__}")
    return obj


def read_tensors(path: str | Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; ``ValueError`` naming the file when it is unreadable."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: missing ({what})")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types, OSError or ValueError
        raise ValueError(f"{path}: not a readable safetensors file ({what}; it may be empty or truncated): "
                         f"{type(e).__name__}: {e}") from None
    return tensors, metadata


def _field(meta: Mapping, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in meta:
        raise ValueError(f"{where}: missing key {key!r}")
    value = meta[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = "/".join(k.__name__ for k in kinds)
        raise ValueError(f"{where}: {key!r} must be {names}, got {value!r}")
    return value


def _nonneg_int(meta: Mapping, key: str, where: str, minimum: int = 0) -> int:
    value = _field(meta, key, int, where)
    if value < minimum:
        raise ValueError(f"{where}: {key!r} must be ≥ {minimum}, got {value}")
    return value


@dataclasses.dataclass
class StoredState:
    """A committed state read back and checked against itself (not yet against a model)."""

    directory: Path
    meta: dict
    factors_path: Path
    layers: list[dict]  # {"name", "rank", "dim", "count", "damping"} per layer, in stored order
    tensors: dict[str, torch.Tensor]

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete", True))  # format 1 stored finished fits only

    @property
    def method_state(self) -> dict[str, torch.Tensor]:
        return {k[len("method_state."):]: v for k, v in self.tensors.items() if k.startswith("method_state.")}


def read_state(directory: str | Path) -> StoredState:
    """Read and check the committed state of a factor or checkpoint directory.

    Checks: meta.json's keys and types, that the factors file belongs to this commit (generation),
    that every layer has its tensors with the shapes meta.json states ([d, d] GFIM sums and inverses,
    [r, r] rank sums) and that every tensor is finite.
    """
    directory = Path(directory)
    meta_path = directory / META
    if not meta_path.exists():
        raise ValueError(f"{directory}: no saved HyperINF factors ({META} missing)")
    meta = read_json(meta_path, "HyperINF metadata")
    where = str(meta_path)
    fmt = meta.get("format")
    if fmt not in (1, FORMAT_VERSION):
        raise ValueError(f"{where}: unsupported factor format {fmt!r} (this version reads 1 and {FORMAT_VERSION})")
    _field(meta, "config", dict, where)
    _nonneg_int(meta, "n_train", where)
    _nonneg_int(meta, "batches_done", where)
    layers = _field(meta, "layers", list, where)
    for i, layer in enumerate(layers):
        lw = f"{where}: layers[{i}]"
        if not isinstance(layer, dict):
            raise ValueError(f"{lw}: must be an object, got {layer!r}")
        _field(layer, "name", str, lw)
        _nonneg_int(layer, "rank", lw, 1)
        _nonneg_int(layer, "dim", lw, 1)
        _nonneg_int(layer, "count", lw)
        damping = _field(layer, "damping", (int, float), lw)
        if not (math.isfinite(damping) and damping >= 0):
            raise ValueError(f"{lw}: 'damping' must be finite and ≥ 0, got {damping!r}")
    if fmt == 1:
        factors_name, generation = "factors.safetensors", None
    else:
        factors_name = _field(meta, "factors", str, where)
        generation = _nonneg_int(meta, "generation", where, 1)
        _field(meta, "complete", bool, where)
        if _FACTORS_RE.match(factors_name) is None:
            raise ValueError(f"{where}: 'factors' must name a factors-<generation>.safetensors file, got {factors_name!r}")
    factors_path = directory / factors_name
    tensors, tmeta = read_tensors(factors_path, "HyperINF factors")
    if generation is not None and tmeta.get("generation") != str(generation):
        raise ValueError(f"{factors_path}: generation {tmeta.get('generation')!r} does not match {META}'s "
                         f"{generation}; the directory mixes two commits")
    for layer in layers:
        n, r, d = layer["name"], layer["rank"], layer["dim"]
        expected = {f"gfim_sum.{n}": (d, d), f"rank_sum.{n}": (r, r), f"method_state.{n}": (d, d)}
        if f"gfim_sum.{n}" not in tensors:
            raise ValueError(f"{factors_path}: missing tensor 'gfim_sum.{n}' for layer {n!r}")
        for key, shape in expected.items():
            t = tensors.get(key)
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"{factors_path}: tensor {key!r} has shape {tuple(t.shape)}, but {META} "
                                 f"states r={r}, d={d} for layer {n!r} (expected {shape})")
    known = {f"{kind}.{l['name']}" for l in layers for kind in ("gfim_sum", "rank_sum", "method_state")}
    unknown = sorted(set(tensors) - known)
    if unknown:
        raise ValueError(f"{factors_path}: tensors {unknown[:3]} belong to no layer listed in {META}")
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise ValueError(f"{factors_path}: tensor {key!r} has dtype {t.dtype}, expected a floating dtype")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{factors_path}: tensor {key!r} contains NaN or Inf; the saved factors are corrupt")
    return StoredState(directory, meta, factors_path, layers, tensors)


def check_layers(attr: "HyperINF", stored: StoredState) -> None:
    """``ValueError`` unless ``stored`` has ``attr``'s layers, in its order, with its (r, d) shapes."""
    model_layers = {l.name: l for l in attr.layers}
    names = list(model_layers)
    saved = [l["name"] for l in stored.layers]
    if saved != names:
        missing = [n for n in names if n not in saved][:3]
        extra = [n for n in saved if n not in model_layers][:3]
        raise ValueError(
            f"{stored.directory}: the saved layers do not match the model's ({len(saved)} saved, {len(names)} in "
            f"the model; model layers not saved: {missing}; saved layers not in the model: {extra}"
            + ("; same names in another order" if not missing and not extra else "") + ")"
        )
    for layer in stored.layers:
        m = model_layers[layer["name"]]
        if (layer["rank"], layer["dim"]) != (m.rank, m.dim):
            raise ValueError(
                f"{stored.directory}: layer {layer['name']!r}: saved GFIM shape [{layer['dim']}, {layer['dim']}] with "
                f"rank {layer['rank']} (gradient [r, d] = [{layer['rank']}, {layer['dim']}]), but the model's layer "
                f"has gradient shape [{m.rank}, {m.dim}]; was the model built with another LoRA rank or hidden size?"
            )


def apply_state(attr: "HyperINF", stored: StoredState) -> None:
    """Install ``stored`` into ``attr`` after checking every layer's name and shape against its model."""
    check_layers(attr, stored)
    fdtype = attr.fdtype
    t = stored.tensors
    attr.factors = {
        l["name"]: LayerFactor(
            l["name"], l["rank"], l["dim"], t[f"gfim_sum.{l['name']}"].to(fdtype), l["count"], float(l["damping"]),
            rank_sum=t[f"rank_sum.{l['name']}"].to(fdtype) if f"rank_sum.{l['name']}" in t else None,
        )
        for l in stored.layers
    }
    attr.n_train, attr.batches_done = stored.meta["n_train"], stored.meta["batches_done"]


# ---------------------------------------------------------------------------------------- writing


def _next_generation(directory: Path) -> int:
    gens = [int(m.group(1)) for p in directory.iterdir() if (m := _FACTORS_RE.match(p.name))]
    return max(gens, default=0) + 1


def write_state(
    attr: "HyperINF",
    directory: str | Path,
    *,
    complete: bool,
    method_state: Mapping[str, torch.Tensor] | None = None,
    fingerprint: "DataFingerprint | None" = None,
    model_digest: str | None = None,
) -> Path:
    """Commit ``attr``'s factors (and ``method_state``, per-layer [d, d]) to ``directory`` atomically.

    The factors go to a new ``factors-<generation>.safetensors``; replacing meta.json is the commit;
    files of older generations are removed afterwards.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for n, f in attr.factors.items():
        tensors[f"gfim_sum.{n}"] = f.gfim_sum.cpu().contiguous()
        if f.rank_sum is not None:
            tensors[f"rank_sum.{n}"] = f.rank_sum.cpu().contiguous()
    for n, x in (method_state or {}).items():
        tensors[f"method_state.{n}"] = x.cpu().contiguous()
    for key, t in tensors.items():
        # never commit a state that load would refuse
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{key}: contains NaN or Inf; refusing to write it to {directory}")
    generation = _next_generation(directory)
    name = f"factors-{generation:06d}.safetensors"
    save_tensors_atomic(directory / name, tensors, {"generation": str(generation)}, step="factors")
    crash_point("factors_written")
    meta = {
        "format": FORMAT_VERSION,
        "generation": generation,
        "factors": name,
        "complete": complete,
        "config": dataclasses.asdict(attr.config),
        "n_train": attr.n_train,
        "batches_done": attr.batches_done,
        "data": fingerprint.as_dict() if fingerprint is not None else None,
        "model": model_digest,
        "layers": [
            {"name": f.name, "rank": f.rank, "dim": f.dim, "count": f.count, "damping": f.damping}
            for f in attr.factors.values()
        ],
    }
    write_bytes_atomic(directory / META, json.dumps(meta, indent=1).encode(), step="meta")
    crash_point("meta_committed")
    for p in directory.iterdir():  # older generations and temporaries left by killed writers
        if p.name != name and (p.name.startswith(("factors-", f"{META}.tmp")) or p.name == "factors.safetensors"):
            p.unlink(missing_ok=True)
    return directory


# ----------------------------------------------------------------------------- save / load / scores


def save(attr: "HyperINF", directory: str | Path) -> Path:
    """``HyperINF.save``: factors, the current method's inverses and the configuration."""
    attr._require_fit()
    attr._prepare()  # the stored inverses must belong to the stored factors and configuration
    state = getattr(attr.method, "state", None) or {}
    return write_state(attr, directory, complete=True, method_state=state)


def load(cls: type, directory: str | Path, model: torch.nn.Module, *, loss_fn=None, progress: bool = True) -> "HyperINF":
    """``HyperINF.load``: rebuild an attributor from ``save`` (or a finished fit checkpoint) for ``model``."""
    from .attributor import HyperINFConfig

    stored = read_state(directory)
    if not stored.complete:
        raise ValueError(f"{stored.directory}: an unfinished fit checkpoint ({stored.meta['batches_done']} batches); "
                         f"finish it with fit(train_loader, checkpoint_dir=...) before loading it")
    try:
        config = HyperINFConfig(**stored.meta["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{stored.directory / META}: invalid 'config': {e}") from None
    attr = cls(model, loss_fn=loss_fn, progress=progress, config=config)
    apply_state(attr, stored)
    prepare_from_stored(attr, stored.method_state)
    return attr


def prepare_from_stored(attr: "HyperINF", method_state: Mapping[str, torch.Tensor]) -> None:
    """Reuse stored inverses bit for bit when they cover every layer; otherwise prepare afresh."""
    attr._prepared_for = None
    if method_state and set(method_state) == set(attr.factors):
        cfg = attr.config
        attr.method = make_method(cfg.method, backend=cfg.backend, tol=cfg.tol, depth=cfg.lissa_depth,
                                  scale_factor=cfg.lissa_scale_factor, solver=cfg.solver)
        attr.method.state = {n: t.to(attr.fdtype) for n, t in method_state.items()}
        attr._prepared_for = attr._prepare_key()
    else:
        attr._prepare()


def save_scores(path: str | Path, scores: torch.Tensor, sign: str, **metadata: str) -> None:
    """Write a score tensor (any shape) to a safetensors file atomically; metadata values are strings."""
    if not isinstance(scores, torch.Tensor):
        raise ValueError(f"scores: expected a tensor, got {type(scores).__name__}")
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise ValueError(f"metadata: values must be strings ({bad[0]!r} is {type(metadata[bad[0]]).__name__})")
    save_tensors_atomic(path, {"scores": scores.detach().cpu().contiguous()}, {"sign": sign, **metadata})


def load_scores(path: str | Path) -> torch.Tensor:
    """The score tensor written by ``save_scores``."""
    tensors, _ = read_tensors(path, "scores")
    if "scores" not in tensors:
        raise ValueError(f"{path}: no tensor named 'scores' (found {sorted(tensors)[:3]})")
    return tensors["scores"]


# -------------------------------------------------------------------------------------- checkpoints


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach()
    if t.is_meta:
        return b""  # no values; its name, dtype and shape are hashed
    return t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of every parameter's name, dtype, shape and values: a checkpoint resumed with another model
    (same shapes, other weights) would mix two models' gradients."""
    h = hashlib.blake2b(digest_size=16)
    for name, p in model.named_parameters():
        h.update(f"{name}{p.dtype}{tuple(p.shape)}".encode())
        h.update(_tensor_bytes(p))
    return h.hexdigest()


def _batch_digest(batch: Any) -> bytes:
    """A hash of a batch's tensors (names, dtypes, shapes, values) and plain values; cheap next to a
    forward/backward pass."""
    h = hashlib.blake2b(digest_size=16)
    if isinstance(batch, Mapping):
        items = sorted(batch.items(), key=lambda kv: str(kv[0]))
    else:
        items = [("", batch)]
    for key, value in items:
        h.update(repr(key).encode())
        if isinstance(value, torch.Tensor):
            h.update(f"{value.dtype}{tuple(value.shape)}".encode())
            h.update(_tensor_bytes(value))
        elif isinstance(value, (str, int, float, bool, type(None), list, tuple)):
            h.update(repr(value).encode())
        # other objects have no stable byte form; the tensors identify the batch
    return h.digest()


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

    def _model(self, attr: "HyperINF") -> str:
        if self._model_digest is None:  # the weights do not change during a fit: hash them once
            self._model_digest = model_fingerprint(attr.model)
        return self._model_digest

    def __enter__(self) -> "Checkpoint":
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"checkpoint_dir {self.directory}: cannot create it ({e})") from None
        if fcntl is not None:
            fd = os.open(self.directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise CheckpointBusyError(
                    f"checkpoint_dir {self.directory}: in use by another fit (its lock file {LOCK} is held); "
                    f"wait for that fit to finish or use another directory"
                ) from None
            self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    @property
    def exists(self) -> bool:
        return (self.directory / META).exists()

    def restore(self, attr: "HyperINF") -> StoredState:
        """Install the last committed state into ``attr`` (factors, counts); check it fits ``attr``."""
        stored = read_state(self.directory)
        saved_cfg = stored.meta["config"]
        ours = dataclasses.asdict(attr.config)
        diff = [f"{k}: {saved_cfg.get(k)!r} saved, {ours[k]!r} now" for k in _FIT_SETTINGS if saved_cfg.get(k) != ours[k]]
        if diff:
            raise ValueError(f"checkpoint_dir {self.directory}: fitted with other settings ({'; '.join(diff)}); "
                             f"use the same settings, or another checkpoint_dir")
        if stored.meta.get("data") is None:
            raise ValueError(f"checkpoint_dir {self.directory}: {META} has no data fingerprint (written by save() "
                             f"or by an older version, not a resumable fit checkpoint); use another checkpoint_dir")
        data = _field(stored.meta, "data", dict, str(self.directory / META))
        if _nonneg_int(data, "batches", f"{self.directory / META}: data") != stored.meta["batches_done"]:
            raise ValueError(f"{self.directory / META}: data fingerprint covers {data['batches']} batches, "
                             f"but batches_done is {stored.meta['batches_done']}")
        _field(data, "digest", str, f"{self.directory / META}: data")
        check_layers(attr, stored)  # a shape mismatch says more than "another model"
        if stored.meta.get("model") != self._model(attr):
            raise ValueError(f"checkpoint_dir {self.directory}: fitted with another model (its parameters differ "
                             f"from this model's); use another checkpoint_dir, or delete this one to fit afresh")
        apply_state(attr, stored)
        self.stored = stored
        return stored

    def watch(self, loader: Iterable, fingerprint: DataFingerprint) -> Iterable:
        """``loader`` with every batch fingerprinted; with a restored state, checked against it."""
        expected = self.stored.meta["data"] if self.stored is not None else None
        complete = self.stored is not None and self.stored.complete
        cls = _SizedWatched if hasattr(loader, "__len__") else _Watched
        return cls(loader, fingerprint, expected, complete, self.directory)

    def commit(self, attr: "HyperINF", fingerprint: DataFingerprint, *, complete: bool) -> None:
        if fingerprint.count != attr.batches_done:
            raise RuntimeError(f"internal: fingerprint of {fingerprint.count} batches at batch {attr.batches_done}")
        write_state(attr, self.directory, complete=complete, fingerprint=fingerprint, model_digest=self._model(attr))
