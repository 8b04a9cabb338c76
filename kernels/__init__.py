"""Fused kernels for the two-branch ambient objective, and the dispatcher that picks one.

Every form of the objective reduces to per-sample coefficients (docs/INTERFACES.md):

    pass 1  net_in = c_in * (P * src + Q * eps)        src = noisy copy if ambient else clean
    pass 2  r = A * F + B * x_in + C * src,  loss_i = weight_i * sum(r^2),  dF in the same pass

Implementations, chosen by `select_impl` from `ObjectiveConfig.kernel`:
    "reference"  ambient_dist.objective's PyTorch code (autograd does the backward); CPU default
    "triton"     kernels/triton_two_branch.py (GPU; or CPU under TRITON_INTERPRET=1, for tests)
    "cuda"       kernels/cuda/two_branch.cu, built on first use (kernels/cuda_ext.py)
    "auto"       "cuda" on a GPU if the extension builds, else "triton"; "reference" on a CPU

eps is a tensor, or a `PhiloxNoise(seed, step, first_sample)` asking for noise drawn from
(seed, step, sample index) that is the same whatever the batch split (kernels/philox.py).
Nothing here imports Triton or builds CUDA code until an implementation is asked for.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from kernels.philox import PhiloxNoise, normal_like, philox_normal

__all__ = ["IMPLS", "PhiloxNoise", "philox_normal", "normal_like", "select_impl",
           "network_input", "residual_loss", "backend"]

IMPLS = ("reference", "triton", "cuda")
KINDS = ("auto",) + IMPLS


def _device_type(device: Any) -> str:
    return torch.device(device).type if device is not None else "cpu"


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def select_impl(kind: str = "auto", device: Any = None) -> str:
    """Which implementation runs the objective for `kind` (objective.kernel) on `device`."""
    if kind not in KINDS:
        raise ValueError(f"objective.kernel: {kind!r} is not one of {', '.join(KINDS)}")
    on_gpu = _device_type(device) == "cuda"
    if kind == "auto":
        if not on_gpu:
            return "reference"
        from kernels import cuda_ext
        if cuda_ext.available():
            return "cuda"
        return "triton" if _triton_importable() else "reference"
    if kind == "cuda":
        if not on_gpu:
            raise ValueError(f"objective.kernel: 'cuda' needs a CUDA device, the step runs on {device}; "
                             "use 'auto' or 'reference'")
        from kernels import cuda_ext
        cuda_ext.load()                      # raises with the compiler's message if it cannot build
    if kind == "triton":
        if not _triton_importable():
            raise ValueError("objective.kernel: 'triton' asked for but the triton package is not installed")
        if not on_gpu and not _interpreting():
            raise ValueError(f"objective.kernel: 'triton' needs a CUDA device (the step runs on {device}); "
                             "on a CPU set TRITON_INTERPRET=1 before importing kernels (slow, for tests)")
    return kind


def backend(impl: str):
    """The module that runs `impl` ("triton" or "cuda") on [B, N] views (kernels/fused.py)."""
    if impl == "triton":
        from kernels import triton_two_branch
        return triton_two_branch
    if impl == "cuda":
        from kernels import cuda_ext
        return cuda_ext.load_backend()
    raise ValueError(f"kernels.backend: {impl!r} is not a fused implementation (triton, cuda)")


def _reference():
    try:
        from ambient_dist import objective
    except ImportError as e:  # pragma: no cover - the library is part of this repository
        raise ImportError(f"impl 'reference' needs ambient_dist.objective: {e}") from e
    return objective


def network_input(coefs, clean: torch.Tensor, noisy: torch.Tensor, eps, impl: str = "reference",
                  *, out_dtype: torch.dtype | None = None, block: int | None = None) -> torch.Tensor:
    """Pass 1: net_in = c_in * (P * src + Q * eps), shaped like clean.

    out_dtype (default clean's dtype) is what the network receives, e.g. bfloat16 under
    autocast. `block` overrides the Triton block size (tests use it to cut samples unevenly).
    noisy may be None when no sample is ambient (the reference's convention).
    """
    if impl == "reference":
        if isinstance(eps, PhiloxNoise):
            eps = normal_like(eps, clean)
        net_in = _reference().reference_network_input(coefs, clean, noisy, eps)
        return net_in if out_dtype is None else net_in.to(out_dtype)
    from kernels.fused import run_input_pass
    noisy = clean if noisy is None else noisy
    return run_input_pass(backend(impl), coefs, clean, noisy, eps, out_dtype=out_dtype, block=block)


def residual_loss(coefs, F: torch.Tensor, net_in: torch.Tensor, src_or_pair, impl: str = "reference",
                  *, deterministic: bool = False, grad_scale: float | None = None,
                  retain_grad_buffer: bool = False, block: int | None = None) -> torch.Tensor:
    """Pass 2: per-sample loss [B] = weight * sum(r^2); backward gives dloss/dF.

    src_or_pair: (clean, noisy), or one tensor already holding each sample's source.
    deterministic: sum the per-block partial losses in a fixed order instead of with atomics
    (bitwise-reproducible losses; the gradient is elementwise and always reproducible).
    grad_scale: the incoming gradient per sample the kernel assumes when it writes dF in the
    forward pass; default 1/B (loss.mean()). Any other incoming gradient is still handled
    exactly, at the cost of one rescaling pass in backward (pass 1/(B*k) when a caller divides
    the mean by k accumulation steps, to keep the fast path).
    retain_grad_buffer: allow more than one backward through this loss (retain_graph=True,
    gradcheck) at the cost of one more pass; by default dF is handed on in place.
    """
    if isinstance(src_or_pair, (tuple, list)):
        if len(src_or_pair) != 2:
            raise ValueError(f"src_or_pair: expected (clean, noisy) or one tensor, got {len(src_or_pair)} items")
        clean, noisy = src_or_pair
        noisy = clean if noisy is None else noisy
    else:
        clean = noisy = src_or_pair
    if impl == "reference":
        return _reference().reference_residual_loss(coefs, F, net_in, clean, noisy)
    from kernels.fused import run_loss_pass
    return run_loss_pass(backend(impl), coefs, F, net_in, clean, noisy,
                         deterministic=deterministic, grad_scale=grad_scale, block=block,
                         retain_grad_buffer=retain_grad_buffer)
