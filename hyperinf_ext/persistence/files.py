"""Atomic file writes (temporary name, fsync, rename) and checked reading of JSON and safetensors files,
with the fault-injection hook ``crash_point`` the crash-recovery tests use."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import DirectoryBusyError

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None

CRASH_ENV = "HYPERINF_EXT_TEST_CRASH_AT"
"""Test hook: ``step`` or ``step:n`` makes the process ``os._exit(77)`` at the n-th (default first)
time it reaches that step of a write (see ``crash_point``), to test recovery from a kill there."""
_crash_counts: dict[str, int] = {}


def hold_lock(path: str | Path, busy: str, error: type[DirectoryBusyError] = DirectoryBusyError) -> int | None:
    """An exclusive flock on ``path`` (created when missing), held until the returned descriptor is closed;
    the OS drops it when the process ends, so a killed holder never leaves it held.  ``error`` (a
    ``DirectoryBusyError``) with ``busy`` when another holder has it; None where flock does not exist (no
    lock, as before)."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise error(busy) from None
    return fd


WRITE_LOCK = ".write.lock"
"""The lock file a writer of saved factors, a score store or an index holds in its directory while it
writes (a dot name: no kind is recognised by it, and no writer's clean-up removes it)."""


@contextlib.contextmanager
def writing(directory: Path, what: str) -> Iterator[None]:
    """Hold ``directory/WRITE_LOCK`` for the block: a second process writing the same directory at the same
    time gets ``DirectoryBusyError`` naming ``what`` and the directory, instead of the two mixing one's
    manifest with the other's files or removing the other's unfinished file."""
    fd = hold_lock(directory / WRITE_LOCK, f"{what} {directory}: another process is writing it (its lock file "
                   f"{WRITE_LOCK} is held); wait for it to finish or choose another directory")
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


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


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex), read in 4 MiB blocks: what a run or an index records of its input and
    shard files to tell later whether they changed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


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


def _discard(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # the original error is the one worth raising


def write_bytes_atomic(path: str | Path, data: bytes, *, step: str | None = None) -> None:
    """Write ``data`` to ``path`` so that a reader (or a crash) sees the old file or the new one."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if step:
            crash_point(f"{step}_tmp")
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)  # a failed write leaves the old file and no stray temporary
        raise
    _fsync_dir(path.parent)


def save_tensors_atomic(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                        *, step: str | None = None) -> None:
    """``safetensors.torch.save_file`` to a temporary name, fsync, then rename onto ``path``."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        _fsync_file(tmp)
        if step:
            crash_point(f"{step}_tmp")
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise
    _fsync_dir(path.parent)


# ------------------------------------------------------------------------------- checked reading


def read_json(path: str | Path, what: str) -> dict:
    """A JSON object from ``path``; ``ValueError`` naming the file when missing, unreadable or corrupt."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: missing ({what})") from None
    except json.JSONDecodeError as e:  # before UnicodeDecodeError: both are ValueErrors, neither the other
        raise ValueError(f"{path}: {what} is not valid JSON ({e}); the file is corrupt or truncated") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read {what} ({e})") from None
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


def json_field(meta: Mapping, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``meta[key]``, checked to be of ``kind``; ``ValueError`` naming ``where`` otherwise."""
    if key not in meta:
        raise ValueError(f"{where}: missing key {key!r}")
    value = meta[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = "/".join(k.__name__ for k in kinds)
        raise ValueError(f"{where}: {key!r} must be {names}, got {value!r}")
    return value


def json_int(meta: Mapping, key: str, where: str, minimum: int = 0) -> int:
    """``meta[key]``, checked to be an int ≥ ``minimum``."""
    value = json_field(meta, key, int, where)
    if value < minimum:
        raise ValueError(f"{where}: {key!r} must be ≥ {minimum}, got {value}")
    return value
