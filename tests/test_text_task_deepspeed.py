"""Text-conditional training on two ranks under DeepSpeed ZeRO-2 with bf16 (CPU, gloo, 127.0.0.1 only).

Each rank is its own process with RANK / WORLD_SIZE / MASTER_ADDR in the environment, as a
cluster launcher starts them; the engine's Trainer runs the text task on the DeepSpeed backend.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import RES, free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_two_ranks_zero2_train_and_export(latent_shards, tiny_model, tmp_path):  # noqa: F811
    out, _, _ = latent_shards
    run = tmp_path / "run"
    args = ["launchers/train.py", "--config", "configs/laion-sd2-base.yaml", "--run-dir", str(run),
            f"data.shards={out}", "data.subset=0", f"data.resolution={RES}",
            f"text.model_path={tiny_model}", "train.batch=4", "train.batch_per_gpu=2",
            "train.total_kimg=0.008", "train.log_every_kimg=0.004", "train.checkpoint_every_kimg=0.008",
            "train.sample_every_kimg=100", "train.precision=bf16", "sampling.num_images=2",
            "text.sample_steps=2", "text.text_noise_std=0.1", "evaluation.memorization_features=pixels",
            "distributed.engine=deepspeed", "distributed.zero_stage=2"]
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_"))}
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
                   PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    results = []
    for p in procs:
        try:
            results.append((p.wait(timeout=500), p.stdout.read()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for rank, (rc, log) in enumerate(results):
        assert rc == 0, f"rank {rank} failed:\n{log[-3000:]}"
    latest = (run / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((run / "checkpoints" / latest / "meta.json").read_text())
    assert meta["images_seen"] == 8 and meta["world_size"] == 2
    ema = load_file(run / "ema.safetensors")
    exported = load_file(run / "diffusers" / "unet" / "diffusion_pytorch_model.safetensors")
    assert exported.keys() == ema.keys() and all(torch.equal(exported[k], ema[k]) for k in ema)
    assert "diffusers model:" in results[0][1]
