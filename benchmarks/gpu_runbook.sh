#!/usr/bin/env bash
# GPU run book: ONE prepared invocation on a lent H100/H200 machine. Under 8 minutes, no
# internet; everything it writes lands in $OUT, which is what comes back.
#
# 1. Prepare, here, once (PyPI): the pure-Python wheels the machine's image lacks, into .whl/
#    (git-ignored):
#        bash benchmarks/gpu_runbook.sh --fetch-wheels
# 2. Run, through the device tool, from the repository root (the copy there has no .git, so
#    pass the revision: the output of `git rev-parse HEAD` here, pasted in):
#        command: GIT_REVISION=<sha> bash benchmarks/gpu_runbook.sh   carry: [".whl"]   timeout_s: 540
# 3. Files back (7, within the tool's 8): <date>-cuda-<gpu>.json and .md (the suite),
#    gpu_check.json and .md (kernels/gpu_check.py), runbook.log, nvidia-smi.txt, pip.log.
#    Copy the dated .json/.md into benchmarks/results/ and the table into
#    benchmarks/README.md (with the card and date).
#
# Time plan (the script enforces it; each part leaves a report even when cut short; the
# environment variables DEADLINE_S, GPU_CHECK_S and MODULE_TIMEOUT_S change it):
#   ~10 s wheels, nvidia-smi | <= GPU_CHECK_S=170 s kernels/gpu_check.py |
#   the suite gets what is left of DEADLINE_S (default 450 s): train first (3 torch.compile
#   runs, ~1 min each), sampling (1 compile), matmul, kernels (gpu_check has timed them
#   already), then the rest; one module at most
#   MODULE_TIMEOUT_S (default 210 s), and the 32x32 training figures survive a cut in 64x64.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

WHEELS=(webdataset==1.0.2 braceexpand==0.1.7 diffusers==0.42.1 importlib_metadata==8.7.0)
if [[ "${1:-}" == "--fetch-wheels" ]]; then
    # The image's python is 3.12 on x86-64; all four are pure Python (py3-none-any).
    mkdir -p .whl
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 -d .whl "${WHEELS[@]}"
fi

START=$(date +%s)
# DEVICE=cpu is a dry run of the plumbing at toy sizes (how it is checked without a GPU).
DEVICE=${DEVICE:-cuda}
SIZE=()
if [[ "$DEVICE" == cpu ]]; then SIZE=(--quick); export TRITON_INTERPRET=1; fi
DEADLINE_S=${DEADLINE_S:-450}
MODULE_TIMEOUT_S=${MODULE_TIMEOUT_S:-210}
GPU_CHECK_S=${GPU_CHECK_S:-170}     # 0 skips kernels/gpu_check.py
OUT=${OUT:-/tmp/ambient_gpu_runbook}
mkdir -p "$OUT"
exec > >(tee "$OUT/runbook.log") 2>&1
TEE_PID=$!
# The image's python3 on the GPU machine (.venv is not carried); the project's .venv here.
if [[ -z "${PYTHON:-}" && -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; fi
export PYTHONUNBUFFERED=1 PYTHON=${PYTHON:-python3}
elapsed() { echo $(( $(date +%s) - START )); }

echo "== $(date -u +%FT%TZ) $(hostname), revision $(git rev-parse HEAD 2>/dev/null || echo "${GIT_REVISION:-unknown}")"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed (see nvidia-smi.txt)"
head -15 "$OUT/nvidia-smi.txt"

# webdataset (bench_loaders), diffusers (the SD 2 U-Net's size in bench_distributed).
if [[ "$DEVICE" == cpu ]]; then
    echo "dry run on CPU: the project's environment already has the wheels" > "$OUT/pip.log"
elif compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl > "$OUT/pip.log" 2>&1 \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" \
        || echo "wheel install failed (see pip.log); modules needing them will record errors"
else
    echo "no .whl/ carried: bench_loaders and the SD 2 row of bench_distributed may fail" | tee "$OUT/pip.log"
fi
# The checkout is not installed there: give ambient_dist its kernels subpackage the way an
# install does (pyproject maps kernels/ to ambient_dist.kernels), in this throwaway copy only.
if ! "$PYTHON" -c "import ambient_dist.kernels" 2>/dev/null && [[ ! -e ambient_dist/kernels ]]; then
    ln -s ../kernels ambient_dist/kernels
fi
"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))"

echo "== kernels/gpu_check.py (t=$(elapsed) s)"
if (( GPU_CHECK_S <= 0 )); then
    echo "skipped (GPU_CHECK_S=0)"
elif [[ -f kernels/gpu_check.py ]]; then
    timeout -k 10 "$GPU_CHECK_S" "$PYTHON" -m ambient_dist.kernels.gpu_check --out "$OUT/gpu_check.json" \
        --budget-s $(( GPU_CHECK_S * 2 / 3 )) \
        --device "$DEVICE" "${SIZE[@]}" \
        || echo "gpu_check ended with status $? (its report, if any, is in gpu_check.json/.md)"
else
    echo "kernels/gpu_check.py not in this checkout; skipped"
fi

LEFT=$(( DEADLINE_S - $(elapsed) - 15 ))
echo "== benchmark suite, budget ${LEFT} s (t=$(elapsed) s)"
bash benchmarks/run.sh --device "$DEVICE" "${SIZE[@]}" --budget "$LEFT" \
    --timeout "$MODULE_TIMEOUT_S" --first train,sampling,matmul,kernels --results-dir "$OUT"
status=$?
echo "== done at t=$(elapsed) s, suite status $status (1 = some module failed: see the table)"
ls -la "$OUT"
# Let tee write the last lines of runbook.log before the files are collected.
exec 1>&- 2>&-
wait "$TEE_PID"
exit 0
