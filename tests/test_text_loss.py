"""ambient_dist.text.loss: the epsilon form of the latent loss, and the text loss with its
mitigations off and with the prediction-magnitude filter.

The Monte Carlo unbiasedness of the ambient v target is tested in test_objective.py
(test_latent_v_targets_have_posterior_mean) and not repeated.
"""
import pytest
import torch

from ambient_dist.config import ObjectiveConfig
from ambient_dist.noise import ddpm_alpha_sigma
from ambient_dist.objective import LatentVAmbientLoss
from ambient_dist.text.sd_models import load_components
from ambient_dist.text.loss import LatentEpsAmbientLoss, TextAmbientLoss, unet_network

from helpers import gen, latent_config


def eps_net(z, t, cond):
    """A fixed nonlinear 'network' (no weights): enough to compare loss formulas."""
    return 0.3 * z + 0.2 * torch.sin(z) + 0.01 * cond.mean()


# --------------------------------------------------------------------------------------
# Epsilon prediction
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("space", ["x0", "v"])
def test_epsilon_loss_is_sd_loss_when_clean_and_the_v_loss_of_the_same_predictor(space):
    cfg = ObjectiveConfig(form="latent_v", sigma_tn=1.0, t_n=100, latent_loss_space=space)
    z0, z_tn = torch.randn(64, 4, 4, 4, generator=gen(1)), torch.randn(64, 4, 4, 4, generator=gen(2))
    cond = torch.randn(64, 77, 8, generator=gen(3))
    eps_loss = LatentEpsAmbientLoss(cfg)
    out = eps_loss(eps_net, z0, z_tn, cond, generator=gen(4))
    t, ambient, eps = eps_loss.draw_noise(z0, gen(4))      # the same draws, replayed
    assert ambient.any() and (~ambient).any()
    alpha, s = (v.float().reshape(-1, 1, 1, 1) for v in ddpm_alpha_sigma(t))
    # Clean samples: exactly Stable Diffusion's epsilon loss ||eps_pred(z_t) - eps||^2.
    z_t = alpha * z0 + s * eps
    sd = (eps_net(z_t, t, cond) - eps).square().sum(dim=(1, 2, 3))
    torch.testing.assert_close(out.per_sample[~ambient], sd[~ambient], rtol=1e-4, atol=1e-5)

    # Every sample: alpha_t^2 times the v loss of the v-predictor that makes the same x0
    # prediction (v = (eps - s z_t) / alpha), so both branches keep their targets.
    def v_net(z, tt, c):
        a, sg = (x.float().reshape(-1, 1, 1, 1) for x in ddpm_alpha_sigma(tt.long()))
        return (eps_net(z, tt, c) - sg * z) / a
    v_out = LatentVAmbientLoss(cfg)(v_net, z0, z_tn, cond, generator=gen(4))
    torch.testing.assert_close(out.per_sample, alpha.flatten() ** 2 * v_out.per_sample, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def unet_batch(tiny_model):
    c = load_components(tiny_model, ("unet",))
    g = gen(5)
    clean, noisy = torch.randn(6, 4, 4, 4, generator=g), torch.randn(6, 4, 4, 4, generator=g)
    cond, empty = torch.randn(6, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g)
    return c.unet, clean, noisy, cond, empty


def text_loss(tiny_model, empty, *overrides):
    cfg = latent_config("", tiny_model, *overrides)
    return TextAmbientLoss(cfg, empty)


def test_text_loss_with_mitigations_off_is_the_latent_loss(tiny_model, unet_batch):
    unet, clean, noisy, cond, empty = unet_batch
    off = text_loss(tiny_model, empty, "text.caption_dropout=0")(unet, clean, noisy, cond, gen(9))
    plain = LatentVAmbientLoss(latent_config("", tiny_model).objective)(
        unet_network(unet), clean, noisy, cond, generator=gen(9))
    assert torch.equal(off.per_sample, plain.per_sample) and torch.equal(off.loss, plain.loss)
    for option in ("text.caption_dropout=0.5", "text.text_noise_std=0.5"):
        changed = text_loss(tiny_model, empty, option)(unet, clean, noisy, cond, gen(9))
        assert not torch.allclose(changed.per_sample, plain.per_sample), option


def test_filter_drops_samples_above_the_threshold(tiny_model, unet_batch):
    unet, clean, noisy, cond, empty = unet_batch
    base = text_loss(tiny_model, empty, "text.caption_dropout=0")(unet, clean, noisy, cond, gen(9))
    keep_all = text_loss(tiny_model, empty, "text.caption_dropout=0", "text.drop_threshold=1.0e+9")
    out = keep_all(unet, clean, noisy, cond, gen(9))
    torch.testing.assert_close(out.loss, base.loss)
    assert int(keep_all.dropped) == 0
    drop_all = text_loss(tiny_model, empty, "text.caption_dropout=0", "text.drop_threshold=1.0e-12")
    unet.zero_grad(set_to_none=True)
    out = drop_all(unet, clean, noisy, cond, gen(9))
    out.loss.backward()
    assert float(out.loss.detach()) == 0 and int(drop_all.dropped) == 6
    assert all(p.grad is None or not p.grad.any() for p in unet.parameters())
    unet.zero_grad(set_to_none=True)
