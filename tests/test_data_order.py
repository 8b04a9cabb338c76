"""ambient_dist.data.order: epochs are exact seeded permutations; rank plans slice them."""
import numpy as np
import pytest

from ambient_dist.data.order import RankPlan, SampleOrder

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
