"""Text-conditional training: the epsilon form of the latent loss, the mitigations, a few
training steps through launchers/train.py, guided sampling and the diffusers export.

Single process here; test_text_deepspeed.py runs the text task on two DeepSpeed ranks. The Monte Carlo unbiasedness of the ambient v target is
tested in test_objective.py (test_latent_v_targets_have_posterior_mean) and not repeated.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

from ambient_dist.config import ObjectiveConfig
from ambient_dist.noise import ddpm_alpha_sigma
from ambient_dist.objective import LatentVAmbientLoss
from ambient_dist.text.mitigations import CaptionDropout, PredictionMagnitudeFilter, TextEmbeddingNoise
from ambient_dist.text.sampling import TextSamplerSettings, sample_images
from ambient_dist.text.sd_models import load_components
from ambient_dist.text.loss import LatentEpsAmbientLoss, TextAmbientLoss, unet_network

from helpers import RES, gen, latent_config

ROOT = Path(__file__).resolve().parent.parent


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


# --------------------------------------------------------------------------------------
# Mitigations: each changes what it should, and nothing when off
# --------------------------------------------------------------------------------------

def test_caption_dropout():
    cond, empty = torch.randn(4000, 3, 2, generator=gen(1)), torch.randn(1, 3, 2, generator=gen(2))
    same, dropped = CaptionDropout(0.0)(cond, empty, gen())
    assert same is cond and not dropped.any()
    out, dropped = CaptionDropout(0.25)(cond, empty, gen())
    assert 0.22 < dropped.float().mean() < 0.28
    assert torch.equal(out[dropped], empty.expand(int(dropped.sum()), 3, 2))
    assert torch.equal(out[~dropped], cond[~dropped])
    with pytest.raises(ValueError, match="caption_dropout"):
        CaptionDropout(1.0)


def test_text_embedding_noise():
    cond = torch.randn(64, 77, 32, generator=gen(1))
    assert TextEmbeddingNoise(0.0)(cond, gen()) is cond
    noisy = TextEmbeddingNoise(0.3)(cond, gen())
    assert abs(float((noisy - cond).std()) - 0.3) < 0.01
    assert torch.equal(noisy, TextEmbeddingNoise(0.3)(cond, gen()))  # from the given generator


def test_prediction_magnitude_is_in_epsilon_units():
    t = torch.tensor([10, 500, 990])
    z, cond, empty = torch.randn(3, 4, 4, 4), torch.randn(3, 5, 8), torch.zeros(1, 5, 8)
    net = lambda z_t, tt, c: z_t + c.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)  # noqa: E731
    out = net(z, t, cond)
    v = PredictionMagnitudeFilter(1.0, "v").magnitude(net, z, t, cond, empty, out)
    e = PredictionMagnitudeFilter(1.0, "epsilon").magnitude(net, z, t, cond, empty, out)
    expected = cond.mean(dim=(1, 2)).abs() * 8  # the difference is constant over 64 elements
    torch.testing.assert_close(e, expected)
    torch.testing.assert_close(v, expected * ddpm_alpha_sigma(t)[0].float())
    off, record = PredictionMagnitudeFilter(0.0, "v").wrap(net, empty)
    assert torch.equal(off(z, t, cond), out) and record == {}


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


# --------------------------------------------------------------------------------------
# Training, export, sampling
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(latent_shards, tiny_model, tmp_path_factory):  # noqa: F811
    """Three steps of 4 through launchers/train.py, with both mitigations and the ambient branch."""
    sys.path.insert(0, str(ROOT / "launchers"))
    import train
    out, _, _ = latent_shards
    run = tmp_path_factory.mktemp("runs") / "laion-tiny"
    overrides = [f"data.shards={out}", "data.subset=0", f"data.resolution={RES}", f"text.model_path={tiny_model}",
                 "train.batch=4", "train.total_kimg=0.012", "train.log_every_kimg=0.004",
                 "train.checkpoint_every_kimg=0.008", "train.sample_every_kimg=100",
                 "train.precision=fp32", "optimizer.lr=1.0e-3", "sampling.num_images=2",
                 "text.sample_steps=2", "text.text_noise_std=0.1", "text.drop_threshold=1.0e+6",
                 "evaluation.memorization_features=pixels", "evaluation.heldout_images=2"]
    assert train.main(["--config", str(ROOT / "configs/laion-sd2-base.yaml"), "--run-dir", str(run),
                       *overrides]) == 0
    return run, overrides


def test_resumed_run_equals_uninterrupted(trained_run, tmp_path):
    """Two steps, stop, resume for the third: the same EMA bit for bit as three straight
    steps (caption dropout and embedding noise come from the saved noise generator)."""
    import train
    from safetensors.torch import load_file
    straight, overrides = trained_run
    run = tmp_path / "resumed"
    config = ["--config", str(ROOT / "configs/laion-sd2-base.yaml"), "--run-dir", str(run)]
    assert train.main([*config, *overrides, "train.total_kimg=0.008"]) == 0
    assert train.main([*config, "--resume", "auto", *overrides]) == 0
    a, b = load_file(straight / "ema.safetensors"), load_file(run / "ema.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_steps_write_checkpoints_and_report(trained_run, tiny_model):
    run, _ = trained_run
    latest = (run / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((run / "checkpoints" / latest / "meta.json").read_text())
    assert meta["images_seen"] == 12 and meta["steps"] == 3 and meta["bad_steps"] == 0
    filtered = json.loads((run / "text_filter.json").read_text())
    assert filtered["samples"] == 12 and filtered["dropped"] == 0  # threshold 1e6 keeps all
    assert 0 < filtered["magnitude_percentiles"]["p50"] <= filtered["magnitude_percentiles"]["p99"]
    summary = json.loads((run / "memorization.json").read_text())
    assert summary["generated"]["count"] == 2 and summary["heldout"]["count"] == 2
    from safetensors.torch import load_file
    ema = load_file(run / "ema.safetensors")
    init = load_components(tiny_model, ("unet",)).unet.state_dict()
    assert ema.keys() == init.keys() and any(not torch.equal(ema[k], init[k]) for k in ema)


def test_export_loads_in_diffusers_pipeline_and_generates(trained_run):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file
    run, _ = trained_run
    export = run / "diffusers"
    pipe = StableDiffusionPipeline.from_pretrained(export, local_files_only=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    ema = load_file(run / "ema.safetensors")
    assert all(torch.equal(v, ema[k]) for k, v in pipe.unet.state_dict().items())
    image = pipe(["a cat"], height=RES, width=RES, num_inference_steps=1, output_type="np").images
    assert image.shape == (1, RES, RES, 3) and float(image.std()) > 0


def test_sample_text_launcher_writes_what_evaluate_reads_and_resumes(trained_run, tmp_path, capsys):
    import sample_text
    from ambient_dist.metrics.samples import read_samples
    run, _ = trained_run
    out = tmp_path / "samples"
    argv = [str(run), "--num", "3", "--steps", "1", "--batch", "2", "--out", str(out), "--quiet"]
    assert sample_text.main(argv) == 0 and "3 images written" in capsys.readouterr().out
    _, images, _ = read_samples(out)
    assert images.shape == (3, 3, RES, RES) and images.dtype == torch.uint8
    prompts = (out / "prompts.txt").read_text().splitlines()
    assert len(prompts) == 3 and all(p.startswith("caption ") for p in prompts)
    assert sample_text.main(argv) == 0 and "0 images written" in capsys.readouterr().out
    assert sample_text.main([*argv[:-1], "--guidance", "2", "--quiet"]) == 2  # other settings: refused
    assert "made differently" in capsys.readouterr().err
    # The same settings as config overrides (the short flags are names for them): nothing new.
    overridden = [str(run), "--num", "3", "--batch", "2", "--out", str(out), "--quiet",
                  "text.sample_steps=1"]
    assert sample_text.main(overridden) == 0 and "0 images written" in capsys.readouterr().out
    assert sample_text.main([*overridden, "text.guidance_scale=2"]) == 2
    assert "made differently" in capsys.readouterr().err


def test_sample_text_on_a_bare_model_takes_only_the_samplers_overrides(trained_run, tmp_path, capsys):
    import sample_text
    run, _ = trained_run
    bare = [str(run / "diffusers"), "--prompts", str(tmp_path / "p.txt"), "--num", "1", "--quiet",
            "--out", str(tmp_path / "s")]
    (tmp_path / "p.txt").write_text("a cat\n")
    assert sample_text.main([*bare, "optimizer.lr=1"]) == 2
    assert "only the sampler's keys apply" in capsys.readouterr().err
    assert sample_text.main([*bare, "text.sample_steps=1", f"data.resolution={RES}"]) == 0
    from ambient_dist.metrics.samples import read_samples
    assert read_samples(tmp_path / "s")[1].shape == (1, 3, RES, RES)


def test_guided_sampling_is_per_image_and_sampler_dependent(tiny_model):
    c = load_components(tiny_model)
    prompts = ["the cat", "a dog", "caption 3"]
    settings = TextSamplerSettings(resolution=RES, steps=1, batch_size=3)
    together = sample_images(c, prompts, [0, 1, 2], settings, "cpu")
    alone = sample_images(c, prompts[1:2], [1], TextSamplerSettings(**{**vars(settings), "batch_size": 1}), "cpu")
    assert together.shape == (3, 3, RES, RES)
    torch.testing.assert_close(alone[0], together[1], atol=1e-4, rtol=1e-4)
    euler = sample_images(c, prompts, [0, 1, 2], TextSamplerSettings(**{**vars(settings), "sampler": "euler"}), "cpu")
    unguided = sample_images(c, prompts, [0, 1, 2], TextSamplerSettings(**{**vars(settings), "guidance_scale": 1.0}), "cpu")
    assert not torch.allclose(euler, together) and not torch.allclose(unguided, together)


def test_throughput_harness_runs_the_real_paths(tmp_path):
    from ambient_dist.text.throughput import measure
    result = measure("tiny", RES, images=8, batch=4, steps=1, precision="fp32", workdir=tmp_path,
                     device=torch.device("cpu"))
    assert result["latent_shards_img_per_s"] > 0 and result["train_img_per_s"] > 0
    assert result["unet_parameters"] == 203204
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["counts"]["train"] == 8
