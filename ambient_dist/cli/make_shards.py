"""Turn an image collection into training shards with one fixed noisy copy per image.

    ambient-make-shards --source fashion-mnist --out data/fashion-mnist-300 \\
        --count 300 --heldout 300 --sigma-tn 0.5
    ambient-make-shards --source ~/cifar-10-batches-py --out data/cifar10 --workers 8
    ambient-make-shards --source ~/ffhq-png --out data/ffhq64 --resolution 64 --fit crop
    ambient-make-shards --config configs/fashion-mnist-300.yaml --source fashion-mnist \\
        --out data/fashion-mnist-300
    ambient-make-shards --source cifar10 --path ~/cifar-10-batches-py --subset 1000 ...

Latent shards for Stable Diffusion fine-tuning (ambient_dist.text.latents, docs/text.md):
    ambient-make-shards --latent --model ~/sd2-base --source img2dataset \\
        --path ~/laion-10k --out data/laion-10k-latents --resolution 256 --t-n 50

Sources: an image folder (--class-from-folder for labels), CIFAR-10/100 python batches,
MNIST / Fashion-MNIST idx files, an .npz (images, labels, keys), img2dataset WebDataset shards;
'fashion-mnist' / 'fashion-mnist-test' name the copy Debian installs. With --config the noisy
copies and geometry follow that experiment config (sigma_tn, form, resolution, channels), so
the shards pass the trainer's manifest check, and --count / --heldout default to its
data.subset / evaluation.heldout_images. `--source FORMAT --path PATH` names the format
explicitly (cifar10, cifar100, mnist, folder, npz, webdataset, ...). Re-running the same command
skips finished shards after checking their checksums.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ambient_dist.cli import reports_user_errors
from ambient_dist.config import ConfigError, load_config
from ambient_dist.data.shards import ShardOptions, make_shards
from ambient_dist.data.sources import (DUPLICATE_POLICIES, FIT_MODES, SOURCE_FORMATS,
                                       open_named_source)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ambient-make-shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True,
                   help="path, or 'fashion-mnist' / 'fashion-mnist-test', or a format name with --path")
    p.add_argument("--path", help="the source's path when --source names its format")
    p.add_argument("--out", required=True, help="shard directory to write")
    p.add_argument("--format", default="auto", choices=SOURCE_FORMATS)
    p.add_argument("--split", default="train", choices=["train", "test"], help="CIFAR / idx split")
    p.add_argument("--class-from-folder", action="store_true", help="image folder: label = sub-folder")
    p.add_argument("--label-field", default="", help="img2dataset shards: json field holding the label")
    p.add_argument("--config", help="experiment YAML: take sigma_tn, form, resolution, channels from it")
    p.add_argument("--resolution", type=int, default=None, help="output size in pixels (default 32)")
    p.add_argument("--channels", type=int, default=None, choices=[0, 1, 3], help="1 or 3; 0 = the source's own (1 for MNIST / Fashion-MNIST idx files, 3 for "
                        "everything else, grey image folders included)")
    p.add_argument("--fit", default="auto", choices=FIT_MODES, help="resize+centre-crop, or pad")
    p.add_argument("--sigma-tn", type=float, default=None, help="noise level of the copies (default 0.5)")
    p.add_argument("--form", default=None, choices=["edm", "vp"])
    p.add_argument("--noise-seed", type=int, default=0, help="dataset seed of the noisy copies")
    p.add_argument("--mask-corruption", type=float, default=None,
                   help="masking baseline: store one fixed inpainting mask per image that erases "
                        "each pixel with this probability (default: 0 = no masks, or the config's "
                        "objective.mask_corruption when it trains objective.method=masking)")
    p.add_argument("--count", "--subset", type=int, default=None, dest="count",
                   help="training images (0 = all not held out)")
    p.add_argument("--per-class", type=int, default=0, help="or: this many training images per class")
    p.add_argument("--subset-seed", type=int, default=0)
    p.add_argument("--heldout", type=int, default=None, help="also set aside this many images never trained on")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--skip-bad", action="store_true", help="skip (and list) undecodable source images")
    p.add_argument("--duplicates", default="error", choices=list(DUPLICATE_POLICIES),
                   help="source samples that repeat an earlier one (the same key twice, e.g. a.png "
                        "beside a.jpg or overlapping tars, or the same image, label and caption "
                        "under another key): stop and name them (default: which copy is meant is "
                        "your call), or keep the first and list the others in the manifest")
    p.add_argument("--overwrite", action="store_true", help="replace shards made with other options")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    latent = p.add_argument_group("latent shards (text-conditional; see docs/text.md)")
    latent.add_argument("--latent", action="store_true", help="write VAE latents + noisy latents at t_n")
    latent.add_argument("--model", help="local diffusers-format Stable Diffusion directory (its VAE)")
    latent.add_argument("--t-n", type=int, default=None, help="DDPM timestep of the noisy latents (default 50)")
    latent.add_argument("--text-embeddings", action="store_true", help="also store the text-encoder output")
    latent.add_argument("--online", action="store_true",
                        help="store no clean latents: training VAE-encodes the images")
    latent.add_argument("--batch", type=int, default=32, help="images per VAE batch")
    latent.add_argument("--missing-caption", default="error", choices=["error", "skip", "empty"],
                        help="a sample without a caption: stop and name it (default), leave it "
                             "out, or keep it on the empty caption (an unconditional sample)")
    latent.add_argument("--rank", type=int, default=None, help="this writer's rank (default: from torchrun / mpirun, else 0)")
    latent.add_argument("--world-size", type=int, default=None, help="number of writers (default: from the launcher, else 1)")
    return p


@reports_user_errors()
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # The shard directory need not exist yet: blank data.shards to skip that check.
    cfg = load_config(args.config, ["data.shards="]) if args.config else None
    pick = lambda flag, from_cfg, default: flag if flag is not None else (  # noqa: E731
        from_cfg if cfg is not None else default)
    if args.latent:
        return make_latent(args, cfg, pick)
    opts = ShardOptions(
        resolution=pick(args.resolution, cfg and cfg.data.resolution, 32),
        channels=pick(args.channels, cfg and cfg.data.channels, 0),
        fit=args.fit,
        sigma_tn=pick(args.sigma_tn, cfg and cfg.objective.sigma_tn, 0.5),
        form=pick(args.form, cfg and cfg.objective.form, "edm"),
        noise_seed=args.noise_seed, per_class=args.per_class, subset_seed=args.subset_seed,
        count=pick(args.count, 0 if args.per_class else cfg and cfg.data.subset, 0),
        heldout=pick(args.heldout, cfg and cfg.evaluation.heldout_images, 0),
        samples_per_shard=args.samples_per_shard, workers=args.workers, skip_bad=args.skip_bad,
        duplicates=args.duplicates, mask_corruption=pick(args.mask_corruption, cfg and cfg.objective.method == "masking"
                             and cfg.objective.mask_corruption, 0.0) or 0.0)
    source = open_from_args(args)
    manifest = make_shards(source, args.out, opts, overwrite=args.overwrite, progress=not args.quiet)
    c = manifest["counts"]
    print(f"{args.out}: {c['train']} training images in {len(manifest['shards'])} shards, "
          f"{c['heldout']} held out, sigma_tn {manifest['sigma_tn']} ({manifest['form']}), "
          f"{manifest['resolution']}px x {manifest['channels']} channels"
          + (f", fixed inpainting masks keeping {manifest['masks']['kept_fraction']:.1%} of pixels"
             if manifest.get("masks") else ""))
    report_ingest(manifest)
    return 0


def open_from_args(args):
    return open_named_source(args.source, args.path, args.format, args.split,
                             args.class_from_folder, args.label_field)


def make_latent(args, cfg, pick) -> int:
    """--latent: VAE-encode the images of the source (ambient_dist.text.latents)."""
    import torch

    from ambient_dist.distributed import env_rank_world
    from ambient_dist.text.latents import LatentShardOptions, make_latent_shards
    from ambient_dist.text.sd_models import ModelError, load_components
    model = args.model or (cfg.text.model_path if cfg is not None else "")
    if not model:
        raise ConfigError("--latent needs --model PATH (or text.model_path in --config)")
    opts = LatentShardOptions(
        resolution=pick(args.resolution, cfg and cfg.data.resolution, 256),
        fit="crop" if args.fit == "auto" else args.fit,
        t_n=pick(args.t_n, cfg and cfg.objective.t_n, 50), noise_seed=args.noise_seed,
        count=pick(args.count, 0 if args.per_class else cfg and cfg.data.subset, 0),
        per_class=args.per_class, subset_seed=args.subset_seed,
        heldout=pick(args.heldout, cfg and cfg.evaluation.heldout_images, 0),
        samples_per_shard=args.samples_per_shard, text_embeddings=args.text_embeddings,
        online=args.online, batch_size=args.batch, workers=max(args.workers, 1),
        skip_bad=args.skip_bad, missing_caption=args.missing_caption, duplicates=args.duplicates)
    env_rank, env_world, local_rank = env_rank_world()  # torchrun / deepspeed / mpirun
    rank = args.rank if args.rank is not None else env_rank
    world = args.world_size if args.world_size is not None else env_world
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    parts = ("vae", "text_encoder", "tokenizer") if args.text_embeddings else ("vae",)
    try:
        components = load_components(model, parts, device=device)
    except ModelError as e:
        raise ConfigError(str(e)) from None
    manifest = make_latent_shards(open_from_args(args), args.out, opts, components, rank, world,
                                  device, overwrite=args.overwrite, progress=not args.quiet)
    if not manifest["complete"]:
        print(f"rank {rank}/{world}: shards written; the last rank to finish writes the manifest")
        return 0
    print(f"{args.out}: {manifest['counts']['train']} latent samples in {len(manifest['shards'])} "
          f"shards, {manifest['counts']['heldout']} held out, latents {manifest['latent_shape']}, "
          f"noisy at t_n {manifest['t_n']}{' (online)' if manifest['online'] else ''}")
    report_ingest(manifest)
    c = manifest["counts"]
    if c.get("captionless_kept"):
        print(f"kept {c['captionless_kept']} samples without a caption on the empty caption "
              "(--missing-caption empty: they train as unconditional samples)")
    return 0


def report_ingest(manifest: dict) -> None:
    """On screen what the manifest records: skipped images, duplicates left out, documented
    conversions."""
    if manifest.get("duplicates"):
        print(f"left out {len(manifest['duplicates'])} duplicate source samples (--duplicates "
              f"{manifest.get('duplicates_policy', 'keep-first')}: the first of each is kept):")
        for d in manifest["duplicates"]:
            print(f"  {d['where']}: repeats {d['first']} ({d['reason']})")
    if manifest["skipped"]:
        print(f"skipped {len(manifest['skipped'])} source samples:")
        for s in manifest["skipped"]:
            print(f"  {s['where']}: {s['error']}")
    for conversion, n in manifest.get("converted", {}).items():
        print(f"converted {n} images: {conversion}")


if __name__ == "__main__":
    sys.exit(main())
