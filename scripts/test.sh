#!/usr/bin/env bash
# The default test suite (CPU; Triton kernels through the interpreter and AOT-compiled for sm_80/sm_90).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` for the slow tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${HYPERINF_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRITON_INTERPRET=1
exec python -m pytest -q "$@"
