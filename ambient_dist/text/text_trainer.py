"""Ambient fine-tuning of Stable Diffusion's U-Net on latent shards, under the engine's loop.

The engine's `Trainer` (ambient_dist.engine.trainer) runs the loop, the optimizer step, EMA,
checkpoints, resume and the end-of-run memorization summary, and its `DeepSpeedTrainer` the
ZeRO 1/2/3 + bf16 variant. `TextTraining` is mixed into either and overrides what is
different for a text-conditional latent model (the engine's _build_* hooks):

- the network is the checkpoint's UNet2DConditionModel (trained; gradient checkpointing
  optional); the VAE and CLIP text encoder are frozen and never enter the optimizer, the EMA
  or the checkpoints;
- batches come from latent shards (text.latents.LatentLoader) as the engine's `Batch`, with
  the text embedding in the `labels` slot (stored in the shards, or encoded from the caption);
- the loss is `TextAmbientLoss`: caption dropout, text-embedding noise and the prediction-
  magnitude filter (text.mitigations) around the latent ambient loss of ambient_dist.objective
  (v-prediction, or its epsilon-prediction form `LatentEpsAmbientLoss` below);
- `generate` samples with classifier-free guidance from the training captions (text.sampling),
  and `finish` also writes <run>/diffusers, the EMA U-Net as a diffusers model (text.export).

`run_text_training` is what launchers/train.py calls when text.model_path is set.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

import torch

from ambient_dist.config import ConfigError, ExperimentConfig
from ambient_dist.data.loader import Batch
from ambient_dist.data.shards import ShardError, write_json
from ambient_dist.engine.trainer import Trainer
from ambient_dist.noise import ddpm_alpha_sigma
from ambient_dist.objective import LatentVAmbientLoss, LossOutput, StepCoefficients

from .export import export_pipeline
from .latents import LatentLoader, check_latent_model, encode_text, read_latent_manifest
from .mitigations import CaptionDropout, PredictionMagnitudeFilter, TextEmbeddingNoise
from .sampling import TextSamplerSettings, prompts_for, sample_images
from .sd_models import SCHEDULER_PREDICTION, ModelError, SDComponents, load_components

EXPORT_DIR = "diffusers"
FILTER_REPORT = "text_filter.json"


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
        self.magnitudes: list[torch.Tensor] = []  # the filter's per-sample magnitudes (device)

    def __call__(self, unet, clean: torch.Tensor, noisy: Optional[torch.Tensor],
                 cond: torch.Tensor, generator: Optional[torch.Generator] = None,
                 augment=None, mask=None) -> LossOutput:
        if augment is not None:  # config validation refuses augment.p > 0 for latents
            raise ValueError("TextAmbientLoss: latents take no geometric augmentation")
        if mask is not None:  # objective.method=masking is refused for text at validation
            raise ValueError("TextAmbientLoss: latents take no inpainting masks")
        if cond is None:
            raise ValueError("TextAmbientLoss: every sample needs a text embedding")
        cond, _ = self.dropout(cond, self.empty, generator)
        cond = self.text_noise(cond, generator)
        network, record = self.filter.wrap(unet_network(unet), self.empty)
        out = self.latent_loss(network, clean, noisy, cond, generator=generator)
        self.samples += clean.shape[0]
        if "keep" not in record:
            return out
        self.magnitudes.append(record["magnitude"].detach())
        keep = record["keep"].to(out.per_sample.dtype)
        self.dropped = self.dropped + (clean.shape[0] - keep.sum().detach())  # no host sync
        # Mean over the samples that stay: dropping must not shrink the step of the others.
        loss = (out.per_sample * keep).sum() / keep.sum().clamp(min=1)
        return LossOutput(loss, out.per_sample * keep, out.ambient, out.sigma)

    def filter_summary(self) -> Optional[dict]:
        """Magnitude percentiles of this process's samples (to calibrate text.drop_threshold:
        train briefly with a huge threshold, then pick a high percentile)."""
        if not self.magnitudes:
            return None
        m = torch.cat(self.magnitudes).float().cpu()
        q = torch.tensor([0.5, 0.9, 0.95, 0.99])
        return {"threshold": self.filter.threshold, "samples": self.samples,
                "dropped": int(self.dropped),
                "magnitude_percentiles": dict(zip(["p50", "p90", "p95", "p99"],
                                                  torch.quantile(m, q).tolist()))}


# --------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------

class ConditionedLoader:
    """Latent batches as the engine's `Batch`, the text embedding in the labels slot (stored
    in the shards, or encoded here from the captions by the frozen text encoder)."""

    def __init__(self, latents: LatentLoader, components: SDComponents):
        self.latents, self.components = latents, components

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        b = next(self.latents)
        c = self.components
        cond = b.text if b.text is not None else encode_text(c.text_encoder, c.tokenizer, b.captions)
        return Batch(b.keys, b.clean, b.noisy, cond.float())

    def state_dict(self) -> dict:
        return self.latents.state_dict()

    def data_differences(self, saved: dict) -> list[str]:
        return self.latents.data_differences(saved)

    def close(self) -> None:
        self.latents.close()


class TextTraining:
    """What a text-conditional run changes in the engine's Trainer (mixed into the plain
    Trainer or the DeepSpeedTrainer): the network, the loss, the loader, sampling, export."""

    def __init__(self, cfg: ExperimentConfig, run_dir: str | os.PathLike,
                 dist_info=None, resume_from: Optional[Path] = None):
        if not cfg.text.model_path:
            raise ConfigError("text.model_path: set it to a local diffusers-format Stable Diffusion "
                              "2.x directory")
        if cfg.train.compile:
            raise ConfigError("train.compile: not supported for text-conditional training yet "
                              "(set train.compile=false)")
        device = (dist_info.device if dist_info is not None
                  else torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            self.components: SDComponents = load_components(cfg.text.model_path, device=device)
        except ModelError as e:
            raise ConfigError(f"text.model_path: {e}") from None
        have = self.components.scheduler_config.get("prediction_type", "epsilon")
        if have != SCHEDULER_PREDICTION[cfg.text.prediction]:
            raise ConfigError(f"text.prediction is {cfg.text.prediction!r} but {cfg.text.model_path} "
                              f"predicts {have!r} (scheduler/scheduler_config.json); set it to match")
        super().__init__(cfg, run_dir, dist_info=dist_info, resume_from=resume_from)

    # -- engine hooks ------------------------------------------------------------------
    def _build_network(self) -> torch.nn.Module:
        unet = self.components.unet.train().requires_grad_(True)
        if self.cfg.text.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        return unet

    def _build_loss(self) -> "TextAmbientLoss":
        c = self.components
        return TextAmbientLoss(self.cfg, encode_text(c.text_encoder, c.tokenizer, [""]))

    def _build_loader(self) -> ConditionedLoader:
        latents = LatentLoader(self.cfg, self.rank, self.world_size, self.device,
                               start_sample=self.images_seen, vae=self.components.vae)
        check_latent_model(latents.shards.manifest, self.components, f"data.shards ({self.cfg.data.shards})")
        return ConditionedLoader(latents, self.components)

    # -- sampling and export -----------------------------------------------------------
    def ema_network(self) -> torch.nn.Module:
        from diffusers import UNet2DConditionModel
        state = self.ema_state_full()  # collective under ZeRO-3
        net = UNet2DConditionModel.from_config(self.components.unet.config).to(self.device)
        net.load_state_dict(state)
        return net.eval().requires_grad_(False)

    def generate(self, num_images: int, every_rank: bool = False,
                 net: Optional[torch.nn.Module] = None) -> Optional[torch.Tensor]:
        """Images 0..num_images-1 from the EMA U-Net (`net`, if already gathered), guided by
        the training captions (or the prompt file), on rank 0 (None elsewhere) or, with
        every_rank, on every rank."""
        if net is None:
            net = self.ema_network()  # every rank takes part in gathering the EMA
        if self.rank != 0 and not every_rank:
            return None
        bf16 = self.cfg.train.precision == "bf16"
        return sample_images(self.components, prompts_for(self.cfg, num_images),
                             list(range(num_images)), TextSamplerSettings.from_config(self.cfg),
                             self.device, unet=net, autocast_dtype=torch.bfloat16 if bf16 else None)

    def export_diffusers(self) -> Path:
        """<run_dir>/diffusers: the base model with the EMA U-Net, loadable by diffusers."""
        state = self.ema_state_full()
        path = self.run_dir / EXPORT_DIR
        if self.rank == 0:
            export_pipeline(state, self.cfg.text.model_path, path, self.cfg.text.prediction)
        return path

    def finish(self) -> Optional[dict]:
        summary = super().finish()
        path = self.export_diffusers()
        if self.rank == 0:
            filtered = self.loss_fn.filter_summary()
            if filtered is not None:
                write_json(self.run_dir / FILTER_REPORT, filtered)
                print(f"prediction-magnitude filter (rank 0, this session): dropped "
                      f"{filtered['dropped']} of {filtered['samples']} samples; magnitudes "
                      + ", ".join(f"{k} {v:.3g}" for k, v in filtered["magnitude_percentiles"].items()))
            print(f"diffusers model: {path} (StableDiffusionPipeline.from_pretrained loads it; "
                  "launchers/sample_text.py samples it)")
        return summary


class TextTrainer(TextTraining, Trainer):
    """Single-process text-conditional training."""


def text_trainer_classes(cfg: ExperimentConfig) -> dict:
    """{"none": ..., "deepspeed": ...} for the engine's run_training (DeepSpeed imported only
    when asked for)."""
    if cfg.distributed.engine != "deepspeed":
        return {"none": TextTrainer}
    from ambient_dist.engine.deepspeed_engine import DeepSpeedTrainer

    class TextDeepSpeedTrainer(TextTraining, DeepSpeedTrainer):
        """Text-conditional training under DeepSpeed (ZeRO 1/2/3, bf16)."""
    return {"deepspeed": TextDeepSpeedTrainer}


def describe_text(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML and the U-Net's parameter count (built on the meta device
    from the checkpoint's unet/config.json: no weights are read)."""
    import yaml
    from diffusers import UNet2DConditionModel

    from ambient_dist.config import to_dict
    unet_dir = Path(cfg.text.model_path) / "unet"
    if not (unet_dir / "config.json").is_file():
        raise ConfigError(f"text.model_path: {unet_dir / 'config.json'} not found")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(unet_dir))
    params = sum(p.numel() for p in unet.parameters())
    return yaml.safe_dump(to_dict(cfg), sort_keys=False) + f"U-Net parameters (trained): {params}"


def run_text_training(cfg: ExperimentConfig, run_dir: Optional[str | os.PathLike] = None,
                      resume: Optional[str] = None) -> Path:
    """The engine's run_training with the text trainers: train (or continue), then samples,
    memorization summary and the diffusers export."""
    try:  # a clear error before the model is loaded
        read_latent_manifest(cfg.data.shards)
    except ShardError as e:
        raise ConfigError(f"data.shards: {e}") from None
    from ambient_dist.engine.run import run_training
    return run_training(cfg, run_dir, resume, trainer_classes=text_trainer_classes(cfg))
