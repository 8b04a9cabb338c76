"""Loader throughput: images/s of each training loader against plain PIL + DataLoader.

For each resolution (32 and 64 px; 256 px with --full) the benchmark writes a shard directory
of synthetic images (smooth random fields plus grain, so PNG compression and decoding do
realistic work, unlike pure noise or flat colour), and a plain folder holding the very same
PNG and .npy bytes, one file each. Then it times, on ctx.device, batches of (clean, noisy)
delivered as float32 in [-1, 1]:

    ours:     resident, webdataset (DataLoader workers reading the tars by index), dali
    baseline: a map-style torch Dataset opening each PNG with PIL and np.load-ing its noisy
              copy, shuffled by a DataLoader with the same number of workers

Figures are steady-state rates (start-up excluded by warm-up batches); the resident loader's
one-off decode of the whole set is reported separately as `startup_s`.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from benchmarks.harness import Context, measure, median, per_second, result

from ambient_dist.config import load_config
from ambient_dist.data import build_loader
from ambient_dist.data.augment import flip_rows, to_model_units
from ambient_dist.data.shards import ShardOptions, ShardSet, make_shards
from ambient_dist.data.sources import ArraySource


def synthetic_images(n: int, res: int, seed: int = 0) -> np.ndarray:
    """uint8 [n, res, res, 3]: upsampled low-resolution colour fields plus fine grain."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, size=(n, 3, 6, 6), dtype=np.uint8)
    smooth = torch.nn.functional.interpolate(torch.from_numpy(low).float(), size=(res, res),
                                             mode="bicubic", align_corners=False)
    grain = torch.from_numpy(rng.normal(0, 6, size=(n, 3, res, res)).astype(np.float32))
    return (smooth + grain).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def write_dataset(root: Path, n: int, res: int, workers: int) -> tuple[Path, Path]:
    """Shards + an equivalent plain folder (the same PNG and .npy bytes per sample)."""
    images = synthetic_images(n, res)
    source = ArraySource("synthetic", images, None, [f"{i:07d}" for i in range(n)], 0, "npz")
    shards_dir = root / f"shards{res}"
    make_shards(source, shards_dir, ShardOptions(resolution=res, channels=3, sigma_tn=0.5,
                                                 samples_per_shard=max(64, n // 8), workers=workers),
                progress=False)
    folder = root / f"folder{res}"
    folder.mkdir(exist_ok=True)
    shards = ShardSet(shards_dir)
    for i in range(len(shards)):
        png, npy, _ = shards.raw(i)
        (folder / f"{shards.keys[i]}.png").write_bytes(png)
        (folder / f"{shards.keys[i]}.noisy.npy").write_bytes(npy)
    return shards_dir, folder


class PlainFolder(Dataset):
    """The baseline: one PNG and one .npy per sample, read with PIL and numpy."""

    def __init__(self, folder: Path):
        self.stems = sorted(p.name[: -len(".png")] for p in folder.glob("*.png"))
        self.folder = folder

    def __len__(self):
        return len(self.stems)

    def __getitem__(self, i):
        stem = self.folder / self.stems[i]
        with Image.open(f"{stem}.png") as im:
            clean = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
        noisy = torch.from_numpy(np.load(f"{stem}.noisy.npy"))
        return clean, noisy, bool(torch.rand(()) < 0.5)


def endless(loader):
    while True:
        yield from loader


def run(ctx: Context) -> list[dict]:
    device = torch.device(ctx.device)
    workers = min(8, os.cpu_count() or 1)
    batch = ctx.size(quick=32, default=256, full=256)
    steps = ctx.size(quick=3, default=10, full=20)
    repeats = ctx.size(quick=2, default=5, full=5)
    resolutions = ctx.size(quick=[32, 64], default=[32, 64], full=[32, 64, 256])
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_loaders_", dir=os.environ.get("TMPDIR")) as tmp:
        for res in resolutions:
            n = ctx.size(quick=256, default=4096 if res <= 64 else 2048,
                         full=8192 if res <= 64 else 2048)
            shards_dir, folder = write_dataset(Path(tmp), n, res, workers)

            # Baseline: PIL + DataLoader, converted and flipped on the device like ours.
            plain = DataLoader(PlainFolder(folder), batch_size=batch, shuffle=True, drop_last=True,
                               num_workers=workers, pin_memory=device.type == "cuda",
                               persistent_workers=workers > 0,
                               generator=torch.Generator().manual_seed(0))
            plain_it = endless(plain)

            def baseline_step():
                clean, noisy, flips = next(plain_it)
                flips = flips.to(device)
                clean = to_model_units(flip_rows(clean.to(device, non_blocking=True), flips))
                noisy = flip_rows(noisy.to(device, non_blocking=True), flips).float()
                return clean, noisy

            def fetch(next_fn):
                def many():
                    for _ in range(steps):
                        out = next_fn()
                    return out
                return many

            base_t = measure(fetch(baseline_step), repeats=repeats, warmup=1, device=ctx.device)
            base = per_second(batch * steps, base_t)
            del plain_it, plain

            for kind in ("resident", "webdataset", "dali"):
                cfg = load_config(None, [f"data.shards={shards_dir}", f"data.loader={kind}",
                                         f"data.resolution={res}", "data.channels=3",
                                         "objective.sigma_tn=0.5", f"train.batch={batch}",
                                         f"data.workers={workers}"])
                t0 = time.perf_counter()
                try:
                    loader = build_loader(cfg, 0, 1, device)
                except ImportError as e:  # DALI is an optional (GPU) extra
                    results.append(result(f"loader {kind} {res}px", "img/s", None, median(base),
                                          f"PIL + DataLoader ({workers} workers)", None, base,
                                          note=f"not run: {e}", device=ctx.device))
                    continue
                startup = time.perf_counter() - t0
                seconds = measure(fetch(lambda: next(loader)), repeats=repeats, warmup=1,
                                  device=ctx.device)
                loader.close()
                ours = per_second(batch * steps, seconds)
                results.append(result(
                    f"loader {kind} {res}px", "img/s", median(ours), median(base),
                    f"PIL + DataLoader ({workers} workers)", ours, base,
                    batch=batch, images=n, workers=workers, startup_s=round(startup, 3),
                    device=ctx.device))
    return results


if __name__ == "__main__":
    import json
    import sys
    quick = "--quick" in sys.argv
    dev = "cuda" if "--cuda" in sys.argv else "cpu"
    for r in run(Context(device=dev, quick=quick)):
        print(json.dumps({k: v for k, v in r.items() if not k.endswith("repeats")}))
