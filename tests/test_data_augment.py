"""Geometric augmentation (ambient_dist/data/augment.py, config section `augment`).

What must hold: the transforms that reach an ambient sample only permute pixels, so its stored
noise stays a white-noise draw of std sigma_tn; resampling transforms reach clean-branch samples
only; clean images and noisy copies get the same transform; the labels say what was done; and
the draws replay from the generator. Also to_model_units, the uint8 -> [-1, 1] table.
"""
import math

import pytest
import torch

from ambient_dist.config import (AUGMENT_LABEL_DIM, EXACT_AUGMENTATIONS, AugmentConfig, ConfigError,
                                 load_config)
from ambient_dist.data.augment import GeometricAugment, rotation_matrices, warp
from ambient_dist.models import build_network
from ambient_dist.objective import build_loss

SIGMA_TN = 0.5


def batch(n=12, side=8, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.rand(n, channels, side, side, generator=g) * 2 - 1
    noise = torch.randn(n, channels, side, side, generator=g)
    return clean, clean + SIGMA_TN * noise, noise


def augment(cfg: AugmentConfig, clean, noisy, ambient, seed=1):
    return GeometricAugment(cfg)(clean, noisy, ambient, torch.Generator().manual_seed(seed))


def test_exact_transforms_turn_the_stored_noise_into_a_permutation_of_itself():
    clean, noisy, noise = batch()
    ambient = torch.ones(len(clean), dtype=torch.bool)
    out_clean, out_noisy, labels = augment(AugmentConfig(p=1.0, transforms=list(EXACT_AUGMENTATIONS),
                                                         translate_std=0.3), clean, noisy, ambient)
    moved = (out_noisy - out_clean) / SIGMA_TN
    for i in range(len(clean)):
        # the same multiset of values per channel: white noise of std sigma_tn again
        for c in range(clean.shape[1]):
            assert torch.allclose(moved[i, c].flatten().sort().values,
                                  noise[i, c].flatten().sort().values, atol=1e-5)
    assert not torch.equal(out_clean, clean)  # p = 1: every sample was moved
    assert (labels[:, 0] == 1).all()          # and flipped
    assert (labels[:, 5:] == 0).all()         # nothing resampled


def test_resampling_transforms_reach_clean_branch_samples_only():
    clean, noisy, noise = batch(n=16)
    ambient = torch.arange(16) % 2 == 1
    out_clean, out_noisy, labels = augment(AugmentConfig(p=1.0), clean, noisy, ambient)
    amb, cln = ambient, ~ambient
    # ambient samples: no scale / aniso, rotation by whole quarter turns only
    assert (labels[amb, 5:] == 0).all()
    angle = torch.atan2(labels[amb, 2], labels[amb, 1] + 1)
    assert torch.allclose(angle / (math.pi / 2), (angle / (math.pi / 2)).round(), atol=1e-5)
    moved = (out_noisy[amb] - out_clean[amb]) / SIGMA_TN
    assert torch.allclose(moved.flatten(1).sort(1).values, noise[amb].flatten(1).sort(1).values,
                          atol=1e-5)
    # clean-branch samples were resampled (a continuous scale draw is never exactly 0)
    assert (labels[cln, 5] != 0).all() and (labels[cln, 6:] != 0).any(dim=1).all()
    # their noisy copies are never read by the loss and are left out of the resampling
    exact_only = augment(AugmentConfig(p=1.0, transforms=list(EXACT_AUGMENTATIONS)), clean, noisy, ambient)
    assert torch.equal(out_noisy, exact_only[1])


def test_clean_images_and_noisy_copies_get_the_same_transform():
    # The transforms are linear, so augmenting (x, x + d) must give (T x, T x + T d).
    clean, noisy, _ = batch()
    ambient = torch.ones(len(clean), dtype=torch.bool)
    cfg = AugmentConfig(p=0.7, transforms=list(EXACT_AUGMENTATIONS))
    a_clean, a_noisy, _ = augment(cfg, clean, noisy, ambient, seed=5)
    d_clean, _, _ = augment(cfg, noisy - clean, None, ambient, seed=5)
    assert torch.allclose(a_noisy - a_clean, d_clean, atol=1e-6)


def test_labels_say_which_quarter_turn_flip_and_shift_were_applied():
    clean, noisy, _ = batch(n=24, side=8)
    ambient = torch.ones(24, dtype=torch.bool)
    out, _, labels = augment(AugmentConfig(p=0.6, transforms=list(EXACT_AUGMENTATIONS), translate_std=0.3),
                             clean, noisy, ambient, seed=3)
    for i in range(24):
        x = clean[i]
        if labels[i, 0] == 1:
            x = x.flip(-2)
        turns = round(math.atan2(labels[i, 2], labels[i, 1] + 1) / (math.pi / 2)) % 4
        x = torch.rot90(x, turns, dims=(-2, -1))
        dx, dy = int(round(labels[i, 3].item() * 8)), int(round(labels[i, 4].item() * 8))
        x = torch.roll(x, (dy, dx), dims=(-2, -1))
        assert torch.equal(out[i], x), i
    assert (labels != 0).any(dim=1).sum() > 12  # most samples were transformed at p = 0.6


def test_unaugmented_samples_keep_their_pixels_and_get_zero_labels():
    clean, noisy, _ = batch()
    ambient = torch.zeros(len(clean), dtype=torch.bool)
    out_clean, out_noisy, labels = augment(AugmentConfig(p=0.0), clean, noisy, ambient)
    assert torch.equal(out_clean, clean) and torch.equal(out_noisy, noisy)
    assert labels.shape == (len(clean), AUGMENT_LABEL_DIM) and (labels == 0).all()
    # a transform that is not listed is never applied, whatever p says
    _, _, labels = augment(AugmentConfig(p=1.0, transforms=["yflip"]), clean, noisy, ambient)
    assert (labels[:, 0] == 1).all() and (labels[:, 1:] == 0).all()


def test_resampling_warp_turns_like_rot90_and_is_the_identity_at_zero():
    x = torch.randn(3, 2, 8, 8)
    quarter = warp(x, rotation_matrices(torch.full((3,), math.pi / 2)))
    assert torch.allclose(quarter, torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5)
    assert torch.allclose(warp(x, rotation_matrices(torch.zeros(3))), x, atol=1e-6)


def test_draws_replay_from_the_generator_and_keep_the_memory_format():
    clean, noisy, _ = batch()
    clean = clean.contiguous(memory_format=torch.channels_last)
    noisy = noisy.half().contiguous(memory_format=torch.channels_last)
    ambient = torch.arange(len(clean)) % 3 == 0
    first = augment(AugmentConfig(p=0.5), clean, noisy, ambient, seed=9)
    again = augment(AugmentConfig(p=0.5), clean, noisy, ambient, seed=9)
    other = augment(AugmentConfig(p=0.5), clean, noisy, ambient, seed=10)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[2], other[2])
    assert first[0].is_contiguous(memory_format=torch.channels_last)
    assert first[1].dtype == torch.float16  # the stored copy stays as stored


def test_bf16_autocast_leaves_the_geometry_in_float32():
    clean, noisy, _ = batch()
    ambient = torch.zeros(len(clean), dtype=torch.bool)
    expected = augment(AugmentConfig(p=1.0), clean, noisy, ambient, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = augment(AugmentConfig(p=1.0), clean, noisy, ambient, seed=4)
    assert got[0].dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_loss_augments_after_the_branch_draw_and_conditions_the_network():
    cfg = load_config(None, ["objective.sigma_tn=0.5", "data.resolution=8", "network.model_channels=8",
                             "network.channel_mult=[1]", "network.num_blocks=1",
                             "network.attn_resolutions=[]", "network.augment_dim=8"])
    net = build_network(cfg)
    seen = []
    raw = net.raw
    net.raw = lambda *args, augment_labels=None: seen.append(augment_labels) or raw(*args, augment_labels)
    loss = build_loss(cfg.objective)
    clean, noisy, _ = batch(n=16)
    plain = loss(net, clean, noisy, generator=torch.Generator().manual_seed(0))
    aug = loss(net, clean, noisy, generator=torch.Generator().manual_seed(0),
               augment=GeometricAugment(AugmentConfig(p=0.5)))
    assert seen[0] is None and seen[1].shape == (16, AUGMENT_LABEL_DIM)
    # sigma and branch come first, so the augmentation does not change them
    assert torch.equal(plain.sigma, aug.sigma) and torch.equal(plain.ambient, aug.ambient)
    assert (seen[1][aug.ambient, 5:] == 0).all()  # no resampling of ambient samples
    assert not torch.equal(plain.per_sample, aug.per_sample)


@pytest.mark.parametrize("overrides, key", [
    (["augment.p=0.15"], "network.augment_dim"),
    (["augment.p=1.5", "network.augment_dim=8"], "augment.p"),
    (["augment.transforms=[yflip,shear]"], "augment.transforms"),
    (["augment.transforms=[yflip,yflip]"], "augment.transforms"),
    (["augment.scale_std=-1"], "augment.scale_std"),
    (["augment.p=0.15", "network.augment_dim=8", "objective.form=latent_v"], "augment.p"),
])
def test_config_refuses_inconsistent_augmentation(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_paper_setting_loads():
    cfg = load_config(None, ["augment.p=0.15", "network.augment_dim=8"])
    assert cfg.augment.p == 0.15 and set(cfg.augment.transforms) >= set(EXACT_AUGMENTATIONS)


@pytest.mark.gpu
def test_on_the_gpu_the_pipe_never_waits_for_the_device():
    # CPU twin: every test above runs the same code on the CPU.
    clean, noisy, _ = batch(n=64, side=32)
    clean, noisy = clean.cuda(), noisy.half().cuda()
    ambient = torch.arange(64, device="cuda") % 2 == 0
    pipe = GeometricAugment(AugmentConfig(p=0.5))
    generator = torch.Generator("cuda").manual_seed(0)
    pipe(clean, noisy, ambient, generator)  # first call: moves the transform mask once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out_clean, out_noisy, labels = pipe(clean, noisy, ambient, generator)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out_clean.is_cuda and labels.shape == (64, AUGMENT_LABEL_DIM)
    moved = (out_noisy.float() - out_clean)[ambient].flatten(1).sort(1).values
    assert torch.allclose(moved, (noisy.float() - clean)[ambient].flatten(1).sort(1).values, atol=1e-6)


# --------------------------------------------------------------------------------------------
# uint8 pixels -> model units
# --------------------------------------------------------------------------------------------

def test_model_units_table_is_cpu_arithmetic():
    from ambient_dist.data.augment import to_model_units
    x = torch.arange(256, dtype=torch.uint8).view(16, 16)
    y = to_model_units(x)
    assert y.dtype == torch.float32 and torch.equal(y, x.float() / 127.5 - 1)
    assert y[0, 0] == -1 and y[-1, -1] == 1
    with pytest.raises(TypeError, match="expected uint8"):
        to_model_units(y)


@pytest.mark.gpu
def test_model_units_identical_on_gpu():
    from ambient_dist.data.augment import to_model_units
    x = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_model_units(x.cuda()).cpu(), to_model_units(x))
