#!/usr/bin/env bash
# The README's first command: set up, make the 300-image Fashion-MNIST shards (with their one
# fixed noisy copy each, plus 300 held-out images for calibration), train the ambient U-Net,
# sample from its EMA and measure how close the samples are to the training images.
# About 15 minutes on a 2-core CPU. Extra arguments go to ambient-train as overrides,
# e.g.  bash scripts/quickstart.sh train.total_kimg=20
# Running it again continues the run (--resume auto) or, if it finished, just re-does the
# samples and the memorization summary.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=configs/fashion-mnist-300.yaml
SHARDS=data/fashion-mnist-300   # = data.shards in $CONFIG
BIN=.venv/bin   # the console scripts of pyproject.toml, installed by setup.sh

bash scripts/setup.sh

echo "[quickstart] shards: $SHARDS (skipped if already complete)"
"$BIN/ambient-make-shards" --source fashion-mnist --config "$CONFIG" --out "$SHARDS"

echo "[quickstart] training with $CONFIG"
"$BIN/ambient-train" --config "$CONFIG" --resume auto "$@"

RUN=$("$BIN/python" -c "import sys
from ambient_dist.config import load_config
cfg = load_config('$CONFIG', sys.argv[1:])
print(f'{cfg.train.run_root}/{cfg.name}')" "$@")
cat <<MSG

[quickstart] done. Outputs in $RUN/:
  samples.png          samples from the EMA network (EDM Heun sampler)
  memorization.json    nearest-training-image similarity of each sample, with held-out calibration
  ema.safetensors      EMA weights (+ config.yaml beside them) for ambient-sample / ambient-evaluate
  checkpoints/         resumable checkpoints;  run.json: versions, git revision
  TensorBoard:         .venv/bin/tensorboard --logdir $RUN
MSG
