"""Preconditioning: the denoiser D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) around a
raw U-Net F, and `build_network(cfg)`, the one way the rest of the project makes a network.

Three parameterisations (EDM paper, Table 1):
    edm: c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2),
         c_noise = ln(s)/4                                   (sd = sigma_data)
    vp:  c_skip = 1, c_out = -s, c_in = 1/sqrt(s^2+1), c_noise = (M-1) t(s)
         (t(s) inverts the VP schedule s(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1) of
         ambient_dist.noise, M = 1000)
    ve:  c_skip = 1, c_out = s, c_in = 1, c_noise = ln(s/2)

Precision contract (docs/INTERFACES.md): inputs are taken as float32, the U-Net runs in
whatever precision the caller's autocast selects, and `raw` and `forward` return float32.
The scalings and the skip connection are always float32, so bf16 only touches F.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import nn

from ..config import ExperimentConfig
from ..noise import VP_BETA_D, VP_BETA_MIN, VP_EPSILON_T, vp_sigma, vp_t
from .adm_unet import DhariwalUNet
from .song_unet import SongUNet

Scalings = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _bcast(c: torch.Tensor) -> torch.Tensor:
    """[B] per-sample coefficient -> [B, 1, 1, 1] for images."""
    return c.reshape(-1, 1, 1, 1)


def _per_sample(value, images: torch.Tensor) -> torch.Tensor:
    """A number, [] or [B] value (sigma, c_noise) -> float32 [B] on the images' device."""
    value = torch.as_tensor(value, dtype=torch.float32, device=images.device).reshape(-1)
    if value.numel() == 1:
        return value.expand(images.shape[0])
    if value.numel() != images.shape[0]:
        raise ValueError(f"sigma / c_noise has {value.numel()} values for a batch of {images.shape[0]}")
    return value


class Precond(nn.Module):
    """A U-Net wrapped as an x0-predicting denoiser. Subclasses define `scalings`."""

    def __init__(self, unet: nn.Module, img_resolution: int, img_channels: int, label_dim: int,
                 sigma_min: float, sigma_max: float, sigma_data: float):
        super().__init__()
        self.unet = unet
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        # Mask-conditioned networks (objective.method=masking) see the inpainting mask as
        # img_channels extra input channels; set by build_network.
        self.mask_input = False
        self.sigma_min, self.sigma_max, self.sigma_data = float(sigma_min), float(sigma_max), float(sigma_data)

    def scalings(self, sigma: torch.Tensor) -> Scalings:
        raise NotImplementedError

    def _labels(self, labels: Optional[torch.Tensor], batch: int, device) -> Optional[torch.Tensor]:
        """Validate class labels; accept one-hot/soft [B, label_dim] or integer indices [B]."""
        if self.label_dim == 0:
            if labels is not None:
                raise ValueError("labels were given to an unconditional network "
                                 "(label_dim 0: data.num_classes is 0 in the config)")
            return None
        if labels is None:  # the unconditional direction of classifier-free guidance
            return torch.zeros(batch, self.label_dim, device=device)
        if labels.ndim == 1 and not labels.is_floating_point():
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.label_dim):
                raise ValueError(f"class index out of range [0, {self.label_dim}) "
                                 f"(data.num_classes = {self.label_dim})")
            labels = nn.functional.one_hot(labels.long(), self.label_dim)
        if labels.shape != (batch, self.label_dim):
            raise ValueError(f"labels must be [batch, label_dim] = [{batch}, {self.label_dim}] "
                             f"or [batch] class indices; got shape {list(labels.shape)}")
        return labels.to(device=device, dtype=torch.float32)

    def raw(self, net_in: torch.Tensor, c_noise: torch.Tensor, labels: Optional[torch.Tensor] = None,
            augment_labels: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None
            ) -> torch.Tensor:
        """The U-Net alone: F(net_in, c_noise), float32 out (whatever autocast ran inside).
        A mask-conditioned network also takes the 0/1 mask [B, C, H, W] as extra channels."""
        c_noise = _per_sample(c_noise, net_in)
        labels = self._labels(labels, net_in.shape[0], net_in.device)
        if self.mask_input != (mask is not None):
            raise ValueError("this network is conditioned on inpainting masks: pass mask=" if
                             self.mask_input else "mask= was given to a network without mask input")
        if mask is not None:
            net_in = torch.cat([net_in, mask.to(net_in.dtype)], dim=1)
        return self.unet(net_in, c_noise, labels, augment_labels).float()

    def forward(self, x: torch.Tensor, sigma, labels: Optional[torch.Tensor] = None,
                augment_labels: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """D(x; sigma), the x0 prediction. sigma: a number, [] or [B].

        With `mask` (mask-conditioned networks, Daras et al. 2023) the network sees only the
        kept pixels: D = c_skip (A x) + c_out F([c_in A x, A])."""
        x = x.float()
        if mask is not None:
            x = x * mask.to(x.dtype)
        sigma = _per_sample(sigma, x)
        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        F_x = self.raw(_bcast(c_in) * x, c_noise, labels, augment_labels, mask=mask)
        return _bcast(c_skip) * x + _bcast(c_out) * F_x


class EDMPrecond(Precond):
    def __init__(self, unet, img_resolution, img_channels, label_dim, sigma_data: float = 0.5,
                 sigma_min: float = 0.0, sigma_max: float = math.inf):
        super().__init__(unet, img_resolution, img_channels, label_dim, sigma_min, sigma_max, sigma_data)

    def scalings(self, sigma):
        sd2 = self.sigma_data ** 2
        norm = (sigma ** 2 + sd2).sqrt()
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / norm
        c_in = 1 / norm
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


class VPPrecond(Precond):
    """Variance-preserving parameterisation; the net predicts the noise (c_out = -sigma)."""

    def __init__(self, unet, img_resolution, img_channels, label_dim, sigma_data: float = 0.5,
                 beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN,
                 epsilon_t: float = VP_EPSILON_T, M: int = 1000):
        # The schedule in float64: sigma_min/sigma_max are Python floats (sampler bounds).
        sigma_of_t = lambda t: float(vp_sigma(torch.tensor(t, dtype=torch.float64), beta_d, beta_min))  # noqa: E731
        super().__init__(unet, img_resolution, img_channels, label_dim,
                         sigma_min=sigma_of_t(epsilon_t), sigma_max=sigma_of_t(1.0), sigma_data=sigma_data)
        self.beta_d, self.beta_min, self.epsilon_t, self.M = beta_d, beta_min, epsilon_t, M

    def t_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """Inverse of the VP schedule (noise.vp_t): the time t at which the noise level is sigma."""
        return vp_t(sigma, self.beta_d, self.beta_min)

    def scalings(self, sigma):
        one = torch.ones_like(sigma)
        return one, -sigma, 1 / (sigma ** 2 + 1).sqrt(), (self.M - 1) * self.t_of_sigma(sigma)


class VEPrecond(Precond):
    """Variance-exploding parameterisation; the net predicts the scaled noise (c_out = sigma)."""

    def __init__(self, unet, img_resolution, img_channels, label_dim, sigma_data: float = 0.5,
                 sigma_min: float = 0.02, sigma_max: float = 100.0):
        super().__init__(unet, img_resolution, img_channels, label_dim, sigma_min, sigma_max, sigma_data)

    def scalings(self, sigma):
        one = torch.ones_like(sigma)
        return one, sigma, one, (0.5 * sigma).log()


# The EDM paper's architecture presets (train.py --arch); sizes come from the config.
_SONG_PRESETS = {
    "ddpmpp": dict(embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                   decoder_type="standard", resample_filter=[1, 1]),
    "ncsnpp": dict(embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
                   decoder_type="standard", resample_filter=[1, 3, 3, 1]),
}


def build_unet(cfg: ExperimentConfig) -> nn.Module:
    """The raw U-Net F described by cfg.network and cfg.data (image in, image out)."""
    n, d = cfg.network, cfg.data
    # The masking baseline's network reads the mask beside the image (Daras et al. 2023).
    in_channels = d.channels * (2 if cfg.objective.method == "masking" else 1)
    sizes = dict(img_resolution=d.resolution, in_channels=in_channels, out_channels=d.channels,
                 label_dim=d.num_classes, augment_dim=n.augment_dim,
                 model_channels=n.model_channels, channel_mult=list(n.channel_mult),
                 num_blocks=n.num_blocks, attn_resolutions=list(n.attn_resolutions),
                 dropout=n.dropout, label_dropout=n.label_dropout)
    levels = {d.resolution >> i for i in range(len(n.channel_mult))}
    for r in n.attn_resolutions:
        if r not in levels:
            # A warning, not an error: tiny test configs legitimately run without attention.
            warnings.warn(f"network.attn_resolutions: {r} is not one of this U-Net's resolutions "
                          f"{sorted(levels, reverse=True)} (data.resolution {d.resolution}, "
                          f"{len(n.channel_mult)} levels in network.channel_mult): no attention there")
    if n.arch in _SONG_PRESETS:
        return SongUNet(**sizes, **_SONG_PRESETS[n.arch])
    if n.arch == "adm":
        return DhariwalUNet(**sizes)
    raise ValueError(f"network.arch: {n.arch!r} is not ddpmpp, ncsnpp or adm")


def build_network(cfg: ExperimentConfig) -> Precond:
    """The preconditioned denoiser for an experiment (see docs/INTERFACES.md)."""
    n, d, o = cfg.network, cfg.data, cfg.objective
    common = dict(unet=build_unet(cfg), img_resolution=d.resolution, img_channels=d.channels,
                  label_dim=d.num_classes, sigma_data=o.sigma_data)
    if n.precond == "edm":
        net = EDMPrecond(**common)
    elif n.precond == "vp":
        net = VPPrecond(**common, beta_d=o.vp_beta_d, beta_min=o.vp_beta_min, epsilon_t=o.vp_epsilon_t)
    elif n.precond == "ve":
        net = VEPrecond(**common)
    else:
        raise ValueError(f"network.precond: {n.precond!r} is not edm, vp or ve")
    net.mask_input = o.method == "masking"
    return net
