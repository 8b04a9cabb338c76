"""EDM samplers: time steps, per-image seeding, landing on a known distribution, guidance."""
import math

import pytest
import torch

from ambient_dist.config import SamplingConfig
from ambient_dist.sampling import (
    SamplerSettings, class_labels, classifier_free_guidance, edm_sample, edm_sigma_steps)

MU, STD = 0.3, 0.4   # the data: N(MU, STD^2 I)


def gaussian_denoiser(x, sigma, labels=None):
    """The exact E[x0 | x] for x = x0 + sigma n, x0 ~ N(MU, STD^2 I)."""
    s2 = sigma.reshape(-1, 1, 1, 1).double() ** 2
    return MU + STD ** 2 / (STD ** 2 + s2) * (x.double() - MU)


def test_sigma_steps_follow_edm_schedule():
    steps = edm_sigma_steps(18, 0.002, 80.0, 7.0)
    assert steps.dtype == torch.float64 and steps.shape == (19,)
    assert math.isclose(steps[0].item(), 80.0, rel_tol=1e-12)
    assert math.isclose(steps[17].item(), 0.002, rel_tol=1e-12)
    assert steps[18].item() == 0.0
    assert (steps[1:] < steps[:-1]).all()
    # The rho-th roots are evenly spaced.
    roots = steps[:-1] ** (1 / 7)
    torch.testing.assert_close(roots.diff(), roots.diff()[:1].expand(17))


def test_settings_from_config_and_checks():
    s = SamplerSettings.from_config(SamplingConfig(steps=40), S_churn=10)
    assert (s.num_steps, s.sigma_max, s.S_churn) == (40, 80.0, 10)
    with pytest.raises(ValueError, match="solver"):
        edm_sample(gaussian_denoiser, [0], (1, 2, 2), settings=SamplerSettings(solver="rk4"))


@pytest.mark.parametrize("settings", [
    SamplerSettings(num_steps=8),
    SamplerSettings(num_steps=8, solver="euler"),
    SamplerSettings(num_steps=8, S_churn=20, S_min=0.05, S_max=50, S_noise=1.003)])
def test_image_n_is_the_same_for_any_batch_size(settings):
    shape = (3, 4, 4)
    whole = edm_sample(gaussian_denoiser, list(range(6)), shape, seed=3, settings=settings)
    parts = [edm_sample(gaussian_denoiser, [n], shape, seed=3, settings=settings) for n in (4, 1)]
    assert torch.equal(parts[0][0], whole[4]) and torch.equal(parts[1][0], whole[1])
    other_seed = edm_sample(gaussian_denoiser, [1], shape, seed=4, settings=settings)
    assert not torch.allclose(other_seed[0], whole[1])
    assert whole.dtype == torch.float32


def heun_gain(steps, std):
    """The scalar Heun recursion for the linear ODE d(x - MU)/dsigma = sigma/(std^2+sigma^2) (x - MU),
    written out independently: x_final - MU = gain * (x_start - MU)."""
    f = lambda t: t / (std ** 2 + t ** 2)  # noqa: E731
    gain = 1.0
    for t, t_next in zip(steps[:-1], steps[1:]):
        h = t_next - t
        euler = 1 + h * f(t)
        gain *= (1 + h / 2 * (f(t) + f(t_next) * euler)) if t_next > 0 else euler
    return gain


def test_heun_matches_its_recursion_exactly_on_gaussian_data():
    from ambient_dist.sampling import PerImageNoise
    steps = edm_sigma_steps(18, 0.002, 80.0, 7.0).tolist()
    x = edm_sample(gaussian_denoiser, list(range(8)), (1, 4, 4), seed=2)
    start = PerImageNoise(2, range(8)).randn((1, 4, 4), "cpu") * 80.0
    expected = MU + heun_gain(steps, STD) * (start - MU)
    torch.testing.assert_close(x, expected.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("solver, steps, tol", [("heun", 64, 0.01), ("euler", 256, 0.03)])
def test_exact_denoiser_of_gaussian_data_lands_on_it(solver, steps, tol):
    # (At 18 steps Heun's discretisation error on this data is +6% in std -- see the test above.)
    x = edm_sample(gaussian_denoiser, list(range(512)), (1, 8, 8), seed=0,
                   settings=SamplerSettings(num_steps=steps, solver=solver))
    assert abs(x.mean().item() - MU) < 0.01
    assert abs(x.std().item() - STD) < tol * STD


def test_stochastic_sampler_lands_on_the_data_too():
    x = edm_sample(gaussian_denoiser, list(range(512)), (1, 8, 8), seed=1,
                   settings=SamplerSettings(num_steps=128, S_churn=40, S_min=0.05, S_max=50, S_noise=1.0))
    assert abs(x.mean().item() - MU) < 0.01
    assert abs(x.std().item() - STD) < 0.02 * STD


def test_classifier_free_guidance_extrapolates_from_unconditional():
    calls = []

    def denoiser(x, sigma, labels):
        calls.append(labels)
        # Class 1 pulls to +0.5, no label (unconditional) to 0: guidance 2 lands on 1.0.
        if labels is None:
            return torch.zeros_like(x)
        return torch.full_like(x, 0.5) * (labels == 1).reshape(-1, 1, 1, 1)

    labels = torch.tensor([1, 1, 1])
    x = edm_sample(denoiser, [0, 1, 2], (1, 2, 2), labels=labels, guidance=classifier_free_guidance(2.0),
                   settings=SamplerSettings(num_steps=4))
    assert any(c is None for c in calls) and any(c is labels for c in calls)
    torch.testing.assert_close(x, torch.ones_like(x), rtol=0, atol=1e-4)


def test_autocast_dtype_reaches_the_denoiser():
    seen = []

    def denoiser(x, sigma, labels=None):
        seen.append(torch.is_autocast_enabled("cpu"))
        return (x @ torch.eye(x.shape[-1])).float() * 0   # a matmul runs in bf16 under autocast

    edm_sample(denoiser, [0], (1, 2, 2), autocast_dtype=torch.bfloat16, settings=SamplerSettings(num_steps=2))
    assert seen and all(seen)


def test_class_labels_cycle_through_the_classes_by_image_index():
    assert class_labels([0, 1, 5, 12], 5).tolist() == [0, 1, 0, 2]
    assert class_labels([3, 4], 10, fixed=7).tolist() == [7, 7]
    assert class_labels([3, 4], 0) is None and class_labels([3], 0, fixed=1) is None
    assert class_labels(range(3), 2).dtype == torch.long


def test_noise_only_sampling_stops_at_sigma_tn_and_returns_the_estimate_there():
    from ambient_dist.config import ExperimentConfig, ObjectiveConfig
    cfg = ExperimentConfig(objective=ObjectiveConfig(method="noise_only", sigma_tn=0.5))
    settings = SamplerSettings.for_run(cfg)
    assert settings.sigma_min == 0.5 and settings.mask_survival == 0
    seen = []

    def denoiser(x, sigma, labels=None):
        seen.append(float(sigma[0]))
        return gaussian_denoiser(x, sigma)
    out = edm_sample(denoiser, [0, 1], (1, 4, 4), seed=3, settings=settings)
    assert min(seen) == pytest.approx(0.5) and seen[-1] == pytest.approx(0.5)
    # The last (Euler) step to sigma = 0 is exactly x0-hat at sigma_tn: rerun the last call.
    x_last = edm_sample(denoiser, [0, 1], (1, 4, 4), seed=3, settings=SamplerSettings(
        num_steps=settings.num_steps, sigma_min=0.5, solver="heun"))
    torch.testing.assert_close(out, x_last)
    ambient = SamplerSettings.for_run(ExperimentConfig(objective=ObjectiveConfig(sigma_tn=0.5)))
    assert ambient.sigma_min == 0.002   # Algorithm 1 samples all the way down


def test_fixed_mask_sampler_keeps_one_mask_per_image_at_any_batch_size():
    from ambient_dist.config import ExperimentConfig, ObjectiveConfig
    cfg = ExperimentConfig(objective=ObjectiveConfig(method="masking", sigma_tn=0.0))
    settings = SamplerSettings.for_run(cfg)
    settings.num_steps = 4
    assert settings.mask_survival == pytest.approx(0.6 * 0.9)
    masks_seen = []

    def denoiser(x, sigma, labels=None, mask=None):
        masks_seen.append(mask.clone())
        return 3 * gaussian_denoiser(x * mask, sigma)   # out of range: the sampler clips
    together = edm_sample(denoiser, [0, 1, 2, 3], (1, 16, 16), seed=1, settings=settings)
    first = masks_seen[0]
    assert all(torch.equal(m, first) for m in masks_seen)          # the same mask every step
    assert not torch.equal(first[0], first[1])                     # one per image
    assert abs(first.mean().item() - 0.54) < 0.06
    masks_seen.clear()
    apart = torch.cat([edm_sample(denoiser, [n], (1, 16, 16), seed=1, settings=settings) for n in (2, 3)])
    torch.testing.assert_close(apart, together[2:], rtol=0, atol=1e-6)
    assert torch.equal(masks_seen[-1][0], first[3])


# --- settings the sampler replaces are said (issue 22, case 7) -------------------------------

@pytest.fixture
def fresh_notes(monkeypatch):
    """Notes said in earlier tests of this process are said again."""
    from ambient_dist import progress
    monkeypatch.setattr(progress, "_SAID", set())
    monkeypatch.delenv("RANK", raising=False)


def test_a_replaced_sigma_min_is_said_once_and_kept_in_the_notes(fresh_notes, capsys):
    from ambient_dist.config import load_config
    cfg = load_config(None, ["objective.method=noise_only", "objective.sigma_tn=0.5",
                             "sampling.sigma_min=0.002"])
    settings = SamplerSettings.for_run(cfg)
    assert settings.sigma_min == 0.5 and cfg.sampling.sigma_min == 0.002
    assert settings.notes == [
        "sampling.sigma_min 0.002 replaced by objective.sigma_tn = 0.5: objective.method=noise_only "
        "never learned below sigma_tn, so sampling stops there and returns the denoiser's estimate "
        "D(x; sigma_tn)"]
    SamplerSettings.for_run(cfg)   # the end-of-run grid, the attraction, ...: said once
    assert capsys.readouterr().out == f"note: {settings.notes[0]}\n"
    # nothing replaced, nothing said
    cfg = load_config(None, ["objective.method=noise_only", "objective.sigma_tn=0.5",
                             "sampling.sigma_min=0.7"])
    assert SamplerSettings.for_run(cfg).notes == [] and capsys.readouterr().out == ""
    assert SamplerSettings.for_run(load_config(None)).notes == []
    # a noise level that leaves nothing to sample is refused when the config is read
    with pytest.raises(ValueError, match="^objective.sigma_tn: must be below sampling.sigma_max"):
        load_config(None, ["objective.method=noise_only", "objective.sigma_tn=90"])


def test_the_masking_sampler_and_a_clamped_churn_are_said(fresh_notes, capsys, monkeypatch):
    from ambient_dist.config import load_config
    cfg = load_config(None, ["objective.method=masking", "objective.sigma_tn=0"])
    notes = SamplerSettings.for_run(cfg).notes
    assert len(notes) == 1 and "keeps (1 - mask_corruption)(1 - mask_delta) = 0.54 of its pixels" in notes[0]
    cfg = load_config(None, ["sampling.S_churn=100", "sampling.steps=18"])
    notes = SamplerSettings.for_run(cfg).notes
    assert notes == ["sampling.S_churn 100 over 18 steps is clamped to gamma = sqrt(2) - 1 = 0.4142 "
                     "per step (EDM's limit): any S_churn >= 7.456 samples the same"]
    assert SamplerSettings.for_run(load_config(None, ["sampling.S_churn=7"])).notes == []
    # the clamp is what the sampler does: S_churn 100 and 1000 sample the same images
    a, b = (edm_sample(gaussian_denoiser, [0, 1], (1, 2, 2), seed=1, settings=SamplerSettings(
        num_steps=6, S_churn=c, S_max=80)) for c in (100, 1000))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # only rank 0 speaks under a launcher
    capsys.readouterr()
    monkeypatch.setenv("RANK", "1")
    SamplerSettings.for_run(load_config(None, ["sampling.S_churn=99"]))
    assert capsys.readouterr().out == ""
