"""ambient_dist.data.order: epochs are exact seeded permutations; rank plans slice them; what a
fetch draws is keyed by its stream position."""
import random

import numpy as np
import pytest
import torch

from ambient_dist.data.order import RankPlan, SampleOrder, loader_generator, position_random_state
from helpers import global_random_states

N = 21  # not a multiple of any batch size, as in test_data_loader.py


def test_epochs_are_exact_permutations_and_depend_on_seed():
    order = SampleOrder(N, seed=3, xflip=True)
    idx, _ = order.positions(0, 3 * N)
    for e in range(3):
        assert sorted(idx[e * N:(e + 1) * N]) == list(range(N))
    assert not np.array_equal(idx[:N], idx[N:2 * N])  # reshuffled each epoch
    again, flips = SampleOrder(N, seed=3, xflip=True).positions(5, 30)
    assert np.array_equal(again, idx[5:35])
    other, _ = SampleOrder(N, seed=4, xflip=True).positions(0, N)
    assert not np.array_equal(other, idx[:N])
    # A sample's flip bit depends on (seed, epoch, sample), not on where it sits in a batch.
    _, flips_a = order.positions(0, N)
    perm, bits = order.epoch(0)
    assert np.array_equal(flips_a, bits[perm])


def test_rank_plan_slices():
    plan = RankPlan(micro_batch=3, world_size=4, rank=2, start_sample=10)
    assert plan.global_batch == 12 and plan.step_start(0) == 16 and plan.step_start(2) == 40
    with pytest.raises(ValueError, match="rank 4 outside world size 4"):
        RankPlan(3, 4, 4)


def test_a_fetch_draws_from_its_position_and_leaves_the_callers_random_states():
    def draws(seed, position):
        with position_random_state(seed, position):
            return torch.rand(2).tolist(), np.random.random(), random.random()
    before = global_random_states()
    assert draws(0, 12) == draws(0, 12)
    assert draws(0, 12) != draws(0, 13) and draws(0, 12) != draws(1, 12)
    assert global_random_states() == before
    with pytest.raises(KeyError):  # put back even when the fetch fails
        with position_random_state(0, 1):
            torch.rand(3)
            raise KeyError("bad sample")
    assert global_random_states() == before


def test_the_dataloader_generator_is_a_function_of_seed_rank_and_start():
    seeds = {(s, r, p): loader_generator(s, r, p).initial_seed()
             for s in (0, 1) for r in (0, 1) for p in (0, 64)}
    assert len(set(seeds.values())) == len(seeds)
    assert loader_generator(1, 0, 64).initial_seed() == seeds[1, 0, 64]
