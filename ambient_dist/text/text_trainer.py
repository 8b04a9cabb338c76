"""Ambient fine-tuning of Stable Diffusion's U-Net on latent shards, under the engine's loop.

The engine's `Trainer` (ambient_dist.engine.trainer) runs the loop, the optimizer step, EMA,
checkpoints, resume and the end-of-run memorization summary; `TextTrainer` supplies what is
different for a text-conditional latent model:

- the network is the checkpoint's UNet2DConditionModel (trained, gradient checkpointing
  optional), the VAE and CLIP text encoder are frozen and never enter the optimizer, the EMA
  or the checkpoints;
- batches come from latent shards (text.latents.LatentLoader) as the engine's `Batch`, with the
  text embedding in the `labels` slot (stored in the shards, or encoded here from the caption);
- the loss is `TextAmbientLoss`: caption dropout, text-embedding noise and the prediction-
  magnitude filter (text.mitigations) around the latent ambient loss of ambient_dist.objective
  (v-prediction, or its epsilon-prediction twin below);
- `generate` samples with classifier-free guidance from the training captions (text.sampling),
  and the run ends with a diffusers directory of the EMA U-Net (text.export).

Precision: train.precision bf16 autocasts the U-Net call (fp32 master weights, fp32 EMA).
Runs as a single process; multi-rank runs use the engine's DeepSpeed path when it takes
external networks (not yet).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

import torch

from ambient_dist.config import ConfigError, ExperimentConfig, save_config
from ambient_dist.data.loader import Batch
from ambient_dist.data.shards import ShardError
from ambient_dist.engine.checkpoint import CheckpointManager
from ambient_dist.engine.ema import EMA
from ambient_dist.engine.logging import TrainingStats
from ambient_dist.engine.trainer import (
    Trainer, build_optimizer, check_output_dir, find_resume_point, format_memorization,
    resolve_run_dir, write_run_info)
from ambient_dist.noise import ddpm_alpha_sigma
from ambient_dist.objective import LatentVAmbientLoss, LossOutput, StepCoefficients

from .export import export_pipeline
from .latents import LatentLoader, encode_text, read_latent_manifest
from .mitigations import CaptionDropout, PredictionMagnitudeFilter, TextEmbeddingNoise
from .sampling import TextSamplerSettings, prompts_for, sample_images
from .sd_models import SCHEDULER_PREDICTION, ModelError, SDComponents, load_components

EXPORT_DIR = "diffusers"


# --------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------

class LatentEpsAmbientLoss(LatentVAmbientLoss):
    """The latent ambient loss for a U-Net that predicts epsilon instead of v.

    With z_t = alpha_t z0 + s_t eps, v = (eps - s_t z_t) / alpha_t, so a residual linear in v,
    r = A v + B z_t + C src, is in terms of the network's epsilon output
        r = (A / alpha_t) eps_pred + (B - A s_t / alpha_t) z_t + C src,
    and weight * alpha_t^2 makes the clean branch exactly ||eps_pred - eps||^2 (SD's loss) in
    either loss space. The ambient branch keeps its target E[z_tn | z_t] unchanged.
    """

    def coefficients(self, net, t, ambient) -> StepCoefficients:
        v = super().coefficients(net, t, ambient)
        alpha_t, s_t = (x.float() for x in ddpm_alpha_sigma(t))
        return dataclasses.replace(v, A=v.A / alpha_t, B=v.B - v.A * s_t / alpha_t,
                                   weight=v.weight * alpha_t ** 2)


def unet_network(unet: torch.nn.Module):
    """F(z_t, t, c) = the U-Net's prediction, float32 (the form the latent loss calls)."""
    def network(z_t, t, cond):
        return unet(z_t, t, encoder_hidden_states=cond).sample.float()
    return network


class TextAmbientLoss:
    """loss_fn(unet, clean, noisy, cond, generator) -> LossOutput, as the engine calls it.

    Order of the random draws (all from `generator`): caption dropout, text-embedding noise,
    then the latent loss's timesteps and noise.
    """

    def __init__(self, cfg: ExperimentConfig, empty: torch.Tensor):
        if cfg.objective.form != "latent_v":
            raise ConfigError(f"objective.form: text-conditional training uses 'latent_v', got "
                              f"{cfg.objective.form!r}")
        loss_cls = LatentVAmbientLoss if cfg.text.prediction == "v" else LatentEpsAmbientLoss
        self.latent_loss = loss_cls(cfg.objective)
        self.empty = empty
        self.dropout = CaptionDropout(cfg.text.caption_dropout)
        self.text_noise = TextEmbeddingNoise(cfg.text.text_noise_std)
        self.filter = PredictionMagnitudeFilter(cfg.text.drop_threshold, cfg.text.prediction)
        self.samples = self.dropped = 0   # counts for the log: samples seen, removed by the filter

    def __call__(self, unet, clean: torch.Tensor, noisy: Optional[torch.Tensor],
                 cond: torch.Tensor, generator: Optional[torch.Generator] = None) -> LossOutput:
        if cond is None:
            raise ValueError("TextAmbientLoss: every sample needs a text embedding")
        cond, _ = self.dropout(cond, self.empty, generator)
        cond = self.text_noise(cond, generator)
        network, record = self.filter.wrap(unet_network(unet), self.empty)
        out = self.latent_loss(network, clean, noisy, cond, generator=generator)
        self.samples += clean.shape[0]
        if "keep" not in record:
            return out
        keep = record["keep"].to(out.per_sample.dtype)
        self.dropped = self.dropped + (clean.shape[0] - keep.sum().detach())  # no host sync
        # Mean over the samples that stay: dropping must not shrink the step of the others.
        loss = (out.per_sample * keep).sum() / keep.sum().clamp(min=1)
        return LossOutput(loss, out.per_sample * keep, out.ambient, out.sigma)


# --------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------

class TextTrainer(Trainer):
    """The engine's Trainer with a Stable Diffusion U-Net, latent shards and text conditioning.

    Only construction and sampling differ; the step, the loop, checkpoints, resume and the
    end-of-run report are the engine's.
    """

    def __init__(self, cfg: ExperimentConfig, run_dir: str | os.PathLike,
                 device: Optional[torch.device] = None, resume_from: Optional[Path] = None):
        if not cfg.text.model_path:
            raise ConfigError("text.model_path: set it to a local diffusers-format Stable Diffusion "
                              "2.x directory")
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.rank, self.world_size = 0, 1
        t = cfg.train
        self.micro_batch = cfg.micro_batch(self.world_size)
        self.accumulation = cfg.accumulation_steps(self.world_size)
        self.memory_format = torch.contiguous_format

        try:
            self.components: SDComponents = load_components(cfg.text.model_path, device=self.device)
        except ModelError as e:
            raise ConfigError(f"text.model_path: {e}") from None
        have = self.components.scheduler_config.get("prediction_type", "epsilon")
        if have != SCHEDULER_PREDICTION[cfg.text.prediction]:
            raise ConfigError(f"text.prediction is {cfg.text.prediction!r} but {cfg.text.model_path} "
                              f"predicts {have!r} (scheduler/scheduler_config.json); set it to match")
        self.net = self.components.unet.train().requires_grad_(True)
        if cfg.text.gradient_checkpointing:
            self.net.enable_gradient_checkpointing()
        empty = encode_text(self.components.text_encoder, self.components.tokenizer, [""])
        self.loss_fn = TextAmbientLoss(cfg, empty)
        self.optimizer = build_optimizer(self.net.parameters(), cfg, self.device)
        self.ema = EMA.of_module(self.net)
        self.noise_generator = torch.Generator(self.device).manual_seed(t.seed + 1 + self.rank)
        self.checkpoints = CheckpointManager(self.run_dir, t.keep_checkpoints)
        self.images_seen = self.steps = self.bad_steps = self.bad_in_a_row = 0
        if resume_from is not None:
            self._restore(resume_from)
        self.loader = LatentLoader(cfg, self.rank, self.world_size, self.device,
                                   start_sample=self.images_seen, vae=self.components.vae)
        self.batches = (self._conditioned(b) for b in self.loader)
        self.stats = TrainingStats()

    def _conditioned(self, batch) -> Batch:
        """A latent batch as the engine's Batch, the text embedding in the labels slot."""
        c = self.components
        cond = batch.text if batch.text is not None else encode_text(c.text_encoder, c.tokenizer,
                                                                     batch.captions)
        return Batch(batch.keys, batch.clean, batch.noisy, cond.float())

    # -- sampling ----------------------------------------------------------------------
    def sampler_settings(self, **overrides) -> TextSamplerSettings:
        return TextSamplerSettings.from_config(self.cfg, **overrides)

    def prompts(self, count: int) -> list[str]:
        """The prompt file's prompts, or the training captions, cycled to `count`."""
        return prompts_for(self.cfg, count)

    def ema_network(self) -> torch.nn.Module:
        from diffusers import UNet2DConditionModel
        net = UNet2DConditionModel.from_config(self.net.config).to(self.device).eval()
        self.ema.copy_to(net)
        return net.requires_grad_(False)

    def generate(self, num_images: int) -> torch.Tensor:
        """Images 0..num_images-1 from the EMA U-Net, guided by the captions (or prompt file)."""
        bf16 = self.cfg.train.precision == "bf16"
        return sample_images(self.components, self.prompts(num_images), list(range(num_images)),
                             self.sampler_settings(), self.device, unet=self.ema_network(),
                             autocast_dtype=torch.bfloat16 if bf16 else None)

    def export_diffusers(self) -> Path:
        """<run_dir>/diffusers: the base model with the EMA U-Net, loadable by diffusers."""
        return export_pipeline(self.ema.state_dict(), self.cfg.text.model_path,
                               self.run_dir / EXPORT_DIR, self.cfg.text.prediction)


def run_text_training(cfg: ExperimentConfig, run_dir: Optional[str | os.PathLike] = None,
                      resume: Optional[str] = None) -> Path:
    """The whole job: train (or continue), then samples, memorization summary, diffusers export."""
    run_dir = resolve_run_dir(cfg, run_dir)
    try:  # a clear error before the model is loaded
        read_latent_manifest(cfg.data.shards)
    except ShardError as e:
        raise ConfigError(f"data.shards: {e}") from None
    resume_from = find_resume_point(run_dir, resume, cfg.train.keep_checkpoints)
    trainer = TextTrainer(cfg, run_dir, resume_from=resume_from)
    params = sum(p.numel() for p in trainer.net.parameters())
    check_output_dir(run_dir, params * 4 * 4 * (cfg.train.keep_checkpoints + 1))
    save_config(cfg, run_dir)
    write_run_info(run_dir, cfg, trainer.world_size)
    if resume_from is not None:
        print(f"resuming from {resume_from} at {trainer.images_seen} images")
    if trainer.train():
        summary = trainer.finish()
        print(format_memorization(summary))
        loss = trainer.loss_fn
        if loss.filter.enabled:
            print(f"prediction-magnitude filter dropped {int(loss.dropped)} of {loss.samples} samples "
                  "this session")
        export = trainer.export_diffusers()
        print(f"run directory: {run_dir}; diffusers model: {export}")
    return run_dir
