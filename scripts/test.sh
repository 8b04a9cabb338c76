#!/usr/bin/env bash
# Set up (idempotent) and run the test suite. CI (.ci/run) runs exactly this.
# Tests marked `gpu` need CUDA; on a machine without it they are deselected (their CPU twins
# run), on a GPU machine everything runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MARK=()
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  MARK=(-m "not gpu")
  export DS_ACCELERATOR=cpu
fi
exec .venv/bin/python -m pytest -q "${MARK[@]}" "$@" tests
