"""Triton kernels for the two passes of the ambient objective (contract: docs/INTERFACES.md).

Tensors are viewed as [B, N] (N = C*H*W, contiguous); the grid is (blocks per sample, B), so a
program handles one block of one sample and reads that sample's coefficients as scalars.

    pass 1  net_in = c_in * (P * src + Q * eps)                      1 read, 1 write per element
    pass 2  r = A * F + B * x_in + C * src,  x_in = net_in / c_in    3 reads, 1 write
            loss_i += weight_i * sum(r^2) over the block;  dF = grad_scale * 2 * weight_i * A_i * r

src is the clean image of a clean-branch sample and the stored noisy copy of an ambient one.
Both are loaded with complementary masks: the masked-off load touches no memory, so exactly
one of the two is read. Arithmetic is float32 (float64 when the inputs are float64, which the
gradcheck test uses); storage may be float32, bfloat16 or float16.

Set TRITON_INTERPRET=1 before importing this module to run it on a CPU (the tests do that in
a child process); `triton.jit` decides between compiled and interpreted at definition time.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .philox import PhiloxNoise

# Block of elements per program on a GPU when no block of 1024-4096 divides the sample; the
# interpreter prefers the largest block (fewer Python-level program launches).
GPU_BLOCK = 2048
INTERPRETER_MAX_BLOCK = 16384
# backward(): an incoming-gradient ratio within this of 1 counts as 1 (the dF written in the
# forward pass is already right). 2^-20, 8 float32 ulps of 1: autograd may form the incoming
# gradient as a product with a rounded reciprocal (CUDA divides by a scalar that way), the
# forward pass as a quotient. The CUDA kernels use the same value (cuda/two_branch.h).
UNIT_RATIO_TOLERANCE = tl.constexpr(2.0 ** -20)


@triton.jit
def _uniform(word):
    # Top 24 bits + 1/2, over 2^24: exact in float32 and never 0 (kernels/philox.py).
    return ((word >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)


@triton.jit
def _philox_normal_block(group, sample, step_lo, step_hi, key_lo, key_hi):
    """Four normals per group index: one Philox-4x32-10 call feeds four elements."""
    zero = tl.zeros_like(group)
    c0 = group.to(tl.uint32)
    c1 = (zero + sample).to(tl.uint32)
    c2 = (zero + step_lo).to(tl.uint32)
    c3 = (zero + step_hi).to(tl.uint32)
    k0 = (zero + key_lo).to(tl.uint32)
    k1 = (zero + key_hi).to(tl.uint32)
    w0, w1, w2, w3 = tl.philox_impl(c0, c1, c2, c3, k0, k1, 10)
    r01 = tl.sqrt(-2.0 * tl.log(_uniform(w0)))
    a01 = 6.283185307179586 * _uniform(w1)
    r23 = tl.sqrt(-2.0 * tl.log(_uniform(w2)))
    a23 = 6.283185307179586 * _uniform(w3)
    n0 = r01 * tl.cos(a01)
    n1 = r01 * tl.sin(a01)
    n2 = r23 * tl.cos(a23)
    n3 = r23 * tl.sin(a23)
    # interleave(interleave(n0, n2), interleave(n1, n3)) = n0 n1 n2 n3 n0 n1 ... (element 4g + k).
    return tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3))


@triton.jit
def _load_source(clean_ptr, noisy_ptr, offs, in_bounds, is_ambient, COMPUTE: tl.constexpr):
    # Complementary masks: only the branch's own tensor is read. The flag is broadcast to the
    # block explicitly (free when compiled; the interpreter rejects a scalar-broadcast mask).
    ambient = (tl.zeros_like(offs) + is_ambient) != 0
    from_clean = tl.load(clean_ptr + offs, mask=in_bounds & (ambient == 0), other=0.0)
    from_noisy = tl.load(noisy_ptr + offs, mask=in_bounds & ambient, other=0.0)
    return from_clean.to(COMPUTE) + from_noisy.to(COMPUTE)


@triton.jit
def _network_input_kernel(clean_ptr, noisy_ptr, eps_ptr, out_ptr,
                          p_ptr, q_ptr, c_in_ptr, ambient_ptr, numel,
                          first_sample, step_lo, step_hi, key_lo, key_hi,
                          BLOCK: tl.constexpr, SEEDED_NOISE: tl.constexpr, COMPUTE: tl.constexpr):
    block = tl.program_id(0)
    sample = tl.program_id(1)
    row = sample.to(tl.int64) * numel
    offs = block * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offs < numel
    is_ambient = tl.load(ambient_ptr + sample)
    p = tl.load(p_ptr + sample).to(COMPUTE)
    q = tl.load(q_ptr + sample).to(COMPUTE)
    c_in = tl.load(c_in_ptr + sample).to(COMPUTE)
    src = _load_source(clean_ptr + row, noisy_ptr + row, offs, in_bounds, is_ambient, COMPUTE)
    if SEEDED_NOISE:
        groups = block * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
        eps = _philox_normal_block(groups, first_sample + sample, step_lo, step_hi,
                                   key_lo, key_hi).to(COMPUTE)
    else:
        eps = tl.load(eps_ptr + row + offs, mask=in_bounds, other=0.0).to(COMPUTE)
    net_in = c_in * (p * src + q * eps)
    tl.store(out_ptr + row + offs, net_in.to(out_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit
def _residual_loss_kernel(f_ptr, net_in_ptr, clean_ptr, noisy_ptr, grad_ptr, loss_ptr,
                          a_ptr, b_ptr, c_ptr, c_in_ptr, weight_ptr, ambient_ptr,
                          numel, blocks_per_sample, grad_scale,
                          BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr,
                          DETERMINISTIC: tl.constexpr, COMPUTE: tl.constexpr):
    block = tl.program_id(0)
    sample = tl.program_id(1)
    row = sample.to(tl.int64) * numel
    offs = block * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offs < numel
    is_ambient = tl.load(ambient_ptr + sample)
    a = tl.load(a_ptr + sample).to(COMPUTE)
    b = tl.load(b_ptr + sample).to(COMPUTE)
    c = tl.load(c_ptr + sample).to(COMPUTE)
    c_in = tl.load(c_in_ptr + sample).to(COMPUTE)
    weight = tl.load(weight_ptr + sample).to(COMPUTE)
    f = tl.load(f_ptr + row + offs, mask=in_bounds, other=0.0).to(COMPUTE)
    x_in = tl.load(net_in_ptr + row + offs, mask=in_bounds, other=0.0).to(COMPUTE) / c_in
    src = _load_source(clean_ptr + row, noisy_ptr + row, offs, in_bounds, is_ambient, COMPUTE)
    r = a * f + b * x_in + c * src
    r = tl.where(in_bounds, r, 0.0)
    if WRITE_GRAD:
        # d(backward_scale * mean_i loss_i)/dF: grad_scale = backward_scale / B (fused.py).
        g = (2.0 * grad_scale) * weight * a * r
        tl.store(grad_ptr + row + offs, g.to(grad_ptr.dtype.element_ty), mask=in_bounds)
    partial = weight * tl.sum(r * r, axis=0)
    if DETERMINISTIC:
        # One slot per (sample, block); the caller sums the row in a fixed order.
        tl.store(loss_ptr + sample * blocks_per_sample + block, partial)
    else:
        tl.atomic_add(loss_ptr + sample, partial)


@triton.jit
def _scale_block(grad_ptr, out_ptr, row, block, ratio, numel, BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    offs = block * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offs < numel
    g = tl.load(grad_ptr + row + offs, mask=in_bounds, other=0.0).to(COMPUTE)
    tl.store(out_ptr + row + offs, (g * ratio).to(out_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit
def _rescale_rows_kernel(grad_ptr, out_ptr, upstream_ptr, expected, numel,
                         BLOCK: tl.constexpr, IN_PLACE: tl.constexpr, COMPUTE: tl.constexpr):
    # backward(): out = dF * upstream / expected per sample. In place, each program checks its
    # own sample's factor, so the common case (factor 1: the caller's backward_scale was given
    # to the forward pass) reads no gradient at all and needs no device-to-host sync.
    block = tl.program_id(0)
    sample = tl.program_id(1)
    row = sample.to(tl.int64) * numel
    ratio = tl.load(upstream_ptr + sample).to(COMPUTE) / expected
    if IN_PLACE:
        if tl.abs(ratio - 1.0) > UNIT_RATIO_TOLERANCE:
            _scale_block(grad_ptr, out_ptr, row, block, ratio, numel, BLOCK, COMPUTE)
    else:
        _scale_block(grad_ptr, out_ptr, row, block, ratio, numel, BLOCK, COMPUTE)


def _interpreted() -> bool:
    return isinstance(_network_input_kernel, triton.runtime.interpreter.InterpretedFunction)


def _block_size(numel: int, block: int | None) -> int:
    if block is not None:
        if block < 4 or block & (block - 1):
            raise ValueError(f"triton block: expected a power of two >= 4, got {block}")
        return block
    if _interpreted():
        return min(INTERPRETER_MAX_BLOCK, max(4, triton.next_power_of_2(numel)))
    # A block that divides the sample wastes no lanes (3072 = 3 x 1024 for 32x32x3 images).
    for candidate in (4096, 2048, 1024):
        if numel % candidate == 0:
            return candidate
    return min(GPU_BLOCK, max(128, triton.next_power_of_2(numel)))


def _compute_dtype(*tensors: torch.Tensor):
    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


def _on_device(t: torch.Tensor):
    # Triton launches on the current CUDA device; make it the tensors' one (multi-GPU hosts).
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _num_warps(block: int) -> int:
    # 16 (4096) or 8 elements per thread: several 16-byte loads in flight per tensor.
    return 8 if block >= 4096 else 4


def network_input(p, q, c_in, ambient, clean, noisy, eps, out_dtype, block=None):
    """Pass 1 on [B, N] views. eps: a [B, N] tensor or a PhiloxNoise. Returns net_in [B, N]."""
    batch, numel = clean.shape
    out = torch.empty((batch, numel), dtype=out_dtype, device=clean.device)
    blk = _block_size(numel, block)
    seeded = isinstance(eps, PhiloxNoise)
    if seeded:
        key_lo, key_hi = eps.key()
        step_lo, step_hi = eps.step_words()
        first, eps_arg = eps.first_sample, clean          # eps pointer unused
    else:
        key_lo = key_hi = step_lo = step_hi = first = 0
        eps_arg = eps
    compute = _compute_dtype(clean, noisy) if seeded else _compute_dtype(clean, noisy, eps)
    grid = (triton.cdiv(numel, blk), batch)
    with _on_device(clean):
        _network_input_kernel[grid](clean, noisy, eps_arg, out, p, q, c_in, ambient, numel,
                                    first, step_lo, step_hi, key_lo, key_hi,
                                    BLOCK=blk, SEEDED_NOISE=seeded, COMPUTE=compute,
                                    num_warps=_num_warps(blk))
    return out


def residual_loss(a, b, c, c_in, weight, ambient, f, net_in, clean, noisy,
                  grad_scale, write_grad, deterministic, block=None):
    """Pass 2 on [B, N] views. Returns (per-sample loss [B] float32 or float64, dF or None)."""
    batch, numel = f.shape
    blk = _block_size(numel, block)
    blocks = triton.cdiv(numel, blk)
    compute = _compute_dtype(f, net_in, clean, noisy)
    acc_dtype = torch.float64 if compute == tl.float64 else torch.float32
    grad = torch.empty_like(f) if write_grad else f      # grad pointer unused without WRITE_GRAD
    # With one block per sample there is nothing to add in either mode: skip the second pass.
    ordered = deterministic or blocks == 1
    loss = (torch.empty((batch, blocks), dtype=acc_dtype, device=f.device) if ordered
            else torch.zeros(batch, dtype=acc_dtype, device=f.device))
    with _on_device(f):
        _residual_loss_kernel[(blocks, batch)](f, net_in, clean, noisy, grad, loss,
                                               a, b, c, c_in, weight, ambient,
                                               numel, blocks, float(grad_scale),
                                               BLOCK=blk, WRITE_GRAD=write_grad,
                                               DETERMINISTIC=ordered, COMPUTE=compute,
                                               num_warps=_num_warps(blk))
    if ordered:
        # Deterministic second pass: a fixed-shape row sum (no atomics, same order every run).
        loss = loss[:, 0] if blocks == 1 else loss.sum(dim=1)
    return loss, (grad if write_grad else None)


def rescale_rows(grad, upstream, expected, in_place, block=None):
    """grad * upstream[i] / expected per sample; in place, rows whose factor is 1 (within
    UNIT_RATIO_TOLERANCE) are skipped."""
    batch, numel = grad.shape
    blk = _block_size(numel, block)
    out = grad if in_place else torch.empty_like(grad)
    with _on_device(grad):
        _rescale_rows_kernel[(triton.cdiv(numel, blk), batch)](
            grad, out, upstream, float(expected), numel, BLOCK=blk, IN_PLACE=in_place,
            COMPUTE=_compute_dtype(grad, upstream), num_warps=_num_warps(blk))
    return out
