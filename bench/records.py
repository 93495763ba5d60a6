"""The benchmarks' JSON-lines records: one home for reading them, appending to them and folding a lane's copy back.

Every long study (bench/lds.py, quality*.py, selection.py, index_*.py, user_commands.py,
trackstar_ablation.py) appends one JSON object per line as each measurement finishes, so a kill loses at
most the measurement in progress.  A kill during the write itself can leave an unfinished last line (no
newline at the end of the file): :func:`load` leaves it out with a warning and :func:`append` cuts it off
before it writes, so the study resumes where it stopped.  A malformed line anywhere else is an error naming
the file and the line; nothing is skipped silently.

Two processes must never append to one file.  To run a study in two lanes, give the second one a copy
(``--runs /tmp/lane.jsonl``) and fold the copy's new records back once both have stopped::

    cp bench/lds_llm_runs.jsonl /tmp/lane.jsonl
    python -m bench.lds --model smollm2 --seeds 1 --retrain-seeds 0,1 &                      # lane 1
    python -m bench.lds --model smollm2 --seeds 1 --retrain-seeds 0,2 --runs /tmp/lane.jsonl  # lane 2
    python -m bench.records merge /tmp/lane.jsonl bench/lds_llm_runs.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping


def _warn(msg: str) -> None:
    print(f"[records] {msg}", file=sys.stderr, flush=True)


def load(path: Path | str) -> list[dict[str, Any]]:
    """Every record of ``path`` in file order ([] when the file does not exist); blank lines are ignored.

    An unfinished last line (no newline after it, not valid JSON: a write a kill interrupted) is left out
    with a warning.  Raises ``ValueError`` naming the file and line for any other line that is not a JSON
    object."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    out: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:  # after the last "\n": a write that never finished
                _warn(f"{path}: left out an unfinished last line ({len(line)} characters; an interrupted write)")
                continue
            raise ValueError(f"{path}:{i + 1}: not a JSON record ({exc.msg})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{i + 1}: a record must be a JSON object, found {type(rec).__name__}")
        out.append(rec)
    return out


def _cut_unfinished_tail(path: Path) -> None:
    """Cut an unfinished last line (bytes after the last newline) off ``path``: the next record must start
    on a line of its own, and what a kill left half-written was never a record."""
    with path.open("rb+") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return
        fh.seek(0)
        data = fh.read()
        keep = data.rfind(b"\n") + 1  # 0 when the file holds a single unfinished line
        _warn(f"{path}: cut off an unfinished last line ({size - keep} bytes; an interrupted write)")
        fh.truncate(keep)


def append(path: Path | str, record: Mapping[str, Any]) -> None:
    """Append ``record`` as one line of ``path`` (created with its folder when missing), flushed at once."""
    path = Path(path)
    line = json.dumps(dict(record)) + "\n"  # serialise first: a record that cannot be written leaves no trace
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        _cut_unfinished_tail(path)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()


def _key(record: Mapping[str, Any]) -> str:
    return json.dumps(record, sort_keys=True)


def merge(src: Path | str, dst: Path | str) -> int:
    """Append to ``dst`` every record of ``src`` that ``dst`` does not hold (equal as JSON, key order
    ignored), in ``src``'s order; returns how many.  ``dst`` is rewritten atomically (a temporary file
    beside it, then a rename), so an interrupted merge leaves it as it was.  No process may be appending
    to ``dst`` meanwhile."""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"merge: no records file {src}")
    have = load(dst)
    seen = {_key(r) for r in have}
    new: list[dict[str, Any]] = []
    for r in load(src):
        k = _key(r)
        if k not in seen:
            seen.add(k)
            new.append(r)
    if new:
        _write_atomic(dst, have + new)
    return len(new)


def _write_atomic(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for r in records:
                fh.write(json.dumps(dict(r)) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.records", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="append the records of SRC that DST lacks (a lane's copy folded back)")
    m.add_argument("src", type=Path)
    m.add_argument("dst", type=Path)
    args = p.parse_args(argv)
    try:
        n = merge(args.src, args.dst)
    except (FileNotFoundError, ValueError) as exc:
        print(f"python -m bench.records: {exc}", file=sys.stderr)
        return 2
    print(f"[records] {args.dst}: {n} new record{'s' * (n != 1)} from {args.src}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
