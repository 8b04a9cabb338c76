"""Pixel conversions shared by every loader, so that all of them produce identical tensors.

- `to_model_units`: uint8 -> float32 in [-1, 1] as `x / 127.5 - 1` (the project's units),
  through a 256-entry table. Float arithmetic would not give the same bits everywhere: CUDA
  divides by a scalar as a multiply by its reciprocal, which differs from the CPU result in
  the last bit for half of the 256 values. The table (the CPU's float32 `x / 127.5 - 1`) is
  also what the DALI pipeline looks its pixels up in, so every loader on every device yields
  identical tensors.
- `flip_rows`: the one geometric augmentation, a horizontal flip of the selected samples. It is
  applied to the clean image and to its stored noisy copy alike: flipping the clean image and
  then adding the stored noise would leak flip(x0) - x0 without noise (objective.md section 1).
"""
from __future__ import annotations

import numpy as np
import torch


# float32 value of each uint8 pixel in model units, computed once on the CPU.
UNIT_TABLE = torch.arange(256, dtype=torch.float32) / 127.5 - 1.0
_tables: dict[torch.device, torch.Tensor] = {}


def to_model_units(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1], bit-identical on every device."""
    if x.dtype != torch.uint8:
        raise TypeError(f"to_model_units: expected uint8 pixels, got {x.dtype}")
    if x.device not in _tables:
        _tables[x.device] = UNIT_TABLE.to(x.device)
    return _tables[x.device][x.int()]


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
