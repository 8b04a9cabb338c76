#!/usr/bin/env python3
"""Generate images from a trained model (EDM Heun sampler, EMA weights), split over ranks.

    python launchers/sample.py runs/cifar10-300 --num 50000 --out runs/cifar10-300/samples
    torchrun --nproc_per_node 8 launchers/sample.py runs/cifar10-300 --batch 1024 --precision bf16
    python launchers/sample.py --config my.yaml --checkpoint ema.safetensors --format wds

Image n always comes from its own seed (--seed, n): the same pixels at any batch size, on
any number of ranks (torchrun / deepspeed / mpirun), and after a resume. Re-running the same
command skips the images already written. Output: a PNG folder (<out>/000000/000123.png) or
WebDataset shards (<out>/samples-000000.tar), plus samples.json describing how they were made.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

from ambient_dist.errors import UserError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", nargs="?", help="training run directory (config.yaml + ema.safetensors)")
    p.add_argument("--run", dest="run_flag", metavar="RUN_DIR", help="the same as the positional RUN_DIR")
    p.add_argument("--config", help="experiment YAML (default: RUN_DIR/config.yaml)")
    p.add_argument("--checkpoint", help="EMA .safetensors file or checkpoints/ckpt-* directory")
    p.add_argument("--out", help="output directory (default: RUN_DIR/samples)")
    p.add_argument("--num", type=int, default=50000, help="number of images (default 50000)")
    p.add_argument("--batch", type=int, default=256, help="images per sampler call per rank")
    p.add_argument("--seed", type=int, help="base seed (default: sampling.seed of the config)")
    p.add_argument("--format", choices=("png", "wds"), default="png")
    p.add_argument("--shard-size", type=int, default=1000,
                   help="images per WebDataset shard, and per unit of work split over ranks")
    p.add_argument("--steps", type=int, help="sampler steps (default: sampling.steps; 18 = 35 evaluations)")
    p.add_argument("--solver", choices=("heun", "euler"), default="heun")
    p.add_argument("--churn", type=float, default=0.0, help="S_churn (0 = deterministic)")
    p.add_argument("--s-min", type=float, default=0.0)
    p.add_argument("--s-max", type=float, default=float("inf"))
    p.add_argument("--s-noise", type=float, default=1.0)
    p.add_argument("--class", dest="fixed_class", type=int,
                   help="class of every image (default: image n gets class n %% num_classes)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (class models)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16 = autocast for the network (GPU); the sampler state stays float64")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (GPU)")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.run_dir = args.run_dir or args.run_flag
    if not args.run_dir and not (args.config and args.checkpoint):
        print("error: give a run directory, or both --config and --checkpoint", file=sys.stderr)
        return 2
    if args.num < 1 or args.batch < 1:
        print("error: --num and --batch must be >= 1", file=sys.stderr)
        return 2
    import torch

    from ambient_dist import sampling
    from ambient_dist import distributed as mdist
    from ambient_dist.metrics import samples as S

    rank, world, local_rank = mdist.env_rank_world()
    if args.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    try:
        net, cfg, weights = S.load_denoiser(args.run_dir, args.checkpoint, args.config, device)
        settings = sampling.SamplerSettings.for_run(
            cfg, solver=args.solver, S_churn=args.churn, S_min=args.s_min,
            S_max=args.s_max, S_noise=args.s_noise)
        if args.steps:
            settings.num_steps = args.steps
        out = Path(args.out) if args.out else Path(args.run_dir or ".") / "samples"
        if args.compile:
            net = torch.compile(net)
        torch.backends.cudnn.benchmark = True  # fixed shapes: keep cuDNN's fastest convolution
        made = S.sample_run(
            net, weights, out, args.num, cfg.sampling.seed if args.seed is None else args.seed,
            settings, batch=args.batch, layout=args.format, shard_size=args.shard_size,
            fixed_class=args.fixed_class, guidance_scale=args.guidance,
            autocast_dtype=torch.bfloat16 if args.precision == "bf16" else None,
            rank=rank, world=world, device=device, progress=not args.quiet)
    except (UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank == 0 or made:
        print(f"rank {rank}/{world}: wrote {made} images to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
