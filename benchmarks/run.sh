#!/usr/bin/env bash
# Run the benchmark suite with the project's Python:
#   benchmarks/run.sh [--quick|--full] [--device cpu|cuda] [--only NAME] [--out FILE]
# Uses <repo>/.venv if it exists (the pinned environment), else python3 on PATH (a GPU
# machine's own PyTorch). All options go to benchmarks/run_all.py; see its --help.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# $PYTHON, if set, wins (e.g. PYTHON=python3 on a machine that carried a .venv it cannot run).
if [[ -n "${PYTHON:-}" ]]; then
    python="$PYTHON"
elif [[ -x "$repo/.venv/bin/python" ]]; then
    python="$repo/.venv/bin/python"
else
    python=python3
fi
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" benchmarks/run_all.py "$@"
