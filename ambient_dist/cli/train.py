"""Train a diffusion model with the ambient objective.

    ambient-train --config configs/fashion-mnist-300.yaml [section.key=value ...]
    ambient-train --config configs/cifar10-ddpmpp.yaml --describe
    ambient-train --resume runs/fashion-mnist-300        # continue a run
    ambient-train --config FILE --resume auto             # continue if possible

The same command runs as a single process or under deepspeed / torchrun / mpirun
(`python launchers/train.py ...` from a checkout, or `python -m ambient_dist.cli.train`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from ambient_dist.cli import reports_user_errors
from ambient_dist.config import load_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ambient-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="experiment YAML (default with --resume RUN_DIR: RUN_DIR/config.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.batch=128")
    p.add_argument("--describe", action="store_true",
                   help="print the resolved config, parameter count and GFLOP/image, then exit")
    p.add_argument("--resume", metavar="RUN_DIR|auto",
                   help="continue from the latest checkpoint of RUN_DIR, or of this run's own "
                        "directory if there is one ('auto')")
    p.add_argument("--run-dir", help="output directory (default: <train.run_root>/<name>)")
    # The deepspeed launcher passes --local_rank; the environment (LOCAL_RANK) says the same.
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return p


@reports_user_errors()
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    config_path, run_dir = args.config, args.run_dir
    if config_path is None:
        if args.resume in (None, "auto"):
            parser.error("--config is required (unless --resume names a run directory)")
        config_path = str(Path(args.resume) / "config.yaml")
        run_dir = run_dir or args.resume
    # --describe needs no data on disk, so it skips the existence checks of paths.
    cfg = load_config(config_path, args.overrides, check_paths=not args.describe)
    # Imported once the config is known good: this pulls in torch and the networks.
    from ambient_dist.engine.run import describe, run_training  # both follow cfg.task
    if args.describe:
        print(describe(cfg))
        return 0
    run_training(cfg, run_dir=run_dir, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
