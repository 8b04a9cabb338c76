"""Throughput of the text pipeline (latent shards, training steps) with random-weight models.

    python -m ambient_dist.text.throughput --size tiny --resolution 64            # CPU, seconds
    python -m ambient_dist.text.throughput --size sd2 --resolution 256 --precision bf16 \
        --batch 16 --steps 10 --json out/text_throughput.json                     # one GPU

"sd2" builds SD 2.x-sized models with random weights (sd_models.sd2_shaped_components: the
real cost, no download), "tiny" the test stand-ins. Both go through the real code paths: the
model is written as a diffusers directory, synthetic img2dataset shards (random images and
captions) are turned into latent shards by make_latent_shards, and the engine's Trainer (task: text) runs training
steps on them (gradient checkpointing on, as configured). Reported: img/s of each stage, timed
after warm-up steps with the device synchronised, plus the machine. Figures are only
comparable on the same machine in the same run.
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ambient_dist.config import load_config
from ambient_dist.provenance import provenance
from ambient_dist.data.shards import tar_member
from ambient_dist.data.sources import open_source

from .latents import LatentShardOptions, make_latent_shards
from .sd_models import load_components, save_components, sd2_shaped_components, tiny_components


def write_synthetic_img2dataset(path: Path, count: int, resolution: int, seed: int = 0) -> Path:
    """One img2dataset-style tar of random JPEGs with captions."""
    import tarfile

    from PIL import Image
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with tarfile.open(path / "00000.tar", "w") as tar:
        for k in range(count):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(buf, "JPEG")
            tar_member(tar, f"{k:09d}.jpg", buf.getvalue())
            tar_member(tar, f"{k:09d}.txt", f"the cat number {k}".encode())
    return path


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(size: str, resolution: int, images: int, batch: int, steps: int, precision: str,
            workdir: Path, device: torch.device) -> dict:
    from ambient_dist.engine.run import build_trainer

    components = tiny_components() if size == "tiny" else sd2_shaped_components()
    model = save_components(components, workdir / "model")
    del components
    source = open_source(str(write_synthetic_img2dataset(workdir / "laion", images, resolution)),
                         "webdataset")
    encoders = load_components(model, ("vae", "text_encoder", "tokenizer"), device=device)
    opts = LatentShardOptions(resolution=resolution, samples_per_shard=images, batch_size=batch)
    _sync(device)
    start = time.perf_counter()
    make_latent_shards(source, workdir / "shards", opts, encoders, device=device, progress=False)
    _sync(device)
    shard_s = time.perf_counter() - start
    del encoders

    cfg = load_config(None, [f"data.shards={workdir / 'shards'}", "objective.form=latent_v",
                             "objective.sigma_tn=1", f"data.resolution={resolution}",
                             "data.xflip=false", f"train.batch={batch}", f"train.precision={precision}",
                             f"text.model_path={model}", "optimizer.lr=1.0e-6"])
    trainer = build_trainer(cfg, workdir / "run")
    for _ in range(2):  # warm-up: allocator, kernels, autotuning
        trainer.train_step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    _sync(device)
    train_s = time.perf_counter() - start
    return {
        "size": size, "resolution": resolution, "batch": batch, "precision": precision,
        "unet_parameters": trainer.num_parameters,
        "latent_shards_img_per_s": images / shard_s,
        "train_img_per_s": steps * batch / train_s,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(), **provenance(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("tiny", "sd2"), default="tiny")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--images", type=int, default=64, help="images made into latent shards")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="timed training steps (after 2 warm-up)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--workdir", help="scratch directory (default: a temporary one)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args.size, args.resolution, args.images, args.batch, args.steps,
                         args.precision, Path(args.workdir or tmp), device)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
