"""The data order: which sample, flipped or not, sits at each position of the training stream.

Every loader (resident, webdataset, DALI) draws its batches from this one definition, so they
differ only in how they fetch bytes, never in what they yield:

- Training consumes an endless stream of sample positions 0, 1, 2, ...; position p belongs to
  epoch p // N and is the (p % N)-th entry of that epoch's permutation of the N sample indices.
  Every epoch therefore holds each sample exactly once, whatever the batch size, the number of
  ranks or the number of shards (a batch may straddle two epochs).
- The permutation and the horizontal-flip bit of every sample are pure functions of
  (seed, epoch) and (seed, epoch, sample index); nothing depends on global RNG state, on the
  number of workers, or on where the run started. A resumed run that starts at sample count S
  consumes exactly positions S, S+1, ... as the uninterrupted run did.
- One global step takes `global_batch = micro_batch * world_size` consecutive positions; rank r
  takes its contiguous slice [r * micro_batch, (r + 1) * micro_batch) of them, so ranks (and
  the workers that fetch alternate steps) see disjoint samples and together see all of them.
- Code that fetches a step ahead of it or in another process (webdataset workers, the DALI
  feeder) runs inside `position_random_state(seed, position)`: torch's, numpy's and Python's
  global RNGs are seeded from (seed, the step's first stream position) for the fetch, and the
  caller's states are put back after. The fetch draws nothing today; if it ever does, what it
  draws is still a pure function of (seed, position), the same for every worker count and
  resume point, and the trainer's global RNG (which a checkpoint saves) is never touched.
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ambient_dist.noise import key_seed

# Domain tags keep the permutation and flip streams independent even for equal (seed, epoch).
_PERMUTATION_TAG = 0x5045524D  # "PERM"
_FLIP_TAG = 0x464C4950  # "FLIP"


def _generator(seed: int, epoch: int, tag: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, tag])))


def loader_generator(seed: int, rank: int, start_sample: int) -> torch.Generator:
    """The CPU generator a torch DataLoader draws its workers' base seed from. Without one it
    draws from the global RNG each time an iterator starts: after a resume has restored that
    RNG, which shifted every later draw (dropout) away from the uninterrupted run's."""
    return torch.Generator().manual_seed(key_seed(seed, f"loader/{rank}/{start_sample}"))


@contextlib.contextmanager
def position_random_state(seed: int, position: int) -> Iterator[None]:
    """Seed torch's (CPU), numpy's and Python's global RNGs from (seed, stream `position`) for
    the block, then restore the caller's states (see the module docstring)."""
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    python_state = random.getstate()
    key = key_seed(seed, f"fetch/{position}")
    torch.default_generator.manual_seed(key)  # not torch.manual_seed: that reseeds CUDA too
    np.random.seed([key & 0xFFFFFFFF, key >> 32])
    random.seed(key)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


class SampleOrder:
    """Maps stream positions to (sample index, flip bit) for a dataset of `num_samples`."""

    def __init__(self, num_samples: int, seed: int, xflip: bool):
        if num_samples <= 0:
            raise ValueError(f"data order: need at least one sample, got {num_samples}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.xflip = bool(xflip)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(permutation int64 [N], flip bits bool [N] indexed by sample index) of one epoch."""
        if epoch not in self._cache:
            perm = _generator(self.seed, epoch, _PERMUTATION_TAG).permutation(self.num_samples)
            if self.xflip:
                flips = _generator(self.seed, epoch, _FLIP_TAG).random(self.num_samples) < 0.5
            else:
                flips = np.zeros(self.num_samples, dtype=bool)
            # Two epochs are enough: a batch straddles at most one epoch boundary.
            if len(self._cache) >= 2:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = (perm.astype(np.int64), flips)
        return self._cache[epoch]

    def positions(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample indices and flip bits of stream positions [start, start + count)."""
        if start < 0 or count < 0:
            raise ValueError(f"data order: bad position range start={start} count={count}")
        pos = np.arange(start, start + count, dtype=np.int64)
        epochs = pos // self.num_samples
        indices = np.empty(count, dtype=np.int64)
        flips = np.empty(count, dtype=bool)
        for e in np.unique(epochs):
            sel = epochs == e
            perm, flip_bits = self.epoch(int(e))
            idx = perm[pos[sel] % self.num_samples]
            indices[sel] = idx
            flips[sel] = flip_bits[idx]
        return indices, flips


@dataclass(frozen=True)
class RankPlan:
    """Which stream positions one rank reads at each of its steps."""

    micro_batch: int
    world_size: int
    rank: int
    start_sample: int = 0

    def __post_init__(self):
        if self.micro_batch <= 0:
            raise ValueError(f"data loader: micro-batch must be > 0, got {self.micro_batch}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"data loader: rank {self.rank} outside world size {self.world_size}")
        if self.start_sample < 0:
            raise ValueError(f"data loader: start_sample must be >= 0, got {self.start_sample}")

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.world_size

    def step_start(self, step: int) -> int:
        """First stream position of this rank's micro-batch at `step` (counted from the start)."""
        return self.start_sample + step * self.global_batch + self.rank * self.micro_batch

    def samples_seen(self, steps_done: int) -> int:
        """Global sample count (all ranks) after `steps_done` steps."""
        return self.start_sample + steps_done * self.global_batch
