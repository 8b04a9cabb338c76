"""ambient_dist.kernels: fused implementations of the objective's two-pass protocol.

The folder is the repository's top-level kernels/; pyproject.toml installs it as
ambient_dist.kernels (never as a top-level `kernels`, the name of an unrelated PyPI project).

ambient_dist.objective defines the protocol (TwoBranchKernel), its PyTorch reference
(REFERENCE) and the selection (select_kernel); every form of the objective reduces to
per-sample coefficients (StepCoefficients, docs/INTERFACES.md):

    pass 1  net_in = c_in * (P * src + Q * eps)        src = noisy copy if ambient else clean
    pass 2  r = A * F + B * x_in + C * src,  loss_i = weight_i * sum(r^2),  dF in the same pass

This package imports objective, never the other way at import time: objective.select_kernel
imports it only to call `fused_kernel`, which builds the object for a fused kind:

    "triton"  triton_two_branch.py (GPU; or CPU under TRITON_INTERPRET=1, for tests)
    "cuda"    cuda/two_branch.cu, built on first use (cuda_ext.py)
    "auto"    "cuda" on a GPU if the extension builds, else "triton", else the reference

Both are `fused.FusedKernel(name, backend)`; a new backend with the same three [B, N]
functions (fused.py) is one module and one case below. eps may be a tensor or a
`PhiloxNoise(seed, step, first_sample)` asking for noise drawn from (seed, step, sample index)
that is the same whatever the batch split (philox.py). Nothing here imports Triton or builds
CUDA code until an implementation is asked for.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from ambient_dist.objective import REFERENCE, KernelChoiceError, TwoBranchKernel

from .fused import FusedKernel
from .philox import PhiloxNoise, normal_like, philox_normal

__all__ = ["FUSED_KINDS", "FusedKernel", "PhiloxNoise", "fused_kernel", "normal_like", "philox_normal"]

FUSED_KINDS = ("auto", "triton", "cuda")


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _triton() -> FusedKernel:
    from . import triton_two_branch
    return FusedKernel("triton", triton_two_branch)


def _cuda() -> FusedKernel:
    from . import cuda_ext
    return FusedKernel("cuda", cuda_ext.load_backend())   # RuntimeError with the compiler's message


def fused_kernel(kind: str, device: Any) -> TwoBranchKernel:
    """The implementation for a fused `kind` (objective.kernel) on `device`; call it through
    objective.select_kernel. KernelChoiceError when `kind` cannot run on `device`."""
    if kind not in FUSED_KINDS:
        raise KernelChoiceError(f"objective.kernel: {kind!r} is not a fused kernel ({', '.join(FUSED_KINDS)})")
    on_gpu = device is not None and torch.device(device).type == "cuda"
    if kind == "auto":
        if not on_gpu:
            return REFERENCE
        from . import cuda_ext
        if cuda_ext.available():
            return _cuda()
        return _triton() if _triton_importable() else REFERENCE
    if kind == "cuda":
        if not on_gpu:
            raise KernelChoiceError(f"objective.kernel: 'cuda' needs a CUDA device, the step runs on "
                                    f"{device}; use 'auto' or 'reference'")
        return _cuda()
    if not _triton_importable():
        raise KernelChoiceError("objective.kernel: 'triton' asked for but the triton package is not installed")
    if not on_gpu and not _interpreting():
        raise KernelChoiceError(f"objective.kernel: 'triton' needs a CUDA device (the step runs on {device}); "
                                "on a CPU set TRITON_INTERPRET=1 before the first import of triton (slow, for tests)")
    return _triton()
