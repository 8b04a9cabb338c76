"""The webdataset loader: torch DataLoader worker processes read and decode WebDataset shards.

Workers take whole steps in turn (worker w of W builds the batches of steps w, w + W, ...), and
the DataLoader hands batches back in worker round-robin order, so the stream is the same as
with a single process; ranks are kept apart by `order.RankPlan`. Samples are read by random
access through each tar's DALI index (memory-mapped), not by streaming the tars in stored
order: that is what lets the order be a global permutation that is a pure function of
(seed, epoch), identical to the other loaders, and lets a run resume at any sample count.
The number of shards therefore does not limit the number of ranks x workers.

Exact resume: nothing here draws from the trainer's global RNG, which a checkpoint saves and a
resume restores. The DataLoader takes its workers' base seed from its own generator
(`order.loader_generator`), not from the global RNG as it would by default each time an
iterator starts, and each step is fetched inside `order.position_random_state`, so anything a
fetch might draw depends only on (data.seed, stream position), for any worker count.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .augment import flip_rows_numpy, to_model_units
from .loader import Batch, TrainLoader
from .order import RankPlan, SampleOrder, loader_generator, position_random_state
from .shards import ShardSet


def read_batch(shards: ShardSet, indices: np.ndarray, flips: np.ndarray):
    """Decode samples -> (keys, clean uint8 [B, C, H, W], noisy float16 [B, C, H, W], labels)."""
    samples = [shards.sample(int(i)) for i in indices]
    clean = flip_rows_numpy(np.stack([s.clean for s in samples]), flips)
    noisy = flip_rows_numpy(np.stack([s.noisy for s in samples]), flips)
    labels = np.array([s.label for s in samples], dtype=np.int64)
    return [s.key for s in samples], clean, noisy, labels


class _StepStream(IterableDataset):
    """Endless stream of (step, keys, clean, noisy, labels), split over DataLoader workers."""

    def __init__(self, shards: ShardSet, order: SampleOrder, plan: RankPlan):
        self.shards, self.order, self.plan = shards, order, plan

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for step in itertools.count(worker, workers):
            start = self.plan.step_start(step)
            with position_random_state(self.order.seed, start):
                indices, flips = self.order.positions(start, self.plan.micro_batch)
                keys, clean, noisy, labels = read_batch(self.shards, indices, flips)
            yield step, keys, torch.from_numpy(clean), torch.from_numpy(noisy), labels


class WebDatasetLoader(TrainLoader):
    name = "webdataset"

    def __init__(self, cfg, rank, world_size, device, start_sample=0, shards=None):
        super().__init__(cfg, rank, world_size, device, start_sample, shards)
        workers = cfg.data.workers
        self._loader = DataLoader(
            _StepStream(self.shards, self.order, self.plan), batch_size=None,
            num_workers=workers, pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if workers > 0 else None, persistent_workers=False,
            generator=loader_generator(cfg.data.seed, rank, start_sample))
        self._it = None

    def _next_batch(self, step: int) -> Batch:
        if self._it is None:  # started at the first batch (the workers fork then)
            self._it = iter(self._loader)
        got, keys, clean, noisy, labels = next(self._it)
        if got != step:  # would mean the worker round-robin broke: never train on a wrong order
            raise RuntimeError(f"webdataset loader: expected step {step}, a worker delivered {got}")
        clean = to_model_units(clean.to(self.device, non_blocking=True))
        noisy = noisy.to(self.device, non_blocking=True).to(torch.float32)
        return Batch(keys, clean, noisy, self.one_hot(labels, keys))

    def close(self) -> None:
        self._it = None  # drops the worker processes
