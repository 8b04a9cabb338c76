"""What every training loader shares: the `Batch` it yields and the resume state.

`PlannedLoader` (order, rank plan, resume counter) is also the base of the latent loader in
`text.latents`; `TrainLoader` adds what the pixel loaders share (resident, webdataset_loader,
dali_loader subclass it; `data.build.build_loader` picks one). Each loader is an endless
iterator of this rank's micro-batches; which samples those are is fixed by
`order.SampleOrder` / `order.RankPlan`, so the three loaders yield identical batches and a
loader built with `start_sample=S` continues exactly where a run that had consumed S samples
(all ranks together) stood.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ambient_dist.config import ExperimentConfig

from .augment import flip_rows
from .order import RankPlan, SampleOrder
from .shards import ShardError, ShardSet, check_manifest, read_masks


@dataclass
class Batch:
    """One rank's micro-batch. The loader that yields it owns its device and dtype: every
    tensor is already on the training device, images float32. `to` only changes the memory
    format of the image tensors (the network's choice, e.g. channels_last)."""
    keys: list[str]
    clean: torch.Tensor              # float32 [B, C, H, W] in [-1, 1] (or VAE latents, scaled)
    noisy: torch.Tensor              # float32 [B, C, H, W], the fixed noisy copies (same flips)
    labels: Optional[torch.Tensor]   # float32 one-hot [B, num_classes] (class-conditional), or None
    # float32 0/1 [B, C, H, W]: each image's fixed inpainting mask (same flips), masking only
    mask: Optional[torch.Tensor] = None
    # float32 [B, tokens, dim]: the text embedding a text-conditional U-Net attends to, or None
    cond: Optional[torch.Tensor] = None

    def to(self, memory_format: torch.memory_format = torch.contiguous_format) -> "Batch":
        """The same batch with its image tensors in `memory_format` (no copy if they are)."""
        def fmt(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if x is None else x.contiguous(memory_format=memory_format)
        return dataclasses.replace(self, clean=fmt(self.clean), noisy=fmt(self.noisy),
                                   mask=fmt(self.mask))


# Manifest fields that decide the stored data, recorded with the loader position so that a
# resume (and an evaluation) can say what changed if the shards were remade (data_differences).
DATA_FIELDS = ("noise_seed", "sigma_tn", "t_n", "subset_seed", "resolution", "channels")


def data_identity(manifest: dict, shards_dir) -> dict:
    """What a run records of the shards it trains on: the manifest's plan hash (the source
    images and every option that made the stored data), the DATA_FIELDS for a readable
    difference, and the directory. What resume, ambient-evaluate and ambient-sample-text
    compare (`data_differences`) before they use shards as the run's training set."""
    return {"manifest_plan": manifest["plan"], "shards": str(shards_dir),
            "data": {k: manifest.get(k) for k in DATA_FIELDS}}


def data_differences(saved: dict, now: dict) -> list[str]:
    """What differs between recorded data (`data_identity`, or a loader state holding it)
    and `now`; empty when both hold the same images and the same fixed noisy copies."""
    if saved.get("manifest_plan") == now["manifest_plan"]:
        return []
    old = saved.get("data") or {}
    diffs = [f"{k} {old[k]} then, {now['data'][k]} now" for k in DATA_FIELDS
             if k in old and old[k] != now["data"][k]]
    return diffs or ["the shards' plan hash (the source images or options)"]


class PlannedLoader:
    """What every shard loader (pixel or latent) shares: the order, this rank's plan and the
    resume counter. Subclasses implement `_next_batch(step)` returning this rank's batch of
    `step` (counted from the start)."""

    def __init__(self, cfg: ExperimentConfig, shards, num_samples: int, order: SampleOrder,
                 plan: RankPlan):
        self.cfg, self.shards = cfg, shards
        self.num_samples, self.order, self.plan = num_samples, order, plan
        self.steps_done = 0

    def step_samples(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(sample indices, flip bits) of this rank's micro-batch at `step`."""
        return self.order.positions(self.plan.step_start(step), self.plan.micro_batch)

    @property
    def samples_seen(self) -> int:
        """Samples consumed by all ranks together after the batches yielded so far."""
        return self.plan.samples_seen(self.steps_done)

    DATA_FIELDS = DATA_FIELDS

    def state_dict(self) -> dict:
        return {"samples_seen": self.samples_seen, "seed": self.cfg.data.seed,
                "num_samples": self.num_samples, **data_identity(self.shards.manifest, self.shards.dir)}

    def data_differences(self, saved: dict) -> list[str]:
        """What differs between the data a checkpoint's loader `saved` and these shards;
        empty when they hold the same images and the same fixed noisy copies."""
        return data_differences(saved, self.state_dict())

    def __iter__(self):
        return self

    def __next__(self):
        batch = self._next_batch(self.steps_done)
        self.steps_done += 1
        return batch

    def _next_batch(self, step: int):
        raise NotImplementedError

    def close(self) -> None:
        """Stop background workers (if any)."""


class TrainLoader(PlannedLoader):
    """Base class of the pixel loaders: opens and checks the shards, one-hot labels. Subclasses
    implement `_next_batch(step)` returning this rank's `Batch` of `step`."""

    name = "base"

    def __init__(self, cfg: ExperimentConfig, rank: int, world_size: int, device,
                 start_sample: int = 0, shards: Optional[ShardSet] = None):
        self.cfg = cfg
        self.device = torch.device(device)
        if shards is None:
            shards = ShardSet(cfg.data.shards, verify=True, verify_share=(rank, world_size))
        check_manifest(shards.manifest, cfg)
        # data.subset takes a prefix of the stored order, which make_shards wrote shuffled.
        num_samples = cfg.data.subset or len(shards)
        order = SampleOrder(num_samples, cfg.data.seed, cfg.data.xflip)
        plan = RankPlan(cfg.micro_batch(world_size), world_size, rank, start_sample)
        super().__init__(cfg, shards, num_samples, order, plan)
        self.num_classes = cfg.data.num_classes
        # The masking baseline's fixed masks, looked up by key for every loader alike (they
        # are small: one bit per pixel) and flipped with their image.
        self.masks = None
        if cfg.objective.method == "masking":
            self.masks = torch.from_numpy(read_masks(shards.dir, shards.keys[:num_samples]))

    def __next__(self) -> Batch:
        step = self.steps_done
        batch = super().__next__()
        if self.masks is not None:
            indices, flips = self.step_samples(step)
            if [self.shards.keys[i] for i in indices] != list(batch.keys):
                raise RuntimeError(f"{self.name} loader: batch keys do not follow the plan at step {step}")
            mask = flip_rows(self.masks[torch.from_numpy(indices)], torch.from_numpy(flips))
            batch.mask = mask.to(self.device, torch.float32)
        return batch

    def one_hot(self, labels, keys: list[str]) -> Optional[torch.Tensor]:
        if not self.num_classes:
            return None
        labels = np.asarray(labels, dtype=np.int64)
        bad = (labels < 0) | (labels >= self.num_classes)
        if bad.any():
            j = int(np.argmax(bad))
            raise ShardError(f"{self.cfg.data.shards}, key {keys[j]}: label {int(labels[j])} is not "
                             f"in [0, {self.num_classes}) (data.num_classes)")
        eye = torch.eye(self.num_classes, dtype=torch.float32)
        return eye[torch.from_numpy(labels)].to(self.device)

    def _next_batch(self, step: int) -> Batch:
        raise NotImplementedError
