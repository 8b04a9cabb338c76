"""Generate images from a trained model (EDM Heun sampler, EMA weights), split over ranks.

    ambient-sample runs/cifar10-300 --num 50000 --out runs/cifar10-300/samples
    ambient-sample runs/cifar10-300 sampling.steps=40 sampling.S_churn=40 --out runs/c/churn
    torchrun --nproc_per_node 8 -m ambient_dist.cli.sample runs/cifar10-300 --batch 1024 --precision bf16
    ambient-sample --config my.yaml --checkpoint ema.safetensors --format wds
    ambient-sample runs/cifar10-300 --ema runs/cifar10-300/posthoc/ema-0.08.safetensors

The sampler is the run's `sampling` section (steps, sigma_min, sigma_max, rho, seed, solver,
S_churn, S_min, S_max, S_noise), changed by `section.key=value` overrides as ambient-train takes
them; --steps, --seed, --solver, --churn, --s-min, --s-max and --s-noise are short names for
those overrides. Image n always comes from its own seed (sampling.seed, n): the same pixels at
any batch size, on any number of ranks (torchrun / deepspeed / mpirun), and after a resume.
Re-running the same command skips the images already written. Output: a PNG folder
(<out>/000000/000123.png) or WebDataset shards (<out>/samples-000000.tar), plus samples.json
describing how they were made. --ema FILE samples a post-hoc EMA (ambient-posthoc-ema) instead
of the run's ema.safetensors, by default into RUN_DIR/samples-<FILE's stem>.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from ambient_dist.cli import SetsOverride, add_run_arguments, fail, reports_user_errors, run_and_overrides


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ambient-sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, "training run directory (config.yaml + ema.safetensors)",
                      "the run's config.yaml (or --config)")
    p.add_argument("--config", help="experiment YAML (default: RUN_DIR/config.yaml)")
    p.add_argument("--checkpoint", help="EMA .safetensors file or checkpoints/ckpt-* directory")
    p.add_argument("--ema", metavar="FILE", help="post-hoc EMA weights to sample (RUN_DIR/posthoc/"
                   "ema-<sigma_rel>.safetensors, from ambient-posthoc-ema) instead of ema.safetensors")
    p.add_argument("--out", help="output directory (default: RUN_DIR/samples, with --ema "
                                 "RUN_DIR/samples-<FILE's stem>)")
    p.add_argument("--num", type=int, default=50000,
                   help="number of images in the sample set (default 50000)")
    p.add_argument("--batch", type=int, default=256, help="images per sampler call per rank")
    p.add_argument("--format", choices=("png", "wds"), default="png")
    p.add_argument("--shard-size", type=int, default=1000,
                   help="images per WebDataset shard, and per unit of work split over ranks")
    p.add_argument("--class", dest="fixed_class", type=int,
                   help="class of every image (default: image n gets class n %% num_classes)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (class models)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16 = autocast for the network (GPU); the sampler state stays float64")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (GPU)")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    short = p.add_argument_group("short names for sampling.* overrides")
    short.add_argument("--seed", type=int, action=SetsOverride, key="sampling.seed", help="sampling.seed")
    short.add_argument("--steps", type=int, action=SetsOverride, key="sampling.steps",
                       help="sampling.steps (18 = 35 network evaluations)")
    short.add_argument("--solver", choices=("heun", "euler"), action=SetsOverride, key="sampling.solver",
                       help="sampling.solver")
    short.add_argument("--churn", type=float, action=SetsOverride, key="sampling.S_churn",
                       help="sampling.S_churn (0 = deterministic)")
    short.add_argument("--s-min", type=float, action=SetsOverride, key="sampling.S_min", help="sampling.S_min")
    short.add_argument("--s-max", type=float, action=SetsOverride, key="sampling.S_max", help="sampling.S_max")
    short.add_argument("--s-noise", type=float, action=SetsOverride, key="sampling.S_noise", help="sampling.S_noise")
    return p


@reports_user_errors(ValueError)
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    run_dir, overrides = run_and_overrides(args)
    if not run_dir and not (args.config and (args.checkpoint or args.ema)):
        return fail("give a run directory, or both --config and --checkpoint (or --ema)")
    if args.ema and args.checkpoint:
        return fail("give --ema or --checkpoint, not both (each names the weights to sample)")
    if args.num < 1 or args.batch < 1:
        return fail("--num and --batch must be >= 1")
    import torch

    from ambient_dist import sampling
    from ambient_dist import distributed as ranks
    from ambient_dist.metrics import samples as S

    rank, world, local_rank = ranks.env_rank_world()
    if args.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    net, cfg, weights = S.load_denoiser(run_dir, args.checkpoint, args.config, device,
                                        overrides=overrides, ema=args.ema)
    settings = sampling.SamplerSettings.for_run(cfg)
    default = f"samples-{Path(args.ema).stem}" if args.ema else "samples"
    out = Path(args.out) if args.out else Path(run_dir or ".") / default
    if args.compile:
        net = torch.compile(net)
    torch.backends.cudnn.benchmark = True  # fixed shapes: keep cuDNN's fastest convolution
    lock = None
    if run_dir and world == 1 and Path(run_dir).resolve() in [out.resolve(), *out.resolve().parents]:
        # Writing into the run: never beside its trainer, a study's worker or an evaluation.
        # (Ranks of a multi-rank sampling have no process group to agree through; there the
        # run directory is not locked.)
        from ambient_dist.locking import lock_for_launch
        lock = lock_for_launch(run_dir, "run directory")
    try:
        made = S.sample_run(
            net, weights, out, args.num, cfg.sampling.seed, settings, batch=args.batch,
            layout=args.format, shard_size=args.shard_size, fixed_class=args.fixed_class,
            guidance_scale=args.guidance, autocast_dtype=torch.bfloat16 if args.precision == "bf16" else None,
            rank=rank, world=world, device=device, progress=not args.quiet)
    finally:
        if lock is not None:
            lock.release()
    if rank == 0 or made:
        print(f"rank {rank}/{world}: wrote {made} images to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
