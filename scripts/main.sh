#!/usr/bin/env bash
# The main job on the embedded default: find mislabeled Rotten Tomatoes reviews for a LoRA-tuned
# all-MiniLM-L6-v2 with every influence method. Extra arguments go to `hyperinf-ext detect-mislabeled`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${HYPERINF_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec hyperinf-ext detect-mislabeled "$@"
