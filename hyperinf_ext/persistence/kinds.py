"""What an output directory holds, checked by every writer and loader in one place.

Every hyperinf-ext artefact directory names its kind in its manifest (``meta.json``, key ``"kind"``):
saved factors, a fit checkpoint, a streamed score store.  A CLI run's folder writes no manifest (its
report files name it: ``summary.json``, ``convergence.json``).  Manifests written before the key existed
are still recognised by their format and files (``kind_of``).

Writers call ``prepare_dir`` before writing: a directory holding another kind is refused with a
``ValueError`` naming the directory and what it holds, since writing there would destroy that artefact
(they share ``meta.json``) or leave a directory neither loader accepts.  Loaders call ``require_kind``.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

MANIFEST = "meta.json"
FACTORS = "hyperinf-ext/factors"
CHECKPOINT = "hyperinf-ext/checkpoint"
SCORE_STORE = "hyperinf-ext/score-store"
CLI_RUN = "hyperinf-ext/cli-run"
INDEX = "hyperinf-ext/index"
FOREIGN = "foreign"  # a meta.json hyperinf-ext did not write: not ours to overwrite

STORE_FORMAT = "hyperinf-ext scores (training-major npy)"
"""The ``format`` of a score store's manifest (before ``kind`` existed, the only way to tell one)."""

_NAMES = {
    FACTORS: "saved factors (HyperINF.save)",
    CHECKPOINT: "a fit checkpoint (fit(checkpoint_dir=...))",
    SCORE_STORE: "a score store (scores(out=...))",
    CLI_RUN: "a CLI run's outputs (summary.json)",
    INDEX: "a gradient index (Index.build)",
    FOREIGN: f"a {MANIFEST} that hyperinf-ext did not write",
}
_FACTORS_FILE = re.compile(r"^factors(-\d+)?\.safetensors$")
_STORE_FILE = re.compile(r"^scores(-[0-9a-f]+)?\.npy(\.partial)?$")
_CLI_FILES = ("summary.json", "convergence.json")


def describe(kind: str | None) -> str:
    """Words for ``kind`` in a message."""
    return "nothing of hyperinf-ext's" if kind is None else _NAMES.get(kind, f"an artefact of kind {kind!r}")


def _kind_from_files(names: set[str]) -> str | None:
    if "lock" in names or "grads" in names:  # only a fit's checkpoint_dir is locked or caches gradients
        return CHECKPOINT
    if any(_FACTORS_FILE.match(n) for n in names):
        return FACTORS
    if any(_STORE_FILE.match(n) for n in names):
        return SCORE_STORE
    if any(n in names for n in _CLI_FILES):
        return CLI_RUN
    return None


def kind_of(directory: str | Path) -> str | None:
    """The kind of artefact ``directory`` holds (``FACTORS``, ``CHECKPOINT``, ``SCORE_STORE``, ``CLI_RUN``,
    ``FOREIGN``), or ``None`` when it is missing, not a directory, or holds none of them."""
    d = Path(directory)
    try:
        names = {p.name for p in d.iterdir()}
    except OSError:
        return None
    meta = None
    if MANIFEST in names:
        try:
            meta = json.loads((d / MANIFEST).read_text())
        except (OSError, ValueError):
            meta = None  # unreadable or corrupt: the files still tell whose it is
    if isinstance(meta, dict):
        if isinstance(meta.get("kind"), str):
            return meta["kind"]
        fmt = meta.get("format")
        if fmt == STORE_FORMAT:
            return SCORE_STORE
        if fmt in (1, 2) and not isinstance(fmt, bool) and "layers" in meta:
            # older factor and checkpoint manifests differ only in the data fingerprint a fit records
            return CHECKPOINT if meta.get("data") is not None or "lock" in names else FACTORS
    found = _kind_from_files(names)
    if found is None and MANIFEST in names:
        return FOREIGN
    return found


def _refusal(directory: Path, found: str, wanted: str, what: str) -> ValueError:
    return ValueError(f"{what} {directory}: holds {describe(found)}, not {describe(wanted)}; writing there "
                      "would destroy it — choose another directory, or remove it first")


def check_not_other(directory: str | Path, kind: str, what: str, *, manifest: bool = True) -> None:
    """``ValueError`` when ``directory`` holds an artefact of another kind than ``kind``.  ``manifest``:
    the writer writes ``meta.json`` (so a foreign one is refused too)."""
    d = Path(directory)
    found = kind_of(d)
    if found is None or found == kind or (found == FOREIGN and not manifest):
        return
    raise _refusal(d, found, kind, what)


def check_dir(directory: str | Path, kind: str, what: str, *, manifest: bool = True,
              noun: str = "directory") -> Path:
    """Read-only: ``ValueError`` when ``directory`` is a file or holds another kind than ``kind`` (the
    first checks of :func:`prepare_dir`, for a writer that checks before its expensive work)."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise ValueError(f"{what} {d}: exists and is " + ("a file, not a directory" if noun == "directory"
                                                            else f"not a {noun}"))
    check_not_other(d, kind, what, manifest=manifest)
    return d


def prepare_dir(directory: str | Path, kind: str, what: str, *, manifest: bool = True,
                noun: str = "directory") -> Path:
    """Make ``directory`` ready for a writer of ``kind``: refused when it is a file, holds another kind,
    cannot be created or is not writable — each a ``ValueError`` naming ``what`` and the directory
    (called a ``noun``: the command line says "folder")."""
    d = check_dir(directory, kind, what, manifest=manifest, noun=noun)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{what} {d}: cannot create the {noun} ({e.strerror or e})") from None
    # os.access answers for the real uid and ignores read-only mounts; a real write is the only proof
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=d)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{what} {d}: the {noun} is not writable ({e.strerror or e})") from None
    return d


def require_kind(directory: str | Path, accepted: tuple[str, ...], what: str) -> str:
    """The kind of ``directory`` when it is one of ``accepted``; otherwise a ``ValueError`` naming the
    directory, what it holds and what was expected (``what``)."""
    d = Path(directory)
    if not d.exists():
        raise ValueError(f"{d}: missing (expected {what})")
    if not d.is_dir():
        raise ValueError(f"{d}: is a file, not a directory (expected {what})")
    found = kind_of(d)
    if found in accepted:
        return found
    if found is None:
        raise ValueError(f"{d}: holds no {what} ({MANIFEST} missing)")
    raise ValueError(f"{d}: holds {describe(found)}, not {what}")


def manifest_kind(kind: str) -> dict[str, str]:
    """The manifest entry that names ``kind``."""
    if kind not in (FACTORS, CHECKPOINT, SCORE_STORE, INDEX):
        raise ValueError(f"internal: no manifest for kind {kind!r}")
    return {"kind": kind}
