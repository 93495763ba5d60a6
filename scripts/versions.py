"""The versions a test run resolved, against the last set known to pass (issue #20).

    python scripts/versions.py            # print the resolved versions and what changed since known-good
    python scripts/versions.py --record   # after a green run: write them to scripts/known-good.txt

``scripts/known-good.txt`` is a pip constraints file (``name==version``, one a line): the set the last
green run of ``bash scripts/test.sh`` resolved on a fresh virtual environment.  To reproduce it:
``HYPERINF_CONSTRAINTS=scripts/known-good.txt bash scripts/test.sh`` (scripts/setup.sh passes it to
every ``pip install`` as ``-c``).  Standard library only: runs in any environment.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import platform
import re
import sys
from pathlib import Path

KNOWN_GOOD = Path(__file__).resolve().parent / "known-good.txt"
SELF = "hyperinf-ext"
# Shown first: the ones whose releases have broken this project or decide its numerics.
KEY = ("torch", "triton", "transformers", "kernels", "peft", "huggingface-hub", "tokenizers", "safetensors",
       "numpy", "scipy", "accelerate", "dattri")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def resolved() -> dict[str, str]:
    """{normalised distribution name: version} of this environment, without hyperinf-ext itself."""
    out = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name and _norm(name) != SELF:
            # a local label (2.13.0+cpu) names one build; the constraint ==2.13.0 accepts any of them
            out[_norm(name)] = dist.version.split("+", 1)[0]
    return dict(sorted(out.items()))


def read_known_good(path: Path = KNOWN_GOOD) -> dict[str, str]:
    pins = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                name, version = line.split("==", 1)
                pins[_norm(name)] = version.strip()
    return pins


def changes(now: dict[str, str], known: dict[str, str]) -> list[str]:
    """Lines 'name old → new' for every distribution added, removed or moved since ``known``."""
    lines = []
    for name in sorted(set(now) | set(known)):
        old, new = known.get(name), now.get(name)
        if old != new:
            lines.append(f"{name} {old or '(absent)'} → {new or '(absent)'}")
    return lines


def report(now: dict[str, str], known: dict[str, str]) -> str:
    head = [f"python {platform.python_version()} ({platform.machine()})"]
    head += [f"{k} {now[k]}" for k in KEY if k in now]
    text = "[versions] " + ", ".join(head)
    moved = changes(now, known)
    if not known:
        text += "\n[versions] no scripts/known-good.txt to compare with"
    elif moved:
        text += f"\n[versions] {len(moved)} changed since the last known-good set (scripts/known-good.txt):"
        text += "".join(f"\n[versions]   {m}" for m in moved)
    else:
        text += "\n[versions] identical to the last known-good set (scripts/known-good.txt)"
    return text


def record(now: dict[str, str], path: Path = KNOWN_GOOD) -> None:
    body = "".join(f"{k}=={v}\n" for k, v in now.items())
    header = ("# The versions the last green `bash scripts/test.sh` resolved (scripts/versions.py --record).\n"
              "# Reproduce: HYPERINF_CONSTRAINTS=scripts/known-good.txt bash scripts/test.sh\n")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(header + body)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--record", action="store_true", help="write this environment's versions as known-good")
    args = p.parse_args(argv)
    now, known = resolved(), read_known_good()
    if args.record:
        moved = changes(now, known)
        record(now)
        print(f"[versions] recorded {len(now)} versions in scripts/known-good.txt ({len(moved)} changed)")
    else:
        print(report(now, known))
    return 0


if __name__ == "__main__":
    sys.exit(main())
