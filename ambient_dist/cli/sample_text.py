"""Sample a (fine-tuned) Stable Diffusion model with classifier-free guidance, split over ranks.

    ambient-sample-text runs/laion-sd2-base --num 1000           # training captions
    ambient-sample-text runs/laion-sd2-base --prompts prompts.txt text.sampler=euler text.sample_steps=30
    torchrun --nproc_per_node 8 -m ambient_dist.cli.sample_text runs/laion-sd2-base --num 10000
    ambient-sample-text ~/sd2-base --prompts prompts.txt --out out/base  # any SD dir

MODEL is a text training run directory (its diffusers/ export, with the run's config for the
defaults; `section.key=value` overrides change it as they do for ambient-train) or any
diffusers-format Stable Diffusion directory (then only the sampler's keys below apply). Prompts come from --prompts (one
a line), else the run's text.prompts, else the captions of the training shards (--shards or
data.shards), cycled to --num. Image n has its own seed (--seed, n), so the images do not
depend on the batch size or the number of ranks; a re-run skips images already written.
Output (default MODEL/samples-text): PNGs in the layout ambient-evaluate reads, plus
prompts.txt, then e.g.
    ambient-evaluate --samples runs/laion-sd2-base/samples-text \\
        --shards data/laion-10k-latents --prompts runs/laion-sd2-base/samples-text/prompts.txt \\
        --clip-path ~/clip-vit-l14 --features dinov2 --dinov2-path ~/dinov2-vitg14
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from ambient_dist.cli import SetsOverride, add_overrides, overrides_of, reports_user_errors
from ambient_dist.config import ConfigError, load_config, parse_overrides
from ambient_dist.progress import say_once

# The config keys of the sampler, and their TextSamplerSettings names: what a bare Stable
# Diffusion directory (no config.yaml) takes as overrides.
SAMPLER_KEYS = {("text", "guidance_scale"): "guidance_scale", ("text", "sampler"): "sampler",
                ("text", "sample_steps"): "steps", ("data", "resolution"): "resolution",
                ("sampling", "seed"): "seed"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ambient-sample-text", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="text training run directory, or a diffusers-format SD directory")
    p.add_argument("--prompts", help="prompt file, one prompt a line")
    p.add_argument("--shards", help="latent shards whose training captions are the prompts")
    p.add_argument("--num", type=int, default=1000, help="number of images (default 1000)")
    p.add_argument("--out", help="output directory (default MODEL/samples-text)")
    # Short names for config overrides (positional overrides given too win).
    p.add_argument("--guidance", action=SetsOverride, key="text.guidance_scale",
                   help="text.guidance_scale (default the run's, or 7.5)")
    p.add_argument("--sampler", action=SetsOverride, key="text.sampler", choices=("ddim", "euler"),
                   help="text.sampler (default the run's, or ddim)")
    p.add_argument("--steps", action=SetsOverride, key="text.sample_steps",
                   help="text.sample_steps (default the run's, or 50)")
    p.add_argument("--resolution", action=SetsOverride, key="data.resolution",
                   help="data.resolution in pixels (default the run's, or the U-Net's)")
    p.add_argument("--seed", action=SetsOverride, key="sampling.seed",
                   help="sampling.seed, the base seed (default the run's, or 0)")
    p.add_argument("--batch", type=int, default=16, help="images per U-Net batch per rank")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_overrides(p, "the run's config.yaml")
    return p


def _bare_model_settings(overrides: list[str]) -> dict:
    """TextSamplerSettings fields from overrides, for a model without a config.yaml."""
    out = {}
    for section, values in parse_overrides(overrides).items():
        for key, value in (values.items() if isinstance(values, dict) else [(None, values)]):
            if (section, key) not in SAMPLER_KEYS:
                allowed = ", ".join(f"{s}.{k}" for s, k in SAMPLER_KEYS)
                raise ConfigError(f"override {section}.{key}: MODEL has no config.yaml (not a training "
                                  f"run), so only the sampler's keys apply: {allowed}")
            out[SAMPLER_KEYS[section, key]] = value
    return out


@reports_user_errors(ValueError, FileNotFoundError)
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    overrides = overrides_of(args)
    import torch

    from ambient_dist import distributed as ranks
    from ambient_dist.metrics.samples import SampleStore, check_training_data, file_digest
    from ambient_dist.text import sampling as ts
    from ambient_dist.text.sd_models import ModelError, load_components

    root = Path(args.model)
    is_run = (root / "config.yaml").is_file()
    cfg = load_config(root / "config.yaml", overrides, check_paths=False) if is_run else None
    bare = {} if is_run else _bare_model_settings(overrides)
    if args.shards:
        cfg = cfg or load_config(None, check_paths=False)
        cfg.data.shards, cfg.text.prompts = args.shards, ""
    if args.prompts:
        pool = ts.read_prompts(args.prompts)
        prompts = [pool[i % len(pool)] for i in range(args.num)]
    elif cfg is not None:
        if is_run and not args.shards and not cfg.text.prompts:
            # the prompts are the run's training captions: of the data it was trained on
            # (checked before any model is loaded)
            check_training_data(root, cfg.data.shards, f"data.shards of {root / 'config.yaml'}")
        prompts = ts.prompts_for(cfg, args.num)
    else:
        raise ConfigError("give --prompts FILE or --shards DIR (MODEL is not a training run)")
    model_dir = root / "diffusers" if is_run else root
    rank, world, local = ranks.env_rank_world()
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    try:
        components = load_components(model_dir, ("vae", "text_encoder", "tokenizer", "unet"), device)
    except ModelError as e:
        raise ConfigError(str(e)) from None
    components.unet.eval().requires_grad_(False)
    prediction = {"v_prediction": "v", "epsilon": "epsilon"}[
        components.scheduler_config.get("prediction_type", "epsilon")]
    defaults = (ts.TextSamplerSettings.from_config(cfg) if cfg is not None else
                ts.TextSamplerSettings(resolution=components.unet.config.sample_size
                                       * components.vae_scale_factor))
    settings = ts.TextSamplerSettings(**{**vars(defaults), **bare, "prediction": prediction,
                                         "batch_size": args.batch})
    notes = []   # what is not as the run's config (or the defaults) says: on screen and in samples.json
    if defaults.prediction != prediction and cfg is not None:
        notes.append(f"text.prediction {defaults.prediction!r} replaced by {prediction!r}, the "
                     f"prediction type of {model_dir / 'scheduler'} (what the U-Net was trained for)")
    if cfg is None and "resolution" not in bare:
        notes.append(f"resolution {settings.resolution} px: the U-Net's sample_size x the VAE's "
                     f"scale factor ({model_dir} has no config.yaml; --resolution sets it)")
    for note in notes:
        say_once(note)
    store = SampleStore(args.out or root / "samples-text")
    weights = model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    made = ts.write_samples(components, store, prompts, settings, device, rank, world,
                            weights_sha=file_digest(weights) if weights.is_file() else "",
                            autocast_dtype=torch.bfloat16 if args.precision == "bf16" else None,
                            progress=not args.quiet, notes=notes)
    print(f"rank {rank}: {made} images written to {store.root} (prompts in {store.root / 'prompts.txt'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
