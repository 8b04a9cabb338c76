"""ambient_dist.engine.ema: the half-life in images, the EDM update rule, float32 state, round trips."""
import pytest
import torch

from ambient_dist.engine.ema import EMA, ema_beta


# -- EMA ------------------------------------------------------------------------------------

def test_ema_beta_is_a_half_life_in_images():
    # No ramp: after `halflife` images (in any batch split) the old average weighs one half.
    for batch in (1, 64, 500):
        beta = ema_beta(10**9, batch, halflife_kimg=0.5, rampup_ratio=0)
        assert beta ** (500 / batch) == pytest.approx(0.5)


def test_ema_beta_ramp_caps_the_half_life_early_in_training():
    # At 1,000 images with ratio 0.05 the half-life is 50 images, not 500,000.
    beta = ema_beta(1_000, 10, halflife_kimg=500, rampup_ratio=0.05)
    assert beta == pytest.approx(0.5 ** (10 / 50))
    assert ema_beta(0, 10, 500, 0.05) == 0.0  # first step: the EMA becomes the weights
    assert ema_beta(10**9, 10, 500, 0.05) == pytest.approx(0.5 ** (10 / 500_000))


def test_ema_follows_edm_update_rule_step_by_step():
    torch.manual_seed(0)
    live = {"w": torch.randn(5), "steps": torch.tensor(0)}
    ema = EMA(live)
    reference = live["w"].clone()
    images, batch = 0, 8
    for step in range(20):
        live["w"] = live["w"] + torch.randn(5)
        live["steps"] = torch.tensor(step + 1)
        beta = ema_beta(images, batch, halflife_kimg=0.1, rampup_ratio=0.05)
        ema.update(live, beta)
        reference = beta * reference + (1 - beta) * live["w"]  # EDM: lerp(p_net, p_ema, beta)
        images += batch
    torch.testing.assert_close(ema.shadow["w"], reference, rtol=1e-6, atol=1e-6)
    assert ema.shadow["steps"].item() == 20  # integer buffers are copied, not averaged


def test_ema_first_update_with_beta_zero_equals_the_weights_exactly():
    ema = EMA({"w": torch.zeros(4)})
    w = torch.tensor([1e10, -3.0, 1e-20, 7.0])
    ema.update({"w": w}, 0.0)
    assert torch.equal(ema.shadow["w"], w)


def test_ema_of_bf16_weights_is_kept_in_float32():
    # 0.999 decay steps are far below bf16 resolution near 1.0; a bf16 average would not move.
    ema = EMA({"w": torch.ones(3, dtype=torch.bfloat16)})
    assert ema.shadow["w"].dtype == torch.float32
    for _ in range(10):
        ema.update({"w": torch.full((3,), 2.0, dtype=torch.bfloat16)}, 0.999)
    expected = 2 - 0.999 ** 10
    assert ema.shadow["w"][0].item() == pytest.approx(expected, rel=1e-5)


def test_ema_state_roundtrip_and_copy_to_module():
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = EMA.of_module(net)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    ema.update(net.state_dict(), 0.5)
    other = EMA.of_module(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)))
    other.load_state_dict(ema.state_dict())
    target = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    other.copy_to(target)
    assert torch.equal(target[0].weight, ema.shadow["0.weight"])
    with pytest.raises(KeyError, match="missing"):
        other.load_state_dict({"0.weight": torch.zeros(2, 3)})
