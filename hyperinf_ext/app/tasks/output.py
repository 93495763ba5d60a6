"""The output folder of a task: checked before any slow work so that no fine-tuning is lost to it, and
filled all at once (``staged_outputs``) so that a failed rerun never mixes its files with the last run's."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ...persistence import kinds

__all__ = ["OUTPUT_NAMES", "prepare_output_dir", "staged_outputs"]

OUTPUT_NAMES = frozenset({
    "summary.json", "detection.png", "scores.csv", "selected.csv", "topk.safetensors",
    "attribution.jsonl", "report.md", "report.html", "convergence.png", "convergence.csv", "convergence.json",
    "ranked.jsonl", "ranked.csv", "ranked.json", "selected.jsonl", "selected.json",
})
"""Every file a CLI task writes into its folder: in a previous run's folder, those the new run does not
write are that run's leftovers (a ``--top-k`` file, another task's report) and are removed with it."""
_STAGING = ".hyperinf-staging-"


def prepare_output_dir(path: str | Path, option: str = "--out") -> Path:
    """Create ``path`` if needed and make sure files can be written into it.

    A folder holding saved factors, a fit checkpoint or a score store is refused: the run's files would
    sit among them and the task overwrites what it finds under its own names.  A previous run's outputs
    (the CLI's own kind, told by its summary.json) is replaced as a whole by ``staged_outputs``.

    Raises:
        ValueError: ``path`` exists and is not a folder, holds another kind of artefact, cannot be
            created, or is not writable (one line naming ``option`` and the path).
    """
    return kinds.prepare_dir(path, kinds.CLI_RUN, option, manifest=False, noun="folder")


@contextmanager
def staged_outputs(out: Path) -> Iterator[Path]:
    """Yield an empty staging folder for a task's files; on success they replace the run in ``out``.

    The staging folder is a hidden folder inside ``out`` (``prepare_output_dir`` proved it writable, and
    on the same file system every move is a rename).  Only when the block ends without an exception
    are the staged files moved into ``out``; a previous run's files under the same names are replaced,
    and its other outputs (``OUTPUT_NAMES``) removed.  If the block raises, or a move fails, the staging
    folder is deleted and ``out`` holds exactly what it held before.  The caller reports the final paths
    (``out / name``), never the staged ones.
    """
    stage = Path(tempfile.mkdtemp(prefix=_STAGING, dir=out))
    try:
        yield stage
        _commit(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _commit(stage: Path, out: Path) -> None:
    new = sorted(p.name for p in stage.iterdir() if p.is_file())
    # stale files are removed only from a folder the CLI wrote: a user's own scores.csv beside a first
    # run is not a previous run's output
    stale = sorted(OUTPUT_NAMES - set(new)) if kinds.kind_of(out) == kinds.CLI_RUN else []
    # the previous run's files wait in the staging folder until every new file is in place, so that a
    # failed move can put them all back
    backup = stage / ".previous"
    backup.mkdir()
    moved_old: list[str] = []
    placed: list[str] = []
    try:
        for name in [*new, *stale]:
            if (out / name).is_file() or (out / name).is_symlink():
                os.replace(out / name, backup / name)
                moved_old.append(name)
        for name in new:
            os.replace(stage / name, out / name)
            placed.append(name)
    except BaseException:
        for name in placed:
            try:
                os.unlink(out / name)
            except OSError:
                pass
        for name in moved_old:
            os.replace(backup / name, out / name)
        raise
