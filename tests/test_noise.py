"""Keyed noise, the fixed noisy copy, the shared schedules and the image-unit check."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ambient_dist.noise import (
    VP_BETA_D, VP_BETA_MIN, VP_EPSILON_T, ImageRangeError, check_image_range, ddpm_alpha_sigma,
    ddpm_alphas_cumprod, draw_normal, draw_randint, draw_uniform, key_seed, keyed_normal,
    make_noisy_copy, vp_alpha_sigma, vp_sigma, vp_t)

REPO = Path(__file__).resolve().parents[1]


def test_key_seed_is_stable_63_bit_and_depends_on_seed_and_key():
    s = key_seed(7, "cifar/000123")
    assert s == key_seed(7, "cifar/000123")
    assert 0 <= s < 2 ** 63
    assert s != key_seed(8, "cifar/000123")
    assert s != key_seed(7, "cifar/000124")


def test_keyed_normal_same_across_calls_differs_across_keys():
    a = keyed_normal((3, 8, 8), 0, "img-a")
    assert torch.equal(a, keyed_normal((3, 8, 8), 0, "img-a"))
    b = keyed_normal((3, 8, 8), 0, "img-b")
    assert not torch.allclose(a, b)
    # A standard normal: mean ~0, std ~1 over many draws.
    big = keyed_normal((100_000,), 0, "stats")
    assert abs(big.mean().item()) < 0.02 and abs(big.std().item() - 1) < 0.02


def test_keyed_normal_dtype_only_casts_the_same_draw():
    a = keyed_normal((4, 4), 1, "k")
    h = keyed_normal((4, 4), 1, "k", dtype=torch.float16)
    assert h.dtype == torch.float16
    assert torch.equal(h, a.half())


def test_keyed_normal_leaves_global_rng_untouched():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    keyed_normal((16,), 0, "x")
    make_noisy_copy(torch.zeros(3, 4, 4), 0.5, 0, "x")
    assert torch.equal(torch.get_rng_state(), state)


def test_keyed_normal_same_in_another_process():
    here = keyed_normal((2, 5), 42, "shard-3/img-17")
    code = ("import torch; from ambient_dist.noise import keyed_normal; "
            "print(repr(keyed_normal((2, 5), 42, 'shard-3/img-17').flatten().tolist()))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=True)
    there = torch.tensor(eval(out.stdout.strip()), dtype=torch.float32).reshape(2, 5)
    assert torch.equal(here, there)


def test_make_noisy_copy_edm_is_x0_plus_sigma_n_and_fixed():
    x0 = torch.rand(3, 8, 8) * 2 - 1
    copy = make_noisy_copy(x0, 0.5, 3, "key")
    assert copy.dtype == torch.float32
    assert torch.equal(copy, x0 + 0.5 * keyed_normal(x0.shape, 3, "key"))
    assert torch.equal(copy, make_noisy_copy(x0, 0.5, 3, "key"))
    assert not torch.allclose(copy, make_noisy_copy(x0, 0.5, 3, "other"))
    # Not clipped: noisy copies leave [-1, 1].
    assert copy.abs().max() > 1
    # sigma_tn = 0: the copy is the clean image.
    assert torch.equal(make_noisy_copy(x0, 0.0, 3, "key"), x0)


def test_make_noisy_copy_vp_is_the_ve_copy_scaled_by_alpha():
    x0 = torch.rand(3, 8, 8) * 2 - 1
    alpha, s = vp_alpha_sigma(0.5)
    assert abs(float(alpha) ** 2 + float(s) ** 2 - 1) < 1e-12
    vp = make_noisy_copy(x0, 0.5, 0, "k", form="vp")
    ve = make_noisy_copy(x0, 0.5, 0, "k", form="edm")
    torch.testing.assert_close(vp, float(alpha) * ve, rtol=1e-6, atol=1e-6)


def test_make_noisy_copy_latent_v_uses_the_ddpm_schedule_at_t_n():
    z0 = torch.randn(4, 8, 8)
    abar = ddpm_alphas_cumprod()
    copy = make_noisy_copy(z0, 0.0, 0, "k", form="latent_v", t_n=50)
    expected = abar[50].sqrt().item() * z0 + (1 - abar[50]).sqrt().item() * keyed_normal(z0.shape, 0, "k")
    torch.testing.assert_close(copy, expected)
    with pytest.raises(ValueError, match="t_n"):
        make_noisy_copy(z0, 0.0, 0, "k", form="latent_v")
    with pytest.raises(ValueError, match="form"):
        make_noisy_copy(z0, 0.5, 0, "k", form="ve")


def test_ddpm_schedule_matches_stable_diffusion_scheduler():
    from diffusers import DDPMScheduler
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                        beta_schedule="scaled_linear").alphas_cumprod.double()
    ours = ddpm_alphas_cumprod()
    assert ours.shape == (1000,)
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-6)  # diffusers works in float32
    alpha, s = ddpm_alpha_sigma(torch.tensor([0, 999]))
    torch.testing.assert_close(alpha ** 2 + s ** 2, torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="timestep"):
        ddpm_alpha_sigma(1000)


def test_vp_schedule_inverse():
    t = torch.tensor([1e-5, 0.1, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(vp_t(vp_sigma(t, 19.9, 0.1), 19.9, 0.1), t)
    torch.testing.assert_close(vp_sigma(t), vp_sigma(t, VP_BETA_D, VP_BETA_MIN))


def test_vp_preconditioning_uses_this_schedule():
    # One VP schedule: models.precond's VPPrecond reads it from here (defaults included).
    from ambient_dist.models.precond import VPPrecond
    net = VPPrecond(torch.nn.Identity(), img_resolution=8, img_channels=3, label_dim=0,
                    beta_d=18.0, beta_min=0.2, epsilon_t=1e-3)
    sigma = torch.tensor([0.01, 0.5, 3.0, 80.0])
    assert torch.equal(net.t_of_sigma(sigma), vp_t(sigma, 18.0, 0.2))
    as64 = lambda t: float(vp_sigma(torch.tensor(t, dtype=torch.float64), 18.0, 0.2))  # noqa: E731
    assert (net.sigma_min, net.sigma_max) == (as64(1e-3), as64(1.0))
    default = VPPrecond(torch.nn.Identity(), img_resolution=8, img_channels=3, label_dim=0)
    assert (default.beta_d, default.beta_min, default.epsilon_t) == (VP_BETA_D, VP_BETA_MIN, VP_EPSILON_T)


def test_draws_replay_from_a_generator_and_land_on_the_device():
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    n, u = draw_normal([4, 3], g(), "cpu"), draw_uniform([7], g(), torch.device("cpu"))
    assert n.shape == (4, 3) and n.dtype == torch.float32 and torch.equal(n, draw_normal([4, 3], g(), "cpu"))
    assert torch.equal(n, torch.randn(4, 3, generator=g()))
    assert torch.equal(u, torch.rand(7, generator=g())) and bool(((u >= 0) & (u < 1)).all())
    t = draw_randint(1000, [500], g(), "cpu")
    assert t.dtype == torch.int64 and torch.equal(t, torch.randint(0, 1000, (500,), generator=g()))
    assert 0 <= int(t.min()) and int(t.max()) < 1000
    # Without a generator: the global RNG of the device.
    torch.manual_seed(3)
    first = draw_normal([5], None, "cpu")
    torch.manual_seed(3)
    assert torch.equal(first, torch.randn(5))


def test_check_image_range_accepts_minus_one_to_one():
    u8 = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    check_image_range(u8.float() / 127.5 - 1, "cifar")


@pytest.mark.parametrize("images, message", [
    (torch.randint(0, 256, (8, 3, 4, 4)).float(), "0..255"),
    (torch.rand(8, 3, 4, 4), r"\[0, 1\] units"),
    (torch.rand(8, 3, 4, 4) * 2.4 - 1.2, r"outside \[-1, 1\]"),
    (torch.tensor([0.0, float("nan"), -1.0]), "NaN"),
])
def test_check_image_range_rejects_wrong_units_naming_the_dataset(images, message):
    with pytest.raises(ImageRangeError, match=message) as info:
        check_image_range(images, "data/ffhq_300.npz")
    assert "data/ffhq_300.npz" in str(info.value)


def test_the_configs_vp_defaults_are_the_schedules_own():
    from ambient_dist.config import ObjectiveConfig
    from ambient_dist.noise import VP_BETA_D, VP_BETA_MIN, VP_EPSILON_T
    o = ObjectiveConfig()
    assert (o.vp_beta_d, o.vp_beta_min, o.vp_epsilon_t) == (VP_BETA_D, VP_BETA_MIN, VP_EPSILON_T)
