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
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Domain tags keep the permutation and flip streams independent even for equal (seed, epoch).
_PERMUTATION_TAG = 0x5045524D  # "PERM"
_FLIP_TAG = 0x464C4950  # "FLIP"


def _generator(seed: int, epoch: int, tag: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, tag])))


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
