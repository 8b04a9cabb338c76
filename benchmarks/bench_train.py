"""Training step throughput (images/s) and model FLOP utilisation, DDPM++ at 32x32 and 64x64.

Three ways to take the same optimizer step of the same network on the same data:

    ours           `ambient_dist.engine.trainer.Trainer.train_step`, the step users run:
                   bf16 autocast, channels_last, torch.compile of the U-Net (GPU, not --quick),
                   the objective's fused two-branch loss kernels (objective.kernel=auto:
                   fused on GPU, reference on CPU), fused AdamW (GPU), the resident loader
                   and the config's geometric augmentation (augment.p = 0.15, as the paper)
    fp32 eager     benchmarks/baselines.py PlainTrainingStep: EDM's default step (fp32, TF32
                   off, eager, plain Adam, per-parameter nan_to_num and EMA)
    bf16+compile   the same plain step under bf16 autocast with torch.compile (as ours): the
                   reference's "bf16 + compile" figure, i.e. everything but our fusions

On a GPU the networks are the shipped configs (configs/cifar10-ddpmpp.yaml: 56M parameters;
configs/ffhq64-ddpmpp.yaml), batch 256 at 32x32 and 128 at 64x64 (twice that with --full). On CPU they are shrunk to a few
channels (the figures then check the code path and show ratios, nothing about a GPU).

MFU = images/s x training FLOPs per image (ambient_dist.models.flops, torch.utils.flop_counter)
/ the bf16 matrix-product rate measured in this same process (bench_matmul; on a CPU without
bf16 units, where bf16 is emulated, the faster fp32 rate, named in `mfu_ceiling`).
With --full on a GPU the 32x32 network is also timed with objective.kernel=reference, which
isolates what the fused loss kernels are worth inside a whole step, and the 64x64 network
against bf16+compile too (each compile costs about a minute, which the default run, sized for
the run book's 8 minutes, cannot spend).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.baselines import PlainTrainingStep
from benchmarks.bench_matmul import matmul_tflops, mfu_ceiling
from benchmarks.harness import (REPO_ROOT, Context, cuda_numerics, measure, median, per_second,
                                release_device_memory, result)

SIGMA_TN = 0.5


@dataclass
class NetworkCase:
    name: str
    config: str                      # shipped YAML, relative to the repository
    resolution: int
    cpu_overrides: tuple[str, ...]   # how the network is shrunk on CPU


CASES = (
    NetworkCase("ddpmpp32", "configs/cifar10-ddpmpp.yaml", 32,
                ("network.model_channels=8", "network.channel_mult=[1,2]",
                 "network.num_blocks=1", "network.attn_resolutions=[16]")),
    NetworkCase("ddpmpp64", "configs/ffhq64-ddpmpp.yaml", 64,
                ("network.model_channels=8", "network.channel_mult=[1,2,2]",
                 "network.num_blocks=1", "network.attn_resolutions=[16]")),
)


def compiles(ctx: Context) -> bool:
    """torch.compile on a GPU at default and full sizes; --quick and CPU runs compile nothing
    (a compile costs about a minute, and on CPU inductor's C++ build costs more)."""
    return ctx.on_gpu and not ctx.quick


def batch_size(ctx: Context, case: NetworkCase) -> int:
    # The fp32 baseline saves ~135 MB of activations per 32x32 image and ~345 MB per 64x64
    # image (counted with saved-tensor hooks on the shipped configs), so batch 256 / 128 fits
    # an H100's 80 GB; --full's 512 / 256 (~70 / ~90 GB) needs an H200.
    shrink = 1 if case.resolution == 32 else 2
    if ctx.on_gpu:
        return ctx.size(quick=64, default=256, full=512) // shrink
    return ctx.size(quick=4, default=16) // shrink


def make_shards(root: Path, count: int, resolution: int) -> Path:
    """Random RGB images with their fixed noisy copies, in the project's shard format."""
    from ambient_dist.data import ShardOptions, make_shards as write_shards, open_source
    images = np.random.default_rng(0).integers(0, 256, (count, resolution, resolution, 3),
                                               dtype=np.uint8)
    np.savez(root / "images.npz", images=images)
    out = root / f"shards{resolution}"
    write_shards(open_source(str(root / "images.npz")), out,
                 ShardOptions(resolution=resolution, channels=3, sigma_tn=SIGMA_TN, count=count,
                              samples_per_shard=max(count, 1)), progress=False)
    return out


def experiment(ctx: Context, case: NetworkCase, shards: Path, run_root: Path, batch: int,
               count: int, kernel: str = "auto"):
    from ambient_dist.config import load_config
    overrides = [f"data.shards={shards}", f"data.subset={count}", "data.loader=resident",
                 f"train.batch={batch}", "train.batch_per_gpu=0", "train.precision=bf16",
                 "train.channels_last=true", f"train.compile={str(compiles(ctx)).lower()}",
                 f"train.run_root={run_root}", f"objective.sigma_tn={SIGMA_TN}",
                 f"objective.kernel={kernel}", "optimizer.name=adamw"]
    if not ctx.on_gpu:
        overrides += list(case.cpu_overrides)
    return load_config(REPO_ROOT / case.config, overrides)


def train_gflop(cfg) -> float:
    from ambient_dist.models import build_network
    from ambient_dist.models.flops import train_gflop_per_image
    with torch.device("meta"):
        net = build_network(cfg)
    return train_gflop_per_image(net)


def time_ours(cfg, ctx: Context, run_dir: Path, warmup: int, repeats: int) -> list[float]:
    from ambient_dist.distributed import DistInfo
    from ambient_dist.engine.run import build_trainer
    trainer = build_trainer(cfg, run_dir, dist_info=DistInfo(device=torch.device(ctx.device)))
    seconds = measure(trainer.train_step, repeats=repeats, warmup=warmup, device=ctx.device)
    del trainer
    release_device_memory()
    return seconds


def time_plain(cfg, ctx: Context, precision: str, compile: bool, warmup: int,
               repeats: int) -> list[float]:
    from ambient_dist.data import build_loader
    from ambient_dist.models import build_network
    device = torch.device(ctx.device)
    batch = next(iter(build_loader(cfg, 0, 1, device)))
    torch.manual_seed(cfg.train.seed)
    step = PlainTrainingStep(build_network(cfg).to(device), SIGMA_TN, lr=cfg.optimizer.lr,
                             precision=precision, compile=compile)
    # EDM's training defaults: true fp32 (TF32 off), cuDNN autotuning on.
    with cuda_numerics(tf32=False, cudnn_benchmark=True):
        seconds = measure(lambda: step(batch.clean, batch.noisy), repeats=repeats,
                          warmup=warmup, device=ctx.device)
    del step, batch
    release_device_memory()
    return seconds


def case_results(ctx: Context, case: NetworkCase, ceiling: tuple[str, float], tmp: Path) -> list[dict]:
    batch = batch_size(ctx, case)
    count = 2 * batch
    warmup = ctx.size(quick=1, default=3) if ctx.on_gpu else 1
    repeats = ctx.size(quick=2, default=10 if ctx.on_gpu else 5)
    shards = make_shards(tmp, count, case.resolution)
    cfg = experiment(ctx, case, shards, tmp / "runs", batch, count)
    gflop = train_gflop(cfg)

    # Ours first: without it there is nothing to report, so its failure ends the module.
    ours = per_second(batch, time_ours(cfg, ctx, tmp / "run-ours", warmup, repeats))

    # Every torch.compile costs about a minute on a GPU machine. To keep the default run
    # inside the run book's 8 minutes, the 64x64 network's bf16+compile baseline and the
    # unfused-loss variant run only with --full (compiles() says who compiles).
    baselines = [("vs-fp32-eager", "fp32 eager (EDM default)",
                  lambda: time_plain(cfg, ctx, "fp32", False, warmup, repeats))]
    if ctx.full or not compiles(ctx) or case.resolution == 32:
        baselines.append(("vs-bf16-compile",
                          "bf16+compile, no fusions" if compiles(ctx) else "bf16 eager, no fusions",
                          lambda: time_plain(cfg, ctx, "bf16", compiles(ctx), warmup, repeats)))
    if ctx.on_gpu and ctx.full and case.resolution == 32:
        ref_cfg = experiment(ctx, case, shards, tmp / "runs", batch, count, kernel="reference")
        baselines.append(("fused-loss-in-step", "ours with the reference (unfused) loss",
                          lambda: time_ours(ref_cfg, ctx, tmp / "run-ref", warmup, repeats)))

    ceiling_name, ceiling_tflops = ceiling
    mfu = lambda rates: median(rates) * gflop * 1e9 / (ceiling_tflops * 1e12)  # noqa: E731
    common = dict(batch=batch, gflop_per_img=gflop, mfu_ceiling=ceiling_name,
                  mfu_ceiling_tflops=ceiling_tflops, mfu_ours=mfu(ours), compiled=compiles(ctx),
                  params=sum(p.numel() for p in _meta_net(cfg).parameters()))
    out = []
    for suffix, baseline_name, timed in baselines:
        name = f"train/{case.name}/{suffix}"
        try:
            base = per_second(batch, timed())
        except Exception as e:  # noqa: BLE001 - a baseline that cannot run here is reported
            release_device_memory()
            out.append(result(name, "img/s", median(ours), None, baseline_name, ours, [],
                              **common, note=f"baseline failed: {type(e).__name__}: {e}"[:300]))
            continue
        out.append(result(name, "img/s", median(ours), median(base), baseline_name, ours, base,
                          mfu_baseline=mfu(base), **common,
                          note=f"MFU {mfu(ours):.1%} vs {mfu(base):.1%}; {gflop:.1f} GFLOP/img, "
                               f"batch {batch}"))
    return out


def _meta_net(cfg):
    from ambient_dist.models import build_network
    with torch.device("meta"):
        return build_network(cfg)


def run(ctx: Context) -> list[dict]:
    ceiling = mfu_ceiling(matmul_tflops(ctx))
    out = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        for case in CASES:
            case_dir = Path(tmp) / case.name
            case_dir.mkdir()
            out += case_results(ctx, case, ceiling, case_dir)
            ctx.save_partial(out)   # the 32x32 figures survive a timeout in the 64x64 case
    return out
