"""Pixel conversions shared by every loader, so that all of them produce identical tensors.

- `to_model_units`: uint8 -> float32 in [-1, 1] as `x / 127.5 - 1` (the project's units),
  through a 256-entry table. Float arithmetic would not give the same bits everywhere: CUDA
  divides by a scalar as a multiply by its reciprocal, which differs from the CPU result in
  the last bit for half of the 256 values. The table (the CPU's float32 `x / 127.5 - 1`) is
  also what the DALI pipeline looks its pixels up in, so every loader on every device yields
  identical tensors.
- `flip_rows`: the loaders' random horizontal flip (data.xflip). It is applied to the clean
  image and to its stored noisy copy alike: flipping the clean image and then adding the stored
  noise would leak flip(x0) - x0 without noise (objective.md section 1).
- `GeometricAugment`: the rest of the geometric augmentation (config section `augment`), done on
  the device inside the loss once the branch of every sample is known. Two kinds of transform:
  * exact ones move whole pixels (yflip, rotate90, and translate, which wraps around the
    border). They are applied to the clean image and its noisy copy alike and turn the
    stored noise into a permutation of itself, so it stays white noise of std sigma_tn and
    the ambient loss stays unbiased;
  * interpolating ones (scale, rotate, aniso) resample the image, which would blur the stored
    noise (its covariance would no longer be sigma_tn^2 I and the ambient target would be
    biased). They go to clean-branch samples only, whose noisy copies the loss never reads.
  The network is conditioned on what was done (`AUGMENT_LABEL_DIM` labels, layout below) and
  samples with zero labels, as in EDM, so augmented geometry does not leak into samples.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ambient_dist.config import (AUGMENT_LABEL_DIM, EXACT_AUGMENTATIONS,
                                 INTERPOLATING_AUGMENTATIONS, AugmentConfig)
from ambient_dist.noise import draw_normal, draw_uniform


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


# ----------------------------------------------------------------------------------------
# Geometric augmentation with labels.
# ----------------------------------------------------------------------------------------

# Order of the per-transform "is it applied" draws (fixed, whatever is enabled, so that
# enabling one transform does not change the draws of the others).
_TRANSFORMS = EXACT_AUGMENTATIONS + INTERPOLATING_AUGMENTATIONS

# Layout of the augmentation labels (zero = not augmented):
#   0     yflip (1 = flipped upside down)
#   1, 2  cos(theta) - 1, sin(theta): total rotation, rotate90 quarter turns plus `rotate`
#   3, 4  translation along width and height, in fractions of the image size
#   5     log2 of the isotropic scale
#   6, 7  log2 of the anisotropic stretch a, times cos(2 phi) and sin(2 phi) (phi: its axis)
assert AUGMENT_LABEL_DIM == 8


def rotation_matrices(theta: torch.Tensor) -> torch.Tensor:
    """[B] angles -> [B, 2, 2] rotations in (width, height) image coordinates, turning the same
    way as torch.rot90(x, 1, dims=(-2, -1)) for theta = pi/2."""
    c, s = theta.cos(), theta.sin()
    return torch.stack([torch.stack([c, s], -1), torch.stack([-s, c], -1)], -2)


def warp(images: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Apply [B, 2, 2] linear maps about the image centre (bilinear, reflected border)."""
    # The sampling grid maps output pixels back to input pixels: the inverse map, written out
    # for 2x2 (torch.linalg.inv would wait for the GPU to check for singular matrices).
    (a, b), (c, d) = matrices[:, 0].unbind(-1), matrices[:, 1].unbind(-1)
    inverse = torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2)
    inverse = inverse / (a * d - b * c)[:, None, None]
    theta = torch.cat([inverse, inverse.new_zeros(len(images), 2, 1)], dim=2)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="reflection",
                         align_corners=False).to(images.dtype)


def _roll_rows(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Per-sample torch.roll by (dy, dx) pixels along (height, width): a pixel permutation."""
    B, _, H, W = x.shape
    rows = (torch.arange(H, device=x.device) - dy[:, None]) % H           # [B, H]
    cols = (torch.arange(W, device=x.device) - dx[:, None]) % W           # [B, W]
    b = torch.arange(B, device=x.device)[:, None, None]
    return x.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


class GeometricAugment:
    """augment(clean, noisy, ambient, generator) -> (clean, noisy, labels [B, 8]).

    Every sample draws the same random numbers from `generator` (a fixed count per batch), so
    a resumed run replays the augmentation exactly."""

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg
        self.enabled = torch.tensor([name in cfg.transforms for name in _TRANSFORMS])
        self.resamples = any(name in cfg.transforms for name in INTERPOLATING_AUGMENTATIONS)
        # Set `record` to keep (a copy of) what the next call hands the loss, for a picture:
        # per sample the image its branch reads, the clean image or the noisy copy.
        self.record, self.recorded = False, None

    def __call__(self, clean: torch.Tensor, noisy: Optional[torch.Tensor], ambient: torch.Tensor,
                 generator: Optional[torch.Generator] = None):
        B, _, H, W = clean.shape
        if H != W:
            raise ValueError(f"augment: rotate90 and the label layout need square images, got {H}x{W}")
        dev, c = clean.device, self.cfg
        if self.enabled.device != dev:  # moved once: a copy per step would be a host round trip
            self.enabled = self.enabled.to(dev)
        apply = (draw_uniform([B, len(_TRANSFORMS)], generator, dev) < c.p) & self.enabled
        normal = draw_normal([B, 4], generator, dev)
        uniform = draw_uniform([B, 3], generator, dev)
        interpolate = apply & ~ambient.to(dev)[:, None]   # resampling: clean-branch samples only

        yflip = apply[:, 0]
        quarter_turns = torch.where(apply[:, 1], 1 + (uniform[:, 0] * 3).long().clamp(max=2), 0)
        shift = torch.where(apply[:, 2, None], (normal[:, :2] * c.translate_std * W).round(), 0.0)
        log2_scale = torch.where(interpolate[:, 3], normal[:, 2] * c.scale_std, 0.0)
        angle = torch.where(interpolate[:, 4], (2 * uniform[:, 1] - 1) * math.pi, 0.0)
        log2_aniso = torch.where(interpolate[:, 5], normal[:, 3] * c.aniso_std, 0.0)
        aniso_axis = uniform[:, 2] * math.pi

        channels_last = clean.is_contiguous(memory_format=torch.channels_last)
        clean, noisy = (self._exact(x, yflip, quarter_turns, shift) for x in (clean, noisy))
        if self.resamples:
            # In float32 even inside the step's bf16 autocast: geometry is not a matmul to round.
            with torch.autocast(dev.type, enabled=False):
                axis = rotation_matrices(aniso_axis)
                stretch = torch.diag_embed(torch.stack([2 ** log2_aniso, 2 ** -log2_aniso], -1))
                matrices = (rotation_matrices(angle) * (2 ** log2_scale)[:, None, None]
                            @ axis @ stretch @ axis.transpose(1, 2))
                warped = warp(clean, matrices)
            # Samples left alone keep their exact pixels (an identity resampling is not exact).
            needs_warp = (log2_scale != 0) | (angle != 0) | (log2_aniso != 0)
            clean = torch.where(needs_warp[:, None, None, None], warped, clean)
        if channels_last:
            clean = clean.contiguous(memory_format=torch.channels_last)
            noisy = None if noisy is None else noisy.contiguous(memory_format=torch.channels_last)

        theta = quarter_turns * (math.pi / 2) + angle
        labels = torch.stack([
            yflip.float(), theta.cos() - 1, theta.sin(), shift[:, 0] / W, shift[:, 1] / H,
            log2_scale, log2_aniso * (2 * aniso_axis).cos(), log2_aniso * (2 * aniso_axis).sin(),
        ], dim=1)
        if self.record:
            read = clean if noisy is None else torch.where(ambient.to(dev)[:, None, None, None], noisy, clean)
            self.record, self.recorded = False, read[:16].detach().float().cpu()
        return clean, noisy, labels

    @staticmethod
    def _exact(x: Optional[torch.Tensor], yflip, quarter_turns, shift) -> Optional[torch.Tensor]:
        """The pixel-permuting transforms, applied identically to clean images and noisy copies."""
        # Written without data-dependent branches, so the step never waits for the GPU here.
        if x is None:
            return None
        x = torch.where(yflip[:, None, None, None], x.flip(-2), x)
        for k in (1, 2, 3):
            x = torch.where((quarter_turns == k)[:, None, None, None], torch.rot90(x, k, dims=(-2, -1)), x)
        return _roll_rows(x, shift[:, 1].long(), shift[:, 0].long())
