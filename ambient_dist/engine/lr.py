"""Learning-rate schedule: EDM's linear ramp-up, then constant.

The rate is a pure function of the number of images seen so far (not of the step count),
so it is the same for any batch size split and continues exactly after a resume.
"""
from __future__ import annotations

import torch

from ambient_dist.config import OptimizerConfig


def learning_rate(opt: OptimizerConfig, images_seen: int) -> float:
    """lr * min(images_seen / ramp, 1), with the ramp given in thousands of images.

    As in EDM, the first step (images_seen = 0) runs at rate 0 when a ramp is configured;
    a ramp of 0 means the full rate from the start.
    """
    ramp_images = opt.lr_rampup_kimg * 1000
    if ramp_images <= 0:
        return opt.lr
    return opt.lr * min(images_seen / ramp_images, 1.0)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
