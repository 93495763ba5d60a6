"""The output folder of a task, checked before any slow work so that no fine-tuning is lost to it."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ...persistence import kinds

__all__ = ["prepare_output_dir"]


def prepare_output_dir(path: str | Path, option: str = "--out") -> Path:
    """Create ``path`` if needed and make sure files can be written into it.

    A folder holding saved factors, a fit checkpoint or a score store is refused: the run's files would
    sit among them and the task overwrites what it finds under its own names.  A previous run's outputs
    (the CLI's own kind, told by its summary.json) are replaced file by file.

    Raises:
        ValueError: ``path`` exists and is not a folder, holds another kind of artefact, cannot be
            created, or is not writable (one line naming ``option`` and the path).
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{option} {out}: exists and is not a folder")
    kinds.check_not_other(out, kinds.CLI_RUN, option, manifest=False)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{option} {out}: cannot create the folder ({exc.strerror or exc})") from None
    # os.access answers for the real uid and ignores read-only mounts; a real write is the only proof
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"{option} {out}: the folder is not writable ({exc.strerror or exc})") from None
    return out
