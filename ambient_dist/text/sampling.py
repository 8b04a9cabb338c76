"""Classifier-free guided sampling of a (fine-tuned) Stable Diffusion U-Net: DDIM or Euler.

    images = sample_images(components, prompts, indices, settings, device)

The scheduler is diffusers' DDIMScheduler or EulerDiscreteScheduler built on the checkpoint's
own schedule (sd_models.build_scheduler), with the prediction type the U-Net was trained for.
Each step makes one U-Net call on the doubled batch [empty caption, caption] and combines
    pred = pred(z, "") + scale * (pred(z, c) - pred(z, ""))
Image n starts from its own noise, seeded by (seed, n) exactly as the pixel samplers do
(ambient_dist.sampling.PerImageNoise), so image n is the same at any batch size or rank.
Output: float32 [N, 3, H, W] in about [-1, 1] (ambient_dist.images.to_uint8 for pixels).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from ambient_dist.sampling import PerImageNoise

from .latents import encode_text
from .sd_models import SDComponents, build_scheduler


@dataclass
class TextSamplerSettings:
    resolution: int = 256
    guidance_scale: float = 7.5
    sampler: str = "ddim"         # "ddim" or "euler"
    steps: int = 50
    prediction: str = "v"         # what the U-Net predicts: "v" or "epsilon"
    seed: int = 0
    batch_size: int = 16

    @classmethod
    def from_config(cls, cfg, **overrides) -> "TextSamplerSettings":
        """From an ExperimentConfig (data.resolution, text.*, sampling.seed)."""
        t = cfg.text
        values = dict(resolution=cfg.data.resolution, guidance_scale=t.guidance_scale,
                      sampler=t.sampler, steps=t.sample_steps, prediction=t.prediction,
                      seed=cfg.sampling.seed)
        values.update(overrides)
        return cls(**values)


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path}: not found")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path}: no prompts (one per line)")
    return prompts


def prompts_for(cfg, count: int) -> list[str]:
    """`count` prompts for an experiment: text.prompts (a file) or, when unset, the captions
    of the first training samples of data.shards; cycled when there are fewer."""
    from .latents import training_captions
    pool = (read_prompts(cfg.text.prompts) if cfg.text.prompts
            else training_captions(cfg.data.shards, min(count, cfg.data.subset or count)))
    if not pool:
        raise ValueError(f"data.shards ({cfg.data.shards}): no training captions to sample from")
    return [pool[i % len(pool)] for i in range(count)]


@torch.no_grad()
def sample_latents(unet: torch.nn.Module, cond: torch.Tensor, empty: torch.Tensor,
                   indices: Sequence[int], latent_shape: Sequence[int], scheduler_config: dict,
                   settings: TextSamplerSettings, device, autocast_dtype=None) -> torch.Tensor:
    """Guided denoising of one batch: cond [B, L, D] -> latents float32 [B, *latent_shape]."""
    device = torch.device(device)
    scheduler = build_scheduler(scheduler_config, settings.sampler, settings.prediction)
    scheduler.set_timesteps(settings.steps, device=device)
    latents = PerImageNoise(settings.seed, indices).randn(latent_shape, device).float()
    latents = latents * scheduler.init_noise_sigma
    both = torch.cat([empty.to(cond).expand_as(cond), cond])
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        with autocast:
            pred = unet(inp, t, encoder_hidden_states=both).sample.float()
        uncond, text = pred.chunk(2)
        guided = uncond + settings.guidance_scale * (text - uncond)
        latents = scheduler.step(guided, t, latents).prev_sample
    return latents


@torch.no_grad()
def sample_images(components: SDComponents, prompts: Sequence[str], indices: Sequence[int],
                  settings: TextSamplerSettings, device, unet: Optional[torch.nn.Module] = None,
                  autocast_dtype=None) -> torch.Tensor:
    """Images for `prompts` (image n of `indices` gets prompts[k] for its position k) with
    `unet` (default: the components' own), decoded by the VAE -> float32 [N, 3, H, W]."""
    if len(prompts) != len(indices):
        raise ValueError(f"sample_images: {len(prompts)} prompts for {len(indices)} images")
    c = components
    unet = unet if unet is not None else c.unet
    factor = c.vae_scale_factor
    if settings.resolution % factor:
        raise ValueError(f"resolution {settings.resolution} is not a multiple of the VAE's {factor}")
    latent_shape = (unet.config.in_channels, settings.resolution // factor, settings.resolution // factor)
    empty = encode_text(c.text_encoder, c.tokenizer, [""])
    vae_dtype = next(c.vae.parameters()).dtype
    out = []
    for s in range(0, len(indices), settings.batch_size):
        idx = list(indices[s: s + settings.batch_size])
        cond = encode_text(c.text_encoder, c.tokenizer, list(prompts[s: s + settings.batch_size]))
        latents = sample_latents(unet, cond, empty, idx, latent_shape, c.scheduler_config,
                                 settings, device, autocast_dtype)
        images = c.vae.decode((latents / c.scaling_factor).to(vae_dtype)).sample
        out.append(images.float().cpu())
    return torch.cat(out)


def write_samples(components: SDComponents, store, prompts: Sequence[str], settings: TextSamplerSettings,
                  device, rank: int = 0, world_size: int = 1, weights_sha: str = "",
                  autocast_dtype=None, progress: bool = True, notes: Sequence[str] = ()) -> int:
    """Generate images 0..len(prompts)-1 into a metrics.samples.SampleStore (the layout
    ambient-evaluate reads), this rank's blocks only, skipping images already there.
    Writes prompts.txt beside them (line n = prompt of image n, for the CLIP score);
    `notes` (what was changed of the settings asked for) go into samples.json."""
    import hashlib

    from ambient_dist.fileio import atomic_write_bytes
    from ambient_dist.metrics.samples import SampleMeta
    from ambient_dist.images import to_uint8
    from ambient_dist.progress import progress as progress_bar

    num = len(prompts)
    text = "".join(p.replace("\n", " ") + "\n" for p in prompts).encode("utf-8")
    sampler = {k: v for k, v in vars(settings).items() if k not in ("seed", "batch_size", "resolution")}
    sampler["prompts_sha"] = hashlib.sha256(text).hexdigest()[:16]
    store.check_meta(SampleMeta(num=num, seed=settings.seed, image_shape=[3, settings.resolution,
                                settings.resolution], weights_sha=weights_sha, sampler=sampler,
                                layout=store.layout, shard_size=store.block, labels="prompts",
                                notes=list(notes)))
    if rank == 0:
        atomic_write_bytes(store.root / "prompts.txt", text)
    todo = [(block, store.pending(block)) for block in store.blocks(num, rank, world_size)]
    total = sum(len(p) for _, p in todo)
    bar = progress_bar(total=total, desc=f"text sampling (rank {rank})", unit="img", disable=not progress)
    for block, pending in todo:
        staged: dict = {}
        for start in range(0, len(pending), settings.batch_size):
            indices = pending[start: start + settings.batch_size]
            images = sample_images(components, [prompts[n] for n in indices], indices, settings,
                                   device, autocast_dtype=autocast_dtype)
            store.write(block, indices, to_uint8(images), None, staged)
            bar.update(len(indices))
    bar.close()
    return total
