"""Sampling throughput at 35 network evaluations (EDM Heun, 18 steps), DDPM++ 32x32.

    ours       ambient_dist.sampling.edm_sample as the project runs it for a bf16 config: bf16
               autocast, channels_last weights, the U-Net compiled with torch.compile (GPU,
               not with --quick),
               per-image seeded noise (so an image does not depend on the batch it is in)
    baseline   benchmarks/baselines.py plain_heun_sample: EDM's default sampler, fp32 eager

Same network weights, same batch. On a GPU: the CIFAR-10 config (56M parameters), batch 256
(1024 with --full, the spec's reference setting: 92.5 img/s fp32 on an H200; target 300).
On CPU: the shrunken network of bench_train, batch 4.
"""
from __future__ import annotations

import torch

from benchmarks.baselines import plain_heun_sample
from benchmarks.bench_train import CASES, compiles
from benchmarks.harness import REPO_ROOT, Context, cuda_numerics, measure, median, per_second, result

STEPS = 18   # 2 * 18 - 1 = 35 network evaluations


def network_config(ctx: Context):
    from ambient_dist.config import load_config
    case = CASES[0]   # DDPM++ 32x32
    overrides = ["data.shards="] + ([] if ctx.on_gpu else list(case.cpu_overrides))
    return load_config(REPO_ROOT / case.config, overrides)


def run(ctx: Context) -> list[dict]:
    from ambient_dist.models import build_network
    from ambient_dist.sampling import SamplerSettings, edm_sample
    device = torch.device(ctx.device)
    cfg = network_config(ctx)
    batch = ctx.size(quick=4, default=256, full=1024) if ctx.on_gpu else ctx.size(quick=4, default=8)
    warmup, repeats = (1, ctx.size(quick=2, default=3)) if ctx.on_gpu else (1, 2)
    torch.manual_seed(0)
    plain = build_network(cfg).to(device).eval().requires_grad_(False)
    shape = (plain.img_channels, plain.img_resolution, plain.img_resolution)

    ours = build_network(cfg).to(device, memory_format=torch.channels_last)
    ours.load_state_dict(plain.state_dict())
    ours.eval().requires_grad_(False)
    if compiles(ctx):
        ours.raw = torch.compile(ours.raw)   # as the trainer does: the U-Net call only
    settings = SamplerSettings(num_steps=STEPS)
    indices = list(range(batch))

    noise = torch.randn(batch, *shape, device=device)
    # Baseline: true fp32 as in the spec's reference figure (TF32 off; torch's own default would
    # let cuDNN convolutions use TF32) with cuDNN's default algorithm choice, as EDM's
    # generate.py leaves it. Ours: cuDNN autotuning on, as ambient-sample sets it.
    with cuda_numerics(tf32=False, cudnn_benchmark=False):
        base_s = measure(lambda: plain_heun_sample(plain, noise, STEPS), repeats=repeats,
                         warmup=warmup, device=ctx.device)
    with cuda_numerics(tf32=False, cudnn_benchmark=True):
        ours_s = measure(lambda: edm_sample(ours, indices, shape, seed=0, settings=settings,
                                            autocast_dtype=torch.bfloat16, device=device),
                         repeats=repeats, warmup=warmup, device=ctx.device)
    ours_rate, base_rate = per_second(batch, ours_s), per_second(batch, base_s)
    return [result("sampling/ddpmpp32/35-evals", "img/s", median(ours_rate), median(base_rate),
                   "fp32 eager Heun (EDM default)", ours_rate, base_rate, batch=batch,
                   network_evaluations=2 * STEPS - 1, compiled=compiles(ctx),
                   note=f"batch {batch}; 50k images in {50000 / median(ours_rate) / 60:.1f} min"
                        if ctx.on_gpu else f"batch {batch}, CPU: bf16 emulated")]
