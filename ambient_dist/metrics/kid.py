"""Kernel Inception Distance (Binkowski et al. 2018, "Demystifying MMD GANs"), with its standard error.

    KID = unbiased MMD^2 between generated and reference features under the cubic polynomial
          kernel k(x, y) = (x . y / d + 1)^3,  d = feature dimension

    MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (n (n - 1))
              - 2 sum_{i, j} k(x_i, y_j) / (m n)

Unlike FID, the estimate is unbiased at any sample count, which is why the study reports it
beside FID when only a few hundred samples are affordable (FID at 256 samples is dominated by
its bias). It can be slightly negative when the two sets are close.

Standard error: the generated images are split into `blocks` disjoint blocks, each block's
MMD^2_u against the whole reference set is computed, and SE = std(blocks) / sqrt(blocks). This
captures the sampling noise of the generated set (the reference set is fixed for a whole study,
so its noise is shared by every run being compared). The value itself is the estimate on all
samples, the same number torchmetrics' KernelInceptionDistance gives with one subset holding
every sample (tests/test_metrics_kid.py checks that).
"""
from __future__ import annotations

import math

import torch


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(x y^T / d + 1)^3 in float64, [len(x), len(y)]."""
    d = x.shape[1]
    return (x.double() @ y.double().T / d + 1.0) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 between feature sets x [m, d] and y [n, d] (m, n >= 2)."""
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {m} and {n}")
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    yy = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(xx + yy - 2 * k_xy.mean())


def kernel_inception_distance(generated: torch.Tensor, reference: torch.Tensor,
                              blocks: int = 10) -> dict:
    """KID of generated features [m, d] against reference features [n, d].

    Features of different widths raise ValueError naming both shapes.
    Returns {"value", "stderr", "blocks", "num_samples", "num_reference"}; stderr is None when
    there are fewer than 2 images per block."""
    if generated.ndim != 2 or reference.ndim != 2 or generated.shape[1] != reference.shape[1]:
        # features of different extractors (or images of different shapes passed as
        # features) would meet in the kernel's matrix product as a shape traceback
        raise ValueError(f"KID: generated features {list(generated.shape)} and reference features "
                         f"{list(reference.shape)} are not [N, d] of the same d (one extractor "
                         "for both sets, on images of the same [C, H, W])")
    value = mmd2_unbiased(generated, reference)
    m = len(generated)
    blocks = min(blocks, m // 2)
    stderr = None
    if blocks >= 2:
        edges = [round(i * m / blocks) for i in range(blocks + 1)]
        per_block = torch.tensor([mmd2_unbiased(generated[a:b], reference)
                                  for a, b in zip(edges[:-1], edges[1:])], dtype=torch.float64)
        stderr = float(per_block.std(unbiased=True) / math.sqrt(blocks))
    return {"value": value, "stderr": stderr, "blocks": blocks, "num_samples": int(m),
            "num_reference": int(len(reference))}
