#!/usr/bin/env bash
# The default test suite (CPU; Triton kernels through the interpreter and AOT-compiled for sm_80/sm_90).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` for the slow tests.
# Prints the resolved versions first (and what changed since scripts/known-good.txt); a green run of the
# whole default suite records them there (commit the change: it is the new known-good set).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${HYPERINF_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRITON_INTERPRET=1
python scripts/versions.py
python -m pytest -q "$@"
if [ $# -eq 0 ] && [ -z "${HYPERINF_CONSTRAINTS:-}" ]; then
  python scripts/versions.py --record
fi
