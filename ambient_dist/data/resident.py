"""The resident loader: for small datasets (the paper's 300 to 3,000 images).

All samples are decoded once and held on the device (clean images as uint8, noisy copies as
float16: 3,000 RGB 64x64 images take 110 MB). Each step gathers its micro-batch by index,
flips and converts on the device: no I/O and no worker processes after start-up.
"""
from __future__ import annotations

import numpy as np
import torch

from .augment import flip_rows, to_model_units
from .loader import Batch, TrainLoader


class ResidentLoader(TrainLoader):
    name = "resident"

    def __init__(self, cfg, rank, world_size, device, start_sample=0, shards=None):
        super().__init__(cfg, rank, world_size, device, start_sample, shards)
        samples = [self.shards.sample(i) for i in range(self.num_samples)]
        self.keys = [s.key for s in samples]
        self.labels = np.array([s.label for s in samples], dtype=np.int64)
        self.clean = torch.from_numpy(np.stack([s.clean for s in samples])).to(self.device)
        self.noisy = torch.from_numpy(np.stack([s.noisy for s in samples])).to(self.device)

    def _next_batch(self, step: int) -> Batch:
        indices, flips = self.step_samples(step)
        idx = torch.from_numpy(indices).to(self.device)
        flip = torch.from_numpy(flips).to(self.device)
        clean = to_model_units(flip_rows(self.clean.index_select(0, idx), flip))
        noisy = flip_rows(self.noisy.index_select(0, idx), flip).to(torch.float32)
        keys = [self.keys[i] for i in indices]
        return Batch(keys, clean, noisy, self.one_hot(self.labels[indices], keys))
