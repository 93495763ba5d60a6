"""Every repository path or module that a comment, docstring or document names exists (issue #20).

Files move (issue #21 moved most of the package); a comment that still points at the old place sends
the reader nowhere.  Scanned: every tracked text file.  Checked:

- paths whose first part is a folder of this repository (``hyperinf_ext/solvers/auto.py``,
  ``bench/LDS.md``, ``tests/tiny_bert.py``) or of the package (``solvers/auto.py``), resolved from the
  root, from the package and from the naming file's folder;
- bare file names of code (``persistence.py``, ``gfim.cpp``, ``test.sh``): some tracked file has it;
- dotted module paths (``hyperinf_ext.solvers.auto``, ``bench.lds``): the module exists and, where the
  path goes on past it, the module's source defines or imports the next name.

Names of files the program writes (``report.md``, ``scores.jsonl``) or that live elsewhere
(``ATen/ATen.h``, ``kronfluence/module/linear.py``) do not start with a folder of this repository and
are not checked.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "hyperinf_ext"
TEXT_SUFFIXES = (".py", ".md", ".sh", ".cpp", ".h", ".toml", ".cfg", ".txt")
CODE_SUFFIXES = ("py", "cpp", "h", "sh")

# Named on purpose although absent from the tree, each with its reason.
ABSENT_ON_PURPOSE = {
    "bench/GPU_RESULTS.md": "written by the documented GPU-check procedure when a device is lent",
    "my_script.py": "the user's own script in a README example",
    "Python.h": "CPython's header",
    "immintrin.h": "the compiler's intrinsics header",
    f"{PACKAGE}._C": "the C++ extension that setup.py builds from csrc/",
}

PATH_RE = re.compile(r"(?<![\w./$-])((?:[\w.-]+/)*[\w-]+\.(?:py|md|sh|cpp|h|toml|png|jsonl|json|txt))(?![\w/])")
MODULE_RE = re.compile(rf"(?<![\w./-])((?:{PACKAGE}|bench)(?:\.[A-Za-z_]\w*)+)")


def _tracked() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [f for f in out if f and (ROOT / f).is_file()]


TRACKED = _tracked()
TRACKED_SET = set(TRACKED)
TOP_DIRS = {f.split("/", 1)[0] for f in TRACKED if "/" in f}
PACKAGE_DIRS = {f.split("/")[1] for f in TRACKED if f.startswith(PACKAGE + "/") and f.count("/") >= 2}
BASENAMES = {os.path.basename(f) for f in TRACKED}


def _path_exists(ref: str, naming_file: str) -> bool:
    if ref in ABSENT_ON_PURPOSE:
        return True
    if "/" not in ref:
        return ref in BASENAMES
    bases = ["", PACKAGE + "/", os.path.dirname(naming_file) + "/"]
    for base in bases:
        p = os.path.normpath(base + ref)
        if p in TRACKED_SET or any(f.startswith(p + "/") for f in TRACKED):
            return True
    return False


def _module_file(parts: list[str]) -> Path | None:
    # hyperinf_ext.kernels is the root's kernels/ folder (kernels/README.md)
    if parts[:2] == [PACKAGE, "kernels"]:
        parts = ["kernels"] + parts[2:]
    base = ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    if base.is_dir() and any(base.glob("*.py")):
        return base  # a package without __init__.py (kernels/)
    return None


def _module_ok(dotted: str) -> bool:
    parts = dotted.split(".")
    if dotted in ABSENT_ON_PURPOSE or re.fullmatch(r"__\w+__", parts[-1]):
        return True
    for cut in range(len(parts), 0, -1):
        found = _module_file(parts[:cut])
        if found is None:
            continue
        if cut == len(parts):
            return True
        if found.is_dir():
            return False
        name = parts[cut]
        source = found.read_text(errors="replace")
        return re.search(rf"(?m)(^\s*(def|class)\s+{name}\b|^\s*{name}\s*[:=]|\bimport\b.*\b{name}\b|^\s+{name},?$)",
                         source) is not None
    return False


def _refs():
    for f in TRACKED:
        if not f.endswith(TEXT_SUFFIXES) or f == "tests/repo/test_doc_paths.py":
            continue
        text = (ROOT / f).read_text(errors="replace")
        for lineno, line in enumerate(text.splitlines(), 1):
            for m in PATH_RE.finditer(line):
                ref = m.group(1).lstrip("./") if m.group(1).startswith("./") else m.group(1)
                head = ref.split("/", 1)[0]
                if "/" in ref and head not in TOP_DIRS and head not in PACKAGE_DIRS:
                    continue  # another project's or the user's path
                if "/" not in ref and ref.rsplit(".", 1)[1] not in CODE_SUFFIXES:
                    continue  # an output file's name
                yield f, lineno, ref, _path_exists(ref, f)
            for m in MODULE_RE.finditer(line):
                dotted = m.group(1).rstrip(".")
                if dotted.endswith((".py", ".md")):
                    continue
                yield f, lineno, dotted, _module_ok(dotted)


def test_named_paths_and_modules_exist():
    missing = [f"{f}:{n}: {ref}" for f, n, ref, ok in _refs() if not ok]
    assert not missing, "names of paths or modules that do not exist:\n" + "\n".join(missing)


def test_the_check_catches_a_stale_name():
    assert not _path_exists("hyperinf_ext/cpp_ops.py", "csrc/hyperinf_ops.cpp")
    assert not _path_exists("capture.py", "hyperinf_ext/integrations/dattri.py")
    assert _path_exists("solvers/auto.py", "README.md")
    assert not _module_ok(f"{PACKAGE}.tasks.no_such_module")
    assert not _module_ok(f"{PACKAGE}.solvers.auto.no_such_function")
    assert _module_ok(f"{PACKAGE}.solvers.auto")
