"""The networks: reference architectures (parameter counts, FLOPs), the preconditioning
contract of docs/INTERFACES.md, bf16 autocast + channels_last, and that a tiny net trains."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from ambient_dist.config import from_dict
from ambient_dist.models import build_network, build_unet
from ambient_dist.models.flops import forward_gflop_per_image, train_gflop_per_image
from ambient_dist.models.layers import Resample, drop_labels, group_norm
from helpers import perturb

CIFAR = {}  # the config defaults are EDM's DDPM++ CIFAR-10 network
FFHQ = {"data": {"resolution": 64}, "network": {"channel_mult": [1, 2, 2, 2], "dropout": 0.05}}
ADM_IN64 = {"data": {"resolution": 64, "num_classes": 1000},
            "network": {"arch": "adm", "model_channels": 192, "channel_mult": [1, 2, 3, 4],
                        "num_blocks": 3, "attn_resolutions": [32, 16, 8], "dropout": 0.1}}


def _merge(*dicts):
    out: dict = {}
    for d in dicts:
        for section, values in d.items():
            out.setdefault(section, {}).update(values)
    return out


def _tiny(arch="ddpmpp", num_classes=0, **network):
    # ADM attention has 64 channels per head: give it one head at the 4x4 level.
    net = dict(arch=arch, model_channels=32 if arch == "adm" else 16, channel_mult=[1, 2],
               num_blocks=1, attn_resolutions=[4], dropout=0.0)
    net.update(network)
    return from_dict({"data": {"resolution": 8, "num_classes": num_classes}, "network": net})




# Expected numbers: parameter counts of the EDM reference networks (NVlabs/edm,
# training/networks.py, EDMPrecond built with the train.py --arch presets), obtained by
# instantiating that code with the same sizes. Our implementation must match them exactly.
REFERENCE_PARAMS = {
    "ddpmpp-cifar10-uncond": ({}, 55_732_739),
    "ddpmpp-cifar10-cond10": ({"data": {"num_classes": 10}}, 55_734_147),
    "ddpmpp-cifar10-uncond-augment9": ({"network": {"augment_dim": 9}}, 55_733_891),
    "ncsnpp-cifar10-uncond": ({"network": {"arch": "ncsnpp"}}, 56_395_523),
    "ncsnpp-cifar10-cond10": ({"network": {"arch": "ncsnpp"}, "data": {"num_classes": 10}}, 56_398_339),
    "ddpmpp-ffhq64": (FFHQ, 61_804_419),
    "ncsnpp-ffhq64": (_merge(FFHQ, {"network": {"arch": "ncsnpp"}}), 62_758_787),
    "adm-imagenet64-cond1000": (ADM_IN64, 295_899_267),
}


@pytest.mark.parametrize("name", list(REFERENCE_PARAMS))
def test_parameter_counts_equal_edm_reference(name):
    overrides, expected = REFERENCE_PARAMS[name]
    with torch.device("meta"):  # shapes only: no memory, no random init cost
        net = build_network(from_dict(overrides))
    assert sum(p.numel() for p in net.parameters()) == expected


def test_flops_of_ddpmpp_cifar_match_reference_figure():
    # docs/performance: 42.4 GFLOP forward, 127.1 GFLOP per training step and image.
    with torch.device("meta"):
        net = build_network(from_dict(CIFAR))
    fwd, train = forward_gflop_per_image(net), train_gflop_per_image(net)
    assert fwd == pytest.approx(42.4, rel=0.005)
    assert train == pytest.approx(127.1, rel=0.005)
    assert all(p.grad is None for p in net.parameters())  # counting leaves no gradients


def test_flops_of_a_real_frozen_net_equal_the_meta_count():
    cfg = _tiny(attn_resolutions=[8, 4])
    real = build_network(cfg).requires_grad_(False)  # e.g. an EMA copy
    with torch.device("meta"):
        meta = build_network(cfg)
    assert train_gflop_per_image(real) == train_gflop_per_image(meta) > 0
    assert next(real.parameters()).device.type == "cpu"


def test_flops_count_attention_on_cpu():
    # The attention matmuls must be counted (the fused CPU kernel is invisible to the counter).
    with_attn = forward_gflop_per_image(build_network(_tiny(attn_resolutions=[8, 4])))
    without = forward_gflop_per_image(build_network(_tiny(attn_resolutions=[])))
    assert with_attn > without > 0


@pytest.mark.parametrize("arch", ["ddpmpp", "ncsnpp", "adm"])
@pytest.mark.parametrize("precond", ["edm", "vp", "ve"])
def test_forward_is_preconditioned_raw_network(arch, precond):
    torch.manual_seed(0)
    cfg = _tiny(arch, num_classes=3, precond=precond)
    net = perturb(build_network(cfg)).eval()
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.05, 20.0])
    labels = torch.tensor([0, 2])
    D = net(x, sigma, labels)
    assert D.shape == x.shape and D.dtype == torch.float32
    c_skip, c_out, c_in, c_noise = net.scalings(sigma)
    assert c_skip.shape == c_out.shape == c_in.shape == c_noise.shape == sigma.shape
    b = lambda c: c.reshape(-1, 1, 1, 1)  # noqa: E731
    F = net.raw(b(c_in) * x, c_noise, torch.nn.functional.one_hot(labels, 3).float())
    assert F.dtype == torch.float32
    torch.testing.assert_close(D, b(c_skip) * x + b(c_out) * F)
    for attr in ("img_resolution", "img_channels", "label_dim", "sigma_min", "sigma_max", "sigma_data"):
        assert hasattr(net, attr)
    assert (net.img_resolution, net.img_channels, net.label_dim) == (8, 3, 3)


def test_edm_scalings_follow_the_spec():
    net = build_network(_tiny())
    sigma = torch.tensor([0.002, 0.5, 80.0])
    sd = 0.5
    c_skip, c_out, c_in, c_noise = net.scalings(sigma)
    torch.testing.assert_close(c_skip, sd**2 / (sigma**2 + sd**2))
    torch.testing.assert_close(c_out, sigma * sd / (sigma**2 + sd**2).sqrt())
    torch.testing.assert_close(c_in, 1 / (sigma**2 + sd**2).sqrt())
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    assert net.sigma_data == 0.5 and net.sigma_min == 0 and net.sigma_max == math.inf


def test_vp_and_ve_scalings():
    vp = build_network(_tiny(precond="vp"))
    # The VP schedule's end points and its inverse: c_noise(sigma(t)) = (M - 1) t.
    assert vp.sigma_max == pytest.approx(math.sqrt(math.expm1(0.5 * 19.9 + 0.1)))
    t = torch.tensor([1e-5, 0.3, 1.0], dtype=torch.float64)
    sigma = ((0.5 * 19.9 * t**2 + 0.1 * t).exp() - 1).sqrt()
    c_skip, c_out, c_in, c_noise = vp.scalings(sigma)
    torch.testing.assert_close(c_noise, 999 * t)
    torch.testing.assert_close(c_out, -sigma)
    torch.testing.assert_close(c_in, 1 / (sigma**2 + 1).sqrt())
    assert vp.sigma_min == pytest.approx(float(sigma[0]))
    ve = build_network(_tiny(precond="ve"))
    s = torch.tensor([0.02, 100.0])
    c_skip, c_out, c_in, c_noise = ve.scalings(s)
    torch.testing.assert_close(c_out, s)
    torch.testing.assert_close(c_noise, (s / 2).log())
    assert (ve.sigma_min, ve.sigma_max) == (0.02, 100.0)


@pytest.mark.parametrize("arch", ["ddpmpp", "ncsnpp", "adm"])
def test_bf16_autocast_and_channels_last(arch):
    torch.manual_seed(0)
    net = perturb(build_network(_tiny(arch, num_classes=2))).eval()
    x, sigma, labels = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 3.0]), torch.tensor([1, 0])
    ref = net(x, sigma, labels)
    net = net.to(memory_format=torch.channels_last)
    xcl = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(net(xcl, sigma, labels), ref, rtol=1e-4, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(xcl, sigma, labels)
        F = net.raw(xcl, torch.zeros(2), labels)
    assert out.dtype == F.dtype == torch.float32 and out.shape == x.shape
    # bf16 changes the numbers a little, not the function.
    err = (out - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.05
    out.square().mean().backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in net.parameters() if p.grad is not None)


def test_tiny_network_trains():
    torch.manual_seed(0)
    net = build_network(_tiny(num_classes=2)).train()
    x0 = torch.rand(8, 3, 8, 8) * 2 - 1
    labels = torch.arange(8) % 2
    sigma = torch.exp(torch.randn(8) * 1.2 - 1.2)
    noise = torch.randn_like(x0) * sigma.reshape(-1, 1, 1, 1)
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        D = net(x0 + noise, sigma, labels)
        loss = (weight.reshape(-1, 1, 1, 1) * (D - x0) ** 2).sum((1, 2, 3)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_labels_are_validated():
    uncond = build_network(_tiny())
    x, s = torch.randn(2, 3, 8, 8), torch.ones(2)
    with pytest.raises(ValueError, match="unconditional"):
        uncond(x, s, torch.tensor([0, 1]))
    cond = perturb(build_network(_tiny(num_classes=3))).eval()
    onehot = torch.tensor([[0.0, 1, 0], [0, 0, 1]])
    torch.testing.assert_close(cond(x, s, torch.tensor([1, 2])), cond(x, s, onehot))
    with pytest.raises(ValueError, match=r"\[2, 3\]"):
        cond(x, s, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="out of range"):
        cond(x, s, torch.tensor([0, 3]))
    # No labels = the all-zero label (the unconditional direction of guidance).
    torch.testing.assert_close(cond(x, s), cond(x, s, torch.zeros(2, 3)))
    # A scalar sigma applies to the whole batch.
    torch.testing.assert_close(cond(x, 0.7), cond(x, torch.full((2,), 0.7)))


def test_drop_labels_zeroes_whole_rows():
    torch.manual_seed(0)
    out = drop_labels(torch.ones(1000, 4), 0.3)
    rows = out.sum(1)
    assert set(rows.unique().tolist()) == {0.0, 4.0}
    assert 0.2 < (rows == 0).float().mean() < 0.4


@pytest.mark.parametrize("direction", ["up", "down"])
def test_box_resampling_equals_depthwise_filter(direction):
    # The [1, 1] fast path (pooling / nearest) must be the same map as the generic FIR path.
    fast = Resample([1, 1], direction)
    generic = Resample([1, 1], direction)
    generic.is_box = False
    x = torch.randn(2, 5, 8, 8)
    torch.testing.assert_close(fast(x), generic(x))
    assert fast(x).shape[-1] == (16 if direction == "up" else 4)


def test_state_dict_keeps_fourier_frequencies_not_resample_kernels():
    net = build_network(_tiny("ncsnpp"))
    keys = net.state_dict().keys()
    assert any(k.endswith("map_noise.freqs") for k in keys)
    assert not any(k.endswith("kernel") for k in keys)
    other = build_network(_tiny("ncsnpp"))
    other.load_state_dict(net.state_dict())
    x, s = torch.randn(1, 3, 8, 8), torch.ones(1)
    torch.testing.assert_close(other.eval()(x, s), net.eval()(x, s))


@pytest.mark.parametrize("arch", ["ncsnpp", "adm"])  # ncsnpp covers DDPM++'s code paths too
def test_forward_traces_as_one_graph(arch):
    # No graph breaks: torch.compile can fuse the whole denoiser (label dropout included).
    cfg = _tiny(arch, num_classes=2, label_dropout=0.1)
    net = build_network(cfg).train()
    compiled = torch.compile(net, fullgraph=True, backend="eager")
    out = compiled(torch.randn(2, 3, 8, 8), torch.tensor([0.2, 2.0]), torch.eye(2))
    assert out.shape == (2, 3, 8, 8) and out.dtype == torch.float32


def test_song_unet_skip_encoder_and_decoder_variants():
    # Not EDM presets, but part of the SongUNet family: every resolution adds to the output.
    from ambient_dist.models import SongUNet
    torch.manual_seed(0)
    unet = SongUNet(8, 3, 3, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                    attn_resolutions=[4], dropout=0.0, encoder_type="skip", decoder_type="skip",
                    resample_filter=[1, 3, 3, 1])
    heads = [level.out for level in unet.decoder]
    assert all(h is not None for h in heads) and heads[0].up is None and heads[1].up is not None
    out = unet(torch.randn(2, 3, 8, 8), torch.zeros(2))
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()


def test_bad_configs_are_named():
    cfg = _tiny()
    bad = dataclasses.replace(cfg, network=dataclasses.replace(cfg.network, arch="unet9"))
    with pytest.raises(ValueError, match="network.arch"):
        build_unet(bad)
    bad = dataclasses.replace(cfg, network=dataclasses.replace(cfg.network, precond="eps"))
    with pytest.raises(ValueError, match="network.precond"):
        build_network(bad)
    with pytest.raises(ValueError, match="model_channels"):
        group_norm(18, eps=1e-5)
    with pytest.warns(UserWarning, match="network.attn_resolutions"):
        build_network(_tiny(attn_resolutions=[16]))
    net = build_network(cfg)
    with pytest.raises(ValueError, match="batch of 2"):
        net(torch.randn(2, 3, 8, 8), torch.ones(3))
