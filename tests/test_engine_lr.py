"""ambient_dist.engine.lr: the learning-rate ramp in images and setting it on every group."""
import pytest
import torch

from ambient_dist.config import OptimizerConfig
from ambient_dist.engine.lr import learning_rate, set_learning_rate


# -- learning-rate ramp -------------------------------------------------------------------

def test_lr_ramps_linearly_in_images_then_stays_constant():
    opt = OptimizerConfig(lr=2e-4, lr_rampup_kimg=10)  # ramp over 10,000 images
    assert learning_rate(opt, 0) == 0.0  # EDM: the very first step runs at rate 0
    assert learning_rate(opt, 2_500) == pytest.approx(0.5e-4)
    assert learning_rate(opt, 5_000) == pytest.approx(1e-4)
    assert learning_rate(opt, 10_000) == pytest.approx(2e-4)
    assert learning_rate(opt, 10_000_000) == pytest.approx(2e-4)


def test_lr_without_ramp_is_the_full_rate_from_the_start():
    assert learning_rate(OptimizerConfig(lr=3e-4, lr_rampup_kimg=0), 0) == 3e-4


def test_set_learning_rate_sets_every_group():
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([{"params": [p1]}, {"params": [p2]}], lr=1.0)
    set_learning_rate(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]
