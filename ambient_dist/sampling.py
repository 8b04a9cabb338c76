"""EDM samplers (Karras et al. 2022, Algorithms 1 and 2) on a denoiser D(x, sigma, labels).

    steps = edm_sigma_steps(...)      sigma_i from sigma_max down to sigma_min (rho spacing), then 0
    images = edm_sample(denoiser, indices, (C, H, W), seed, ...)

Solvers: "heun" (2nd order; deterministic when S_churn = 0 -- the paper's FID setting) and
"euler" (1st order). S_churn / S_min / S_max / S_noise add the stochastic "churn": before a
step, noise is added to raise sigma by up to a factor (1 + gamma).

Image n's randomness (its starting noise and its churn noise) comes from its own generator,
seeded by (seed, n), so image n is the same whatever the batch size and whichever rank
draws it (bit for bit on a CPU; on a GPU up to the network's batch-size-dependent rounding,
~1e-7 with DDPM++ on an H200). The state is integrated in float64 (as EDM does: the steps near sigma_min subtract
nearly equal numbers); the denoiser gets float32 input, optionally under autocast.

Output is float32 and only roughly in [-1, 1]; `images.to_uint8` clamps when converting to pixels.
Class-conditional networks get the labels of `class_labels` (image n: class n % classes).

The baselines of objective.method sample differently (`SamplerSettings.for_run` sets it up):
noise_only stops at sigma_min = sigma_tn, whose last (Euler) step to 0 returns the network's
x0 estimate D(x; sigma_tn) -- the model never learned below sigma_tn; masking uses Ambient
Diffusion's fixed-mask sampler: each image gets one random mask keeping `mask_survival` of the
pixels (from its own generator), and every denoiser call sees only those pixels (with the mask
as input) and is clipped to [-1, 1], as that paper's sampler does.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ambient_dist.config import ConfigError
from ambient_dist.noise import key_seed, keyed_uniform
from ambient_dist.progress import say_once

# D(x [B,C,H,W] float32, sigma [B] float32, labels or None) -> x0 estimate [B,C,H,W]
Denoiser = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
# EDM's largest churn factor per step: gamma = min(S_churn / steps, sqrt(2) - 1).
MAX_GAMMA = math.sqrt(2) - 1
# guidance(denoiser, x, sigma, labels) -> combined x0 estimate
Guidance = Callable[[Denoiser, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


@dataclass
class SamplerSettings:
    num_steps: int = 18
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    solver: str = "heun"          # "heun" or "euler"
    S_churn: float = 0.0          # 0 = deterministic
    S_min: float = 0.0
    S_max: float = float("inf")
    S_noise: float = 1.0
    # Masking baseline: fraction of pixels each image's fixed sampling mask keeps (0 = none).
    mask_survival: float = 0.0
    # What for_run changed of the config's sampling section, in words (not a setting: the
    # sampler ignores it; samples.json records it as its notes).
    notes: list[str] = field(default_factory=list, compare=False)

    @classmethod
    def from_config(cls, cfg, **overrides) -> "SamplerSettings":
        """From a `SamplingConfig` (steps, sigma_min, sigma_max, rho, solver, S_*)."""
        return cls(**{"num_steps": cfg.steps, "sigma_min": cfg.sigma_min, "sigma_max": cfg.sigma_max,
                      "rho": cfg.rho, "solver": cfg.solver, "S_churn": cfg.S_churn, "S_min": cfg.S_min,
                      "S_max": cfg.S_max, "S_noise": cfg.S_noise, **overrides})

    @classmethod
    def for_run(cls, cfg, announce: bool = True, **overrides) -> "SamplerSettings":
        """From an `ExperimentConfig`: its sampling section, adjusted for objective.method
        (noise_only: stop at sigma_tn; masking: the fixed-mask sampler's survival rate).

        Every adjustment is said in `notes` (recorded in samples.json) and, with `announce`,
        once on screen (progress.say_once). Raises ConfigError when objective.sigma_tn leaves
        noise_only nothing to sample (sigma_tn >= sampling.sigma_max)."""
        settings = cls.from_config(cfg.sampling, **overrides)
        o = cfg.objective
        if o.method == "noise_only":
            if o.sigma_tn >= settings.sigma_max:
                raise ConfigError(f"objective.sigma_tn: {o.sigma_tn:g} is not below sampling.sigma_max "
                                  f"({settings.sigma_max:g}); objective.method=noise_only samples from "
                                  "sigma_max down to sigma_tn")
            if settings.sigma_min < o.sigma_tn:
                settings.notes.append(
                    f"sampling.sigma_min {settings.sigma_min:g} replaced by objective.sigma_tn = "
                    f"{o.sigma_tn:g}: objective.method=noise_only never learned below sigma_tn, so "
                    "sampling stops there and returns the denoiser's estimate D(x; sigma_tn)")
                settings.sigma_min = o.sigma_tn
        elif o.method == "masking":
            settings.mask_survival = (1 - o.mask_corruption) * (1 - o.mask_delta)
            settings.notes.append(
                f"objective.method=masking samples with Ambient Diffusion's fixed-mask sampler: each "
                f"image keeps (1 - mask_corruption)(1 - mask_delta) = {settings.mask_survival:.4g} of "
                "its pixels, and the denoiser's output is clipped to [-1, 1]")
        settings.notes.extend(settings.clamp_notes())
        if announce:
            for note in settings.notes:
                say_once(note)
        return settings

    def clamp_notes(self) -> list[str]:
        """What the sampler will clamp of these settings (EDM's limit on the churn)."""
        notes = []
        if self.S_churn > 0 and self.S_churn / self.num_steps > MAX_GAMMA:
            notes.append(
                f"sampling.S_churn {self.S_churn:g} over {self.num_steps} steps is clamped to "
                f"gamma = sqrt(2) - 1 = {MAX_GAMMA:.4f} per step (EDM's limit): any S_churn >= "
                f"{MAX_GAMMA * self.num_steps:.4g} samples the same")
        return notes

    def check(self) -> None:
        if self.solver not in ("heun", "euler"):
            raise ValueError(f"sampler solver must be 'heun' or 'euler', got {self.solver!r}")
        if self.num_steps < 1:
            raise ValueError(f"sampling.steps must be >= 1, got {self.num_steps}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sampling.sigma_min < sampling.sigma_max, got "
                             f"{self.sigma_min}, {self.sigma_max}")
        if not 0 <= self.mask_survival <= 1:
            raise ValueError(f"mask_survival must be in [0, 1], got {self.mask_survival}")


def edm_sigma_steps(num_steps: int, sigma_min: float, sigma_max: float, rho: float,
                    device=None) -> torch.Tensor:
    """float64 [num_steps + 1]: sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho,
    i = 0..N-1, then a final 0. Large rho spends the steps near sigma_min, where detail forms."""
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    frac = i / max(num_steps - 1, 1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + frac * (lo - hi)) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64, device=device)])


class PerImageNoise:
    """Standard normal draws where image n's come from its own generator seeded by (seed, n)."""

    def __init__(self, seed: int, indices: Sequence[int]):
        self.generators = []
        for n in indices:
            g = torch.Generator(device="cpu")
            g.manual_seed(key_seed(seed, f"sample/{int(n)}"))
            self.generators.append(g)

    def randn(self, image_shape: Sequence[int], device) -> torch.Tensor:
        # Drawn on the CPU, where a generator's stream is the same on every machine.
        noise = [torch.randn(tuple(image_shape), generator=g, dtype=torch.float64)
                 for g in self.generators]
        return torch.stack(noise).to(device)


def plain_guidance(denoiser: Denoiser, x, sigma, labels):
    return denoiser(x, sigma, labels)


def classifier_free_guidance(scale: float) -> Guidance:
    """D_uncond + scale (D_cond - D_uncond). The unconditional call passes labels=None, which
    the Precond turns into all-zero labels (EDM's label-dropout convention), so class indices
    and one-hot labels both work. scale 1 is the plain conditional model."""
    def guide(denoiser: Denoiser, x, sigma, labels):
        if labels is None:
            raise ValueError("classifier-free guidance needs class labels")
        cond = denoiser(x, sigma, labels)
        uncond = denoiser(x, sigma, None)
        return uncond + scale * (cond - uncond)
    return guide


def sampling_masks(image_shape: Sequence[int], survival: float, seed: int,
                   indices: Sequence[int], device) -> torch.Tensor:
    """float32 0/1 [B, *image_shape]: image n's fixed sampling mask, keeping each pixel with
    probability `survival`, from a generator seeded by (seed, n) apart from the noise stream."""
    masks = [keyed_uniform(image_shape, seed, f"sample-mask/{int(n)}") < survival for n in indices]
    return torch.stack(masks).to(device=device, dtype=torch.float32)


def method_denoiser(denoiser: Denoiser, settings: SamplerSettings, indices: Sequence[int],
                    image_shape: Sequence[int], seed: int, device) -> Denoiser:
    """The denoiser as the method samples with it: unchanged, or, with settings.mask_survival
    (masking baseline), Ambient Diffusion's fixed-mask denoiser: image n keeps the pixels of
    its own random mask at every call, sees that mask as input, and is clipped to [-1, 1]."""
    if settings.mask_survival <= 0:
        return denoiser
    masks = sampling_masks(image_shape, settings.mask_survival, seed, indices, device)

    def masked(x, sigma, labels):
        return denoiser(x, sigma, labels, mask=masks).clamp(-1, 1)
    return masked


@torch.no_grad()
def edm_sample(denoiser: Denoiser, indices: Sequence[int], image_shape: Sequence[int],
               seed: int = 0, labels: Optional[torch.Tensor] = None,
               settings: Optional[SamplerSettings] = None, guidance: Optional[Guidance] = None,
               autocast_dtype: Optional[torch.dtype] = None, device="cpu") -> torch.Tensor:
    """Generate images `indices` (one per index) -> float32 [len(indices), *image_shape].

    denoiser(x, sigma [B], labels) is the x0 prediction (a Precond's forward). guidance, if
    given, replaces the plain call (e.g. classifier_free_guidance(scale)).
    """
    settings = settings or SamplerSettings()
    settings.check()
    device = torch.device(device)
    guide = guidance or plain_guidance
    noise = PerImageNoise(seed, indices)
    batch = len(indices)
    autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype)
                if autocast_dtype is not None else contextlib.nullcontext())
    denoiser = method_denoiser(denoiser, settings, indices, image_shape, seed, device)

    def D(x: torch.Tensor, sigma: float) -> torch.Tensor:
        sigma_b = torch.full((batch,), sigma, dtype=torch.float32, device=device)
        with autocast:
            return guide(denoiser, x.float(), sigma_b, labels).double()

    s = settings
    steps = edm_sigma_steps(s.num_steps, s.sigma_min, s.sigma_max, s.rho).tolist()
    x = noise.randn(image_shape, device) * steps[0]
    for i, (t_cur, t_next) in enumerate(zip(steps[:-1], steps[1:])):
        # Churn: raise the noise level from t_cur to t_hat with fresh noise.
        gamma = min(s.S_churn / s.num_steps, MAX_GAMMA) if s.S_min <= t_cur <= s.S_max else 0.0
        t_hat = t_cur * (1 + gamma)
        if gamma > 0:
            x = x + math.sqrt(t_hat ** 2 - t_cur ** 2) * s.S_noise * noise.randn(image_shape, device)
        # Euler step along dx/dsigma = (x - D(x; sigma)) / sigma.
        d_cur = (x - D(x, t_hat)) / t_hat
        x_next = x + (t_next - t_hat) * d_cur
        # Heun correction: average the slope at both ends (not at the last step, sigma = 0).
        if s.solver == "heun" and t_next > 0:
            d_next = (x_next - D(x_next, t_next)) / t_next
            x_next = x + (t_next - t_hat) * 0.5 * (d_cur + d_next)
        x = x_next
    return x.float()


def class_labels(indices: Sequence[int], label_dim: int, fixed: Optional[int] = None
                 ) -> Optional[torch.Tensor]:
    """The class of each image index: `fixed` if given, else n % label_dim, so that every
    class is drawn equally often and image n has the same class in every sample set (the
    end-of-training grid, ambient-sample, evaluation). int64 [len(indices)] on the CPU;
    None for an unconditional network (label_dim 0)."""
    if not label_dim:
        return None
    if fixed is not None:
        return torch.full((len(indices),), fixed, dtype=torch.long)
    return torch.tensor(list(indices), dtype=torch.long) % label_dim
