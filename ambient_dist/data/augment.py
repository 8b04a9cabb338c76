"""Pixel conversions shared by every loader, so that all of them produce identical tensors.

- `to_model_units`: uint8 -> float32 in [-1, 1] as `x / 127.5 - 1` (the project's units; the
  DALI pipeline does the same two float32 operations, in the same order).
- `flip_rows`: the one geometric augmentation, a horizontal flip of the selected samples. It is
  applied to the clean image and to its stored noisy copy alike: flipping the clean image and
  then adding the stored noise would leak flip(x0) - x0 without noise (objective.md section 1).
"""
from __future__ import annotations

import numpy as np
import torch


def to_model_units(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1]."""
    return x.to(torch.float32) / 127.5 - 1.0


def flip_rows(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Mirror along the last (width) axis the samples of batch `x` whose `flips` bit is set."""
    if not bool(flips.any()):
        return x
    mask = flips.to(device=x.device, dtype=torch.bool).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(mask, x.flip(-1), x)


def flip_rows_numpy(x: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """`flip_rows` for numpy batches (loader workers work in numpy before the transfer)."""
    out = x.copy()
    out[flips] = x[flips][..., ::-1]
    return out
