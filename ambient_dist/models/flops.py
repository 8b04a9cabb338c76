"""FLOPs of a denoiser per image, counted by `torch.utils.flop_counter` (the numbers MFU is
computed from; docs/performance: DDPM++ CIFAR-10 = 42.4 GFLOP forward, 127.1 per training
step, measured on the reference code).

What is counted: matrix products and convolutions (the flop counter's registry), 2 FLOPs per
multiply-add. Attention is forced onto PyTorch's math backend while counting, because the
fused CPU attention kernel is not in the registry and would otherwise count as zero on one
device and non-zero on another. Elementwise work (norms, activations) is not counted, as in
the reference figures. A training step is forward + backward of a scalar loss with respect
to all parameters (not the input image), as in training.

Counting runs on a "meta" copy of the net (shapes only, no arithmetic): the count is the
same as on a real device, takes seconds even for ImageNet-size networks on a CPU, and leaves
the caller's model untouched.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def _count(net: nn.Module, backward: bool, batch: int, resolution: Optional[int],
           channels: Optional[int], label_dim: Optional[int]) -> float:
    resolution = net.img_resolution if resolution is None else resolution
    channels = net.img_channels if channels is None else channels
    label_dim = net.label_dim if label_dim is None else label_dim
    # A shape-only copy: nothing is computed, and the caller's net keeps its state (no
    # gradients left behind; frozen nets, e.g. EMA copies, still count a training step).
    net = copy.deepcopy(net).to("meta").requires_grad_(True)
    with torch.device("meta"):
        x = torch.randn(batch, channels, resolution, resolution)
        sigma = torch.ones(batch)
        labels = torch.zeros(batch, label_dim) if label_dim else None
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel([SDPBackend.MATH]), torch.set_grad_enabled(backward):
        out = net(x, sigma, labels)
        if backward:
            # allow_unused: a call without augmentation labels leaves the augmentation
            # embedding (a negligible 8 x C matrix product in training) out of the graph.
            torch.autograd.grad(out.float().square().mean(), list(net.parameters()),
                                allow_unused=True)
    return counter.get_total_flops() / batch / 1e9


def forward_gflop_per_image(net: nn.Module, resolution: Optional[int] = None,
                            channels: Optional[int] = None, label_dim: Optional[int] = None,
                            batch: int = 2) -> float:
    """GFLOP of one forward pass per image (sizes default to the net's attributes)."""
    return _count(net, False, batch, resolution, channels, label_dim)


def train_gflop_per_image(net: nn.Module, resolution: Optional[int] = None,
                          channels: Optional[int] = None, label_dim: Optional[int] = None,
                          batch: int = 2) -> float:
    """GFLOP of forward + backward (all parameter gradients) per image."""
    return _count(net, True, batch, resolution, channels, label_dim)
