"""The card's matrix-product ceiling, measured in this run: bf16 against fp32.

Model FLOP utilisation (bench_train) is quoted against the bf16 figure measured here, not
against a datasheet number, because the achievable rate depends on the card's clocks, power
limit and software stack on the day. The fp32 product (TF32 off, EDM's default numerics) is
the baseline, so the ratio says what moving the arithmetic to bf16 can at most buy.
"""
from __future__ import annotations

import torch

from benchmarks.harness import Context, matmul_flops_per_s, median, result


def matmul_results(ctx: Context) -> list[dict]:
    n = ctx.size(quick=256, default=8192 if ctx.on_gpu else 1024)
    repeats = ctx.size(quick=3, default=10)
    # TF32 off: the fp32 baseline is true fp32, as EDM runs by default.
    torch.backends.cuda.matmul.allow_tf32 = False
    bf16 = [f / 1e12 for f in matmul_flops_per_s(ctx.device, n, torch.bfloat16, repeats)]
    fp32 = [f / 1e12 for f in matmul_flops_per_s(ctx.device, n, torch.float32, repeats)]
    return [result(f"matmul/{n}^3", "TFLOP/s", median(bf16), median(fp32), "fp32 (TF32 off)",
                   bf16, fp32, n=n, note="bf16 ceiling used for MFU")]


def run(ctx: Context) -> list[dict]:
    return matmul_results(ctx)
