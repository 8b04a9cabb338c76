"""Model-unit images -> pixels, PNG bytes and image grids (one home for training, metrics, sampling).

    to_uint8(images)            float [-1, 1] -> uint8, the exact inverse of uint8 / 127.5 - 1
    encode_png(image)           uint8 [H, W, C] -> lossless PNG bytes
    image_grid(images)          [N, C, H, W] in [-1, 1] -> one uint8 [rows*H, cols*W, C] mosaic
    save_image_grid(images, p)  that mosaic as a PNG file, written atomically

The inverse direction (uint8 -> [-1, 1], bit-identical on every device) is
`ambient_dist.data.augment.to_model_units`, where the loaders' lookup table lives.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from ambient_dist.fileio import atomic_path

__all__ = ["to_uint8", "encode_png", "image_grid", "save_image_grid"]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 (same layout), the exact inverse of uint8 / 127.5 - 1.
    Values outside [-1, 1] (sampler overshoot) are clamped to 0 / 255."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H, W, C] -> PNG bytes (lossless; grey for C = 1)."""
    buf = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buf, format="png")
    return buf.getvalue()


def image_grid(images: torch.Tensor, columns: Optional[int] = None) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> one uint8 [rows*H, cols*W, C] mosaic (C = 1 or 3), filled
    row by row; `columns` defaults to ceil(sqrt(N)), unused cells are black."""
    n, c, h, w = images.shape
    cols = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    pixels = to_uint8(images.detach().cpu())
    grid = torch.zeros(rows * cols, c, h, w, dtype=torch.uint8)
    grid[:n] = pixels
    grid = grid.reshape(rows, cols, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, c)
    return grid.numpy()


def save_image_grid(images: torch.Tensor, path: str | Path) -> Path:
    """Write `image_grid(images)` to `path` as a PNG (atomically); return the path."""
    path = Path(path)
    grid = image_grid(images)
    with atomic_path(path, suffix=".png") as tmp:  # PIL reads the format from the suffix
        Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid).save(tmp)
    return path
