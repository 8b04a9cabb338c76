"""The ambient objective: branch rules, coefficient forms vs the spec's formulas, the posterior
mean each branch teaches (Monte Carlo), sigma_tn limits, gradients at the threshold."""
import math

import pytest
import torch
from torch import nn

from ambient_dist.config import ObjectiveConfig
from ambient_dist.noise import ddpm_alpha_sigma, vp_alpha_sigma, vp_sigma, vp_t
from ambient_dist.objective import (
    REFERENCE, KernelChoiceError, LatentVAmbientLoss, StepCoefficients, TwoBranchKernel,
    VPAmbientLoss, build_loss, edm_coefficients, latent_v_coefficients, literal_edm_ambient_loss,
    plain_edm_loss, sample_lognormal_sigma, select_kernel, vp_coefficients)
from helpers import SD, FakePrecond, edm_scalings, gen, images


# --------------------------------------------------------------------------------------
# sigma_tn limits: plain EDM bit for bit, all-clean, all-ambient
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["threshold", "uniform"])
def test_sigma_tn_zero_is_plain_edm_bit_for_bit(rule):
    net, (x0, _) = FakePrecond(), images()
    loss_fn = build_loss(ObjectiveConfig(sigma_tn=0.0, branch_rule=rule))
    out = loss_fn(net, x0, None, generator=gen(5))
    sigma, ambient, eps = loss_fn.draw_noise(x0, gen(5))   # replay the same draws
    plain = plain_edm_loss(net, x0, sigma, eps)
    assert not out.ambient.any()
    assert torch.equal(out.sigma, sigma)
    assert torch.equal(out.per_sample, plain)
    assert torch.equal(out.loss, plain.mean())


def test_sigma_tn_huge_is_all_clean_and_plain_edm():
    net, (x0, n) = FakePrecond(), images()
    loss_fn = build_loss(ObjectiveConfig(sigma_tn=1e4))
    out = loss_fn(net, x0, x0 + 1e4 * n, generator=gen(2))
    sigma, _, eps = loss_fn.draw_noise(x0, gen(2))
    assert not out.ambient.any()
    assert torch.equal(out.per_sample, plain_edm_loss(net, x0, sigma, eps))


def test_sigma_tn_tiny_is_all_ambient_and_matches_literal_formula():
    net, (x0, n) = FakePrecond(), images(n=64)
    sigma_tn = 1e-4   # below every log-normal draw in practice: the all-ambient objective
    x_tn = x0 + sigma_tn * n
    loss_fn = build_loss(ObjectiveConfig(sigma_tn=sigma_tn))
    out = loss_fn(net, x0, x_tn, generator=gen(3))
    sigma, ambient, eps = loss_fn.draw_noise(x0, gen(3))
    assert out.ambient.all()
    literal = literal_edm_ambient_loss(net, x0, x_tn, sigma, ambient, sigma_tn, eps)
    torch.testing.assert_close(out.per_sample, literal, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rule", ["threshold", "uniform"])
def test_mixed_batch_matches_literal_formula_with_one_network_call(rule):
    net, (x0, n) = FakePrecond(), images(n=64)
    x_tn = x0 + 0.5 * n
    labels = torch.eye(4)[torch.arange(64) % 4]
    loss_fn = build_loss(ObjectiveConfig(sigma_tn=0.5, branch_rule=rule))
    out = loss_fn(net, x0, x_tn, labels=labels, generator=gen(4))
    assert len(net.calls) == 1 and net.calls[0][0][0] == 64 and net.calls[0][1] is labels
    assert 0 < out.ambient.sum() < 64
    sigma, ambient, eps = loss_fn.draw_noise(x0, gen(4))
    literal = literal_edm_ambient_loss(net, x0, x_tn, sigma, ambient, 0.5, eps, labels)
    torch.testing.assert_close(out.per_sample, literal, rtol=1e-4, atol=1e-5)
    assert out.loss.shape == () and torch.equal(out.loss, out.per_sample.mean())


def test_noisy_copies_stored_float16_are_accepted():
    net, (x0, n) = FakePrecond(), images()
    loss_fn = build_loss(ObjectiveConfig(sigma_tn=0.5))
    stored = (x0 + 0.5 * n).half()
    out = loss_fn(net, x0, stored, generator=gen())
    assert out.per_sample.dtype == torch.float32 and out.ambient.any()
    assert torch.equal(out.per_sample, loss_fn(net, x0, stored.float(), generator=gen()).per_sample)


# --------------------------------------------------------------------------------------
# VP (eq. 6) and latent v (section 4): the coefficient form equals the literal formulas
# --------------------------------------------------------------------------------------

def test_vp_coefficients_equal_eq6_written_in_vp_units():
    net, (x0, n) = FakePrecond(), images(n=32)
    sigma_tn = 0.5
    alpha_tn, s_tn = (float(v) for v in vp_alpha_sigma(sigma_tn))
    x_tn = alpha_tn * x0 + s_tn * n                        # the stored VP copy
    sigma = torch.exp(torch.linspace(-3, 3, 32))
    ambient = sigma >= sigma_tn
    eta = images(n=32, seed=9)[1]
    coefs = vp_coefficients(net, sigma, ambient, sigma_tn)
    ours = REFERENCE.loss(net.raw, coefs, x0, x_tn, eta)

    alpha, s = (v.float().reshape(-1, 1, 1, 1) for v in vp_alpha_sigma(sigma))
    amb = ambient.reshape(-1, 1, 1, 1)
    s_cond = (s ** 2 - alpha ** 2 * s_tn ** 2 / alpha_tn ** 2).clamp(min=0).sqrt()
    x_t = torch.where(amb, alpha / alpha_tn * x_tn + s_cond * eta, alpha * x0 + s * eta)
    h = net(x_t / alpha, sigma)                            # E[x0 | x_t] via the VE denoiser
    r_amb = ((s ** 2 - s_tn ** 2) / (s ** 2 * math.sqrt(1 - s_tn ** 2)) * h
             + (s_tn ** 2 / s ** 2) * ((1 - s ** 2) / (1 - s_tn ** 2)).sqrt() * x_t - x_tn)
    r = torch.where(amb, r_amb, h - x0)
    literal = (r.square().sum(dim=(1, 2, 3))) / sigma ** 2
    torch.testing.assert_close(ours, literal, rtol=2e-4, atol=1e-5)


class FakeVNet(nn.Module):
    """A v-prediction stand-in v(z_t, t, cond): a plain callable, no .raw."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, z, t, cond=None):
        return self.conv(z) * (1 + t.reshape(-1, 1, 1, 1) / 1000)


@pytest.mark.parametrize("space", ["v", "x0"])
def test_latent_v_coefficients_equal_section4_formulas(space):
    net = FakeVNet()
    z0, n = images(n=40, c=4)
    t_n = 50
    alpha_tn, s_tn = (float(v) for v in ddpm_alpha_sigma(t_n))
    z_tn = alpha_tn * z0 + s_tn * n
    t = torch.tensor(list(range(0, 1000, 25)))
    ambient = t > t_n
    eps = images(n=40, c=4, seed=7)[1]
    coefs = latent_v_coefficients(t, ambient, t_n, space)
    ours = REFERENCE.loss(net, coefs, z0, z_tn, eps)

    a_t, s_t = (v.float().reshape(-1, 1, 1, 1) for v in ddpm_alpha_sigma(t))
    amb = ambient.reshape(-1, 1, 1, 1)
    s_cond = (1 - a_t ** 2 / alpha_tn ** 2).clamp(min=0).sqrt()
    z_t = torch.where(amb, a_t / alpha_tn * z_tn + s_cond * eps, a_t * z0 + s_t * eps)
    v = net(z_t, t.float())
    with torch.no_grad():
        z0_hat = s_t ** 2 / (alpha_tn * s_cond ** 2) * (z_tn - a_t * s_tn ** 2 / (alpha_tn * s_t ** 2) * z_t)
    v_target = torch.where(amb, (a_t * z_t - z0_hat) / s_t, a_t * eps - s_t * z0)
    v_loss = (v - v_target).square().sum(dim=(1, 2, 3))
    if space == "v":
        torch.testing.assert_close(ours[ambient], v_loss[ambient], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(ours[~ambient], v_loss[~ambient], rtol=1e-4, atol=1e-4)
    else:
        z0_pred = a_t * z_t - s_t * v
        k1 = alpha_tn * s_cond ** 2 / s_t ** 2
        k2 = a_t * s_tn ** 2 / (alpha_tn * s_t ** 2)
        r = torch.where(amb, k1 * z0_pred + k2 * z_t - z_tn, z0_pred - z0)
        literal = r.square().sum(dim=(1, 2, 3)) / s_t.flatten() ** 2
        torch.testing.assert_close(ours, literal, rtol=2e-4, atol=1e-4)
        # The clean branch in x0 space is the usual v loss, unchanged.
        torch.testing.assert_close(ours[~ambient], v_loss[~ambient], rtol=1e-4, atol=1e-4)


def test_latent_loss_accepts_a_plain_callable_and_its_raw():
    z0, n = images(n=8, c=4)
    cfg = ObjectiveConfig(form="latent_v", t_n=50)
    loss_fn = build_loss(cfg)
    assert isinstance(loss_fn, LatentVAmbientLoss)
    out = loss_fn(FakeVNet(), z0, z0 + n, generator=gen())
    assert torch.isfinite(out.loss) and out.per_sample.shape == (8,)


# --------------------------------------------------------------------------------------
# Monte Carlo: each branch's implied target has conditional mean E[x0 | network input]
# --------------------------------------------------------------------------------------

MEANS = torch.tensor([-0.8, 0.1, 0.7], dtype=torch.float64)
PROBS = torch.tensor([0.3, 0.5, 0.2], dtype=torch.float64)


def draw_mixture(n, g):
    return MEANS[torch.multinomial(PROBS, n, replacement=True, generator=g)]


def posterior_mean(x, scale, var):
    """E[x0 | x] for x = scale x0 + N(0, var), x0 from the point-mass mixture."""
    x = x.double().reshape(-1, 1)
    logits = PROBS.log() - (x - scale * MEANS) ** 2 / (2 * var)
    return (logits.softmax(dim=1) * MEANS).sum(dim=1)


def max_bin_zscore(x, target, expected, bins=20, floor=1e-4):
    """Largest |z| over quantile bins of x of mean(target - expected): E[target - E[x0|x] | x] = 0
    in every bin iff the target's conditional mean is the posterior mean. The standard error
    has a floor, so float32 rounding of a nearly deterministic target is not a failure."""
    order = x.double().flatten().argsort()
    diff = (target.double().flatten() - expected.flatten())[order].reshape(bins, -1)
    se = (diff.std(dim=1) / math.sqrt(diff.shape[1])).clamp(min=floor)
    return float((diff.mean(dim=1) / se).abs().max())


def implied_network_target(coefs, x_in, src):
    """The F that zeroes the residual A F + B x_in + C src (tests may divide; training never does)."""
    c = lambda v: v.reshape(-1, 1, 1, 1)  # noqa: E731
    return -(c(coefs.B) * x_in + c(coefs.C) * src) / c(coefs.A)


N_MC = 200_000


def mc_batch(seed):
    g = gen(seed)
    x0 = draw_mixture(N_MC, g).float().reshape(-1, 1, 1, 1)
    return x0, torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)


@pytest.mark.parametrize("form, sigma, ambient", [
    ("edm", 0.3, False), ("edm", 0.9, True), ("edm", 2.5, True),
    ("vp", 0.3, False), ("vp", 0.9, True), ("vp", 2.5, True)])
def test_ve_and_vp_targets_have_posterior_mean(form, sigma, ambient):
    sigma_tn, net = 0.5, FakePrecond(channels=1)
    x0, n, eps = mc_batch(11)
    sig = torch.full((N_MC,), sigma)
    amb = torch.full((N_MC,), ambient)
    if form == "edm":
        x_tn = x0 + sigma_tn * n
        coefs = edm_coefficients(net, sig, amb, sigma_tn, SD)
    else:
        x_tn = float(vp_alpha_sigma(sigma_tn)[0]) * (x0 + sigma_tn * n)
        coefs = vp_coefficients(net, sig, amb, sigma_tn)
    x_in = REFERENCE.network_input(coefs, x0, x_tn, eps) / coefs.c_in.reshape(-1, 1, 1, 1)
    src = x_tn if ambient else x0
    c_skip, c_out, _, _ = edm_scalings(torch.tensor(sigma))
    D_target = c_skip * x_in + c_out * implied_network_target(coefs, x_in, src)
    expected = posterior_mean(x_in, 1.0, sigma ** 2)       # x_in | x0 ~ N(x0, sigma^2) either way
    assert max_bin_zscore(x_in, D_target, expected) < 4.5
    if ambient:   # the test can tell: treating the noisy copy as the clean target is biased
        assert max_bin_zscore(x_in, x_tn * float(coefs.P[0]), expected) > 10


@pytest.mark.parametrize("space", ["x0", "v"])
@pytest.mark.parametrize("t, ambient", [(30, False), (150, True), (600, True)])
def test_latent_v_targets_have_posterior_mean(space, t, ambient):
    t_n = 100
    z0, n, eps = mc_batch(12)
    alpha_tn, s_tn = (float(v) for v in ddpm_alpha_sigma(t_n))
    z_tn = alpha_tn * z0 + s_tn * n
    tt = torch.full((N_MC,), t)
    coefs = latent_v_coefficients(tt, torch.full((N_MC,), ambient), t_n, space)
    z_t = REFERENCE.network_input(coefs, z0, z_tn, eps)
    src = z_tn if ambient else z0
    a_t, s_t = (float(v) for v in ddpm_alpha_sigma(t))
    v_target = implied_network_target(coefs, z_t, src)
    z0_target = a_t * z_t - s_t * v_target                 # x0 implied by the v target
    expected = posterior_mean(z_t, a_t, s_t ** 2)          # z_t | z0 ~ N(a_t z0, s_t^2)
    assert max_bin_zscore(z_t, z0_target, expected) < 4.5
    if t == 150:  # the biased shortcut (the sampled eta used as epsilon) is caught
        s_cond = math.sqrt(1 - a_t ** 2 / alpha_tn ** 2)
        eta = eps
        z0_hat = (z_tn - a_t * s_tn ** 2 / (alpha_tn * s_t ** 2) * z_t) * s_t ** 2 / (alpha_tn * s_cond ** 2)
        v_biased = a_t * eta - s_t * z0_hat
        assert max_bin_zscore(z_t, a_t * z_t - s_t * v_biased, expected) > 10


class PosteriorPrecond(FakePrecond):
    """D = E[x0 | x] for the point-mass data (the loss minimiser) plus a per-sample offset."""

    def __init__(self, n, bias=0.0):
        super().__init__(channels=1)
        self.offset = nn.Parameter(torch.zeros(n, 1, 1, 1))
        self.bias = bias

    def raw(self, net_in, c_noise, labels=None):
        sigma = (4 * c_noise.double()).exp().reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, _ = edm_scalings(sigma)
        x = net_in.double() / c_in
        D = posterior_mean(x, 1.0, sigma.flatten().reshape(-1, 1) ** 2).reshape(x.shape)
        return ((D + self.bias + self.offset.double() - c_skip * x) / c_out).float()


@pytest.mark.parametrize("rule", ["threshold", "uniform"])
def test_expected_loss_is_stationary_at_the_posterior_mean(rule):
    """Through the whole loss class: d E[loss] / dD = 0 at D = E[x0|x_in]; not so when off."""
    x0 = draw_mixture(200_000, gen(21)).float().reshape(-1, 1, 1, 1)
    x_tn = x0 + 0.5 * torch.randn(x0.shape, generator=gen(22))
    loss_fn = build_loss(ObjectiveConfig(sigma_tn=0.5, branch_rule=rule))
    zs = []
    for bias in (0.0, 0.05):
        net = PosteriorPrecond(len(x0), bias)
        out = loss_fn(net, x0, x_tn, generator=gen(23))
        out.loss.backward()
        g = net.offset.grad.flatten().double() * len(x0)   # per-sample d loss_i / d D_i
        g = g[out.ambient]                                  # the ambient branch is what is new
        zs.append(float(g.mean() / (g.std() / math.sqrt(len(g)))))
    assert abs(zs[0]) < 4
    assert abs(zs[1]) > 10


# --------------------------------------------------------------------------------------
# Branch rules
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma_tn, clean_fraction", [(0.2, 0.37), (0.5, 0.66), (1.0, 0.84), (4.0, 0.98)])
def test_threshold_rule_clean_fraction(sigma_tn, clean_fraction):
    sigma, ambient = sample_lognormal_sigma(200_000, -1.2, 1.2, sigma_tn, "threshold", gen())
    exact = 0.5 * (1 + math.erf((math.log(sigma_tn) + 1.2) / 1.2 / math.sqrt(2)))
    assert abs(exact - clean_fraction) < 0.006            # the spec's table
    assert abs((~ambient).float().mean().item() - exact) < 0.005
    assert torch.equal(ambient, sigma >= sigma_tn)


def test_uniform_rule_halves_and_restricted_lognormal():
    sigma_tn = 0.5
    sigma, ambient = sample_lognormal_sigma(200_000, -1.2, 1.2, sigma_tn, "uniform", gen())
    assert abs(ambient.float().mean().item() - 0.5) < 0.005
    assert (sigma[ambient] >= sigma_tn).all() and (sigma[~ambient] <= sigma_tn).all()
    # Within each side sigma follows the log-normal restricted to it: check its CDF at two points.
    Phi = lambda v: 0.5 * (1 + math.erf(v / math.sqrt(2)))  # noqa: E731
    cdf = lambda s: Phi((math.log(s) + 1.2) / 1.2)           # noqa: E731
    p_tn = cdf(sigma_tn)
    for s in (0.05, 0.2):
        assert abs((sigma[~ambient] <= s).float().mean().item() - cdf(s) / p_tn) < 0.01
    for s in (1.0, 3.0):
        assert abs((sigma[ambient] <= s).float().mean().item() - (cdf(s) - p_tn) / (1 - p_tn)) < 0.01


def test_vp_and_latent_branch_fractions():
    cfg = ObjectiveConfig(form="vp", sigma_tn=0.5)
    sigma, ambient = VPAmbientLoss(cfg).draw_levels(100_000, "cpu", gen())
    t_n = float(vp_t(torch.tensor(0.5, dtype=torch.float64), cfg.vp_beta_d, cfg.vp_beta_min))
    assert abs(ambient.float().mean().item() - (1 - t_n) / (1 - cfg.vp_epsilon_t)) < 0.01
    assert torch.equal(ambient, sigma >= 0.5)
    sigma, ambient = VPAmbientLoss(ObjectiveConfig(form="vp", sigma_tn=0.5, branch_rule="uniform")) \
        .draw_levels(100_000, "cpu", gen())
    assert abs(ambient.float().mean().item() - 0.5) < 0.01
    assert (sigma[ambient] >= 0.5).all() and (sigma[~ambient] <= 0.5).all()
    assert float(vp_sigma(torch.tensor(1.0), 19.9, 0.1)) >= float(sigma.max())

    t, ambient = LatentVAmbientLoss(ObjectiveConfig(form="latent_v", t_n=100)).draw_levels(100_000, "cpu", gen())
    assert t.min() >= 0 and t.max() <= 999
    assert abs(ambient.float().mean().item() - 0.899) < 0.01 and torch.equal(ambient, t > 100)
    t, ambient = LatentVAmbientLoss(ObjectiveConfig(form="latent_v", t_n=100, branch_rule="uniform")) \
        .draw_levels(100_000, "cpu", gen())
    assert abs(ambient.float().mean().item() - 0.5) < 0.01
    assert (t[ambient] > 100).all() and (t[~ambient] <= 100).all() and t.max() <= 999


# --------------------------------------------------------------------------------------
# Numerics at the threshold, errors, the kernel seam
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("factor", [1.0, 1 + 1e-6, 1 + 1e-3])
def test_gradients_finite_at_the_threshold(factor):
    net, (x0, n) = FakePrecond(), images(n=8)
    sigma_tn = 0.5
    sigma = torch.full((8,), sigma_tn * factor)
    coefs = edm_coefficients(net, sigma, sigma >= sigma_tn, sigma_tn, SD)
    assert coefs.ambient.all()
    loss = REFERENCE.loss(net.raw, coefs, x0, x0 + sigma_tn * n, images(n=8, seed=3)[1]).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_latent_gradients_finite_just_above_t_n():
    net, (z0, n) = FakeVNet(), images(n=4, c=4)
    for space in ("x0", "v"):
        coefs = latent_v_coefficients(torch.full((4,), 51), torch.ones(4, dtype=torch.bool), 50, space)
        loss = REFERENCE.loss(net, coefs, z0, z0 + n, images(n=4, c=4, seed=3)[1]).mean()
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_residual_without_x_in_matches_to_rounding():
    net, (x0, n) = FakePrecond(), images()
    sigma = torch.exp(torch.linspace(-2, 2, 16))
    coefs = edm_coefficients(net, sigma, sigma >= 0.5, 0.5, SD)
    eps = images(seed=4)[1]
    net_in = REFERENCE.network_input(coefs, x0, x0 + 0.5 * n, eps)
    F = net.raw(net_in, coefs.c_noise)
    a = REFERENCE.residual_loss(coefs, F, net_in, x0, x0 + 0.5 * n)
    b = REFERENCE.loss(net.raw, coefs, x0, x0 + 0.5 * n, eps)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert isinstance(coefs, StepCoefficients) and coefs.A.dtype == torch.float32


def test_errors_name_the_problem():
    net, (x0, n) = FakePrecond(), images()
    loss_fn = build_loss(ObjectiveConfig(sigma_tn=0.5))
    with pytest.raises(ValueError, match="noisy copies"):
        loss_fn(net, x0, None, generator=gen())
    with pytest.raises(ValueError, match="shape"):
        loss_fn(net, x0, x0[:, :1], generator=gen())
    with pytest.raises(ValueError, match="objective.sigma_data"):
        build_loss(ObjectiveConfig(sigma_tn=0.5, sigma_data=1.0))(net, x0, x0, generator=gen())
    with pytest.raises(ValueError, match="objective.t_n"):
        build_loss(ObjectiveConfig(form="latent_v", t_n=999, branch_rule="uniform"))


def test_kernel_selection_returns_an_implementation_object(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for kind, device in (("reference", "cpu"), ("auto", torch.device("cpu")), ("auto", None)):
        kernel = select_kernel(kind, device)
        assert kernel is REFERENCE and isinstance(kernel, TwoBranchKernel)
        assert kernel.name == "reference"
        assert all(callable(getattr(kernel, m)) for m in ("network_input", "residual_loss", "loss"))
    with pytest.raises(KernelChoiceError, match="objective.kernel: 'fast' is not one of auto, reference"):
        select_kernel("fast", "cpu")
    # A fused kind that cannot run here says so (and what to use instead), as a user error.
    with pytest.raises(KernelChoiceError, match="'cuda' needs a CUDA device.*use 'auto' or 'reference'"):
        select_kernel("cuda", "cpu")
    # The loss chooses once per device and keeps the object.
    loss_fn = build_loss(ObjectiveConfig(sigma_tn=0.5))
    assert loss_fn.kernel(torch.device("cpu")) is REFERENCE is loss_fn.kernel("cpu")


def test_protocol_needs_both_passes():
    class OnlyPassOne(TwoBranchKernel):
        name = "half"

        def network_input(self, coefs, clean, noisy, eps):
            return clean
    with pytest.raises(TypeError, match="residual_loss"):
        OnlyPassOne()


def test_backward_scale_scales_the_gradient_not_the_reported_loss():
    """loss_fn(..., backward_scale=s) then (out.loss * s).backward(): the reported loss is the
    unscaled mean and the gradients are s times those of s = 1 (the reference path; the fused
    one is checked in test_kernels)."""
    x0, n = images(n=8)
    results = {}
    for s in (1.0, 0.25):
        net = FakePrecond()
        out = build_loss(ObjectiveConfig(sigma_tn=0.5))(net, x0, x0 + 0.5 * n, generator=gen(4),
                                                         backward_scale=s)
        (out.loss * s).backward()
        results[s] = (out.loss.detach(), [p.grad.clone() for p in net.parameters()])
    assert torch.equal(results[1.0][0], results[0.25][0])
    for one, quarter in zip(results[1.0][1], results[0.25][1]):
        torch.testing.assert_close(quarter, 0.25 * one, rtol=1e-6, atol=0)


def test_with_the_real_preconditioned_network():
    """The contract with ambient_dist.models (docs/INTERFACES.md): scalings/raw/forward agree
    with the loss, so sigma_tn = 0 is plain EDM bit for bit with a real U-Net too."""
    from ambient_dist.config import from_dict
    from ambient_dist.models import build_network
    cfg = from_dict({"data": {"resolution": 8, "channels": 3},
                     "network": {"precond": "edm", "model_channels": 16, "channel_mult": [1, 2],
                                 "num_blocks": 1, "attn_resolutions": [4], "dropout": 0.0},
                     "objective": {"sigma_tn": 0.0}})
    net = build_network(cfg).eval()   # eval: no dropout, so two calls see the same function
    x0, n = images(n=8)
    loss_fn = build_loss(cfg.objective)
    out = loss_fn(net, x0, None, generator=gen(6))
    sigma, _, eps = loss_fn.draw_noise(x0, gen(6))
    assert torch.equal(out.per_sample, plain_edm_loss(net, x0, sigma, eps))
    cfg.objective.sigma_tn = 0.5
    loss_fn = build_loss(cfg.objective)
    out = loss_fn(net, x0, x0 + 0.5 * n, generator=gen(7))
    sigma, ambient, eps = loss_fn.draw_noise(x0, gen(7))
    literal = literal_edm_ambient_loss(net, x0, x0 + 0.5 * n, sigma, ambient, 0.5, eps)
    torch.testing.assert_close(out.per_sample, literal, rtol=1e-4, atol=1e-4)


def test_counter_based_eps_is_the_same_noise_as_its_tensor():
    from ambient_dist.kernels import PhiloxNoise
    net, (x0, n) = FakePrecond(), images()
    loss_fn = build_loss(ObjectiveConfig(sigma_tn=0.5))
    noise = PhiloxNoise(seed=3, step=10, first_sample=16)
    a = loss_fn(net, x0, x0 + 0.5 * n, generator=gen(8), eps=noise)
    b = loss_fn(net, x0, x0 + 0.5 * n, generator=gen(8), eps=noise.normal_like(x0))
    assert torch.equal(a.per_sample, b.per_sample) and a.ambient.any()


SEAM_CHECK = """
import torch
from helpers import FakePrecond, images, gen
from ambient_dist.config import ObjectiveConfig
from ambient_dist.objective import build_loss
x0, n = images(n=8)
for sigma_tn, scale in ((0.0, 1.0), (0.5, 1.0), (0.5, 1 / 3)):
    results = []
    for kernel in ('reference', 'triton'):
        net = FakePrecond()
        out = build_loss(ObjectiveConfig(sigma_tn=sigma_tn, kernel=kernel))(
            net, x0, None if sigma_tn == 0 else x0 + sigma_tn * n, generator=gen(3),
            backward_scale=scale)
        assert out.loss.requires_grad
        (out.loss * scale).backward()
        results.append((out.per_sample.detach(), net.conv.weight.grad))
    (la, ga), (lb, gb) = results
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-4 * scale)
print('seam ok')
"""


def test_loss_through_the_fused_kernel_seam_matches_the_reference():
    """objective.kernel='triton' (the Triton interpreter on a CPU) gives the reference loss
    and gradient, with and without noisy copies. Own process: the interpreter flag must be
    set before triton is imported."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(repo), str(repo / "tests")]))
    out = subprocess.run([sys.executable, "-c", SEAM_CHECK], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "seam ok" in out.stdout


# --------------------------------------------------------------------------------------
# The paper's Table 2 baselines: noise-only and masking
# --------------------------------------------------------------------------------------

def test_noise_only_draws_the_lognormal_restricted_above_sigma_tn():
    from ambient_dist.objective import sample_noise_only_sigma
    sigma_tn = 0.5
    sigma, ambient = sample_noise_only_sigma(200_000, -1.2, 1.2, sigma_tn, gen())
    assert ambient.all() and (sigma >= sigma_tn).all()
    Phi = lambda v: 0.5 * (1 + math.erf(v / math.sqrt(2)))  # noqa: E731
    cdf = lambda s: Phi((math.log(s) + 1.2) / 1.2)           # noqa: E731
    p_tn = cdf(sigma_tn)
    for s in (0.7, 1.0, 3.0):
        assert abs((sigma <= s).float().mean().item() - (cdf(s) - p_tn) / (1 - p_tn)) < 0.01


def test_noise_only_loss_is_the_ambient_branch_for_every_sample():
    """NoiseOnlyLoss = section 2's ambient formula on every sample, with its own sigma draws."""
    from ambient_dist.objective import NoiseOnlyLoss, sample_noise_only_sigma
    net, (x0, n) = FakePrecond(), images()
    x_tn = x0 + 0.5 * n
    cfg = ObjectiveConfig(method="noise_only", sigma_tn=0.5)
    loss_fn = build_loss(cfg)
    assert isinstance(loss_fn, NoiseOnlyLoss)
    out = loss_fn(net, x0, x_tn, generator=gen(3))
    g = gen(3)
    sigma, ambient = sample_noise_only_sigma(len(x0), -1.2, 1.2, 0.5, g)
    eps = torch.randn(x0.shape, generator=g)
    literal = literal_edm_ambient_loss(net, x0, x_tn, sigma, ambient, 0.5, eps)
    assert out.ambient.all()
    torch.testing.assert_close(out.per_sample, literal, rtol=1e-5, atol=1e-5)
    # The clean images are never read: any other x0 gives the same loss.
    again = loss_fn(net, torch.zeros_like(x0), x_tn, generator=gen(3))
    torch.testing.assert_close(again.per_sample, out.per_sample, rtol=0, atol=0)


def test_noise_only_expected_loss_is_stationary_at_the_posterior_mean():
    x0 = draw_mixture(200_000, gen(31)).float().reshape(-1, 1, 1, 1)
    x_tn = x0 + 0.5 * torch.randn(x0.shape, generator=gen(32))
    loss_fn = build_loss(ObjectiveConfig(method="noise_only", sigma_tn=0.5))
    zs = []
    for bias in (0.0, 0.05):
        net = PosteriorPrecond(len(x0), bias)
        loss_fn(net, x0, x_tn, generator=gen(33)).loss.backward()
        g = net.offset.grad.flatten().double() * len(x0)
        zs.append(float(g.mean() / (g.std() / math.sqrt(len(g)))))
    assert abs(zs[0]) < 4 and abs(zs[1]) > 10


class MaskPosteriorNet(nn.Module):
    """One-pixel images: D = E[x0 | observed] where the further-corrupted mask keeps the pixel,
    the prior mean where it erased it (nothing observed), plus a per-sample offset."""
    sigma_data = SD

    def __init__(self, n, bias=0.0):
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(n, 1, 1, 1))
        self.bias, self.masks = bias, []

    def forward(self, x, sigma, labels=None, mask=None):
        self.masks.append(mask)
        seen = posterior_mean(x * mask, 1.0, sigma.double().reshape(-1, 1) ** 2).reshape(x.shape)
        prior = float((PROBS * MEANS).sum())
        D = torch.where(mask > 0, seen, torch.full_like(seen, prior))
        return (D + self.bias + self.offset.double()).float()


def test_masking_expected_loss_is_stationary_at_the_posterior_mean_of_the_observation():
    """The masking loss (Daras et al. 2023) is minimised by E[x0 | A~ x_in, A~] on the pixels A
    keeps, both where A~ kept them (posterior) and where it erased them (prior mean)."""
    n = 200_000
    x0 = draw_mixture(n, gen(41)).float().reshape(-1, 1, 1, 1)
    A = (torch.rand(x0.shape, generator=gen(42)) >= 0.4).float()
    loss_fn = build_loss(ObjectiveConfig(method="masking", sigma_tn=0.0))
    for part in ("kept", "erased"):
        zs = []
        for bias in (0.0, 0.5):   # an offset of 0.5 is plainly off the minimiser
            net = MaskPosteriorNet(n, bias)
            loss_fn(net, x0, None, generator=gen(43), mask=A).loss.backward()
            further = net.masks[0].flatten() > 0
            g = net.offset.grad.flatten().double() * n
            sel = (A.flatten() > 0) & (further if part == "kept" else ~further)
            zs.append(float(g[sel].mean() / (g[sel].std() / math.sqrt(int(sel.sum())))))
        assert abs(zs[0]) < 4.5, part
        assert abs(zs[1]) > 10, part


def test_masking_loss_never_reads_pixels_the_fixed_mask_erased():
    torch.manual_seed(0)
    from ambient_dist.models.precond import EDMPrecond
    from ambient_dist.models.song_unet import SongUNet
    unet = SongUNet(img_resolution=8, in_channels=2, out_channels=1, model_channels=8,
                    channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
    net = EDMPrecond(unet, 8, 1, 0)
    net.mask_input = True
    from helpers import perturb
    perturb(net).eval()   # no dropout: two calls must see the same network
    x0 = torch.rand(6, 1, 8, 8, generator=gen(5)) * 2 - 1
    A = (torch.rand(x0.shape, generator=gen(6)) >= 0.4).float()
    loss_fn = build_loss(ObjectiveConfig(method="masking", sigma_tn=0.0))
    out = loss_fn(net, x0, None, generator=gen(7), mask=A)
    changed = torch.where(A > 0, x0, torch.full_like(x0, 0.77))   # replace every erased pixel
    again = loss_fn(net, changed, None, generator=gen(7), mask=A)
    torch.testing.assert_close(again.per_sample, out.per_sample, rtol=0, atol=0)
    # ...while a kept pixel does change it, and the loss is the literal formula.
    g = gen(7)
    sigma = (torch.randn(6, generator=g) * 1.2 - 1.2).exp()
    eps = torch.randn(x0.shape, generator=g)
    further = A * (torch.rand(x0.shape, generator=g) >= 0.1).float()
    D = net(x0 + sigma.reshape(-1, 1, 1, 1) * eps, sigma, mask=further)
    lam = (sigma ** 2 + SD ** 2) / (sigma * SD) ** 2
    literal = lam * (A * (D - x0)).square().sum(dim=(1, 2, 3))
    torch.testing.assert_close(out.per_sample, literal, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="inpainting mask"):
        loss_fn(net, x0, None, generator=gen(7))


def test_ambient_loss_refuses_masks():
    with pytest.raises(ValueError, match="takes no inpainting masks"):
        build_loss(ObjectiveConfig(sigma_tn=0.5))(FakePrecond(), *images(), mask=torch.ones(16, 3, 8, 8))


class MaskedFake(FakePrecond):
    """A mask-conditioned stand-in: the FakePrecond on the kept pixels."""

    def forward(self, x, sigma, labels=None, mask=None):
        return super().forward(x * mask, sigma, labels)


@pytest.mark.parametrize("method, sigma_tn", [("ambient", 0.5), ("ambient", 0.0), ("noise_only", 0.5), ("masking", 0.0)])
def test_the_loss_refuses_images_in_zero_one_units(method, sigma_tn):
    """Field case: the training loss called directly with [0, 1] images returned other numbers."""
    from ambient_dist.noise import ImageRangeError
    x0, n = images()
    loss_fn = build_loss(ObjectiveConfig(method=method, sigma_tn=sigma_tn))
    mask = torch.ones_like(x0) if method == "masking" else None
    net = MaskedFake() if method == "masking" else FakePrecond()
    with pytest.raises(ImageRangeError, match=r"clean images \(first batch\).*\[0, 1\] units"):
        loss_fn(net, (x0 + 1) / 2, (x0 + 1) / 2 + 0.5 * n, generator=gen(), mask=mask)
    with pytest.raises(ImageRangeError, match="raw 0..255"):
        loss_fn(net, (x0 + 1) * 127.5, x0, generator=gen(), mask=mask)
    loss_fn(net, x0, x0 + 0.5 * n, generator=gen(), mask=mask)           # [-1, 1]: fine
    # Checked once: later batches cost no host synchronisation (and are not second-guessed).
    loss_fn(net, (x0 + 1) / 2, x0 + 0.5 * n, generator=gen(), mask=mask)
