"""The fused two-branch objective as PyTorch operations: input checks and the autograd Function.

A backend (kernels.triton_two_branch or the CUDA extension wrapped by kernels.cuda_ext) works
on [B, N] views and exposes two functions with the same signature:

    network_input(P, Q, c_in, ambient_u8, clean, noisy, eps_or_PhiloxNoise, out_dtype, block)
    residual_loss(A, B, C, c_in, weight, ambient_u8, F, net_in, clean, noisy,
                  grad_scale, write_grad, deterministic, block) -> (loss [B], dF or None)
    rescale_rows(dF, upstream [B], grad_scale, in_place, block) -> dF * upstream / grad_scale
                  per sample (in place: rows whose factor is exactly 1 are not touched)

This module turns the caller's [B, C, H, W] tensors and StepCoefficients into those arguments
once, with errors that name the offending argument, and wraps pass 2 in `FusedResidualLoss`
so that `loss.backward()` reaches the network output F.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from kernels.philox import PhiloxNoise

STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _as_rows(name: str, t: torch.Tensor, batch: int, numel: int, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dtype not in STORAGE_DTYPES:
        raise TypeError(f"{name}: dtype {t.dtype} is not supported (float32, bfloat16, float16, float64)")
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, expected {device} like the other inputs")
    if t.shape[0] != batch or t.numel() != batch * numel:
        raise ValueError(f"{name}: shape {tuple(t.shape)} does not match the batch's [{batch}, ...] "
                         f"with {numel} elements per sample")
    return t.reshape(batch, numel).contiguous()


def per_sample(coefs: Any, name: str, batch: int, device: torch.device,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One StepCoefficients field as a contiguous [B] tensor of `dtype` on `device`."""
    value = getattr(coefs, name, None)
    if value is None:
        raise AttributeError(f"coefs.{name}: missing (expected a StepCoefficients-like object "
                             "with P, Q, c_in, A, B, C, weight, ambient)")
    value = torch.as_tensor(value, device=device)
    if value.shape != (batch,):
        raise ValueError(f"coefs.{name}: shape {tuple(value.shape)}, expected [{batch}] (one per sample)")
    return value.to(dtype).contiguous()


def ambient_mask(coefs: Any, batch: int, device: torch.device) -> torch.Tensor:
    """coefs.ambient as uint8 [B] (1 = read the noisy copy), the form the kernels load."""
    return per_sample(coefs, "ambient", batch, device, torch.bool).view(torch.uint8)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # float64 inputs (gradcheck) are computed in float64; everything else accumulates in float32.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def prepare_input_pass(coefs, clean, noisy, eps):
    """Checked [B, N] views and coefficient tensors for pass 1."""
    batch, numel = clean.shape[0], math.prod(clean.shape[1:])
    dev = clean.device
    clean_rows = _as_rows("clean", clean, batch, numel, dev)
    noisy_rows = _as_rows("noisy", noisy, batch, numel, dev)
    if isinstance(eps, PhiloxNoise):
        eps_rows = eps
        acc = compute_dtype(clean, noisy)
    else:
        eps_rows = _as_rows("eps", eps, batch, numel, dev)
        acc = compute_dtype(clean, noisy, eps)
    coef = [per_sample(coefs, n, batch, dev, acc) for n in ("P", "Q", "c_in")]
    return coef, ambient_mask(coefs, batch, dev), clean_rows, noisy_rows, eps_rows


def run_input_pass(backend, coefs, clean, noisy, eps, out_dtype=None, block=None) -> torch.Tensor:
    """net_in shaped like clean, in out_dtype (default: clean's dtype)."""
    (p, q, c_in), amb, clean_rows, noisy_rows, eps_rows = prepare_input_pass(coefs, clean, noisy, eps)
    out = backend.network_input(p, q, c_in, amb, clean_rows, noisy_rows, eps_rows,
                                out_dtype or clean.dtype, block)
    return out.reshape(clean.shape)


class FusedResidualLoss(torch.autograd.Function):
    """Per-sample loss of pass 2; dloss/dF is produced by the same kernel, in forward.

    The kernel writes dF for the mean over the batch (grad_scale = 1/B). backward() hands it on
    through `rescale_rows`, which leaves a sample's rows untouched when its incoming gradient is
    exactly grad_scale (the common case: loss.mean().backward()) and scales them otherwise (a
    sum, a loss scale, gradient accumulation, gradcheck's one-hot vectors). The check runs on
    the device, per sample: no host sync, and no extra pass over dF in the common case.

    Scaling in place means the buffer serves one backward. With retain_grad_buffer=True the
    scaled gradient goes to a new tensor instead (one more pass), so backward may run again
    (retain_graph=True, gradcheck); without it a second backward raises.
    """

    @staticmethod
    def forward(ctx, f, net_in, clean, noisy, a, b, c, c_in, weight, amb,
                backend, grad_scale, deterministic, block, retain_grad_buffer):
        write_grad = ctx.needs_input_grad[0]
        loss, grad = backend.residual_loss(a, b, c, c_in, weight, amb, f, net_in, clean, noisy,
                                           grad_scale, write_grad, deterministic, block)
        ctx.grad_f = grad
        ctx.grad_scale = grad_scale
        ctx.backend, ctx.block = backend, block
        ctx.in_place, ctx.backward_calls = not retain_grad_buffer, 0
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad = ctx.grad_f                      # freed with the graph (kept for retain_graph=True)
        nothing = (None,) * 14
        if grad is None:
            return (None,) + nothing
        ctx.backward_calls += 1
        if ctx.in_place and ctx.backward_calls > 1:
            raise RuntimeError("kernels.residual_loss: backward ran twice through the same fused loss "
                               "(retain_graph=True); pass retain_grad_buffer=True to residual_loss for that")
        upstream = grad_loss.to(device=grad.device, dtype=torch.promote_types(grad_loss.dtype, torch.float32))
        grad = ctx.backend.rescale_rows(grad, upstream.contiguous(), ctx.grad_scale, ctx.in_place, ctx.block)
        return (grad,) + nothing


def run_loss_pass(backend, coefs, f, net_in, clean, noisy, deterministic=False,
                  grad_scale=None, block=None, retain_grad_buffer=False) -> torch.Tensor:
    """Per-sample loss [B] (float32; float64 for float64 inputs), differentiable in f."""
    batch, numel = f.shape[0], math.prod(f.shape[1:])
    dev = f.device
    f_rows = _as_rows("F", f, batch, numel, dev)
    net_rows = _as_rows("net_in", net_in, batch, numel, dev)
    clean_rows = _as_rows("clean", clean, batch, numel, dev)
    noisy_rows = clean_rows if noisy is clean else _as_rows("noisy", noisy, batch, numel, dev)
    acc = compute_dtype(f, net_in, clean, noisy)
    a, b, c, c_in, weight = (per_sample(coefs, n, batch, dev, acc) for n in ("A", "B", "C", "c_in", "weight"))
    amb = ambient_mask(coefs, batch, dev)
    scale = 1.0 / batch if grad_scale is None else float(grad_scale)
    if not scale > 0:
        raise ValueError(f"grad_scale: must be > 0, got {grad_scale}")
    loss = FusedResidualLoss.apply(f_rows, net_rows, clean_rows, noisy_rows, a, b, c, c_in, weight,
                                   amb, backend, scale, bool(deterministic), block,
                                   bool(retain_grad_buffer))
    return loss
