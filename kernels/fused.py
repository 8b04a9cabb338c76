"""The fused implementation of the objective's two-pass protocol: `FusedKernel`.

`FusedKernel(name, backend)` is an ambient_dist.objective.TwoBranchKernel. Its backend
(triton_two_branch, or the CUDA extension wrapped by cuda_ext) works on [B, N] views and
exposes three functions with the same signature in both:

    network_input(P, Q, c_in, ambient_u8, clean, noisy, eps_or_PhiloxNoise, out_dtype, block)
    residual_loss(A, B, C, c_in, weight, ambient_u8, F, net_in, clean, noisy,
                  grad_scale, write_grad, deterministic, block) -> (loss [B], dF or None)
    rescale_rows(dF, upstream [B], grad_scale, in_place, block) -> dF * upstream / grad_scale
                  per sample (in place: rows whose factor is 1 to float32 rounding are not touched)

This module turns the caller's [B, C, H, W] tensors and StepCoefficients into those arguments
once, with errors that name the offending argument, and wraps pass 2 in `FusedResidualLoss`
so that `loss.backward()` reaches the network output F.

Pass 2 writes dF in its forward pass for the incoming gradient the caller announces:
backward_scale / B per sample (the loss classes average over the batch, the trainer scales
the mean by backward_scale = 1/accumulation steps). backward() then hands the buffer on as it
is; only an unannounced gradient (a sum, an fp16 loss scale, per-sample weights, gradcheck)
costs a rescaling pass, and is still exact.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ambient_dist.objective import StepCoefficients, TwoBranchKernel

from .philox import PhiloxNoise

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

    The kernel writes dF for an incoming gradient of grad_scale per sample (backward_scale / B).
    backward() hands it on through `rescale_rows`, which leaves a sample's rows untouched when
    its incoming gradient is grad_scale (to float32 rounding: the announced case) and scales
    them otherwise (a sum, an fp16 loss scale, per-sample weights, gradcheck's one-hot vectors).
    The check runs on the device, per sample: no host sync, and no pass over dF when the
    caller announced its scale.

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
            raise RuntimeError("FusedKernel.residual_loss: backward ran twice through the same fused "
                               "loss (retain_graph=True); pass retain_grad_buffer=True to residual_loss "
                               "for that")
        upstream = grad_loss.to(device=grad.device, dtype=torch.promote_types(grad_loss.dtype, torch.float32))
        grad = ctx.backend.rescale_rows(grad, upstream.contiguous(), ctx.grad_scale, ctx.in_place, ctx.block)
        return (grad,) + nothing


def run_loss_pass(backend, coefs, f, net_in, clean, noisy, backward_scale=1.0, deterministic=False,
                  block=None, retain_grad_buffer=False) -> torch.Tensor:
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
    if not (math.isfinite(backward_scale) and backward_scale > 0):
        raise ValueError(f"backward_scale: must be a finite number > 0, got {backward_scale}")
    scale = float(backward_scale) / batch      # the incoming gradient per sample
    loss = FusedResidualLoss.apply(f_rows, net_rows, clean_rows, noisy_rows, a, b, c, c_in, weight,
                                   amb, backend, scale, bool(deterministic), block,
                                   bool(retain_grad_buffer))
    return loss


class FusedKernel(TwoBranchKernel):
    """The two passes as fused kernels: pass 1 reads src and eps (or draws PhiloxNoise
    in-kernel) and writes net_in; pass 2 reads F, net_in and src and writes the per-sample
    loss and dF in one sweep (x_in is recomputed as net_in / c_in in registers, not stored).

    name: "triton" or "cuda"; backend: the module or object with the [B, N] functions above.
    Built by ambient_dist.kernels.fused_kernel (what objective.select_kernel calls).
    Beyond the protocol, keyword-only options: network_input(out_dtype=None, block=None);
    residual_loss(deterministic=False, retain_grad_buffer=False, block=None), see there.
    """

    def __init__(self, name: str, backend) -> None:
        self.name, self.backend = name, backend

    def network_input(self, coefs: StepCoefficients, clean: torch.Tensor, noisy, eps, *,
                      out_dtype: torch.dtype | None = None, block: int | None = None) -> torch.Tensor:
        """Pass 1. out_dtype (default clean's dtype) is what the network receives, e.g. bfloat16
        under autocast, without a separate cast. `block` overrides the Triton block size (tests
        use it to cut samples unevenly)."""
        noisy = clean if noisy is None else noisy     # the kernels always take both tensors
        return run_input_pass(self.backend, coefs, clean, noisy, eps, out_dtype=out_dtype, block=block)

    def residual_loss(self, coefs: StepCoefficients, F: torch.Tensor, net_in: torch.Tensor,
                      clean: torch.Tensor, noisy, *, backward_scale: float = 1.0,
                      deterministic: bool = False, retain_grad_buffer: bool = False,
                      block: int | None = None) -> torch.Tensor:
        """Pass 2 (float32 loss [B]; float64 for float64 inputs); dF is written in this pass.

        deterministic: sum the per-block partial losses in a fixed order instead of with
        atomics (bitwise-reproducible losses; the gradient is elementwise, always reproducible).
        retain_grad_buffer: allow more than one backward through this loss (retain_graph=True,
        gradcheck) at the cost of one more pass; by default dF is handed on in place.
        noisy=None: clean holds every sample's source (no ambient sample, or pre-selected).
        """
        noisy = clean if noisy is None else noisy
        return run_loss_pass(self.backend, coefs, F, net_in, clean, noisy, backward_scale=backward_scale,
                             deterministic=deterministic, block=block,
                             retain_grad_buffer=retain_grad_buffer)
