"""The two-branch objective step (pass 1, pass 2, backward to F): fused kernels vs PyTorch.

On a GPU, for DDPM++ 32x32 batch 512, 64x64 batch 256 and 4x64x64 latents batch 256:
    step time, fused (the implementation select_kernel("auto") picks) vs eager reference
    step time, fused vs torch.compile of the reference
    achieved GB/s vs a device copy of the same byte count (the bytes the fused design must
        move; the fraction of a large copy's bandwidth is stored as an extra field)
and the objective's share of a whole training step (U-Net forward+backward, bf16 autocast),
fused against eager: DDPM++ at 32x32 batch 256 and 64x64 batch 64 (EDM's FFHQ-64 network), and
the Stable Diffusion 2 U-Net (random weights) on 4x64x64 latents batch 16.

On a CPU the kernels do not run (select_kernel gives the reference), so the figure is the
reference objective at a tiny size against a naive eager version that computes both branches
for every sample and selects afterwards: a regression check of the reference, in ratios.

The measurement code is ambient_dist.kernels.gpu_check's (kernels/gpu_check.py) (one definition of the step, the byte count,
the baselines and the device timer); this module turns its rows into harness results.
"""
from __future__ import annotations

import torch

from benchmarks.harness import Context, measure, median, release_device_memory, result
from ambient_dist.kernels import gpu_check
from ambient_dist.objective import select_kernel


def naive_step(F, clean, noisy, eps, c):
    """The objective as first written: both branches for every sample, then a per-sample pick."""
    col = lambda v: v.reshape(-1, 1, 1, 1)  # noqa: E731
    x_clean = col(c.P) * clean + col(c.Q) * eps
    x_noisy = col(c.P) * noisy + col(c.Q) * eps
    amb = col(c.ambient)
    net_in = col(c.c_in) * torch.where(amb, x_noisy, x_clean)
    x_in = net_in / col(c.c_in)
    r_clean = col(c.A) * F + col(c.B) * x_in + col(c.C) * clean
    r_noisy = col(c.A) * F + col(c.B) * x_in + col(c.C) * noisy
    loss_clean = c.weight * r_clean.square().flatten(1).sum(1)
    loss_noisy = c.weight * r_noisy.square().flatten(1).sum(1)
    return net_in, torch.where(c.ambient, loss_noisy, loss_clean).mean()


def run_cpu(ctx: Context) -> list[dict]:
    batch, res = ctx.size(quick=4, default=16), ctx.size(quick=8, default=32)
    g = torch.Generator().manual_seed(0)
    c = gpu_check.coefficients(batch, "mixed", "cpu", g)
    clean, noisy, eps, F = gpu_check.tensors(batch, (3, res, res), torch.float32, "cpu", g)
    F.requires_grad_()
    args = (c.P, c.Q, c.c_in, c.A, c.B, c.C, c.weight, c.ambient)
    reps = dict(repeats=ctx.size(quick=3, default=10), warmup=1, device="cpu", inner=ctx.size(quick=5, default=20))
    ours = measure(lambda: torch.autograd.grad(gpu_check.reference_step(F, clean, noisy, eps, *args)[1], F), **reps)
    base = measure(lambda: torch.autograd.grad(naive_step(F, clean, noisy, eps, c)[1], F), **reps)
    to_us = lambda ts: [t * 1e6 for t in ts]  # noqa: E731
    return [result(f"kernels/objective step 3x{res}x{res} batch {batch} (cpu reference)", "us",
                   median(ours) * 1e6, median(base) * 1e6, "naive eager, both branches computed",
                   to_us(ours), to_us(base), impl="reference", batch=batch,
                   note="the fused kernels need a GPU; this tracks the reference path")]


def run_gpu(ctx: Context) -> list[dict]:
    impl = select_kernel("auto", ctx.device).name
    # gpu_check's timer: CUDA events like harness.measure, but with the stream held by a sleep
    # kernel while the host queues each repeat, so small steps are timed as device work (in
    # training the U-Net hides the launch overhead) rather than as Python launch latency.
    timed = gpu_check.timer(ctx.device)
    shapes = [("ddpmpp-32x32", 512, (3, 32, 32)), ("64x64", 256, (3, 64, 64)),
              ("latent-4x64x64", 256, (4, 64, 64))]
    if ctx.quick:
        shapes = shapes[:1]
    out = []
    for name, batch, shape in shapes:
        tag = f"kernels/{name} batch {batch}"
        try:
            rows = gpu_check.time_shape(name, batch, shape, torch.float32, [impl], ctx.device, timed,
                                        compile_ref=True, quick=False)
        except Exception as e:  # one shape failing keeps the others' figures
            out.append(result(f"{tag} step vs eager", "us", None, None, "PyTorch eager reference",
                              impl=impl, error=repr(e)[:300]))
            continue
        by = {r["impl"]: r for r in rows}
        ours = by[impl]
        for base_key, base_name in (("eager", "PyTorch eager reference"), ("compile", "torch.compile of the reference")):
            base = by.get(base_key)
            if base is None or "time_us" not in base:
                continue
            out.append(result(f"{tag} step vs {base_key}", "us", ours["time_us"], base["time_us"], base_name,
                              ours["repeats_us"], base["repeats_us"], impl=impl, batch=batch))
        copy = by["device copy (same bytes)"]
        peak = next(r for r in rows if r["impl"].startswith("device copy (") and "same" not in r["impl"])
        out.append(result(f"{tag} bandwidth", "GB/s", ours["gb_per_s"], copy["gb_per_s"],
                          "device copy of the same bytes", impl=impl, batch=batch,
                          fraction_of_large_copy=ours["gb_per_s"] / peak["gb_per_s"],
                          large_copy_gb_per_s=peak["gb_per_s"]))
        philox = by.get(impl + "+philox")
        if philox is not None:
            out.append(result(f"{tag} step with in-kernel noise vs eager", "us", philox["time_us"],
                              by["eager"]["time_us"], "PyTorch eager reference (eps read from memory)",
                              philox["repeats_us"], by["eager"]["repeats_us"], impl=impl, batch=batch))
    # Batches that fit one 80 GB card with activations kept; the share barely depends on it.
    # The SD 2 U-Net needs diffusers (a carried wheel on the lent machine); without it the row
    # records the import error and the other figures stand.
    steps = [] if ctx.quick else [("ddpmpp", "DDPM++ 32x32", 32, 256, (2, 2, 2)),
                                  ("ddpmpp", "DDPM++ 64x64", 64, 64, (1, 2, 2, 2)),
                                  ("sd2", "SD 2 latent 4x64x64", 64, 16, ())]
    for network, label, res, batch, mult in steps:
        name = f"kernels/{label} batch {batch} training step (U-Net + objective)"
        try:
            share = gpu_check.step_share([impl], ctx.device, timed, quick=False, resolution=res,
                                         batch=batch, channel_mult=mult, network=network)
        except Exception as e:  # e.g. out of memory: keep the kernel figures above
            out.append(result(name, "ms/step", None, None, "same step, eager objective", impl=impl,
                              error=repr(e)[:300]))
            continue
        unet = share[0]["time_ms"]
        fused, eager = share[2], share[1]          # rows: U-Net, eager objective, fused objective
        out.append(result(name, "ms/step", unet + fused["time_ms"], unet + eager["time_ms"], "same step, eager objective",
                          impl=impl, unet_ms=unet, objective_share_fused=fused["share_of_step"],
                          objective_share_eager=eager["share_of_step"],
                          note=share[0]["what"]))
        release_device_memory()
    return out


def run(ctx: Context) -> list[dict]:
    return run_gpu(ctx) if ctx.on_gpu else run_cpu(ctx)
