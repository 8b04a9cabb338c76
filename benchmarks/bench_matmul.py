"""The machine's matrix-product ceiling, measured in this run: bf16 against fp32.

Model FLOP utilisation (bench_train) is quoted against the rate measured here, not against a
datasheet number, because the achievable rate depends on the card's clocks, power limit and
software stack on the day. The fp32 product (TF32 off, EDM's default numerics) is the
baseline, so the ratio says what moving the arithmetic to bf16 can at most buy.

On a CPU without bf16 units (most CI machines) bf16 is emulated and slower than fp32; MFU is
then quoted against the faster of the two, and `mfu_ceiling` says which.
"""
from __future__ import annotations

import torch

from benchmarks.harness import Context, cuda_numerics, matmul_flops_per_s, median, result


def matmul_size(ctx: Context) -> int:
    """Matrix side: 8192 on a GPU (the spec's ceiling), small on CPU."""
    return ctx.size(quick=256, default=8192 if ctx.on_gpu else 1024)


def matmul_tflops(ctx: Context) -> dict[str, list[float]]:
    """{'bf16': [...], 'fp32': [...]} in TFLOP/s, one value per repeat (TF32 off for fp32)."""
    n, repeats = matmul_size(ctx), ctx.size(quick=3, default=10)
    with cuda_numerics(tf32=False):
        return {name: [f / 1e12 for f in matmul_flops_per_s(ctx.device, n, dtype, repeats)]
                for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))}


def mfu_ceiling(rates: dict[str, list[float]]) -> tuple[str, float]:
    """(name, TFLOP/s) of the ceiling MFU is quoted against: bf16, unless fp32 is faster."""
    name = "fp32" if median(rates["fp32"]) > median(rates["bf16"]) else "bf16"
    return f"{name} matmul", median(rates[name])


def run(ctx: Context) -> list[dict]:
    rates = matmul_tflops(ctx)
    n = matmul_size(ctx)
    return [result(f"matmul/{n}^3", "TFLOP/s", median(rates["bf16"]), median(rates["fp32"]),
                   "fp32 (TF32 off)", rates["bf16"], rates["fp32"], n=n,
                   note=f"MFU ceiling: {mfu_ceiling(rates)[0]}")]
