"""Keyed noise, the one fixed noisy copy per image, noise schedules, and the image-unit check.

The ambient objective is only sound if each training image has exactly ONE noisy copy, drawn
once: fresh noise every epoch would let the model average the noise away and see the clean
image. So the copy's noise must be a pure function of (dataset seed, image key) -- the same in
every process, on every machine, in any order -- and must never consume the global RNG (a
loader that draws a copy would otherwise shift every later random draw of the run).

    key_seed(dataset_seed, key)            63-bit seed from sha256("{dataset_seed}/{key}")
    keyed_normal(shape, dataset_seed, key) N(0, I) from a private CPU generator with that seed
    make_noisy_copy(x0, sigma_tn, ...)     the copy for each objective form (edm / vp / latent_v)
    check_image_range(x, name)             rejects images that are not in [-1, 1] units

Per-step random draws (the training step's noise levels, eps, augmentation parameters, text
embedding noise), from a caller's generator so that a test can replay them:

    draw_normal(shape, generator, device), draw_uniform(...), draw_randint(high, shape, ...)

Schedules shared by the objective, the preconditioning, the noisy-copy writer and the Stable
Diffusion adapter (each defined here only):

    ddpm_alphas_cumprod()   Stable Diffusion's DDPM schedule (scaled_linear betas, 1000 steps)
    ddpm_alpha_sigma(t)     (alpha_t, s_t) = (sqrt(abar_t), sqrt(1 - abar_t)) of that schedule
    vp_alpha_sigma(sigma)   VE sigma -> (alpha, s) of the variance-preserving form
    vp_sigma(t), vp_t(sigma) EDM's VP schedule sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)
                            (defaults VP_BETA_D, VP_BETA_MIN, VP_EPSILON_T: EDM's VPPrecond)

Units: images are in [-1, 1] (uint8 / 127.5 - 1) and every sigma is in those units. For the
"vp" form the config's sigma_tn is still the VE noise level; the VP copy is the VE copy scaled
by alpha_tn = 1 / sqrt(1 + sigma_tn^2) (shared spec, objective.md section 3).
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Callable, Optional, Sequence

import torch

from ambient_dist.errors import UserError

NOISE_FORMS = ("edm", "vp", "latent_v")

# Stable Diffusion's training schedule (the "scaled_linear" betas of its DDPM scheduler).
DDPM_STEPS = 1000
DDPM_BETA_START = 0.00085
DDPM_BETA_END = 0.012

# EDM's VP schedule (Song et al. 2021's beta_d, beta_min) and its smallest time.
VP_BETA_D = 19.9
VP_BETA_MIN = 0.1
VP_EPSILON_T = 1e-5


class ImageRangeError(UserError):
    """Images are not in the [-1, 1] units the whole project assumes."""


# --------------------------------------------------------------------------------------
# Keyed noise
# --------------------------------------------------------------------------------------

def key_seed(dataset_seed: int, key: str) -> int:
    """A 63-bit seed that depends only on (dataset_seed, key): sha256 of "{dataset_seed}/{key}".

    A cryptographic hash (not Python's hash(), which is salted per process) so that every
    process and every machine derives the same seed.
    """
    digest = hashlib.sha256(f"{int(dataset_seed)}/{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def keyed_normal(shape: Sequence[int], dataset_seed: int, key: str,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of `shape` for one key, from a private CPU generator.

    Always drawn in float32 on the CPU (CPU generators are the only ones whose streams are
    the same everywhere) and only then cast, so the noise of a key does not depend on the
    requested dtype or on the device the caller uses.
    """
    generator = torch.Generator(device="cpu")
    generator.manual_seed(key_seed(dataset_seed, key))
    noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    return noise.to(dtype)


def keyed_uniform(shape: Sequence[int], dataset_seed: int, key: str) -> torch.Tensor:
    """Uniform [0, 1) float32 noise of `shape` for one key, from a private CPU generator
    (as keyed_normal: the same values on every process, machine and device)."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(key_seed(dataset_seed, key))
    return torch.rand(tuple(shape), generator=generator, dtype=torch.float32)


def keyed_mask(shape: Sequence[int], dataset_seed: int, key: str, corruption: float) -> torch.Tensor:
    """The ONE fixed inpainting mask of the image with stable key `key` (masking baseline,
    Daras et al. 2023): bool `shape`, True where the pixel is kept; each element is erased
    with probability `corruption`, from a private CPU generator seeded by (dataset_seed,
    "mask/" + key), so it never depends on the order of processing or on the noisy copy."""
    if not 0 <= corruption < 1:
        raise ValueError(f"keyed_mask: corruption must be in [0, 1), got {corruption}")
    return keyed_uniform(shape, dataset_seed, f"mask/{key}") >= corruption


# --------------------------------------------------------------------------------------
# Per-step random draws. With a generator, draws come from it (on its device) so a test can
# replay them; without one, from the global RNG of `device`. The result is on `device`.
# --------------------------------------------------------------------------------------

def _draw(fn: Callable, shape: Sequence[int], generator: Optional[torch.Generator],
          device) -> torch.Tensor:
    where = generator.device if generator is not None else device
    return fn(tuple(shape), generator=generator, device=where).to(device)


def draw_normal(shape: Sequence[int], generator: Optional[torch.Generator], device) -> torch.Tensor:
    """float32 N(0, 1) of `shape` on `device`."""
    return _draw(torch.randn, shape, generator, device)


def draw_uniform(shape: Sequence[int], generator: Optional[torch.Generator], device) -> torch.Tensor:
    """float32 U[0, 1) of `shape` on `device`."""
    return _draw(torch.rand, shape, generator, device)


def draw_randint(high: int, shape: Sequence[int], generator: Optional[torch.Generator],
                 device) -> torch.Tensor:
    """int64 uniform on {0, ..., high - 1} of `shape` on `device`."""
    return _draw(lambda size, **kw: torch.randint(0, high, size, **kw), shape, generator, device)


# --------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _ddpm_alphas_cumprod_cached() -> torch.Tensor:
    # Computed in float64: the product of 1000 factors loses ~1e-6 relative in float32.
    betas = torch.linspace(DDPM_BETA_START ** 0.5, DDPM_BETA_END ** 0.5, DDPM_STEPS,
                           dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def ddpm_alphas_cumprod() -> torch.Tensor:
    """abar_t for t = 0..999 of Stable Diffusion's DDPM schedule, float64 on the CPU.

    betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2 ("scaled_linear"); abar_t is the
    cumulative product of (1 - beta). Matches diffusers' DDPMScheduler to float32 precision.
    """
    return _ddpm_alphas_cumprod_cached().clone()


def ddpm_alpha_sigma(t: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, s_t) = (sqrt(abar_t), sqrt(1 - abar_t)) at integer timestep(s) t, float64."""
    t = torch.as_tensor(t, dtype=torch.long)
    # Checked on the CPU only: on a GPU the check would stall the step, and an out-of-range
    # index fails there anyway (device-side assert).
    if t.device.type == "cpu" and bool(((t < 0) | (t >= DDPM_STEPS)).any()):
        raise ValueError(f"DDPM timestep must be in [0, {DDPM_STEPS}), got {t.tolist()}")
    abar_t = _ddpm_alphas_cumprod_cached().to(t.device)[t]
    return abar_t.sqrt(), (1.0 - abar_t).sqrt()


def vp_alpha_sigma(sigma: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, s) of the VP form at VE noise level sigma: x_VP = alpha x_VE, s = alpha sigma.

    alpha = 1 / sqrt(1 + sigma^2), s = sigma / sqrt(1 + sigma^2) (so alpha^2 + s^2 = 1).
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    alpha = (1.0 + sigma ** 2).rsqrt()
    return alpha, sigma * alpha


def vp_sigma(t: torch.Tensor | float, beta_d: float = VP_BETA_D,
             beta_min: float = VP_BETA_MIN) -> torch.Tensor:
    """EDM's VP schedule: sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), t in (0, 1].

    Same dtype as a tensor t (a Python float becomes a float32 tensor, as torch.as_tensor does).
    """
    t = torch.as_tensor(t)
    return torch.expm1(0.5 * beta_d * t ** 2 + beta_min * t).sqrt()


def vp_t(sigma: torch.Tensor | float, beta_d: float = VP_BETA_D,
         beta_min: float = VP_BETA_MIN) -> torch.Tensor:
    """Inverse of `vp_sigma`: the t at which the VP schedule reaches VE noise level sigma."""
    sigma = torch.as_tensor(sigma)
    return ((beta_min ** 2 + 2 * beta_d * torch.log1p(sigma ** 2)).sqrt() - beta_min) / beta_d


# --------------------------------------------------------------------------------------
# The fixed noisy copy
# --------------------------------------------------------------------------------------

def make_noisy_copy(x0: torch.Tensor, sigma_tn: float, dataset_seed: int, key: str,
                    form: str = "edm", t_n: int | None = None) -> torch.Tensor:
    """The ONE fixed noisy copy of image (or latent) `x0` with stable key `key`, float32.

    form "edm":      x0 + sigma_tn * n
    form "vp":       alpha_tn x0 + s_tn n, (alpha_tn, s_tn) = vp_alpha_sigma(sigma_tn)
    form "latent_v": alpha_tn z0 + s_tn n, (alpha_tn, s_tn) = ddpm_alpha_sigma(t_n)
                     (t_n is the DDPM timestep index; sigma_tn is not used)
    with n = keyed_normal(x0.shape, dataset_seed, key). Never clipped: values outside
    [-1, 1] are expected. The caller stores it (float16) beside the clean image.
    """
    if form not in NOISE_FORMS:
        raise ValueError(f"make_noisy_copy: form must be one of {NOISE_FORMS}, got {form!r}")
    n = keyed_normal(x0.shape, dataset_seed, key).to(x0.device)
    x0 = x0.to(torch.float32)
    if form == "edm":
        if sigma_tn < 0:
            raise ValueError(f"make_noisy_copy: sigma_tn must be >= 0, got {sigma_tn}")
        return x0 + sigma_tn * n
    if form == "vp":
        if sigma_tn < 0:
            raise ValueError(f"make_noisy_copy: sigma_tn must be >= 0, got {sigma_tn}")
        alpha, s = vp_alpha_sigma(sigma_tn)
    else:
        if t_n is None:
            raise ValueError("make_noisy_copy: form 'latent_v' needs t_n (objective.t_n)")
        alpha, s = ddpm_alpha_sigma(t_n)
    return float(alpha) * x0 + float(s) * n


# --------------------------------------------------------------------------------------
# Units check
# --------------------------------------------------------------------------------------

def check_image_range(x: torch.Tensor, name: str, tolerance: float = 1e-5) -> None:
    """Raise ImageRangeError (naming `name`, e.g. the argument) unless `x` is in [-1, 1].

    The cheap units check of the public entry points that take float images (the loss
    classes on their first batch, the memorization summary, the denoiser attraction): the
    data the launchers pass comes through data.augment.to_model_units and is right by
    construction, but a library caller's tensor may not be. Catches the two usual mistakes,
    which would otherwise give silently different numbers: raw 0..255 values (anything above
    1.5) and [0, 1] images (the `* 2 - 1` was forgotten: every value in [0, 1]). Pass many
    images at once (a batch or a set): one bright image can legitimately have no negative
    pixel, a whole set of real images cannot. `tolerance`: how far outside [-1, 1] values may
    go (generated samples overshoot a little; pixels from uint8 do not).
    """
    if x.numel() == 0:
        raise ImageRangeError(f"{name}: no pixels to check (empty tensor)")
    x = x.detach()
    if not bool(torch.isfinite(x).all()):
        raise ImageRangeError(f"{name}: contains NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if hi > 1.5:
        raise ImageRangeError(
            f"{name}: values reach {hi:g}; looks like raw 0..255 pixels. Images must be in "
            "[-1, 1]: convert with uint8 / 127.5 - 1")
    if lo < -1.0 - tolerance or hi > 1.0 + tolerance:
        raise ImageRangeError(f"{name}: values span [{lo:g}, {hi:g}], outside [-1, 1]")
    if lo >= 0.0:
        raise ImageRangeError(
            f"{name}: every value lies in [{lo:g}, {hi:g}] within [0, 1]; looks like [0, 1] "
            "units (the `* 2 - 1` is missing: the results would silently differ, and training "
            "would see half the noise). Images must be in [-1, 1]: convert with x * 2 - 1 (or "
            "uint8 / 127.5 - 1)")
