"""What is trained: the Task the Trainer is given (the Backend says how a step runs).

A task builds the network, the loss and the loader, computes one micro-batch's loss, and turns
EMA weights into samples. `ImageTask` (here) trains our EDM-family networks on pixel or latent
shards; `TextTask` (ambient_dist/text/task.py) fine-tunes Stable Diffusion's U-Net on latent
shards with captions. `cfg.task` chooses (engine/run.py); a new task is one class with these
methods.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Protocol

import torch
import yaml

from ambient_dist import data, metrics, sampling
from ambient_dist.config import ExperimentConfig, to_dict
from ambient_dist.data.augment import GeometricAugment
from ambient_dist.data.loader import Batch
from ambient_dist.models import build_network
from ambient_dist.models.flops import train_gflop_per_image
from ambient_dist.objective import LossOutput, build_loss


def shard_reference_images(cfg: ExperimentConfig) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The images trained on (data.subset takes a prefix of the stored order) and the held-out
    images (never trained on; None if the shards hold none), float32 [N, C, H, W] in [-1, 1]:
    what the memorization summary compares samples with."""
    shards = cfg.data.shards
    train = data.load_model_images(shards, "train", cfg.data.subset)
    if not data.read_manifest(shards).get("heldout"):
        return train, None
    return train, data.load_model_images(shards, "heldout", cfg.evaluation.heldout_images)


class Task(Protocol):
    """What the Trainer needs to know about what it trains (ImageTask, text.task.TextTask)."""

    def build_network(self) -> torch.nn.Module: ...
    def build_loader(self, rank: int, world_size: int, start_sample: int): ...
    def loss(self, net: torch.nn.Module, batch: Batch, generator: torch.Generator,
             backward_scale: float) -> LossOutput: ...
    def pictures(self) -> dict[str, torch.Tensor]: ...
    def sampling_network(self, weights: dict[str, torch.Tensor]) -> torch.nn.Module: ...
    def generate(self, net: torch.nn.Module, num_images: int) -> torch.Tensor: ...
    def reference_images(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]: ...
    def attraction(self, net: torch.nn.Module, heldout: torch.Tensor,
                   train: torch.Tensor) -> Optional[dict]: ...
    def finish(self, weights: dict[str, torch.Tensor], run_dir: Path, is_main: bool) -> None: ...

    # Class-level, used before a task is built (no model is loaded):
    @staticmethod
    def describe(cfg: ExperimentConfig) -> str: ...
    @staticmethod
    def check_data(cfg: ExperimentConfig) -> None: ...


class ImageTask:
    """An EDM-family network (models.build_network) trained with the configured objective
    (objective.build_loss) on shards (data.build_loader), with geometric augmentation."""

    def __init__(self, cfg: ExperimentConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.loss_fn = build_loss(cfg.objective)
        self.augment = GeometricAugment(cfg.augment) if cfg.augment.p > 0 else None
        self._first_picture = False

    def build_network(self) -> torch.nn.Module:
        net = build_network(self.cfg)
        if self.cfg.train.compile:
            # Compile the U-Net call the loss makes (net.raw); the module and its state_dict
            # keys stay as they are, so checkpoints are the same with or without compile.
            net.raw = torch.compile(net.raw)
        return net

    def build_loader(self, rank: int, world_size: int, start_sample: int):
        """An endless iterator of this rank's `Batch`es with state_dict() / data_differences(),
        continuing after `start_sample` samples (all ranks together)."""
        # augmentation.png pictures the run's first batch; a resumed run has it already.
        self._first_picture = self.augment is not None and start_sample == 0
        return data.build_loader(self.cfg, rank, world_size, self.device, start_sample=start_sample)

    def loss(self, net: torch.nn.Module, batch: Batch, generator: torch.Generator,
             backward_scale: float = 1.0) -> LossOutput:
        if self._first_picture:
            self.augment.record = True  # augmentation.png: the first batch as the loss reads it
            self._first_picture = False
        return self.loss_fn(net, batch.clean, batch.noisy, batch.labels, generator=generator,
                            augment=self.augment, mask=batch.mask, backward_scale=backward_scale)

    def pictures(self) -> dict[str, torch.Tensor]:
        """Pictures to publish after the last step: {"augmentation": what the loss read in the
        first micro-batch after augmentation} once, else nothing."""
        if self.augment is None or self.augment.recorded is None:
            return {}
        images, self.augment.recorded = self.augment.recorded, None
        return {"augmentation": images}

    def sampling_network(self, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
        net = build_network(self.cfg).to(self.device).eval().requires_grad_(False)
        net.load_state_dict(weights)
        return net

    def generate(self, net: torch.nn.Module, num_images: int) -> torch.Tensor:
        """Images 0..num_images-1 [N, C, H, W] in [-1, 1] with the EDM Heun sampler. Each image
        has its own seed (sampling.seed, index), so the grid is the same at any batch size;
        class-conditional networks cycle through the classes."""
        indices = list(range(num_images))
        labels = sampling.class_labels(indices, net.label_dim)
        labels = None if labels is None else labels.to(self.device)
        bf16 = self.cfg.train.precision == "bf16"
        return sampling.edm_sample(
            net, indices, (net.img_channels, net.img_resolution, net.img_resolution),
            seed=self.cfg.sampling.seed, labels=labels,
            settings=sampling.SamplerSettings.for_run(self.cfg),
            autocast_dtype=torch.bfloat16 if bf16 else None, device=self.device)

    def reference_images(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return shard_reference_images(self.cfg)

    def attraction(self, net: torch.nn.Module, heldout: torch.Tensor,
                   train: torch.Tensor) -> Optional[dict]:
        """The denoiser attraction of (up to 128) held-out images: noised, denoised once by the
        EMA network, compared with the nearest training image (metrics.network_attraction)."""
        return metrics.network_attraction(net, sampling.SamplerSettings.for_run(self.cfg),
                                          heldout[:128], train, metrics.ATTRACTION_SIGMAS,
                                          self.device)

    def finish(self, weights: dict[str, torch.Tensor], run_dir: Path, is_main: bool) -> None:
        """Nothing beyond ema.safetensors (which the run writes for every task)."""

    @staticmethod
    def describe(cfg: ExperimentConfig) -> str:
        """The resolved config as YAML, the parameter count and the training cost per image."""
        net = build_network(cfg)
        params = sum(p.numel() for p in net.parameters())
        gflop = train_gflop_per_image(net, cfg.data.resolution, cfg.data.channels, net.label_dim)
        return (yaml.safe_dump(to_dict(cfg), sort_keys=False)
                + f"parameters: {params}\ntrain GFLOP/image: {gflop:.2f}")

    @staticmethod
    def check_data(cfg: ExperimentConfig) -> None:
        """Nothing to check before the network is built (the loader checks the shards)."""
