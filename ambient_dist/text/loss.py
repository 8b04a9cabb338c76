"""The text-conditional ambient losses: Stable Diffusion's U-Net under the latent objective.

`TextAmbientLoss` wraps the latent ambient loss of ambient_dist.objective (v-prediction, or its
epsilon-prediction form `LatentEpsAmbientLoss`) with the text-memorization mitigations of
text.mitigations: caption dropout, text-embedding noise and the prediction-magnitude filter.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ambient_dist.config import ConfigError, ExperimentConfig
from ambient_dist.noise import ddpm_alpha_sigma
from ambient_dist.objective import LatentVAmbientLoss, LossOutput, StepCoefficients

from .mitigations import CaptionDropout, PredictionMagnitudeFilter, TextEmbeddingNoise


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
                 augment=None, mask=None, backward_scale: float = 1.0) -> LossOutput:
        if augment is not None:  # config validation refuses augment.p > 0 for latents
            raise ValueError("TextAmbientLoss: latents take no geometric augmentation")
        if mask is not None:  # objective.method=masking is refused for text at validation
            raise ValueError("TextAmbientLoss: latents take no inpainting masks")
        if cond is None:
            raise ValueError("TextAmbientLoss: every sample needs a text embedding")
        cond, _ = self.dropout(cond, self.empty, generator)
        cond = self.text_noise(cond, generator)
        network, record = self.filter.wrap(unet_network(unet), self.empty)
        # The fused pass 2 writes dF for the batch mean times backward_scale; with the filter on,
        # the loss is a mean over the kept samples instead, and autograd scales dF itself.
        out = self.latent_loss(network, clean, noisy, cond, generator=generator,
                               backward_scale=1.0 if self.filter.enabled else backward_scale)
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
