"""Counter-based training noise: the normal draws the fused kernels make in-kernel, in PyTorch.

The fused input kernel can draw eps itself instead of reading an eps tensor. So that the same
seed gives the same noise whatever the batch split (one GPU or eight, any micro-batch), each
draw is a pure function of (seed, step, global sample index, element index), computed with
Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11):

    key     = (seed & 0xffffffff, seed >> 32)
    counter = (element // 4, sample, step & 0xffffffff, step >> 32)
    u0..u3  = Philox4x32-10(counter, key)                   four 32-bit words
    uniform = ((u >> 8) + 0.5) / 2^24                        in (0, 1), exact in float32
    n0, n1  = Box-Muller(uniform(u0), uniform(u1));  n2, n3 = Box-Muller(uniform(u2), uniform(u3))
    eps[sample, element] = n[element % 4]

One Philox call feeds four neighbouring elements, so the kernels spend a quarter of the integer
work a call per element would (the input pass is memory-bound only if the noise is cheap).

This module is the PyTorch statement of that definition: the reference path uses it to draw the
same noise as the kernels (up to the last bits of log/sin/cos), and the tests use it to check
the Triton and CUDA generators. Integer arithmetic is done in int64, where the product of two
32-bit words fits exactly once reinterpreted as unsigned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Philox-4x32 round multipliers and Weyl key increments (the published constants).
ROUND_A = 0xD2511F53
ROUND_B = 0xCD9E8D57
KEY_A = 0x9E3779B9
KEY_B = 0xBB67AE85
ROUNDS = 10
MASK32 = 0xFFFFFFFF
TWO_PI = 6.283185307179586


@dataclass(frozen=True)
class PhiloxNoise:
    """Ask the input pass to draw eps itself: N(0, 1) from (seed, step, sample index).

    `first_sample` is the global index of the batch's first sample (e.g. rank * micro-batch
    + accumulation offset), so each sample's noise is the same however the batch is split.
    """
    seed: int
    step: int
    first_sample: int = 0

    def __post_init__(self) -> None:
        for name in ("seed", "step", "first_sample"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2 ** 63:
                raise ValueError(f"PhiloxNoise.{name}: expected an integer in [0, 2**63), got {value!r}")
        if self.first_sample >= 2 ** 32:
            raise ValueError(f"PhiloxNoise.first_sample: the sample counter is 32 bits, got {self.first_sample}")

    def key(self) -> tuple[int, int]:
        return self.seed & MASK32, (self.seed >> 32) & MASK32

    def step_words(self) -> tuple[int, int]:
        return self.step & MASK32, (self.step >> 32) & MASK32

    def normal_like(self, like: torch.Tensor) -> torch.Tensor:
        """This noise as a float32 tensor shaped like `like` ([B, ...]): what the reference
        implementation (ambient_dist.objective.REFERENCE) uses in place of the in-kernel draw."""
        return normal_like(self, like)


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # a * b < 2^64; int64 wraps modulo 2^64, so the bit pattern is the unsigned product.
    p = b * a
    return (p >> 32) & MASK32, p & MASK32


def philox4x32(counter: tuple[torch.Tensor, ...], key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Philox-4x32-10 on int64 tensors holding 32-bit words; returns four int64 word tensors."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(ROUNDS):
        hi_a, lo_a = _mulhilo(ROUND_A, c0)
        hi_b, lo_b = _mulhilo(ROUND_B, c2)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & MASK32, (k1 + KEY_B) & MASK32
    return c0, c1, c2, c3


def _uniform(word: torch.Tensor) -> torch.Tensor:
    # Top 24 bits plus one half: exactly representable in float32 and never 0 (log is finite).
    return ((word >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)


def _box_muller(w0: torch.Tensor, w1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    radius = torch.sqrt(-2.0 * torch.log(_uniform(w0)))
    angle = TWO_PI * _uniform(w1)
    return radius * torch.cos(angle), radius * torch.sin(angle)


def philox_normal(noise: PhiloxNoise, batch: int, numel: int,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """eps as the fused kernels draw it, float32 [batch, numel] (reshape to the image shape)."""
    groups = (numel + 3) // 4
    g = torch.arange(groups, dtype=torch.int64, device=device).expand(batch, groups)
    s = (torch.arange(batch, dtype=torch.int64, device=device) + noise.first_sample)[:, None].expand(batch, groups)
    step_lo, step_hi = noise.step_words()
    words = philox4x32((g, s, torch.full_like(g, step_lo), torch.full_like(g, step_hi)), noise.key())
    n0, n1 = _box_muller(words[0], words[1])
    n2, n3 = _box_muller(words[2], words[3])
    # Element 4g + k takes n_k: stack on a last axis of 4, then flatten.
    eps = torch.stack((n0, n1, n2, n3), dim=-1).reshape(batch, groups * 4)
    return eps[:, :numel].contiguous()


def normal_like(noise: PhiloxNoise, like: torch.Tensor) -> torch.Tensor:
    """philox_normal shaped like `like` ([B, ...]), float32, on like's device."""
    batch = like.shape[0]
    numel = math.prod(like.shape[1:])
    return philox_normal(noise, batch, numel, like.device).reshape(like.shape)
